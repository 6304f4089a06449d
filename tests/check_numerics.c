/* SPDX-License-Identifier: MIT */
/*
 * The numerical contract of ARCHITECTURE.md 4.1, end to end: a random
 * checkpoint from gen-model, packed into a store (weights keep their dtype),
 * run through the engine on the CPU backend, compared token by token with
 * the float64 reference (ref.c) evaluated on the checkpoint's own weights:
 *   - routing: the same experts as a set, weights within 1e-5 relative;
 *   - output: relative L2 error <= 1e-4 (float32 activations), <= 1e-2 with
 *     bfloat16 activations in and out;
 * except tokens within 1e-6 of a tie, which the contract exempts.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "engine/model.h"
#include "engine/store.h"
#include "formats/pack.h"
#include "ref.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define TIE_MARGIN 1e-6
#define WEIGHT_RTOL 1e-5
#define OUT_RTOL_F32 1e-4
#define OUT_RTOL_BF16_ACT 1e-2
/* Failures printed per case before the summary assertion. */
#define MAX_REPORTED 5

struct ncase {
	const char *what;
	enum moe_arch arch;
	uint32_t H, I, E, k;
	uint32_t n_group, topk_group;
	uint32_t n_shared;           /* deepseek: count; qwen2_moe: 1 = shared expert */
	uint32_t shared_I;           /* qwen2_moe shared_expert_intermediate_size */
	enum { NORM_DEFAULT, NORM_OFF, NORM_ON } norm;
	float rsf;                   /* 0: the architecture's default */
	const char *act;             /* NULL: silu */
	bool plain, fused;
	uint64_t shard_bytes;        /* 0: one file */
	bool want_group_limited;     /* deepseek_v2: expect topk_method group_limited_greedy */
	bool with_f16;               /* also float16 weights */
	bool with_fp8;               /* also FP8 block-scaled experts (gen-model --quant fp8) */
	bool with_mxfp4;             /* also MXFP4 experts (gen-model --quant mxfp4, gpt_oss) */
	bool mxfp4_only;             /* MXFP4 alone (real shapes: float copies are costly) */
	/* FP8 run only: one kind of expert left in bf16 (gen-model --quant-skip,
	 * or pack --quantize-skip with pack_quantize), so that the store holds
	 * two dtypes (version 2) */
	/* also int4 experts: gen-model --quant gptq | awq | ct-int4 with these */
	const char *int4;
	int32_t q4_group;            /* --group-size (0: 128, -1: one group per row) */
	bool q4_desc_act, q4_sym;
	enum { MIX_NONE, MIX_SHARED_BF16, MIX_ROUTED_BF16 } mix;
	/* FP8 run only: a bf16 checkpoint quantized by pack --quantize fp8;
	 * the reference takes its experts from the store, dequantized here */
	bool pack_quantize;
	/* Called on the checkpoint directory between gen-model and pack, to
	 * plant values random weights would not produce; may be NULL. */
	void (*patch)(const char *dir, uint32_t layer);
	uint32_t ids_below;          /* nonzero: every chosen expert must be below this */
	float x_scale;               /* inputs uniform in [-x_scale, x_scale); 0: 1 */
	bool want_clamps;            /* gpt_oss: the reference must hit swiglu_limit */
	double swiglu_limit;         /* gpt_oss: what config.json must say; 0: 7.0 */
	uint32_t chunk_kb;           /* the pager's chunk size; 0: its default */
};

static const uint32_t batch_sizes[] = { 1, 7, 64, 300 };

/* Each case its own weights and inputs, the same every run. */
static uint64_t case_seed(const struct ncase *c)
{
	return 0x5eed0000u + (uint64_t)c->arch * 131 + c->H;
}

/* The routed experts' dtype of case @c run for @dt. */
static enum moe_dtype routed_dt(const struct ncase *c, enum moe_dtype dt)
{
	return c->mix == MIX_ROUTED_BF16 && dt == MOE_DTYPE_FP8_E4M3_B128 ? MOE_DTYPE_BF16 : dt;
}

/* A case built for one weight dtype: checkpoint, store, reference, engine. */
struct built {
	char *dir;
	char store[4096];
	struct ref_layer *ref;
	struct moe_engine *e;
	uint32_t layer;        /* the MoE layer compared */
};

/*
 * The experts of @ref (routed and shared) replaced by those of the store
 * @path, an FP8 one (pack --quantize fp8): w = e4m3(code) * scale decoded
 * in double by ref.c's e4m3 decoder, as the reference dequantizes FP8
 * checkpoints; the store's own reader fetches only the bytes.  A kind
 * that --quantize-skip kept (@keep: MIX_SHARED_BF16 or MIX_ROUTED_BF16)
 * must be bf16 in the store and keeps the checkpoint's weights.
 */
static void ref_take_store_experts(const char *path, uint32_t layer, int keep, struct ref_layer *ref)
{
	struct moe_err err = { 0 };
	struct moe_store *s;
	uint64_t H = ref->hidden;
	int li;

	ck_assert_msg(moe_store_open(path, &s, &err) == 0, "%s: %s", path, err.msg);
	ck_assert_int_eq(s->cfg.weight_dtype, keep == MIX_ROUTED_BF16 ? MOE_DTYPE_BF16 : MOE_DTYPE_FP8_E4M3_B128);
	li = moe_store_layer_index(s, layer);
	ck_assert_int_ge(li, 0);
	for (uint32_t j = 0; j <= ref->routing.num_experts; j++) {
		bool sh = j == ref->routing.num_experts;
		uint64_t I = sh ? ref->shared_inter : ref->inter, pos = 0;
		uint64_t n = sh ? moe_shared_bytes(&s->cfg) : moe_expert_bytes(&s->cfg);
		double *dst[3];
		uint8_t *blob;

		if (sh && !I)
			break;
		if (sh)
			ck_assert_int_eq(s->cfg.shared_dtype, keep == MIX_SHARED_BF16 ? MOE_DTYPE_BF16 :
					 MOE_DTYPE_FP8_E4M3_B128);
		if ((sh && keep == MIX_SHARED_BF16) || (!sh && keep == MIX_ROUTED_BF16))
			continue;
		blob = moe_test_page_alloc(n);
		ck_assert_int_eq(sh ? moe_store_read_shared(s, (uint32_t)li, blob, &err)
				    : moe_store_read_expert(s, (uint32_t)li, j, blob, &err), 0);
		dst[0] = sh ? ref->sh_gate : ref->gate + (uint64_t)j * I * H;
		dst[1] = sh ? ref->sh_up : ref->up + (uint64_t)j * I * H;
		dst[2] = sh ? ref->sh_down : ref->down + (uint64_t)j * H * I;
		for (int p = 0; p < 3; p++) {
			uint64_t N = p == 2 ? H : I, K = p == 2 ? I : H, kb = (K + 127) / 128;
			const uint8_t *codes = blob + pos;
			const uint8_t *scb = codes + moe_matrix_scales_offset(N, K);

			for (uint64_t r = 0; r < N; r++)
				for (uint64_t c = 0; c < K; c++) {
					float sc;

					memcpy(&sc, scb + (r / 128 * kb + c / 128) * sizeof(float), sizeof(sc));
					dst[p][r * K + c] = ref_e4m3_to_double(codes[r * K + c]) * sc;
				}
			pos += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
		}
		free(blob);
	}
	moe_store_close(s);
}

