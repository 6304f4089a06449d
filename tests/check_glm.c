/* SPDX-License-Identifier: MIT */
/*
 * GLM-4.5 and GLM-4.6 as released: their config.json files (and
 * GLM-4.5-FP8's quantization_config) read with every field, those that do
 * not shape the MoE layer (use_qk_norm, partial_rotary_factor, attention)
 * accepted and those that would change it refused; the gen-model presets
 * of their shapes, with use_qk_norm's tensors; and gen-model --quant fp8
 * --quant-skip, the layout of a release that left one kind of expert out
 * of its FP8 quantization, down to the bytes.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/store.h"
#include "formats/genmodel.h"
#include "formats/hfmodel.h"
#include "formats/pack.h"
#include "formats/safetensors.h"
#include "testutil.h"

/*
 * zai-org/GLM-4.5's config.json, field for field.  GLM-4.6's differs in
 * max_position_embeddings (202752, its 200K context), "dtype" for
 * "torch_dtype" and transformers_version; GLM-4.5-FP8's adds the
 * quantization_config below.
 */
#define GLM45_COMMON \
	"\"architectures\": [\"Glm4MoeForCausalLM\"], \"attention_bias\": true," \
	" \"attention_dropout\": 0.0, \"pad_token_id\": 151329," \
	" \"eos_token_id\": [151329, 151336, 151338], \"head_dim\": 128, \"hidden_act\": \"silu\"," \
	" \"hidden_size\": 5120, \"partial_rotary_factor\": 0.5, \"initializer_range\": 0.02," \
	" \"intermediate_size\": 12288, \"model_type\": \"glm4_moe\", \"moe_intermediate_size\": 1536," \
	" \"norm_topk_prob\": true, \"num_attention_heads\": 96, \"n_group\": 1, \"topk_group\": 1," \
	" \"n_routed_experts\": 160, \"n_shared_experts\": 1, \"routed_scaling_factor\": 2.5," \
	" \"num_experts_per_tok\": 8, \"first_k_dense_replace\": 3, \"num_hidden_layers\": 92," \
	" \"num_key_value_heads\": 8, \"rms_norm_eps\": 1e-05, \"rope_scaling\": null," \
	" \"rope_theta\": 1000000, \"num_nextn_predict_layers\": 1, \"tie_word_embeddings\": false," \
	" \"use_cache\": true, \"use_qk_norm\": true, \"vocab_size\": 151552"

static const char glm45[] = "{" GLM45_COMMON ", \"max_position_embeddings\": 131072,"
	" \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.54.0\"}";
static const char glm46[] = "{" GLM45_COMMON ", \"max_position_embeddings\": 202752,"
	" \"dtype\": \"bfloat16\", \"transformers_version\": \"4.57.1\"}";
/* FP8 128 x 128 blocks as DeepSeek-V3 writes it, with the list of modules
 * left in bf16 that transformers' FineGrainedFP8Config carries */
static const char glm45_fp8[] = "{" GLM45_COMMON ", \"max_position_embeddings\": 131072,"
	" \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.54.0\","
	" \"quantization_config\": {\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\","
	" \"quant_method\": \"fp8\", \"weight_block_size\": [128, 128],"
	" \"modules_to_not_convert\": [\"lm_head\", \"model.embed_tokens\", \"mlp.gate\"]}}";

static struct moe_hf_config *parse_ok(const char *what, const char *json)
{
	struct moe_hf_config *hc = NULL;
	struct moe_err err = { 0 };

	ck_assert_msg(moe_hf_config_parse(what, json, &hc, &err) == 0, "%s: %s", what, err.msg);
	return hc;
}

/* GLM-4.5's config.json with field @key set to the JSON @value (parsed
 * into the object: config.json may not name a field twice). */
static char *glm45_with(const char *key, const char *value)
{
	json_error_t jerr;
	json_t *root = json_loads(glm45, 0, &jerr), *v = json_loads(value, JSON_DECODE_ANY, &jerr);
	char *text;

	ck_assert_msg(root && v, "%s: %s", key, jerr.text);
	json_object_set_new(root, key, v);
	text = json_dumps(root, JSON_COMPACT);
	json_decref(root);
	ck_assert(text != NULL);
	return text;
}

/* GLM-4.5's config with @key set to @value must be refused with a message
 * containing @needle. */
