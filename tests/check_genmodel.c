/* SPDX-License-Identifier: MIT */
/*
 * The checkpoints moectl gen-model writes (genmodel.c): the tensors, shapes,
 * dtypes and config.json of every architecture as the real checkpoints
 * name them, values scaled as a real router and real experts would be,
 * the same bytes for the same seed however they are chunked and sharded,
 * write errors reported, bad options refused; and the command line.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <jansson.h>

#include "formats/genmodel.h"
#include "formats/safetensors.h"
#include "testutil.h"

struct want_tensor {
	const char *name;
	int dtype;          /* -2: the model dtype */
	uint32_t ndim;
	uint64_t shape[3];
};

struct want_arch {
	enum moe_arch arch;
	const char *absent[4];              /* names that must not exist */
	struct want_tensor t[10];
	const char *cfg_int[4];             /* "key=value" integer fields */
	const char *cfg_str[3];             /* "key=value" string fields */
};

#define MD (-2)

/* The tiny defaults: H 64, I 32, dense I 128, vocab 256. */
static const struct want_arch want_archs[] = {
	{ MOE_ARCH_MIXTRAL,
	  { "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight" },
	  { { "model.layers.0.block_sparse_moe.gate.weight", MD, 2, { 8, 64 } },
	    { "model.layers.1.block_sparse_moe.experts.7.w1.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.block_sparse_moe.experts.7.w2.weight", MD, 2, { 64, 32 } },
	    { "model.layers.1.block_sparse_moe.experts.0.w3.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.self_attn.k_proj.weight", MD, 2, { 32, 64 } },
	    { "model.embed_tokens.weight", MD, 2, { 256, 64 } },
	    { "lm_head.weight", MD, 2, { 256, 64 } },
	    { "model.norm.weight", MD, 1, { 64 } } },
	  { "num_local_experts=8", "intermediate_size=32", "num_experts_per_tok=2", "hidden_size=64" },
	  { "architectures=MixtralForCausalLM", "hidden_act=silu" } },
	{ MOE_ARCH_QWEN2_MOE,
	  { "model.layers.0.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight" },
	  { { "model.layers.0.mlp.gate.weight", MD, 2, { 8, 64 } },
	    { "model.layers.1.mlp.experts.7.down_proj.weight", MD, 2, { 64, 32 } },
	    { "model.layers.1.mlp.experts.0.gate_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.mlp.shared_expert.gate_proj.weight", MD, 2, { 128, 64 } },
	    { "model.layers.1.mlp.shared_expert.down_proj.weight", MD, 2, { 64, 128 } },
	    { "model.layers.1.mlp.shared_expert_gate.weight", MD, 2, { 1, 64 } },
	    { "model.layers.0.self_attn.q_proj.bias", MD, 1, { 64 } },
	    { "model.layers.0.self_attn.v_proj.bias", MD, 1, { 32 } } },
	  { "num_experts=8", "moe_intermediate_size=32", "shared_expert_intermediate_size=128",
	    "decoder_sparse_step=1" },
	  { "architectures=Qwen2MoeForCausalLM" } },
	{ MOE_ARCH_QWEN3_MOE,
	  { "model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.self_attn.q_proj.bias" },
	  { { "model.layers.0.mlp.gate.weight", MD, 2, { 8, 64 } },
	    { "model.layers.1.mlp.experts.3.up_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.0.self_attn.q_norm.weight", MD, 1, { 16 } },
	    { "model.layers.0.self_attn.k_norm.weight", MD, 1, { 16 } },
	    { "model.layers.0.self_attn.q_proj.weight", MD, 2, { 64, 64 } },
	    { "model.layers.0.self_attn.k_proj.weight", MD, 2, { 32, 64 } } },
	  { "num_experts=8", "head_dim=16", "moe_intermediate_size=32" },
	  { "architectures=Qwen3MoeForCausalLM" } },
	{ MOE_ARCH_OLMOE,
	  { "model.layers.0.mlp.shared_expert.up_proj.weight" },
	  { { "model.layers.0.mlp.gate.weight", MD, 2, { 8, 64 } },
	    { "model.layers.1.mlp.experts.7.gate_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.self_attn.q_norm.weight", MD, 1, { 64 } },
	    { "model.layers.1.self_attn.k_norm.weight", MD, 1, { 64 } } },
	  { "num_experts=8", "intermediate_size=32", "num_experts_per_tok=2" },
	  { "architectures=OlmoeForCausalLM" } },
	{ MOE_ARCH_DEEPSEEK_V2,
	  { "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
	    "model.layers.3.mlp.gate.weight", "model.layers.0.self_attn.q_a_proj.weight" },
	  { { "model.layers.0.mlp.gate_proj.weight", MD, 2, { 128, 64 } },
	    { "model.layers.0.mlp.down_proj.weight", MD, 2, { 64, 128 } },
	    { "model.layers.1.mlp.gate.weight", MD, 2, { 8, 64 } },
	    { "model.layers.2.mlp.experts.7.up_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.2.mlp.shared_experts.gate_proj.weight", MD, 2, { 64, 64 } },
	    { "model.layers.2.mlp.shared_experts.down_proj.weight", MD, 2, { 64, 64 } },
	    { "model.layers.0.self_attn.q_proj.weight", MD, 2, { 96, 64 } },
	    { "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", MD, 2, { 40, 64 } },
	    { "model.layers.0.self_attn.kv_b_proj.weight", MD, 2, { 128, 32 } },
	    { "model.layers.0.self_attn.o_proj.weight", MD, 2, { 64, 64 } } },
	  { "n_routed_experts=8", "n_shared_experts=2", "first_k_dense_replace=1", "moe_intermediate_size=32" },
	  { "topk_method=greedy", "scoring_func=softmax", "architectures=DeepseekV2ForCausalLM" } },
	{ MOE_ARCH_DEEPSEEK_V3,
	  { "model.layers.0.mlp.gate.weight", "model.layers.4.mlp.gate.weight" },
	  { { "model.layers.0.mlp.up_proj.weight", MD, 2, { 128, 64 } },
	    { "model.layers.1.mlp.gate.weight", MD, 2, { 16, 64 } },
	    { "model.layers.1.mlp.gate.e_score_correction_bias", MOE_DTYPE_F32, 1, { 16 } },
	    { "model.layers.2.mlp.experts.15.down_proj.weight", MD, 2, { 64, 32 } },
	    { "model.layers.2.mlp.shared_experts.up_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.self_attn.q_a_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.self_attn.q_b_proj.weight", MD, 2, { 96, 32 } },
	    /* The MTP layer: layer num_hidden_layers, MoE, with its own head. */
	    { "model.layers.3.eh_proj.weight", MD, 2, { 64, 128 } },
	    { "model.layers.3.mlp.experts.15.gate_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.3.shared_head.head.weight", MD, 2, { 256, 64 } } },
	  { "n_group=4", "topk_group=2", "num_nextn_predict_layers=1", "n_routed_experts=16" },
	  { "topk_method=noaux_tc", "scoring_func=sigmoid", "architectures=DeepseekV3ForCausalLM" } },
	{ MOE_ARCH_GLM4_MOE,
	  /* GLM-4.5's MTP layer shares lm_head; GQA attention, not MLA; no qk norm (Air) */
	  { "model.layers.0.mlp.gate.weight", "model.layers.3.shared_head.head.weight",
	    "model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" },
	  { { "model.layers.0.mlp.gate_proj.weight", MD, 2, { 128, 64 } },
	    { "model.layers.1.mlp.gate.weight", MD, 2, { 16, 64 } },
	    { "model.layers.2.mlp.gate.e_score_correction_bias", MOE_DTYPE_F32, 1, { 16 } },
	    { "model.layers.2.mlp.experts.15.down_proj.weight", MD, 2, { 64, 32 } },
	    { "model.layers.1.mlp.shared_experts.gate_proj.weight", MD, 2, { 32, 64 } },
	    { "model.layers.1.self_attn.q_proj.bias", MD, 1, { 64 } },
	    { "model.layers.1.self_attn.k_proj.bias", MD, 1, { 32 } },
	    { "model.layers.3.eh_proj.weight", MD, 2, { 64, 128 } },
	    { "model.layers.3.mlp.gate.e_score_correction_bias", MOE_DTYPE_F32, 1, { 16 } },
	    { "model.layers.3.shared_head.norm.weight", MD, 1, { 64 } } },
	  { "n_routed_experts=16", "head_dim=16", "first_k_dense_replace=1", "num_nextn_predict_layers=1" },
	  { "architectures=Glm4MoeForCausalLM", "hidden_act=silu" } },
	{ MOE_ARCH_GPT_OSS,
	  /* transformers' bf16 layout: x @ W experts with biases, a biased
	   * router, attention with biases and sinks; no dense MLP, no MXFP4 */
	  { "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj_blocks",
	    "model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight" },
	  { { "model.layers.0.mlp.router.weight", MD, 2, { 8, 64 } },
	    { "model.layers.0.mlp.router.bias", MD, 1, { 8 } },
	    { "model.layers.1.mlp.experts.gate_up_proj", MD, 3, { 8, 64, 64 } },
	    { "model.layers.1.mlp.experts.gate_up_proj_bias", MD, 2, { 8, 64 } },
	    { "model.layers.1.mlp.experts.down_proj", MD, 3, { 8, 32, 64 } },
	    { "model.layers.1.mlp.experts.down_proj_bias", MD, 2, { 8, 64 } },
	    { "model.layers.0.self_attn.sinks", MD, 1, { 4 } },
	    { "model.layers.0.self_attn.q_proj.weight", MD, 2, { 64, 64 } },
	    { "model.layers.0.self_attn.k_proj.bias", MD, 1, { 32 } },
	    { "model.layers.0.self_attn.o_proj.bias", MD, 1, { 64 } } },
	  { "num_local_experts=8", "intermediate_size=32", "num_experts_per_tok=4", "head_dim=16" },
	  { "architectures=GptOssForCausalLM", "hidden_act=silu" } },
};

