/* SPDX-License-Identifier: MIT */
/*
 * moed's data thread (server_impl.h): each pass it adopts new sessions and
 * frees ended ones, takes what every client has submitted (copying and
 * checking each descriptor against the model, the limits and its own
 * record of the segment), runs all requests for a layer as one batch
 * through the engine, scatters the outputs into the clients' arenas and
 * publishes the completions; with nothing to do it spins a little, then
 * sleeps on the clients' futex words and its own wake word (proto.h,
 * "Wakeups").  At stop it fails what is still queued and closes every
 * segment.  The engine is this thread's alone.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine/clock.h"
#include "engine/dtype.h"
#include "engine/engine.h"
#include "libmoeclient/moeclient.h"
#include "proto/futex.h"
#include "proto/proto.h"
#include "log.h"
#include "server_impl.h"

#define IDLE_SPIN_NS 50000u         /* poll the rings this long before sleeping */

void dataplane_wake(struct moed_server *s)
{
	atomic_fetch_add(&s->wake_word, 1);
	moe_futex_wake((uint32_t *)&s->wake_word, 1);
}

/* Submissions of @c not yet taken. */
static bool sq_pending(struct client *c)
{
	return __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE) != c->sq_head;
}

/* No room in @c's completion ring until the client advances cq_head. */
static bool cq_full(struct client *c)
{
	return c->cq_tail - __atomic_load_n(&c->seg.hdr->cq_head, __ATOMIC_ACQUIRE) == c->seg.cq_entries;
}

/* Has @c submitted what the daemon can take?  A submission whose
 * completion has no room is not work until the client advances cq_head
 * (proto.h, "A full completion ring"): counting it made the data thread
 * spin on a stopped client.  A corrupt cq_head counts, so that take()
 * ends the session. */
static bool has_work(struct client *c)
{
	return sq_pending(c) && !cq_full(c);
}

/* Submissions waiting for room in @c's completion ring? */
static bool cq_stalled(struct client *c)
{
	return sq_pending(c) && cq_full(c);
}

/* End @c's session from the data side: the control thread sees the socket
 * close and the next pass frees it. */
static void kick(struct client *c, const char *why)
{
	if (c->kicked)
		return;
	c->kicked = true;
	moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client %u (pid %d, uid %u): %s: disconnecting it",
		       c->id, (int)c->pid, (unsigned)c->uid, why);
	__atomic_store_n(&c->seg.hdr->daemon_state, MOE_SEG_CLOSED, __ATOMIC_RELEASE);
	shutdown(c->fd, SHUT_RDWR);
}

static void complete(struct moed_server *s, struct client *c, uint64_t user_data, int res)
{
	struct moe_cqe *e = &c->seg.cq[c->cq_tail & (c->seg.cq_entries - 1)];

	/* the engine's "an expert failed its checksum" (engine.h), which the
	 * client's API names apart from a failed read (moe_client_submit(3)) */
	if (res == -EBADMSG)
		res = -MOE_E_CHECKSUM;
	e->user_data = user_data;
	e->res = res;
	e->flags = 0;
	c->cq_tail++;
	if (res < 0) {
		c->errors++;
		s->total_errors++;
	}
}

/* Publish the completions and wake the client if it sleeps. */
static void publish(struct client *c)
{
	__atomic_store_n(&c->seg.hdr->cq_tail, c->cq_tail, __ATOMIC_RELEASE);
	__atomic_store_n(&c->seg.hdr->sq_head, c->sq_head, __ATOMIC_RELEASE);
	atomic_thread_fence(memory_order_seq_cst);
	moe_futex_kick(&c->seg.hdr->client_futex, &c->seg.hdr->client_wait, INT_MAX);
}

/* Is [off, off + len) inside the arena, with @align? */
static bool in_arena(const struct client *c, uint64_t off, uint64_t len, uint64_t align)
{
	return off % align == 0 && off <= c->seg.arena_bytes && len <= c->seg.arena_bytes - off;
}

/*
 * Check a copied descriptor against the model, the limits and the
 * daemon's own record of the segment.  0, or the error to complete it with.
 */
