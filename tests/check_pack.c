/* SPDX-License-Identifier: MIT */
/*
 * From a Hugging Face checkpoint to a store: config.json parsing
 * (hfmodel.c) and the packer (pack.c).  Configs: errors name the field,
 * routing as each architecture has it.  Pack: gen-model checkpoints of
 * every architecture are packed and each stored blob is compared with the
 * checkpoint's tensors, read by name here (not through hfmodel) so that a
 * naming mistake there cannot hide; sharded, fused and plain experts, dtype
 * conversion, a failure that leaves nothing, FP8 kept in its own bytes
 * (shared expert apart) and its errors, --quantize fp8 (against gen-model
 * --quant fp8 and an independent quantization) and its refusals, progress.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "formats/genmodel.h"
#include "formats/hfmodel.h"
#include "formats/pack.h"
#include "formats/safetensors.h"
#include "engine/store.h"
#include "ref.h"
#include "testutil.h"

/* --- config.json ---------------------------------------------------------------- */

static int parse(const char *json, struct moe_hf_config **ret, struct moe_err *err)
{
	return moe_hf_config_parse("config.json", json, ret, err);
}

static void expect_config_error(const char *json, const char *needle)
{
	struct moe_hf_config *hc = NULL;
	struct moe_err err = { 0 };
	int r = parse(json, &hc, &err);

	ck_assert_msg(r < 0, "accepted %s", json);
	ck_assert_ptr_null(hc);
	ck_assert_msg(strstr(err.msg, needle), "message '%s' lacks '%s'", err.msg, needle);
	ck_assert_msg(!strncmp(err.msg, "config.json", 11), "message '%s' does not name the file", err.msg);
}

START_TEST(config_errors_name_the_field)
{
	expect_config_error("{\"model_type\": \"mixtral\",\n \"hidden_size\": 64,,}",
			    "bad JSON at line 2, column");
	expect_config_error("{\"model_type\": \"llama\"}", "model_type 'llama' is not supported (supported: mixtral");
	expect_config_error("{\"hidden_size\": 64}", "missing field 'model_type'");
	expect_config_error("{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"num_experts_per_tok\": 2, \"intermediate_size\": 32}",
			    "missing field 'num_local_experts' (required for model_type mixtral)");
	expect_config_error("{\"model_type\": \"mixtral\", \"hidden_size\": \"64\"}",
			    "field 'hidden_size' must be an integer, not a string");
	expect_config_error("{\"model_type\": \"olmoe\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"num_experts\": 8, \"num_experts_per_tok\": 2, \"intermediate_size\": 32,"
			    " \"norm_topk_prob\": 1}", "field 'norm_topk_prob' must be true or false");
	expect_config_error("{\"model_type\": \"olmoe\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"num_experts\": 8, \"num_experts_per_tok\": 9, \"intermediate_size\": 32}",
			    "top_k 9");
	expect_config_error("{\"model_type\": \"olmoe\", \"hidden_size\": -1}", "out of range");
	expect_config_error("{\"model_type\": \"olmoe\", \"hidden_act\": \"tanh\", \"hidden_size\": 8, "
			    "\"num_hidden_layers\": 1}", "hidden_act 'tanh' is not supported");
	expect_config_error("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32,"
			    " \"topk_method\": \"greedy\"}", "topk_method 'greedy' is not supported for deepseek_v3");
	expect_config_error("[1, 2]", "expected a JSON object");
}
END_TEST