static void check_tensor(const struct moe_st_checkpoint *c, const struct want_tensor *w, int model_dtype)
{
	const struct moe_st_tensor *t = moe_st_find(c, w->name);

	ck_assert_msg(t != NULL, "tensor %s missing", w->name);
	ck_assert_msg(t->dtype == (w->dtype == MD ? model_dtype : w->dtype), "%s: dtype %s", w->name,
		      t->st_dtype);
	ck_assert_msg(t->ndim == w->ndim, "%s: ndim %u, expected %u", w->name, t->ndim, w->ndim);
	for (uint32_t d = 0; d < w->ndim; d++)
		ck_assert_msg(t->shape[d] == w->shape[d], "%s: shape[%u] %" PRIu64 ", expected %" PRIu64,
			      w->name, d, t->shape[d], w->shape[d]);
}

static json_t *load_config(const char *dir)
{
	char *p = moe_test_path_join(dir, "config.json");
	json_error_t jerr;
	json_t *j = json_load_file(p, 0, &jerr);

	ck_assert_msg(j != NULL, "%s: %s", p, jerr.text);
	free(p);
	return j;
}

static void check_config_field(json_t *cfg, const char *kv, bool is_int)
{
	char key[64];
	const char *eq = strchr(kv, '=');
	json_t *v;

	snprintf(key, sizeof(key), "%.*s", (int)(eq - kv), kv);
	v = json_object_get(cfg, key);
	ck_assert_msg(v != NULL, "config.json has no %s", key);
	if (json_is_array(v))
		v = json_array_get(v, 0);
	if (is_int)
		ck_assert_msg(json_is_integer(v) && json_integer_value(v) == atoll(eq + 1),
			      "config.json %s is not %s", key, eq + 1);
	else
		ck_assert_msg(json_is_string(v) && !strcmp(json_string_value(v), eq + 1),
			      "config.json %s is not %s", key, eq + 1);
}

static void gen(const struct moe_gen_options *o, const char *dir)
{
	struct moe_err err = { 0 };

	ck_assert_msg(moe_gen_model(o, dir, NULL, NULL, &err) == 0, "gen-model: %s", err.msg);
}

