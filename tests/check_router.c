/* SPDX-License-Identifier: MIT */
/*
 * The router, through the CPU backend's route op, against the float64
 * reference (ref.c) and against hand-made cases whose answer is known:
 * ties, group-limited selection near ties, DeepSeek-V3's -inf masking and
 * correction bias, normalisation and scaling rules (ARCHITECTURE.md 4.1).
 */
#include "config.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "engine/model.h"
#include "ref.h"
#include "testutil.h"

/* Tokens closer than this to a tie are exempt (the numerical contract). */
#define TIE_MARGIN 1e-6
/* Relative tolerance on a combine weight. */
#define WEIGHT_RTOL 1e-5

static struct moe_backend *be;

static void backend_setup(void)
{
	struct moe_backend_options opt = { .threads = 1 };
	struct moe_err err = {0};
	int rc = moe_backend_open("cpu", &opt, &be, &err);

	ck_assert_msg(rc == 0, "moe_backend_open(cpu): %d %s", rc, err.msg);
}

static void backend_teardown(void)
{
	moe_backend_close(be);
	be = NULL;
}

/* A model config as the checkpoint parser would fill it for @arch. */
static struct moe_model_config make_cfg(enum moe_arch arch, uint32_t E, uint32_t k, uint32_t H)
{
	struct moe_model_config c = {
		.arch = arch,
		.hidden_size = H,
		.moe_intermediate_size = 16,
		.num_experts = E,
		.top_k = k,
		.num_hidden_layers = 1,
		.n_group = 1,
		.topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX,
		.topk_method = MOE_TOPK_GREEDY,
		.norm_topk_prob = arch == MOE_ARCH_MIXTRAL,
		.gated = true,
		.act = MOE_ACT_SILU,
		.routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_F32,
		.shared_dtype = MOE_DTYPE_F32,
	};

	if (arch == MOE_ARCH_DEEPSEEK_V3) {
		c.scoring = MOE_SCORING_SIGMOID;
		c.topk_method = MOE_TOPK_NOAUX_TC;
		c.has_bias = true;
		c.norm_topk_prob = true;
		c.routed_scaling_factor = 2.5f;
	}
	if (arch == MOE_ARCH_GLM4_MOE) {
		/* Glm4MoeConfig's defaults */
		c.scoring = MOE_SCORING_SIGMOID;
		c.topk_method = MOE_TOPK_NOAUX_TC;
		c.has_bias = true;
		c.norm_topk_prob = true;
	}
	if (arch == MOE_ARCH_GPT_OSS) {
		/* GptOssConfig: router bias, expert biases, clamped SwiGLU */
		c.has_bias = true;
		c.has_expert_bias = true;
		c.norm_topk_prob = true;
		c.act = MOE_ACT_SWIGLU_OAI;
		c.swiglu_alpha = 1.702f;
		c.swiglu_limit = 7.0f;
	}
	return c;
}

static struct ref_routing routing_of(const struct moe_model_config *c)
{
	struct ref_routing r = {
		.arch = c->arch,
		.num_experts = c->num_experts,
		.top_k = c->top_k,
		.n_group = c->n_group,
		.topk_group = c->topk_group,
		.group_limited = c->topk_method == MOE_TOPK_GROUP_LIMITED,
		.norm_topk_prob = c->norm_topk_prob,
		.routed_scaling_factor = c->routed_scaling_factor,
	};

	return r;
}

/* Route @n tokens through the backend's route op; it must succeed. */
static void route_raw(const struct moe_model_config *cfg, const float *router, const float *bias,
		      const float *x, size_t n, int32_t *ids, float *w)
{
	struct moe_layer_weights lw = { .cfg = cfg, .router = router, .bias = bias };
	int rc = be->ops->route(be, &lw, x, n, ids, w, 0);

	ck_assert_msg(rc == 0, "route(%s, n=%zu) failed: %d", moe_arch_name(cfg->arch), n, rc);
}

/*
 * Route @n tokens through the backend into ids[n*k], w[n*k], and compare
 * each token with the reference: the same experts (as a set) and weights
 * within WEIGHT_RTOL, unless the token is within TIE_MARGIN of a tie.
 * Returns the number of tokens exempted.
 */
static size_t route_and_compare(const struct moe_model_config *cfg, const float *router,
				const float *bias, const float *x, size_t n, int32_t *ids, float *w)
{
	struct ref_routing r = routing_of(cfg);
	uint32_t k = cfg->top_k, H = cfg->hidden_size;
	int32_t rid[REF_MAX_EXPERTS];
	double rw[REF_MAX_EXPERTS], margin;
	size_t exempt = 0;
	char msg[256];

	route_raw(cfg, router, bias, x, n, ids, w);
	for (size_t t = 0; t < n; t++) {
		for (uint32_t s = 0; s < k; s++)
			ck_assert_msg(isfinite(w[t * k + s]), "%s token %zu slot %u: weight %g is not "
				      "finite", moe_arch_name(cfg->arch), t, s, (double)w[t * k + s]);
		ref_route_f32(&r, router, bias, H, x + t * H, rid, rw, &margin);
		if (margin < TIE_MARGIN) {
			exempt++;
			continue;
		}
		ck_assert_msg(ref_routing_diff(k, ids + t * k, w + t * k, rid, rw, WEIGHT_RTOL, msg,
					       sizeof(msg)) == 0,
			      "%s token %zu (margin %.3g): %s", moe_arch_name(cfg->arch), t, margin, msg);
	}
	return exempt;
}

