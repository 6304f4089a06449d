/* SPDX-License-Identifier: MIT */
/*
 * bench_soak's well-behaved and stalling clients.  Each request has random
 * size (1..max_tokens tokens), layer, dtype and routing output; before it
 * is sent, the engine in this process (same store, CPU backend, as moed's
 * config says) computes what moed must answer, and the answer is compared
 * bit for bit: output, expert ids and weights.  moed batches requests of
 * many clients together, which must not change a bit (ARCHITECTURE.md 5.1).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/benchutil.h"
#include "bench/soak.h"
#include "engine/dtype.h"
#include "engine/engine.h"
#include "engine/err.h"

#define WAIT_MS 60000            /* one completion, however loaded the machine */
#define BATCH_MAX 8              /* requests submitted together */
#define FULL_SETTLE_MS 200       /* the ring counts as full once refused this long */
#define FILL_MAX 8192            /* empty requests a stall submits at most */
#define RECONNECT_PER_MILLE 3    /* sessions closed and opened again, per operation */
#define LOG_FIRST 5              /* failures each process prints */

const char *const soak_act_names[NACTS] = {
	[ACT_GARBAGE] = "garbage HELLO", [ACT_BAD_HELLO] = "bad HELLO", [ACT_DROP] = "connect and drop",
	[ACT_BAD_SQE] = "bad descriptors", [ACT_BAD_LAYER] = "bad layers", [ACT_RING] = "corrupt ring",
	[ACT_ABANDON] = "abandon in flight", [ACT_SILENT] = "silent connection",
};

void soak_fail(struct soak_board *b, const char *who, const char *fmt, ...)
{
	static unsigned printed;
	char msg[SOAK_WHY_LEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (atomic_exchange(&b->have_why, 1) == 0)
		snprintf(b->why, sizeof(b->why), "%s (pid %d): %s", who, (int)getpid(), msg);
	if (printed++ < LOG_FIRST)
		fprintf(stderr, "bench_soak: %s (pid %d): %s\n", who, (int)getpid(), msg);
}

void soak_count_err(struct soak_counters *k, int code)
{
	atomic_fetch_add(&k->errors, 1);
	atomic_fetch_add(&k->err[soak_kind(code)], 1);
}

static uint32_t below(uint64_t *rng, uint64_t n)
{
	return (uint32_t)(bench_rng(rng) % n);
}

static void sleep_ms(unsigned ms)
{
	struct timespec d = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };

	while (nanosleep(&d, &d) < 0 && errno == EINTR)
		;
}

/* ------------------------------------------------------------------ sessions */

/* A client's engine (kept for the whole run) and its session (opened again
 * after a failure or a planned reconnect). */
struct sess {
	const struct soak_client *a;
	const char *who;
	struct soak_counters *k;
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_model_info info;
	uint32_t max_tokens;
	float *x, *y;                /* the reference's float32 rows */
};

static int sess_connect(struct sess *s)
{
	int r = moe_client_connect(s->a->sock, NULL, &s->c);

	if (r < 0) {
		s->c = NULL;
		soak_count_err(s->k, r);
		soak_fail(s->a->b, s->who, "moe_client_connect(%s): %s", s->a->sock, moe_strerror(r));
		return r;
	}
	moe_client_info(s->c, &s->info);
	s->max_tokens = s->a->max_tokens < s->info.max_tokens ? s->a->max_tokens : s->info.max_tokens;
	return 0;
}

static void sess_disconnect(struct sess *s)
{
	moe_client_disconnect(s->c);
	s->c = NULL;
}

/* The engine in-process and the first session: 0, or 1 after a failure was
 * recorded (the process then leaves: a client that cannot start is a
 * failure of the run). */