START_TEST(gen_model_writes_real_layout)
{
	const struct want_arch *w = &want_archs[_i];
	char *dir = moe_test_tmpdir("gen");
	struct moe_gen_options o;
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	json_t *cfg;

	moe_gen_defaults(w->arch, &o);
	gen(&o, dir);
	ck_assert_msg(moe_st_checkpoint_open(dir, &c, &err) == 0, "%s", err.msg);
	for (size_t i = 0; i < sizeof(w->t) / sizeof(w->t[0]) && w->t[i].name; i++)
		check_tensor(c, &w->t[i], MOE_DTYPE_BF16);
	for (size_t i = 0; i < 4 && w->absent[i]; i++)
		ck_assert_msg(moe_st_find(c, w->absent[i]) == NULL, "%s should not exist", w->absent[i]);
	/* Every tensor but the V3 bias has the model dtype; norms are 1.0. */
	for (size_t i = 0; i < c->n_tensors; i++)
		if (!strstr(c->tensors[i].name, "e_score_correction_bias"))
			ck_assert_msg(c->tensors[i].dtype == MOE_DTYPE_BF16, "%s is %s", c->tensors[i].name,
				      c->tensors[i].st_dtype);
	{
		uint16_t one;

		ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "model.norm.weight"), 2, &one, 2, &err), 0);
		ck_assert_uint_eq(one, 0x3f80);
	}
	moe_st_checkpoint_close(c);

	cfg = load_config(dir);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "model_type")), moe_arch_name(w->arch));
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_hidden_layers")),
			 w->arch == MOE_ARCH_DEEPSEEK_V2 || w->arch == MOE_ARCH_DEEPSEEK_V3 ||
			 w->arch == MOE_ARCH_GLM4_MOE ? 3 : 2);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "torch_dtype")), "bfloat16");
	ck_assert(json_is_false(json_object_get(cfg, "tie_word_embeddings")));
	ck_assert(json_is_real(json_object_get(cfg, "rms_norm_eps")));
	for (size_t i = 0; i < 4 && w->cfg_int[i]; i++)
		check_config_field(cfg, w->cfg_int[i], true);
	for (size_t i = 0; i < 3 && w->cfg_str[i]; i++)
		check_config_field(cfg, w->cfg_str[i], false);
	json_decref(cfg);
	free(dir);
}
END_TEST

START_TEST(gen_model_router_and_expert_values_are_scaled)
{
	char *dir = moe_test_tmpdir("gen");
	struct moe_gen_options o;
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	float router[8 * 64], bias[16];
	double ss = 0;

	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.dtype = MOE_DTYPE_F32;
	o.num_experts = 8;
	o.n_group = 4;
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "model.layers.1.mlp.gate.weight"), 0, router,
				     sizeof(router), &err), 0);
	for (size_t i = 0; i < 8 * 64; i++)
		ss += (double)router[i] * router[i];
	/* std 2/sqrt(H) = 0.25, within sampling noise */
	ck_assert_double_eq_tol(sqrt(ss / (8 * 64)), 0.25, 0.03);
	ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "model.layers.1.mlp.gate.e_score_correction_bias"),
				     0, bias, 32, &err), 0);
	for (int i = 0; i < 8; i++)
		ck_assert_float_le(fabsf(bias[i]), 0.05f);
	ck_assert_float_ne(bias[0], bias[1]);
	moe_st_checkpoint_close(c);
	free(dir);
}
END_TEST

static void expect_gen_error(const struct moe_gen_options *o, const char *needle);

/* --quant fp8 writes what DeepSeek-V3's release holds: F8_E4M3 MLP and
 * expert matrices with float32 weight_scale_inv [ceil(r/128), ceil(c/128)]
 * (partial blocks at H 200, I 72), quantization_config, the rest in the
 * model dtype; each block's scale is its max |w| / 448 of the f32
 * checkpoint of the same seed, and every code that value over the scale
 * rounded to nearest e4m3. */
START_TEST(gen_model_fp8_quantizes_the_same_values)
{
	static const char *const mats[] = {
		"model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight",
		"model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
	};
	char *dq = moe_test_tmpdir("genq"), *df = moe_test_tmpdir("genf");
	struct moe_gen_options o;
	struct moe_st_checkpoint *cq, *cf;
	struct moe_err err = { 0 };
	json_t *cfg, *q;

	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.hidden_size = 200;
	o.moe_intermediate_size = 72;
	o.dtype = MOE_DTYPE_F32;
	gen(&o, df);
	o.dtype = MOE_DTYPE_BF16;
	o.quant_fp8 = true;
	gen(&o, dq);
	cfg = load_config(dq);
	q = json_object_get(cfg, "quantization_config");
	ck_assert_ptr_nonnull(q);
	ck_assert_str_eq(json_string_value(json_object_get(q, "quant_method")), "fp8");
	ck_assert_str_eq(json_string_value(json_object_get(q, "fmt")), "e4m3");
	ck_assert_str_eq(json_string_value(json_object_get(q, "activation_scheme")), "dynamic");
	ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 1)), 128);
	json_decref(cfg);
	ck_assert_int_eq(moe_st_checkpoint_open(dq, &cq, &err), 0);
	ck_assert_int_eq(moe_st_checkpoint_open(df, &cf, &err), 0);
	ck_assert_str_eq(moe_st_find(cq, "model.layers.1.mlp.gate.weight")->st_dtype, "BF16");
	ck_assert_str_eq(moe_st_find(cq, "model.layers.1.self_attn.o_proj.weight")->st_dtype, "BF16");
	for (size_t m = 0; m < sizeof(mats) / sizeof(mats[0]); m++) {
		const struct moe_st_tensor *t = moe_st_find(cq, mats[m]), *f = moe_st_find(cf, mats[m]), *s;
		char sname[160];
		uint64_t R, C, kb;
		uint8_t *codes;
		float *w, *sc;

		ck_assert_msg(t && f, "%s missing", mats[m]);
		ck_assert_str_eq(t->st_dtype, "F8_E4M3");
		snprintf(sname, sizeof(sname), "%s_scale_inv", mats[m]);
		s = moe_st_find(cq, sname);
		ck_assert_msg(s != NULL, "%s missing", sname);
		R = t->shape[0];
		C = t->shape[1];
		kb = (C + 127) / 128;
		ck_assert_str_eq(s->st_dtype, "F32");
		ck_assert(s->ndim == 2 && s->shape[0] == (R + 127) / 128 && s->shape[1] == kb);
		codes = malloc(R * C);
		w = malloc(R * C * 4);
		sc = malloc(s->nbytes);
		ck_assert_int_eq(moe_st_read(cq, t, 0, codes, R * C, &err), 0);
		ck_assert_int_eq(moe_st_read(cf, f, 0, w, R * C * 4, &err), 0);
		ck_assert_int_eq(moe_st_read(cq, s, 0, sc, s->nbytes, &err), 0);
		for (uint64_t bi = 0; bi < s->shape[0]; bi++)
			for (uint64_t bj = 0; bj < kb; bj++) {
				float amax = 0;

				for (uint64_t r = bi * 128; r < R && r < bi * 128 + 128; r++)
					for (uint64_t c = bj * 128; c < C && c < bj * 128 + 128; c++)
						amax = fmaxf(amax, fabsf(w[r * C + c]));
				ck_assert_msg(sc[bi * kb + bj] == amax / 448.0f, "%s block %llu,%llu: scale %g, "
					      "max/448 %g", mats[m], (unsigned long long)bi,
					      (unsigned long long)bj, (double)sc[bi * kb + bj], (double)(amax / 448.0f));
			}
		for (uint64_t r = 0; r < R; r++)
			for (uint64_t c = 0; c < C; c++) {
				float s1 = sc[r / 128 * kb + c / 128], v = w[r * C + c] / s1;

				ck_assert_msg(codes[r * C + c] == moe_f32_to_e4m3(v), "%s [%llu][%llu]: code 0x%02x, "
					      "want 0x%02x", mats[m], (unsigned long long)r, (unsigned long long)c,
					      codes[r * C + c], moe_f32_to_e4m3(v));
				/* and the dequantized weight is within half an e4m3 step */
				ck_assert(fabs((double)moe_e4m3_to_f32(codes[r * C + c]) * s1 - w[r * C + c]) <=
					  fmax(fabs(w[r * C + c]) / 16, 0x1p-10 * s1) * 1.0001);
			}
		free(codes);
		free(w);
		free(sc);
	}
	moe_st_checkpoint_close(cq);
	moe_st_checkpoint_close(cf);
	o.fused_experts = true;
	expect_gen_error(&o, "not with fused experts");
	free(dq);
	free(df);
}
END_TEST