/* x = the unit vector e_0 of length H, so that logit e = router[e][0]. */
static float *unit_x(uint32_t H)
{
	float *x = calloc(H, sizeof(float));

	ck_assert_ptr_nonnull(x);
	x[0] = 1.0f;
	return x;
}

/* Router rows whose first column holds @logits (the other columns random,
 * irrelevant for x = e_0). */
static float *router_with_logits(uint32_t E, uint32_t H, const float *logits, uint64_t seed)
{
	float *r = malloc(sizeof(float) * E * H);

	ck_assert_ptr_nonnull(r);
	for (uint32_t e = 0; e < E; e++) {
		r[(size_t)e * H] = logits[e];
		for (uint32_t h = 1; h < H; h++)
			r[(size_t)e * H + h] = (float)moe_test_randf(&seed);
	}
	return r;
}

static void assert_ids(const int32_t *got, const int32_t *want, uint32_t k, const char *what)
{
	for (uint32_t s = 0; s < k; s++)
		ck_assert_msg(got[s] == want[s], "%s: slot %u is expert %d, expected %d", what, s,
			      got[s], want[s]);
}

/* ---- ties ------------------------------------------------------------- */

START_TEST(identical_router_rows_tie_to_the_lower_expert_index)
{
	const uint32_t E = 8, H = 24;
	uint64_t seed = 11;
	float *router = malloc(sizeof(float) * E * H), *x = malloc(sizeof(float) * H);
	int32_t ids[8];
	float w[8];

	for (uint32_t i = 0; i < E * H; i++)
		router[i] = (float)moe_test_randf(&seed) * 0.1f;
	for (uint32_t h = 0; h < H; h++)
		x[h] = (float)moe_test_randf(&seed);
	/* rows 3 and 5 identical and far ahead of the rest */
	for (uint32_t h = 0; h < H; h++)
		router[3 * H + h] = router[5 * H + h] = x[h];

	struct moe_model_config c = make_cfg(MOE_ARCH_MIXTRAL, E, 2, H);
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 3, 5 }, 2, "mixtral, rows 3 = 5 best");
	ck_assert_msg(w[0] == w[1], "tied experts got weights %.9g and %.9g", (double)w[0],
		      (double)w[1]);

	/* k = 1: only the lower index of the tied pair */
	c.top_k = 1;
	route_raw(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(ids[0] == 3, "k=1 with rows 3 = 5 best chose %d, expected 3", ids[0]);

	/* the same for deepseek_v3 with equal bias */
	float bias[8] = { 0 };
	c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 1, H);
	route_raw(&c, router, bias, x, 1, ids, w);
	ck_assert_msg(ids[0] == 3, "deepseek_v3 k=1 with rows 3 = 5 best chose %d, expected 3",
		      ids[0]);
	free(router);
	free(x);
}
END_TEST

START_TEST(ties_far_apart_in_the_expert_list_still_go_to_the_lower_index)
{
	/* 160 experts: rows 7, 100 and 150 identical and best, so their float32
	 * logits are equal however the router blocks the experts */
	const uint32_t E = 160, H = 40;
	uint64_t seed = 12;
	float *router = malloc(sizeof(float) * E * H), *x = malloc(sizeof(float) * H);
	int32_t ids[4];
	float w[4];

	for (uint32_t i = 0; i < E * H; i++)
		router[i] = (float)moe_test_randf(&seed) * 0.05f;
	for (uint32_t h = 0; h < H; h++)
		x[h] = (float)moe_test_randf(&seed);
	for (uint32_t h = 0; h < H; h++)
		router[150 * H + h] = router[100 * H + h] = router[7 * H + h] = x[h];

	struct moe_model_config c = make_cfg(MOE_ARCH_QWEN2_MOE, E, 2, H);
	route_raw(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 7, 100 }, 2, "qwen2_moe, rows 7 = 100 = 150 best");

	c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 1, H);
	c.n_group = 8;
	c.topk_group = 2;
	c.topk_method = MOE_TOPK_GROUP_LIMITED;
	route_raw(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(ids[0] == 7, "deepseek_v2 grouped k=1 chose %d, expected 7", ids[0]);
	free(router);
	free(x);
}
END_TEST