static int sess_open(struct sess *s, const struct soak_client *a, const char *who, struct soak_counters *k)
{
	struct moe_engine_options eo = { .backend = "cpu", .threads = 1 };
	struct moe_err err = { 0 };
	int r;

	memset(s, 0, sizeof(*s));
	s->a = a;
	s->who = who;
	s->k = k;
	r = moe_engine_open(a->store, &eo, &s->e, &err);
	if (r < 0) {
		soak_fail(a->b, who, "the engine in-process on %s: %s", a->store, err.msg);
		return 1;
	}
	if (sess_connect(s) < 0)
		return 1;
	if (s->max_tokens == 0) {
		soak_fail(a->b, who, "moed allows 0 tokens per request");
		return 1;
	}
	s->x = malloc((size_t)s->max_tokens * s->info.hidden_size * sizeof(float));
	s->y = malloc((size_t)s->max_tokens * s->info.hidden_size * sizeof(float));
	if (!s->x || !s->y) {
		soak_fail(a->b, who, "out of memory");
		return 1;
	}
	atomic_fetch_add(&a->b->ready, 1);
	return 0;
}

static void sess_close(struct sess *s)
{
	sess_disconnect(s);
	moe_engine_close(s->e);
	free(s->x);
	free(s->y);
}

/* ------------------------------------------------------------------ requests */

struct req {
	uint32_t layer, dtype;
	uint64_t T;
	bool routing, arena;         /* buffers in the session's arena, else malloc'ed */
	size_t bytes;                /* of the input, and of the output */
	void *in, *out;
	int32_t *ids;
	float *w;
	void *want;                  /* what the engine in-process answers */
	int32_t *want_ids;
	float *want_w;
};

static size_t act_size(uint32_t dtype)
{
	return dtype == MOE_F32 ? 4 : 2;
}

static void req_release(struct sess *s, struct req *q)
{
	if (q->arena) {
		if (s->c) {
			moe_client_free(s->c, q->in);
			moe_client_free(s->c, q->out);
			moe_client_free(s->c, q->ids);
			moe_client_free(s->c, q->w);
		}
	} else {
		free(q->in);
		free(q->out);
		free(q->ids);
		free(q->w);
	}
	free(q->want);
	free(q->want_ids);
	free(q->want_w);
	memset(q, 0, sizeof(*q));
}

/*
 * Pick a request, place its buffers (in the arena with @arena), fill its
 * input and compute its answer.  0; a negative code from the arena, counted
 * (an arena that cannot hold a few small requests has leaked); 1 when the
 * engine in-process failed (recorded: the client leaves).
 */
static int req_prepare(struct sess *s, struct req *q, uint64_t *rng, bool arena)
{
	uint32_t H = s->info.hidden_size, k = s->info.top_k;
	struct moe_err err = { 0 };
	size_t rb, n;
	int r = 0;

	memset(q, 0, sizeof(*q));
	q->layer = s->info.moe_layers[below(rng, s->info.num_moe_layers)];
	q->dtype = below(rng, 2) ? MOE_BF16 : MOE_F32;
	q->T = 1 + below(rng, s->max_tokens);
	q->routing = below(rng, 2);
	q->arena = arena;
	n = q->T * H;
	q->bytes = n * act_size(q->dtype);
	rb = q->T * k * sizeof(int32_t);
	if (arena) {
		r = moe_client_alloc(s->c, q->bytes, &q->in);
		if (r == 0)
			r = moe_client_alloc(s->c, q->bytes, &q->out);
		if (r == 0 && q->routing)
			r = moe_client_alloc(s->c, rb, (void **)&q->ids);
		if (r == 0 && q->routing)
			r = moe_client_alloc(s->c, rb, (void **)&q->w);
	} else {
		q->in = malloc(q->bytes);
		q->out = malloc(q->bytes);
		if (q->routing) {
			q->ids = malloc(rb);
			q->w = malloc(rb);
		}
	}
	q->want = malloc(q->bytes);
	q->want_ids = malloc(rb);
	q->want_w = malloc(rb);
	if (r == 0 && (!q->in || !q->out || (q->routing && (!q->ids || !q->w)) || !q->want || !q->want_ids ||
		       !q->want_w))
		r = -ENOMEM;
	if (r < 0) {
		soak_count_err(s->k, r);
		soak_fail(s->a->b, s->who, "buffers of a %" PRIu64 "-token request%s: %s", q->T,
			  arena ? " in the arena" : "", moe_strerror(r));
		req_release(s, q);
		return r;
	}
	for (size_t i = 0; i < n; i++) {
		/* [-2, 2): routers and experts see values of both signs */
		float v = (float)((double)(bench_rng(rng) >> 11) * (4.0 / 9007199254740992.0) - 2.0);

		if (q->dtype == MOE_F32) {
			((float *)q->in)[i] = v;
			s->x[i] = v;
		} else {
			((uint16_t *)q->in)[i] = moe_f32_to_bf16(v);
			s->x[i] = moe_bf16_to_f32(((uint16_t *)q->in)[i]);
		}
	}
	/* stale bits must not pass for an answer */
	memset(q->out, 0xa5, q->bytes);
	if (q->routing) {
		memset(q->ids, 0xa5, rb);
		memset(q->w, 0xa5, rb);
	}
	if (moe_engine_forward(s->e, q->layer, s->x, q->T, s->y, q->want_ids, q->want_w, 0, &err) < 0) {
		soak_fail(s->a->b, s->who, "the engine in-process, layer %u, %" PRIu64 " tokens: %s", q->layer, q->T,
			  err.msg);
		req_release(s, q);
		return 1;
	}
	/* moed works in float32 and rounds a bf16 answer once, as here */
	for (size_t i = 0; i < n; i++)
		if (q->dtype == MOE_F32)
			((float *)q->want)[i] = s->y[i];
		else
			((uint16_t *)q->want)[i] = moe_f32_to_bf16(s->y[i]);
	return 0;
}

