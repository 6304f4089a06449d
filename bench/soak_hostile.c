/* SPDX-License-Identifier: MIT */
/*
 * bench_soak's hostile client: what a broken or malicious local process
 * can do to moed, in a loop, while the well-behaved clients work.  It
 * speaks the protocol by hand (tests/daemonutil.c's raw sessions), since
 * libmoeclient would refuse to send most of this.  Each action has an
 * outcome the protocol allows (moed refuses, answers with an error, or
 * hangs up) and outcomes it does not: moed accepting a descriptor the
 * contract refuses (proto.h, moe_client_submit(3)), a descriptor left
 * without its completion, a connection left hanging after the client's
 * EOF, a corrupt ring left served.  Only the latter count as failures;
 * the errors moed answers are counted by kind, as expected.
 * tests/fuzz_proto.c fuzzes the same surface at random in make check;
 * here each action is one clear fault, repeated for as long as the soak.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench/benchutil.h"
#include "bench/soak.h"
#include "proto/proto.h"
#include "tests/daemonutil.h"

#define HANGUP_MS 10000          /* moed answers or hangs up after a client's EOF */
#define WAIT_MS 30000            /* a batch of descriptors completes */
#define PAUSE_MS 10              /* between actions: a flood is another test (issue 13) */
#define ARENA_BYTES (1u << 20)   /* the raw sessions' arena */
#define SQ_ENTRIES 32u           /* and their rings */
#define SILENT_MAX 2             /* silent connections held at once */
#define SILENT_MS 3000           /* held at most this long */

struct hostile {
	const struct soak_client *a;
	struct soak_board *b;
	uint64_t rng;
	struct moe_test_raw r;       /* the session for descriptors, fd -1 when none */
	int silent[SILENT_MAX];
	uint64_t silent_until[SILENT_MAX];
};

static uint32_t below(uint64_t *rng, uint64_t n)
{
	return (uint32_t)(bench_rng(rng) % n);
}

static void unexpected(struct hostile *h, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void unexpected(struct hostile *h, const char *fmt, ...)
{
	char msg[SOAK_WHY_LEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	atomic_fetch_add(&h->b->unexpected, 1);
	soak_fail(h->b, "hostile client", "%s", msg);
}

/* What moed answered: a refusal, as the protocol allows. */
static void refused(struct hostile *h, int code)
{
	atomic_fetch_add(&h->b->refused, 1);
	soak_count_err(&h->b->hostile, code);
}

/* A new connection, or a failure: moed must accept while it runs. */
static int dial(struct hostile *h)
{
	int fd = moe_test_dial(h->a->sock);

	if (fd < 0)
		unexpected(h, "connect to moed: %s", strerror(-fd));
	return fd;
}

/* Send @len bytes, half-close, and moed must hang up within HANGUP_MS. */
static void send_expect_hangup(struct hostile *h, const void *buf, size_t len, const char *what)
{
	int fd = dial(h);

	if (fd < 0)
		return;
	moe_test_send_all(fd, buf, len);  /* moed may hang up part-way: fine */
	shutdown(fd, SHUT_WR);
	if (!moe_test_wait_hangup(fd, HANGUP_MS))
		unexpected(h, "moed neither answered nor hung up within %d ms after %s and EOF", HANGUP_MS, what);
	else
		refused(h, -ECONNRESET);
	close(fd);
}

static void act_garbage(struct hostile *h)
{
	uint8_t buf[300];
	size_t len = below(&h->rng, sizeof(buf));

	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)bench_rng(&h->rng);
	if (len >= 4 && below(&h->rng, 2))
		memcpy(buf, &(uint32_t){ MOE_MSG_MAGIC }, 4);   /* past the first check */
	send_expect_hangup(h, buf, len, "random bytes");
}

struct hello_msg {
	struct moe_msg_header h;
	struct moe_msg_hello b;
};

/* A HELLO with one field wrong: moed refuses it in a WELCOME or hangs up;
 * the harmless ones (unknown flags it ignores) it may accept. */
static void act_bad_hello(struct hostile *h)
{
	struct hello_msg m = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
			       { .version = MOE_PROTO_VERSION, .arena_bytes = ARENA_BYTES } };
	const uint32_t lens[] = { 0, 1, sizeof(m.b) - 1, sizeof(m.b) + 1, MOE_MSG_MAX + 1, UINT32_MAX };
	const uint64_t arenas[] = { UINT64_MAX, 1ull << 62, (1ull << 40) + 1 };
	struct moe_msg_header rh;
	struct moe_msg_welcome w;
	int fd, seg = -1, r;

	switch (below(&h->rng, 7)) {
	case 0: m.h.magic ^= 1u << below(&h->rng, 32); break;
	case 1: m.h.type = below(&h->rng, 2) ? MOE_MSG_WELCOME : 6 + (uint32_t)bench_rng(&h->rng) % 1000; break;
	case 2: m.h.len = lens[below(&h->rng, sizeof(lens) / sizeof(lens[0]))]; break;
	case 3: m.b.version = below(&h->rng, 2) ? MOE_PROTO_VERSION + 1 + below(&h->rng, 100) : 0; break;
	case 4: m.b.arena_bytes = arenas[below(&h->rng, sizeof(arenas) / sizeof(arenas[0]))]; break;
	case 5: m.b.sq_entries = below(&h->rng, 2) ? 3 + 2 * below(&h->rng, 1000) : 1u << 31; break;
	default: m.b.flags = 1u << below(&h->rng, 32); break;
	}
	fd = dial(h);
	if (fd < 0)
		return;
	moe_test_send_all(fd, &m, sizeof(m));
	shutdown(fd, SHUT_WR);       /* a length beyond the message waits for no more */
	r = moe_test_recv_all(fd, &rh, sizeof(rh), &seg, HANGUP_MS);
	if (r == 0 && rh.magic == MOE_MSG_MAGIC && rh.type == MOE_MSG_WELCOME && rh.len == sizeof(w))
		r = moe_test_recv_all(fd, &w, sizeof(w), &seg, HANGUP_MS);
	else if (r == 0)
		r = -EPROTO;
	if (r == -ETIMEDOUT)
		unexpected(h, "moed neither answered nor hung up within %d ms after a bad HELLO and EOF", HANGUP_MS);
	else if (r == -EPROTO)
		unexpected(h, "moed answered a bad HELLO with a message that is not a WELCOME");
	else if (r < 0)
		refused(h, r);                   /* hung up */
	else if (w.status < 0)
		refused(h, w.status);
	else
		atomic_fetch_add(&h->b->accepted_hellos, 1);
	if (seg >= 0)
		close(seg);
	close(fd);
}