START_TEST(config_routing_per_architecture)
{
	struct moe_hf_config *hc;
	struct moe_err err = { 0 };
	int r;

	r = parse("{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
		  " \"num_local_experts\": 8, \"num_experts_per_tok\": 2, \"intermediate_size\": 32,"
		  " \"hidden_act\": \"silu\"}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.norm_topk_prob && hc->cfg.scoring == MOE_SCORING_SOFTMAX &&
		  hc->cfg.topk_method == MOE_TOPK_GREEDY && hc->cfg.n_group == 1);
	ck_assert_uint_eq(hc->n_moe_layers, 2);
	moe_hf_config_free(hc);

	/* qwen2_moe: sparse step 2 and mlp_only_layers: of 0..5, (L+1)%2==0 -> 1,3,5, minus 3 */
	r = parse("{\"model_type\": \"qwen2_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 6,"
		  " \"num_experts\": 8, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32,"
		  " \"shared_expert_intermediate_size\": 64, \"decoder_sparse_step\": 2,"
		  " \"mlp_only_layers\": [3]}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(!hc->cfg.norm_topk_prob && hc->cfg.shared_gate);
	ck_assert_uint_eq(hc->cfg.shared_intermediate_size, 64);
	ck_assert_uint_eq(hc->cfg.n_shared_experts, 1);
	ck_assert_uint_eq(hc->n_moe_layers, 2);
	ck_assert_uint_eq(hc->moe_layers[0], 1);
	ck_assert_uint_eq(hc->moe_layers[1], 5);
	moe_hf_config_free(hc);

	/* deepseek_v2 group-limited; n_shared_experts null: none */
	r = parse("{\"model_type\": \"deepseek_v2\", \"hidden_size\": 64, \"num_hidden_layers\": 5,"
		  " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32,"
		  " \"n_shared_experts\": null, \"topk_method\": \"group_limited_greedy\", \"n_group\": 4,"
		  " \"topk_group\": 2, \"routed_scaling_factor\": 16, \"first_k_dense_replace\": 1,"
		  " \"moe_layer_freq\": 2}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.topk_method == MOE_TOPK_GROUP_LIMITED && hc->cfg.n_group == 4 &&
		  hc->cfg.topk_group == 2 && !hc->cfg.norm_topk_prob &&
		  hc->cfg.routed_scaling_factor == 16.0f && hc->cfg.shared_intermediate_size == 0);
	ck_assert_uint_eq(hc->n_moe_layers, 2);          /* 2 and 4 */
	ck_assert_uint_eq(hc->moe_layers[0], 2);
	ck_assert_uint_eq(hc->moe_layers[1], 4);
	moe_hf_config_free(hc);

	/* deepseek_v2 greedy ignores the grouping fields */
	r = parse("{\"model_type\": \"deepseek_v2\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
		  " \"n_routed_experts\": 8, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32,"
		  " \"n_shared_experts\": 2, \"topk_method\": \"greedy\", \"n_group\": 3, \"topk_group\": 3}",
		  &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.n_group == 1 && hc->cfg.topk_group == 1);
	ck_assert_uint_eq(hc->cfg.shared_intermediate_size, 64);
	moe_hf_config_free(hc);

	r = parse("{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
		  " \"n_routed_experts\": 16, \"num_experts_per_tok\": 4, \"moe_intermediate_size\": 32,"
		  " \"n_group\": 4, \"topk_group\": 2, \"norm_topk_prob\": true,"
		  " \"routed_scaling_factor\": 2.5, \"n_shared_experts\": 1}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.scoring == MOE_SCORING_SIGMOID && hc->cfg.topk_method == MOE_TOPK_NOAUX_TC &&
		  hc->cfg.has_bias && hc->cfg.norm_topk_prob && hc->cfg.routed_scaling_factor == 2.5f);
	moe_hf_config_free(hc);
}
END_TEST

/* The MoE fields of GLM-4.5-Air's config.json, as released. */
#define GLM45_AIR_MOE \
	" \"hidden_size\": 4096, \"num_hidden_layers\": 46, \"intermediate_size\": 10944," \
	" \"moe_intermediate_size\": 1408, \"n_routed_experts\": 128, \"n_shared_experts\": 1," \
	" \"num_experts_per_tok\": 8, \"n_group\": 1, \"topk_group\": 1," \
	" \"first_k_dense_replace\": 1, \"routed_scaling_factor\": 1.0, \"norm_topk_prob\": true," \
	" \"num_nextn_predict_layers\": 1, \"hidden_act\": \"silu\""

START_TEST(config_glm4_moe_routes_as_deepseek_v3)
{
	struct moe_hf_config *hc;
	struct moe_err err = { 0 };
	int r;

	r = parse("{\"model_type\": \"glm4_moe\"," GLM45_AIR_MOE "}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.arch == MOE_ARCH_GLM4_MOE);
	ck_assert(hc->cfg.scoring == MOE_SCORING_SIGMOID && hc->cfg.topk_method == MOE_TOPK_NOAUX_TC &&
		  hc->cfg.has_bias && hc->cfg.norm_topk_prob && hc->cfg.routed_scaling_factor == 1.0f);
	ck_assert_uint_eq(hc->cfg.num_experts, 128);
	ck_assert_uint_eq(hc->cfg.top_k, 8);
	ck_assert_uint_eq(hc->cfg.n_shared_experts, 1);
	ck_assert_uint_eq(hc->cfg.shared_intermediate_size, 1408);
	/* layer 0 dense; 1..45 MoE; the MTP layer 46 is not a layer of the model */
	ck_assert_uint_eq(hc->n_moe_layers, 45);
	ck_assert_uint_eq(hc->moe_layers[0], 1);
	ck_assert_uint_eq(hc->moe_layers[44], 45);
	moe_hf_config_free(hc);

	/* Glm4MoeConfig's defaults for every absent MoE field; it has no
	 * moe_layer_freq, so one in the file changes nothing */
	r = parse("{\"model_type\": \"glm4_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 4,"
		  " \"moe_layer_freq\": 2}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(hc->cfg.num_experts, 128);
	ck_assert_uint_eq(hc->cfg.top_k, 8);
	ck_assert_uint_eq(hc->cfg.moe_intermediate_size, 1408);
	ck_assert_uint_eq(hc->cfg.shared_intermediate_size, 1408);
	ck_assert(hc->cfg.n_group == 1 && hc->cfg.topk_group == 1 && hc->cfg.norm_topk_prob &&
		  hc->cfg.routed_scaling_factor == 1.0f && hc->cfg.has_bias);
	ck_assert_uint_eq(hc->n_moe_layers, 3);          /* first_k_dense_replace 1: 1, 2, 3 */
	ck_assert_uint_eq(hc->moe_layers[0], 1);
	ck_assert_uint_eq(hc->moe_layers[2], 3);
	moe_hf_config_free(hc);

	/* GLM-4.7-FP8 writes DeepSeek-V3's two fields with their only values;
	 * groups and no shared expert are read as written */
	r = parse("{\"model_type\": \"glm4_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
		  " \"scoring_func\": \"sigmoid\", \"topk_method\": \"noaux_tc\", \"n_shared_experts\": 0,"
		  " \"n_routed_experts\": 16, \"n_group\": 4, \"topk_group\": 2, \"num_experts_per_tok\": 4}",
		  &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->cfg.n_group == 4 && hc->cfg.topk_group == 2 && hc->cfg.shared_intermediate_size == 0);
	moe_hf_config_free(hc);

	expect_config_error("{\"model_type\": \"glm4_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"scoring_func\": \"softmax\"}", "scoring_func 'softmax' is not supported for glm4_moe");
	expect_config_error("{\"model_type\": \"glm4_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"topk_method\": \"greedy\"}", "topk_method 'greedy' is not supported for glm4_moe");
	expect_config_error("{\"model_type\": \"glm4_moe\", \"hidden_size\": 64, \"num_hidden_layers\": 1}",
			    "none of the 1 layers is an MoE layer");
}
END_TEST

/* gpt_oss: GptOssConfig's defaults (gpt-oss-120b's shapes), every layer MoE,
 * the clamp and the biases; the MXFP4 release refused by name. */
START_TEST(config_gpt_oss_defaults_and_mxfp4_refused)
{
	struct moe_hf_config *hc;
	struct moe_err err = { 0 };
	int r;

	r = parse("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 36}",
		  &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(hc->cfg.num_experts, 128);
	ck_assert_uint_eq(hc->cfg.top_k, 4);
	ck_assert_uint_eq(hc->cfg.moe_intermediate_size, 2880);
	ck_assert_uint_eq(hc->cfg.shared_intermediate_size, 0);
	ck_assert_uint_eq(hc->n_moe_layers, 36);
	ck_assert(hc->cfg.act == MOE_ACT_SWIGLU_OAI && hc->cfg.has_bias && hc->cfg.has_expert_bias &&
		  hc->cfg.scoring == MOE_SCORING_SOFTMAX && hc->cfg.topk_method == MOE_TOPK_GREEDY);
	ck_assert_float_eq(hc->cfg.swiglu_limit, 7.0f);
	ck_assert_float_eq(hc->cfg.swiglu_alpha, 1.702f);
	moe_hf_config_free(hc);

	/* gpt-oss-20b's MoE fields as released; hidden_act is not the experts' */
	r = parse("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 24,"
		  " \"intermediate_size\": 2880, \"num_local_experts\": 32, \"num_experts_per_tok\": 4,"
		  " \"experts_per_token\": 4, \"swiglu_limit\": 7.0, \"hidden_act\": \"silu\"}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(hc->cfg.num_experts, 32);
	ck_assert_uint_eq(hc->n_moe_layers, 24);
	ck_assert(hc->cfg.act == MOE_ACT_SWIGLU_OAI);
	moe_hf_config_free(hc);

	expect_config_error("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 24,"
			    " \"quantization_config\": {\"quant_method\": \"mxfp4\","
			    " \"modules_to_not_convert\": [\"model.layers.*.self_attn\"]}}",
			    "quant_method mxfp4 (experts as *_blocks and *_scales) is not supported yet: "
			    "moed reads F32, BF16 and F16");
	expect_config_error("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 24,"
			    " \"swiglu_limit\": 0}", "swiglu_limit 0 must be positive");
}
END_TEST

/* --- pack ---------------------------------------------------------------------------- */

/* Read @n elements at element @first of tensor @name and convert to @to. */
static void ckpt_read(const struct moe_st_checkpoint *ck, const char *name, uint64_t first,
		      uint64_t n, enum moe_dtype to, void *out)
{
	const struct moe_st_tensor *t = moe_st_find(ck, name);
	struct moe_err err = { 0 };
	size_t es;
	void *raw;
	float *f;

	ck_assert_msg(t != NULL, "checkpoint has no tensor %s", name);
	ck_assert_msg(t->dtype >= 0, "%s: dtype %s", name, t->st_dtype);
	es = moe_dtype_size((enum moe_dtype)t->dtype);
	raw = malloc(n * es);
	f = malloc(n * 4);
	ck_assert_msg(moe_st_read(ck, t, first * es, raw, n * es, &err) == 0, "%s", err.msg);
	moe_dtype_to_f32((enum moe_dtype)t->dtype, raw, f, n);
	moe_dtype_from_f32(to, f, out, n);
	free(raw);
	free(f);
}

/* The expected blob of expert @j (UINT32_MAX: shared) of layer @L, by name. */
static void expected_expert(const struct moe_st_checkpoint *ck, const struct moe_model_config *c,
			    uint32_t L, uint32_t j, bool fused, uint8_t *out)
{
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };
	static const char *const mx[3] = { "w1", "w3", "w2" };
	uint64_t I = j == UINT32_MAX ? c->shared_intermediate_size : c->moe_intermediate_size;
	uint64_t mat = I * c->hidden_size, es = moe_dtype_size(c->weight_dtype);
	char name[256];

	for (int p = c->gated ? 0 : 1; p < 3; p++) {
		uint64_t first = 0;

		if (j == UINT32_MAX) {
			snprintf(name, sizeof(name), "model.layers.%u.mlp.%s.%s.weight", L,
				 c->arch == MOE_ARCH_QWEN2_MOE ? "shared_expert" : "shared_experts", hf[p]);
		} else if (fused) {
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%s", L,
				 p == 2 ? "down_proj" : "gate_up_proj");
			first = p == 2 ? j * mat : (2 * (uint64_t)j + (uint64_t)p) * mat;
		} else if (c->arch == MOE_ARCH_MIXTRAL) {
			snprintf(name, sizeof(name), "model.layers.%u.block_sparse_moe.experts.%u.%s.weight",
				 L, j, mx[p]);
		} else {
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.%u.%s.weight", L, j, hf[p]);
		}
		ckpt_read(ck, name, first, mat, c->weight_dtype, out);
		out += mat * es;
	}
}

static char *gen(struct moe_gen_options *o, const char *tag)
{
	char *dir = moe_test_tmpdir(tag);
	struct moe_err err = { 0 };
	int r = moe_gen_model(o, dir, NULL, NULL, &err);

	ck_assert_msg(r == 0, "gen-model: %s", err.msg);
	return dir;
}

static char *pack_to(const char *dir, int dtype, struct moe_store **ret)
{
	struct moe_pack_options po = { .dtype = dtype };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/model.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == 0, "pack %s: %s", dir, err.msg);
	r = moe_store_open(out, ret, &err);
	ck_assert_msg(r == 0, "open %s: %s", out, err.msg);
	return out;
}

/* Every router, bias, shared gate, shared expert and expert equal to the
 * checkpoint's tensors converted to the store's dtype. */
static void compare_with_checkpoint(const char *dir, const struct moe_store *s, bool fused)
{
	const struct moe_model_config *c = &s->cfg;
	struct moe_st_checkpoint *ck;
	struct moe_err err = { 0 };
	uint64_t E = c->num_experts, H = c->hidden_size;
	float *router = malloc(E * H * 4), *bias = malloc(E * 4), *sg = malloc(H * 4);
	float *want = malloc(E * H * 4);
	uint8_t *blob = moe_test_page_alloc(s->hdr.expert_stride), *exp = malloc(s->hdr.expert_bytes);
	uint8_t *sblob = NULL, *sexp = NULL;
	char name[256];
	int r;

	r = moe_st_checkpoint_open(dir, &ck, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	if (c->shared_intermediate_size) {
		sblob = malloc(moe_shared_bytes(c));
		sexp = malloc(moe_shared_bytes(c));
	}
	for (uint32_t li = 0; li < s->hdr.num_moe_layers; li++) {
		uint32_t L = s->layers[li].layer;

		r = moe_store_read_router(s, li, router, bias, sg, &err);
		ck_assert_msg(r == 0, "%s", err.msg);
		snprintf(name, sizeof(name), "model.layers.%u.%s.gate.weight", L,
			 c->arch == MOE_ARCH_MIXTRAL && !fused ? "block_sparse_moe" : "mlp");
		ckpt_read(ck, name, 0, E * H, MOE_DTYPE_F32, want);
		ck_assert_msg(memcmp(router, want, E * H * 4) == 0, "layer %u router differs", L);
		if (c->has_bias) {
			snprintf(name, sizeof(name), "model.layers.%u.mlp.gate.e_score_correction_bias", L);
			ckpt_read(ck, name, 0, E, MOE_DTYPE_F32, want);
			ck_assert_msg(memcmp(bias, want, E * 4) == 0, "layer %u bias differs", L);
		}
		if (c->shared_gate) {
			snprintf(name, sizeof(name), "model.layers.%u.mlp.shared_expert_gate.weight", L);
			ckpt_read(ck, name, 0, H, MOE_DTYPE_F32, want);
			ck_assert_msg(memcmp(sg, want, H * 4) == 0, "layer %u shared gate differs", L);
		}
		if (c->shared_intermediate_size) {
			ck_assert_int_eq(moe_store_read_shared(s, li, sblob, &err), 0);
			expected_expert(ck, c, L, UINT32_MAX, false, sexp);
			ck_assert_msg(memcmp(sblob, sexp, moe_shared_bytes(c)) == 0,
				      "layer %u shared expert differs", L);
		}
		for (uint32_t j = 0; j < E; j++) {
			r = moe_store_read_expert(s, li, j, blob, &err);
			ck_assert_msg(r == 0, "%s", err.msg);
			expected_expert(ck, c, L, j, fused, exp);
			ck_assert_msg(memcmp(blob, exp, s->hdr.expert_bytes) == 0,
				      "layer %u expert %u differs", L, j);
		}
	}
	moe_st_checkpoint_close(ck);
	free(router);
	free(bias);
	free(sg);
	free(want);
	free(blob);
	free(exp);
	free(sblob);
	free(sexp);
}

static const enum moe_arch all_archs[] = {
	MOE_ARCH_MIXTRAL, MOE_ARCH_QWEN2_MOE, MOE_ARCH_QWEN3_MOE,
	MOE_ARCH_OLMOE, MOE_ARCH_DEEPSEEK_V2, MOE_ARCH_DEEPSEEK_V3, MOE_ARCH_GLM4_MOE,
};

START_TEST(pack_matches_checkpoint_every_arch)
{
	struct moe_gen_options o;
	struct moe_store *s;
	char *dir, *out;

	moe_gen_defaults(all_archs[_i], &o);
	o.seed = 100 + (uint64_t)_i;
	dir = gen(&o, moe_arch_name(all_archs[_i]));
	out = pack_to(dir, -1, &s);
	ck_assert_str_eq(s->hdr.model_type, moe_arch_name(all_archs[_i]));
	ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_BF16);
	ck_assert(s->cfg.gated);
	ck_assert_uint_eq(s->cfg.num_experts, o.num_experts);
	ck_assert_uint_eq(s->cfg.top_k, o.top_k);
	ck_assert_uint_eq(s->cfg.hidden_size, o.hidden_size);
	ck_assert_uint_eq(s->cfg.moe_intermediate_size, o.moe_intermediate_size);
	compare_with_checkpoint(dir, s, false);
	switch (all_archs[_i]) {
	case MOE_ARCH_MIXTRAL:
		ck_assert(s->cfg.norm_topk_prob);
		ck_assert_uint_eq(s->hdr.num_moe_layers, o.num_layers);
		break;
	case MOE_ARCH_QWEN2_MOE:
		ck_assert(s->cfg.shared_gate && s->cfg.shared_intermediate_size == o.shared_intermediate_size);
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3:
	case MOE_ARCH_GLM4_MOE:
		/* dense layer 0 absent; V3's and GLM's MTP layer (num_layers) skipped */
		ck_assert_uint_eq(s->hdr.num_moe_layers, o.num_layers - o.first_k_dense_replace);
		ck_assert_int_eq(moe_store_layer_index(s, 0), -ENOENT);
		ck_assert_int_eq(moe_store_layer_index(s, o.num_layers), -ENOENT);
		ck_assert_uint_eq(s->cfg.shared_intermediate_size,
				  o.n_shared_experts * o.moe_intermediate_size);
		if (all_archs[_i] != MOE_ARCH_DEEPSEEK_V2) {
			ck_assert(s->cfg.has_bias && s->cfg.topk_method == MOE_TOPK_NOAUX_TC &&
				  s->cfg.scoring == MOE_SCORING_SIGMOID);
			ck_assert_uint_eq(s->cfg.n_group, o.n_group);
		}
		if (all_archs[_i] == MOE_ARCH_GLM4_MOE) {
			ck_assert_uint_eq(o.num_nextn_predict_layers, 1);   /* there was one to skip */
			ck_assert(s->cfg.norm_topk_prob && s->cfg.routed_scaling_factor == 1.0f);
		}
		break;
	default:
		break;
	}
	moe_store_close(s);
	free(out);
	moe_test_rm_rf(dir);
	free(dir);
}
END_TEST

/*
 * gpt_oss in transformers' layout: gate_up_proj [E, H, 2I] is x @ W with
 * gate in the even columns and up in the odd ones, down_proj [E, I, H] is
 * h @ W.  Each stored expert must be gate [I][H], up [I][H], down [H][I]
 * (element by element from the checkpoint), zero padding to 16 bytes, then
 * float32 biases gate [I], up [I] (de-interleaved) and down [H]; the router
 * and its bias as they are.  Sizes whose matrices end off a 16-byte
 * boundary; bf16 and, converted, f32.
 */
static void compare_gpt_oss(const char *dir, const struct moe_store *s)
{
	const struct moe_model_config *c = &s->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	size_t es = moe_dtype_size(c->weight_dtype);
	uint64_t boff = moe_expert_bias_offset(c);
	uint8_t *blob = moe_test_page_alloc(s->hdr.expert_stride), *gu = malloc(H * 2 * I * es);
	uint8_t *dn = malloc(I * H * es);
	float *router = malloc(E * H * 4), *bias = malloc(E * 4), *want = malloc(E * H * 4);
	float *gub = malloc(2 * I * 4), *db = malloc(H * 4);
	struct moe_st_checkpoint *ck;
	struct moe_err err = { 0 };
	char name[256];

	ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
	ck_assert_uint_eq(boff % 16, 0);
	ck_assert_uint_eq(s->hdr.expert_bytes, boff + 4 * (2 * I + H));
	for (uint32_t li = 0; li < s->hdr.num_moe_layers; li++) {
		uint32_t L = s->layers[li].layer;

		ck_assert_int_eq(moe_store_read_router(s, li, router, bias, NULL, &err), 0);
		snprintf(name, sizeof(name), "model.layers.%u.mlp.router.weight", L);
		ckpt_read(ck, name, 0, E * H, MOE_DTYPE_F32, want);
		ck_assert_msg(memcmp(router, want, E * H * 4) == 0, "layer %u router differs", L);
		snprintf(name, sizeof(name), "model.layers.%u.mlp.router.bias", L);
		ckpt_read(ck, name, 0, E, MOE_DTYPE_F32, want);
		ck_assert_msg(memcmp(bias, want, E * 4) == 0, "layer %u router bias differs", L);
		for (uint32_t j = 0; j < E; j++) {
			const float *b;

			ck_assert_int_eq(moe_store_read_expert(s, li, j, blob, &err), 0);
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj", L);
			ckpt_read(ck, name, j * H * 2 * I, H * 2 * I, c->weight_dtype, gu);
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.down_proj", L);
			ckpt_read(ck, name, j * I * H, I * H, c->weight_dtype, dn);
			for (uint64_t i = 0; i < I; i++)
				for (uint64_t h = 0; h < H; h++) {
					ck_assert_msg(!memcmp(blob + (i * H + h) * es, gu + (h * 2 * I + 2 * i) * es, es),
						      "layer %u expert %u gate[%lu][%lu] is not gate_up_proj[%u][%lu][%lu]",
						      L, j, (unsigned long)i, (unsigned long)h, j, (unsigned long)h,
						      (unsigned long)(2 * i));
					ck_assert_msg(!memcmp(blob + ((I + i) * H + h) * es,
							      gu + (h * 2 * I + 2 * i + 1) * es, es),
						      "layer %u expert %u up[%lu][%lu] is not column 2i+1", L, j,
						      (unsigned long)i, (unsigned long)h);
					ck_assert_msg(!memcmp(blob + (2 * I * H + h * I + i) * es, dn + (i * H + h) * es, es),
						      "layer %u expert %u down[%lu][%lu] is not down_proj[%u][%lu][%lu]",
						      L, j, (unsigned long)h, (unsigned long)i, j, (unsigned long)i,
						      (unsigned long)h);
				}
			for (uint64_t p = 3 * I * H * es; p < boff; p++)
				ck_assert_msg(blob[p] == 0, "layer %u expert %u: padding byte %lu is %u", L, j,
					      (unsigned long)p, blob[p]);
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj_bias", L);
			ckpt_read(ck, name, j * 2 * I, 2 * I, MOE_DTYPE_F32, gub);
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.down_proj_bias", L);
			ckpt_read(ck, name, j * H, H, MOE_DTYPE_F32, db);
			b = (const float *)(const void *)(blob + boff);
			for (uint64_t i = 0; i < I; i++)
				ck_assert_msg(b[i] == gub[2 * i] && b[I + i] == gub[2 * i + 1],
					      "layer %u expert %u bias %lu: gate %g up %g, checkpoint %g %g", L, j,
					      (unsigned long)i, (double)b[i], (double)b[I + i], (double)gub[2 * i],
					      (double)gub[2 * i + 1]);
			ck_assert_msg(memcmp(b + 2 * I, db, H * 4) == 0, "layer %u expert %u down bias differs",
				      L, j);
		}
	}
	moe_st_checkpoint_close(ck);
	free(blob);
	free(gu);
	free(dn);
	free(router);
	free(bias);
	free(want);
	free(gub);
	free(db);
}

START_TEST(pack_gpt_oss_deinterleaves_gate_up_and_keeps_biases)
{
	struct moe_gen_options o;
	struct moe_store *s;
	char *dir, *out;

	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.seed = 21;
	o.hidden_size = 62;                             /* 3 x 62 x 30 x 2 bytes: padded */
	o.moe_intermediate_size = 30;
	o.num_layers = 3;
	dir = gen(&o, "gptoss");
	out = pack_to(dir, -1, &s);
	ck_assert_str_eq(s->hdr.model_type, "gpt_oss");
	ck_assert_uint_eq(s->hdr.num_moe_layers, 3);    /* every layer */
	ck_assert(s->cfg.has_bias && s->cfg.has_expert_bias && s->cfg.act == MOE_ACT_SWIGLU_OAI &&
		  s->cfg.shared_intermediate_size == 0 && s->cfg.weight_dtype == MOE_DTYPE_BF16);
	ck_assert_float_eq(s->cfg.swiglu_limit, 7.0f);
	ck_assert_float_eq(s->cfg.swiglu_alpha, 1.702f);
	ck_assert(3 * 62 * 30 * 2 % 16 != 0);
	compare_gpt_oss(dir, s);
	moe_store_close(s);
	free(out);
	out = pack_to(dir, MOE_DTYPE_F32, &s);
	ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_F32);
	compare_gpt_oss(dir, s);
	moe_store_close(s);
	free(out);
	moe_test_rm_rf(dir);
	free(dir);
}
END_TEST

START_TEST(pack_reads_sharded_checkpoint)
{
	struct moe_gen_options o;
	struct moe_store *s;
	char *dir, *out, *index;

	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.seed = 7;
	o.shard_bytes = 64 << 10;
	dir = gen(&o, "sharded");
	ck_assert(asprintf(&index, "%s/model.safetensors.index.json", dir) > 0);
	ck_assert_msg(moe_test_exists(index), "gen-model wrote no index");
	out = pack_to(dir, -1, &s);
	compare_with_checkpoint(dir, s, false);
	moe_store_close(s);
	free(out);
	free(index);
	free(dir);
}
END_TEST

START_TEST(pack_reads_fused_experts)
{
	static const enum moe_arch archs[] = { MOE_ARCH_MIXTRAL, MOE_ARCH_QWEN3_MOE, MOE_ARCH_DEEPSEEK_V3 };

	for (size_t a = 0; a < 3; a++) {
		struct moe_gen_options o;
		struct moe_store *s;
		char *dir, *out;

		moe_gen_defaults(archs[a], &o);
		o.seed = 11;
		o.fused_experts = true;
		dir = gen(&o, "fused");
		out = pack_to(dir, -1, &s);
		compare_with_checkpoint(dir, s, true);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

START_TEST(pack_converts_dtype)
{
	static const int to[] = { MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32 };
	struct moe_gen_options o;

	moe_gen_defaults(MOE_ARCH_QWEN2_MOE, &o);
	o.seed = 3;
	o.dtype = MOE_DTYPE_F32;
	for (size_t k = 0; k < 3; k++) {
		struct moe_store *s;
		char *dir, *out;

		dir = gen(&o, "dtype");
		out = pack_to(dir, to[k], &s);
		ck_assert_int_eq(s->cfg.weight_dtype, to[k]);
		ck_assert_str_eq(s->hdr.source_dtype, "f32");
		compare_with_checkpoint(dir, s, false);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

START_TEST(pack_plain_experts)
{
	struct moe_gen_options o;
	struct moe_store *s;
	char *dir, *out;

	moe_gen_defaults(MOE_ARCH_OLMOE, &o);
	o.seed = 5;
	o.plain_experts = true;
	o.hidden_act = "gelu";
	dir = gen(&o, "plain");
	out = pack_to(dir, -1, &s);
	ck_assert(!s->cfg.gated);
	ck_assert_int_eq(s->cfg.act, MOE_ACT_GELU);
	ck_assert_uint_eq(s->hdr.expert_bytes, 2ull * o.hidden_size * o.moe_intermediate_size * 2);
	compare_with_checkpoint(dir, s, false);
	moe_store_close(s);
	free(out);
	free(dir);
}
END_TEST

/* Shapes from config.json that the tensors do not have: a clear error, and
 * nothing at the output path. */
START_TEST(pack_failure_leaves_nothing)
{
	struct moe_gen_options o;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_err err = { 0 };
	char *dir, *out, *tmp;
	int r;

	moe_gen_defaults(MOE_ARCH_QWEN3_MOE, &o);
	dir = gen(&o, "fail");
	ck_assert(moe_test_sh(NULL, "sed -i 's/\"moe_intermediate_size\": *32/\"moe_intermediate_size\": 16/' '%s/config.json'",
			      dir) == 0);
	ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
	ck_assert(asprintf(&tmp, "%s/out.moe.tmp", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_int_eq(r, -EINVAL);
	ck_assert_msg(strstr(err.msg, "has shape [32, 64], expected [16, 64]"), "%s", err.msg);
	ck_assert(!moe_test_exists(out) && !moe_test_exists(tmp));
	free(out);
	free(tmp);
	free(dir);
}
END_TEST

/* A tiny DeepSeek-V3 FP8 checkpoint, written by hand as DeepSeek released
 * V3: F8_E4M3 expert matrices with X.weight_scale_inv (F32, or @scale_dt),
 * H = 200 and I = 72 so that both dimensions end in a partial block; with
 * @shared a shared expert, FP8 unless @shared_bf16 (and then the routed
 * experts bf16 when @routed_bf16).  @quant is the quantization_config;
 * @drop names a scale tensor left out.  Every data byte is a pattern, so
 * that what pack copies can be compared. */
struct fp8_ckpt {
	const char *quant;
	const char *scale_dt;
	const char *drop;
	bool shared, shared_bf16, routed_bf16;
};

#define FP8_H 200
#define FP8_I 72
#define FP8_E 4
#define FP8_QUANT "{\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", " \
	"\"activation_scheme\": \"dynamic\", \"weight_block_size\": [128, 128]}"

static void write_fp8_checkpoint(const char *dir, const struct fp8_ckpt *o)
{
	const uint32_t H = FP8_H, I = FP8_I, E = FP8_E;
	const char *scale_dt = o->scale_dt ? o->scale_dt : "F32";
	uint64_t ses = !strcmp(scale_dt, "F32") ? 4 : !strcmp(scale_dt, "F8_E4M3") ? 1 : 2;
	json_t *hdr = json_object();
	uint64_t pos = 0;
	char name[128], *path, *text;
	FILE *f;

	ck_assert(asprintf(&path, "%s/config.json", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	fprintf(f, "{\"model_type\": \"deepseek_v3\", \"hidden_size\": %u, \"num_hidden_layers\": 1,"
		" \"n_routed_experts\": %u, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": %u,"
		" \"n_shared_experts\": %d, \"n_group\": 1, \"topk_group\": 1,"
		" \"quantization_config\": %s}\n", H, E, I, o->shared ? 1 : 0,
		o->quant ? o->quant : FP8_QUANT);
	fclose(f);
	free(path);

#define T(dt, a, b, es, ...) do {                                                      \
		snprintf(name, sizeof(name), __VA_ARGS__);                             \
		json_object_set_new(hdr, name, json_pack("{s:s,s:[I,I],s:[I,I]}", "dtype", dt, \
				    "shape", (json_int_t)(a), (json_int_t)(b), "data_offsets",  \
				    (json_int_t)pos, (json_int_t)(pos + (uint64_t)(a) * (b) * (es)))); \
		pos += (uint64_t)(a) * (b) * (es);                                    \
	} while (0)
	T("BF16", E, H, 2, "model.layers.0.mlp.gate.weight");
	json_object_set_new(hdr, "model.layers.0.mlp.gate.e_score_correction_bias",
			    json_pack("{s:s,s:[I],s:[I,I]}", "dtype", "F32", "shape", (json_int_t)E,
				      "data_offsets", (json_int_t)pos, (json_int_t)(pos + 4 * E)));
	pos += 4 * E;
	for (uint32_t j = 0; j <= E; j++) {
		static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };
		bool sh = j == E, bf16 = sh ? o->shared_bf16 : o->routed_bf16;
		char base[96];

		if (sh && !o->shared)
			break;
		if (sh)
			snprintf(base, sizeof(base), "model.layers.0.mlp.shared_experts");
		else
			snprintf(base, sizeof(base), "model.layers.0.mlp.experts.%u", j);
		for (int p = 0; p < 3; p++) {
			uint64_t a = p == 2 ? H : I, b = p == 2 ? I : H;

			if (bf16) {
				T("BF16", a, b, 2, "%s.%s.weight", base, parts[p]);
				continue;
			}
			T("F8_E4M3", a, b, 1, "%s.%s.weight", base, parts[p]);
			snprintf(name, sizeof(name), "%s.%s.weight_scale_inv", base, parts[p]);
			if (o->drop && !strcmp(o->drop, name))
				continue;
			T(scale_dt, (a + 127) / 128, (b + 127) / 128, ses, "%s.%s.weight_scale_inv", base,
			  parts[p]);
		}
	}
#undef T
	text = json_dumps(hdr, JSON_COMPACT);
	json_decref(hdr);
	ck_assert(asprintf(&path, "%s/model.safetensors", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	{
		uint64_t n = strlen(text);

		fwrite(&n, 8, 1, f);
		fwrite(text, 1, n, f);
		/* a pattern with small exponents: scales and bf16 stay finite */
		for (uint64_t i = 0; i < pos; i++)
			fputc((int)((i * 37 + i / 251) & 0x3f), f);
	}
	fclose(f);
	free(path);
	free(text);
}

static int pack_fp8(const char *dir, const struct fp8_ckpt *o, char **ret_out, struct moe_err *err)
{
	struct moe_pack_options po = { .dtype = -1 };

	write_fp8_checkpoint(dir, o);
	ck_assert(asprintf(ret_out, "%s/out.moe", dir) > 0);
	return moe_pack(dir, *ret_out, &po, err);
}

/* The bytes of matrix @name: codes then float32 scales at @blob. */
static void expect_fp8_matrix(const struct moe_st_checkpoint *ck, const char *name, uint64_t rows,
			      uint64_t cols, const uint8_t *blob)
{
	const struct moe_st_tensor *t = moe_st_find(ck, name), *s;
	char sname[160];
	struct moe_err err = { 0 };
	uint8_t *codes = malloc(rows * cols);
	uint64_t nb = (rows + 127) / 128 * ((cols + 127) / 128);
	float *want = malloc(nb * sizeof(float));
	uint8_t *raw = malloc(nb * 4);

	ck_assert(t && codes && want && raw);
	snprintf(sname, sizeof(sname), "%s_scale_inv", name);
	s = moe_st_find(ck, sname);
	ck_assert(s);
	ck_assert_int_eq(moe_st_read(ck, t, 0, codes, rows * cols, &err), 0);
	ck_assert_msg(memcmp(codes, blob, rows * cols) == 0, "%s: the codes are not the checkpoint's", name);
	for (uint64_t i = rows * cols; i < moe_matrix_scales_offset(rows, cols); i++)
		ck_assert_msg(blob[i] == 0, "%s: padding byte %llu is not zero", name, (unsigned long long)i);
	ck_assert_int_eq(moe_st_read(ck, s, 0, raw, s->nbytes, &err), 0);
	moe_dtype_to_f32((enum moe_dtype)s->dtype, raw, want, nb);
	ck_assert_msg(memcmp(want, blob + moe_matrix_scales_offset(rows, cols), nb * 4) == 0,
		      "%s: the scales are not the checkpoint's", name);
	free(codes);
	free(want);
	free(raw);
}

/* pack keeps the release's bytes: each FP8 blob is the codes and the
 * scales of the checkpoint, partial blocks included; bf16 scales widen. */
START_TEST(pack_keeps_fp8_bytes)
{
	static const char *const scale_dts[] = { "F32", "BF16" };
	static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };

	for (int sd = 0; sd < 2; sd++) {
		char *dir = moe_test_tmpdir("fp8"), *out, name[128];
		struct fp8_ckpt o = { .scale_dt = scale_dts[sd], .shared = true };
		struct moe_st_checkpoint *ck;
		struct moe_store *s;
		struct moe_err err = { 0 };
		uint8_t *blob;
		int r = pack_fp8(dir, &o, &out, &err);

		ck_assert_msg(r == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->hdr.version, 1);   /* one dtype: old readers refuse dtype 3 */
		ck_assert_str_eq(s->hdr.source_dtype, "fp8");
		ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
		blob = malloc(s->hdr.expert_bytes > moe_shared_bytes(&s->cfg) ? s->hdr.expert_bytes
									       : moe_shared_bytes(&s->cfg));
		for (uint32_t j = 0; j <= FP8_E; j++) {
			uint64_t pos = 0;

			if (j < FP8_E)
				ck_assert_int_eq(moe_store_read_expert(s, 0, j, blob, &err), 0);
			else
				ck_assert_int_eq(moe_store_read_shared(s, 0, blob, &err), 0);
			for (int p = 0; p < 3; p++) {
				uint64_t a = p == 2 ? FP8_H : FP8_I, b = p == 2 ? FP8_I : FP8_H;

				if (j < FP8_E)
					snprintf(name, sizeof(name), "model.layers.0.mlp.experts.%u.%s.weight", j,
						 parts[p]);
				else
					snprintf(name, sizeof(name), "model.layers.0.mlp.shared_experts.%s.weight",
						 parts[p]);
				expect_fp8_matrix(ck, name, a, b, blob + pos);
				pos += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, a, b);
			}
		}
		free(blob);
		moe_st_checkpoint_close(ck);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

/* --dtype f32 or bf16 dequantizes: w = e4m3(code) * scale in float32, then
 * rounded, as DeepSeek's fp8_cast_bf16.py does; the store is one dtype. */
START_TEST(pack_dtype_dequantizes_fp8)
{
	static const enum moe_dtype tos[] = { MOE_DTYPE_F32, MOE_DTYPE_BF16 };
	static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };

	for (int ti = 0; ti < 2; ti++) {
		char *dir = moe_test_tmpdir("fp8deq"), *out, name[160];
		struct fp8_ckpt o = { .shared = true, .scale_dt = "BF16" };
		struct moe_pack_options po = { .dtype = (int)tos[ti] };
		struct moe_st_checkpoint *ck;
		struct moe_store *s;
		struct moe_err err = { 0 };
		uint8_t *blob;
		uint64_t pos = 0;

		write_fp8_checkpoint(dir, &o);
		ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
		ck_assert_msg(moe_pack(dir, out, &po, &err) == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, tos[ti]);
		ck_assert_int_eq(s->cfg.shared_dtype, tos[ti]);
		ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
		blob = malloc(s->hdr.expert_bytes);
		ck_assert_int_eq(moe_store_read_expert(s, 0, 1, blob, &err), 0);
		for (int p = 0; p < 3; p++) {
			uint64_t a = p == 2 ? FP8_H : FP8_I, b = p == 2 ? FP8_I : FP8_H, kb = (b + 127) / 128;
			const struct moe_st_tensor *t, *st;
			uint8_t *codes = malloc(a * b);
			uint16_t sraw[4];
			float sc[4];

			snprintf(name, sizeof(name), "model.layers.0.mlp.experts.1.%s.weight", parts[p]);
			t = moe_st_find(ck, name);
			snprintf(name, sizeof(name), "model.layers.0.mlp.experts.1.%s.weight_scale_inv", parts[p]);
			st = moe_st_find(ck, name);
			ck_assert(t && st && st->nbytes <= sizeof(sraw));
			ck_assert_int_eq(moe_st_read(ck, t, 0, codes, a * b, &err), 0);
			ck_assert_int_eq(moe_st_read(ck, st, 0, sraw, st->nbytes, &err), 0);
			moe_dtype_to_f32(MOE_DTYPE_BF16, sraw, sc, st->nbytes / 2);
			for (uint64_t i = 0; i < a; i++)
				for (uint64_t j = 0; j < b; j++) {
					float w = moe_e4m3_to_f32(codes[i * b + j]) * sc[i / 128 * kb + j / 128];
					const uint8_t *at = blob + pos + (i * b + j) * moe_dtype_size(tos[ti]);

					if (tos[ti] == MOE_DTYPE_F32)
						ck_assert_msg(memcmp(at, &w, 4) == 0, "%s [%llu][%llu]", parts[p],
							      (unsigned long long)i, (unsigned long long)j);
					else {
						uint16_t h = moe_f32_to_bf16(w);

						ck_assert_msg(memcmp(at, &h, 2) == 0, "%s [%llu][%llu]", parts[p],
							      (unsigned long long)i, (unsigned long long)j);
					}
				}
			pos += a * b * moe_dtype_size(tos[ti]);
			free(codes);
		}
		free(blob);
		moe_st_checkpoint_close(ck);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

/* DeepSeek-V3's shared expert is FP8 like its routed ones; a release that
 * quantizes only one of them keeps each in its own dtype: version 2. */
START_TEST(pack_keeps_shared_expert_dtype_apart)
{
	for (int which = 0; which < 2; which++) {
		char *dir = moe_test_tmpdir("fp8mix"), *out;
		struct fp8_ckpt o = { .shared = true, .shared_bf16 = which == 0, .routed_bf16 = which == 1 };
		struct moe_store *s;
		struct moe_err err = { 0 };
		int r = pack_fp8(dir, &o, &out, &err);

		ck_assert_msg(r == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, which ? MOE_DTYPE_BF16 : MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->cfg.shared_dtype, which ? MOE_DTYPE_FP8_E4M3_B128 : MOE_DTYPE_BF16);
		ck_assert_int_eq(s->hdr.version, 2);
		ck_assert_int_eq(moe_store_verify(s, NULL, NULL, NULL, &err), 0);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

static void expect_pack_fails(const struct fp8_ckpt *o, int code, const char *want)
{
	char *dir = moe_test_tmpdir("fp8bad"), *out;
	struct moe_err err = { 0 };
	int r = pack_fp8(dir, o, &out, &err);

	ck_assert_msg(r == code, "pack gave %d (%s), not %d", r, err.msg, code);
	ck_assert_msg(strstr(err.msg, want), "message '%s' lacks '%s'", err.msg, want);
	ck_assert(!moe_test_exists(out));
	free(out);
	free(dir);
}

START_TEST(pack_fp8_errors_name_the_culprit)
{
	struct fp8_ckpt o = { .drop = "model.layers.0.mlp.experts.2.up_proj.weight_scale_inv" };

	expect_pack_fails(&o, -ENOENT, "tensor 'model.layers.0.mlp.experts.2.up_proj.weight' in ");
	expect_pack_fails(&o, -ENOENT, "is F8_E4M3 but its scales "
			  "'model.layers.0.mlp.experts.2.up_proj.weight_scale_inv' are missing");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"awq\", \"bits\": 4}" };
	expect_pack_fails(&o, -ENOTSUP, "quantization_config.quant_method 'awq' is not supported "
			  "(supported: fp8 with weight_block_size [128, 128])");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 64]}" };
	expect_pack_fails(&o, -ENOTSUP, "weight_block_size [64, 64] is not supported");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\", \"fmt\": \"e5m2\", "
			       "\"weight_block_size\": [128, 128]}" };
	expect_pack_fails(&o, -ENOTSUP, "quantization_config.fmt 'e5m2' is not supported");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\"}" };
	expect_pack_fails(&o, -ENOTSUP, "no weight_block_size: per-tensor FP8 is not supported");
	o = (struct fp8_ckpt){ .scale_dt = "F8_E4M3" };
	expect_pack_fails(&o, -ENOTSUP, "have dtype F8_E4M3; moed reads F32, BF16 and F16 scales");
}
END_TEST

/* --- pack --quantize fp8 ------------------------------------------------------- */

/* A small deepseek_v3 with a shared expert whose matrices end in partial
 * blocks both ways (H = 200, I = 136) and span two block rows. */
static void quant_model(enum moe_dtype dt, struct moe_gen_options *o)
{
	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, dt, o);
	moe_test_gen_grouped(o);
	o->hidden_size = 200;
	o->moe_intermediate_size = 136;
	o->num_experts = 8;
	o->top_k = 2;
	o->n_group = 2;
	o->topk_group = 1;
	o->num_layers = 3;
	o->seed = 11;
}

static char *pack_quantized(const char *dir, struct moe_store **ret)
{
	struct moe_pack_options po = { .dtype = -1, .quantize = "fp8" };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/q.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == 0, "pack --quantize fp8 %s: %s", dir, err.msg);
	r = moe_store_open(out, ret, &err);
	ck_assert_msg(r == 0, "open %s: %s", out, err.msg);
	return out;
}

/* Blob @j (UINT32_MAX: shared) of layer @li of @s into a fresh buffer. */
static uint8_t *read_blob(const struct moe_store *s, uint32_t li, uint32_t j, uint64_t *ret_n)
{
	uint64_t n = j == UINT32_MAX ? moe_shared_bytes(&s->cfg) : moe_expert_bytes(&s->cfg);
	uint8_t *b = moe_test_page_alloc(n);
	struct moe_err err = { 0 };
	int r = j == UINT32_MAX ? moe_store_read_shared(s, li, b, &err)
				: moe_store_read_expert(s, li, j, b, &err);

	ck_assert_msg(r == 0, "layer %u expert %u: %s", li, j, err.msg);
	*ret_n = n;
	return b;
}

/* pack --quantize fp8 of the f32 checkpoint of seed S is, blob for blob,
 * the pack of gen-model --quant fp8 of seed S: gen-model quantizes the
 * float32 values its f32 checkpoint holds, with the same quantizer. */
START_TEST(pack_quantize_equals_gen_model_fp8)
{
	struct moe_gen_options o;
	struct moe_store *a, *b;
	char *fdir, *qdir, *aout, *bout;

	quant_model(MOE_DTYPE_F32, &o);
	fdir = gen(&o, "qf32");
	o.quant_fp8 = true;
	qdir = gen(&o, "qgen");
	aout = pack_quantized(fdir, &a);
	bout = pack_to(qdir, -1, &b);
	ck_assert_int_eq(a->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(a->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(b->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(a->hdr.num_moe_layers, 2);
	ck_assert_int_eq(b->hdr.num_moe_layers, 2);
	ck_assert_str_eq(a->hdr.source_dtype, "f32");
	for (uint32_t li = 0; li < 2; li++) {
		uint64_t E = a->cfg.num_experts, H = a->cfg.hidden_size;
		float *ra = calloc(E * H + E, sizeof(float)), *rb = calloc(E * H + E, sizeof(float));
		struct moe_err err = { 0 };

		ck_assert_int_eq(moe_store_read_router(a, li, ra, ra + E * H, NULL, &err), 0);
		ck_assert_int_eq(moe_store_read_router(b, li, rb, rb + E * H, NULL, &err), 0);
		ck_assert_msg(!memcmp(ra, rb, (E * H + E) * sizeof(float)), "layer %u: routers differ", li);
		free(ra);
		free(rb);
		for (uint32_t j = 0; j <= E; j++) {
			uint32_t e = j == E ? UINT32_MAX : j;
			uint64_t na, nb;
			uint8_t *ba = read_blob(a, li, e, &na), *bb = read_blob(b, li, e, &nb);

			ck_assert_uint_eq(na, nb);
			for (uint64_t i = 0; i < na; i++)
				ck_assert_msg(ba[i] == bb[i], "layer %u expert %u byte %" PRIu64
					      ": pack --quantize %#x, gen-model --quant %#x", li, e, i,
					      ba[i], bb[i]);
			free(ba);
			free(bb);
		}
	}
	moe_store_close(a);
	moe_store_close(b);
	free(aout);
	free(bout);
	free(fdir);
	free(qdir);
}
END_TEST

/* The e4m3fn code nearest to @q, found by search over the finite codes in
 * double (ties to the even code), not by engine/dtype.c's bit arithmetic. */
static uint8_t ref_e4m3_nearest(double q)
{
	double best_d = INFINITY;
	uint8_t best = 0;

	for (unsigned c = 0; c < 0x7f; c++) {
		double d = fabs(fabs(q) - ref_e4m3_to_double((uint8_t)c));

		if (d < best_d || (d == best_d && !(c & 1))) {
			best_d = d;
			best = (uint8_t)c;
		}
	}
	return signbit(q) ? (uint8_t)(best | 0x80) : best;
}

/* One [N][K] float matrix @w quantized as the release is, checked against
 * @fp8 (moe_matrix_bytes() layout): scale = amax / 448 per block (1 when
 * all zero), code = nearest e4m3 to w / scale (the division in float32, as
 * torch does it), ties to even. */
static void expect_reference_quant(const float *w, uint64_t N, uint64_t K, const uint8_t *fp8,
				   const char *what)
{
	uint64_t kb = (K + 127) / 128;
	const uint8_t *scb = fp8 + moe_matrix_scales_offset(N, K);

	for (uint64_t bi = 0; bi < (N + 127) / 128; bi++)
		for (uint64_t bj = 0; bj < kb; bj++) {
			double amax = 0;
			float scale, got;

			for (uint64_t i = bi * 128; i < N && i < bi * 128 + 128; i++)
				for (uint64_t j = bj * 128; j < K && j < bj * 128 + 128; j++)
					amax = fmax(amax, fabs((double)w[i * K + j]));
			scale = amax > 0 ? (float)(amax / 448.0) : 1.0f;
			memcpy(&got, scb + (bi * kb + bj) * sizeof(float), sizeof(got));
			ck_assert_msg(got == scale, "%s block (%" PRIu64 ", %" PRIu64 "): scale %.9g, "
				      "reference %.9g", what, bi, bj, got, scale);
			for (uint64_t i = bi * 128; i < N && i < bi * 128 + 128; i++)
				for (uint64_t j = bj * 128; j < K && j < bj * 128 + 128; j++) {
					uint8_t want = ref_e4m3_nearest((double)(w[i * K + j] / scale));

					ck_assert_msg(fp8[i * K + j] == want, "%s (%" PRIu64 ", %" PRIu64 "): "
						      "w %.9g scale %.9g: code %#x, reference %#x", what, i, j,
						      w[i * K + j], scale, fp8[i * K + j], want);
				}
		}
}

/* From bf16: gen-model --quant fp8 quantizes the float32 values before
 * their bf16 rounding, so the bytes differ from pack --quantize of the
 * bf16 checkpoint; those are checked against a quantization of the bf16
 * values (the store packed as bf16) done here. */
START_TEST(pack_quantize_bf16_matches_reference)
{
	struct moe_gen_options o;
	struct moe_store *q, *s;
	char *dir, *qout, *out;

	quant_model(MOE_DTYPE_BF16, &o);
	dir = gen(&o, "qbf16");
	out = pack_to(dir, -1, &s);
	qout = pack_quantized(dir, &q);
	ck_assert_str_eq(q->hdr.source_dtype, "bf16");
	for (uint32_t li = 0; li < 2; li++)
		for (uint32_t j = 0; j <= s->cfg.num_experts; j++) {
			uint32_t e = j == s->cfg.num_experts ? UINT32_MAX : j;
			uint64_t I = e == UINT32_MAX ? s->cfg.shared_intermediate_size
						     : s->cfg.moe_intermediate_size;
			uint64_t H = s->cfg.hidden_size, ns, nq, pos_s = 0, pos_q = 0;
			uint8_t *bs = read_blob(s, li, e, &ns), *bq = read_blob(q, li, e, &nq);
			float *w = malloc(I * H * sizeof(float));
			char what[64];

			for (int p = 0; p < 3; p++) {
				uint64_t N = p == 2 ? H : I, K = p == 2 ? I : H;

				snprintf(what, sizeof(what), "layer %u expert %d matrix %d", li,
					 e == UINT32_MAX ? -1 : (int)e, p);
				moe_dtype_to_f32(MOE_DTYPE_BF16, bs + pos_s, w, N * K);
				expect_reference_quant(w, N, K, bq + pos_q, what);
				pos_s += moe_matrix_bytes(MOE_DTYPE_BF16, N, K);
				pos_q += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
			}
			ck_assert_uint_eq(pos_q, nq);
			free(w);
			free(bs);
			free(bq);
		}
	moe_store_close(s);
	moe_store_close(q);
	free(out);
	free(qout);
	free(dir);
}
END_TEST

static void expect_quantize_fails(const char *dir, int dtype, const char *quant, int want,
				  const char *needle)
{
	struct moe_pack_options po = { .dtype = dtype, .quantize = quant };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/refused.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == want, "pack --quantize %s: %d (%s), want %d", quant, r, err.msg, want);
	moe_test_assert_err_has(&err, needle);
	ck_assert(!moe_test_exists(out));
	free(out);
}

/* --quantize refuses what it cannot do, saying what instead. */
START_TEST(pack_quantize_refusals_say_why)
{
	struct fp8_ckpt f = { .shared = true };
	struct moe_gen_options o;
	char *dir, *fdir = moe_test_tmpdir("qfp8");

	moe_test_gen_small(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, &o);
	dir = gen(&o, "qrefuse");
	expect_quantize_fails(dir, MOE_DTYPE_BF16, "fp8", -EINVAL, "--quantize and --dtype cannot be combined");
	expect_quantize_fails(dir, -1, "int4", -EINVAL, "--quantize int4: not supported (supported: fp8)");
	write_fp8_checkpoint(fdir, &f);
	expect_quantize_fails(fdir, -1, "fp8", -EINVAL, "the checkpoint is already quantized (FP8); "
			      "pack it without --quantize");
	free(dir);
	moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &o);
	dir = gen(&o, "qoss");
	expect_quantize_fails(dir, -1, "fp8", -ENOTSUP, "expert biases (gpt_oss), which the store "
			      "does not hold next to FP8 weights");
	free(dir);
	free(fdir);
}
END_TEST

struct prog_log {
	uint64_t done, total, calls;
	bool backwards;
};

static void prog(void *ctx, uint64_t done, uint64_t total, const char *what)
{
	struct prog_log *p = ctx;

	(void)what;
	if (done < p->done)
		p->backwards = true;
	p->done = done;
	p->total = total;
	p->calls++;
}

START_TEST(pack_progress_reaches_total)
{
	struct moe_gen_options o;
	struct prog_log log = { 0 };
	struct moe_pack_options po = { .dtype = MOE_DTYPE_F32, .progress = prog, .ctx = &log };
	struct moe_err err = { 0 };
	char *dir, *out;
	int r;

	moe_gen_defaults(MOE_ARCH_QWEN2_MOE, &o);
	dir = gen(&o, "progress");
	ck_assert(asprintf(&out, "%s/p.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(log.calls > 0 && !log.backwards);
	ck_assert_uint_eq(log.done, log.total);
	free(out);
	free(dir);
}
END_TEST

/* One expert tensor in F16 among BF16 ones: refused unless a dtype is
 * asked for, then converted. */
START_TEST(pack_mixed_dtypes_need_a_target)
{
	struct moe_gen_options o;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_err err = { 0 };
	struct moe_store *s;
	char *dir, *out;
	int r;

	moe_gen_defaults(MOE_ARCH_QWEN3_MOE, &o);
	dir = gen(&o, "mixed");
	ck_assert(moe_test_sh(NULL, "LC_ALL=C sed -i 's/\\(\"model.layers.1.mlp.experts.2.up_proj.weight\":{\"dtype\":\"\\)BF16\"/\\1F16\" /' '%s/model.safetensors'",
			      dir) == 0);
	ck_assert(asprintf(&out, "%s/m.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_int_eq(r, -EINVAL);
	ck_assert_msg(strstr(err.msg, "more than one dtype (bf16, and f16 in tensor "
			     "'model.layers.1.mlp.experts.2.up_proj.weight')"), "%s", err.msg);
	free(out);
	out = pack_to(dir, MOE_DTYPE_BF16, &s);
	ck_assert_str_eq(s->hdr.source_dtype, "mixed");
	compare_with_checkpoint(dir, s, false);
	moe_store_close(s);
	free(out);
	free(dir);
}
END_TEST

static Suite *pack_suite(void)
{
	Suite *s = suite_create("pack");
	TCase *tc = tcase_create("config");

	tcase_add_test(tc, config_errors_name_the_field);
	tcase_add_test(tc, config_routing_per_architecture);
	tcase_add_test(tc, config_glm4_moe_routes_as_deepseek_v3);
	tcase_add_test(tc, config_gpt_oss_defaults_and_mxfp4_refused);
	suite_add_tcase(s, tc);

	tc = tcase_create("pack");
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, pack_matches_checkpoint_every_arch, 0,
			    (int)(sizeof(all_archs) / sizeof(all_archs[0])));
	tcase_add_test(tc, pack_reads_sharded_checkpoint);
	tcase_add_test(tc, pack_reads_fused_experts);
	tcase_add_test(tc, pack_converts_dtype);
	tcase_add_test(tc, pack_plain_experts);
	tcase_add_test(tc, pack_failure_leaves_nothing);
	tcase_add_test(tc, pack_keeps_fp8_bytes);
	tcase_add_test(tc, pack_keeps_shared_expert_dtype_apart);
	tcase_add_test(tc, pack_dtype_dequantizes_fp8);
	tcase_add_test(tc, pack_fp8_errors_name_the_culprit);
	tcase_add_test(tc, pack_quantize_equals_gen_model_fp8);
	tcase_add_test(tc, pack_quantize_bf16_matches_reference);
	tcase_add_test(tc, pack_quantize_refusals_say_why);
	tcase_add_test(tc, pack_gpt_oss_deinterleaves_gate_up_and_keeps_biases);
	tcase_add_test(tc, pack_progress_reaches_total);
	tcase_add_test(tc, pack_mixed_dtypes_need_a_target);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(pack_suite(), "pack");
}
