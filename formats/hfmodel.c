/* SPDX-License-Identifier: MIT */
/*
 * Hugging Face config.json and checkpoint layout (ARCHITECTURE.md 4.1).
 *
 * config.json field names differ per model_type; each architecture has a
 * small parse function that reads its names and sets the routing rule.
 * Tensor names are built in one place (layer_prefix, expert names) so that
 * the packer and the messages agree on them.
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

#define MAX_NAME 256

const char *moe_hf_supported_types(void)
{
	return "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss";
}

const char *moe_hf_part_name(enum moe_hf_part part)
{
	switch (part) {
	case MOE_HF_GATE: return "gate";
	case MOE_HF_UP: return "up";
	case MOE_HF_DOWN: return "down";
	}
	return "?";
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

static int parse_qwen(struct parse_ctx *p, bool shared)
{
	struct moe_hf_config *hc = p->hc;
	struct moe_model_config *c = &hc->cfg;

	U32("num_experts", true, 0, &c->num_experts);
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

static int parse_deepseek(struct parse_ctx *p, bool v3)
{
	struct moe_hf_config *hc = p->hc;
	struct moe_model_config *c = &hc->cfg;
	const char *method, *scoring;
	uint64_t shared;
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
	shared = (uint64_t)c->n_shared_experts * c->moe_intermediate_size;
	if (shared > UINT32_MAX)
		return moe_err_set(p->err, -EINVAL, "%s: n_shared_experts x moe_intermediate_size overflows",
				   p->file);
	c->shared_intermediate_size = (uint32_t)shared;
	return 0;
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
	uint64_t shared;
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
	shared = (uint64_t)c->n_shared_experts * c->moe_intermediate_size;
	if (shared > UINT32_MAX)
		return moe_err_set(p->err, -EINVAL, "%s: n_shared_experts x moe_intermediate_size overflows",
				   p->file);
	c->shared_intermediate_size = (uint32_t)shared;
	return 0;
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
 * (experts as *_blocks and *_scales): not read yet, refused by name before
 * any tensor is looked for.
 */
static int check_quantization(json_t *root, const char *file, struct moe_err *err)
{
	json_t *q = field(root, "quantization_config"), *m;

	if (!q || !json_is_object(q))
		return 0;
	m = field(q, "quant_method");
	if (m && json_is_string(m) && !strcmp(json_string_value(m), "mxfp4"))
		return moe_err_set(err, -ENOTSUP, "%s: quant_method mxfp4 (experts as *_blocks and *_scales) "
				   "is not supported yet: moed reads F32, BF16 and F16 weights (for gpt_oss, "
				   "transformers' bf16 layout)", file);
	return 0;
}

#undef U32
#undef BOOL

/*
 * quantization_config (ARCHITECTURE.md 4.1a).  Served: quant_method "fp8"
 * (transformers' FineGrainedFP8Config, DeepSeek-V3's release) with
 * weight_block_size [128, 128], fmt "e4m3" (the default) and dynamic
 * activation scales (moed does not quantize activations; static ones
 * would come with input scales it would ignore).  Anything else is refused
 * by name, with what is served.
 */
#define QUANT_SERVED "fp8 with weight_block_size [128, 128]"

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
	hc->fp8 = true;
	return 0;
}

void moe_hf_config_free(struct moe_hf_config *hc)
{
	if (!hc)
		return;
	free(hc->moe_layers);
	free(hc->mlp_only_layers);
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

	r = check_quantization(root, file, err);
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

/* --- tensors ------------------------------------------------------------------ */

void moe_hf_model_close(struct moe_hf_model *m)
{
	if (!m)
		return;
	if (m->layers && m->hc)
		for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
			free(m->layers[i].experts);
			free(m->layers[i].scales);
		}
	free(m->layers);
	moe_st_checkpoint_close(m->ckpt);
	moe_hf_config_free(m->hc);
	free(m->dir);
	free(m);
}