/* Connect and hang up: at once, part-way through a HELLO, or after a whole
 * one without reading the WELCOME (moed's sendmsg meets a closed peer). */
static void act_drop(struct hostile *h)
{
	struct hello_msg m = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
			       { .version = MOE_PROTO_VERSION, .arena_bytes = ARENA_BYTES } };
	int fd = dial(h);

	if (fd < 0)
		return;
	switch (below(&h->rng, 3)) {
	case 0: break;
	case 1: moe_test_send_all(fd, &m, below(&h->rng, sizeof(m))); break;
	default: moe_test_send_all(fd, &m, sizeof(m)); break;
	}
	close(fd);
}

/* ------------------------------------------------------------------ raw sessions */

static bool session(struct hostile *h)
{
	struct moe_msg_hello hello = { .version = MOE_PROTO_VERSION, .arena_bytes = ARENA_BYTES,
				       .sq_entries = SQ_ENTRIES };
	int r;

	if (h->r.fd >= 0)
		return true;
	r = moe_test_raw_open(&h->r, h->a->sock, &hello);
	if (r < 0) {
		h->r.fd = -1;
		unexpected(h, "a well-formed HELLO was refused: %s", moe_strerror(r));
		return false;
	}
	return true;
}

static bool is_moe_layer(const struct moe_msg_welcome *w, uint32_t layer)
{
	for (uint32_t i = 0; i < w->num_moe_layers && i < MOE_INFO_MAX_LAYERS; i++)
		if (w->moe_layers[i] == layer)
			return true;
	return false;
}

/* A layer moed does not serve: past the model, or a dense layer of it. */
static uint32_t bad_layer(struct hostile *h)
{
	const struct moe_msg_welcome *w = &h->r.w;
	uint32_t l = below(&h->rng, w->num_hidden_layers + 1);

	if (l < w->num_hidden_layers && !is_moe_layer(w, l))
		return l;
	switch (below(&h->rng, 3)) {
	case 0: return w->num_hidden_layers + below(&h->rng, 1000);
	case 1: return UINT32_MAX - below(&h->rng, 2);
	default: return 1u << (12 + below(&h->rng, 20));
	}
}

/* A well-formed forward in the raw session's arena (its bits are the
 * arena's: garbage at times, which moed must take as numbers). */