/* Compare moed's answer with the engine's, count it: true if it is right. */
static bool req_check(struct sess *s, const struct req *q)
{
	uint32_t H = s->info.hidden_size, k = s->info.top_k;
	size_t es = act_size(q->dtype), rk = q->T * k;
	const char *what = NULL;
	size_t at = 0;

	atomic_fetch_add(&s->k->requests, 1);
	atomic_fetch_add(&s->k->tokens, q->T);
	if (memcmp(q->out, q->want, q->bytes)) {
		while (!memcmp((const uint8_t *)q->out + at * es, (const uint8_t *)q->want + at * es, es))
			at++;
		what = "output";
	} else if (q->routing && memcmp(q->ids, q->want_ids, rk * sizeof(int32_t))) {
		while (q->ids[at] == q->want_ids[at])
			at++;
		what = "expert ids";
	} else if (q->routing && memcmp(q->w, q->want_w, rk * sizeof(float))) {
		while (!memcmp(&q->w[at], &q->want_w[at], sizeof(float)))
			at++;
		what = "routing weights";
	}
	if (!what)
		return true;
	atomic_fetch_add(&s->k->wrong, 1);
	soak_fail(s->a->b, s->who, "WRONG RESULT: layer %u, %" PRIu64 " tokens, %s%s, %s: %s differ from the "
		  "engine in-process first at [%zu][%zu]", q->layer, q->T, q->dtype == MOE_F32 ? "f32" : "bf16",
		  q->routing ? ", routing" : "", q->arena ? "submitted" : "moe_client_forward", what,
		  at / (what[0] == 'o' ? H : k), at % (what[0] == 'o' ? H : k));
	return false;
}

/* A session error: counted, recorded, and the session dropped (it may be
 * broken); the caller connects again. */
static void sess_error(struct sess *s, int code, const char *what)
{
	soak_count_err(s->k, code);
	soak_fail(s->a->b, s->who, "%s: %s", what, moe_strerror(code));
	sess_disconnect(s);
}

/* One request through moe_client_forward (copies through the arena). */
static int op_forward(struct sess *s, uint64_t *rng)
{
	struct req q;
	int r = req_prepare(s, &q, rng, false);

	if (r != 0)
		return r > 0 ? r : 0;
	r = moe_client_forward(s->c, q.layer, q.dtype, q.in, q.out, q.T, q.ids, q.w);
	if (r < 0)
		sess_error(s, r, "moe_client_forward");
	else
		req_check(s, &q);
	req_release(s, &q);
	return 0;
}

/*
 * Reap @n completions of @q[0..nq) (user_data = index) and of empty
 * requests (user_data >= nq); check each forward.  0, or a session error
 * (recorded, session dropped).
 */