static int validate(struct moed_server *s, struct client *c, const struct moe_sqe *q,
		    uint32_t max_tokens)
{
	uint64_t H = s->mc->hidden_size, k = s->mc->top_k, es, bytes, rbytes;

	if (q->opcode == MOE_OP_NOP)
		return 0;
	if (q->opcode != MOE_OP_FORWARD)
		return -EOPNOTSUPP;
	if (q->flags & ~(MOE_SQE_ROUTING | MOE_SQE_DEVICE | MOE_SQE_REGIONS(0xff, 0xff)))
		return -EINVAL;
	if (!(q->flags & MOE_SQE_DEVICE) && (q->flags & MOE_SQE_REGIONS(0xff, 0xff)))
		return -EINVAL;
	if (moe_store_layer_index(moe_engine_store(s->engine), q->layer) < 0)
		return -MOE_E_LAYER;
	if (q->dtype != MOE_F32 && q->dtype != MOE_BF16)
		return -EINVAL;
	if (q->tokens == 0 || q->tokens > max_tokens)
		return -E2BIG;
	es = q->dtype == MOE_F32 ? 4 : 2;
	bytes = q->tokens * H * es;            /* tokens <= 2^20 and H < 2^32: no overflow */
	if (q->flags & MOE_SQE_DEVICE) {
		if (q->dtype != MOE_F32)
			return -EINVAL;          /* device memory holds float32 */
		if (!cudaipc_region_ok(c, MOE_SQE_IN_REGION(q->flags), q->in_off, bytes) ||
		    !cudaipc_region_ok(c, MOE_SQE_OUT_REGION(q->flags), q->out_off, bytes))
			return -EFAULT;
	} else if (!in_arena(c, q->in_off, bytes, es) || !in_arena(c, q->out_off, bytes, es)) {
		return -EFAULT;
	}
	if (q->flags & MOE_SQE_ROUTING) {
		rbytes = q->tokens * k * 4;
		if (!in_arena(c, q->ids_off, rbytes, 4) || !in_arena(c, q->weights_off, rbytes, 4))
			return -EFAULT;
	}
	return 0;
}

/* Take what @c submitted: returns the number of requests added to s->reqs. */
static size_t take(struct moed_server *s, struct client *c, size_t nreq, size_t cap, uint64_t t0)
{
	/* each index read once; the client can change it any time after */
	uint32_t tail = __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE);
	uint32_t cq_head = __atomic_load_n(&c->seg.hdr->cq_head, __ATOMIC_ACQUIRE);
	uint32_t n = tail - c->sq_head, space, added = 0;

	if (n > c->seg.sq_entries) {
		kick(c, "its submission ring index is corrupt");
		return nreq;
	}
	if (c->cq_tail - cq_head > c->seg.cq_entries) {
		kick(c, "its completion ring index is corrupt");
		return nreq;
	}
	/* take only what has room for its completion, and in our array */
	space = c->seg.cq_entries - (c->cq_tail - cq_head);
	if (n > space)
		n = space;
	if (n > cap - nreq)
		n = (uint32_t)(cap - nreq);
	for (uint32_t i = 0; i < n; i++) {
		struct moe_sqe q;
		int r;

		memcpy(&q, &c->seg.sq[(c->sq_head + i) & (c->seg.sq_entries - 1)], sizeof(q));
		if ((q.flags & MOE_SQE_DEVICE) && q.opcode == MOE_OP_FORWARD) {
			/* a request on device memory runs alone: one per client
			 * per pass, so that a client flooding them delays the
			 * others by one forward at most; the rest waits */
			if (c->dev_taken) {
				n = i;
				break;
			}
			c->dev_taken = true;
		}
		c->requests++;
		/* the session's limit is the one it was welcomed with (its library
		 * cuts pieces by it): a reload changes the limit of new sessions */
		r = validate(s, c, &q, c->max_tokens);
		if (r < 0 || q.opcode == MOE_OP_NOP) {
			complete(s, c, q.user_data, r);
			continue;
		}
		s->reqs[nreq + added] = (struct req){ .c = c, .sqe = q, .t0 = t0, .seq = nreq + added };
		added++;
	}
	c->sq_head += n;
	return nreq + added;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
	void *n;

	if (need <= *cap)
		return 0;
	n = realloc(*p, need * elem);
	if (!n)
		return -ENOMEM;
	*p = n;
	*cap = need;
	return 0;
}