START_TEST(several_ties_fill_the_top_k_from_the_lowest_indices)
{
	const uint32_t E = 16, H = 8;
	float logits[16];
	int32_t ids[16];
	float w[16];
	float *x = unit_x(H), *router;

	for (uint32_t e = 0; e < E; e++)
		logits[e] = -1.0f - 0.01f * (float)e;
	/* four-way tie for the best: 2, 6, 9, 14; then a three-way tie: 1, 4, 12 */
	logits[2] = logits[6] = logits[9] = logits[14] = 3.0f;
	logits[1] = logits[4] = logits[12] = 2.0f;
	router = router_with_logits(E, H, logits, 5);

	struct moe_model_config c = make_cfg(MOE_ARCH_MIXTRAL, E, 3, H);
	route_raw(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 2, 6, 9 }, 3, "mixtral k=3 of a 4-way tie");

	c = make_cfg(MOE_ARCH_QWEN3_MOE, E, 6, H);
	route_raw(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 2, 6, 9, 14, 1, 4 }, 6, "qwen3 k=6 across two ties");
	ck_assert(w[0] == w[1] && w[1] == w[2] && w[2] == w[3] && w[4] == w[5]);

	c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 5, H);
	route_raw(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 2, 6, 9, 14, 1 }, 5, "deepseek_v2 k=5 across two ties");
	free(router);
	free(x);
}
END_TEST

START_TEST(tied_groups_keep_the_lower_group_index)
{
	/* deepseek_v3: 4 groups of 4, groups 1 and 3 identical and best,
	 * topk_group 1: group 1 must be kept. */
	const uint32_t E = 16, H = 8;
	float logits[16], bias[16] = { 0 };
	int32_t ids[16];
	float w[16];
	float *x = unit_x(H), *router;

	for (uint32_t e = 0; e < E; e++)
		logits[e] = -2.0f + 0.05f * (float)(e % 4);
	for (uint32_t j = 0; j < 4; j++)
		logits[4 + j] = logits[12 + j] = 1.0f + 0.25f * (float)j;
	router = router_with_logits(E, H, logits, 6);

	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 2, H);
	c.n_group = 4;
	c.topk_group = 1;
	route_raw(&c, router, bias, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 7, 6 }, 2, "deepseek_v3 tied groups 1 and 3");

	c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 2, H);
	c.n_group = 4;
	c.topk_group = 1;
	c.topk_method = MOE_TOPK_GROUP_LIMITED;
	route_raw(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 7, 6 }, 2, "deepseek_v2 tied groups 1 and 3");
	free(router);
	free(x);
}
END_TEST

/* ---- top_k == E -------------------------------------------------------- */

START_TEST(top_k_equal_to_num_experts_chooses_every_expert_best_first)
{
	const uint32_t E = 8, H = 40, n = 32;
	uint64_t seed = 21;
	float *router = malloc(sizeof(float) * E * H), *x = malloc(sizeof(float) * H * n);
	int32_t *ids = malloc(sizeof(int32_t) * E * n);
	float *w = malloc(sizeof(float) * E * n);
	static const enum moe_arch archs[] = { MOE_ARCH_MIXTRAL, MOE_ARCH_QWEN2_MOE,
					       MOE_ARCH_DEEPSEEK_V2, MOE_ARCH_DEEPSEEK_V3 };
	float bias[8];

	for (uint32_t i = 0; i < E * H; i++)
		router[i] = (float)moe_test_randf(&seed) * 0.3f;
	for (uint32_t i = 0; i < H * n; i++)
		x[i] = (float)moe_test_randf(&seed);
	for (uint32_t e = 0; e < E; e++)
		bias[e] = (float)moe_test_randf(&seed) * 0.1f;

	for (size_t a = 0; a < sizeof(archs) / sizeof(archs[0]); a++) {
		struct moe_model_config c = make_cfg(archs[a], E, E, H);
		bool v3 = archs[a] == MOE_ARCH_DEEPSEEK_V3;

		if (v3) {
			c.n_group = 4;
			c.topk_group = 4;
		}
		route_and_compare(&c, router, v3 ? bias : NULL, x, n, ids, w);
		for (size_t t = 0; t < n; t++) {
			unsigned seen = 0;
			double sum = 0.0;

			for (uint32_t s = 0; s < E; s++) {
				seen |= 1u << ids[t * E + s];
				sum += w[t * E + s];
				if (s > 0 && !v3)
					ck_assert_msg(w[t * E + s] <= w[t * E + s - 1],
						      "%s token %zu: slot %u weight %g above slot %u's %g",
						      moe_arch_name(archs[a]), t, s, (double)w[t * E + s],
						      s - 1, (double)w[t * E + s - 1]);
			}
			ck_assert_msg(seen == 0xffu, "%s token %zu: not every expert chosen (mask %#x)",
				      moe_arch_name(archs[a]), t, seen);
			if (archs[a] == MOE_ARCH_MIXTRAL || archs[a] == MOE_ARCH_QWEN2_MOE ||
			    archs[a] == MOE_ARCH_DEEPSEEK_V2)
				ck_assert_msg(fabs(sum - 1.0) < 1e-5, "%s token %zu: weights sum to %.9g",
					      moe_arch_name(archs[a]), t, sum);
			else
				ck_assert_msg(fabs(sum - 2.5) < 1e-5, "%s token %zu: weights sum to %.9g",
					      moe_arch_name(archs[a]), t, sum);
		}
	}
	free(router);
	free(x);
	free(ids);
	free(w);
}
END_TEST

/* ---- group-limited selection ------------------------------------------ */