static char *slurp_file(const char *dir, const char *name, uint64_t *len)
{
	char *p = moe_test_path_join(dir, name), *s = moe_test_slurp(p, len);

	ck_assert_msg(s != NULL, "cannot read %s", p);
	free(p);
	return s;
}

START_TEST(gen_model_same_seed_same_bytes)
{
	char *a = moe_test_tmpdir("gena"), *b = moe_test_tmpdir("genb"), *c = moe_test_tmpdir("genc");
	struct moe_gen_options o;
	uint64_t la, lb, lc;
	char *fa, *fb, *fc;

	moe_gen_defaults(MOE_ARCH_QWEN2_MOE, &o);
	o.seed = 7;
	gen(&o, a);
	gen(&o, b);
	o.seed = 8;
	gen(&o, c);
	fa = slurp_file(a, "model.safetensors", &la);
	fb = slurp_file(b, "model.safetensors", &lb);
	fc = slurp_file(c, "model.safetensors", &lc);
	ck_assert_uint_eq(la, lb);
	ck_assert_msg(memcmp(fa, fb, la) == 0, "same seed, different bytes");
	ck_assert_uint_eq(la, lc);
	ck_assert_msg(memcmp(fa, fc, la) != 0, "different seeds, same bytes");
	free(fa);
	free(fb);
	free(fc);
	fa = slurp_file(a, "config.json", NULL);
	fb = slurp_file(b, "config.json", NULL);
	ck_assert_str_eq(fa, fb);
	free(fa);
	free(fb);
	free(a);
	free(b);
	free(c);
}
END_TEST

/* Values are a function of (seed, name, index) only: a bf16 checkpoint is
 * the f32 one rounded, though the two are cut into different chunks. */
START_TEST(gen_model_values_do_not_depend_on_chunking)
{
	char *a = moe_test_tmpdir("genf32"), *b = moe_test_tmpdir("genbf16");
	struct moe_gen_options o;
	struct moe_st_checkpoint *ca, *cb;
	struct moe_err err = { 0 };
	const struct moe_st_tensor *ta, *tb;
	float *f;
	uint16_t *h;
	size_t n;

	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.vocab_size = 40000;           /* embeddings: 10 MB in f32, 3 chunks */
	o.dtype = MOE_DTYPE_F32;
	gen(&o, a);
	o.dtype = MOE_DTYPE_BF16;
	gen(&o, b);
	ck_assert_int_eq(moe_st_checkpoint_open(a, &ca, &err), 0);
	ck_assert_int_eq(moe_st_checkpoint_open(b, &cb, &err), 0);
	ta = moe_st_find(ca, "model.embed_tokens.weight");
	tb = moe_st_find(cb, "model.embed_tokens.weight");
	n = (size_t)(ta->nbytes / 4);
	ck_assert_uint_eq(tb->nbytes, n * 2);
	f = malloc(ta->nbytes);
	h = malloc(tb->nbytes);
	ck_assert_int_eq(moe_st_read(ca, ta, 0, f, ta->nbytes, &err), 0);
	ck_assert_int_eq(moe_st_read(cb, tb, 0, h, tb->nbytes, &err), 0);
	for (size_t i = 0; i < n; i++)
		if (moe_f32_to_bf16(f[i]) != h[i])
			ck_abort_msg("element %zu: f32 %a rounds to %04x, bf16 file has %04x", i, (double)f[i],
				     moe_f32_to_bf16(f[i]), h[i]);
	free(f);
	free(h);
	moe_st_checkpoint_close(ca);
	moe_st_checkpoint_close(cb);
	free(a);
	free(b);
}
END_TEST

START_TEST(gen_model_reports_write_errors)
{
	char *dir = moe_test_tmpdir("genw");
	struct moe_gen_options o;
	struct moe_err err = { 0 };
	struct rlimit old, lim;
	void (*old_sig)(int);
	int r;

	/* A file size limit makes write(2) fail with EFBIG part way. */
	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.vocab_size = 40000;
	ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
	lim = old;
	lim.rlim_cur = 6 << 20;
	old_sig = signal(SIGXFSZ, SIG_IGN);
	ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
	r = moe_gen_model(&o, dir, NULL, NULL, &err);
	setrlimit(RLIMIT_FSIZE, &old);
	signal(SIGXFSZ, old_sig);
	ck_assert_int_eq(r, -EFBIG);
	moe_test_assert_err_has(&err, "model.safetensors");
	free(dir);
}
END_TEST

