/* SPDX-License-Identifier: MIT */
/*
 * The io_uring pager and the engine's host tier, end to end on real stores:
 *  - the pager brings every blob in byte for byte, through O_DIRECT and
 *    through the page cache, with one or many chunks in flight;
 *  - a forward over every layer with a host budget smaller than one layer
 *    gives the same bits as with every expert resident, under each policy,
 *    with and without prefetching;
 *  - an injected I/O error, short read or checksum mismatch fails exactly
 *    the forwards that need the expert, with -EIO and a message and a log
 *    line naming layer and expert, and the next forward reads it again and
 *    succeeds;
 *  - the store's health: repeated failures make it "damaged", a file
 *    truncated under the engine "changed", each with one error line; a
 *    reopen of the file made whole again (an injected open failure first)
 *    makes it ok with the same bits; another store at the path is refused.
 * Descriptors are counted here; leaked memory and buffers are what the ASan
 * (LeakSanitizer) run of this suite looks for.  Not valgrind: its 3.19
 * holds its big lock across io_uring_enter, so a second thread never runs.
 */
#include "config.h"

#include <check.h>
#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "engine/model.h"
#include "formats/pack.h"
#include "engine/pager.h"
#include "engine/store.h"
#include "testutil.h"

/* deepseek_v3, bf16, 3 layers (layer 0 dense), 16 experts of 196 KB (four
 * 64 KB chunks, the last one short), a shared expert. */
static void model_make(struct moe_test_model *m)
{
	struct moe_gen_options opt;
	char why[512];
	int rc;

	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
	moe_test_gen_grouped(&opt);
	opt.hidden_size = 512;
	opt.moe_intermediate_size = 64;
	opt.num_experts = 16;
	opt.top_k = 4;
	opt.seed = 4242;
	opt.num_layers = 4;
	rc = moe_test_model_make(m, "pager", &opt, NULL, why, sizeof(why));
	ck_assert_msg(rc == 0, "%s", why);
}

/* Open file descriptors of this process (the pager's store, ring and eventfd
 * must all be closed again). */
static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d)))
		n += de->d_name[0] != '.';
	closedir(d);
	return n;
}

/* ------------------------------------------------------------ the pager alone */

struct sink_buf {
	uint8_t *buf;
	uint64_t size;
	uint64_t next;               /* chunks must arrive in order */
	int bad;
};

static void sink(void *ctx, const void *chunk, uint64_t off, uint64_t len)
{
	struct sink_buf *b = ctx;

	if (off != b->next || off + len > b->size)
		b->bad = 1;
	else
		memcpy(b->buf + off, chunk, len);
	b->next = off + len;
}

static const struct { bool buffered; uint32_t depth, chunk_kb; } pager_cfgs[] = {
	{ false, 32, 64 }, { false, 1, 64 }, { false, 3, 128 }, { true, 2, 64 }, { false, 32, 1024 },
};