static int by_layer(const void *a, const void *b)
{
	const struct req *x = a, *y = b;

	if (x->sqe.layer != y->sqe.layer)
		return x->sqe.layer < y->sqe.layer ? -1 : 1;
	/* stable: the order they were taken in */
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void record_latency(struct moed_server *s, uint64_t ns)
{
	s->lat[s->lat_n++ % LAT_SAMPLES] = ns;
}

/* Run request @q on device memory: the client's regions in, out. */
static int run_device(struct moed_server *s, struct req *q, struct moe_err *err)
{
	struct client *c = q->c;
	uint64_t H = s->mc->hidden_size, k = s->mc->top_k, bytes = q->sqe.tokens * H * sizeof(float);
	bool routing = (q->sqe.flags & MOE_SQE_ROUTING) != 0;
	uint8_t *in, *out;
	int r;

	if (routing) {
		size_t cap = s->rcap;
		if (grow((void **)&s->ids, &cap, q->sqe.tokens * k, sizeof(int32_t)) < 0 ||
		    grow((void **)&s->w, &s->rcap, q->sqe.tokens * k, sizeof(float)) < 0)
			return -ENOMEM;
	}
	/* the regions are busy while the engine uses them: an unmap meanwhile
	 * is done by cudaipc_release afterwards */
	if (cudaipc_hold(c, &q->sqe, bytes, &in, &out) < 0)
		return moe_err_set(err, -EFAULT, "client %u: its device region is gone", c->id);
	r = moe_engine_forward(s->engine, q->sqe.layer, (const float *)in, q->sqe.tokens, (float *)out,
			       routing ? s->ids : NULL, routing ? s->w : NULL, MOE_FWD_DEVICE_IO, err);
	cudaipc_release(s, c, &q->sqe);
	if (r == 0 && routing) {
		memcpy(c->seg.arena + q->sqe.ids_off, s->ids, q->sqe.tokens * k * sizeof(int32_t));
		memcpy(c->seg.arena + q->sqe.weights_off, s->w, q->sqe.tokens * k * sizeof(float));
	}
	return r;
}

/* Run requests [r0, r1) of one layer as one engine call; 0 or the error. */
static int run_batch(struct moed_server *s, struct req *r0, struct req *r1, struct moe_err *err)
{
	uint32_t H = s->mc->hidden_size, k = s->mc->top_k;
	uint64_t tokens = 0, t = 0;
	bool routing = false;
	int r;

	if (r0->sqe.flags & MOE_SQE_DEVICE)
		return run_device(s, r0, err);      /* alone: run_layer */
	for (struct req *q = r0; q < r1; q++) {
		tokens += q->sqe.tokens;
		routing |= (q->sqe.flags & MOE_SQE_ROUTING) != 0;
	}
	if (grow((void **)&s->x, &s->xcap, tokens * H, sizeof(float)) < 0)
		return -ENOMEM;
	if (grow((void **)&s->y, &s->ycap, tokens * H, sizeof(float)) < 0)
		return -ENOMEM;
	if (routing) {
		size_t cap = s->rcap;
		if (grow((void **)&s->ids, &cap, tokens * k, sizeof(int32_t)) < 0 ||
		    grow((void **)&s->w, &s->rcap, tokens * k, sizeof(float)) < 0)
			return -ENOMEM;
	}
	/* gather: a copy, so that the client cannot change the input under us */
	for (struct req *q = r0; q < r1; q++) {
		const uint8_t *in = q->c->seg.arena + q->sqe.in_off;
		float *x = s->x + t * H;
		uint64_t n = q->sqe.tokens * H;

		if (q->sqe.dtype == MOE_F32)
			memcpy(x, in, n * sizeof(float));
		else
			for (uint64_t i = 0; i < n; i++) {
				uint16_t v;
				memcpy(&v, in + 2 * i, 2);
				x[i] = moe_bf16_to_f32(v);
			}
		t += q->sqe.tokens;
	}
	r = moe_engine_forward(s->engine, r0->sqe.layer, s->x, tokens, s->y, routing ? s->ids : NULL,
			       routing ? s->w : NULL, 0, err);
	if (r < 0)
		return r;
	/* scatter */
	t = 0;
	for (struct req *q = r0; q < r1; q++) {
		uint8_t *out = q->c->seg.arena + q->sqe.out_off;
		const float *y = s->y + t * H;
		uint64_t n = q->sqe.tokens * H;

		if (q->sqe.dtype == MOE_F32) {
			memcpy(out, y, n * sizeof(float));
		} else {
			for (uint64_t i = 0; i < n; i++) {
				uint16_t v = moe_f32_to_bf16(y[i]);
				memcpy(out + 2 * i, &v, 2);
			}
		}
		if (q->sqe.flags & MOE_SQE_ROUTING) {
			memcpy(q->c->seg.arena + q->sqe.ids_off, s->ids + t * k, q->sqe.tokens * k * sizeof(int32_t));
			memcpy(q->c->seg.arena + q->sqe.weights_off, s->w + t * k, q->sqe.tokens * k * sizeof(float));
		}
		t += q->sqe.tokens;
	}
	return 0;
}

/* Finish requests [r0, r1) with @res. */
static void finish(struct moed_server *s, struct req *r0, struct req *r1, int res)
{
	uint64_t t1 = moe_now_ns();

	for (struct req *q = r0; q < r1; q++) {
		complete(s, q->c, q->sqe.user_data, res);
		if (res == 0) {
			q->c->tokens += q->sqe.tokens;
			s->total_tokens += q->sqe.tokens;
			atomic_fetch_add_explicit(&s->tps_tokens, q->sqe.tokens, memory_order_relaxed);
		}
		record_latency(s, t1 - q->t0);
	}
}

/*
 * The level of a failed request's line: a debug line when it failed for
 * a store already known to be changed or damaged (the engine said so once,
 * and `moectl stats` and the notify STATUS say so), so that a store
 * truncated under moed does not cost a line per request.
 */
static int fail_level(struct moed_server *s, int r)
{
	struct moe_store_health h;

	if (r != -EIO && r != -EBADMSG)
		return MOED_LOG_ERR;
	moe_engine_store_health(s->engine, false, &h);
	return h.state == MOE_STORE_OK ? MOED_LOG_ERR : MOED_LOG_DEBUG;
}

/*
 * Run the requests of one layer, in batches of at most batch.max_tokens
 * tokens.  When a batch fails (an expert that cannot be read), its
 * requests run one by one, so that exactly those that need the expert
 * fail.
 */
static void run_layer(struct moed_server *s, struct req *r0, struct req *r1, uint32_t batch_max)
{
	struct moe_err err = { 0 };

	while (r0 < r1) {
		struct req *e = r0;
		uint64_t tokens = 0;
		int r;

		/* a request on device memory runs alone: its tensors are not in
		 * host memory to be batched with the others' */
		while (e < r1 && (e == r0 || (tokens + e->sqe.tokens <= batch_max &&
					      !((r0->sqe.flags | e->sqe.flags) & MOE_SQE_DEVICE))))
			tokens += (e++)->sqe.tokens;
		r = run_batch(s, r0, e, &err);
		s->total_batches++;
		if (r < 0 && e - r0 > 1) {
			for (struct req *q = r0; q < e; q++) {
				moe_err_clear(&err);
				r = run_batch(s, q, q + 1, &err);
				/* one line per failed request would flood the log
				 * while a damaged store fails every one of them */
				if (r < 0)
					moed_log_event(MOED_EVENT_REQUEST, fail_level(s, r), "client %u: layer %u: %s",
						       q->c->id, q->sqe.layer, err.msg[0] ? err.msg : strerror(-r));
				finish(s, q, q + 1, r);
			}
		} else {
			if (r < 0)
				moed_log_event(MOED_EVENT_REQUEST, fail_level(s, r), "layer %u: %s", r0->sqe.layer,
					       err.msg[0] ? err.msg : strerror(-r));
			finish(s, r0, e, r);
		}
		r0 = e;
	}
}

/* Adopt new sessions, free ended ones. */
static void sessions_update(struct moed_server *s)
{
	struct client **pp, *c, *in;

	pthread_mutex_lock(&s->lock);
	in = s->incoming;
	s->incoming = NULL;
	pthread_mutex_unlock(&s->lock);
	while ((c = in)) {
		in = c->next;
		c->next = s->clients;
		s->clients = c;
	}
	for (pp = &s->clients; (c = *pp);) {
		if (atomic_load(&c->dead)) {
			*pp = c->next;
			session_free(s, c);
			continue;
		}
		pp = &c->next;
	}
}

/* Sleep until a client submits, a session comes or goes, or we are asked
 * for something.  The wakeup protocol of proto.h; @own is the wake word as
 * read before this pass looked at the sessions, so that a wake in between
 * is not lost. */
static void data_sleep(struct moed_server *s, uint32_t own)
{
	struct futex_waitv wv[FUTEX_WAITV_MAX];
	uint32_t n = 0;
	struct timespec ts;
	bool work = false;

	wv[n++] = (struct futex_waitv){ .val = own, .uaddr = (uintptr_t)&s->wake_word,
					.flags = FUTEX_32 };   /* woken by a shared FUTEX_WAKE */
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->kicked)
			continue;
		if (n < FUTEX_WAITV_MAX)
			wv[n++] = (struct futex_waitv){
				.val = __atomic_load_n(&c->seg.hdr->daemon_futex, __ATOMIC_ACQUIRE),
				.uaddr = (uintptr_t)&c->seg.hdr->daemon_futex, .flags = FUTEX_32 };
		/* a stalled client is asked to kick when it frees room too */
		__atomic_store_n(&c->seg.hdr->daemon_wait,
				 MOE_DAEMON_WAIT_SQ | (cq_stalled(c) ? MOE_DAEMON_WAIT_CQ : 0), __ATOMIC_RELAXED);
	}
	atomic_thread_fence(memory_order_seq_cst);
	for (struct client *c = s->clients; c && !work; c = c->next)
		work = !c->kicked && has_work(c);
	if (!work && !atomic_load(&s->stop) && !atomic_load(&s->stats_wanted) &&
	    atomic_load(&s->wake_word) == own) {
		clock_gettime(CLOCK_MONOTONIC, &ts);
		/* more clients than one call can watch: poll the others every ms */
		uint64_t slice = n < FUTEX_WAITV_MAX || !s->clients ? s->slice_ns : 1000000u;
		ts.tv_sec += (time_t)(slice / 1000000000u);
		ts.tv_nsec += (long)(slice % 1000000000u);
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		syscall(SYS_futex_waitv, wv, n, 0, &ts, CLOCK_MONOTONIC);
	}
	for (struct client *c = s->clients; c; c = c->next)
		if (!c->kicked)
			__atomic_store_n(&c->seg.hdr->daemon_wait, 0, __ATOMIC_RELAXED);
}