static void shape_str(char *buf, size_t len, uint32_t ndim, const uint64_t *shape)
{
	size_t o = 0;

	o += (size_t)snprintf(buf + o, len - o, "[");
	for (uint32_t i = 0; i < ndim && o < len; i++)
		o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu64, i ? ", " : "", shape[i]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

static const char *tensor_file(const struct moe_hf_model *m, const struct moe_st_tensor *t)
{
	return t->file < m->ckpt->n_files ? m->ckpt->files[t->file].path : m->dir;
}

/* Where a missing tensor should have been, for the message. */
static int missing_tensor(const struct moe_hf_model *m, const char *name, struct moe_err *err)
{
	char *index;
	int sharded;

	if (asprintf(&index, "%s/model.safetensors.index.json", m->dir) < 0)
		return moe_err_set(err, -ENOENT, "tensor '%s' not found in %s", name, m->dir);
	sharded = access(index, F_OK) == 0;
	if (sharded)
		moe_err_set(err, -ENOENT, "tensor '%s' not found: %s names no shard for it", name, index);
	else if (m->ckpt->n_files == 1)
		moe_err_set(err, -ENOENT, "tensor '%s' not found in %s", name, m->ckpt->files[0].path);
	else
		moe_err_set(err, -ENOENT, "tensor '%s' not found in checkpoint %s", name, m->dir);
	free(index);
	return -ENOENT;
}

static bool is_fp8(const struct moe_st_tensor *t)
{
	return !strcmp(t->st_dtype, "F8_E4M3");
}

/* The dtype a checked tensor is served in: FP8 for F8_E4M3 (with scales). */
static enum moe_dtype served_dtype(const struct moe_st_tensor *t)
{
	return is_fp8(t) ? MOE_DTYPE_FP8_E4M3_B128 : (enum moe_dtype)t->dtype;
}

static bool same_shape(const struct moe_st_tensor *t, uint32_t ndim, const uint64_t *shape)
{
	bool same = t->ndim == ndim;

	for (uint32_t i = 0; same && i < ndim; i++)
		same = t->shape[i] == shape[i];
	return same;
}

static int shape_error(const struct moe_hf_model *m, const struct moe_st_tensor *t, uint32_t ndim,
		       const uint64_t *shape, const char *from, struct moe_err *err)
{
	char want[128], got[128];

	shape_str(want, sizeof(want), ndim, shape);
	shape_str(got, sizeof(got), t->ndim, t->shape);
	return moe_err_set(err, -EINVAL, "tensor '%s' in %s has shape %s, expected %s from %s",
			   t->name, tensor_file(m, t), got, want, from);
}

/*
 * The scales of the FP8 matrix @t ([rows, cols]): "X.weight_scale_inv" for
 * "X.weight", float32 (bf16 and f16 widen exactly) of shape
 * [ceil(rows/128), ceil(cols/128)] (ARCHITECTURE.md 4.1a).  Errors name
 * the tensor.
 */
static int need_scale(const struct moe_hf_model *m, const struct moe_st_tensor *t,
		      const struct moe_st_tensor **ret, struct moe_err *err)
{
	const char *dot = strrchr(t->name, '.');
	const struct moe_st_tensor *s;
	char name[MAX_NAME + 16];
	uint64_t shape[2];

	if (!dot || strcmp(dot, ".weight"))
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3: FP8 is served for "
				   "per-expert X.weight tensors with X.weight_scale_inv, not for fused experts",
				   t->name, tensor_file(m, t));
	snprintf(name, sizeof(name), "%s_scale_inv", t->name);
	s = moe_st_find(m->ckpt, name);
	if (!s)
		return moe_err_set(err, -ENOENT, "tensor '%s' in %s is F8_E4M3 but its scales '%s' are "
				   "missing from the checkpoint", t->name, tensor_file(m, t), name);
	if (s->dtype < 0 || moe_dtype_is_blocked((enum moe_dtype)s->dtype) ||
	    moe_dtype_size((enum moe_dtype)s->dtype) == 0)
		return moe_err_set(err, -ENOTSUP, "scales '%s' in %s have dtype %s; moed reads F32, BF16 "
				   "and F16 scales", name, tensor_file(m, s), s->st_dtype);
	shape[0] = (t->shape[0] + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	shape[1] = (t->shape[1] + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	if (!same_shape(s, 2, shape))
		return shape_error(m, s, 2, shape, "its weight's shape and 128 x 128 blocks", err);
	*ret = s;
	return 0;
}

/* Find @name, check dtype and that its shape is exactly @shape.  With
 * @ret_scale, an F8_E4M3 matrix is accepted when config.json says fp8, and
 * its scales are found and checked (*ret_scale NULL for other dtypes). */
static int need_q(const struct moe_hf_model *m, const char *name, uint32_t ndim,
		  const uint64_t *shape, const struct moe_st_tensor **ret,
		  const struct moe_st_tensor **ret_scale, struct moe_err *err)
{
	const struct moe_st_tensor *t = moe_st_find(m->ckpt, name), *scale = NULL;
	int r;

	if (!t)
		return missing_tensor(m, name, err);
	if (is_fp8(t) && !ret_scale)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3; moed reads routers, "
				   "biases and gates in F32, BF16 or F16", name, tensor_file(m, t));
	if (is_fp8(t) && !m->hc->fp8)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3 but config.json has no "
				   "quantization_config with quant_method fp8 and weight_block_size "
				   "[128, 128]", name, tensor_file(m, t));
	if (!is_fp8(t) && (t->dtype < 0 || moe_dtype_size((enum moe_dtype)t->dtype) == 0))
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s has dtype %s; moed reads F32, BF16 "
				   "and F16, and F8_E4M3 with 128 x 128 block scales", name,
				   tensor_file(m, t), t->st_dtype);
	if (!same_shape(t, ndim, shape))
		return shape_error(m, t, ndim, shape, "config.json", err);
	if (is_fp8(t)) {
		r = need_scale(m, t, &scale, err);
		if (r < 0)
			return r;
	}
	*ret = t;
	if (ret_scale)
		*ret_scale = scale;
	return 0;
}

