/* SPDX-License-Identifier: MIT */
/*
 * From a Hugging Face checkpoint to a store: config.json parsing
 * (hfmodel.c) and the packer (pack.c).  Configs: errors name the field,
 * routing as each architecture has it.  Pack: gen-model checkpoints of
 * every architecture are packed and each stored blob is compared with the
 * checkpoint's tensors, read by name here (not through hfmodel) so that a
 * naming mistake there cannot hide; sharded, fused and plain experts, dtype
 * conversion, a failure that leaves nothing, progress.  FP8 checkpoints and
 * --quantize fp8 are check_pack_fp8.c.
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

/* transformers 5 saves Qwen3MoeConfig's expert count as num_local_experts
 * (its attribute_map renames num_experts); both names are the same field. */
START_TEST(config_qwen_reads_num_local_experts)
{
	static const char head[] = "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 64,"
		" \"num_hidden_layers\": 2, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32";
	struct moe_hf_config *hc;
	struct moe_err err = { 0 };
	char json[512];
	int r;

	snprintf(json, sizeof(json), "%s, \"num_local_experts\": 6}", head);
	r = parse(json, &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(hc->cfg.num_experts, 6);
	moe_hf_config_free(hc);

	snprintf(json, sizeof(json), "%s, \"num_local_experts\": 6, \"num_experts\": 6}", head);
	r = parse(json, &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(hc->cfg.num_experts, 6);
	moe_hf_config_free(hc);

	snprintf(json, sizeof(json), "%s, \"num_local_experts\": 6, \"num_experts\": 8}", head);
	expect_config_error(json, "fields 'num_experts' (8) and 'num_local_experts' (6) disagree");
	snprintf(json, sizeof(json), "%s}", head);
	expect_config_error(json, "missing field 'num_experts' (or 'num_local_experts'");
	snprintf(json, sizeof(json), "%s, \"num_local_experts\": \"6\"}", head);
	expect_config_error(json, "field 'num_local_experts' must be an integer");
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
 * the clamp and the biases; the MXFP4 release's quantization_config read,
 * for gpt_oss only. */
START_TEST(config_gpt_oss_defaults_and_mxfp4)
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

	r = parse("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 24,"
		  " \"quantization_config\": {\"quant_method\": \"mxfp4\","
		  " \"modules_to_not_convert\": [\"model.layers.*.self_attn\"]}}", &hc, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert(hc->mxfp4 && !hc->fp8);
	moe_hf_config_free(hc);
	expect_config_error("{\"model_type\": \"mixtral\", \"hidden_size\": 64, \"num_hidden_layers\": 2,"
			    " \"quantization_config\": {\"quant_method\": \"mxfp4\"}}",
			    "quant_method mxfp4 is read in gpt-oss's release layout (model_type gpt_oss), "
			    "not for model_type mixtral");
	expect_config_error("{\"model_type\": \"gpt_oss\", \"hidden_size\": 2880, \"num_hidden_layers\": 24,"
			    " \"quantization_config\": {\"quant_method\": \"mxfp4\","
			    " \"modules_to_not_convert\": \"lm_head\"}}",
			    "modules_to_not_convert must be an array");
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
	dir = moe_test_gen(&o, moe_arch_name(all_archs[_i]));
	out = moe_test_pack_to(dir, -1, &s);
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
	dir = moe_test_gen(&o, "gptoss");
	out = moe_test_pack_to(dir, -1, &s);
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
	out = moe_test_pack_to(dir, MOE_DTYPE_F32, &s);
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
	dir = moe_test_gen(&o, "sharded");
	ck_assert(asprintf(&index, "%s/model.safetensors.index.json", dir) > 0);
	ck_assert_msg(moe_test_exists(index), "gen-model wrote no index");
	out = moe_test_pack_to(dir, -1, &s);
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
		dir = moe_test_gen(&o, "fused");
		out = moe_test_pack_to(dir, -1, &s);
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

		dir = moe_test_gen(&o, "dtype");
		out = moe_test_pack_to(dir, to[k], &s);
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
	dir = moe_test_gen(&o, "plain");
	out = moe_test_pack_to(dir, -1, &s);
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
	dir = moe_test_gen(&o, "fail");
	ck_assert(moe_test_sh(NULL, "sed -i 's/\"moe_intermediate_size\": *32/\"moe_intermediate_size\": 16/' '%s/config.json'",
			      dir) == 0);
	ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
	ck_assert(asprintf(&tmp, "%s/out.moe.tmp", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_int_eq(r, -EINVAL);
	ck_assert_msg(strstr(err.msg, "has shape [32, 64], expected [16, 64]"), "%s", err.msg);
	ck_assert(!moe_test_exists(out) && !moe_test_exists(tmp));
	/* nor a temporary of its own (".out.moe.XXXXXXXX") */
	ck_assert_int_eq(moe_test_sh(NULL, "ls -A '%s' | grep -q '^\\.out\\.moe\\.'", dir), 1);
	free(out);
	free(tmp);
	free(dir);
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
	dir = moe_test_gen(&o, "progress");
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
	dir = moe_test_gen(&o, "mixed");
	ck_assert(moe_test_sh(NULL, "LC_ALL=C sed -i 's/\\(\"model.layers.1.mlp.experts.2.up_proj.weight\":{\"dtype\":\"\\)BF16\"/\\1F16\" /' '%s/model.safetensors'",
			      dir) == 0);
	ck_assert(asprintf(&out, "%s/m.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_int_eq(r, -EINVAL);
	ck_assert_msg(strstr(err.msg, "more than one dtype (bf16, and f16 in tensor "
			     "'model.layers.1.mlp.experts.2.up_proj.weight')"), "%s", err.msg);
	free(out);
	out = moe_test_pack_to(dir, MOE_DTYPE_BF16, &s);
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
	tcase_add_test(tc, config_qwen_reads_num_local_experts);
	tcase_add_test(tc, config_glm4_moe_routes_as_deepseek_v3);
	tcase_add_test(tc, config_gpt_oss_defaults_and_mxfp4);
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
