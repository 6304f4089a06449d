/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: requests (moe_client_submit, moe_client_nop,
 * moe_client_wait, moe_client_forward) over the submission and completion
 * rings, and moe_client_stats over the control socket.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proto/futex.h"
#include "client_impl.h"

/* ------------------------------------------------------------------ requests */

static bool in_arena(const struct moe_client *c, const void *p, uint64_t len)
{
	const uint8_t *b = p;

	return b >= c->seg.arena && b <= c->seg.arena + c->seg.arena_bytes &&
	       len <= (uint64_t)(c->seg.arena + c->seg.arena_bytes - b);
}

bool client_is_moe_layer(const struct moe_client *c, uint32_t layer)
{
	for (uint32_t i = 0; i < c->w->num_moe_layers; i++)
		if (c->layers[i] == layer)
			return true;
	return false;
}

/* Has moed closed the session's segment?  A memory read: submit's check. */
static int segment_state(struct moe_client *c)
{
	return __atomic_load_n(&c->seg.hdr->daemon_state, __ATOMIC_ACQUIRE) != MOE_SEG_SERVING ? -ESHUTDOWN : 0;
}

/* Is the session over? -ESHUTDOWN, -ECONNRESET or 0 (one poll() call:
 * waiters look before they sleep, not submitters). */
int client_session_state(struct moe_client *c)
{
	struct pollfd p = { c->fd, POLLRDHUP, 0 };

	if (__atomic_load_n(&c->seg.hdr->daemon_state, __ATOMIC_ACQUIRE) != MOE_SEG_SERVING)
		return -ESHUTDOWN;
	if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
		return -ECONNRESET;
	return 0;
}

static int push_locked(struct moe_client *c, const struct moe_sqe *e);

static int submit_locked(struct moe_client *c, const struct moe_request *q, uint64_t user_data)
{
	uint64_t H = c->w->hidden_size, k = c->w->top_k, es, bytes;
	struct moe_sqe e;

	if (q->dtype != MOE_F32 && q->dtype != MOE_BF16)
		return -EINVAL;
	if (q->tokens == 0 || q->tokens > c->w->max_tokens)
		return -E2BIG;
	if (!client_is_moe_layer(c, q->layer))
		return client_error_layer(c, q->layer);
	es = q->dtype == MOE_F32 ? 4 : 2;
	bytes = q->tokens * H * es;
	if (!in_arena(c, q->input, bytes) || !in_arena(c, q->output, bytes) ||
	    ((const uint8_t *)q->input - c->seg.arena) % es || ((uint8_t *)q->output - c->seg.arena) % es ||
	    (q->ids && (((uint8_t *)q->ids - c->seg.arena) % 4 || ((uint8_t *)q->weights - c->seg.arena) % 4)))
		return -EFAULT;
	if ((q->weights && !q->ids) ||
	    (q->ids && (!q->weights || !in_arena(c, q->ids, q->tokens * k * 4) ||
			!in_arena(c, q->weights, q->tokens * k * 4))))
		return q->ids && q->weights ? -EFAULT : -EINVAL;
	e = (struct moe_sqe){
		.user_data = user_data, .opcode = MOE_OP_FORWARD, .layer = q->layer, .dtype = q->dtype,
		.tokens = q->tokens, .in_off = (uint64_t)((const uint8_t *)q->input - c->seg.arena),
		.out_off = (uint64_t)((uint8_t *)q->output - c->seg.arena),
	};
	if (q->ids) {
		e.flags = MOE_SQE_ROUTING;
		e.ids_off = (uint64_t)((uint8_t *)q->ids - c->seg.arena);
		e.weights_off = (uint64_t)((uint8_t *)q->weights - c->seg.arena);
	}
	return push_locked(c, &e);
}

