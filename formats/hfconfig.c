/* SPDX-License-Identifier: MIT */
/*
 * Hugging Face config.json (ARCHITECTURE.md 4.1, 4.1a): field names differ
 * per model_type; each architecture has a small parse function that reads
 * its names, with the defaults of transformers' config class, and sets the
 * routing rule; quantization_config says how the experts are stored.
 * The checkpoint's tensors are formats/hfmodel.c.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "hfmodel.h"

const char *moe_hf_supported_types(void)
{
	return "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss";
}

/* --- config.json ------------------------------------------------------------ */

static const char *json_type_name(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT: return "an object";
	case JSON_ARRAY: return "an array";
	case JSON_STRING: return "a string";
	case JSON_INTEGER: return "an integer";
	case JSON_REAL: return "a number with a fraction";
	case JSON_TRUE:
	case JSON_FALSE: return "a boolean";
	case JSON_NULL: return "null";
	}
	return "?";
}

/* The field @key of @root; NULL when absent or null (null means "the
 * default" in transformers' configs). */
static json_t *field(json_t *root, const char *key)
{
	json_t *v = json_object_get(root, key);

	return v && !json_is_null(v) ? v : NULL;
}

static int missing(const char *file, const char *key, const char *type, struct moe_err *err)
{
	return moe_err_set(err, -EINVAL, "%s: missing field '%s' (required for model_type %s)",
			   file, key, type);
}

/* Unsigned 32-bit integer field; @required, or *ret = @def when absent. */
static int get_u32(json_t *root, const char *file, const char *type, const char *key,
		   bool required, uint32_t def, uint32_t *ret, struct moe_err *err)
{
	json_t *v = field(root, key);
	json_int_t i;

	if (!v) {
		if (required)
			return missing(file, key, type, err);
		*ret = def;
		return 0;
	}
	if (!json_is_integer(v))
		return moe_err_set(err, -EINVAL, "%s: field '%s' must be an integer, not %s",
				   file, key, json_type_name(v));
	i = json_integer_value(v);
	if (i < 0 || i > (json_int_t)UINT32_MAX)
		return moe_err_set(err, -EINVAL, "%s: field '%s' = %" JSON_INTEGER_FORMAT
				   " is out of range 0..%" PRIu32, file, key, i, UINT32_MAX);
	*ret = (uint32_t)i;
	return 0;
}

static int get_bool(json_t *root, const char *file, const char *key, bool def, bool *ret,
		    struct moe_err *err)
{
	json_t *v = field(root, key);

	if (!v) {
		*ret = def;
		return 0;
	}
	if (!json_is_boolean(v))
		return moe_err_set(err, -EINVAL, "%s: field '%s' must be true or false, not %s",
				   file, key, json_type_name(v));
	*ret = json_is_true(v);
	return 0;
}

static int get_float(json_t *root, const char *file, const char *key, float def, float *ret,
		     struct moe_err *err)
{
	json_t *v = field(root, key);

	if (!v) {
		*ret = def;
		return 0;
	}
	if (!json_is_number(v))
		return moe_err_set(err, -EINVAL, "%s: field '%s' must be a number, not %s",
				   file, key, json_type_name(v));
	*ret = (float)json_number_value(v);
	return 0;
}

/* String field; *ret = @def when absent (may be NULL: then required). */
static int get_str(json_t *root, const char *file, const char *type, const char *key,
		   const char *def, const char **ret, struct moe_err *err)
{
	json_t *v = field(root, key);

	if (!v) {
		if (!def)
			return missing(file, key, type, err);
		*ret = def;
		return 0;
	}
	if (!json_is_string(v))
		return moe_err_set(err, -EINVAL, "%s: field '%s' must be a string, not %s",
				   file, key, json_type_name(v));
	*ret = json_string_value(v);
	return 0;
}

/* qwen's mlp_only_layers: an array of layer numbers, default empty. */
static int get_layer_list(json_t *root, const char *file, const char *key,
			  struct moe_hf_config *hc, struct moe_err *err)
{
	json_t *v = field(root, key), *e;
	size_t i;