static void expect_refused(const char *key, const char *value, const char *needle)
{
	struct moe_hf_config *hc = NULL;
	struct moe_err err = { 0 };
	char *json = glm45_with(key, value);

	ck_assert_msg(moe_hf_config_parse("config.json", json, &hc, &err) < 0, "%s: %s was accepted",
		      key, value);
	moe_test_assert_err_has(&err, needle);
	free(json);
}

static void check_glm45_layer(const char *what, const struct moe_hf_config *hc)
{
	const struct moe_model_config *c = &hc->cfg;

	ck_assert_msg(c->arch == MOE_ARCH_GLM4_MOE && c->hidden_size == 5120 && c->num_experts == 160 &&
		      c->top_k == 8 && c->moe_intermediate_size == 1536 && c->n_shared_experts == 1 &&
		      c->shared_intermediate_size == 1536 && c->n_group == 1 && c->topk_group == 1,
		      "%s: arch %d H %u E %u k %u I %u shared %u x %u groups %u/%u", what, (int)c->arch,
		      c->hidden_size, c->num_experts, c->top_k, c->moe_intermediate_size, c->n_shared_experts,
		      c->shared_intermediate_size, c->n_group, c->topk_group);
	ck_assert_msg(c->scoring == MOE_SCORING_SIGMOID && c->topk_method == MOE_TOPK_NOAUX_TC &&
		      c->has_bias && c->norm_topk_prob && c->routed_scaling_factor == 2.5f &&
		      c->act == MOE_ACT_SILU, "%s: routing not GLM-4.5's", what);
	/* layers 0..2 dense, 3..91 MoE; the MTP layer 92 is not a layer */
	ck_assert_uint_eq(hc->n_moe_layers, 89);
	ck_assert_uint_eq(hc->moe_layers[0], 3);
	ck_assert_uint_eq(hc->moe_layers[88], 91);
}

START_TEST(release_configs_of_glm_45_and_46_parse)
{
	struct moe_hf_config *hc;

	hc = parse_ok("GLM-4.5", glm45);
	check_glm45_layer("GLM-4.5", hc);
	ck_assert(!hc->fp8);
	moe_hf_config_free(hc);
	hc = parse_ok("GLM-4.6", glm46);
	check_glm45_layer("GLM-4.6", hc);
	moe_hf_config_free(hc);
	hc = parse_ok("GLM-4.5-FP8", glm45_fp8);
	check_glm45_layer("GLM-4.5-FP8", hc);
	ck_assert(hc->fp8);
	moe_hf_config_free(hc);
}
END_TEST

/* Attention and context fields change nothing moed computes: any value is
 * read as the same layer.  Fields that shape the MoE layer are read, and a
 * value moed would not compute as transformers does is refused by name. */
START_TEST(glm_fields_outside_the_moe_layer_are_accepted_those_inside_refused)
{
	static const char *const outside[][2] = {
		{ "use_qk_norm", "false" }, { "partial_rotary_factor", "1.0" },
		{ "attention_bias", "false" }, { "head_dim", "64" },
		{ "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0}" },
		{ "max_position_embeddings", "1048576" }, { "num_nextn_predict_layers", "0" },
		{ "moe_layer_freq", "2" },   /* not a Glm4MoeConfig field: transformers ignores it */
	};
	struct moe_hf_config *hc;
	char *json;

	for (size_t i = 0; i < sizeof(outside) / sizeof(outside[0]); i++) {
		json = glm45_with(outside[i][0], outside[i][1]);
		hc = parse_ok(outside[i][0], json);
		check_glm45_layer(outside[i][0], hc);
		moe_hf_config_free(hc);
		free(json);
	}
	expect_refused("scoring_func", "\"softmax\"", "scoring_func 'softmax' is not supported for glm4_moe");
	expect_refused("topk_method", "\"group_limited_greedy\"", "topk_method 'group_limited_greedy'");
	expect_refused("hidden_act", "\"tanh\"", "hidden_act 'tanh' is not supported");
	expect_refused("n_group", "3", "n_group");
	expect_refused("quantization_config", "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 64]}",
		       "weight_block_size [64, 64] is not supported");
	expect_refused("quantization_config", "{\"quant_method\": \"fp8\", \"activation_scheme\": \"static\","
		       " \"weight_block_size\": [128, 128]}", "activation_scheme 'static'");
	expect_refused("quantization_config", "{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 128],"
		       " \"modules_to_not_convert\": \"mlp.gate\"}", "modules_to_not_convert");
}
END_TEST

