/* SPDX-License-Identifier: MIT */
/*
 * Determinism and batch invariance through the engine on the CPU backend
 * (ARCHITECTURE.md section 5): a token's output bits and routing do not
 * depend on its position in the batch, on the other tokens in it, on the
 * batch size, on the run, or on the number of worker threads.  Compared
 * with memcmp: "close" is not invariant.
 */
#include "config.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "engine/model.h"
#include "formats/pack.h"
#include "engine/store.h"
#include "testutil.h"

/* The MoE layer every model below has (deepseek's layer 0 is dense). */
#define LAYER 1u

struct model {
	const char *what;            /* for messages */
	struct moe_test_model t;
};

/*
 * Generate and pack one of the invariance models, in the test's own process
 * (Check forks each test; a directory made in the parent would be removed
 * by the first child's exit handlers).
 *  0: deepseek_v3, bf16 weights, H = 200 (not a multiple of 16), grouped,
 *     one shared expert;
 *  1: mixtral, f32 weights, H = 72, I = 44;
 *  2: deepseek_v3 as DeepSeek released it, FP8 block-scaled routed and
 *     shared experts (gen-model --quant fp8), H = 200, I = 72: partial
 *     128 x 128 blocks both ways;
 *  3: gpt_oss, bf16 weights, H = 66, I = 26 (matrices off a 16-byte
 *     boundary), 32 experts, top-4: router bias, expert biases, clamp;
 *  4: gpt_oss as OpenAI released it, MXFP4 experts (gen-model --quant
 *     mxfp4), H = 96, I = 160, 13 rows of 4 and none left: odd tiles;
 *  5: deepseek_v3 in GPTQ int4 with act-order (gen-model --quant gptq
 *     --desc-act), groups of 16, H = 192, I = 48: routed, shared and
 *     dense matrices int4.
 */