START_TEST(group_limited_greedy_keeps_groups_by_max_even_when_near_tied)
{
	/* deepseek_v2, 4 groups of 4, keep 2, k = 3.  Group maxima (logits):
	 * g1 2 + 1e-3, g2 2 + 1e-5, g3 2, g0 1.  Plain greedy would take g3's
	 * 2.0 and g3's 1.9; group-limited must take g1's and g2's maxima and
	 * the best remaining expert of g1/g2 (1.5 in g2). */
	const uint32_t E = 16, H = 8;
	float logits[16] = {
		1.0f, 0.5f, 0.4f, 0.3f,          /* g0 */
		0.2f, 2.0f + 1e-3f, 1.2f, 0.1f,  /* g1 */
		1.5f, 0.0f, 2.0f + 1e-5f, 0.9f,  /* g2 */
		1.9f, 2.0f, 1.8f, 1.7f,          /* g3 */
	};
	int32_t ids[16];
	float w[16];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 7);

	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 3, H);
	c.n_group = 4;
	c.topk_group = 2;
	c.topk_method = MOE_TOPK_GROUP_LIMITED;
	ck_assert_uint_eq(route_and_compare(&c, router, NULL, x, 1, ids, w), 0);
	assert_ids(ids, (const int32_t[]){ 5, 10, 8 }, 3, "group-limited, maxima 1e-3/1e-5 apart");

	/* now g3 ahead of g2 by 1e-5: g1 and g3 kept */
	logits[13] = 2.0f + 2e-5f;
	free(router);
	router = router_with_logits(E, H, logits, 7);
	ck_assert_uint_eq(route_and_compare(&c, router, NULL, x, 1, ids, w), 0);
	assert_ids(ids, (const int32_t[]){ 5, 13, 12 }, 3, "group-limited, g3 ahead by 1e-5");

	/* the same logits with plain greedy */
	c.topk_method = MOE_TOPK_GREEDY;
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 5, 13, 10 }, 3, "greedy ignores groups");
	free(router);
	free(x);
}
END_TEST

START_TEST(deepseek_v3_groups_score_the_sum_of_the_two_best_near_tied)
{
	/* 4 groups of 4, keep 2, k = 2, no bias.  Group score = sum of the two
	 * highest sigmoid scores.  g0 holds the single best expert but a weak
	 * second; g1 and g2 have two strong experts; their sums differ from
	 * g3's by ~1e-3 and ~1e-5 (in sigmoid space). */
	const uint32_t E = 16, H = 8;
	float logits[16], bias[16] = { 0 };
	int32_t ids[16];
	float w[16];
	float *x = unit_x(H), *router;

	for (uint32_t e = 0; e < E; e++)
		logits[e] = -4.0f;
	logits[0] = 4.0f;                      /* g0: 0.982 + 0.018 = 1.0 */
	logits[5] = 1.0f;  logits[6] = 1.0f + 4e-3f;   /* g1 */
	logits[9] = 1.0f;  logits[10] = 1.0f + 5e-5f;  /* g2 */
	logits[13] = 1.0f; logits[14] = 1.0f;          /* g3 */
	router = router_with_logits(E, H, logits, 8);

	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 2, H);
	c.n_group = 4;
	c.topk_group = 2;
	ck_assert_uint_eq(route_and_compare(&c, router, bias, x, 1, ids, w), 0);
	assert_ids(ids, (const int32_t[]){ 6, 10 }, 2, "deepseek_v3 groups 1e-3 / 1e-5 apart");

	/* the bias puts group 3 ~2e-5 ahead of group 2 */
	bias[14] = 3e-5f;
	ck_assert_uint_eq(route_and_compare(&c, router, bias, x, 1, ids, w), 0);
	assert_ids(ids, (const int32_t[]){ 6, 14 }, 2, "deepseek_v3 bias moves group 3 ahead");
	free(router);
	free(x);
}
END_TEST

/* ---- deepseek_v3 specifics --------------------------------------------- */

START_TEST(deepseek_v3_masks_dropped_groups_with_neg_inf)
{
	/* 4 groups of 2, keep 2, k = 4.  Groups 0 and 1 are kept (one expert
	 * with a big positive bias each), but their other experts have a
	 * negative biased score.  With Hugging Face's 0.0 masking the
	 * dropped experts (0.0) would beat them; with DeepSeek's -inf the
	 * four experts of the kept groups are chosen. */
	const uint32_t E = 8, H = 8, n = 16;
	float bias[8] = { 3.0f, -2.0f, 3.0f, -2.0f, -1.0f, -1.0f, -1.0f, -1.0f };
	uint64_t seed = 31;
	float *router = malloc(sizeof(float) * E * H), *x = malloc(sizeof(float) * H * n);
	int32_t ids[8 * 16];
	float w[8 * 16];

	for (uint32_t i = 0; i < E * H; i++)
		router[i] = (float)moe_test_randf(&seed);
	for (uint32_t i = 0; i < H * n; i++)
		x[i] = (float)moe_test_randf(&seed);

	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 4, H);
	c.n_group = 4;
	c.topk_group = 2;
	route_and_compare(&c, router, bias, x, n, ids, w);
	for (size_t t = 0; t < n; t++) {
		double sum = 0.0;

		for (uint32_t s = 0; s < 4; s++) {
			ck_assert_msg(ids[t * 4 + s] >= 0 && ids[t * 4 + s] < 4,
				      "token %zu slot %u: expert %d is in a dropped group", t, s,
				      ids[t * 4 + s]);
			sum += w[t * 4 + s];
		}
		ck_assert_msg(fabs(sum - 2.5) < 1e-5, "token %zu: weights sum to %.9g, expected 2.5",
			      t, sum);
		/* best first on biased score: the +3 experts lead */
		ck_assert_msg((ids[t * 4] == 0 || ids[t * 4] == 2) &&
			      (ids[t * 4 + 1] == 0 || ids[t * 4 + 1] == 2),
			      "token %zu: first slots %d %d, expected experts 0 and 2", t,
			      ids[t * 4], ids[t * 4 + 1]);
	}
	free(router);
	free(x);
}
END_TEST