START_TEST(presets_glm_45_and_46_are_the_releases)
{
	static const char *const names[] = { "glm-4.5", "glm-4.6" };
	struct moe_gen_options o;
	struct moe_err err = { 0 };

	for (int i = 0; i < 2; i++) {
		ck_assert_int_eq(moe_gen_preset(names[i], &o, &err), 0);
		ck_assert_int_eq(o.arch, MOE_ARCH_GLM4_MOE);
		ck_assert_uint_eq(o.hidden_size, 5120);
		ck_assert_uint_eq(o.moe_intermediate_size, 1536);
		ck_assert_uint_eq(o.intermediate_size, 12288);
		ck_assert_uint_eq(o.num_experts, 160);
		ck_assert_uint_eq(o.top_k, 8);
		ck_assert_uint_eq(o.num_layers, 92);
		ck_assert_uint_eq(o.first_k_dense_replace, 3);
		ck_assert_uint_eq(o.n_shared_experts, 1);
		ck_assert_uint_eq(o.n_group, 1);
		ck_assert_uint_eq(o.topk_group, 1);
		ck_assert_int_eq(o.norm_topk_prob, 1);
		ck_assert_float_eq(o.routed_scaling_factor, 2.5f);
		ck_assert_uint_eq(o.vocab_size, 151552);
		ck_assert_uint_eq(o.num_attention_heads, 96);
		ck_assert_uint_eq(o.num_key_value_heads, 8);
		ck_assert_uint_eq(o.head_dim, 128);
		ck_assert_uint_eq(o.num_nextn_predict_layers, 1);
		ck_assert(o.qk_norm);
		ck_assert_uint_eq(o.max_position_embeddings, i ? 202752 : 131072);
	}
	/* GLM-4.5-Air: no qk norm, and a preset after one with it has none */
	ck_assert_int_eq(moe_gen_preset("glm-4.5-air", &o, &err), 0);
	ck_assert(!o.qk_norm && o.max_position_embeddings == 0);
	ck_assert_int_eq(moe_gen_preset("glm-5", &o, &err), -EINVAL);
	moe_test_assert_err_has(&err, "glm-4.6");
}
END_TEST

/* The preset at a small size: GLM-4.5's config.json (what the parser was
 * shown above), q_norm and k_norm per head, three dense layers. */
static void gen_small_glm(const char *preset, struct moe_gen_options *o)
{
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_gen_preset(preset, o, &err), 0);
	o->num_layers = 4;
	o->vocab_size = 64;
	o->hidden_size = 256;
	o->moe_intermediate_size = 72;
	o->intermediate_size = 128;
	o->num_experts = 8;
	o->num_attention_heads = 4;
	o->num_key_value_heads = 2;
	o->head_dim = 32;
	o->seed = 45;
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

START_TEST(gen_model_glm_45_and_46_write_their_configs_and_qk_norm)
{
	static const char *const names[] = { "glm-4.5", "glm-4.6" };
	struct moe_gen_options o;
	struct moe_st_checkpoint *c;
	struct moe_hf_config *hc;
	struct moe_err err = { 0 };
	const struct moe_st_tensor *t;
	json_t *cfg;
	char *dir;

	for (int i = 0; i < 2; i++) {
		gen_small_glm(names[i], &o);
		dir = moe_test_gen(&o, "genglm45");
		cfg = load_config(dir);
		ck_assert(json_is_true(json_object_get(cfg, "use_qk_norm")));
		ck_assert_int_eq(json_integer_value(json_object_get(cfg, "max_position_embeddings")),
				 i ? 202752 : 131072);
		ck_assert_int_eq(json_integer_value(json_object_get(cfg, "first_k_dense_replace")), 3);
		ck_assert_double_eq(json_real_value(json_object_get(cfg, "routed_scaling_factor")), 2.5);
		json_decref(cfg);
		ck_assert_msg(moe_hf_config_load(dir, &hc, &err) == 0, "%s", err.msg);
		ck_assert(hc->cfg.routed_scaling_factor == 2.5f && hc->n_moe_layers == 1 &&
			  hc->moe_layers[0] == 3);
		moe_hf_config_free(hc);

		ck_assert_int_eq(moe_st_checkpoint_open(dir, &c, &err), 0);
		/* every attention, the MTP layer's (4) too, has RMSNorm weights of head_dim */
		for (uint32_t l = 0; l <= 4; l++) {
			char name[96];

			snprintf(name, sizeof(name), "model.layers.%u.self_attn.q_norm.weight", l);
			t = moe_st_find(c, name);
			ck_assert_msg(t && t->ndim == 1 && t->shape[0] == 32, "%s missing or misshapen", name);
			snprintf(name, sizeof(name), "model.layers.%u.self_attn.k_norm.weight", l);
			ck_assert_msg(moe_st_find(c, name) != NULL, "%s missing", name);
		}
		ck_assert_ptr_nonnull(moe_st_find(c, "model.layers.2.mlp.gate_proj.weight"));
		ck_assert_ptr_null(moe_st_find(c, "model.layers.2.mlp.gate.weight"));
		ck_assert_ptr_nonnull(moe_st_find(c, "model.layers.3.mlp.gate.e_score_correction_bias"));
		moe_st_checkpoint_close(c);
		free(dir);
	}
	/* use_qk_norm and max_position_embeddings are glm4_moe fields */
	moe_gen_defaults(MOE_ARCH_DEEPSEEK_V3, &o);
	o.qk_norm = true;
	ck_assert_int_eq(moe_gen_model(&o, "/nonexistent/never", NULL, NULL, &err), -EINVAL);
	moe_test_assert_err_has(&err, "use_qk_norm is a glm4_moe field");
	moe_gen_defaults(MOE_ARCH_MIXTRAL, &o);
	o.max_position_embeddings = 4096;
	ck_assert_int_eq(moe_gen_model(&o, "/nonexistent/never", NULL, NULL, &err), -EINVAL);
	moe_test_assert_err_has(&err, "max_position_embeddings");
}
END_TEST