static void model_make(struct model *m, int which)
{
	struct moe_gen_options opt;
	char why[512];
	int rc;

	memset(m, 0, sizeof(*m));
	if (which == 0 || which == 2) {
		moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
		moe_test_gen_grouped(&opt);
		opt.hidden_size = 200;
		opt.moe_intermediate_size = which == 2 ? 72 : 32;
		opt.num_experts = 32;
		opt.top_k = 4;
		opt.quant_fp8 = which == 2;
		m->what = which == 2 ? "deepseek_v3/fp8/H200/I72" : "deepseek_v3/bf16/H200";
	} else if (which == 4) {
		moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &opt);
		opt.hidden_size = 96;
		opt.moe_intermediate_size = 160;
		opt.num_experts = 16;
		opt.top_k = 4;
		opt.quant_mxfp4 = true;
		m->what = "gpt_oss/mxfp4/H96/I160";
	} else if (which == 5) {
		moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
		moe_test_gen_grouped(&opt);
		opt.hidden_size = 192;
		opt.moe_intermediate_size = 48;
		opt.num_experts = 32;
		opt.top_k = 4;
		opt.quant_int4 = "gptq";
		opt.q4_group_size = 16;
		opt.q4_desc_act = true;
		m->what = "deepseek_v3/gptq-desc-act/H192/I48";
	} else if (which == 3) {
		moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &opt);
		opt.hidden_size = 66;
		opt.moe_intermediate_size = 26;
		opt.num_experts = 32;
		opt.top_k = 4;
		m->what = "gpt_oss/bf16/H66";
	} else {
		moe_test_gen_small(MOE_ARCH_MIXTRAL, MOE_DTYPE_F32, &opt);
		opt.hidden_size = 72;
		opt.moe_intermediate_size = 44;
		opt.num_experts = 8;
		opt.top_k = 2;
		opt.n_group = 1;
		opt.topk_group = 1;
		opt.n_shared_experts = 0;
		m->what = "mixtral/f32/H72";
	}
	opt.seed = 77 + (uint64_t)which;
	opt.num_layers = 2;
	rc = moe_test_model_make(&m->t, "invariance", &opt, NULL, why, sizeof(why));
	ck_assert_msg(rc == 0, "%s: %s", m->what, why);
	if (which == 4) {        /* else this model tests what model 3 does */
		struct moe_store *s;
		struct moe_err err = {0};

		ck_assert_msg(moe_store_open(m->t.store, &s, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_MXFP4);
		moe_store_close(s);
	}
	if (which == 2) {        /* else this model tests what model 0 does */
		struct moe_store *s;
		struct moe_err err = {0};

		ck_assert_msg(moe_store_open(m->t.store, &s, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
		moe_store_close(s);
	}
	if (which == 5) {
		struct moe_store *s;
		struct moe_err err = {0};

		ck_assert_msg(moe_store_open(m->t.store, &s, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_INT4);
		ck_assert_uint_eq(s->cfg.q4_flags, MOE_Q4_ZEROS | MOE_Q4_PERM);
		moe_store_close(s);
	}
}

static struct moe_engine *engine_open(const struct model *m, uint32_t threads)
{
	struct moe_engine_options eopt = { .backend = "cpu", .threads = threads };
	struct moe_err err = {0};
	struct moe_engine *e;
	int rc = moe_engine_open(m->t.store, &eopt, &e, &err);

	ck_assert_msg(rc == 0, "%s: engine open (threads %u) failed: %d %s", m->what, threads, rc,
		      err.msg);
	return e;
}

/* Outputs of one forward call, owned. */
struct result {
	size_t n;
	float *out;
	int32_t *ids;
	float *w;
};

static struct result run(struct moe_engine *e, const struct model *m, const float *x, size_t n)
{
	struct result r = {
		.n = n,
		.out = malloc(sizeof(float) * n * m->t.H),
		.ids = malloc(sizeof(int32_t) * n * m->t.k),
		.w = malloc(sizeof(float) * n * m->t.k),
	};
	struct moe_err err = {0};
	int rc;

	ck_assert(r.out && r.ids && r.w);
	rc = moe_engine_forward(e, LAYER, x, n, r.out, r.ids, r.w, 0, &err);
	ck_assert_msg(rc == 0, "%s: forward of %zu tokens failed: %d %s", m->what, n, rc, err.msg);
	return r;
}

static void result_free(struct result *r)
{
	free(r->out);
	free(r->ids);
	free(r->w);
}

/* Token @i of @got must equal token @j of @want, bit for bit. */
static void assert_same_token(const struct model *m, const struct result *got, size_t i,
			      const struct result *want, size_t j, const char *how)
{
	const float *a = got->out + i * m->t.H, *b = want->out + j * m->t.H;

	if (memcmp(a, b, sizeof(float) * m->t.H) != 0) {
		uint32_t h = 0;

		while (h < m->t.H && !memcmp(a + h, b + h, sizeof(float)))
			h++;
		ck_abort_msg("%s: %s: token at %zu of %zu differs from the reference run "
			     "(token %zu of %zu): out[%u] = %.9g vs %.9g", m->what, how, i, got->n,
			     j, want->n, h, (double)a[h], (double)b[h]);
	}
	ck_assert_msg(!memcmp(got->ids + i * m->t.k, want->ids + j * m->t.k, sizeof(int32_t) * m->t.k),
		      "%s: %s: token at %zu: expert ids differ (first %d vs %d)", m->what, how, i,
		      got->ids[i * m->t.k], want->ids[j * m->t.k]);
	ck_assert_msg(!memcmp(got->w + i * m->t.k, want->w + j * m->t.k, sizeof(float) * m->t.k),
		      "%s: %s: token at %zu: routing weights differ (first %.9g vs %.9g)", m->what,
		      how, i, (double)got->w[i * m->t.k], (double)want->w[j * m->t.k]);
}

static float *random_tokens(size_t n, uint32_t H, uint64_t seed)
{
	float *x = malloc(sizeof(float) * n * H);

	ck_assert_ptr_nonnull(x);
	for (size_t i = 0; i < n * H; i++)
		x[i] = (float)moe_test_randf(&seed);
	return x;
}

START_TEST(token_output_is_independent_of_position_and_batch_mates)
{
	static const size_t mates[] = { 2, 17, 256, 4096 };
	struct model m;

	model_make(&m, _i);
	struct moe_engine *e = engine_open(&m, 2);
	float *probe = random_tokens(1, m.t.H, 1234);
	struct result alone = run(e, &m, probe, 1);

	for (size_t s = 0; s < sizeof(mates) / sizeof(mates[0]); s++) {
		size_t n = mates[s] + 1;
		/* positions: first, one in, the middle, the last */
		size_t pos[] = { 0, 1, n / 2, n - 1 };

		for (size_t p = 0; p < 4; p++) {
			/* different batch mates for every position */
			float *x = random_tokens(n, m.t.H, 1000 * s + p + 1);
			char how[96];
			struct result r;

			memcpy(x + pos[p] * m.t.H, probe, sizeof(float) * m.t.H);
			r = run(e, &m, x, n);
			snprintf(how, sizeof(how), "with %zu other tokens, at position %zu", n - 1,
				 pos[p]);
			assert_same_token(&m, &r, pos[p], &alone, 0, how);
			result_free(&r);
			free(x);
		}
	}
	/* a batch made only of copies of the token: every copy is the same */
	{
		size_t n = 33;
		float *x = malloc(sizeof(float) * n * m.t.H);
		struct result r;

		for (size_t t = 0; t < n; t++)
			memcpy(x + t * m.t.H, probe, sizeof(float) * m.t.H);
		r = run(e, &m, x, n);
		for (size_t t = 0; t < n; t++)
			assert_same_token(&m, &r, t, &alone, 0, "in a batch of 33 copies of itself");
		result_free(&r);
		free(x);
	}
	result_free(&alone);
	free(probe);
	moe_engine_close(e);
	moe_test_model_free(&m.t);
}
END_TEST

START_TEST(every_token_of_a_batch_matches_the_same_token_in_sub_batches)
{
	/* one batch of 300, then the same tokens in pieces of 1, 17, 45, 237 */
	static const size_t pieces[] = { 1, 17, 45, 237 };
	struct model m;

	model_make(&m, _i);
	struct moe_engine *e = engine_open(&m, 2);
	float *x = random_tokens(300, m.t.H, 99);
	struct result all = run(e, &m, x, 300);
	size_t at = 0;

	for (size_t p = 0; p < sizeof(pieces) / sizeof(pieces[0]); p++) {
		struct result r = run(e, &m, x + at * m.t.H, pieces[p]);
		char how[64];

		snprintf(how, sizeof(how), "in a piece of %zu tokens", pieces[p]);
		for (size_t t = 0; t < pieces[p]; t++)
			assert_same_token(&m, &r, t, &all, at + t, how);
		at += pieces[p];
		result_free(&r);
	}
	ck_assert_uint_eq(at, 300);
	result_free(&all);
	free(x);
	moe_engine_close(e);
	moe_test_model_free(&m.t);
}
END_TEST

START_TEST(repeated_runs_give_identical_bits)
{
	struct model m;

	model_make(&m, _i);
	struct moe_engine *e = engine_open(&m, 2);
	float *x = random_tokens(256, m.t.H, 7);
	struct result first = run(e, &m, x, 256);

	for (int rep = 0; rep < 3; rep++) {
		struct result r = run(e, &m, x, 256);

		for (size_t t = 0; t < 256; t++)
			assert_same_token(&m, &r, t, &first, t, "run again");
		result_free(&r);
	}
	/* and through a second engine on the same store */
	{
		struct moe_engine *e2 = engine_open(&m, 2);
		struct result r = run(e2, &m, x, 256);

		for (size_t t = 0; t < 256; t++)
			assert_same_token(&m, &r, t, &first, t, "in a second engine");
		result_free(&r);
		moe_engine_close(e2);
	}
	result_free(&first);
	free(x);
	moe_engine_close(e);
	moe_test_model_free(&m.t);
}
END_TEST

START_TEST(thread_count_does_not_change_output_bits)
{
	static const uint32_t threads[] = { 2, 3, 4 };
	struct model m;

	model_make(&m, _i);
	float *x = random_tokens(300, m.t.H, 8);
	struct moe_engine *e1 = engine_open(&m, 1);
	struct result one = run(e1, &m, x, 300);

	moe_engine_close(e1);
	for (size_t i = 0; i < sizeof(threads) / sizeof(threads[0]); i++) {
		struct moe_engine *e = engine_open(&m, threads[i]);
		struct result r = run(e, &m, x, 300);
		char how[48];

		snprintf(how, sizeof(how), "with %u threads instead of 1", threads[i]);
		for (size_t t = 0; t < 300; t++)
			assert_same_token(&m, &r, t, &one, t, how);
		result_free(&r);
		moe_engine_close(e);
	}
	result_free(&one);
	free(x);
	moe_test_model_free(&m.t);
}
END_TEST

static Suite *invariance_suite(void)
{
	Suite *s = suite_create("invariance");
	TCase *tc = tcase_create("cpu");

	/* each test runs for model 0 (deepseek_v3 bf16) and 1 (mixtral f32) */
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, token_output_is_independent_of_position_and_batch_mates, 0, 6);
	tcase_add_loop_test(tc, every_token_of_a_batch_matches_the_same_token_in_sub_batches, 0, 6);
	tcase_add_loop_test(tc, repeated_runs_give_identical_bits, 0, 6);
	tcase_add_loop_test(tc, thread_count_does_not_change_output_bits, 0, 6);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(invariance_suite(), "invariance");
}