/* Generate the checkpoint, pack it (weights keep their dtype), load the
 * reference and open the engine; check the checkpoint is the one asked for. */
static void build(const struct ncase *c, enum moe_dtype dt, struct built *b)
{
	const char *dn = moe_dtype_name(dt);
	struct moe_gen_options opt;
	struct moe_pack_options popt = { .dtype = -1 };
	struct moe_engine_options eopt = { .backend = "cpu", .threads = 2,
					   .pager = { .chunk_kb = c->chunk_kb } };
	struct moe_err err = {0};
	struct ref_layer *ref;
	char msg[512];
	uint64_t seed = case_seed(c);
	uint32_t k = c->k, H = c->H;
	enum moe_dtype ck_dt;
	/* the architectures whose layer 0 is dense (first_k_dense_replace 1) */
	bool dense0 = c->arch == MOE_ARCH_DEEPSEEK_V2 || c->arch == MOE_ARCH_DEEPSEEK_V3 ||
		      c->arch == MOE_ARCH_GLM4_MOE;
	int rc;

	memset(b, 0, sizeof(*b));
	b->dir = moe_test_tmpdir("numerics");
	moe_gen_defaults(c->arch, &opt);
	opt.arch = c->arch;
	/* FP8: the experts (and shared and dense MLPs) quantized, the rest bf16;
	 * by pack --quantize fp8 from bf16 with pack_quantize */
	opt.dtype = moe_dtype_is_blocked(dt) ? MOE_DTYPE_BF16 : dt;
	opt.quant_fp8 = dt == MOE_DTYPE_FP8_E4M3_B128 && !c->pack_quantize;
	opt.quant_mxfp4 = dt == MOE_DTYPE_MXFP4;
	if (dt == MOE_DTYPE_INT4) {       /* the rest of the checkpoint in bf16 */
		opt.dtype = MOE_DTYPE_BF16;
		opt.quant_int4 = c->int4;
		opt.q4_group_size = c->q4_group;
		opt.q4_desc_act = c->q4_desc_act;
		opt.q4_sym = c->q4_sym;
	}
	if (dt == MOE_DTYPE_FP8_E4M3_B128 && c->pack_quantize) {
		popt.quantize = "fp8";
		/* one kind by keyword, the other by a release's module name */
		popt.quantize_skip = c->mix == MIX_SHARED_BF16 ? "mlp.shared_experts" :
				     c->mix == MIX_ROUTED_BF16 ? "routed" : NULL;
	} else if (dt == MOE_DTYPE_FP8_E4M3_B128) {
		opt.quant_skip = c->mix == MIX_SHARED_BF16 ? MOE_GEN_QUANT_SKIP_SHARED :
				 c->mix == MIX_ROUTED_BF16 ? MOE_GEN_QUANT_SKIP_ROUTED : MOE_GEN_QUANT_SKIP_NONE;
	}
	opt.seed = seed;
	opt.hidden_size = c->H;
	opt.moe_intermediate_size = c->I;
	/* mixtral and olmoe have no dense layers (and no intermediate_size) */
	opt.intermediate_size = c->arch == MOE_ARCH_MIXTRAL || c->arch == MOE_ARCH_OLMOE ||
				c->arch == MOE_ARCH_GPT_OSS ? 0 : 2 * c->I;
	opt.num_experts = c->E;
	opt.top_k = c->k;
	opt.num_layers = 2;
	opt.n_group = c->n_group ? c->n_group : 1;
	opt.topk_group = c->topk_group ? c->topk_group : 1;
	opt.n_shared_experts = c->n_shared;
	opt.shared_intermediate_size = c->shared_I;
	opt.first_k_dense_replace = dense0 ? 1 : 0;
	opt.decoder_sparse_step = 1;
	opt.topk_method = c->arch != MOE_ARCH_DEEPSEEK_V2 ? NULL :
			  c->want_group_limited ? "group_limited_greedy" : "greedy";
	opt.vocab_size = 64;
	opt.num_attention_heads = 4;
	opt.num_key_value_heads = 2;
	opt.norm_topk_prob = c->norm == NORM_DEFAULT ? -1 : c->norm == NORM_ON;
	opt.routed_scaling_factor = c->rsf;
	opt.hidden_act = c->act;
	opt.plain_experts = c->plain;
	opt.fused_experts = c->fused;
	opt.shard_bytes = c->shard_bytes;
	/* deepseek's and glm4_moe's first layer is dense (first_k_dense_replace
	 * 1); layer 1 is an MoE layer for every architecture.  deepseek_v3 and
	 * glm4_moe also get their MTP layer (layer 2), which pack must skip. */
	b->layer = 1;

	rc = moe_gen_model(&opt, b->dir, NULL, NULL, &err);
	ck_assert_msg(rc == 0, "%s %s: gen-model failed: %d %s", c->what, dn, rc, err.msg);
	if (c->patch)
		c->patch(b->dir, b->layer);
	if (c->shard_bytes) {
		char index[4096];

		snprintf(index, sizeof(index), "%s/model.safetensors.index.json", b->dir);
		ck_assert_msg(access(index, R_OK) == 0, "%s %s: shard_bytes %llu wrote no %s",
			      c->what, dn, (unsigned long long)c->shard_bytes, index);
	}
	snprintf(b->store, sizeof(b->store), "%s/model.moe", b->dir);
	rc = moe_pack(b->dir, b->store, &popt, &err);
	ck_assert_msg(rc == 0, "%s %s: pack failed: %d %s", c->what, dn, rc, err.msg);
	rc = ref_layer_load(b->dir, b->layer, &ref, msg, sizeof(msg));
	ck_assert_msg(rc == 0, "%s %s: reference cannot load layer %u: %s", c->what, dn, b->layer,
		      msg);
	b->ref = ref;

	/* the checkpoint is the one asked for (else the case tests nothing) */
	ck_assert_msg(ref->routing.num_experts == c->E && ref->routing.top_k == k &&
		      ref->hidden == H && ref->inter == c->I,
		      "%s %s: checkpoint has E=%u k=%u H=%u I=%u, asked for E=%u k=%u H=%u I=%u",
		      c->what, dn, ref->routing.num_experts, ref->routing.top_k, ref->hidden,
		      ref->inter, c->E, k, H, c->I);
	ck_dt = popt.quantize ? MOE_DTYPE_BF16 : routed_dt(c, dt);
	/* int4 experts: their packed int32 codes */
	ck_assert_msg(strcmp(ref->weight_dtype, ck_dt == MOE_DTYPE_INT4 ? "I32" : moe_dtype_st_name(ck_dt)) == 0,
		      "%s: checkpoint experts are %s, asked for %s", c->what, ref->weight_dtype,
		      moe_dtype_name(ck_dt));
	if (popt.quantize)
		ref_take_store_experts(b->store, b->layer, c->mix, ref);
	ck_assert_msg(ref->gated == !c->plain, "%s %s: gated experts %d, asked plain=%d", c->what,
		      dn, ref->gated, c->plain);
	ck_assert_msg((ref->shared_inter != 0) == (c->n_shared != 0),
		      "%s %s: shared expert intermediate %u, asked n_shared %u", c->what, dn,
		      ref->shared_inter, c->n_shared);
	if (c->norm != NORM_DEFAULT && c->arch != MOE_ARCH_MIXTRAL)
		ck_assert_msg(ref->routing.norm_topk_prob == (c->norm == NORM_ON),
			      "%s %s: config.json norm_topk_prob %d, asked %d", c->what, dn,
			      ref->routing.norm_topk_prob, c->norm == NORM_ON);
	if (c->rsf > 0.0f)
		ck_assert_msg(fabs(ref->routing.routed_scaling_factor - c->rsf) < 1e-6,
			      "%s %s: config.json routed_scaling_factor %g, asked %g", c->what, dn,
			      ref->routing.routed_scaling_factor, (double)c->rsf);
	if (c->arch == MOE_ARCH_GPT_OSS)
		ck_assert_msg(ref->act == MOE_ACT_SWIGLU_OAI && ref->swiglu_alpha == 1.702 &&
			      ref->swiglu_limit == (c->swiglu_limit ? c->swiglu_limit : 7.0) &&
			      ref->gate_bias && ref->down_bias && ref->bias,
			      "%s %s: the reference reads alpha %g, limit %g (want 1.702, %g), biases %d",
			      c->what, dn, ref->swiglu_alpha, ref->swiglu_limit,
			      c->swiglu_limit ? c->swiglu_limit : 7.0, ref->gate_bias != NULL);
	if (c->arch == MOE_ARCH_DEEPSEEK_V2)
		ck_assert_msg(ref->routing.group_limited == c->want_group_limited,
			      "%s %s: config.json topk_method is %s, the case wants %s", c->what, dn,
			      ref->routing.group_limited ? "group_limited_greedy" : "greedy",
			      c->want_group_limited ? "group_limited_greedy" : "greedy");

	rc = moe_engine_open(b->store, &eopt, &b->e, &err);
	ck_assert_msg(rc == 0, "%s %s: engine open failed: %d %s", c->what, dn, rc, err.msg);
	ck_assert_msg(moe_engine_config(b->e)->weight_dtype == routed_dt(c, dt),
		      "%s: the store holds %s weights, the checkpoint %s (pack must keep the dtype)",
		      c->what, moe_dtype_name(moe_engine_config(b->e)->weight_dtype),
		      moe_dtype_name(routed_dt(c, dt)));
	if (c->n_shared)
		ck_assert_msg(moe_engine_config(b->e)->shared_dtype ==
			      (c->mix == MIX_SHARED_BF16 && dt == MOE_DTYPE_FP8_E4M3_B128 ? MOE_DTYPE_BF16 : dt),
			      "%s %s: the store's shared expert is %s", c->what, dn,
			      moe_dtype_name(moe_engine_config(b->e)->shared_dtype));
}