	if (!v)
		return 0;
	if (!json_is_array(v))
		return moe_err_set(err, -EINVAL, "%s: field '%s' must be an array of layer numbers, not %s",
				   file, key, json_type_name(v));
	if (json_array_size(v) == 0)
		return 0;
	if (json_array_size(v) > UINT32_MAX / 2)
		return moe_err_set(err, -EINVAL, "%s: field '%s' is too long", file, key);
	hc->mlp_only_layers = calloc(json_array_size(v), sizeof(uint32_t));
	if (!hc->mlp_only_layers)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", file);
	json_array_foreach(v, i, e) {
		if (!json_is_integer(e) || json_integer_value(e) < 0 ||
		    json_integer_value(e) > (json_int_t)UINT32_MAX)
			return moe_err_set(err, -EINVAL, "%s: field '%s' item %zu must be a layer number",
					   file, key, i);
		hc->mlp_only_layers[i] = (uint32_t)json_integer_value(e);
	}
	hc->rule.n_mlp_only = (uint32_t)json_array_size(v);
	hc->rule.mlp_only_layers = hc->mlp_only_layers;
	return 0;
}

/* Everything a per-architecture parser needs. */
struct parse_ctx {
	json_t *root;
	const char *file;
	const char *type;
	struct moe_hf_config *hc;
	struct moe_err *err;
};

#define U32(key, req, def, dst) do {                                                   \
		int r_ = get_u32(p->root, p->file, p->type, key, req, def, dst, p->err);  \
		if (r_ < 0)                                                              \
			return r_;                                                       \
	} while (0)
#define BOOL(key, def, dst) do {                                                       \
		int r_ = get_bool(p->root, p->file, key, def, dst, p->err);              \
		if (r_ < 0)                                                              \
			return r_;                                                       \
	} while (0)

static int parse_mixtral(struct parse_ctx *p)
{
	struct moe_model_config *c = &p->hc->cfg;

	U32("num_local_experts", true, 0, &c->num_experts);
	U32("num_experts_per_tok", true, 0, &c->top_k);
	U32("intermediate_size", true, 0, &c->moe_intermediate_size);
	c->norm_topk_prob = true;
	return 0;
}

/*
 * The number of routed experts of qwen2_moe and qwen3_moe.  Releases write
 * "num_experts"; transformers 5's Qwen3MoeConfig maps that name to
 * "num_local_experts" and so save_pretrained writes the latter, which is
 * the same field.  Either is accepted; both with different values is a
 * config no one can serve unambiguously, so it is refused naming both.
 */
static int get_qwen_num_experts(struct parse_ctx *p, uint32_t *ret)
{
	uint32_t a = 0, b = 0;
	bool has_a = field(p->root, "num_experts") != NULL;
	bool has_b = field(p->root, "num_local_experts") != NULL;
	int r;

	if (!has_a && !has_b)
		return moe_err_set(p->err, -EINVAL,
				   "%s: missing field 'num_experts' (or 'num_local_experts', as transformers 5 "
				   "writes it; required for model_type %s)", p->file, p->type);
	if (has_a && (r = get_u32(p->root, p->file, p->type, "num_experts", true, 0, &a, p->err)) < 0)
		return r;
	if (has_b && (r = get_u32(p->root, p->file, p->type, "num_local_experts", true, 0, &b, p->err)) < 0)
		return r;
	if (has_a && has_b && a != b)
		return moe_err_set(p->err, -EINVAL,
				   "%s: fields 'num_experts' (%" PRIu32 ") and 'num_local_experts' (%" PRIu32
				   ") disagree; they name the same number, keep one", p->file, a, b);
	*ret = has_a ? a : b;
	return 0;
}