START_TEST(deepseek_v3_bias_changes_selection_but_weights_use_unbiased_scores)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 2.0f, 1.5f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, -1.5f };
	float bias[8] = { 0, 0, 0, 0, 0, 2.0f, 1.9f, 0 };
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 9);
	double p5 = 1.0 / (1.0 + exp(0.5)), p6 = 1.0 / (1.0 + exp(1.0));

	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 2, H);
	c.routed_scaling_factor = 2.5f;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 5, 6 }, 2, "bias lifts experts 5 and 6");
	ck_assert_msg(fabs(w[0] - 2.5 * p5 / (p5 + p6)) < 1e-6 && fabs(w[1] - 2.5 * p6 / (p5 + p6)) < 1e-6,
		      "weights %.9g %.9g, expected %.9g %.9g (unbiased, normalised, x2.5)",
		      (double)w[0], (double)w[1], 2.5 * p5 / (p5 + p6), 2.5 * p6 / (p5 + p6));

	/* without normalisation: 2.5 * sigmoid, still unbiased */
	c.norm_topk_prob = false;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	ck_assert_msg(fabs(w[0] - 2.5 * p5) < 1e-6 && fabs(w[1] - 2.5 * p6) < 1e-6,
		      "weights %.9g %.9g, expected %.9g %.9g (2.5 * unbiased sigmoid)",
		      (double)w[0], (double)w[1], 2.5 * p5, 2.5 * p6);
	free(router);
	free(x);
}
END_TEST

/* ---- normalisation and scaling ------------------------------------------ */

static void softmax_double(const float *l, uint32_t E, double *p)
{
	double z = 0.0;

	for (uint32_t e = 0; e < E; e++)
		z += exp((double)l[e]);
	for (uint32_t e = 0; e < E; e++)
		p[e] = exp((double)l[e]) / z;
}

START_TEST(norm_topk_prob_renormalises_only_when_set)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 0.3f, 1.7f, -0.2f, 1.1f, 0.0f, 0.9f, -1.0f, 0.4f };
	double p[8];
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 10);
	static const enum moe_arch archs[] = { MOE_ARCH_QWEN2_MOE, MOE_ARCH_QWEN3_MOE,
					       MOE_ARCH_OLMOE };

	softmax_double(logits, E, p);
	for (size_t a = 0; a < 3; a++) {
		struct moe_model_config c = make_cfg(archs[a], E, 3, H);

		c.norm_topk_prob = false;
		route_and_compare(&c, router, NULL, x, 1, ids, w);
		assert_ids(ids, (const int32_t[]){ 1, 3, 5 }, 3, moe_arch_name(archs[a]));
		ck_assert_msg(fabs(w[0] - p[1]) < 1e-6 && fabs(w[2] - p[5]) < 1e-6,
			      "%s without norm_topk_prob: weights %.9g .. %.9g, expected softmax %.9g .. %.9g",
			      moe_arch_name(archs[a]), (double)w[0], (double)w[2], p[1], p[5]);
		c.norm_topk_prob = true;
		route_and_compare(&c, router, NULL, x, 1, ids, w);
		ck_assert_msg(fabs(w[0] + w[1] + w[2] - 1.0) < 1e-6,
			      "%s with norm_topk_prob: weights sum to %.9g", moe_arch_name(archs[a]),
			      (double)(w[0] + w[1] + w[2]));
	}
	/* mixtral always renormalises */
	struct moe_model_config c = make_cfg(MOE_ARCH_MIXTRAL, E, 3, H);
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(fabs(w[0] - p[1] / (p[1] + p[3] + p[5])) < 1e-6, "mixtral weight %.9g, expected %.9g",
		      (double)w[0], p[1] / (p[1] + p[3] + p[5]));
	free(router);
	free(x);
}
END_TEST