static void built_free(struct built *b)
{
	moe_engine_close(b->e);
	ref_layer_free(b->ref);
	moe_test_rm_rf(b->dir);
	free(b->dir);
}

/* Every batch size with float32 activations, then bfloat16 activations. */
static void run_dtype(const struct ncase *c, enum moe_dtype dt)
{
	const char *dn = moe_dtype_name(dt);
	const char *an = moe_arch_name(c->arch);
	struct moe_err err = {0};
	struct built bl;
	char msg[512];
	uint32_t k = c->k, H = c->H;
	size_t failures = 0, exempt = 0, tokens = 0;
	double worst = 0.0, worst_bf = 0.0;
	int rc;

	build(c, dt, &bl);
	struct moe_engine *e = bl.e;
	const struct ref_layer *ref = bl.ref;
	uint32_t layer = bl.layer, maxn = 300;
	float *x = malloc(sizeof(float) * maxn * H), *out = malloc(sizeof(float) * maxn * H);
	int32_t *ids = malloc(sizeof(int32_t) * maxn * k);
	float *w = malloc(sizeof(float) * maxn * k);
	double *want = malloc(sizeof(double) * H);
	int32_t rid[REF_MAX_EXPERTS];
	double rw[REF_MAX_EXPERTS], margin;
	uint64_t xs = case_seed(c) ^ 0xabcdefu;
	float xsc = c->x_scale > 0.0f ? c->x_scale : 1.0f;
	unsigned long clamps0 = ref_swiglu_clamps;

	ck_assert(x && out && ids && w && want);
	/* float32 activations, every batch size; then bfloat16 activations */
	for (size_t b = 0; b <= sizeof(batch_sizes) / sizeof(batch_sizes[0]); b++) {
		bool bf16_act = b == sizeof(batch_sizes) / sizeof(batch_sizes[0]);
		uint32_t n = bf16_act ? 64 : batch_sizes[b];
		double tol = bf16_act ? OUT_RTOL_BF16_ACT : OUT_RTOL_F32;

		for (size_t i = 0; i < (size_t)n * H; i++) {
			x[i] = xsc * (float)moe_test_randf(&xs);
			if (bf16_act)
				x[i] = ref_round_bf16(x[i]);
		}
		memset(ids, 0xff, sizeof(int32_t) * n * k);
		rc = moe_engine_forward(e, layer, x, n, out, ids, w, 0, &err);
		ck_assert_msg(rc == 0, "%s %s: forward of %u tokens failed: %d %s", c->what, dn, n, rc,
			      err.msg);
		if (bf16_act)
			for (size_t i = 0; i < (size_t)n * H; i++)
				out[i] = ref_round_bf16(out[i]);

		for (uint32_t t = 0; t < n; t++) {
			double rel;

			tokens++;
			for (uint32_t sl = 0; c->ids_below && sl < k; sl++)
				ck_assert_msg((uint32_t)ids[(size_t)t * k + sl] < c->ids_below,
					      "%s %s batch %u token %u: slot %u is expert %d, outside "
					      "the kept groups (experts < %u)", c->what, dn, n, t, sl,
					      ids[(size_t)t * k + sl], c->ids_below);
			ref_layer_forward(ref, x + (size_t)t * H, want, rid, rw, &margin);
			if (margin < TIE_MARGIN) {
				exempt++;
				continue;
			}
			if (ref_routing_diff(k, ids + (size_t)t * k, w + (size_t)t * k, rid, rw,
					     WEIGHT_RTOL, msg, sizeof(msg)) < 0) {
				if (failures++ < MAX_REPORTED)
					fprintf(stderr, "FAIL %s (%s) %s weights, batch %u, token %u: "
						"routing: %s (margin %.3g)\n", c->what, an, dn, n, t, msg,
						margin);
				continue;
			}
			rel = ref_rel_l2(out + (size_t)t * H, want, H);
			if (bf16_act && rel > worst_bf)
				worst_bf = rel;
			if (!bf16_act && rel > worst)
				worst = rel;
			if (!(rel <= tol) && failures++ < MAX_REPORTED)
				fprintf(stderr, "FAIL %s (%s) %s weights, %s activations, batch %u, "
					"token %u: relative L2 error %.3g > %g (out[0] %.9g, reference "
					"%.9g)\n", c->what, an, dn, bf16_act ? "bf16" : "f32", n, t, rel,
					tol, (double)out[(size_t)t * H], want[0]);
		}
	}
	/* every layer is an MoE layer outside deepseek and glm4_moe: layer 0
	 * must be layer 0's weights, not a copy of layer 1's */
	if (c->arch != MOE_ARCH_DEEPSEEK_V2 && c->arch != MOE_ARCH_DEEPSEEK_V3 &&
	    c->arch != MOE_ARCH_GLM4_MOE) {
		struct ref_layer *ref0;
		uint32_t n = 32;

		rc = ref_layer_load(bl.dir, 0, &ref0, msg, sizeof(msg));
		ck_assert_msg(rc == 0, "%s %s: reference cannot load layer 0: %s", c->what, dn, msg);
		for (size_t i = 0; i < (size_t)n * H; i++)
			x[i] = (float)moe_test_randf(&xs);
		rc = moe_engine_forward(e, 0, x, n, out, ids, w, 0, &err);
		ck_assert_msg(rc == 0, "%s %s: forward of layer 0 failed: %d %s", c->what, dn, rc,
			      err.msg);
		for (uint32_t t = 0; t < n; t++) {
			double rel;

			tokens++;
			ref_layer_forward(ref0, x + (size_t)t * H, want, rid, rw, &margin);
			if (margin < TIE_MARGIN) {
				exempt++;
				continue;
			}
			rel = ref_rel_l2(out + (size_t)t * H, want, H);
			snprintf(msg, sizeof(msg), "as the reference");
			if (ref_routing_diff(k, ids + (size_t)t * k, w + (size_t)t * k, rid, rw,
					     WEIGHT_RTOL, msg, sizeof(msg)) < 0 || !(rel <= OUT_RTOL_F32)) {
				if (failures++ < MAX_REPORTED)
					fprintf(stderr, "FAIL %s (%s) %s weights, layer 0, token %u: "
						"relative L2 error %.3g (tolerance %g), routing: %s\n",
						c->what, an, dn, t, rel, OUT_RTOL_F32, msg);
			} else if (rel > worst) {
				worst = rel;
			}
		}
		ref_layer_free(ref0);
	}
	ck_assert_msg(failures == 0,
		      "%s (%s) %s weights: %zu of %zu tokens outside the contract (worst relative "
		      "L2 %.3g f32 act, %.3g bf16 act); first ones on stderr", c->what, an, dn,
		      failures, tokens, worst, worst_bf);
	ck_assert_msg(exempt * 20 < tokens, "%s %s: %zu of %zu tokens within %g of a tie: the "
		      "case is too degenerate to test anything", c->what, dn, exempt, tokens,
		      TIE_MARGIN);
	if (c->want_clamps)
		ck_assert_msg(ref_swiglu_clamps - clamps0 > tokens,
			      "%s %s: only %lu gate/up values reached swiglu_limit in %zu tokens: the "
			      "case does not test the clamp", c->what, dn, ref_swiglu_clamps - clamps0,
			      tokens);

	printf("%-66s %-4s %4zu tokens, %zu near a tie; worst relative L2 %.2g (f32 act), "
	       "%.2g (bf16 act)\n", c->what, dn, tokens, exempt, worst, worst_bf);
	fflush(stdout);
	free(x);
	free(out);
	free(ids);
	free(w);
	free(want);
	built_free(&bl);
}