/* A reload's pins (lifecycle.c: pins_apply): give them to the engine now,
 * between passes, and answer the waiting control thread. */
static void pins_update(struct moed_server *s)
{
	struct moe_err err = { 0 };
	const char *const *pin;
	uint32_t hot;
	int r;

	pthread_mutex_lock(&s->lock);
	pin = s->pins_req.pin;
	hot = s->pins_req.pin_hot;
	pthread_mutex_unlock(&s->lock);
	r = moe_engine_set_pins(s->engine, pin, hot, &err);
	pthread_mutex_lock(&s->lock);
	s->pins_req.result = r;
	snprintf(s->pins_req.msg, sizeof(s->pins_req.msg), "%s", err.msg[0] ? err.msg : strerror(-r));
	s->pins_req.done = true;
	pthread_cond_signal(&s->pins_cond);
	pthread_mutex_unlock(&s->lock);
}

/* At stop: fail every request still queued, and tell each client. */
static void drain(struct moed_server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->kicked)
			continue;
		uint32_t tail = __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE);
		uint32_t cq_head = __atomic_load_n(&c->seg.hdr->cq_head, __ATOMIC_ACQUIRE);
		uint32_t n = tail - c->sq_head;

		if (n <= c->seg.sq_entries && c->cq_tail - cq_head <= c->seg.cq_entries) {
			uint32_t space = c->seg.cq_entries - (c->cq_tail - cq_head);
			for (uint32_t i = 0; i < n && i < space; i++)
				complete(s, c, c->seg.sq[(c->sq_head + i) & (c->seg.sq_entries - 1)].user_data, -ESHUTDOWN);
			c->sq_head += n < space ? n : space;
		}
		/* the completions first, then the state, so that a client that sees
		 * the session closed has every answer already */
		publish(c);
		__atomic_store_n(&c->seg.hdr->daemon_state, MOE_SEG_CLOSED, __ATOMIC_RELEASE);
		atomic_thread_fence(memory_order_seq_cst);
		moe_futex_kick(&c->seg.hdr->client_futex, &c->seg.hdr->client_wait, INT_MAX);
	}
}