START_TEST(gen_model_shards_with_index)
{
	char *dir = moe_test_tmpdir("gens"), *one = moe_test_tmpdir("gen1"), *p;
	struct moe_gen_options o;
	struct moe_st_checkpoint *c, *c1;
	struct moe_err err = { 0 };
	json_t *idx, *wm;
	json_error_t jerr;
	uint64_t total = 0;
	unsigned char x[256], y[256];
	const struct moe_st_tensor *t, *t1;

	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.shard_bytes = 200000;
	gen(&o, dir);
	p = moe_test_path_join(dir, "model.safetensors.index.json");
	idx = json_load_file(p, 0, &jerr);
	ck_assert_msg(idx != NULL, "%s: %s", p, jerr.text);
	free(p);
	p = moe_test_path_join(dir, "model.safetensors");
	ck_assert_int_eq(access(p, F_OK), -1);
	free(p);

	ck_assert_msg(moe_st_checkpoint_open(dir, &c, &err) == 0, "%s", err.msg);
	ck_assert_uint_ge(c->n_files, 4);
	for (uint32_t f = 0; f < c->n_files; f++) {
		char name[64];

		snprintf(name, sizeof(name), "model-%05u-of-%05u.safetensors", f + 1, c->n_files);
		p = moe_test_path_join(dir, name);
		ck_assert_int_eq(access(p, F_OK), 0);
		free(p);
	}
	wm = json_object_get(idx, "weight_map");
	ck_assert_uint_eq(json_object_size(wm), c->n_tensors);
	for (size_t i = 0; i < c->n_tensors; i++)
		total += c->tensors[i].nbytes;
	ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(idx, "metadata"), "total_size")),
			 (json_int_t)total);
	for (uint32_t f = 0; f < c->n_files; f++)
		ck_assert_uint_le(c->files[f].size, 200000 + 65536);
	json_decref(idx);

	/* The values do not depend on the sharding. */
	o.shard_bytes = 0;
	gen(&o, one);
	ck_assert_int_eq(moe_st_checkpoint_open(one, &c1, &err), 0);
	ck_assert_uint_eq(c1->n_files, 1);
	ck_assert_uint_eq(c1->n_tensors, c->n_tensors);
	t = moe_st_find(c, "model.layers.2.mlp.experts.9.down_proj.weight");
	t1 = moe_st_find(c1, "model.layers.2.mlp.experts.9.down_proj.weight");
	ck_assert_int_eq(moe_st_read(c, t, 0, x, sizeof(x), &err), 0);
	ck_assert_int_eq(moe_st_read(c1, t1, 0, y, sizeof(y), &err), 0);
	ck_assert_mem_eq(x, y, sizeof(x));
	moe_st_checkpoint_close(c1);
	moe_st_checkpoint_close(c);

	/* Writing again unsharded into the same directory replaces the shards. */
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	ck_assert_uint_eq(c->n_files, 1);
	moe_st_checkpoint_close(c);
	p = moe_test_path_join(dir, "model-00001-of-00002.safetensors");
	ck_assert_int_eq(access(p, F_OK), -1);
	free(p);
	free(dir);
	free(one);
}
END_TEST

START_TEST(gen_model_fused_plain_and_dtype_variants)
{
	char *dir = moe_test_tmpdir("genv");
	struct moe_gen_options o;
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	json_t *cfg;

	moe_gen_defaults(MOE_ARCH_QWEN3_MOE, &o);
	o.fused_experts = true;
	o.dtype = MOE_DTYPE_F16;
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	check_tensor(c, &(struct want_tensor){ "model.layers.1.mlp.experts.gate_up_proj", MD, 3, { 8, 64, 64 } },
		     MOE_DTYPE_F16);
	check_tensor(c, &(struct want_tensor){ "model.layers.1.mlp.experts.down_proj", MD, 3, { 8, 64, 32 } },
		     MOE_DTYPE_F16);
	ck_assert_ptr_null(moe_st_find(c, "model.layers.1.mlp.experts.0.up_proj.weight"));
	moe_st_checkpoint_close(c);
	cfg = load_config(dir);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "torch_dtype")), "float16");
	json_decref(cfg);

	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.plain_experts = true;
	o.hidden_act = "gelu";
	o.dtype = MOE_DTYPE_F32;
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	check_tensor(c, &(struct want_tensor){ "model.layers.0.block_sparse_moe.experts.1.w3.weight", MD, 2,
					       { 32, 64 } }, MOE_DTYPE_F32);
	ck_assert_ptr_null(moe_st_find(c, "model.layers.0.block_sparse_moe.experts.1.w1.weight"));
	moe_st_checkpoint_close(c);
	cfg = load_config(dir);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "hidden_act")), "gelu");
	json_decref(cfg);

	/* Fused plain experts: up_proj [E, I, H], no gate rows. */
	moe_gen_defaults(MOE_ARCH_OLMOE, &o);
	o.fused_experts = o.plain_experts = true;
	o.hidden_act = "relu";
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	check_tensor(c, &(struct want_tensor){ "model.layers.0.mlp.experts.up_proj", MD, 3, { 8, 32, 64 } },
		     MOE_DTYPE_BF16);
	ck_assert_ptr_null(moe_st_find(c, "model.layers.0.mlp.experts.gate_up_proj"));
	moe_st_checkpoint_close(c);

	/* qwen dense layers from decoder_sparse_step: layers 0 and 2 dense. */
	moe_gen_defaults(MOE_ARCH_QWEN2_MOE, &o);
	o.num_layers = 4;
	o.decoder_sparse_step = 2;
	gen(&o, dir);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
	check_tensor(c, &(struct want_tensor){ "model.layers.2.mlp.up_proj.weight", MD, 2, { 128, 64 } },
		     MOE_DTYPE_BF16);
	check_tensor(c, &(struct want_tensor){ "model.layers.3.mlp.gate.weight", MD, 2, { 8, 64 } },
		     MOE_DTYPE_BF16);
	ck_assert_ptr_null(moe_st_find(c, "model.layers.2.mlp.gate.weight"));
	moe_st_checkpoint_close(c);
	free(dir);
}
END_TEST

/* config.json as GLM-4.5-Air's: Glm4MoeConfig's fields and values, none of
 * DeepSeek-V3's that transformers would ignore (a reader trusting them
 * would be misled). */