static int need(const struct moe_hf_model *m, const char *name, uint32_t ndim,
		const uint64_t *shape, const struct moe_st_tensor **ret, struct moe_err *err)
{
	return need_q(m, name, ndim, shape, ret, NULL, err);
}

static int need2(const struct moe_hf_model *m, const char *name, uint64_t a, uint64_t b,
		 const struct moe_st_tensor **ret, struct moe_err *err)
{
	uint64_t shape[2] = { a, b };

	return need(m, name, 2, shape, ret, err);
}

/* An expert matrix: may be FP8 with scales. */
static int need2_q(const struct moe_hf_model *m, const char *name, uint64_t a, uint64_t b,
		   const struct moe_st_tensor **ret, const struct moe_st_tensor **ret_scale,
		   struct moe_err *err)
{
	uint64_t shape[2] = { a, b };

	return need_q(m, name, 2, shape, ret, ret_scale, err);
}

/* Name of part @part of routed expert @j under @prefix (per-expert layout). */
static void expert_name(const struct moe_hf_model *m, const char *prefix, uint32_t j,
			enum moe_hf_part part, char *buf, size_t len)
{
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };
	static const char *const mixtral[3] = { "w1", "w3", "w2" };

	snprintf(buf, len, "%sexperts.%" PRIu32 ".%s.weight", prefix, j,
		 m->cfg.arch == MOE_ARCH_MIXTRAL ? mixtral[part] : hf[part]);
}

static void shared_name(const struct moe_hf_model *m, const char *prefix, enum moe_hf_part part,
			char *buf, size_t len)
{
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };

	snprintf(buf, len, "%s%s.%s.weight", prefix,
		 m->cfg.arch == MOE_ARCH_QWEN2_MOE ? "shared_expert" : "shared_experts", hf[part]);
}

/* Pick the prefix of layer @L: "model.layers.L.mlp." or, for mixtral,
 * "model.layers.L.block_sparse_moe." when that is where its router is. */
static void layer_prefix(const struct moe_hf_model *m, uint32_t L, char *buf, size_t len)
{
	char name[MAX_NAME];

	if (m->cfg.arch == MOE_ARCH_MIXTRAL) {
		snprintf(buf, len, "model.layers.%" PRIu32 ".block_sparse_moe.", L);
		snprintf(name, sizeof(name), "%sgate.weight", buf);
		if (moe_st_find(m->ckpt, name))
			return;
		snprintf(name, sizeof(name), "model.layers.%" PRIu32 ".mlp.gate.weight", L);
		if (!moe_st_find(m->ckpt, name))
			return;          /* the message will name block_sparse_moe */
	}
	snprintf(buf, len, "model.layers.%" PRIu32 ".mlp.", L);
}