void *dataplane_main(void *arg)
{
	struct moed_server *s = arg;

	s->started_ns = moe_now_ns();
	atomic_store(&s->heartbeat, s->started_ns);
	while (!atomic_load(&s->stop)) {
		uint32_t batch_max, own = atomic_load(&s->wake_word);
		size_t nreq = 0, cap = 0;
		uint64_t t0 = moe_now_ns();
		bool any = false;

		atomic_store(&s->heartbeat, t0);
		sessions_update(s);
		/* pins before a snapshot, so that a STATS after a reload shows them */
		if (atomic_exchange(&s->pins_wanted, false))
			pins_update(s);
		if (atomic_exchange(&s->stats_wanted, false))
			stats_snapshot(s);
		pthread_mutex_lock(&s->cfg_lock);
		batch_max = s->cfg->batch.max_tokens;
		uint32_t window = s->cfg->batch.window_us;
		pthread_mutex_unlock(&s->cfg_lock);

		for (struct client *c = s->clients; c && !any; c = c->next)
			any = !c->kicked && has_work(c);
		if (!any) {
			/* poll the rings (and the wake word, which says a session came
			 * or went or something was asked) a little, then sleep */
			for (uint64_t t = t0; t - t0 < IDLE_SPIN_NS && !any; t = moe_now_ns()) {
				moe_cpu_relax();
				any = atomic_load(&s->wake_word) != own;
				for (struct client *c = s->clients; c && !any; c = c->next)
					any = !c->kicked && has_work(c);
			}
			if (!any)
				data_sleep(s, own);
			continue;
		}
		if (window) {
			/* batch.window_us: let more requests gather before the pass */
			struct timespec d = { 0, (long)window * 1000 };
			nanosleep(&d, NULL);
		}
		/* room for every live client's whole ring: any of them may have
		 * submitted since we looked (take() clamps to the room as well) */
		cap = 0;
		for (struct client *c = s->clients; c; c = c->next)
			if (!c->kicked)
				cap += c->seg.sq_entries;
		if (grow((void **)&s->reqs, &s->reqs_cap, cap, sizeof(struct req)) < 0) {
			log_error("out of memory for %zu requests", cap);
			data_sleep(s, own);
			continue;
		}
		/* one pass: what every client has submitted right now */
		for (struct client *c = s->clients; c; c = c->next) {
			size_t before = nreq;
			uint32_t cq_before = c->cq_tail;

			if (c->kicked)
				continue;
			c->dev_taken = false;
			nreq = take(s, c, nreq, s->reqs_cap, t0);
			s->total_requests += (nreq - before) + (c->cq_tail - cq_before);
			if (c->cq_tail != cq_before)
				publish(c);         /* NOPs and refusals go back at once */
		}
		/* every layer's requests as one batch (or a few, by batch.max_tokens) */
		qsort(s->reqs, nreq, sizeof(struct req), by_layer);
		for (size_t i = 0; i < nreq;) {
			size_t j = i;

			while (j < nreq && s->reqs[j].sqe.layer == s->reqs[i].sqe.layer)
				j++;
			run_layer(s, s->reqs + i, s->reqs + j, batch_max);
			i = j;
		}
		for (struct client *c = s->clients; c; c = c->next)
			if (!c->kicked)
				publish(c);
	}
	/* sessions handed over just now are drained too: nothing goes unanswered */
	sessions_update(s);
	drain(s);
	return NULL;
}