static int parse_qwen(struct parse_ctx *p, bool shared)
{
	struct moe_hf_config *hc = p->hc;
	struct moe_model_config *c = &hc->cfg;
	int r;

	if ((r = get_qwen_num_experts(p, &c->num_experts)) < 0)
		return r;
	U32("num_experts_per_tok", true, 0, &c->top_k);
	U32("moe_intermediate_size", true, 0, &c->moe_intermediate_size);
	U32("decoder_sparse_step", false, 1, &hc->rule.decoder_sparse_step);
	BOOL("norm_topk_prob", false, &c->norm_topk_prob);
	if (hc->rule.decoder_sparse_step == 0)
		return moe_err_set(p->err, -EINVAL, "%s: field 'decoder_sparse_step' must be at least 1",
				   p->file);
	if (shared) {
		U32("shared_expert_intermediate_size", true, 0, &c->shared_intermediate_size);
		if (c->shared_intermediate_size) {
			c->n_shared_experts = 1;
			c->shared_gate = true;
		}
	}
	return get_layer_list(p->root, p->file, "mlp_only_layers", hc, p->err);
}

static int parse_olmoe(struct parse_ctx *p)
{
	struct moe_model_config *c = &p->hc->cfg;

	U32("num_experts", true, 0, &c->num_experts);
	U32("num_experts_per_tok", true, 0, &c->top_k);
	U32("intermediate_size", true, 0, &c->moe_intermediate_size);
	BOOL("norm_topk_prob", false, &c->norm_topk_prob);
	return 0;
}

/* DeepSeek's layout (deepseek_v2/v3, glm4_moe): the shared experts are one
 * MLP of n_shared_experts x moe_intermediate_size. */
static int set_shared_size(struct parse_ctx *p)
{
	struct moe_model_config *c = &p->hc->cfg;
	uint64_t shared = (uint64_t)c->n_shared_experts * c->moe_intermediate_size;

	if (shared > UINT32_MAX)
		return moe_err_set(p->err, -EINVAL, "%s: n_shared_experts x moe_intermediate_size overflows",
				   p->file);
	c->shared_intermediate_size = (uint32_t)shared;
	return 0;
}

static int parse_deepseek(struct parse_ctx *p, bool v3)
{
	struct moe_hf_config *hc = p->hc;
	struct moe_model_config *c = &hc->cfg;
	const char *method, *scoring;
	int r;

	U32("n_routed_experts", true, 0, &c->num_experts);
	U32("num_experts_per_tok", true, 0, &c->top_k);
	U32("moe_intermediate_size", true, 0, &c->moe_intermediate_size);
	U32("n_shared_experts", false, 0, &c->n_shared_experts);
	U32("n_group", false, 1, &c->n_group);
	U32("topk_group", false, 1, &c->topk_group);
	U32("first_k_dense_replace", false, 0, &hc->rule.first_k_dense_replace);
	U32("moe_layer_freq", false, 1, &hc->rule.moe_layer_freq);
	BOOL("norm_topk_prob", v3, &c->norm_topk_prob);
	r = get_float(p->root, p->file, "routed_scaling_factor", v3 ? 2.5f : 1.0f,
		      &c->routed_scaling_factor, p->err);
	if (r < 0)
		return r;
	if (hc->rule.moe_layer_freq == 0)
		return moe_err_set(p->err, -EINVAL, "%s: field 'moe_layer_freq' must be at least 1", p->file);

	r = get_str(p->root, p->file, p->type, "scoring_func", v3 ? "sigmoid" : "softmax", &scoring, p->err);
	if (r < 0)
		return r;
	if (strcmp(scoring, v3 ? "sigmoid" : "softmax"))
		return moe_err_set(p->err, -EINVAL, "%s: scoring_func '%s' is not supported for %s (only '%s')",
				   p->file, scoring, p->type, v3 ? "sigmoid" : "softmax");
	c->scoring = v3 ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX;

	r = get_str(p->root, p->file, p->type, "topk_method", v3 ? "noaux_tc" : "greedy", &method, p->err);
	if (r < 0)
		return r;
	if (v3 && !strcmp(method, "noaux_tc")) {
		c->topk_method = MOE_TOPK_NOAUX_TC;
		c->has_bias = true;
	} else if (!v3 && !strcmp(method, "greedy")) {
		c->topk_method = MOE_TOPK_GREEDY;
	} else if (!v3 && !strcmp(method, "group_limited_greedy")) {
		c->topk_method = MOE_TOPK_GROUP_LIMITED;
	} else {
		return moe_err_set(p->err, -EINVAL, "%s: topk_method '%s' is not supported for %s (only %s)",
				   p->file, method, p->type,
				   v3 ? "'noaux_tc'" : "'greedy' and 'group_limited_greedy'");
	}
	if (c->topk_method == MOE_TOPK_GREEDY) {
		/* n_group/topk_group only matter when grouping */
		c->n_group = 1;
		c->topk_group = 1;
	}
	return set_shared_size(p);
}