START_TEST(deepseek_v2_scales_only_when_not_normalising)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 0.3f, 1.7f, -0.2f, 1.1f, 0.0f, 0.9f, -1.0f, 0.4f };
	double p[8];
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 12);

	softmax_double(logits, E, p);
	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 3, H);
	c.routed_scaling_factor = 16.0f;
	c.norm_topk_prob = true;
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(fabs(w[0] + w[1] + w[2] - 1.0) < 1e-6,
		      "deepseek_v2 normalised: weights sum to %.9g, expected 1 (no scaling)",
		      (double)(w[0] + w[1] + w[2]));

	c.norm_topk_prob = false;
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	for (uint32_t s = 0; s < 3; s++)
		ck_assert_msg(fabs(w[s] - 16.0 * p[ids[s]]) < 1e-5 * 16.0 * p[ids[s]],
			      "deepseek_v2 not normalised: slot %u weight %.9g, expected 16 * %.9g",
			      s, (double)w[s], p[ids[s]]);
	free(router);
	free(x);
}
END_TEST

START_TEST(deepseek_top_k_one_does_not_divide)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 0.3f, 1.7f, -0.2f, 1.1f, 0.0f, 0.9f, -1.0f, 0.4f };
	float bias[8] = { 0 };
	double p[8];
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 13);

	softmax_double(logits, E, p);
	struct moe_model_config c = make_cfg(MOE_ARCH_DEEPSEEK_V2, E, 1, H);
	c.norm_topk_prob = true;
	c.routed_scaling_factor = 16.0f;
	route_and_compare(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(ids[0] == 1 && fabs(w[0] - 16.0 * p[1]) < 1e-5 * 16.0 * p[1],
		      "deepseek_v2 k=1 norm: expert %d weight %.9g, expected 1 and 16 * %.9g",
		      ids[0], (double)w[0], p[1]);

	c = make_cfg(MOE_ARCH_DEEPSEEK_V3, E, 1, H);
	c.norm_topk_prob = true;
	c.routed_scaling_factor = 2.5f;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	double s1 = 1.0 / (1.0 + exp(-1.7));
	ck_assert_msg(ids[0] == 1 && fabs(w[0] - 2.5 * s1) < 1e-6,
		      "deepseek_v3 k=1 norm: expert %d weight %.9g, expected 1 and 2.5 * %.9g",
		      ids[0], (double)w[0], s1);
	free(router);
	free(x);
}
END_TEST

/* glm4_moe divides by the sum whenever norm_topk_prob, even for one expert
 * (transformers' Glm4MoeMoE has no top_k > 1 test): the one weight is the
 * scaling factor, where deepseek_v3 gives scaling x sigmoid. */
START_TEST(glm4_moe_top_k_one_still_normalises)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 0.3f, 1.7f, -0.2f, 1.1f, 0.0f, 0.9f, -1.0f, 0.4f };
	float bias[8] = { 0, 0, 0, 0, 0, 0, 0, 0.5f };
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 16);
	struct moe_model_config c = make_cfg(MOE_ARCH_GLM4_MOE, E, 1, H);

	c.routed_scaling_factor = 2.5f;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	/* the bias makes expert 7 (sigmoid 0.4 + 0.5 = 1.099) beat expert 1 (0.846) */
	ck_assert_msg(ids[0] == 7 && fabs(w[0] - 2.5) < 1e-6,
		      "glm4_moe k=1 norm: expert %d weight %.9g, expected 7 and 2.5", ids[0], (double)w[0]);

	c.norm_topk_prob = false;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	double s7 = 1.0 / (1.0 + exp(-0.4));
	ck_assert_msg(ids[0] == 7 && fabs(w[0] - 2.5 * s7) < 1e-6,
		      "glm4_moe k=1 without norm: expert %d weight %.9g, expected 7 and 2.5 * %.9g",
		      ids[0], (double)w[0], s7);
	free(router);
	free(x);
}
END_TEST

/* gpt_oss (GptOssTopKRouter): the bias is added to the logits before the
 * top-k, and the weights are the softmax of the k chosen biased logits. */
START_TEST(gpt_oss_weights_are_the_softmax_of_the_top_k_biased_logits)
{
	const uint32_t E = 8, H = 8;
	float logits[8] = { 2.0f, 1.5f, 1.0f, 0.5f, 0.0f, -0.5f, -1.0f, -1.5f };
	/* biased: 2.0 1.5 1.0 0.5 0.0 1.5 0.9 -1.5 (5 ties 1 exactly) */
	float bias[8] = { 0, 0, 0, 0, 0, 2.0f, 0.1f, 0 };
	int32_t ids[8];
	float w[8];
	float *x = unit_x(H), *router = router_with_logits(E, H, logits, 17);
	double z = exp(0.0) + 2 * exp(-0.5) + exp(-1.0);

	struct moe_model_config c = make_cfg(MOE_ARCH_GPT_OSS, E, 4, H);
	route_and_compare(&c, router, bias, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 0, 1, 5, 2 }, 4, "gpt_oss, bias lifts expert 5 to tie 1");
	ck_assert_msg(fabs(w[0] - 1.0 / z) < 1e-6 && fabs(w[1] - exp(-0.5) / z) < 1e-6 &&
		      w[1] == w[2] && fabs(w[3] - exp(-1.0) / z) < 1e-6,
		      "gpt_oss k=4 weights %.9g %.9g %.9g %.9g, expected the softmax of 2, 1.5, 1.5, 1",
		      (double)w[0], (double)w[1], (double)w[2], (double)w[3]);

	/* k = 2: the tie at the edge goes to the lower index */
	c.top_k = 2;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	assert_ids(ids, (const int32_t[]){ 0, 1 }, 2, "gpt_oss k=2, experts 1 and 5 tied");
	ck_assert_msg(fabs(w[0] - 1.0 / (1.0 + exp(-0.5))) < 1e-6,
		      "gpt_oss k=2 weight %.9g, expected %.9g", (double)w[0], 1.0 / (1.0 + exp(-0.5)));

	/* k = 1: the softmax of one value, whatever the others are */
	c.top_k = 1;
	bias[3] = 5.0f;
	route_and_compare(&c, router, bias, x, 1, ids, w);
	ck_assert_msg(ids[0] == 3 && w[0] == 1.0f, "gpt_oss k=1: expert %d weight %.9g, expected 3 and 1",
		      ids[0], (double)w[0]);
	free(router);
	free(x);
}
END_TEST