START_TEST(gen_model_glm4_moe_config_is_glm_45s)
{
	char *dir = moe_test_tmpdir("genglm");
	struct moe_gen_options o;
	json_t *cfg;
	static const char *const absent[] = { "topk_method", "scoring_func", "moe_layer_freq",
					      "q_lora_rank", "kv_lora_rank", "num_experts" };

	moe_gen_defaults(MOE_ARCH_GLM4_MOE, &o);
	gen(&o, dir);
	cfg = load_config(dir);
	for (size_t i = 0; i < sizeof(absent) / sizeof(absent[0]); i++)
		ck_assert_msg(json_object_get(cfg, absent[i]) == NULL, "config.json has %s", absent[i]);
	ck_assert(json_is_true(json_object_get(cfg, "norm_topk_prob")));
	ck_assert(json_is_true(json_object_get(cfg, "attention_bias")));
	ck_assert(json_is_false(json_object_get(cfg, "use_qk_norm")));
	ck_assert_double_eq(json_real_value(json_object_get(cfg, "routed_scaling_factor")), 1.0);
	ck_assert_double_eq(json_real_value(json_object_get(cfg, "partial_rotary_factor")), 0.5);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "n_shared_experts")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "n_group")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "intermediate_size")), 128);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "moe_intermediate_size")), 32);
	json_decref(cfg);

	o.num_nextn_predict_layers = 0;
	o.routed_scaling_factor = 2.5f;
	o.norm_topk_prob = 0;
	gen(&o, dir);
	cfg = load_config(dir);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_nextn_predict_layers")), 0);
	ck_assert_double_eq(json_real_value(json_object_get(cfg, "routed_scaling_factor")), 2.5);
	ck_assert(json_is_false(json_object_get(cfg, "norm_topk_prob")));
	json_decref(cfg);
	{
		struct moe_st_checkpoint *c;
		struct moe_err err = { 0 };

		ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
		ck_assert_ptr_null(moe_st_find(c, "model.layers.3.eh_proj.weight"));
		moe_st_checkpoint_close(c);
	}
	free(dir);
}
END_TEST

/* config.json as gpt-oss-20b's, less the release's MXFP4
 * quantization_config: GptOssConfig's fields (swiglu_limit, layer_types,
 * sliding_window, yarn rope_scaling) and none it lacks. */
START_TEST(gen_model_gpt_oss_config_is_gpt_oss_20bs)
{
	char *dir = moe_test_tmpdir("genoss");
	struct moe_gen_options o;
	json_t *cfg, *types, *rope;
	static const char *const absent[] = { "quantization_config", "num_experts", "norm_topk_prob",
					      "moe_intermediate_size", "n_shared_experts" };

	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.num_layers = 3;
	gen(&o, dir);
	cfg = load_config(dir);
	for (size_t i = 0; i < sizeof(absent) / sizeof(absent[0]); i++)
		ck_assert_msg(json_object_get(cfg, absent[i]) == NULL, "config.json has %s", absent[i]);
	ck_assert_double_eq(json_real_value(json_object_get(cfg, "swiglu_limit")), 7.0);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "experts_per_token")), 4);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "sliding_window")), 128);
	ck_assert(json_is_true(json_object_get(cfg, "attention_bias")));
	types = json_object_get(cfg, "layer_types");
	ck_assert_uint_eq(json_array_size(types), 3);
	ck_assert_str_eq(json_string_value(json_array_get(types, 0)), "sliding_attention");
	ck_assert_str_eq(json_string_value(json_array_get(types, 1)), "full_attention");
	rope = json_object_get(cfg, "rope_scaling");
	ck_assert_str_eq(json_string_value(json_object_get(rope, "rope_type")), "yarn");
	ck_assert_double_eq(json_real_value(json_object_get(rope, "factor")), 32.0);
	json_decref(cfg);
	moe_test_rm_rf(dir);
	free(dir);
}
END_TEST

/* kimi-k2, shrunk as the other real presets are: config.json has
 * Kimi-K2's routing fields (routed_scaling_factor written 2.827, as the
 * release has it, not the float's 2.826999903), no MTP layer, and with
 * --quant fp8 the release's quantization_config. */
START_TEST(gen_model_kimi_k2_config_is_kimi_k2s)
{
	char *dir = moe_test_tmpdir("genkimi");
	struct moe_gen_options o;
	struct moe_err err = { 0 };
	json_t *cfg, *q;

	ck_assert_int_eq(moe_gen_preset("kimi-k2", &o, &err), 0);
	o.num_layers = 3;
	o.hidden_size = 256;
	o.moe_intermediate_size = 16;
	o.intermediate_size = 64;
	o.vocab_size = 64;
	gen(&o, dir);
	cfg = load_config(dir);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "model_type")), "deepseek_v3");
	ck_assert_str_eq(json_string_value(json_array_get(json_object_get(cfg, "architectures"), 0)),
			 "DeepseekV3ForCausalLM");
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "n_routed_experts")), 384);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_experts_per_tok")), 8);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "n_shared_experts")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "n_group")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "topk_group")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "first_k_dense_replace")), 1);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_nextn_predict_layers")), 0);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_hidden_layers")), 3);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_attention_heads")), 64);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "vocab_size")), 64);
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "topk_method")), "noaux_tc");
	ck_assert_str_eq(json_string_value(json_object_get(cfg, "scoring_func")), "sigmoid");
	ck_assert(json_is_true(json_object_get(cfg, "norm_topk_prob")));
	ck_assert_double_eq(json_real_value(json_object_get(cfg, "routed_scaling_factor")), 2.827);
	ck_assert_ptr_null(json_object_get(cfg, "quantization_config"));
	json_decref(cfg);

	o.quant_fp8 = true;
	gen(&o, dir);
	cfg = load_config(dir);
	q = json_object_get(cfg, "quantization_config");
	ck_assert_str_eq(json_string_value(json_object_get(q, "quant_method")), "fp8");
	ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 0)), 128);
	ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(q, "weight_block_size"), 1)), 128);
	json_decref(cfg);
	free(dir);
}
END_TEST