/*
 * glm4_moe (GLM-4.5, GLM-4.5-Air, GLM-4.6): the fields and defaults of
 * transformers' Glm4MoeConfig, DeepSeek-V3's routing rule (Glm4MoeMoE).
 * The config class has no scoring_func, topk_method or moe_layer_freq:
 * transformers always scores with a sigmoid, selects noaux_tc-style and
 * makes every layer from first_k_dense_replace on an MoE layer.  Some
 * releases (GLM-4.7-FP8) still write scoring_func "sigmoid" and
 * topk_method "noaux_tc"; those are accepted, any other value is refused
 * rather than served by a rule the file does not ask for.
 */
static int parse_glm4_moe(struct parse_ctx *p)
{
	struct moe_hf_config *hc = p->hc;
	struct moe_model_config *c = &hc->cfg;
	const char *method, *scoring;
	int r;

	U32("n_routed_experts", false, 128, &c->num_experts);
	U32("num_experts_per_tok", false, 8, &c->top_k);
	U32("moe_intermediate_size", false, 1408, &c->moe_intermediate_size);
	U32("n_shared_experts", false, 1, &c->n_shared_experts);
	U32("n_group", false, 1, &c->n_group);
	U32("topk_group", false, 1, &c->topk_group);
	U32("first_k_dense_replace", false, 1, &hc->rule.first_k_dense_replace);
	BOOL("norm_topk_prob", true, &c->norm_topk_prob);
	r = get_float(p->root, p->file, "routed_scaling_factor", 1.0f, &c->routed_scaling_factor, p->err);
	if (r < 0)
		return r;
	r = get_str(p->root, p->file, p->type, "scoring_func", "sigmoid", &scoring, p->err);
	if (r < 0)
		return r;
	if (strcmp(scoring, "sigmoid"))
		return moe_err_set(p->err, -EINVAL, "%s: scoring_func '%s' is not supported for %s "
				   "(transformers scores glm4_moe with a sigmoid)", p->file, scoring, p->type);
	r = get_str(p->root, p->file, p->type, "topk_method", "noaux_tc", &method, p->err);
	if (r < 0)
		return r;
	if (strcmp(method, "noaux_tc"))
		return moe_err_set(p->err, -EINVAL, "%s: topk_method '%s' is not supported for %s "
				   "(transformers routes glm4_moe as noaux_tc)", p->file, method, p->type);
	c->scoring = MOE_SCORING_SIGMOID;
	c->topk_method = MOE_TOPK_NOAUX_TC;
	c->has_bias = true;
	hc->rule.moe_layer_freq = 1;
	return set_shared_size(p);
}

/*
 * gpt_oss (gpt-oss-20b, gpt-oss-120b): the fields and defaults of
 * transformers' GptOssConfig.  Every layer is MoE, no shared expert; the
 * router has a bias and selects top-k then softmax (GptOssTopKRouter); the
 * experts have biases and the clamped SwiGLU of GptOssExperts, whatever
 * hidden_act says (transformers does not read it there).
 */
static int parse_gpt_oss(struct parse_ctx *p)
{
	struct moe_model_config *c = &p->hc->cfg;
	int r;

	U32("num_local_experts", false, 128, &c->num_experts);
	U32("num_experts_per_tok", false, 4, &c->top_k);
	U32("intermediate_size", false, 2880, &c->moe_intermediate_size);
	r = get_float(p->root, p->file, "swiglu_limit", 7.0f, &c->swiglu_limit, p->err);
	if (r == 0)
		r = get_float(p->root, p->file, "swiglu_alpha", 1.702f, &c->swiglu_alpha, p->err);
	if (r < 0)
		return r;
	c->act = MOE_ACT_SWIGLU_OAI;
	c->has_bias = true;              /* mlp.router.bias */
	c->has_expert_bias = true;       /* gate_up_proj_bias, down_proj_bias */
	c->norm_topk_prob = true;        /* the k weights sum to 1 (softmax of the k) */
	return 0;
}