static void run_case(const struct ncase *c)
{
	if (c->mxfp4_only) {
		run_dtype(c, MOE_DTYPE_MXFP4);
		return;
	}
	run_dtype(c, MOE_DTYPE_F32);
	run_dtype(c, MOE_DTYPE_BF16);
	if (c->with_f16)
		run_dtype(c, MOE_DTYPE_F16);
	if (c->with_fp8)
		run_dtype(c, MOE_DTYPE_FP8_E4M3_B128);
	if (c->with_mxfp4)
		run_dtype(c, MOE_DTYPE_MXFP4);
	if (c->int4)
		run_dtype(c, MOE_DTYPE_INT4);
}

#define NUMERICS_TEST(name, ...)                                          \
	START_TEST(name)                                                  \
	{                                                                 \
		static const struct ncase c = { .what = #name, __VA_ARGS__ }; \
		run_case(&c);                                             \
	}                                                                 \
	END_TEST

NUMERICS_TEST(mixtral_matches_float64_reference,
	      .arch = MOE_ARCH_MIXTRAL, .H = 72, .I = 48, .E = 8, .k = 2, .with_f16 = true)
NUMERICS_TEST(mixtral_sharded_checkpoint_gelu_tanh_matches_float64_reference,
	      .arch = MOE_ARCH_MIXTRAL, .H = 128, .I = 64, .E = 8, .k = 2,
	      .act = "gelu_pytorch_tanh", .shard_bytes = 48 * 1024)
NUMERICS_TEST(mixtral_fused_experts_match_float64_reference,
	      .arch = MOE_ARCH_MIXTRAL, .H = 88, .I = 40, .E = 8, .k = 2, .fused = true)
NUMERICS_TEST(qwen2_moe_shared_expert_gate_matches_float64_reference,
	      .arch = MOE_ARCH_QWEN2_MOE, .H = 128, .I = 32, .E = 16, .k = 4, .n_shared = 1,
	      .shared_I = 96, .norm = NORM_OFF)
NUMERICS_TEST(qwen3_moe_normalised_gelu_experts_match_float64_reference,
	      .arch = MOE_ARCH_QWEN3_MOE, .H = 200, .I = 64, .E = 32, .k = 8, .norm = NORM_ON,
	      .act = "gelu", .with_fp8 = true)
/* FP8 with partial blocks both ways (200 = 128 + 72, 72 < 128) and rows
 * crossing a block edge (down has 200 rows). */
NUMERICS_TEST(qwen3_moe_fp8_partial_blocks_match_float64_reference,
	      .arch = MOE_ARCH_QWEN3_MOE, .H = 200, .I = 72, .E = 16, .k = 4, .norm = NORM_ON,
	      .with_fp8 = true)
NUMERICS_TEST(qwen3_moe_fused_experts_match_float64_reference,
	      .arch = MOE_ARCH_QWEN3_MOE, .H = 64, .I = 48, .E = 16, .k = 4, .norm = NORM_ON,
	      .fused = true)
NUMERICS_TEST(olmoe_unnormalised_matches_float64_reference,
	      .arch = MOE_ARCH_OLMOE, .H = 64, .I = 32, .E = 64, .k = 8, .norm = NORM_OFF)
NUMERICS_TEST(olmoe_plain_relu_experts_match_float64_reference,
	      .arch = MOE_ARCH_OLMOE, .H = 96, .I = 44, .E = 16, .k = 2, .plain = true,
	      .act = "relu")
NUMERICS_TEST(deepseek_v2_greedy_scaled_two_shared_match_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V2, .H = 96, .I = 48, .E = 16, .k = 6, .n_shared = 2,
	      .norm = NORM_OFF, .rsf = 16.0f)
NUMERICS_TEST(deepseek_v2_group_limited_normalised_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V2, .H = 128, .I = 32, .E = 32, .k = 6, .n_group = 8,
	      .topk_group = 3, .n_shared = 1, .norm = NORM_ON, .rsf = 16.0f, .want_group_limited = true)
NUMERICS_TEST(deepseek_v2_group_limited_scaled_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V2, .H = 72, .I = 36, .E = 16, .k = 3, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_OFF, .rsf = 2.0f, .want_group_limited = true)
NUMERICS_TEST(deepseek_v3_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 200, .I = 64, .E = 64, .k = 8, .n_group = 8,
	      .topk_group = 4, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true)
/* DeepSeek-V3's release: FP8 routed and shared experts, partial blocks;
 * two shared experts make Is 144 = 128 + 16. */
NUMERICS_TEST(deepseek_v3_fp8_quantized_shared_expert_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 200, .I = 72, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true)
/* pack --quantize fp8 of a bf16 checkpoint, routed and shared experts,
 * partial blocks: served as its dequantized weights say. */
NUMERICS_TEST(deepseek_v3_pack_quantize_fp8_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 200, .I = 72, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true,
	      .pack_quantize = true)
/* int4 as GPTQ (act-order, asymmetric; one group per row, symmetric), AWQ
 * and compressed-tensors release it, gen-model's round to nearest: the
 * routed, shared and dense matrices quantized, served within the contract. */
NUMERICS_TEST(qwen3_moe_gptq_desc_act_matches_float64_reference,
	      .arch = MOE_ARCH_QWEN3_MOE, .H = 192, .I = 64, .E = 16, .k = 4, .norm = NORM_ON,
	      .int4 = "gptq", .q4_group = 32, .q4_desc_act = true)
NUMERICS_TEST(mixtral_gptq_symmetric_row_groups_match_float64_reference,
	      .arch = MOE_ARCH_MIXTRAL, .H = 96, .I = 48, .E = 8, .k = 2,
	      .int4 = "gptq", .q4_group = -1, .q4_sym = true)
NUMERICS_TEST(deepseek_v3_awq_quantized_shared_expert_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 128, .I = 64, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f, .int4 = "awq",
	      .q4_group = 64)
NUMERICS_TEST(deepseek_v3_compressed_tensors_int4_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 128, .I = 64, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_ON, .rsf = 2.5f, .int4 = "ct-int4",
	      .q4_group = 32)
NUMERICS_TEST(deepseek_v3_with_256_experts_in_8_groups_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 56, .I = 16, .E = 256, .k = 8, .n_group = 8,
	      .topk_group = 4, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f)
/* One kind of expert quantized, the other not: each blob in its own dtype
 * (store version 2), each matrix computed by its own kernel. */
NUMERICS_TEST(deepseek_v3_fp8_routed_bf16_shared_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 200, .I = 72, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true,
	      .mix = MIX_SHARED_BF16)
NUMERICS_TEST(deepseek_v3_bf16_routed_fp8_shared_matches_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 200, .I = 72, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true,
	      .mix = MIX_ROUTED_BF16)
/* GLM-4.5's routing (one group, scaling 2.5, one shared expert) with one
 * kind of expert FP8 and the other bf16: as gen-model --quant fp8
 * --quant-skip writes it (a release's modules_to_not_convert), and as pack
 * --quantize fp8 --quantize-skip makes it from a bf16 checkpoint. */
NUMERICS_TEST(glm4_moe_fp8_routed_bf16_shared_matches_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 200, .I = 72, .E = 16, .k = 8, .n_shared = 1,
	      .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true, .mix = MIX_SHARED_BF16)
NUMERICS_TEST(glm4_moe_bf16_routed_fp8_shared_matches_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 200, .I = 72, .E = 16, .k = 8, .n_shared = 1,
	      .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true, .mix = MIX_ROUTED_BF16)
NUMERICS_TEST(glm4_moe_pack_quantize_fp8_skip_shared_matches_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 200, .I = 72, .E = 16, .k = 8, .n_shared = 1,
	      .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true, .pack_quantize = true,
	      .mix = MIX_SHARED_BF16)
NUMERICS_TEST(glm4_moe_pack_quantize_fp8_skip_routed_matches_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 200, .I = 72, .E = 16, .k = 8, .n_shared = 1,
	      .norm = NORM_ON, .rsf = 2.5f, .with_fp8 = true, .pack_quantize = true,
	      .mix = MIX_ROUTED_BF16)
/* Groups 0 and 1 win through one strongly biased expert each; the other
 * experts have negative biased scores (moe_test_plant_negative_bias). */
static void plant_negative_bias(const char *dir, uint32_t layer)
{
	char why[512];

	ck_assert_msg(moe_test_plant_negative_bias(dir, layer, why, sizeof(why)) == 0, "%s", why);
}

NUMERICS_TEST(deepseek_v3_masks_dropped_groups_with_neg_inf_end_to_end,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 64, .I = 32, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f,
	      .patch = plant_negative_bias, .ids_below = 8)
/* Rewrite @dir/config.json: each key of @del removed (all of them must be
 * there when @must, else those present), then @key set to @value (if @key). */
static void config_edit(const char *dir, const char *const *del, size_t ndel, bool must, const char *key,
			json_t *value)
{
	char path[4096];
	json_error_t jerr;
	json_t *cfg;

	snprintf(path, sizeof(path), "%s/config.json", dir);
	cfg = json_load_file(path, 0, &jerr);
	ck_assert_msg(cfg != NULL, "%s: %s", path, jerr.text);
	for (size_t i = 0; i < ndel; i++)
		ck_assert_msg(json_object_del(cfg, del[i]) == 0 || !must, "%s has no %s", path, del[i]);
	if (key)
		json_object_set_new(cfg, key, value);
	ck_assert_msg(json_dump_file(cfg, path, JSON_INDENT(2)) == 0, "cannot rewrite %s", path);
	json_decref(cfg);
}

/* Remove the optional routing fields from config.json: both the reference
 * (Hugging Face's defaults, ref.c) and moed must then fall back to the
 * architecture's defaults. */
static void strip_optional_routing_fields(const char *dir, uint32_t layer)
{
	static const char *const keys[] = { "norm_topk_prob", "routed_scaling_factor",
					    "topk_method", "scoring_func" };

	(void)layer;
	config_edit(dir, keys, sizeof(keys) / sizeof(keys[0]), false, NULL, NULL);
}

NUMERICS_TEST(qwen3_moe_config_without_norm_topk_prob_does_not_renormalise,
	      .arch = MOE_ARCH_QWEN3_MOE, .H = 64, .I = 32, .E = 16, .k = 4,
	      .patch = strip_optional_routing_fields)
NUMERICS_TEST(deepseek_v2_config_without_routing_fields_uses_greedy_unscaled_defaults,
	      .arch = MOE_ARCH_DEEPSEEK_V2, .H = 64, .I = 32, .E = 16, .k = 4, .n_shared = 1,
	      .patch = strip_optional_routing_fields)
NUMERICS_TEST(deepseek_v3_config_without_routing_fields_uses_deepseek_v3_defaults,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 64, .I = 32, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .patch = strip_optional_routing_fields)
NUMERICS_TEST(deepseek_v3_fused_unnormalised_two_shared_match_float64_reference,
	      .arch = MOE_ARCH_DEEPSEEK_V3, .H = 136, .I = 32, .E = 32, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_OFF, .rsf = 1.5f, .fused = true)

/* glm4_moe: GLM-4.5-Air's routing (128 experts, top-8, no groups, one
 * shared expert, config defaults); then what no release uses yet but the
 * config allows: groups, scaling, no normalisation, transformers v5's
 * fused experts; top-1, where glm4_moe normalises and deepseek_v3 does not;
 * dropped groups masked as for deepseek_v3. */
NUMERICS_TEST(glm4_moe_air_routing_matches_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 96, .I = 32, .E = 128, .k = 8, .n_shared = 1,
	      .with_f16 = true)
NUMERICS_TEST(glm4_moe_grouped_scaled_unnormalised_fused_match_float64_reference,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 120, .I = 40, .E = 32, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 2, .norm = NORM_OFF, .rsf = 2.5f, .fused = true)
NUMERICS_TEST(glm4_moe_top_1_normalises_to_the_scaling_factor,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 80, .I = 24, .E = 16, .k = 1, .n_shared = 1,
	      .norm = NORM_ON, .rsf = 1.8f)
NUMERICS_TEST(glm4_moe_masks_dropped_groups_with_neg_inf_end_to_end,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 64, .I = 32, .E = 16, .k = 4, .n_group = 4,
	      .topk_group = 2, .n_shared = 1, .norm = NORM_ON, .rsf = 2.5f,
	      .patch = plant_negative_bias, .ids_below = 8)
/* Without the fields, Glm4MoeConfig's defaults: normalised, scaling 1.0
 * (deepseek_v3's would be 2.5). */
static void strip_glm_routing_fields(const char *dir, uint32_t layer)
{
	static const char *const keys[] = { "norm_topk_prob", "routed_scaling_factor", "n_group",
					    "topk_group" };

	(void)layer;
	config_edit(dir, keys, sizeof(keys) / sizeof(keys[0]), true, NULL, NULL);
}

NUMERICS_TEST(glm4_moe_config_without_routing_fields_uses_glm4_moe_defaults,
	      .arch = MOE_ARCH_GLM4_MOE, .H = 72, .I = 32, .E = 16, .k = 4, .n_shared = 1,
	      .patch = strip_glm_routing_fields)

/* gpt_oss: gpt-oss-20b's routing (32 experts, top-4) with router and expert
 * biases; inputs large enough that many gate and up values pass
 * swiglu_limit (the case checks that they do), so an engine without the
 * clamp, the (up + 1), the biases or the top-k-then-softmax rule fails;
 * gpt-oss-120b's 128 experts, at sizes whose matrices do not end on a
 * 16-byte boundary (the biases follow padding); a config.json without swiglu_limit (7.0)
 * and one with another limit, which must be read. */
NUMERICS_TEST(gpt_oss_20b_routing_matches_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 96, .I = 40, .E = 32, .k = 4, .with_f16 = true)
NUMERICS_TEST(gpt_oss_clamped_swiglu_matches_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 72, .I = 48, .E = 32, .k = 4, .x_scale = 12.0f,
	      .want_clamps = true)
NUMERICS_TEST(gpt_oss_120b_routing_matches_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 66, .I = 26, .E = 128, .k = 4, .x_scale = 6.0f,
	      .want_clamps = true)
/* Experts paged in 64 KiB chunks whose boundary falls inside the biases
 * (bf16: matrices end at 65280, biases to 66472; f32: 130560 to 131752):
 * the CPU backend places each piece of them as it arrives. */
NUMERICS_TEST(gpt_oss_biases_split_across_pager_chunks_match_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 128, .I = 85, .E = 8, .k = 4, .x_scale = 4.0f,
	      .chunk_kb = 64)
/* MXFP4 as gpt-oss is released (*_blocks, *_scales, gate and up rows
 * interleaved): the reference decodes the checkpoint's codes itself.  A
 * small layer with the clamp reached and 13 row tiles of 4 (odd), and
 * gpt-oss-20b's own expert shape (H = I = 2880) with few experts. */
NUMERICS_TEST(gpt_oss_mxfp4_matches_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 96, .I = 160, .E = 32, .k = 4, .x_scale = 6.0f,
	      .want_clamps = true, .with_mxfp4 = true)
NUMERICS_TEST(gpt_oss_20b_shape_mxfp4_matches_float64_reference,
	      .arch = MOE_ARCH_GPT_OSS, .H = 2880, .I = 2880, .E = 4, .k = 2, .mxfp4_only = true)
static void strip_swiglu_limit(const char *dir, uint32_t layer)
{
	static const char *const keys[] = { "swiglu_limit" };

	(void)layer;
	config_edit(dir, keys, 1, true, NULL, NULL);
}

static void set_swiglu_limit_3(const char *dir, uint32_t layer)
{
	(void)layer;
	config_edit(dir, NULL, 0, false, "swiglu_limit", json_real(3.0));
}

NUMERICS_TEST(gpt_oss_config_without_swiglu_limit_clamps_at_7,
	      .arch = MOE_ARCH_GPT_OSS, .H = 64, .I = 32, .E = 16, .k = 4, .x_scale = 12.0f,
	      .want_clamps = true, .patch = strip_swiglu_limit)
NUMERICS_TEST(gpt_oss_config_swiglu_limit_is_read,
	      .arch = MOE_ARCH_GPT_OSS, .H = 64, .I = 32, .E = 16, .k = 4, .x_scale = 6.0f,
	      .want_clamps = true, .swiglu_limit = 3.0, .patch = set_swiglu_limit_3)

/* MOE_FWD_ALL_EXPERTS: every expert with weight 1/E plus the shared expert;
 * the routing returned is still the real one. */
static void check_all_experts(const struct ncase *c, enum moe_dtype dt)
{
	struct moe_err err = {0};
	struct built bl;
	uint32_t H = c->H, k = c->k, n = 40;
	uint64_t xs = case_seed(c) ^ 0xa11u;
	float *x = malloc(sizeof(float) * n * H), *out = malloc(sizeof(float) * n * H);
	int32_t *ids = malloc(sizeof(int32_t) * n * k), rid[REF_MAX_EXPERTS];
	float *w = malloc(sizeof(float) * n * k);
	double *want = malloc(sizeof(double) * H), *scratch = malloc(sizeof(double) * H);
	double rw[REF_MAX_EXPERTS], margin;
	char msg[512];
	int rc;

	ck_assert(x && out && ids && w && want && scratch);
	build(c, dt, &bl);
	for (size_t i = 0; i < (size_t)n * H; i++)
		x[i] = (float)moe_test_randf(&xs);
	rc = moe_engine_forward(bl.e, bl.layer, x, n, out, ids, w, MOE_FWD_ALL_EXPERTS, &err);
	ck_assert_msg(rc == 0, "%s: forward with MOE_FWD_ALL_EXPERTS failed: %d %s", c->what, rc,
		      err.msg);
	for (uint32_t t = 0; t < n; t++) {
		double rel;

		ref_layer_forward_dense(bl.ref, x + (size_t)t * H, want);
		rel = ref_rel_l2(out + (size_t)t * H, want, H);
		ck_assert_msg(rel <= OUT_RTOL_F32, "%s %s all experts, token %u: relative L2 error "
			      "%.3g > %g", c->what, moe_dtype_name(dt), t, rel, OUT_RTOL_F32);
		ref_layer_forward(bl.ref, x + (size_t)t * H, scratch, rid, rw, &margin);
		if (margin >= TIE_MARGIN)
			ck_assert_msg(ref_routing_diff(k, ids + (size_t)t * k, w + (size_t)t * k, rid,
						       rw, WEIGHT_RTOL, msg, sizeof(msg)) == 0,
				      "%s all experts, token %u: returned routing: %s", c->what, t, msg);
	}
	free(x);
	free(out);
	free(ids);
	free(w);
	free(want);
	free(scratch);
	built_free(&bl);
}

START_TEST(all_experts_flag_averages_every_expert_and_adds_the_shared_one)
{
	static const struct ncase mixtral = {
		.what = "mixtral", .arch = MOE_ARCH_MIXTRAL, .H = 72, .I = 48, .E = 8, .k = 2,
	};
	static const struct ncase qwen2 = {
		.what = "qwen2_moe", .arch = MOE_ARCH_QWEN2_MOE, .H = 80, .I = 24, .E = 16, .k = 4,
		.n_shared = 1, .shared_I = 64, .norm = NORM_ON,
	};

	check_all_experts(&mixtral, MOE_DTYPE_F32);
	check_all_experts(&qwen2, MOE_DTYPE_BF16);
}
END_TEST

START_TEST(layers_that_are_not_moe_are_refused_with_enoent)
{
	/* deepseek_v3 with first_k_dense_replace 1 and an MTP layer: layer 0 is
	 * dense, layer 2 (= num_hidden_layers) is the MTP layer */
	static const struct ncase c = {
		.what = "deepseek_v3", .arch = MOE_ARCH_DEEPSEEK_V3, .H = 64, .I = 32, .E = 16,
		.k = 4, .n_group = 4, .topk_group = 2, .n_shared = 1,
	};
	static const uint32_t bad[] = { 0, 2, 3, 1000 };
	struct moe_err err = {0};
	struct built bl;
	float x[64] = { 0 }, out[64];

	build(&c, MOE_DTYPE_BF16, &bl);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = moe_engine_forward(bl.e, bad[i], x, 1, out, NULL, NULL, 0, &err);

		ck_assert_msg(rc == -ENOENT, "layer %u: forward returned %d, expected -ENOENT (%s)",
			      bad[i], rc, err.msg);
	}
	built_free(&bl);
}
END_TEST