START_TEST(pager_reads_every_blob_exactly)
{
	struct moe_test_model m;
	struct moe_store *s;
	struct moe_pager *p;
	struct moe_err err = {0};
	struct moe_pager_options po = { .buffered = pager_cfgs[_i].buffered,
					.queue_depth = pager_cfgs[_i].depth,
					.chunk_kb = pager_cfgs[_i].chunk_kb };
	struct moe_pager_stats st;
	int rc;

	model_make(&m);
	int fds = count_fds();
	ck_assert(moe_store_open(m.store, &s, &err) == 0);
	rc = moe_pager_open(s, &po, &p, &err);
	ck_assert_msg(rc == 0, "pager open: %d %s", rc, err.msg);

	uint32_t n = m.nl * (m.E + 1);
	struct moe_pager_load *ld = calloc(n, sizeof(*ld));
	struct sink_buf *sb = calloc(n, sizeof(*sb));
	ck_assert(ld && sb);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t li = i / (m.E + 1), x = i % (m.E + 1);
		bool shared = x == m.E;

		sb[i].size = shared ? s->layers[li].shared_bytes : s->hdr.expert_bytes;
		sb[i].buf = malloc(sb[i].size);
		ck_assert_ptr_nonnull(sb[i].buf);
		ld[i] = (struct moe_pager_load){ .li = li, .expert = shared ? UINT32_MAX : x,
						 .prefetch = i % 3 == 1, .sink = sink, .sink_ctx = &sb[i] };
		ck_assert_int_eq(moe_pager_submit(p, &ld[i]), 0);
	}
	for (uint32_t i = 0; i < n; i++) {
		uint32_t li = i / (m.E + 1), x = i % (m.E + 1);
		uint8_t *want = malloc(sb[i].size);

		rc = moe_pager_wait(p, &ld[i], &err);
		ck_assert_msg(rc == 0, "load %u failed: %s", i, err.msg);
		ck_assert_msg(!sb[i].bad && sb[i].next == sb[i].size, "load %u: chunks out of order or short", i);
		if (x == m.E)
			ck_assert(moe_store_read_shared(s, li, want, &err) == 0);
		else
			ck_assert(moe_store_read_expert(s, li, x, want, &err) == 0);
		ck_assert_msg(memcmp(want, sb[i].buf, sb[i].size) == 0, "layer index %u blob %u differs", li, x);
		free(want);
		free(sb[i].buf);
	}
	moe_pager_get_stats(p, &st);
	ck_assert_uint_eq(st.loads, n);
	ck_assert_uint_eq(st.failed, 0);
	if (po.buffered)
		ck_assert(!st.direct);   /* without: O_DIRECT unless the filesystem refuses it */
	ck_assert_uint_le(st.max_inflight, (uint64_t)po.queue_depth * po.chunk_kb * 1024);
	/* a bad request is refused, not read */
	struct moe_pager_load bad = { .li = m.nl, .expert = 0, .sink = sink };
	ck_assert_int_eq(moe_pager_submit(p, &bad), -EINVAL);
	ck_assert_ptr_nonnull(strstr(bad.msg, "no such blob"));
	moe_pager_close(p);
	moe_store_close(s);
	ck_assert_int_eq(count_fds(), fds);
	free(ld);
	free(sb);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------ the engine */

static char logbuf[8192];

static void log_to_buf(void *ctx, int level, const char *msg)
{
	size_t used = strlen(logbuf);

	(void)ctx;
	snprintf(logbuf + used, sizeof(logbuf) - used, "<%d>%s\n", level, msg);
}

static struct moe_engine *engine_open(const struct moe_test_model *m, uint64_t host_bytes, const char *policy,
				      bool prefetch)
{
	struct moe_engine_options o = { .backend = "cpu", .threads = 2, .host_bytes = host_bytes,
					.policy = policy, .prefetch = prefetch, .log = log_to_buf,
					.pager = { .chunk_kb = 64, .queue_depth = 4 } };
	struct moe_err err = {0};
	struct moe_engine *e;
	int rc = moe_engine_open(m->store, &o, &e, &err);

	ck_assert_msg(rc == 0, "engine open (budget %" PRIu64 "): %d %s", host_bytes, rc, err.msg);
	return e;
}

static float *random_tokens(size_t n, uint32_t H, uint64_t seed)
{
	float *x = malloc(sizeof(float) * n * H);

	ck_assert_ptr_nonnull(x);
	for (size_t i = 0; i < n * H; i++)
		x[i] = (float)moe_test_randf(&seed);
	return x;
}

/* Every MoE layer on a residual stream, @rounds batches of @n tokens;
 * returns the concatenated outputs of every layer. */
static float *run_all(struct moe_engine *e, const struct moe_test_model *m, size_t n, int rounds)
{
	size_t per = n * m->H;
	float *res = malloc(sizeof(float) * per * m->nl * (size_t)rounds);
	struct moe_err err = {0};

	ck_assert_ptr_nonnull(res);
	for (int r = 0; r < rounds; r++) {
		float *x = random_tokens(n, m->H, 99 + (uint64_t)r);

		for (uint32_t li = 0; li < m->nl; li++) {
			float *out = res + ((size_t)r * m->nl + li) * per;
			int rc = moe_engine_forward(e, m->layers[li], x, n, out, NULL, NULL, 0, &err);

			ck_assert_msg(rc == 0, "forward layer %u: %d %s", m->layers[li], rc, err.msg);
			for (size_t i = 0; i < per; i++)
				x[i] += out[i];
		}
		free(x);
	}
	return res;
}