static struct moe_sqe good_sqe(struct hostile *h)
{
	const struct moe_msg_welcome *w = &h->r.w;
	uint64_t A = h->r.arena_bytes;
	uint32_t cap = w->max_tokens < 8 ? w->max_tokens : 8;

	return (struct moe_sqe){ .opcode = MOE_OP_FORWARD, .flags = below(&h->rng, 2) ? MOE_SQE_ROUTING : 0,
				 .layer = w->moe_layers[below(&h->rng, w->num_moe_layers)],
				 .dtype = below(&h->rng, 2), .tokens = 1 + below(&h->rng, cap), .in_off = 0,
				 .out_off = A / 2, .ids_off = A / 4, .weights_off = 3 * A / 4 };
}

/* An offset moed must refuse for a field of @q (its size @bytes, its
 * element size @es): past the arena, overflowing, or misaligned. */
static uint64_t bad_off(struct hostile *h, uint64_t bytes, uint64_t es)
{
	uint64_t A = h->r.arena_bytes;

	switch (below(&h->rng, 4)) {
	case 0: return A - bytes + es;
	case 1: return UINT64_MAX - below(&h->rng, 4096);
	case 2: return A + below(&h->rng, 1u << 20);
	default: return es - 1;           /* misaligned (es is 2 or 4) */
	}
}

/* Spoil one field of a good descriptor. */
static void spoil(struct hostile *h, struct moe_sqe *q, bool layer_only)
{
	const struct moe_msg_welcome *w = &h->r.w;
	uint64_t es = q->dtype == MOE_F32 ? 4 : 2, bytes = q->tokens * w->hidden_size * es;
	uint64_t rb = q->tokens * w->top_k * 4;

	if (layer_only) {
		q->layer = bad_layer(h);
		return;
	}
	switch (below(&h->rng, 8)) {
	case 0: q->opcode = 2 + (uint32_t)below(&h->rng, 2) * (UINT32_MAX - 2); break;
	case 1: q->flags |= 1u << (2 + below(&h->rng, 14)); break;
	case 2: q->dtype = 2 + (uint32_t)below(&h->rng, 2) * (UINT32_MAX - 2); break;
	case 3: q->tokens = below(&h->rng, 2) ? 0 : below(&h->rng, 2) ? (uint64_t)w->max_tokens + 1 : UINT64_MAX; break;
	case 4: q->in_off = bad_off(h, bytes, es); break;
	case 5: q->out_off = bad_off(h, bytes, es); break;
	case 6: q->flags |= MOE_SQE_ROUTING; q->ids_off = bad_off(h, rb, 4); break;
	default: q->flags |= MOE_SQE_ROUTING; q->weights_off = bad_off(h, rb, 4); break;
	}
}

/*
 * A batch of descriptors in the raw session, each spoiled in one field
 * (@layers: its layer only) or, one in four, left good: every one must get
 * exactly one completion, an error for the spoiled ones and success for
 * the others.
 */
static void act_bad_sqes(struct hostile *h, bool layers)
{
	struct moe_sqe q[SQ_ENTRIES];
	struct moe_cqe cq[SQ_ENTRIES];
	bool bad[SQ_ENTRIES], seen[SQ_ENTRIES] = { false };
	uint32_t n, got;
	uint64_t tag = bench_rng(&h->rng) << 8;

	if (!session(h))
		return;
	if (below(&h->rng, 8) == 0)        /* hidden states of garbage: NaN, Inf */
		for (uint64_t i = 0; i + 8 <= h->r.arena_bytes; i += 8)
			memcpy(h->r.arena + i, &(uint64_t){ bench_rng(&h->rng) }, 8);
	n = 1 + below(&h->rng, SQ_ENTRIES);
	for (uint32_t i = 0; i < n; i++) {
		q[i] = below(&h->rng, 8) ? good_sqe(h) : (struct moe_sqe){ .opcode = MOE_OP_NOP };
		bad[i] = below(&h->rng, 4) != 0 && q[i].opcode == MOE_OP_FORWARD;
		if (bad[i])
			spoil(h, &q[i], layers);
		q[i].user_data = tag + i;
	}
	moe_test_raw_push(&h->r, q, n);
	got = moe_test_raw_reap(&h->r, cq, n, WAIT_MS);
	if (got != n) {
		unexpected(h, "%u of %u completions of a batch of descriptors came within %d ms", got, n, WAIT_MS);
		moe_test_raw_close(&h->r);
		return;
	}
	for (uint32_t i = 0; i < n; i++) {
		uint64_t x = cq[i].user_data - tag;

		if (x >= n || seen[x]) {
			unexpected(h, "a completion that is not due: user_data 0x%" PRIx64, cq[i].user_data);
			continue;
		}
		seen[x] = true;
		if (bad[x] && cq[i].res >= 0) {
			unexpected(h, "moed accepted a descriptor the contract refuses: {opcode %u, flags 0x%x, "
				   "layer %u, dtype %u, tokens %" PRIu64 ", in_off %" PRIu64 ", out_off %" PRIu64
				   ", ids_off %" PRIu64 ", weights_off %" PRIu64 "}", q[x].opcode, q[x].flags, q[x].layer,
				   q[x].dtype, q[x].tokens, q[x].in_off, q[x].out_off, q[x].ids_off, q[x].weights_off);
		} else if (!bad[x] && cq[i].res < 0) {
			unexpected(h, "a well-formed descriptor in the hostile session failed: %s",
				   moe_strerror(cq[i].res));
		} else if (bad[x]) {
			refused(h, cq[i].res);
		}
	}
}