/* First pass: the layout of each layer and whether any expert has a gate. */
static void find_layout(struct moe_hf_model *m, uint64_t *ret_gates)
{
	char name[MAX_NAME];
	uint64_t gates = 0;

	for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
		struct moe_hf_layer *hl = &m->layers[i];
		const struct moe_st_tensor *t;

		hl->layer = m->hc->moe_layers[i];
		layer_prefix(m, hl->layer, hl->prefix, sizeof(hl->prefix));
		if (m->cfg.arch == MOE_ARCH_GPT_OSS) {
			/* always fused, input-major (x @ W), gate and up interleaved */
			hl->fused = true;
			gates += m->cfg.num_experts;
			continue;
		}
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj", hl->prefix);
		if (moe_st_find(m->ckpt, name)) {
			hl->fused = true;
			gates += m->cfg.num_experts;
			continue;
		}
		snprintf(name, sizeof(name), "%sexperts.up_proj", hl->prefix);
		t = moe_st_find(m->ckpt, name);
		if (t && t->ndim == 3) {
			hl->fused = true;       /* fused plain experts: up [E, I, H] */
			continue;
		}
		for (uint32_t j = 0; j < m->cfg.num_experts; j++) {
			expert_name(m, hl->prefix, j, MOE_HF_GATE, name, sizeof(name));
			if (moe_st_find(m->ckpt, name))
				gates++;
		}
	}
	*ret_gates = gates;
}

/* Track the routed experts' dtype: the first tensor sets it, others may
 * differ (recorded for pack to refuse or convert). */
static void note_dtype(struct moe_hf_model *m, const struct moe_st_tensor *t, bool *seen)
{
	if (!*seen) {
		m->expert_dtype = served_dtype(t);
		*seen = true;
	} else if (served_dtype(t) != m->expert_dtype && !m->mixed_tensor[0]) {
		snprintf(m->mixed_tensor, sizeof(m->mixed_tensor), "%s", t->name);
		m->mixed_dtype = served_dtype(t);
	}
}

/* The same for the shared expert, whose dtype is its own (DeepSeek-V3
 * quantizes it with the routed ones; another release may not). */
static void note_shared_dtype(struct moe_hf_model *m, const struct moe_st_tensor *t, bool *seen)
{
	if (!*seen) {
		m->shared_dtype = served_dtype(t);
		*seen = true;
	} else if (served_dtype(t) != m->shared_dtype && !m->shared_mixed_tensor[0]) {
		snprintf(m->shared_mixed_tensor, sizeof(m->shared_mixed_tensor), "%s", t->name);
		m->shared_mixed_dtype = served_dtype(t);
	}
}

/*
 * gpt_oss in transformers' bf16 layout: mlp.router.weight [E, H] and
 * .bias [E]; mlp.experts.gate_up_proj [E, H, 2I] (applied as x @ W, gate
 * in the even columns, up in the odd), .gate_up_proj_bias [E, 2I],
 * .down_proj [E, I, H], .down_proj_bias [E, H].  The release's MXFP4
 * tensors (gate_up_proj_blocks ...) are refused by name.
 */