static const struct { const char *policy; bool prefetch; uint32_t slots; } budget_cfgs[] = {
	{ "lru", false, 3 }, { "freq", false, 3 }, { "freq", true, 5 }, { "lru", true, 1 },
	{ "auto", true, 12 },
};

START_TEST(paging_with_a_small_budget_gives_the_same_bits)
{
	struct moe_test_model m;
	struct moe_engine_stats st, st2;
	const size_t n = 37;
	const int rounds = 3;

	model_make(&m);
	struct moe_engine *full = engine_open(&m, 0, NULL, false);
	float *want = run_all(full, &m, n, rounds);
	moe_engine_get_stats(full, &st, NULL);
	ck_assert_uint_eq(st.slots, m.nl * m.E);
	ck_assert_uint_eq(st.total.load_failures, 0);
	moe_engine_close(full);

	/* fewer slots than one layer has experts */
	uint64_t budget = st.host_fixed + budget_cfgs[_i].slots * st.slot_bytes + st.slot_bytes / 2;
	struct moe_engine *small = engine_open(&m, budget, budget_cfgs[_i].policy, budget_cfgs[_i].prefetch);
	float *got = run_all(small, &m, n, rounds);
	size_t per = n * m.H;

	for (size_t i = 0; i < per * m.nl * (size_t)rounds; i++)
		if (memcmp(&got[i], &want[i], sizeof(float))) {
			size_t r = i / (per * m.nl), l = i / per % m.nl;

			ck_abort_msg("%s%s, %u slots: round %zu layer %u element %zu: %.9g, resident run %.9g",
				     budget_cfgs[_i].policy, budget_cfgs[_i].prefetch ? "+prefetch" : "",
				     budget_cfgs[_i].slots, r, m.layers[l], i % per, (double)got[i],
				     (double)want[i]);
		}
	moe_engine_get_stats(small, &st2, NULL);
	ck_assert_uint_eq(st2.slots, budget_cfgs[_i].slots);
	ck_assert_uint_le(st2.slots_used, st2.slots);
	ck_assert_uint_gt(st2.total.evictions, 0);
	ck_assert_uint_gt(st2.total.loads, st.total.loads);
	ck_assert_uint_eq(st2.total.load_failures, 0);
	if (budget_cfgs[_i].prefetch)
		ck_assert_uint_gt(st2.total.predicted, 0);
	moe_engine_close(small);
	free(want);
	free(got);
	moe_test_model_free(&m);
}
END_TEST

START_TEST(a_budget_below_the_fixed_part_is_refused)
{
	struct moe_test_model m;
	struct moe_engine_options o = { .backend = "cpu", .host_bytes = 4096 };
	struct moe_err err = {0};
	struct moe_engine *e = NULL;

	model_make(&m);
	ck_assert_int_eq(moe_engine_open(m.store, &o, &e, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "too small") && strstr(err.msg, "at least"), "message: %s", err.msg);
	o.host_bytes = 0;
	o.policy = "mru";
	ck_assert_int_eq(moe_engine_open(m.store, &o, &e, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "mru"), "message: %s", err.msg);
	o.policy = NULL;
	const char *pins[] = { "9:1", NULL };
	o.pin = pins;
	ck_assert_int_lt(moe_engine_open(m.store, &o, &e, &err), 0);
	ck_assert_msg(strstr(err.msg, "9:1"), "message: %s", err.msg);
	moe_test_model_free(&m);
}
END_TEST

/*
 * Faults: batch A needs expert X of layer L, batch B does not.  With the
 * next read of X failing, A fails with -EIO (-EBADMSG for a checksum
 * mismatch) naming L and X, B succeeds
 * with the right bits, and A run again succeeds with the right bits.
 */