/*
 * quantization_config.quant_method "mxfp4" is gpt-oss's release layout
 * (experts as *_blocks and *_scales): served for model_type gpt_oss only,
 * the one architecture whose tensor names moed knows in that form; another
 * model_type is refused by name before any tensor is looked for.
 */
static int check_quantization(json_t *root, const char *file, enum moe_arch arch, struct moe_err *err)
{
	json_t *q = field(root, "quantization_config"), *m;

	if (!q || !json_is_object(q))
		return 0;
	m = field(q, "quant_method");
	if (m && json_is_string(m) && !strcmp(json_string_value(m), "mxfp4") && arch != MOE_ARCH_GPT_OSS)
		return moe_err_set(err, -ENOTSUP, "%s: quant_method mxfp4 is read in gpt-oss's release layout "
				   "(model_type gpt_oss), not for model_type %s", file, moe_arch_name(arch));
	return 0;
}

#undef U32
#undef BOOL

/*
 * quantization_config (ARCHITECTURE.md 4.1a).  Served: quant_method "fp8"
 * (transformers' FineGrainedFP8Config, DeepSeek-V3's release) with
 * weight_block_size [128, 128], fmt "e4m3" (the default) and dynamic
 * activation scales (moed does not quantize activations; static ones
 * would come with input scales it would ignore); quant_method "mxfp4"
 * (transformers' Mxfp4Config, gpt-oss's release: the experts' *_blocks and
 * *_scales, whatever else in modules_to_not_convert stays in its float
 * dtype, which is how moed reads every non-expert tensor anyway).
 * Anything else is refused by name, with what is served: the list is
 * QUANT_SERVED, one place.
 */
#define QUANT_SERVED "fp8 with weight_block_size [128, 128]; mxfp4; gptq, awq (gemm) and " \
	"compressed-tensors (pack-quantized) with 4 bits"

static int parse_quant(json_t *root, const char *file, struct moe_hf_config *hc, struct moe_err *err)
{
	json_t *q = field(root, "quantization_config"), *bs;
	const char *method, *fmt, *scheme;
	int r;

	if (!q)
		return 0;
	if (!json_is_object(q))
		return moe_err_set(err, -EINVAL, "%s: field 'quantization_config' must be an object, not %s",
				   file, json_type_name(q));
	r = get_str(q, file, "any", "quant_method", NULL, &method, err);
	if (r < 0)
		return moe_err_prefix(err, r, "%s: quantization_config", file);
	if (!strcmp(method, "mxfp4")) {
		json_t *keep = field(q, "modules_to_not_convert");

		if (keep && !json_is_array(keep) && !json_is_null(keep))
			return moe_err_set(err, -EINVAL, "%s: quantization_config.modules_to_not_convert must "
					   "be an array of module names, not %s", file, json_type_name(keep));
		hc->mxfp4 = true;
		return 0;
	}
	if (!strcmp(method, "gptq") || !strcmp(method, "awq") || !strcmp(method, "compressed-tensors"))
		return moe_q4_parse_config(q, file, method, &hc->q4, err);
	if (strcmp(method, "fp8"))
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.quant_method '%s' is not supported "
				   "(supported: %s)", file, method, QUANT_SERVED);
	r = get_str(q, file, "any", "fmt", "e4m3", &fmt, err);
	if (r == 0)
		r = get_str(q, file, "any", "activation_scheme", "dynamic", &scheme, err);
	if (r < 0)
		return r;
	if (strcmp(fmt, "e4m3"))
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.fmt '%s' is not supported "
				   "(supported: %s, fmt e4m3)", file, fmt, QUANT_SERVED);
	if (strcmp(scheme, "dynamic"))
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.activation_scheme '%s' is not "
				   "supported (supported: dynamic)", file, scheme);
	bs = field(q, "weight_block_size");
	if (!bs)
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config has no weight_block_size: "
				   "per-tensor FP8 is not supported (supported: %s)", file, QUANT_SERVED);
	if (!json_is_array(bs) || json_array_size(bs) != 2 ||
	    !json_is_integer(json_array_get(bs, 0)) || !json_is_integer(json_array_get(bs, 1)))
		return moe_err_set(err, -EINVAL, "%s: quantization_config.weight_block_size must be an array "
				   "of two integers", file);
	if (json_integer_value(json_array_get(bs, 0)) != MOE_FP8_BLOCK ||
	    json_integer_value(json_array_get(bs, 1)) != MOE_FP8_BLOCK)
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.weight_block_size [%lld, %lld] "
				   "is not supported (supported: %s)", file,
				   (long long)json_integer_value(json_array_get(bs, 0)),
				   (long long)json_integer_value(json_array_get(bs, 1)), QUANT_SERVED);
	/* Which modules a release left unquantized (GLM-4.5-FP8, and
	 * pack --quantize-skip's inputs): the tensors say it themselves
	 * (F8_E4M3 with scales, or not), so the lists are only checked to be
	 * lists of names. */
	for (int i = 0; i < 2; i++) {
		const char *key = i ? "ignored_layers" : "modules_to_not_convert";
		json_t *l = field(q, key), *e;
		size_t k;

		if (l && !json_is_array(l))
			return moe_err_set(err, -EINVAL, "%s: quantization_config.%s must be an array of "
					   "module names, not %s", file, key, json_type_name(l));
		json_array_foreach(l, k, e)
			if (!json_is_string(e))
				return moe_err_set(err, -EINVAL, "%s: quantization_config.%s item %zu must be "
						   "a module name, not %s", file, key, k, json_type_name(e));
	}
	hc->fp8 = true;
	return 0;
}