static int check_gpt_oss_layer(struct moe_hf_model *m, struct moe_hf_layer *hl, bool *seen,
			       struct moe_err *err)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint64_t gu[3] = { E, H, 2 * I }, dn[3] = { E, I, H }, rb[1] = { E };
	const struct moe_st_tensor *t;
	char name[MAX_NAME];
	int r;

	snprintf(name, sizeof(name), "%sexperts.gate_up_proj_blocks", hl->prefix);
	if ((t = moe_st_find(m->ckpt, name)))
		return moe_err_set(err, -ENOTSUP, "MXFP4 weights are not supported yet: tensor '%s' in %s "
				   "(moed reads F32, BF16 and F16 weights; for gpt_oss, transformers' bf16 "
				   "layout)", name, tensor_file(m, t));
	snprintf(name, sizeof(name), "%srouter.weight", hl->prefix);
	r = need2(m, name, E, H, &hl->router, err);
	if (r == 0) {
		snprintf(name, sizeof(name), "%srouter.bias", hl->prefix);
		r = need(m, name, 1, rb, &hl->bias, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj", hl->prefix);
		r = need(m, name, 3, gu, &hl->gate_up, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj_bias", hl->prefix);
		r = need2(m, name, E, 2 * I, &hl->gate_up_bias, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.down_proj", hl->prefix);
		r = need(m, name, 3, dn, &hl->down, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.down_proj_bias", hl->prefix);
		r = need2(m, name, E, H, &hl->down_bias, err);
	}
	if (r < 0)
		return r;
	note_dtype(m, hl->gate_up, seen);
	note_dtype(m, hl->down, seen);
	return 0;
}

static int check_layer(struct moe_hf_model *m, struct moe_hf_layer *hl, bool *seen,
		       bool *seen_shared, struct moe_err *err)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint64_t Is = c->shared_intermediate_size;
	char name[MAX_NAME];
	int r;

	if (c->arch == MOE_ARCH_GPT_OSS)
		return check_gpt_oss_layer(m, hl, seen, err);
	snprintf(name, sizeof(name), "%sgate.weight", hl->prefix);
	r = need2(m, name, E, H, &hl->router, err);
	if (r < 0)
		return r;
	if (c->has_bias) {
		uint64_t shape[1] = { E };

		snprintf(name, sizeof(name), "%sgate.e_score_correction_bias", hl->prefix);
		r = need(m, name, 1, shape, &hl->bias, err);
		if (r < 0)
			return r;
	}
	if (c->shared_gate) {
		snprintf(name, sizeof(name), "%sshared_expert_gate.weight", hl->prefix);
		r = need2(m, name, 1, H, &hl->shared_gate, err);
		if (r < 0)
			return r;
	}
	if (Is) {
		for (int p = c->gated ? MOE_HF_GATE : MOE_HF_UP; p <= MOE_HF_DOWN; p++) {
			shared_name(m, hl->prefix, (enum moe_hf_part)p, name, sizeof(name));
			r = p == MOE_HF_DOWN ? need2_q(m, name, H, Is, &hl->shared[p], &hl->shared_scale[p], err)
					     : need2_q(m, name, Is, H, &hl->shared[p], &hl->shared_scale[p], err);
			if (r < 0)
				return r;
			note_shared_dtype(m, hl->shared[p], seen_shared);
		}
	}
	if (hl->fused) {
		const struct moe_st_tensor *fused_scale;
		uint64_t gu[3] = { E, c->gated ? 2 * I : I, H }, dn[3] = { E, H, I };

		snprintf(name, sizeof(name), "%sexperts.%s", hl->prefix, c->gated ? "gate_up_proj" : "up_proj");
		r = need_q(m, name, 3, gu, &hl->gate_up, &fused_scale, err);  /* FP8: refused */
		if (r < 0)
			return r;
		note_dtype(m, hl->gate_up, seen);
		snprintf(name, sizeof(name), "%sexperts.down_proj", hl->prefix);
		r = need_q(m, name, 3, dn, &hl->down, &fused_scale, err);
		if (r < 0)
			return r;
		note_dtype(m, hl->down, seen);
		return 0;
	}
	hl->experts = calloc(E * 3, sizeof(*hl->experts));
	hl->scales = calloc(E * 3, sizeof(*hl->scales));
	if (!hl->experts || !hl->scales)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (uint32_t j = 0; j < E; j++)
		for (int p = c->gated ? MOE_HF_GATE : MOE_HF_UP; p <= MOE_HF_DOWN; p++) {
			const struct moe_st_tensor **t = &hl->experts[(uint64_t)j * 3 + (uint64_t)p];
			const struct moe_st_tensor **s = &hl->scales[(uint64_t)j * 3 + (uint64_t)p];

			expert_name(m, hl->prefix, j, (enum moe_hf_part)p, name, sizeof(name));
			r = p == MOE_HF_DOWN ? need2_q(m, name, H, I, t, s, err)
					     : need2_q(m, name, I, H, t, s, err);
			if (r < 0)
				return r;
			note_dtype(m, *t, seen);
		}
	return 0;
}

int moe_hf_model_open(const char *dir, struct moe_hf_model **ret, struct moe_err *err)
{
	struct moe_hf_model *m;
	uint64_t gates = 0;
	bool seen = false, seen_shared = false;
	int r;

	m = calloc(1, sizeof(*m));
	if (!m || !(m->dir = strdup(dir))) {
		free(m);
		return moe_err_set(err, -ENOMEM, "out of memory");
	}
	r = moe_hf_config_load(dir, &m->hc, err);
	if (r < 0)
		goto fail;
	m->cfg = m->hc->cfg;
	r = moe_st_checkpoint_open(dir, &m->ckpt, err);
	if (r < 0)
		goto fail;
	m->layers = calloc(m->hc->n_moe_layers, sizeof(*m->layers));
	if (!m->layers) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	find_layout(m, &gates);
	/* Gated unless no expert anywhere has a gate; if any has one, every one
	 * must, and check_layer names the first without. */
	m->cfg.gated = gates > 0;
	for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
		r = check_layer(m, &m->layers[i], &seen, &seen_shared, err);
		if (r < 0)
			goto fail;
	}
	m->cfg.weight_dtype = m->expert_dtype;
	m->cfg.shared_dtype = seen_shared ? m->shared_dtype : m->expert_dtype;
	*ret = m;
	return 0;
fail:
	moe_hf_model_close(m);
	return r;
}

int moe_hf_expert_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert,
			enum moe_hf_part part, struct moe_hf_slice *ret)
{
	const struct moe_model_config *c = &m->cfg;
	const struct moe_hf_layer *hl;
	struct moe_hf_slice s;
	uint64_t mat, es, inter;