START_TEST(gen_model_presets_set_real_shapes)
{
	struct moe_gen_options o;
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_gen_preset("deepseek-v3", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_DEEPSEEK_V3);
	ck_assert_uint_eq(o.hidden_size, 7168);
	ck_assert_uint_eq(o.num_experts, 256);
	ck_assert_uint_eq(o.moe_intermediate_size, 2048);
	ck_assert_uint_eq(o.top_k, 8);
	ck_assert_uint_eq(o.n_group, 8);
	ck_assert_uint_eq(o.topk_group, 4);
	ck_assert_uint_eq(o.first_k_dense_replace, 3);
	ck_assert_float_eq(o.routed_scaling_factor, 2.5f);
	/* Kimi-K2's config.json (model_type kimi_k2, DeepseekV3ForCausalLM) */
	ck_assert_int_eq(moe_gen_preset("kimi-k2", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_DEEPSEEK_V3);
	ck_assert_uint_eq(o.hidden_size, 7168);
	ck_assert_uint_eq(o.moe_intermediate_size, 2048);
	ck_assert_uint_eq(o.intermediate_size, 18432);
	ck_assert_uint_eq(o.num_experts, 384);
	ck_assert_uint_eq(o.top_k, 8);
	ck_assert_uint_eq(o.n_group, 1);
	ck_assert_uint_eq(o.topk_group, 1);
	ck_assert_uint_eq(o.n_shared_experts, 1);
	ck_assert_uint_eq(o.first_k_dense_replace, 1);
	ck_assert_uint_eq(o.num_layers, 61);
	ck_assert_uint_eq(o.vocab_size, 163840);
	ck_assert_uint_eq(o.num_attention_heads, 64);
	ck_assert_uint_eq(o.num_key_value_heads, 64);
	ck_assert_int_eq(o.norm_topk_prob, 1);
	ck_assert_float_eq(o.routed_scaling_factor, 2.827f);
	ck_assert_uint_eq(o.q_lora_rank, 1536);
	ck_assert_uint_eq(o.kv_lora_rank, 512);
	ck_assert_uint_eq(o.num_nextn_predict_layers, 0);
	/* GLM-4.5-Air's config.json */
	ck_assert_int_eq(moe_gen_preset("glm-4.5-air", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_GLM4_MOE);
	ck_assert_uint_eq(o.hidden_size, 4096);
	ck_assert_uint_eq(o.moe_intermediate_size, 1408);
	ck_assert_uint_eq(o.intermediate_size, 10944);
	ck_assert_uint_eq(o.num_experts, 128);
	ck_assert_uint_eq(o.top_k, 8);
	ck_assert_uint_eq(o.num_layers, 46);
	ck_assert_uint_eq(o.vocab_size, 151552);
	ck_assert_uint_eq(o.num_attention_heads, 96);
	ck_assert_uint_eq(o.num_key_value_heads, 8);
	ck_assert_uint_eq(o.head_dim, 128);
	ck_assert_uint_eq(o.n_group, 1);
	ck_assert_uint_eq(o.topk_group, 1);
	ck_assert_uint_eq(o.n_shared_experts, 1);
	ck_assert_uint_eq(o.first_k_dense_replace, 1);
	ck_assert_int_eq(o.norm_topk_prob, 1);
	ck_assert_float_eq(o.routed_scaling_factor, 1.0f);
	ck_assert_uint_eq(o.num_nextn_predict_layers, 1);
	/* gpt-oss-20b's and gpt-oss-120b's config.json */
	ck_assert_int_eq(moe_gen_preset("gpt-oss-20b", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_GPT_OSS);
	ck_assert_uint_eq(o.hidden_size, 2880);
	ck_assert_uint_eq(o.moe_intermediate_size, 2880);
	ck_assert_uint_eq(o.intermediate_size, 0);
	ck_assert_uint_eq(o.num_experts, 32);
	ck_assert_uint_eq(o.top_k, 4);
	ck_assert_uint_eq(o.num_layers, 24);
	ck_assert_uint_eq(o.vocab_size, 201088);
	ck_assert_uint_eq(o.num_attention_heads, 64);
	ck_assert_uint_eq(o.num_key_value_heads, 8);
	ck_assert_uint_eq(o.head_dim, 64);
	ck_assert_uint_eq(o.n_shared_experts, 0);
	ck_assert_int_eq(o.norm_topk_prob, -1);
	ck_assert_int_eq(moe_gen_preset("gpt-oss-120b", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_GPT_OSS);
	ck_assert_uint_eq(o.hidden_size, 2880);
	ck_assert_uint_eq(o.num_experts, 128);
	ck_assert_uint_eq(o.top_k, 4);
	ck_assert_uint_eq(o.num_layers, 36);
	ck_assert_uint_eq(o.vocab_size, 201088);
	ck_assert_int_eq(moe_gen_preset("mixtral-8x7b", &o, &err), 0);
	ck_assert_uint_eq(o.moe_intermediate_size, 14336);
	ck_assert_int_eq(moe_gen_preset("qwen3-30b-a3b", &o, &err), 0);
	ck_assert_uint_eq(o.num_experts, 128);
	ck_assert_int_eq(o.norm_topk_prob, 1);
	o.arch = MOE_ARCH_OLMOE;
	ck_assert_int_eq(moe_gen_preset("small", &o, &err), 0);
	ck_assert_int_eq(o.arch, MOE_ARCH_OLMOE);
	ck_assert_int_eq(moe_gen_preset("gpt-5", &o, &err), -EINVAL);
	moe_test_assert_err_has(&err, "unknown preset 'gpt-5'");
	moe_test_assert_err_has(&err, "deepseek-v2-lite");
	moe_test_assert_err_has(&err, "kimi-k2");
	moe_test_assert_err_has(&err, "glm-4.5-air");
	moe_test_assert_err_has(&err, "gpt-oss-120b");
}
END_TEST

static void expect_gen_error(const struct moe_gen_options *o, const char *needle)
{
	char *dir = moe_test_tmpdir("gene");
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_gen_model(o, dir, NULL, NULL, &err), -EINVAL);
	moe_test_assert_err_has(&err, needle);
	free(dir);
}

START_TEST(gen_model_rejects_bad_options)
{
	struct moe_gen_options o;

	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.top_k = 9;
	expect_gen_error(&o, "top_k 9");
	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.n_group = 3;
	expect_gen_error(&o, "n_group 3");
	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.n_group = 2;
	expect_gen_error(&o, "deepseek");
	moe_gen_defaults(MOE_ARCH_OLMOE, &o);
	o.n_shared_experts = 1;
	expect_gen_error(&o, "no shared experts");
	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V2, &o);
	o.first_k_dense_replace = 3;
	expect_gen_error(&o, "no MoE layer");
	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V2, &o);
	o.topk_method = "noaux_tc";
	expect_gen_error(&o, "topk_method");
	moe_gen_defaults(MOE_ARCH_QWEN3_MOE, &o);
	o.hidden_act = "tanh";
	expect_gen_error(&o, "activation 'tanh'");
	moe_gen_defaults(MOE_ARCH_GLM4_MOE, &o);
	o.topk_method = "noaux_tc";                     /* not a Glm4MoeConfig field */
	expect_gen_error(&o, "topk_method");
	moe_gen_defaults(MOE_ARCH_GLM4_MOE, &o);
	o.shared_intermediate_size = 64;
	expect_gen_error(&o, "n_shared_experts x moe_intermediate_size");
	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.norm_topk_prob = 1;                           /* not a GptOssConfig field */
	expect_gen_error(&o, "gpt_oss has no norm_topk_prob");
	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.fused_experts = true;
	expect_gen_error(&o, "gpt_oss experts have one layout");
	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.hidden_act = "gelu";
	expect_gen_error(&o, "clamped SwiGLU");
	moe_gen_defaults(MOE_ARCH_GPT_OSS, &o);
	o.n_shared_experts = 1;
	expect_gen_error(&o, "gpt_oss has no shared experts");
	moe_gen_defaults(MOE_ARCH_QWEN3_MOE, &o);
	o.num_nextn_predict_layers = 1;
	expect_gen_error(&o, "deepseek_v3 and glm4_moe");
}
END_TEST

/* ------------------------------------------------------------ the CLI */

static bool have_moectl(void)
{
	if (access(moe_test_moectl(), X_OK) == 0)
		return true;
	fprintf(stderr, "note: %s not found, CLI checks skipped (set MOECTL)\n", moe_test_moectl());
	return false;
}

START_TEST(cli_gen_model_help_and_errors)
{
	char *dir = moe_test_tmpdir("cli"), *out = moe_test_path_join(dir, "out.txt"), *s;
	const char *m = moe_test_moectl();

	if (!have_moectl())
		goto done;
	ck_assert_int_eq(moe_test_sh(out, "'%s' gen-model --help", m), 0);
	s = moe_test_slurp(out, NULL);
	ck_assert_ptr_nonnull(strstr(s, "usage: moectl gen-model"));
	free(s);

	static const struct {
		const char *args, *msg;
		int status;          /* moectl(1): 1 bad input, 2 usage */
	} bad[] = {
		{ "--arch mixtral --top-k 9 -o %s/m", "top_k 9", 1 },
		{ "--arch deepseek_v3 --experts 16 --groups 3 -o %s/m", "n_group 3", 1 },
		{ "--arch llama -o %s/m", "unknown architecture 'llama'", 1 },
		{ "--preset huge -o %s/m", "unknown preset 'huge'", 1 },
		{ "--arch mixtral", "missing -o", 2 },
		{ "--arch mixtral --layers x -o %s/m", "--layers: expected a number", 1 },
		{ "--arch mixtral --bogus -o %s/m", "unknown option '--bogus'", 2 },
		{ "--preset tiny -o %s/m", "needs --arch", 1 },
		{ "--arch olmoe --preset mixtral-8x7b -o %s/m", "conflicts", 1 },
		{ "-o %s/m", "--arch or --preset is required", 2 },
		{ "--arch mixtral --intermediate 64 -o %s/m", "no dense layers", 1 },
		{ "--arch qwen3_moe --dtype f8 -o %s/m", "unknown dtype 'f8'", 1 },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char args[256];
		int r;

		snprintf(args, sizeof(args), bad[i].args, dir);
		r = moe_test_sh(out, "'%s' gen-model %s", m, args);
		ck_assert_msg(r == bad[i].status, "%s: exit %d, not %d", args, r, bad[i].status);
		s = moe_test_slurp(out, NULL);
		ck_assert_msg(strstr(s, bad[i].msg) != NULL, "%s: output '%s' lacks '%s'", args, s, bad[i].msg);
		/* One line, prefixed. */
		ck_assert_msg(strncmp(s, "moectl: ", 8) == 0 && strchr(s, '\n') == s + strlen(s) - 1,
			      "%s: '%s'", args, s);
		free(s);
	}
done:
	free(out);
	free(dir);
}
END_TEST

START_TEST(cli_gen_model_options_override_preset)
{
	char *dir = moe_test_tmpdir("cli"), *out = moe_test_path_join(dir, "out.txt"), *mdir = moe_test_path_join(dir, "m");
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	json_t *cfg;

	if (!have_moectl())
		goto done;
	ck_assert_int_eq(moe_test_sh(out, "'%s' gen-model --hidden 64 --preset qwen3-30b-a3b --layers 1 "
				     "--vocab 16 --moe-intermediate=32 --intermediate 64 --seed 3 -o %s",
				     moe_test_moectl(), mdir), 0);
	cfg = load_config(mdir);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "hidden_size")), 64);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_experts")), 128);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "num_experts_per_tok")), 8);
	ck_assert_int_eq(json_integer_value(json_object_get(cfg, "head_dim")), 128);
	ck_assert(json_is_true(json_object_get(cfg, "norm_topk_prob")));
	json_decref(cfg);
	ck_assert_int_eq(moe_st_checkpoint_open(mdir, &c, &err), 0);
	check_tensor(c, &(struct want_tensor){ "model.layers.0.mlp.experts.127.down_proj.weight", MD, 2,
					       { 64, 32 } }, MOE_DTYPE_BF16);
	check_tensor(c, &(struct want_tensor){ "model.layers.0.self_attn.q_proj.weight", MD, 2,
					       { 32 * 128, 64 } }, MOE_DTYPE_BF16);
	moe_st_checkpoint_close(c);