/* ---- extreme logits ----------------------------------------------------- */

START_TEST(huge_logits_give_finite_weights)
{
	const uint32_t E = 16, H = 8;
	float logits[16];
	float bias[16] = { 0 };
	int32_t ids[16];
	float w[16];
	float *x = malloc(sizeof(float) * H), *router;

	/* logits up to +-3e9: exp() overflows without max subtraction */
	for (uint32_t e = 0; e < E; e++)
		logits[e] = (e % 2 ? 1.0f : -1.0f) * 1e4f * (float)(e + 1);
	router = router_with_logits(E, H, logits, 14);
	for (uint32_t h = 0; h < H; h++)
		x[h] = 0.0f;
	x[0] = 2e5f;

	static const enum moe_arch archs[] = { MOE_ARCH_MIXTRAL, MOE_ARCH_QWEN2_MOE,
					       MOE_ARCH_OLMOE, MOE_ARCH_DEEPSEEK_V2,
					       MOE_ARCH_DEEPSEEK_V3, MOE_ARCH_GPT_OSS };
	for (size_t a = 0; a < sizeof(archs) / sizeof(archs[0]); a++) {
		struct moe_model_config c = make_cfg(archs[a], E, 4, H);

		c.norm_topk_prob = true;
		route_raw(&c, router, c.has_bias ? bias : NULL, x, 1, ids, w);
		for (uint32_t s = 0; s < 4; s++)
			ck_assert_msg(isfinite(w[s]) && w[s] >= 0.0f,
				      "%s: slot %u weight %g with huge logits", moe_arch_name(archs[a]),
				      s, (double)w[s]);
		if (archs[a] != MOE_ARCH_DEEPSEEK_V3) {
			/* the top expert is 15 (logit 1.6e4 * 2e5) with weight 1 */
			ck_assert_msg(ids[0] == 15 && fabs(w[0] - 1.0) < 1e-6,
				      "%s: slot 0 is expert %d weight %.9g, expected 15 and 1",
				      moe_arch_name(archs[a]), ids[0], (double)w[0]);
		} else {
			/* sigmoid saturates: 8 experts at exactly 1.0, ties to the lower index */
			assert_ids(ids, (const int32_t[]){ 1, 3, 5, 7 }, 4, "deepseek_v3 saturated");
			ck_assert_msg(fabs(w[0] - 2.5 / 4) < 1e-6, "deepseek_v3 saturated weight %.9g",
				      (double)w[0]);
		}
	}
	/* huge negative logits everywhere: softmax of equal -huge values is uniform */
	for (uint32_t e = 0; e < E; e++)
		logits[e] = -3e4f;
	free(router);
	router = router_with_logits(E, H, logits, 15);
	struct moe_model_config c = make_cfg(MOE_ARCH_MIXTRAL, E, 2, H);
	route_raw(&c, router, NULL, x, 1, ids, w);
	ck_assert_msg(ids[0] == 0 && ids[1] == 1 && w[0] == 0.5f && w[1] == 0.5f,
		      "uniform -huge logits: experts %d %d weights %g %g", ids[0], ids[1],
		      (double)w[0], (double)w[1]);
	free(router);
	free(x);
}
END_TEST

/* ---- random cases against the reference ---------------------------------- */