	if (li >= m->hc->n_moe_layers || (part == MOE_HF_GATE && !c->gated) || part > MOE_HF_DOWN)
		return -ENOENT;
	hl = &m->layers[li];
	memset(&s, 0, sizeof(s));
	if (expert == UINT32_MAX) {
		if (!c->shared_intermediate_size)
			return -ENOENT;
		s.t = hl->shared[part];
		s.scale = hl->shared_scale[part];
		s.nbytes = s.t->nbytes;
		s.n_elems = (uint64_t)c->hidden_size * c->shared_intermediate_size;
	} else if (expert >= c->num_experts) {
		return -ENOENT;
	} else if (c->arch == MOE_ARCH_GPT_OSS) {
		/* the expert's whole input-major matrix: [H][2I] for gate and up
		 * (interleaved), [I][H] for down */
		s.t = part == MOE_HF_DOWN ? hl->down : hl->gate_up;
		es = moe_dtype_size((enum moe_dtype)s.t->dtype);
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size * (part == MOE_HF_DOWN ? 1 : 2);
		s.nbytes = s.n_elems * es;
		s.offset = expert * s.nbytes;
		s.layout = part == MOE_HF_DOWN ? MOE_HF_TRANSPOSED : MOE_HF_INTERLEAVED_T;
	} else if (hl->fused) {
		s.t = part == MOE_HF_DOWN ? hl->down : hl->gate_up;
		es = moe_dtype_size((enum moe_dtype)s.t->dtype);
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size;
		mat = s.n_elems * es;
		if (part == MOE_HF_DOWN || !c->gated)
			s.offset = expert * mat;
		else
			s.offset = (2 * (uint64_t)expert + (part == MOE_HF_UP)) * mat;
		s.nbytes = mat;
	} else {
		s.t = hl->experts[(uint64_t)expert * 3 + part];
		s.scale = hl->scales[(uint64_t)expert * 3 + part];
		s.nbytes = s.t->nbytes;
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size;
	}
	s.dtype = served_dtype(s.t);
	inter = expert == UINT32_MAX ? c->shared_intermediate_size : c->moe_intermediate_size;
	s.rows = part == MOE_HF_DOWN ? c->hidden_size : inter;
	s.cols = part == MOE_HF_DOWN ? inter : c->hidden_size;
	*ret = s;
	return 0;
}

int moe_hf_expert_bias_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert, bool down,
			     struct moe_hf_slice *ret)
{
	const struct moe_model_config *c = &m->cfg;
	const struct moe_hf_layer *hl;
	struct moe_hf_slice s;

	if (li >= m->hc->n_moe_layers || expert >= c->num_experts || !c->has_expert_bias)
		return -ENOENT;
	hl = &m->layers[li];
	memset(&s, 0, sizeof(s));
	s.t = down ? hl->down_bias : hl->gate_up_bias;
	s.n_elems = down ? c->hidden_size : 2 * (uint64_t)c->moe_intermediate_size;
	s.nbytes = s.n_elems * moe_dtype_size((enum moe_dtype)s.t->dtype);
	s.offset = expert * s.nbytes;
	s.dtype = (enum moe_dtype)s.t->dtype;
	s.layout = down ? MOE_HF_ROWS : MOE_HF_INTERLEAVED_T;
	*ret = s;
	return 0;
}