/* Ring indices out of bounds: moed must end the session. */
static void act_ring(struct hostile *h)
{
	struct moe_test_raw *r = &h->r;

	if (!session(h))
		return;
	if (below(&h->rng, 2)) {
		__atomic_store_n(&r->hdr->sq_tail, r->hdr->sq_head + r->sq_entries + 1 + below(&h->rng, 1u << 30),
				 __ATOMIC_RELEASE);
		moe_test_raw_kick(r);
	} else {
		struct moe_sqe nop = { .opcode = MOE_OP_NOP };

		__atomic_store_n(&r->hdr->cq_head, r->hdr->cq_tail + r->cq_entries + 1 + below(&h->rng, 1u << 30),
				 __ATOMIC_RELEASE);
		moe_test_raw_push(r, &nop, 1);   /* something to make moed look */
	}
	if (!moe_test_wait_hangup(r->fd, HANGUP_MS))
		unexpected(h, "a session with corrupt ring indices was still served after %d ms", HANGUP_MS);
	else
		atomic_fetch_add(&h->b->ended, 1);
	moe_test_raw_close(r);
}

/* A new session fills its ring with forwards and closes at once. */
static void act_abandon(struct hostile *h)
{
	struct moe_sqe q[SQ_ENTRIES];
	struct moe_test_raw keep = h->r;

	h->r.fd = -1;
	if (session(h)) {
		for (uint32_t i = 0; i < SQ_ENTRIES; i++)
			q[i] = good_sqe(h);
		moe_test_raw_push(&h->r, q, SQ_ENTRIES);
		moe_test_raw_close(&h->r);
	}
	h->r = keep;
}

/* Connections that say nothing, held a while (a few at most: locking
 * everyone out is issue 13's admission test, not this one). */
static void act_silent(struct hostile *h)
{
	for (int i = 0; i < SILENT_MAX; i++)
		if (h->silent[i] < 0) {
			h->silent[i] = dial(h);
			h->silent_until[i] = moe_test_now_ms() + 500 + below(&h->rng, SILENT_MS);
			return;
		}
}

static void silent_expire(struct hostile *h, bool all)
{
	for (int i = 0; i < SILENT_MAX; i++)
		if (h->silent[i] >= 0 && (all || moe_test_now_ms() > h->silent_until[i])) {
			close(h->silent[i]);
			h->silent[i] = -1;
		}
}

int soak_hostile_client(const struct soak_client *a)
{
	struct hostile h = { .a = a, .b = a->b, .rng = a->seed, .r = { .fd = -1 } };

	for (int i = 0; i < SILENT_MAX; i++)
		h.silent[i] = -1;
	atomic_fetch_add(&a->b->ready, 1);
	while (!atomic_load(&a->b->stop)) {
		enum soak_act act = (enum soak_act)below(&h.rng, NACTS);

		switch (act) {
		case ACT_GARBAGE: act_garbage(&h); break;
		case ACT_BAD_HELLO: act_bad_hello(&h); break;
		case ACT_DROP: act_drop(&h); break;
		case ACT_BAD_SQE: act_bad_sqes(&h, false); break;
		case ACT_BAD_LAYER: act_bad_sqes(&h, true); break;
		case ACT_RING: act_ring(&h); break;
		case ACT_ABANDON: act_abandon(&h); break;
		default: act_silent(&h); break;
		}
		atomic_fetch_add(&a->b->acts[act], 1);
		silent_expire(&h, false);
		moe_test_sleep_ms(PAUSE_MS);
	}
	silent_expire(&h, true);
	moe_test_raw_close(&h.r);
	return 0;
}