/* Put @e in the submission ring and wake moed if it sleeps (sq_lock held). */
static int push_locked(struct moe_client *c, const struct moe_sqe *e)
{
	uint32_t tail = c->seg.hdr->sq_tail, head = __atomic_load_n(&c->seg.hdr->sq_head, __ATOMIC_ACQUIRE);
	int r = segment_state(c);

	if (r < 0)
		return r;
	if (tail - head >= c->seg.sq_entries) {
		/* full: because moed is slow, or because it is gone */
		r = client_session_state(c);
		return r < 0 ? r : -EAGAIN;
	}
	c->seg.sq[tail & (c->seg.sq_entries - 1)] = *e;
	/* the entry, then the tail (release); then, if the daemon may sleep, wake it */
	__atomic_store_n(&c->seg.hdr->sq_tail, tail + 1, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	moe_futex_kick(&c->seg.hdr->daemon_futex, &c->seg.hdr->daemon_wait, 1);
	return 0;
}

MOE_EXPORT int moe_client_submit(struct moe_client *c, const struct moe_request *req)
{
	int r;

	client_error_clear();
	if (!c || !req)
		return -EINVAL;
	if (req->user_data & TAG_SYNC)
		return -EINVAL;      /* the top bit is moe_client_forward's */
	pthread_mutex_lock(&c->sq_lock);
	r = submit_locked(c, req, req->user_data);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

MOE_EXPORT int moe_client_nop(struct moe_client *c, uint64_t user_data)
{
	int r;

	if (!c || (user_data & TAG_SYNC))
		return -EINVAL;
	struct moe_sqe e = { .user_data = user_data, .opcode = MOE_OP_NOP };

	pthread_mutex_lock(&c->sq_lock);
	r = push_locked(c, &e);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

/* Move every completion in the ring to the stash (cq_lock held). */
static int reap(struct moe_client *c)
{
	uint32_t head = c->seg.hdr->cq_head, tail = __atomic_load_n(&c->seg.hdr->cq_tail, __ATOMIC_ACQUIRE);

	if (tail - head > c->seg.cq_entries)
		return -MOE_E_PROTO;
	if (c->nstash + (tail - head) > c->capstash) {
		size_t cap = c->nstash + (tail - head) + 16;
		struct moe_completion *n = realloc(c->stash, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		c->stash = n;
		c->capstash = cap;
	}
	for (; head != tail; head++) {
		const struct moe_cqe *e = &c->seg.cq[head & (c->seg.cq_entries - 1)];

		c->stash[c->nstash++] = (struct moe_completion){ e->user_data, e->res };
	}
	if (head != c->seg.hdr->cq_head) {
		__atomic_store_n(&c->seg.hdr->cq_head, head, __ATOMIC_RELEASE);
		/* moed may sleep on a full completion ring: room now (proto.h) */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(&c->seg.hdr->daemon_wait, __ATOMIC_RELAXED) & MOE_DAEMON_WAIT_CQ) {
			__atomic_fetch_add(&c->seg.hdr->daemon_futex, 1, __ATOMIC_RELEASE);
			moe_futex_wake(&c->seg.hdr->daemon_futex, 1);
		}
	}
	return 0;
}

/* Take a stashed completion: @want's, or with ANY the first that is not
 * moe_client_forward's (cq_lock held). */
#define ANY UINT64_MAX
static bool unstash(struct moe_client *c, uint64_t want, struct moe_completion *ret)
{
	for (size_t i = 0; i < c->nstash; i++) {
		uint64_t u = c->stash[i].user_data;

		if (want == ANY ? !(u & TAG_SYNC) : u == want) {
			*ret = c->stash[i];
			memmove(c->stash + i, c->stash + i + 1, (c->nstash - i - 1) * sizeof(*c->stash));
			c->nstash--;
			return true;
		}
	}
	return false;
}

int client_wait_for(struct moe_client *c, uint64_t want, struct moe_completion *ret, int timeout_ms)
{
	uint64_t t0 = client_mono_ns(), limit = timeout_ms < 0 ? UINT64_MAX : (uint64_t)timeout_ms * 1000000u;
	int r = 0;

	pthread_mutex_lock(&c->cq_lock);
	for (;;) {
		uint64_t now, left;
		uint32_t val;

		r = reap(c);
		if (r < 0)
			break;
		if (unstash(c, want, ret)) {
			r = 0;
			break;
		}
		now = client_mono_ns();
		if (now - t0 < c->spin_ns && limit) {
			/* a completion is usually microseconds away: poll before sleeping
			 * (longer spins or sched_yield() lost more than they won on a
			 * 2-core machine, where the spinner takes a core from moed) */
			pthread_mutex_unlock(&c->cq_lock);
			moe_cpu_relax();
			pthread_mutex_lock(&c->cq_lock);
			continue;
		}
		r = client_session_state(c);
		if (r < 0) {
			/* what the daemon completed before it went still counts */
			if (reap(c) == 0 && unstash(c, want, ret))
				r = 0;
			break;
		}
		if (now - t0 >= limit) {
			r = timeout_ms == 0 ? -EAGAIN : -ETIMEDOUT;
			break;
		}
		left = limit - (now - t0);
		/* sleep: flag, fence, look once more, then wait on the word */
		val = __atomic_load_n(&c->seg.hdr->client_futex, __ATOMIC_ACQUIRE);
		if (c->sleepers++ == 0)
			__atomic_store_n(&c->seg.hdr->client_wait, 1, __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(&c->seg.hdr->cq_tail, __ATOMIC_ACQUIRE) == c->seg.hdr->cq_head) {
			pthread_mutex_unlock(&c->cq_lock);
			moe_futex_wait(&c->seg.hdr->client_futex, val, left < WAIT_SLICE_NS ? left : WAIT_SLICE_NS);
			pthread_mutex_lock(&c->cq_lock);
		}
		if (--c->sleepers == 0)
			__atomic_store_n(&c->seg.hdr->client_wait, 0, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&c->cq_lock);
	return r;
}

MOE_EXPORT int moe_client_wait(struct moe_client *c, struct moe_completion *ret, int timeout_ms)
{
	if (!c || !ret)
		return -EINVAL;
	return client_wait_for(c, ANY, ret, timeout_ms);
}

/*
 * Queue one of moe_client_forward's own requests (@q checked as a
 * submission, or the descriptor @raw as it is) under a tag of its own in
 * *tag; a full ring is waited out.
 */
int client_submit_sync(struct moe_client *c, const struct moe_request *q, struct moe_sqe *raw, uint64_t *tag)
{
	int r;

	pthread_mutex_lock(&c->sq_lock);
	*tag = TAG_SYNC | ++c->sync_seq;
	if (raw)
		raw->user_data = *tag;
	do {
		r = raw ? push_locked(c, raw) : submit_locked(c, q, *tag);
		if (r == -EAGAIN) {
			/* the ring is full: move finished completions to the stash
			 * (moed takes no more while its completion ring is full),
			 * then let the others' requests drain */
			pthread_mutex_unlock(&c->sq_lock);
			pthread_mutex_lock(&c->cq_lock);
			int rr = reap(c);
			pthread_mutex_unlock(&c->cq_lock);
			if (rr < 0) {
				r = rr;
				pthread_mutex_lock(&c->sq_lock);
				break;
			}
			usleep(50);
			pthread_mutex_lock(&c->sq_lock);
		}
	} while (r == -EAGAIN);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

MOE_EXPORT int moe_client_forward(struct moe_client *c, uint32_t layer, uint32_t dtype, const void *input,
				  void *output, uint64_t tokens, int32_t *ids, float *weights)
{
	uint64_t H, k, es, per, done = 0, piece;
	uint8_t *in = NULL, *out = NULL;
	int32_t *aids = NULL;
	float *aw = NULL;
	int r = 0;

	client_error_clear();
	if (!c || !input || !output || (weights && !ids) || (dtype != MOE_F32 && dtype != MOE_BF16))
		return -EINVAL;
	if (!client_is_moe_layer(c, layer))
		return client_error_layer(c, layer);
	H = c->w->hidden_size;
	k = c->w->top_k;
	es = dtype == MOE_F32 ? 4 : 2;
	per = 2 * H * es + (ids ? 2 * k * 4 : 0) + 4 * ARENA_ALIGN / 64;
	/* the piece: what the limits allow and half the arena holds (others use it too) */
	piece = c->w->max_tokens;
	if (piece > c->seg.arena_bytes / 2 / per)
		piece = c->seg.arena_bytes / 2 / per;
	if (piece == 0)
		return -ENOMEM;
	if (piece > tokens)
		piece = tokens;
	/* the arena is shared by the handle's threads: take smaller pieces, down
	 * to one token, and then wait for room, rather than fail */
	for (;;) {
		if ((r = moe_client_alloc(c, piece * H * es, (void **)&in)) == 0 &&
		    (r = moe_client_alloc(c, piece * H * es, (void **)&out)) == 0 &&
		    (!ids || ((r = moe_client_alloc(c, piece * k * 4, (void **)&aids)) == 0 &&
			      (r = moe_client_alloc(c, piece * k * 4, (void **)&aw)) == 0)))
			break;
		moe_client_free(c, in);
		moe_client_free(c, out);
		moe_client_free(c, aids);
		moe_client_free(c, aw);
		in = out = NULL;
		aids = NULL;
		aw = NULL;
		if (r != -ENOMEM)
			return r;
		if (piece > 1) {
			piece /= 2;
			continue;
		}
		r = client_session_state(c);
		if (r < 0)
			return r;
		usleep(100);
	}
	while (done < tokens) {
		uint64_t n = tokens - done < piece ? tokens - done : piece;
		struct moe_request q = { .layer = layer, .dtype = dtype, .tokens = n, .input = in,
					 .output = out, .ids = aids, .weights = aw };
		struct moe_completion cq;
		uint64_t tag;

		memcpy(in, (const uint8_t *)input + done * H * es, n * H * es);
		r = client_submit_sync(c, &q, NULL, &tag);
		if (r < 0)
			goto out;
		r = client_wait_for(c, tag, &cq, -1);
		if (r < 0) {
			if (r != -ESHUTDOWN && r != -ECONNRESET) {
				/* the request may still be in flight: moed could write into
				 * these blocks later, so they stay taken */
				in = out = NULL;
				aids = NULL;
				aw = NULL;
			}
			goto out;
		}
		if (cq.res < 0) {
			r = cq.res;
			goto out;
		}
		memcpy((uint8_t *)output + done * H * es, out, n * H * es);
		if (ids) {
			memcpy(ids + done * k, aids, n * k * 4);
			if (weights)
				memcpy(weights + done * k, aw, n * k * 4);
		}
		done += n;
	}
out:
	moe_client_free(c, in);
	moe_client_free(c, out);
	moe_client_free(c, aids);
	moe_client_free(c, aw);
	return r;
}

MOE_EXPORT int moe_client_stats(struct moe_client *c, char **ret)
{
	struct moe_msg_header h;
	char *text;
	int r;

	if (!c || !ret)
		return -EINVAL;
	pthread_mutex_lock(&c->ctl_lock);
	r = c->ctl_broken ? -MOE_E_PROTO : client_ctl_send(c, MOE_MSG_STATS, NULL, 0);
	if (r == 0)
		r = client_recv_full(c->fd, &h, sizeof(h), NULL);
	if (r == 0 && (h.magic != MOE_MSG_MAGIC || h.type != MOE_MSG_STATS || h.len > MOE_MSG_MAX))
		r = -MOE_E_PROTO;
	if (r < 0) {
		/* an answer may still come: the next exchange would read it */
		c->ctl_broken = true;
		pthread_mutex_unlock(&c->ctl_lock);
		return r;
	}
	text = malloc((size_t)h.len + 1);
	if (!text) {
		/* the payload must still be read, or the stream is out of step */
		char sink[4096];
		for (uint32_t left = h.len; left && r == 0;) {
			uint32_t n = left < sizeof(sink) ? left : sizeof(sink);
			r = client_recv_full(c->fd, sink, n, NULL);
			left -= n;
		}
		if (r < 0)
			c->ctl_broken = true;
		pthread_mutex_unlock(&c->ctl_lock);
		return -ENOMEM;
	}
	r = client_recv_full(c->fd, text, h.len, NULL);
	if (r < 0)
		c->ctl_broken = true;
	pthread_mutex_unlock(&c->ctl_lock);
	if (r < 0) {
		free(text);
		return r;
	}
	text[h.len] = '\0';
	*ret = text;
	return 0;
}