static int reap(struct sess *s, struct req *q, uint32_t nq, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		struct moe_completion cq;
		int r = moe_client_wait(s->c, &cq, WAIT_MS);

		if (r < 0) {
			char what[96];

			snprintf(what, sizeof(what), "moe_client_wait, completion %" PRIu64 " of %" PRIu64, i + 1, n);
			sess_error(s, r, what);
			return r;
		}
		if (cq.res < 0) {
			soak_count_err(s->k, cq.res);
			soak_fail(s->a->b, s->who, "a well-formed %s failed: %s",
				  cq.user_data < nq ? "forward" : "empty request", moe_strerror(cq.res));
			continue;
		}
		if (cq.user_data < nq)
			req_check(s, &q[cq.user_data]);
		else
			atomic_fetch_add(&s->k->nops, 1);
	}
	return 0;
}

/* Submit @nq prepared requests (user_data = index): how many went in, or a
 * session error. */
static int submit_all(struct sess *s, struct req *q, uint32_t nq)
{
	for (uint32_t i = 0; i < nq; i++) {
		struct moe_request mr = { .layer = q[i].layer, .dtype = q[i].dtype, .tokens = q[i].T,
					  .input = q[i].in, .output = q[i].out, .ids = q[i].ids,
					  .weights = q[i].w, .user_data = i };
		int r = moe_client_submit(s->c, &mr);

		if (r < 0) {
			sess_error(s, r, "moe_client_submit");
			return r;
		}
	}
	return (int)nq;
}

/* Prepare @nq requests in the arena: 0, or as req_prepare() (those made
 * are released). */
static int prepare_all(struct sess *s, struct req *q, uint32_t nq, uint64_t *rng)
{
	for (uint32_t i = 0; i < nq; i++) {
		int r = req_prepare(s, &q[i], rng, true);

		if (r != 0) {
			while (i--)
				req_release(s, &q[i]);
			return r;
		}
	}
	return 0;
}

/* 1..BATCH_MAX requests in the arena, submitted together, reaped in any
 * order. */
static int op_batch(struct sess *s, uint64_t *rng)
{
	struct req q[BATCH_MAX];
	uint32_t nq = 1 + below(rng, BATCH_MAX);
	int r = prepare_all(s, q, nq, rng);

	if (r != 0)
		return r > 0 ? r : 0;
	r = submit_all(s, q, nq);
	if (r > 0)
		reap(s, q, nq, (uint64_t)r);
	for (uint32_t i = 0; i < nq; i++)
		req_release(s, &q[i]);
	return 0;
}

static int op_nop(struct sess *s, uint64_t *rng)
{
	struct moe_completion cq;
	int r = moe_client_nop(s->c, bench_rng(rng) >> 1);

	if (r == 0)
		r = moe_client_wait(s->c, &cq, WAIT_MS);
	if (r < 0)
		sess_error(s, r, "an empty request");
	else if (cq.res < 0)
		sess_error(s, cq.res, "an empty request completed");
	else
		atomic_fetch_add(&s->k->nops, 1);
	return 0;
}

/* One operation of a well-behaved client: 0, or 1 when the client must
 * leave (recorded). */
static int one_op(struct sess *s, uint64_t *rng)
{
	uint32_t pick = below(rng, 100);
	int r;

	if (!s->c) {
		if (sess_connect(s) < 0) {
			sleep_ms(100);
			return 0;
		}
		atomic_fetch_add(&s->a->b->reconnects, 1);
	}
	if (pick < 50)
		r = op_forward(s, rng);
	else if (pick < 95)
		r = op_batch(s, rng);
	else
		r = op_nop(s, rng);
	if (r == 0 && s->c && below(rng, 1000) < RECONNECT_PER_MILLE)
		sess_disconnect(s);    /* sessions come and go: nothing may leak */
	return r;
}

int soak_good_client(const struct soak_client *a)
{
	uint64_t rng = a->seed;
	char who[32];
	struct sess s;

	snprintf(who, sizeof(who), "client %d", a->id);
	if (sess_open(&s, a, who, &a->b->good))
		return 1;
	while (!atomic_load(&a->b->stop))
		if (one_op(&s, &rng))
			return 1;
	sess_close(&s);
	return 0;
}