void moe_hf_config_free(struct moe_hf_config *hc)
{
	if (!hc)
		return;
	free(hc->moe_layers);
	free(hc->mlp_only_layers);
	moe_q4_config_clear(&hc->q4);
	free(hc);
}

static int config_from_json(const char *file, json_t *root, struct moe_hf_config *hc,
			    struct moe_err *err)
{
	struct moe_model_config *c = &hc->cfg;
	struct parse_ctx p = { .root = root, .file = file, .hc = hc, .err = err };
	const char *type, *act;
	uint32_t n;
	int r;

	if (!json_is_object(root))
		return moe_err_set(err, -EINVAL, "%s: expected a JSON object, found %s", file,
				   json_type_name(root));
	r = get_str(root, file, "any", "model_type", NULL, &type, err);
	if (r < 0)
		return r;
	p.type = type;
	if (moe_arch_parse(type, &c->arch) < 0)
		return moe_err_set(err, -EINVAL, "%s: model_type '%s' is not supported (supported: %s)",
				   file, type, moe_hf_supported_types());

	r = check_quantization(root, file, c->arch, err);
	if (r < 0)
		return r;

	/* defaults shared by every architecture; parsers override */
	c->n_group = 1;
	c->topk_group = 1;
	c->scoring = MOE_SCORING_SOFTMAX;
	c->topk_method = MOE_TOPK_GREEDY;
	c->routed_scaling_factor = 1.0f;
	c->gated = true;
	c->weight_dtype = MOE_DTYPE_BF16;
	c->shared_dtype = MOE_DTYPE_BF16;
	hc->rule.arch = c->arch;
	hc->rule.decoder_sparse_step = 1;
	hc->rule.moe_layer_freq = 1;

	r = get_u32(root, file, type, "hidden_size", true, 0, &c->hidden_size, err);
	if (r == 0)
		r = get_u32(root, file, type, "num_hidden_layers", true, 0, &c->num_hidden_layers, err);
	if (r == 0)
		r = get_str(root, file, type, "hidden_act", "silu", &act, err);
	if (r < 0)
		return r;
	if (moe_act_parse(act, &c->act) < 0)
		return moe_err_set(err, -EINVAL, "%s: hidden_act '%s' is not supported "
				   "(silu, swish, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, relu)",
				   file, act);
	r = parse_quant(root, file, hc, err);
	if (r < 0)
		return r;