START_TEST(random_tokens_route_as_the_reference_for_every_rule)
{
	struct rule {
		enum moe_arch arch;
		uint32_t E, k, n_group, topk_group;
		enum moe_topk_method method;
		bool norm;
		float rsf;
	};
	static const struct rule rules[] = {
		{ MOE_ARCH_MIXTRAL, 8, 2, 1, 1, MOE_TOPK_GREEDY, true, 1.0f },
		{ MOE_ARCH_QWEN2_MOE, 60, 4, 1, 1, MOE_TOPK_GREEDY, false, 1.0f },
		{ MOE_ARCH_QWEN3_MOE, 128, 8, 1, 1, MOE_TOPK_GREEDY, true, 1.0f },
		{ MOE_ARCH_OLMOE, 64, 8, 1, 1, MOE_TOPK_GREEDY, false, 1.0f },
		{ MOE_ARCH_DEEPSEEK_V2, 64, 6, 1, 1, MOE_TOPK_GREEDY, false, 1.0f },
		{ MOE_ARCH_DEEPSEEK_V2, 160, 6, 8, 3, MOE_TOPK_GROUP_LIMITED, false, 16.0f },
		{ MOE_ARCH_DEEPSEEK_V2, 32, 4, 4, 2, MOE_TOPK_GROUP_LIMITED, true, 16.0f },
		{ MOE_ARCH_DEEPSEEK_V3, 256, 8, 8, 4, MOE_TOPK_NOAUX_TC, true, 2.5f },
		{ MOE_ARCH_DEEPSEEK_V3, 64, 6, 8, 3, MOE_TOPK_NOAUX_TC, false, 1.5f },
		{ MOE_ARCH_DEEPSEEK_V3, 32, 4, 1, 1, MOE_TOPK_NOAUX_TC, true, 1.0f },
		/* GLM-4.5-Air, GLM-4.5, and groups that no release uses yet */
		{ MOE_ARCH_GLM4_MOE, 128, 8, 1, 1, MOE_TOPK_NOAUX_TC, true, 1.0f },
		{ MOE_ARCH_GLM4_MOE, 160, 8, 1, 1, MOE_TOPK_NOAUX_TC, true, 2.5f },
		{ MOE_ARCH_GLM4_MOE, 64, 6, 8, 3, MOE_TOPK_NOAUX_TC, false, 1.5f },
		{ MOE_ARCH_GLM4_MOE, 32, 1, 4, 2, MOE_TOPK_NOAUX_TC, true, 1.8f },
		/* gpt-oss-20b, gpt-oss-120b */
		{ MOE_ARCH_GPT_OSS, 32, 4, 1, 1, MOE_TOPK_GREEDY, true, 1.0f },
		{ MOE_ARCH_GPT_OSS, 128, 4, 1, 1, MOE_TOPK_GREEDY, true, 1.0f },
	};
	const uint32_t H = 72, n = 200;
	uint64_t seed = 41;
	float *x = malloc(sizeof(float) * H * n);

	for (uint32_t i = 0; i < H * n; i++)
		x[i] = (float)moe_test_randf(&seed);
	for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
		const struct rule *ru = &rules[i];
		struct moe_model_config c = make_cfg(ru->arch, ru->E, ru->k, H);
		float *router = malloc(sizeof(float) * ru->E * H);
		float *bias = malloc(sizeof(float) * ru->E);
		int32_t *ids = malloc(sizeof(int32_t) * ru->k * n);
		float *w = malloc(sizeof(float) * ru->k * n);
		size_t exempt;

		c.n_group = ru->n_group;
		c.topk_group = ru->topk_group;
		c.topk_method = ru->method;
		c.norm_topk_prob = ru->norm;
		c.routed_scaling_factor = ru->rsf;
		for (uint32_t j = 0; j < ru->E * H; j++)
			router[j] = (float)(moe_test_randf(&seed) * 0.2);
		for (uint32_t e = 0; e < ru->E; e++)
			bias[e] = (float)(moe_test_randf(&seed) * (ru->arch == MOE_ARCH_GPT_OSS ? 0.5 : 0.05));
		exempt = route_and_compare(&c, router, c.has_bias ? bias : NULL, x, n, ids, w);
		ck_assert_msg(exempt < n / 10, "rule %zu: %zu of %u tokens near a tie", i, exempt, n);
		free(router);
		free(bias);
		free(ids);
		free(w);
	}
	free(x);
}
END_TEST

static Suite *router_suite(void)
{
	Suite *s = suite_create("router");
	TCase *tc = tcase_create("cpu");

	tcase_add_checked_fixture(tc, backend_setup, backend_teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, identical_router_rows_tie_to_the_lower_expert_index);
	tcase_add_test(tc, ties_far_apart_in_the_expert_list_still_go_to_the_lower_index);
	tcase_add_test(tc, several_ties_fill_the_top_k_from_the_lowest_indices);
	tcase_add_test(tc, tied_groups_keep_the_lower_group_index);
	tcase_add_test(tc, top_k_equal_to_num_experts_chooses_every_expert_best_first);
	tcase_add_test(tc, group_limited_greedy_keeps_groups_by_max_even_when_near_tied);
	tcase_add_test(tc, deepseek_v3_groups_score_the_sum_of_the_two_best_near_tied);
	tcase_add_test(tc, deepseek_v3_masks_dropped_groups_with_neg_inf);
	tcase_add_test(tc, deepseek_v3_bias_changes_selection_but_weights_use_unbiased_scores);
	tcase_add_test(tc, norm_topk_prob_renormalises_only_when_set);
	tcase_add_test(tc, deepseek_v2_scales_only_when_not_normalising);
	tcase_add_test(tc, deepseek_top_k_one_does_not_divide);
	tcase_add_test(tc, glm4_moe_top_k_one_still_normalises);
	tcase_add_test(tc, gpt_oss_weights_are_the_softmax_of_the_top_k_biased_logits);
	tcase_add_test(tc, huge_logits_give_finite_weights);
	tcase_add_test(tc, random_tokens_route_as_the_reference_for_every_rule);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(router_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