/* The reference's own decoding and rounding, from known bit patterns (so
 * that a wrong reference cannot hide a wrong engine). */
START_TEST(reference_decodes_and_rounds_16_bit_floats_exactly)
{
	static const struct { uint16_t bits; double v; } bf16[] = {
		{ 0x3f80, 1.0 }, { 0xc000, -2.0 }, { 0x3f81, 1.0078125 }, { 0x0001, 0x1p-133 },
		{ 0x0080, 0x1p-126 }, { 0x7f7f, 0x1.fep127 }, { 0x7f80, INFINITY }, { 0x8000, -0.0 },
	};
	static const struct { uint16_t bits; double v; } f16[] = {
		{ 0x3c00, 1.0 }, { 0xc400, -4.0 }, { 0x0001, 0x1p-24 }, { 0x0400, 0x1p-14 },
		{ 0x7bff, 65504.0 }, { 0x7c00, INFINITY }, { 0x3555, 0x1.554p-2 },
	};
	static const struct { float in, out; } rounding[] = {
		{ 1.0f, 1.0f },
		{ 0x1.01p0f, 1.0f },                  /* a tie, to even (down) */
		{ 0x1.03p0f, 0x1.04p0f },             /* a tie, to even (up) */
		{ 0x1.0101p0f, 0x1.02p0f },           /* above the tie: up */
		{ -0x1.ff8p0f, -2.0f },               /* carries into the exponent */
		{ 0x1.fffffep127f, INFINITY },        /* FLT_MAX overflows */
		{ 0x1.8p-134f, 0x1p-133f },           /* subnormal, nearest (up) */
		{ 0x1p-134f, 0.0f },                  /* subnormal tie to even (down) */
	};

	for (size_t i = 0; i < sizeof(bf16) / sizeof(bf16[0]); i++)
		ck_assert_msg(ref_bf16_to_double(bf16[i].bits) == bf16[i].v,
			      "bf16 %#06x decodes to %a, expected %a", bf16[i].bits,
			      ref_bf16_to_double(bf16[i].bits), bf16[i].v);
	ck_assert(isnan(ref_bf16_to_double(0x7fc0)) && isnan(ref_f16_to_double(0x7e00)));
	/* e4m3fn: max, one, smallest subnormal and normal, sign, NaN */
	ck_assert(ref_e4m3_to_double(0x7e) == 448.0 && ref_e4m3_to_double(0x38) == 1.0 &&
		  ref_e4m3_to_double(0x01) == 0x1p-9 && ref_e4m3_to_double(0x08) == 0x1p-6 &&
		  ref_e4m3_to_double(0xc4) == -3.0 && ref_e4m3_to_double(0x3b) == 1.375 &&
		  isnan(ref_e4m3_to_double(0x7f)) && isnan(ref_e4m3_to_double(0xff)));
	for (size_t i = 0; i < sizeof(f16) / sizeof(f16[0]); i++)
		ck_assert_msg(ref_f16_to_double(f16[i].bits) == f16[i].v,
			      "f16 %#06x decodes to %a, expected %a", f16[i].bits,
			      ref_f16_to_double(f16[i].bits), f16[i].v);
	for (size_t i = 0; i < sizeof(rounding) / sizeof(rounding[0]); i++)
		ck_assert_msg(ref_round_bf16(rounding[i].in) == rounding[i].out,
			      "bf16 rounding of %a gave %a, expected %a", (double)rounding[i].in,
			      (double)ref_round_bf16(rounding[i].in), (double)rounding[i].out);
}
END_TEST