static void fault_case(enum moe_pager_fault f, const char *what)
{
	struct moe_test_model m;
	struct moe_err err = {0};
	const size_t na = 8;
	int32_t *ids = malloc(sizeof(int32_t) * na * 4);
	float *xa, *xb = NULL, *want_a, *want_b, *out;
	uint32_t L, X = UINT32_MAX;
	int rc;

	model_make(&m);
	L = m.layers[m.nl - 1];
	xa = random_tokens(na, m.H, 7);
	want_a = malloc(sizeof(float) * na * m.H);
	want_b = malloc(sizeof(float) * m.H);
	out = malloc(sizeof(float) * na * m.H);
	ck_assert(ids && want_a && want_b && out);

	struct moe_engine *ref = engine_open(&m, 0, NULL, false);
	ck_assert(moe_engine_forward(ref, L, xa, na, want_a, ids, NULL, 0, &err) == 0);
	/* X: an expert of token 0; B: a token whose experts do not include X */
	X = (uint32_t)ids[0];
	for (uint64_t seed = 100; seed < 400 && !xb; seed++) {
		int32_t bid[4];
		float *cand = random_tokens(1, m.H, seed);

		ck_assert(moe_engine_forward(ref, L, cand, 1, want_b, bid, NULL, 0, &err) == 0);
		if (bid[0] != (int32_t)X && bid[1] != (int32_t)X && bid[2] != (int32_t)X &&
		    bid[3] != (int32_t)X)
			xb = cand;
		else
			free(cand);
	}
	ck_assert_ptr_nonnull(xb);
	moe_engine_close(ref);

	int fds = count_fds();
	struct moe_engine *e = engine_open(&m, 0, NULL, false);
	logbuf[0] = '\0';
	ck_assert_int_eq(moe_engine_inject_fault(e, f, L, X, 1), 0);
	rc = moe_engine_forward(e, L, xa, na, out, NULL, NULL, 0, &err);
	/* a checksum mismatch is told apart from a failed read (issue 14) */
	ck_assert_msg(rc == (f == MOE_FAULT_CHECKSUM ? -EBADMSG : -EIO),
		      "%s: forward that needs the expert gave %d (%s)", what, rc, err.msg);
	char needle[64];
	snprintf(needle, sizeof(needle), "layer %u expert %u", L, X);
	ck_assert_msg(strstr(err.msg, needle), "%s: message does not name %s: %s", what, needle, err.msg);
	ck_assert_msg(strstr(logbuf, needle), "%s: no log line names %s: %s", what, needle, logbuf);
	if (f == MOE_FAULT_CHECKSUM)
		ck_assert_msg(strstr(err.msg, "checksum"), "message: %s", err.msg);

	/* B does not need X: unaffected */
	rc = moe_engine_forward(e, L, xb, 1, out, NULL, NULL, 0, &err);
	ck_assert_msg(rc == 0, "%s: forward that does not need the expert failed: %s", what, err.msg);
	ck_assert(memcmp(out, want_b, sizeof(float) * m.H) == 0);

	/* the fault is gone: A reads X again and succeeds */
	rc = moe_engine_forward(e, L, xa, na, out, NULL, NULL, 0, &err);
	ck_assert_msg(rc == 0, "%s: retry failed: %s", what, err.msg);
	ck_assert(memcmp(out, want_a, sizeof(float) * na * m.H) == 0);

	struct moe_engine_stats st;
	moe_engine_get_stats(e, &st, NULL);
	ck_assert_uint_eq(st.total.load_failures, 1);
	ck_assert_uint_eq(st.pager.failed, 1);
	moe_engine_close(e);
	ck_assert_int_eq(count_fds(), fds);
	free(ids);
	free(xa);
	free(xb);
	free(want_a);
	free(want_b);
	free(out);
	moe_test_model_free(&m);
}

START_TEST(an_io_error_fails_only_the_forwards_that_need_the_expert)
{
	fault_case(MOE_FAULT_IO, "I/O error");
}
END_TEST

START_TEST(a_checksum_mismatch_fails_only_the_forwards_that_need_the_expert)
{
	fault_case(MOE_FAULT_CHECKSUM, "checksum mismatch");
}
END_TEST

START_TEST(a_short_read_fails_only_the_forwards_that_need_the_expert)
{
	fault_case(MOE_FAULT_SHORT, "short read");
}
END_TEST

/* ------------------------------------------------------------ the store's health */