/* The bytes of tensor @name of @c (asserted present). */
static void *tensor_bytes(const struct moe_st_checkpoint *c, const char *name, uint64_t *n)
{
	const struct moe_st_tensor *t = moe_st_find(c, name);
	struct moe_err err = { 0 };
	void *b;

	ck_assert_msg(t != NULL, "%s missing", name);
	b = malloc(t->nbytes ? t->nbytes : 1);
	ck_assert(b != NULL);
	ck_assert_msg(moe_st_read(c, t, 0, b, t->nbytes, &err) == 0, "%s", err.msg);
	*n = t->nbytes;
	return b;
}

/*
 * --quant fp8 --quant-skip: the kind skipped is the bf16 checkpoint's
 * tensors byte for byte (no scales), everything else the FP8 checkpoint's,
 * and quantization_config names the kind as modules_to_not_convert does;
 * the store packed from it holds each kind in its own dtype.
 */
START_TEST(gen_model_quant_skip_leaves_one_kind_in_bf16)
{
	struct moe_gen_options o;
	struct moe_st_checkpoint *cb, *cq, *cs;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_store *st;
	struct moe_err err = { 0 };
	char *db, *dq, *ds, *store;
	json_t *cfg, *q;

	gen_small_glm("glm-4.5-air", &o);
	o.top_k = 4;
	db = moe_test_gen(&o, "skipbf16");
	o.quant_fp8 = true;
	dq = moe_test_gen(&o, "skipfp8");
	ck_assert_int_eq(moe_st_checkpoint_open(db, &cb, &err), 0);
	ck_assert_int_eq(moe_st_checkpoint_open(dq, &cq, &err), 0);
	for (int kind = MOE_GEN_QUANT_SKIP_SHARED; kind <= MOE_GEN_QUANT_SKIP_ROUTED; kind++) {
		const char *kept = kind == MOE_GEN_QUANT_SKIP_SHARED ? ".mlp.shared_experts." : ".mlp.experts.";
		size_t n_kept = 0;

		o.quant_skip = kind;
		ds = moe_test_gen(&o, "skipmix");
		cfg = load_config(ds);
		q = json_object_get(json_object_get(cfg, "quantization_config"), "modules_to_not_convert");
		ck_assert_msg(json_array_size(q) == 1 && !strcmp(json_string_value(json_array_get(q, 0)),
				kind == MOE_GEN_QUANT_SKIP_SHARED ? "mlp.shared_experts" : "mlp.experts"),
			      "modules_to_not_convert is not the kind skipped");
		json_decref(cfg);
		ck_assert_int_eq(moe_st_checkpoint_open(ds, &cs, &err), 0);
		/* every FP8 tensor is in the mix unless it is of the kind kept */
		for (size_t i = 0; i < cq->n_tensors; i++) {
			const char *name = cq->tensors[i].name;
			bool k = strstr(name, kept) != NULL;

			if (k && strstr(name, "_scale_inv"))
				ck_assert_msg(moe_st_find(cs, name) == NULL, "%s kept its scales", name);
			else
				ck_assert_msg(moe_st_find(cs, name) != NULL, "%s missing", name);
		}
		for (size_t i = 0; i < cs->n_tensors; i++) {
			const char *name = cs->tensors[i].name;
			bool k = strstr(name, kept) != NULL;
			uint64_t n1, n2;
			void *a = tensor_bytes(cs, name, &n1), *b = tensor_bytes(k ? cb : cq, name, &n2);

			n_kept += k;
			ck_assert_msg(n1 == n2 && memcmp(a, b, n1) == 0, "%s is not the %s checkpoint's", name,
				      k ? "bf16" : "fp8");
			free(a);
			free(b);
		}
		ck_assert_uint_gt(n_kept, 0);
		moe_st_checkpoint_close(cs);

		store = moe_test_path_join(ds, "mix.moe");
		ck_assert_msg(moe_pack(ds, store, &po, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(moe_store_open(store, &st, &err), 0);
		ck_assert_int_eq(st->cfg.weight_dtype, kind == MOE_GEN_QUANT_SKIP_ROUTED ? MOE_DTYPE_BF16 :
				 MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(st->cfg.shared_dtype, kind == MOE_GEN_QUANT_SKIP_SHARED ? MOE_DTYPE_BF16 :
				 MOE_DTYPE_FP8_E4M3_B128);
		moe_store_close(st);
		free(store);
		free(ds);
	}
	moe_st_checkpoint_close(cb);
	moe_st_checkpoint_close(cq);
	free(db);
	free(dq);

	/* refused: nothing to skip from, nothing to skip */
	o.quant_fp8 = false;
	o.quant_skip = MOE_GEN_QUANT_SKIP_SHARED;
	ck_assert_int_eq(moe_gen_model(&o, "/nonexistent/never", NULL, NULL, &err), -EINVAL);
	moe_test_assert_err_has(&err, "it needs --quant fp8");
	o.quant_fp8 = true;
	o.n_shared_experts = 0;
	ck_assert_int_eq(moe_gen_model(&o, "/nonexistent/never", NULL, NULL, &err), -EINVAL);
	moe_test_assert_err_has(&err, "--quant-skip shared: glm4_moe has no shared expert");
}
END_TEST

/* GLM-4.5-Air-FP8 (and GLM-4.5-FP8): the preset with --quant fp8, few
 * experts, read as FP8 and packed in its own bytes, shared expert too. */
START_TEST(glm_45_air_fp8_release_layout_packs_in_its_bytes)
{
	struct moe_gen_options o;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_hf_config *hc;
	struct moe_store *st;
	struct moe_err err = { 0 };
	char *dir, *store;

	ck_assert_int_eq(moe_gen_preset("glm-4.5-air", &o, &err), 0);
	o.num_layers = 2;
	o.vocab_size = 64;
	o.num_experts = 4;
	o.top_k = 4;
	o.num_nextn_predict_layers = 0;
	o.intermediate_size = 256;
	o.quant_fp8 = true;
	dir = moe_test_gen(&o, "glmairfp8");
	ck_assert_msg(moe_hf_config_load(dir, &hc, &err) == 0, "%s", err.msg);
	ck_assert(hc->fp8 && hc->cfg.hidden_size == 4096 && hc->cfg.moe_intermediate_size == 1408 &&
		  hc->cfg.routed_scaling_factor == 1.0f && hc->n_moe_layers == 1);
	moe_hf_config_free(hc);
	store = moe_test_path_join(dir, "air.moe");
	ck_assert_msg(moe_pack(dir, store, &po, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(moe_store_open(store, &st, &err), 0);
	ck_assert_int_eq(st->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(st->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_uint_eq(st->cfg.num_experts, 4);
	/* 1408 x 4096 x 3 codes and 11 x 32 x 3 float32 scales, no widening */
	ck_assert_uint_le(moe_expert_bytes(&st->cfg), 3ull * 1408 * 4096 + 3ull * 11 * 32 * 4 + 3 * 4096);
	moe_store_close(st);
	free(store);
	free(dir);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("glm");
	TCase *tc = tcase_create("glm");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, release_configs_of_glm_45_and_46_parse);
	tcase_add_test(tc, glm_fields_outside_the_moe_layer_are_accepted_those_inside_refused);
	tcase_add_test(tc, presets_glm_45_and_46_are_the_releases);
	tcase_add_test(tc, gen_model_glm_45_and_46_write_their_configs_and_qk_norm);
	tcase_add_test(tc, gen_model_quant_skip_leaves_one_kind_in_bf16);
	tcase_add_test(tc, glm_45_air_fp8_release_layout_packs_in_its_bytes);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "glm");
}