static Suite *numerics_suite(void)
{
	Suite *s = suite_create("numerics");
	TCase *tc = tcase_create("cpu");

	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, reference_decodes_and_rounds_16_bit_floats_exactly);
	tcase_add_test(tc, mixtral_matches_float64_reference);
	tcase_add_test(tc, mixtral_sharded_checkpoint_gelu_tanh_matches_float64_reference);
	tcase_add_test(tc, mixtral_fused_experts_match_float64_reference);
	tcase_add_test(tc, qwen2_moe_shared_expert_gate_matches_float64_reference);
	tcase_add_test(tc, qwen3_moe_normalised_gelu_experts_match_float64_reference);
	tcase_add_test(tc, qwen3_moe_fp8_partial_blocks_match_float64_reference);
	tcase_add_test(tc, qwen3_moe_fused_experts_match_float64_reference);
	tcase_add_test(tc, olmoe_unnormalised_matches_float64_reference);
	tcase_add_test(tc, olmoe_plain_relu_experts_match_float64_reference);
	tcase_add_test(tc, deepseek_v2_greedy_scaled_two_shared_match_float64_reference);
	tcase_add_test(tc, deepseek_v2_group_limited_normalised_matches_float64_reference);
	tcase_add_test(tc, deepseek_v2_group_limited_scaled_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_fp8_quantized_shared_expert_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_pack_quantize_fp8_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_fp8_routed_bf16_shared_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_bf16_routed_fp8_shared_matches_float64_reference);
	tcase_add_test(tc, glm4_moe_fp8_routed_bf16_shared_matches_float64_reference);
	tcase_add_test(tc, glm4_moe_bf16_routed_fp8_shared_matches_float64_reference);
	tcase_add_test(tc, glm4_moe_pack_quantize_fp8_skip_shared_matches_float64_reference);
	tcase_add_test(tc, glm4_moe_pack_quantize_fp8_skip_routed_matches_float64_reference);
	tcase_add_test(tc, qwen3_moe_gptq_desc_act_matches_float64_reference);
	tcase_add_test(tc, mixtral_gptq_symmetric_row_groups_match_float64_reference);
	tcase_add_test(tc, deepseek_v3_awq_quantized_shared_expert_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_compressed_tensors_int4_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_with_256_experts_in_8_groups_matches_float64_reference);
	tcase_add_test(tc, deepseek_v3_fused_unnormalised_two_shared_match_float64_reference);
	tcase_add_test(tc, deepseek_v3_masks_dropped_groups_with_neg_inf_end_to_end);
	tcase_add_test(tc, qwen3_moe_config_without_norm_topk_prob_does_not_renormalise);
	tcase_add_test(tc, gpt_oss_mxfp4_matches_float64_reference);
	tcase_add_test(tc, gpt_oss_20b_shape_mxfp4_matches_float64_reference);
	tcase_add_test(tc, deepseek_v2_config_without_routing_fields_uses_greedy_unscaled_defaults);
	tcase_add_test(tc, deepseek_v3_config_without_routing_fields_uses_deepseek_v3_defaults);
	tcase_add_test(tc, glm4_moe_air_routing_matches_float64_reference);
	tcase_add_test(tc, glm4_moe_grouped_scaled_unnormalised_fused_match_float64_reference);
	tcase_add_test(tc, glm4_moe_top_1_normalises_to_the_scaling_factor);
	tcase_add_test(tc, glm4_moe_masks_dropped_groups_with_neg_inf_end_to_end);
	tcase_add_test(tc, glm4_moe_config_without_routing_fields_uses_glm4_moe_defaults);
	tcase_add_test(tc, gpt_oss_20b_routing_matches_float64_reference);
	tcase_add_test(tc, gpt_oss_clamped_swiglu_matches_float64_reference);
	tcase_add_test(tc, gpt_oss_120b_routing_matches_float64_reference);
	tcase_add_test(tc, gpt_oss_biases_split_across_pager_chunks_match_float64_reference);
	tcase_add_test(tc, gpt_oss_config_without_swiglu_limit_clamps_at_7);
	tcase_add_test(tc, gpt_oss_config_swiglu_limit_is_read);
	tcase_add_test(tc, all_experts_flag_averages_every_expert_and_adds_the_shared_one);
	tcase_add_test(tc, layers_that_are_not_moe_are_refused_with_enoent);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(numerics_suite(), "numerics");
}