/* Lines of logbuf at @level that contain @needle. */
static int log_lines(int level, const char *needle)
{
	char tag[8];
	int n = 0;

	snprintf(tag, sizeof(tag), "<%d>", level);
	for (const char *l = logbuf; *l;) {
		const char *eol = strchr(l, '\n');
		size_t len = eol ? (size_t)(eol - l) : strlen(l);
		char line[1024];

		snprintf(line, sizeof(line), "%.*s", (int)len, l);
		n += strncmp(line, tag, strlen(tag)) == 0 && strstr(line, needle) != NULL;
		l += len + (eol != NULL);
	}
	return n;
}

/*
 * Of MoE layer @L: a batch @xa of @na tokens of which one routes to expert
 * @X, and one token @xb that does not, with their outputs from a fully
 * resident engine.
 */
struct xcase {
	float *xa, *xb, *want_a, *want_b;
	size_t na;
};

static void xcase_make(const struct moe_test_model *m, uint32_t L, uint32_t X, struct xcase *c)
{
	struct moe_err err = {0};
	struct moe_engine *ref = engine_open(m, 0, NULL, false);
	int32_t *ids = malloc(sizeof(int32_t) * 8 * m->k);

	c->na = 8;
	c->xa = c->xb = NULL;
	c->want_a = malloc(sizeof(float) * c->na * m->H);
	c->want_b = malloc(sizeof(float) * m->H);
	ck_assert(ids && c->want_a && c->want_b);
	for (uint64_t seed = 100; seed < 2000 && (!c->xa || !c->xb); seed++) {
		bool has = false;
		float *cand = random_tokens(c->na, m->H, seed);

		ck_assert(moe_engine_forward(ref, L, cand, c->na, c->want_a, ids, NULL, 0, &err) == 0);
		for (uint32_t i = 0; i < c->na * m->k; i++)
			has |= ids[i] == (int32_t)X;
		if (!c->xa && has) {
			c->xa = cand;
		} else if (!c->xb && !has) {
			c->xb = cand;     /* its first token alone does not need X */
		} else {
			free(cand);
		}
	}
	ck_assert_msg(c->xa && c->xb, "no tokens found that route (not) to expert %u", X);
	ck_assert(moe_engine_forward(ref, L, c->xa, c->na, c->want_a, NULL, NULL, 0, &err) == 0);
	ck_assert(moe_engine_forward(ref, L, c->xb, 1, c->want_b, NULL, NULL, 0, &err) == 0);
	moe_engine_close(ref);
	free(ids);
}

static void xcase_free(struct xcase *c)
{
	free(c->xa);
	free(c->xb);
	free(c->want_a);
	free(c->want_b);
}

/* A needs X: @want (-EIO, -EBADMSG); B does not: the right bits. */
static void expect_a_fails_b_runs(struct moe_engine *e, const struct moe_test_model *m, uint32_t L,
				  const struct xcase *c, int want, const char *when)
{
	struct moe_err err = {0};
	float *out = malloc(sizeof(float) * c->na * m->H);
	int rc;

	ck_assert_ptr_nonnull(out);
	rc = moe_engine_forward(e, L, c->xa, c->na, out, NULL, NULL, 0, &err);
	ck_assert_msg(rc == want, "%s: a forward that needs the bad expert gave %d (%s)", when, rc, err.msg);
	rc = moe_engine_forward(e, L, c->xb, 1, out, NULL, NULL, 0, &err);
	ck_assert_msg(rc == 0, "%s: a forward that does not need the bad expert failed: %s", when, err.msg);
	ck_assert_msg(memcmp(out, c->want_b, sizeof(float) * m->H) == 0, "%s: wrong bits", when);
	free(out);
}

static void expect_a_runs(struct moe_engine *e, const struct moe_test_model *m, uint32_t L,
			  const struct xcase *c, const char *when)
{
	struct moe_err err = {0};
	float *out = malloc(sizeof(float) * c->na * m->H);
	int rc;

	ck_assert_ptr_nonnull(out);
	rc = moe_engine_forward(e, L, c->xa, c->na, out, NULL, NULL, 0, &err);
	ck_assert_msg(rc == 0, "%s: %d %s", when, rc, err.msg);
	ck_assert_msg(memcmp(out, c->want_a, sizeof(float) * c->na * m->H) == 0, "%s: not bit-identical", when);
	free(out);
}