done:
	free(mdir);
	free(out);
	free(dir);
}
END_TEST

static Suite *genmodel_suite(void)
{
	Suite *s = suite_create("gen-model");
	TCase *tc = tcase_create("gen-model");

	tcase_set_timeout(tc, 120);
	tcase_add_loop_test(tc, gen_model_writes_real_layout, 0,
			    (int)(sizeof(want_archs) / sizeof(want_archs[0])));
	tcase_add_test(tc, gen_model_router_and_expert_values_are_scaled);
	tcase_add_test(tc, gen_model_fp8_quantizes_the_same_values);
	tcase_add_test(tc, gen_model_same_seed_same_bytes);
	tcase_add_test(tc, gen_model_values_do_not_depend_on_chunking);
	tcase_add_test(tc, gen_model_reports_write_errors);
	tcase_add_test(tc, gen_model_shards_with_index);
	tcase_add_test(tc, gen_model_fused_plain_and_dtype_variants);
	tcase_add_test(tc, gen_model_glm4_moe_config_is_glm_45s);
	tcase_add_test(tc, gen_model_gpt_oss_config_is_gpt_oss_20bs);
	tcase_add_test(tc, gen_model_presets_set_real_shapes);
	tcase_add_test(tc, gen_model_kimi_k2_config_is_kimi_k2s);
	tcase_add_test(tc, gen_model_rejects_bad_options);
	tcase_add_test(tc, cli_gen_model_help_and_errors);
	tcase_add_test(tc, cli_gen_model_options_override_preset);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(genmodel_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