/* ------------------------------------------------------------------ the stalling client */

/*
 * Fill the session's rings: 1..4 forwards, then empty requests until moed
 * takes no more (the completion ring full, the submission ring behind it)
 * for FULL_SETTLE_MS.  How many are in flight, or a session error.
 */
static int64_t fill_rings(struct sess *s, struct req *q, uint32_t nq)
{
	uint64_t n = 0, refused_since = 0;
	int r = submit_all(s, q, nq);

	if (r < 0)
		return r;
	for (n = (uint64_t)r; n < FILL_MAX;) {
		r = moe_client_nop(s->c, nq + n);
		if (r == 0) {
			n++;
			refused_since = 0;
			continue;
		}
		if (r != -EAGAIN) {
			sess_error(s, r, "an empty request into a filling ring");
			return r;
		}
		if (!refused_since)
			refused_since = moe_now_ns();
		else if (moe_now_ns() - refused_since > FULL_SETTLE_MS * 1000000ull)
			break;
		sleep_ms(1);
	}
	return (int64_t)n;
}

/*
 * One stall: requests in flight, then the client stops reading its
 * completions, with its rings full (@full) or SIGSTOPped by itself (the
 * driver sends SIGCONT after stall_ms); then it reaps and checks them.
 * @hold: the end of the run, ring full until the driver says quit.
 */
static int stall_once(struct sess *s, uint64_t *rng, bool full, bool hold)
{
	struct soak_board *b = s->a->b;
	struct req q[4];
	uint32_t nq = 1 + below(rng, 4);
	int64_t n;
	int r = prepare_all(s, q, nq, rng);

	if (r != 0)
		return r > 0 ? r : 0;
	if (full) {
		n = fill_rings(s, q, nq);
	} else {
		n = submit_all(s, q, nq);
		for (int i = 0; n >= 0 && i < 16; i++) {
			r = moe_client_nop(s->c, nq + (uint64_t)n);
			if (r < 0) {
				sess_error(s, r, "an empty request");
				n = r;
			} else {
				n++;
			}
		}
	}
	if (n >= 0) {
		atomic_store(&b->stall_inflight, (uint64_t)n);
		if (hold) {
			atomic_store(&b->stall_state, STALL_HOLDING);
			while (!atomic_load(&b->quit))
				sleep_ms(10);
		} else if (full) {
			atomic_store(&b->stall_state, STALL_RING_FULL);
			atomic_fetch_add(&b->stalls_full, 1);
			sleep_ms(s->a->stall_ms);
		} else {
			atomic_store(&b->stall_state, STALL_STOPPING);
			atomic_fetch_add(&b->stalls_stopped, 1);
			raise(SIGSTOP);
		}
		atomic_store(&b->stall_state, STALL_WORKING);
		reap(s, q, nq, (uint64_t)n);
	}
	for (uint32_t i = 0; i < nq; i++)
		req_release(s, &q[i]);
	return 0;
}

int soak_stall_client(const struct soak_client *a)
{
	uint64_t rng = a->seed, t;
	bool full = true;
	struct sess s;

	if (sess_open(&s, a, "stalling client", &a->b->stall))
		return 1;
	while (!atomic_load(&a->b->stop)) {
		for (t = moe_now_ns(); !atomic_load(&a->b->stop) && moe_now_ns() - t < a->work_ms * 1000000ull;)
			if (one_op(&s, &rng))
				return 1;
		if (atomic_load(&a->b->stop))
			break;
		if (!s.c && sess_connect(&s) < 0)
			continue;
		if (stall_once(&s, &rng, full, false))
			return 1;
		full = !full;
	}
	/* the driver measures moed's CPU while this one stalls, the others gone */
	while (!s.c && !atomic_load(&a->b->quit))
		if (sess_connect(&s) < 0)
			sleep_ms(100);
	if (s.c && stall_once(&s, &rng, true, true))
		return 1;
	sess_close(&s);
	return 0;
}