/*
 * The same fault MOE_PAGER_DAMAGED_AFTER times on an unchanged file: each
 * forward that needs the expert fails, the store turns "damaged" once
 * with one error line (the failures after it are debug lines), and a
 * reopen makes it ok again with the same bits.
 */
static void damaged_case(enum moe_pager_fault f)
{
	struct moe_test_model m;
	struct moe_store_health h;
	struct moe_err err = {0};
	struct xcase c;
	uint32_t L;

	model_make(&m);
	L = m.layers[m.nl - 1];
	xcase_make(&m, L, 5, &c);
	struct moe_engine *e = engine_open(&m, 0, NULL, false);
	logbuf[0] = '\0';
	ck_assert_int_eq(moe_engine_inject_fault(e, f, L, 5, MOE_PAGER_DAMAGED_AFTER + 2), 0);
	for (uint32_t i = 0; i < MOE_PAGER_DAMAGED_AFTER + 2; i++) {
		expect_a_fails_b_runs(e, &m, L, &c, f == MOE_FAULT_CHECKSUM ? -EBADMSG : -EIO, "injected");
		moe_engine_store_health(e, true, &h);
		ck_assert_msg(h.state == (i + 1 < MOE_PAGER_DAMAGED_AFTER ? MOE_STORE_OK : MOE_STORE_DAMAGED),
			      "after %u failures the store is %s", i + 1, moe_store_state_name(h.state));
	}
	ck_assert_uint_eq(f == MOE_FAULT_CHECKSUM ? h.checksum_errors : h.read_errors, MOE_PAGER_DAMAGED_AFTER + 2);
	ck_assert_msg(log_lines(3, "the store is damaged") == 1, "not one line says so: %s", logbuf);
	ck_assert_msg(log_lines(3, "layer") == MOE_PAGER_DAMAGED_AFTER, "errors logged: %s", logbuf);
	ck_assert_msg(strstr(h.why, "expert 5"), "why: %s", h.why);
	ck_assert_int_eq(moe_engine_reopen_store(e, true, &err), 0);
	moe_engine_store_health(e, true, &h);
	ck_assert_int_eq(h.state, MOE_STORE_OK);
	ck_assert_uint_eq(h.reopens, 1);
	expect_a_runs(e, &m, L, &c, "after the reopen");
	moe_engine_close(e);
	xcase_free(&c);
	moe_test_model_free(&m);
}

START_TEST(repeated_checksum_mismatches_make_the_store_damaged_once)
{
	damaged_case(MOE_FAULT_CHECKSUM);
}
END_TEST

START_TEST(repeated_read_errors_make_the_store_damaged_once)
{
	damaged_case(MOE_FAULT_IO);
}
END_TEST

/*
 * A store truncated under the engine (its last expert gone): the state is
 * "changed" with one error line, forwards that need the lost expert fail
 * with -EIO and others run; the file written whole again (in place) and
 * reopened: ok, and the same bits as before.
 */