	switch (c->arch) {
	case MOE_ARCH_MIXTRAL: r = parse_mixtral(&p); break;
	case MOE_ARCH_QWEN2_MOE: r = parse_qwen(&p, true); break;
	case MOE_ARCH_QWEN3_MOE: r = parse_qwen(&p, false); break;
	case MOE_ARCH_OLMOE: r = parse_olmoe(&p); break;
	case MOE_ARCH_DEEPSEEK_V2: r = parse_deepseek(&p, false); break;
	case MOE_ARCH_DEEPSEEK_V3: r = parse_deepseek(&p, true); break;
	case MOE_ARCH_GLM4_MOE: r = parse_glm4_moe(&p); break;
	case MOE_ARCH_GPT_OSS: r = parse_gpt_oss(&p); break;
	default:
		r = moe_err_set(err, -EINVAL, "%s: model_type '%s' is not supported (supported: %s)",
				file, type, moe_hf_supported_types());
		break;
	}
	if (r < 0)
		return r;
	r = moe_model_config_validate(c, err);
	if (r < 0)
		return moe_err_prefix(err, r, "%s", file);
	/* the store config takes the experts' dtype later; refuse now what
	 * moe_model_config_validate would then refuse */
	if (c->has_expert_bias && hc->fp8)
		return moe_err_set(err, -ENOTSUP, "%s: expert biases (gpt_oss) with fp8 weights are not "
				   "supported yet (gpt-oss is released in MXFP4)", file);

	hc->rule.num_hidden_layers = c->num_hidden_layers;
	hc->moe_layers = calloc(c->num_hidden_layers, sizeof(uint32_t));
	if (!hc->moe_layers)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", file);
	n = 0;
	for (uint32_t l = 0; l < c->num_hidden_layers; l++)
		if (moe_layer_rule_is_moe(&hc->rule, l))
			hc->moe_layers[n++] = l;
	hc->n_moe_layers = n;
	if (n == 0)
		return moe_err_set(err, -EINVAL, "%s: none of the %" PRIu32 " layers is an MoE layer",
				   file, c->num_hidden_layers);
	return 0;
}

int moe_hf_config_parse(const char *name, const char *text, struct moe_hf_config **ret,
			struct moe_err *err)
{
	struct moe_hf_config *hc;
	json_error_t jerr;
	json_t *root;
	int r;

	root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return moe_err_set(err, -EINVAL, "%s: bad JSON at line %d, column %d: %s", name,
				   jerr.line, jerr.column, jerr.text);
	hc = calloc(1, sizeof(*hc));
	if (!hc) {
		json_decref(root);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", name);
	}
	r = config_from_json(name, root, hc, err);
	json_decref(root);
	if (r < 0) {
		moe_hf_config_free(hc);
		return r;
	}
	*ret = hc;
	return 0;
}

int moe_hf_config_load(const char *dir, struct moe_hf_config **ret, struct moe_err *err)
{
	struct moe_hf_config *hc;
	json_error_t jerr;
	struct stat st;
	char *path;
	json_t *root;
	int r;

	if (stat(dir, &st) < 0)
		return moe_err_set(err, -errno, "%s: %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return moe_err_set(err, -ENOTDIR, "%s: not a checkpoint directory", dir);
	if (asprintf(&path, "%s/config.json", dir) < 0)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	if (stat(path, &st) < 0) {
		r = moe_err_set(err, -errno, "%s: %s (not a Hugging Face checkpoint?)", path,
				strerror(errno));
		free(path);
		return r;
	}
	root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		r = moe_err_set(err, -EINVAL, "%s: bad JSON at line %d, column %d: %s", path,
				jerr.line, jerr.column, jerr.text);
		free(path);
		return r;
	}
	hc = calloc(1, sizeof(*hc));
	if (!hc) {
		json_decref(root);
		free(path);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	}
	r = config_from_json(path, root, hc, err);
	json_decref(root);
	free(path);
	if (r < 0) {
		moe_hf_config_free(hc);
		return r;
	}
	*ret = hc;
	return 0;
}