START_TEST(a_store_truncated_under_the_engine_recovers_on_reopen)
{
	struct moe_test_model m;
	struct moe_store_health h;
	struct moe_err err = {0};
	struct xcase c;
	uint64_t len;
	uint8_t *whole;
	uint32_t L;
	FILE *f;

	model_make(&m);
	L = m.layers[m.nl - 1];
	xcase_make(&m, L, m.E - 1, &c);
	whole = (uint8_t *)moe_test_slurp(m.store, &len);
	ck_assert_ptr_nonnull(whole);
	int fds = count_fds();
	struct moe_engine *e = engine_open(&m, 0, NULL, false);
	const struct moe_store *s = moe_engine_store(e);

	logbuf[0] = '\0';
	ck_assert(truncate(m.store, (off_t)(len - s->hdr.expert_stride)) == 0);
	expect_a_fails_b_runs(e, &m, L, &c, -EIO, "truncated");
	expect_a_fails_b_runs(e, &m, L, &c, -EIO, "truncated, again");
	moe_engine_store_health(e, true, &h);
	ck_assert_str_eq(moe_store_state_name(h.state), "changed");
	ck_assert_msg(strstr(h.why, "truncated"), "why: %s", h.why);
	ck_assert_uint_ge(h.read_errors, 2);
	ck_assert_msg(log_lines(3, m.store) == 1, "not one error line: %s", logbuf);

	/* not whole yet: the reopen is refused and nothing changes */
	ck_assert_int_eq(moe_engine_reopen_store(e, false, &err), -EIO);
	ck_assert_msg(strstr(err.msg, "truncated store"), "%s", err.msg);
	moe_engine_store_health(e, false, &h);
	ck_assert_int_eq(h.state, MOE_STORE_CHANGED);

	/* an injected failure to open: refused, nothing changes */
	f = fopen(m.store, "r+");
	ck_assert_ptr_nonnull(f);
	ck_assert_uint_eq(fwrite(whole, 1, len, f), len);
	ck_assert_int_eq(fclose(f), 0);
	ck_assert_int_eq(moe_engine_inject_fault(e, MOE_FAULT_OPEN, 0, 0, 1), 0);
	ck_assert_int_eq(moe_engine_reopen_store(e, true, &err), -EIO);
	ck_assert_msg(strstr(err.msg, m.store) && strstr(err.msg, "open"), "%s", err.msg);
	moe_engine_store_health(e, false, &h);
	ck_assert_int_eq(h.state, MOE_STORE_CHANGED);

	/* whole again: reopened, verified, the same bits */
	ck_assert_int_eq(moe_engine_reopen_store(e, true, &err), 0);
	moe_engine_store_health(e, true, &h);
	ck_assert_int_eq(h.state, MOE_STORE_OK);
	ck_assert_str_eq(h.why, "");
	expect_a_runs(e, &m, L, &c, "after the reopen");
	moe_engine_close(e);
	ck_assert_int_eq(count_fds(), fds);
	free(whole);
	xcase_free(&c);
	moe_test_model_free(&m);
}
END_TEST

/* A file of another store at the path is not taken for the one in use. */
START_TEST(reopen_refuses_another_store)
{
	struct moe_test_model m, other;
	struct moe_err err = {0};
	char cmd[8300];

	model_make(&m);
	struct moe_engine *e = engine_open(&m, 0, NULL, false);
	struct moe_gen_options opt;
	char why[512];

	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
	moe_test_gen_grouped(&opt);
	opt.seed = 77;
	ck_assert_msg(moe_test_model_make(&other, "pager2", &opt, NULL, why, sizeof(why)) == 0, "%s", why);
	snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", other.store, m.store);
	ck_assert_int_eq(system(cmd), 0);
	ck_assert_int_eq(moe_engine_reopen_store(e, false, &err), -ESTALE);
	ck_assert_msg(strstr(err.msg, "another store"), "%s", err.msg);
	moe_engine_close(e);
	moe_test_model_free(&other);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("pager");
	TCase *tc = tcase_create("pager");

	tcase_set_timeout(tc, 120);
	tcase_add_loop_test(tc, pager_reads_every_blob_exactly, 0,
			    (int)(sizeof(pager_cfgs) / sizeof(pager_cfgs[0])));
	tcase_add_loop_test(tc, paging_with_a_small_budget_gives_the_same_bits, 0,
			    (int)(sizeof(budget_cfgs) / sizeof(budget_cfgs[0])));
	tcase_add_test(tc, a_budget_below_the_fixed_part_is_refused);
	tcase_add_test(tc, an_io_error_fails_only_the_forwards_that_need_the_expert);
	tcase_add_test(tc, a_checksum_mismatch_fails_only_the_forwards_that_need_the_expert);
	tcase_add_test(tc, a_short_read_fails_only_the_forwards_that_need_the_expert);
	tcase_add_test(tc, repeated_checksum_mismatches_make_the_store_damaged_once);
	tcase_add_test(tc, repeated_read_errors_make_the_store_damaged_once);
	tcase_add_test(tc, a_store_truncated_under_the_engine_recovers_on_reopen);
	tcase_add_test(tc, reopen_refuses_another_store);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "pager");
}
