/* SPDX-License-Identifier: MIT */
/*
 * Random Hugging Face checkpoints in the real layout of each architecture.
 *
 * The point is that `moectl pack` and the tests meet the same names, shapes,
 * config fields and sharding as a downloaded checkpoint, including the
 * tensors the packer must ignore (attention, dense layers, DeepSeek-V3's and
 * GLM-4.5's MTP layer), without downloading hundreds of GB.
 *
 * Values come from a counter-based generator keyed by (seed, tensor name):
 * element i of a tensor is a pure function of the key and i, so files are
 * bit-identical run to run, independent of sharding and write order, and
 * any chunk can be produced on its own.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <jansson.h>

#include "genmodel_impl.h"
#include "hfq4.h"

/* HF's default max_shard_size is "5GB" (decimal). */
#define GEN_DEFAULT_SHARD (5000ull * 1000 * 1000)

/* Bounds on what gen-model writes beyond moe_model_config_validate's. */
#define GEN_MAX_VOCAB (1u << 22)
#define GEN_MAX_HEADS 1024u
#define GEN_MAX_ATTN_DIM 65536u

/* ------------------------------------------------------------ options */

void moe_gen_defaults(enum moe_arch arch, struct moe_gen_options *o)
{
	memset(o, 0, sizeof(*o));
	o->arch = arch;
	o->dtype = MOE_DTYPE_BF16;
	o->hidden_size = 64;
	o->moe_intermediate_size = 32;
	o->num_experts = 8;
	o->top_k = 2;
	o->num_layers = 2;
	o->n_group = 1;
	o->topk_group = 1;
	o->decoder_sparse_step = 1;
	o->vocab_size = 256;
	o->num_attention_heads = 4;
	o->num_key_value_heads = 2;
	o->norm_topk_prob = -1;
	switch (arch) {
	case MOE_ARCH_MIXTRAL:
		break;
	case MOE_ARCH_QWEN2_MOE:
		o->intermediate_size = 128;
		o->n_shared_experts = 1;
		o->shared_intermediate_size = 128;
		break;
	case MOE_ARCH_QWEN3_MOE:
		o->intermediate_size = 128;
		o->head_dim = 16;
		break;
	case MOE_ARCH_OLMOE:
		o->num_key_value_heads = 4;
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3:
		/* Three layers so that layer 0 is dense and 1, 2 are MoE. */
		o->num_layers = 3;
		o->first_k_dense_replace = 1;
		o->intermediate_size = 128;
		o->num_key_value_heads = 4;
		o->kv_lora_rank = 32;
		o->qk_nope_head_dim = 16;
		o->qk_rope_head_dim = 8;
		o->v_head_dim = 16;
		o->n_shared_experts = arch == MOE_ARCH_DEEPSEEK_V2 ? 2 : 1;
		if (arch == MOE_ARCH_DEEPSEEK_V3) {
			/* Four groups of four, two kept: the grouping matters. */
			o->num_experts = 16;
			o->top_k = 4;
			o->n_group = 4;
			o->topk_group = 2;
			o->q_lora_rank = 32;
			o->num_nextn_predict_layers = 1;
		}
		break;
	case MOE_ARCH_GLM4_MOE:
		/* GLM-4.5-Air in miniature: layer 0 dense, 1 and 2 MoE, one
		 * shared expert, no groups (n_group 1 in every release), the
		 * MTP layer; head_dim is a field of its own, as in the release. */
		o->num_layers = 3;
		o->first_k_dense_replace = 1;
		o->intermediate_size = 128;
		o->num_experts = 16;
		o->top_k = 4;
		o->n_shared_experts = 1;
		o->head_dim = 16;
		o->num_nextn_predict_layers = 1;
		break;
	case MOE_ARCH_GPT_OSS:
		/* gpt-oss in miniature: top-4, head_dim a field of its own
		 * (64 heads of 64 on a hidden size of 2880 in the release) */
		o->top_k = 4;
		o->head_dim = 16;
		break;
	default:
		break;
	}
}

/* Architectures with first_k_dense_replace, n_shared_experts x
 * moe_intermediate_size shared experts, expert groups and
 * routed_scaling_factor. */
static bool has_dense_prefix(enum moe_arch a)
{
	return a == MOE_ARCH_DEEPSEEK_V2 || a == MOE_ARCH_DEEPSEEK_V3 || a == MOE_ARCH_GLM4_MOE;
}

struct gen_preset {
	const char *name;
	int arch;                 /* -1: keep opt->arch */
	uint32_t hidden, moe_i, dense_i, experts, top_k, layers, vocab;
	uint32_t heads, kv_heads, head_dim;
	uint32_t n_group, topk_group, n_shared, shared_i, first_dense;
	int norm;                 /* -1: default */
	float scaling;
	uint32_t q_lora, kv_lora, nope, rope, v_head, mtp;
};

/* Presets' fields added after the table above had its shape: by name, so
 * that its rows keep theirs. */
static const struct {
	const char *name;
	bool qk_norm;             /* glm4_moe use_qk_norm */
	uint32_t max_pos;         /* max_position_embeddings; 0: the arch's default */
} preset_extra[] = {
	{ "glm-4.5", true, 131072 },
	{ "glm-4.6", true, 202752 },   /* GLM-4.6's 200K context */
};

/* The shapes of the released models' config.json files. */
static const struct gen_preset presets[] = {
	{ .name = "tiny", .arch = -1 },
	{ .name = "small", .arch = -1 },
	{ "deepseek-v3", MOE_ARCH_DEEPSEEK_V3, 7168, 2048, 18432, 256, 8, 61, 129280, 128, 128, 0,
	  8, 4, 1, 0, 3, 1, 2.5f, 1536, 512, 128, 64, 128, 1 },
	/* Kimi-K2 (config.json model_type kimi_k2, DeepseekV3ForCausalLM):
	 * DeepSeek-V3's layout with 384 experts in one group, 64 heads, no MTP
	 * layer; released in FP8 128x128 (add quant_fp8) */
	{ "kimi-k2", MOE_ARCH_DEEPSEEK_V3, 7168, 2048, 18432, 384, 8, 61, 163840, 64, 64, 0,
	  1, 1, 1, 0, 1, 1, 2.827f, 1536, 512, 128, 64, 128, 0 },
	{ "deepseek-v2-lite", MOE_ARCH_DEEPSEEK_V2, 2048, 1408, 10944, 64, 6, 27, 102400, 16, 16, 0,
	  1, 1, 2, 0, 1, 0, 1.0f, 0, 512, 128, 64, 128, 0 },
	{ "qwen3-30b-a3b", MOE_ARCH_QWEN3_MOE, 2048, 768, 6144, 128, 8, 48, 151936, 32, 4, 128,
	  1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0 },
	{ "qwen2-57b-a14b", MOE_ARCH_QWEN2_MOE, 3584, 2560, 18944, 64, 8, 28, 151936, 28, 4, 0,
	  1, 1, 1, 20480, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
	{ "mixtral-8x7b", MOE_ARCH_MIXTRAL, 4096, 14336, 0, 8, 2, 32, 32000, 32, 8, 0,
	  1, 1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0 },
	{ "olmoe-1b-7b", MOE_ARCH_OLMOE, 2048, 1024, 0, 64, 8, 16, 50304, 16, 16, 0,
	  1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
	{ "glm-4.5-air", MOE_ARCH_GLM4_MOE, 4096, 1408, 10944, 128, 8, 46, 151552, 96, 8, 128,
	  1, 1, 1, 0, 1, 1, 1.0f, 0, 0, 0, 0, 0, 1 },
	/* GLM-4.5 (zai-org/GLM-4.5, and GLM-4.5-FP8 with quant_fp8): 3 dense
	 * layers of 12288, 160 experts of 1536, scaling 2.5; use_qk_norm in
	 * preset_extra */
	{ "glm-4.5", MOE_ARCH_GLM4_MOE, 5120, 1536, 12288, 160, 8, 92, 151552, 96, 8, 128,
	  1, 1, 1, 0, 3, 1, 2.5f, 0, 0, 0, 0, 0, 1 },
	/* GLM-4.6: GLM-4.5's layers, a 200K context (max_position_embeddings) */
	{ "glm-4.6", MOE_ARCH_GLM4_MOE, 5120, 1536, 12288, 160, 8, 92, 151552, 96, 8, 128,
	  1, 1, 1, 0, 3, 1, 2.5f, 0, 0, 0, 0, 0, 1 },
	{ "gpt-oss-20b", MOE_ARCH_GPT_OSS, 2880, 2880, 0, 32, 4, 24, 201088, 64, 8, 64,
	  1, 1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0 },
	{ "gpt-oss-120b", MOE_ARCH_GPT_OSS, 2880, 2880, 0, 128, 4, 36, 201088, 64, 8, 64,
	  1, 1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0 },
};

/* "small": big enough for benchmarks to measure something (~100 MB in bf16),
 * small enough to write in a second. */
static void gen_small(struct moe_gen_options *o)
{
	o->hidden_size = 512;
	o->moe_intermediate_size = 256;
	o->num_layers = has_dense_prefix(o->arch) ? 5 : 4;
	o->vocab_size = 1024;
	o->num_attention_heads = 8;
	if (o->intermediate_size)
		o->intermediate_size = 1024;
	if (o->arch == MOE_ARCH_QWEN2_MOE)
		o->shared_intermediate_size = 1024;
	if (o->arch == MOE_ARCH_QWEN3_MOE || o->arch == MOE_ARCH_GLM4_MOE || o->arch == MOE_ARCH_GPT_OSS)
		o->head_dim = 64;
	if (o->arch == MOE_ARCH_OLMOE || o->arch == MOE_ARCH_DEEPSEEK_V2 ||
	    o->arch == MOE_ARCH_DEEPSEEK_V3)
		o->num_key_value_heads = 8;
	if (o->arch == MOE_ARCH_MIXTRAL)
		return;    /* Mixtral: 8 experts, top-2 */
	o->num_experts = 32;
	o->top_k = 4;
	if (o->arch == MOE_ARCH_DEEPSEEK_V3) {
		o->top_k = 8;
		o->n_group = 8;
		o->topk_group = 4;
		o->q_lora_rank = 128;
	}
	if (o->arch == MOE_ARCH_DEEPSEEK_V2 || o->arch == MOE_ARCH_DEEPSEEK_V3) {
		o->kv_lora_rank = 64;
		o->qk_nope_head_dim = 32;
		o->qk_rope_head_dim = 16;
		o->v_head_dim = 32;
	}
}

int moe_gen_preset(const char *name, struct moe_gen_options *opt, struct moe_err *err)
{
	const struct gen_preset *p = NULL;
	enum moe_arch arch;

	for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
		if (!strcmp(name, presets[i].name))
			p = &presets[i];
	if (!p)
		return moe_err_set(err, -EINVAL,
				   "unknown preset '%s' (presets: tiny, small, deepseek-v3, kimi-k2, deepseek-v2-lite, "
				   "qwen3-30b-a3b, qwen2-57b-a14b, mixtral-8x7b, olmoe-1b-7b, glm-4.5-air, "
				   "glm-4.5, glm-4.6, gpt-oss-20b, gpt-oss-120b)",
				   name);
	arch = p->arch < 0 ? opt->arch : (enum moe_arch)p->arch;
	if ((unsigned)arch >= MOE_ARCH_COUNT)
		return moe_err_set(err, -EINVAL, "preset '%s' needs an architecture", name);
	moe_gen_defaults(arch, opt);
	if (p->arch < 0) {
		if (!strcmp(name, "small"))
			gen_small(opt);
		return 0;
	}
	opt->hidden_size = p->hidden;
	opt->moe_intermediate_size = p->moe_i;
	opt->intermediate_size = p->dense_i;
	opt->num_experts = p->experts;
	opt->top_k = p->top_k;
	opt->num_layers = p->layers;
	opt->vocab_size = p->vocab;
	opt->num_attention_heads = p->heads;
	opt->num_key_value_heads = p->kv_heads;
	opt->head_dim = p->head_dim;
	opt->n_group = p->n_group;
	opt->topk_group = p->topk_group;
	opt->n_shared_experts = p->n_shared;
	opt->shared_intermediate_size = p->shared_i;
	opt->first_k_dense_replace = p->first_dense;
	opt->norm_topk_prob = p->norm;
	opt->routed_scaling_factor = p->scaling;
	opt->q_lora_rank = p->q_lora;
	opt->kv_lora_rank = p->kv_lora;
	opt->qk_nope_head_dim = p->nope;
	opt->qk_rope_head_dim = p->rope;
	opt->v_head_dim = p->v_head;
	opt->num_nextn_predict_layers = p->mtp;
	for (size_t i = 0; i < sizeof(preset_extra) / sizeof(preset_extra[0]); i++)
		if (!strcmp(name, preset_extra[i].name)) {
			opt->qk_norm = preset_extra[i].qk_norm;
			opt->max_position_embeddings = preset_extra[i].max_pos;
		}
	return 0;
}

/* --------------------------------------------------------- resolution */


static uint32_t gcd_u32(uint32_t a, uint32_t b)
{
	while (b) {
		uint32_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

static uint32_t or_default(uint32_t v, uint32_t d)
{
	return v ? v : d;
}

/* Every matrix int4 quantizes: rows a multiple of 8 (packed along N),
 * columns of 16 and of the group size. */
static int check_q4_shape(const struct gen_dims *d, const char *what, uint32_t rows, uint32_t cols,
			  struct moe_err *err)
{
	if (!d->q4 || !rows)
		return 0;
	if (rows % 8 || cols % 16 || (d->q4_group && cols % d->q4_group))
		return moe_err_set(err, -EINVAL, "--quant %s: %s is %u x %u; int4 needs rows a multiple of 8 "
				   "and columns of 16 and of the group size %u", moe_q4_format_name(d->q4),
				   what, rows, cols, d->q4_group);
	return 0;
}

int gen_resolve(const struct moe_gen_options *o, struct gen_dims *d, struct moe_err *err)
{
	struct moe_gen_options def;
	struct moe_model_config cfg;
	const char *an = moe_arch_name(o->arch);
	enum moe_act act;
	int r;

	if (!an)
		return moe_err_set(err, -EINVAL, "invalid architecture %d", (int)o->arch);
	if (moe_dtype_size(o->dtype) == 0)
		return moe_err_set(err, -EINVAL, "invalid dtype %d", (int)o->dtype);
	if (moe_dtype_is_blocked(o->dtype))
		return moe_err_set(err, -EINVAL, "dtype %s: ask for FP8 with quant_fp8 (--quant fp8)",
				   moe_dtype_name(o->dtype));
	moe_gen_defaults(o->arch, &def);
	memset(d, 0, sizeof(*d));
	d->arch = o->arch;
	d->dtype = o->dtype;
	d->deepseek = o->arch == MOE_ARCH_DEEPSEEK_V2 || o->arch == MOE_ARCH_DEEPSEEK_V3;
	d->H = or_default(o->hidden_size, def.hidden_size);
	d->I = or_default(o->moe_intermediate_size, def.moe_intermediate_size);
	d->E = or_default(o->num_experts, def.num_experts);
	d->k = or_default(o->top_k, def.top_k);
	d->L = or_default(o->num_layers, def.num_layers);
	d->V = or_default(o->vocab_size, def.vocab_size);
	d->heads = or_default(o->num_attention_heads, def.num_attention_heads);
	d->kv_heads = or_default(o->num_key_value_heads, def.num_key_value_heads);
	d->n_group = or_default(o->n_group, 1);
	d->topk_group = or_default(o->topk_group, 1);
	d->n_shared = o->n_shared_experts;
	d->first_dense = o->first_k_dense_replace;
	d->sparse_step = or_default(o->decoder_sparse_step, 1);
	d->gated = !o->plain_experts;
	d->fused = o->fused_experts;
	d->act = o->hidden_act ? o->hidden_act : "silu";
	d->shard_bytes = o->shard_bytes ? o->shard_bytes : GEN_DEFAULT_SHARD;
	d->wscale = o->weight_scale;
	d->mtp = o->num_nextn_predict_layers;
	d->skew = o->router_skew;
	d->fp8 = o->quant_fp8;
	d->fp8_shared = d->fp8 && o->quant_skip != MOE_GEN_QUANT_SKIP_SHARED;
	d->fp8_routed = d->fp8 && o->quant_skip != MOE_GEN_QUANT_SKIP_ROUTED;
	d->qk_norm = o->qk_norm;
	d->max_pos = o->max_position_embeddings;
	d->mxfp4 = o->quant_mxfp4;
	r = gen_resolve_q4(o, d, err);
	if (r < 0)
		return r;
	/* Written so that NaN fails too. */
	if (!(d->skew >= 0.0f && d->skew <= MOE_GEN_MAX_ROUTER_SKEW))
		return moe_err_set(err, -EINVAL, "router_skew %g: expected a number from 0 to %g",
				   (double)d->skew, (double)MOE_GEN_MAX_ROUTER_SKEW);

	/* Options the architecture has no config field for are refused rather
	 * than silently dropped. */
	if (!has_dense_prefix(o->arch)) {
		if (d->n_group != 1 || d->topk_group != 1)
			return moe_err_set(err, -EINVAL, "expert groups (n_group %u, topk_group %u) exist only "
					   "in deepseek_v2/deepseek_v3/glm4_moe, not %s", d->n_group,
					   d->topk_group, an);
		if (d->first_dense)
			return moe_err_set(err, -EINVAL, "first_k_dense_replace exists only in deepseek_v2/"
					   "deepseek_v3/glm4_moe, not %s", an);
		if (o->routed_scaling_factor != 0.0f && o->routed_scaling_factor != 1.0f)
			return moe_err_set(err, -EINVAL, "routed_scaling_factor exists only in deepseek_v2/"
					   "deepseek_v3/glm4_moe, not %s", an);
	}
	if ((unsigned)o->quant_skip > MOE_GEN_QUANT_SKIP_ROUTED)
		return moe_err_set(err, -EINVAL, "invalid quant_skip %d", (int)o->quant_skip);
	if (o->quant_skip && !d->fp8)
		return moe_err_set(err, -EINVAL, "--quant-skip keeps experts out of a quantization: "
				   "it needs --quant fp8");
	if (o->quant_skip == MOE_GEN_QUANT_SKIP_SHARED && !d->n_shared)
		return moe_err_set(err, -EINVAL, "--quant-skip shared: %s has no shared expert here", an);
	if (o->qk_norm && o->arch != MOE_ARCH_GLM4_MOE)
		return moe_err_set(err, -EINVAL, "use_qk_norm is a glm4_moe field, not %s's%s", an,
				   o->arch == MOE_ARCH_QWEN3_MOE || o->arch == MOE_ARCH_OLMOE ?
				   " (it always has q_norm and k_norm)" : "");
	if (o->max_position_embeddings && o->arch != MOE_ARCH_GLM4_MOE)
		return moe_err_set(err, -EINVAL, "max_position_embeddings is set for glm4_moe only, not %s", an);
	if (d->fp8 && d->fused)
		return moe_err_set(err, -EINVAL, "FP8 (--quant fp8) is written per expert, not with fused experts");
	if (d->q4 && d->fused)
		return moe_err_set(err, -EINVAL, "int4 (--quant %s) is written per expert, not with fused "
				   "experts", moe_q4_format_name(d->q4));
	if (d->q4 && o->arch == MOE_ARCH_GPT_OSS)
		return moe_err_set(err, -EINVAL, "int4 (--quant %s) is not written for gpt_oss (released in "
				   "MXFP4)", moe_q4_format_name(d->q4));
	if (o->topk_method && !d->deepseek)
		return moe_err_set(err, -EINVAL, "topk_method exists only in deepseek_v2/deepseek_v3, "
				   "not %s%s", an, o->arch == MOE_ARCH_GLM4_MOE ?
				   " (transformers always routes it as noaux_tc)" : "");
	if (d->mtp && o->arch != MOE_ARCH_DEEPSEEK_V3 && o->arch != MOE_ARCH_GLM4_MOE)
		return moe_err_set(err, -EINVAL, "num_nextn_predict_layers (MTP) exists only in deepseek_v3 "
				   "and glm4_moe");
	if (d->mtp > 1)
		return moe_err_set(err, -EINVAL, "num_nextn_predict_layers %u: only 0 or 1 is supported", d->mtp);
	if ((o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_QWEN3_MOE ||
	     o->arch == MOE_ARCH_OLMOE || o->arch == MOE_ARCH_GPT_OSS) && d->n_shared)
		return moe_err_set(err, -EINVAL, "%s has no shared experts", an);
	if (o->arch == MOE_ARCH_MIXTRAL && o->norm_topk_prob >= 0)
		return moe_err_set(err, -EINVAL, "mixtral has no norm_topk_prob: it always renormalises");
	if (o->arch == MOE_ARCH_GPT_OSS) {
		/* GptOssConfig has none of these; its experts are its own */
		if (o->norm_topk_prob >= 0)
			return moe_err_set(err, -EINVAL, "gpt_oss has no norm_topk_prob: its weights are the "
					   "softmax of the k chosen logits");
		if (o->plain_experts || o->fused_experts)
			return moe_err_set(err, -EINVAL, "gpt_oss experts have one layout (gate_up_proj [E, H, 2I], "
					   "gate and up interleaved): no plain or fused option");
		if (strcmp(d->act, "silu"))
			return moe_err_set(err, -EINVAL, "gpt_oss experts apply their clamped SwiGLU: "
					   "hidden_act is silu");
	}
	if (d->mxfp4 && o->arch != MOE_ARCH_GPT_OSS)
		return moe_err_set(err, -EINVAL, "--quant mxfp4 writes gpt-oss's release layout: gpt_oss only, "
				   "not %s", an);
	if (d->mxfp4 && d->fp8)
		return moe_err_set(err, -EINVAL, "--quant fp8 and --quant mxfp4 cannot be combined");
	if ((o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_OLMOE || o->arch == MOE_ARCH_GPT_OSS) &&
	    o->intermediate_size)
		return moe_err_set(err, -EINVAL, "%s has no dense layers: its intermediate_size is the "
				   "expert size (moe_intermediate_size)", an);
	if (o->arch != MOE_ARCH_QWEN2_MOE && o->arch != MOE_ARCH_QWEN3_MOE && d->sparse_step != 1)
		return moe_err_set(err, -EINVAL, "decoder_sparse_step exists only in qwen2_moe/qwen3_moe");
	if (o->arch != MOE_ARCH_QWEN2_MOE && o->shared_intermediate_size)
		return moe_err_set(err, -EINVAL, "shared_expert_intermediate_size exists only in qwen2_moe%s",
				   has_dense_prefix(o->arch) ?
				   " (this architecture's is n_shared_experts x moe_intermediate_size)" : "");
	if (moe_act_parse(d->act, &act) < 0)
		return moe_err_set(err, -EINVAL, "unknown activation '%s' (silu, gelu, gelu_pytorch_tanh, relu)",
				   d->act);

	d->dense_I = o->intermediate_size;
	if (o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_OLMOE || o->arch == MOE_ARCH_GPT_OSS)
		d->dense_I = 0;
	else if (!d->dense_I)
		d->dense_I = def.intermediate_size ? def.intermediate_size : 4 * d->I;
	if (o->arch == MOE_ARCH_QWEN2_MOE)
		d->shared_I = d->n_shared ? or_default(o->shared_intermediate_size, 4 * d->I) : 0;
	else if (has_dense_prefix(o->arch))
		d->shared_I = d->n_shared * d->I;

	switch (o->arch) {
	case MOE_ARCH_DEEPSEEK_V2:
		d->norm_topk = o->norm_topk_prob > 0;
		d->scaling = o->routed_scaling_factor != 0.0f ? o->routed_scaling_factor : 1.0f;
		d->topk_method = o->topk_method ? o->topk_method : "greedy";
		if (strcmp(d->topk_method, "greedy") && strcmp(d->topk_method, "group_limited_greedy"))
			return moe_err_set(err, -EINVAL, "deepseek_v2 topk_method '%s': expected greedy or "
					   "group_limited_greedy", d->topk_method);
		break;
	case MOE_ARCH_DEEPSEEK_V3:
		d->norm_topk = o->norm_topk_prob != 0;
		d->scaling = o->routed_scaling_factor != 0.0f ? o->routed_scaling_factor : 2.5f;
		d->topk_method = o->topk_method ? o->topk_method : "noaux_tc";
		if (strcmp(d->topk_method, "noaux_tc"))
			return moe_err_set(err, -EINVAL, "deepseek_v3 topk_method '%s': only noaux_tc",
					   d->topk_method);
		break;
	case MOE_ARCH_GLM4_MOE:
		/* Glm4MoeConfig: norm_topk_prob true, routed_scaling_factor 1.0 */
		d->norm_topk = o->norm_topk_prob != 0;
		d->scaling = o->routed_scaling_factor != 0.0f ? o->routed_scaling_factor : 1.0f;
		break;
	case MOE_ARCH_MIXTRAL:
	case MOE_ARCH_GPT_OSS:
		d->norm_topk = true;
		d->scaling = 1.0f;
		break;
	case MOE_ARCH_QWEN3_MOE:
		d->norm_topk = o->norm_topk_prob != 0;   /* the released Qwen3 MoE models: true */
		d->scaling = 1.0f;
		break;
	default:
		d->norm_topk = o->norm_topk_prob > 0;
		d->scaling = 1.0f;
		break;
	}
	if (!isfinite(d->scaling) || d->scaling <= 0.0f)
		return moe_err_set(err, -EINVAL, "routed_scaling_factor %g must be positive", (double)d->scaling);

	/* Attention shapes only have to be self-consistent. */
	if (d->heads > GEN_MAX_HEADS || d->kv_heads > GEN_MAX_HEADS)
		return moe_err_set(err, -EINVAL, "num_attention_heads %u / num_key_value_heads %u: at most %u",
				   d->heads, d->kv_heads, GEN_MAX_HEADS);
	if (d->deepseek) {
		d->kv_heads = d->heads;          /* MLA: the config repeats num_attention_heads */
		d->q_lora = o->q_lora_rank;
		d->kv_lora = or_default(o->kv_lora_rank, def.kv_lora_rank);
		d->nope = or_default(o->qk_nope_head_dim, def.qk_nope_head_dim);
		d->rope = or_default(o->qk_rope_head_dim, def.qk_rope_head_dim);
		d->v_head = or_default(o->v_head_dim, def.v_head_dim);
		if (d->q_lora > GEN_MAX_ATTN_DIM || d->kv_lora > GEN_MAX_ATTN_DIM ||
		    d->nope > GEN_MAX_ATTN_DIM || d->rope > GEN_MAX_ATTN_DIM || d->v_head > GEN_MAX_ATTN_DIM)
			return moe_err_set(err, -EINVAL, "MLA dimensions are at most %u", GEN_MAX_ATTN_DIM);
	} else if (o->arch == MOE_ARCH_QWEN3_MOE || o->arch == MOE_ARCH_GLM4_MOE ||
		   o->arch == MOE_ARCH_GPT_OSS) {
		d->head_dim = or_default(o->head_dim, def.head_dim);
		if (d->head_dim > GEN_MAX_ATTN_DIM)
			return moe_err_set(err, -EINVAL, "head_dim %u is above %u", d->head_dim, GEN_MAX_ATTN_DIM);
		d->kv_heads = gcd_u32(d->heads, d->kv_heads);
	} else {
		/* head_dim = H / heads: pick the largest head count that divides
		 * H so that any --hidden works. */
		while (d->heads > 1 && d->H % d->heads)
			d->heads--;
		d->kv_heads = gcd_u32(d->heads, d->kv_heads);
		d->head_dim = d->H / (d->heads ? d->heads : 1);
	}
	if (d->V > GEN_MAX_VOCAB)
		return moe_err_set(err, -EINVAL, "vocab_size %u is above %u", d->V, GEN_MAX_VOCAB);

	/* The routing and shape rules moed itself enforces. */
	memset(&cfg, 0, sizeof(cfg));
	cfg.arch = o->arch;
	cfg.hidden_size = d->H;
	cfg.moe_intermediate_size = d->I;
	cfg.num_experts = d->E;
	cfg.top_k = d->k;
	cfg.num_hidden_layers = d->L;
	cfg.n_group = d->n_group;
	cfg.topk_group = d->topk_group;
	cfg.n_shared_experts = d->n_shared;
	cfg.shared_intermediate_size = d->shared_I;
	d->v3_routing = o->arch == MOE_ARCH_DEEPSEEK_V3 || o->arch == MOE_ARCH_GLM4_MOE;
	cfg.scoring = d->v3_routing ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX;
	cfg.topk_method = d->v3_routing ? MOE_TOPK_NOAUX_TC :
			  (d->topk_method && !strcmp(d->topk_method, "group_limited_greedy")) ?
			  MOE_TOPK_GROUP_LIMITED : MOE_TOPK_GREEDY;
	cfg.norm_topk_prob = d->norm_topk;
	cfg.gated = d->gated;
	cfg.act = act;
	if (o->arch == MOE_ARCH_GPT_OSS) {
		cfg.act = MOE_ACT_SWIGLU_OAI;
		cfg.swiglu_alpha = 1.702f;
		cfg.swiglu_limit = 7.0f;
		cfg.has_bias = true;
		cfg.has_expert_bias = true;
	}
	cfg.routed_scaling_factor = d->scaling;
	cfg.weight_dtype = d->mxfp4 ? MOE_DTYPE_MXFP4 : d->dtype;   /* checks K % 32 */
	cfg.shared_dtype = d->dtype;
	if (cfg.has_expert_bias && d->fp8)
		return moe_err_set(err, -ENOTSUP, "--quant fp8: expert biases (gpt_oss) with fp8 weights are "
				   "not supported yet");
	r = moe_model_config_validate(&cfg, err);
	if (r == 0)
		r = check_q4_shape(d, "an expert's gate and up", d->I, d->H, err);
	if (r == 0)
		r = check_q4_shape(d, "an expert's down", d->H, d->I, err);
	if (r == 0)
		r = check_q4_shape(d, "the shared expert's gate and up", d->shared_I, d->H, err);
	if (r == 0)
		r = check_q4_shape(d, "the shared expert's down", d->shared_I ? d->H : 0, d->shared_I, err);
	if (r == 0)
		r = check_q4_shape(d, "a dense MLP's gate and up", d->dense_I, d->H, err);
	if (r == 0)
		r = check_q4_shape(d, "a dense MLP's down", d->dense_I ? d->H : 0, d->dense_I, err);
	if (r < 0)
		return r;
	if (d->dense_I > (1u << 20))
		return moe_err_set(err, -EINVAL, "intermediate_size %u is above %u", d->dense_I, 1u << 20);
	/* an FP8 matrix is written a block row at a time, in one GEN_CHUNK */
	if (d->fp8 && ((uint64_t)GEN_FP8_BAND * (d->H > d->I ? d->H : d->I) > GEN_CHUNK ||
		       (uint64_t)GEN_FP8_BAND * d->dense_I > GEN_CHUNK ||
		       (uint64_t)GEN_FP8_BAND * d->shared_I > GEN_CHUNK))
		return moe_err_set(err, -EINVAL, "FP8: matrices wider than %u columns are not generated",
				   GEN_CHUNK / GEN_FP8_BAND);

	/* an MXFP4 tensor is written GEN_MX_BAND rows at a time, in one GEN_CHUNK */
	if (d->mxfp4 && (uint64_t)GEN_MX_BAND * (d->H > d->I ? d->H : d->I) / 2 > GEN_CHUNK)
		return moe_err_set(err, -EINVAL, "MXFP4: matrices wider than %u columns are not generated",
				   GEN_CHUNK / GEN_MX_BAND * 2);

	d->rule.arch = o->arch;
	d->rule.num_hidden_layers = d->L;
	d->rule.decoder_sparse_step = d->sparse_step;
	d->rule.first_k_dense_replace = d->first_dense;
	d->rule.moe_layer_freq = 1;
	for (uint32_t l = 0; l < d->L; l++)
		if (moe_layer_rule_is_moe(&d->rule, l))
			return 0;
	return moe_err_set(err, -EINVAL, "no MoE layer among the %u layers (first_k_dense_replace %u, "
			   "decoder_sparse_step %u)", d->L, d->first_dense, d->sparse_step);
}

/* ------------------------------------------------------------ the plan */


static void plan_add(struct gen_plan *p, enum moe_dtype dt, enum gen_fill fill, float std,
		     uint32_t ndim, const uint64_t *shape, const char *fmt, ...)
	__attribute__((format(printf, 7, 8)));

static void plan_add(struct gen_plan *p, enum moe_dtype dt, enum gen_fill fill, float std,
		     uint32_t ndim, const uint64_t *shape, const char *fmt, ...)
{
	struct gen_tensor *t;
	va_list ap;

	if (p->oom)
		return;
	if (p->n == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : 256;
		struct gen_tensor *nt = realloc(p->t, cap * sizeof(*nt));

		if (!nt) {
			p->oom = 1;
			return;
		}
		p->t = nt;
		p->cap = cap;
	}
	t = &p->t[p->n];
	memset(t, 0, sizeof(*t));
	va_start(ap, fmt);
	if (vasprintf(&t->name, fmt, ap) < 0) {
		va_end(ap);
		p->oom = 1;
		return;
	}
	va_end(ap);
	t->dtype = dt;
	t->fill = fill;
	t->amp = std * 1.7320508f;   /* uniform on [-a, a] has std a / sqrt(3) */
	t->ndim = ndim;
	t->nbytes = moe_dtype_size(dt);
	for (uint32_t i = 0; i < ndim; i++) {
		t->shape[i] = shape[i];
		t->nbytes *= shape[i];   /* bounded by gen_resolve: far from overflow */
	}
	p->total += t->nbytes;
	p->n++;
}

void gen_plan_free(struct gen_plan *p)
{
	for (size_t i = 0; i < p->n; i++) {
		free(p->t[i].name);
		free(p->t[i].row_scale);
		free(p->t[i].wname);
	}
	free(p->t);
}

#define SHAPE(...) ((const uint64_t[]){ __VA_ARGS__ })

/* A matrix [rows, cols] of the model dtype. */
#define MAT(p, d, std, rows, cols, ...) \
	plan_add(p, (d)->dtype, FILL_RANDOM, std, 2, SHAPE(rows, cols), __VA_ARGS__)
/* The int4 tensors of weight @name ("X.weight") [rows][cols] in d->q4's
 * format, in the order the releases write them (genq4.c). */
static void plan_q4(struct gen_plan *p, const struct gen_dims *d, float std, uint64_t rows,
		    uint64_t cols, const char *name)
{
	uint64_t G = d->q4_group ? d->q4_group : cols, ng = cols / G;
	int n = (int)strlen(name) - 7;   /* "X" of "X.weight" */
	size_t first = p->n;

	if (d->q4 == MOE_Q4F_CT) {
		plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 2, SHAPE(rows, cols / 8), "%.*s.weight_packed", n, name);
		plan_add(p, MOE_DTYPE_BF16, FILL_Q4, std, 2, SHAPE(rows, ng), "%.*s.weight_scale", n, name);
		plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 1, SHAPE(2), "%.*s.weight_shape", n, name);
	} else {
		if (d->q4 == MOE_Q4F_GPTQ)
			plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 2, SHAPE(cols / 8, rows), "%.*s.qweight", n, name);
		else
			plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 2, SHAPE(cols, rows / 8), "%.*s.qweight", n, name);
		plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 2, SHAPE(ng, rows / 8), "%.*s.qzeros", n, name);
		plan_add(p, MOE_DTYPE_F16, FILL_Q4, std, 2, SHAPE(ng, rows), "%.*s.scales", n, name);
		if (d->q4 == MOE_Q4F_GPTQ)
			plan_add(p, MOE_DTYPE_COUNT, FILL_Q4, std, 1, SHAPE(cols), "%.*s.g_idx", n, name);
	}
	for (size_t i = first; !p->oom && i < p->n; i++) {
		struct gen_tensor *t = &p->t[i];
		const char *suf = strrchr(t->name, '.') + 1;

		t->qrows = rows;
		t->qcols = cols;
		t->wname = strdup(name);
		if (!t->wname)
			p->oom = 1;
		t->q4_part = !strcmp(suf, "qweight") ? Q4_QWEIGHT : !strcmp(suf, "qzeros") ? Q4_QZEROS :
			     !strcmp(suf, "scales") ? Q4_SCALES : !strcmp(suf, "g_idx") ? Q4_G_IDX :
			     !strcmp(suf, "weight_packed") ? Q4_PACKED : !strcmp(suf, "weight_scale") ? Q4_SCALE :
			     Q4_SHAPE;
		/* int32 tensors (I64 weight_shape): bytes by hand, not by dtype */
		if (t->dtype == MOE_DTYPE_COUNT) {
			t->nbytes = (t->q4_part == Q4_SHAPE ? 8 : 4) * t->shape[0] * (t->ndim == 2 ? t->shape[1] : 1);
			p->total += t->nbytes;
		}
	}
}

/* A matrix of an MLP or an expert: FP8 with its scales when @q (d->fp8,
 * less what quant_skip keeps; the weight, then X.weight_scale_inv, as
 * DeepSeek-V3's files order them). */
static void plan_qmat(struct gen_plan *p, const struct gen_dims *d, bool q, float std, uint64_t rows,
		      uint64_t cols, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static void plan_qmat(struct gen_plan *p, const struct gen_dims *d, bool q, float std, uint64_t rows,
		      uint64_t cols, const char *fmt, ...)
{
	char name[256];
	va_list ap;
	size_t w;

	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	if (d->q4) {
		plan_q4(p, d, std, rows, cols, name);
		return;
	}
	if (!q) {
		MAT(p, d, std, rows, cols, "%s", name);
		return;
	}
	w = p->n;
	plan_add(p, MOE_DTYPE_FP8_E4M3_B128, FILL_FP8, std, 2, SHAPE(rows, cols), "%s", name);
	plan_add(p, MOE_DTYPE_F32, FILL_FP8_SCALE, std, 2,
		 SHAPE((rows + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK, (cols + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK),
		 "%s_scale_inv", name);
	if (!p->oom) {
		p->t[p->n - 1].src = w;
		p->t[p->n - 1].qrows = rows;
		p->t[p->n - 1].qcols = cols;
	}
}

/*
 * gpt_oss MXFP4 experts as the release holds them: @name_blocks [E, N,
 * K/32, 16] and @name_scales [E, N, K/32], U8, output-major rows (gate_up:
 * N = 2I with gate in the even rows, up in the odd; down: N = H).
 */
static void plan_mxfp4(struct gen_plan *p, float std, uint64_t E, uint64_t N, uint64_t K, const char *fmt,
		       unsigned l) __attribute__((format(printf, 6, 0)));

static void plan_mxfp4(struct gen_plan *p, float std, uint64_t E, uint64_t N, uint64_t K, const char *fmt,
		       unsigned l)
{
	char name[256];
	size_t w = p->n;

	snprintf(name, sizeof(name), fmt, l);
	plan_add(p, MOE_DTYPE_MXFP4, FILL_MXFP4, std, 4, SHAPE(E, N, K / MOE_MXFP4_BLOCK, MOE_MXFP4_BLOCK / 2),
		 "%s_blocks", name);
	plan_add(p, MOE_DTYPE_MXFP4, FILL_MXFP4_SCALE, std, 3, SHAPE(E, N, K / MOE_MXFP4_BLOCK),
		 "%s_scales", name);
	if (!p->oom)
		p->t[p->n - 1].src = w;
}

/* A norm weight [n] of ones. */
#define NORM(p, d, n, ...) plan_add(p, (d)->dtype, FILL_ONES, 0, 1, SHAPE(n), __VA_ARGS__)

/* Std of the "other" tensors (HF's initializer_range) and of the router and
 * experts, which follow 1/sqrt(fan_in) so activations keep their scale and
 * the router (twice that) picks experts decisively. */
static float std_other(const struct gen_dims *d)
{
	return d->wscale > 0 ? d->wscale : 0.02f;
}

static float std_fanin(const struct gen_dims *d, uint64_t fan_in, float mult)
{
	return d->wscale > 0 ? d->wscale : mult / sqrtf((float)fan_in);
}

static void plan_attention(struct gen_plan *p, const struct gen_dims *d, uint32_t l)
{
	float s = std_other(d);
	uint64_t H = d->H;

	if (d->deepseek) {
		uint64_t qh = (uint64_t)d->heads * (d->nope + d->rope);

		if (d->q_lora) {
			MAT(p, d, s, d->q_lora, H, "model.layers.%u.self_attn.q_a_proj.weight", l);
			NORM(p, d, d->q_lora, "model.layers.%u.self_attn.q_a_layernorm.weight", l);
			MAT(p, d, s, qh, d->q_lora, "model.layers.%u.self_attn.q_b_proj.weight", l);
		} else {
			MAT(p, d, s, qh, H, "model.layers.%u.self_attn.q_proj.weight", l);
		}
		MAT(p, d, s, (uint64_t)d->kv_lora + d->rope, H,
		    "model.layers.%u.self_attn.kv_a_proj_with_mqa.weight", l);
		NORM(p, d, d->kv_lora, "model.layers.%u.self_attn.kv_a_layernorm.weight", l);
		MAT(p, d, s, (uint64_t)d->heads * (d->nope + d->v_head), d->kv_lora,
		    "model.layers.%u.self_attn.kv_b_proj.weight", l);
		MAT(p, d, s, H, (uint64_t)d->heads * d->v_head, "model.layers.%u.self_attn.o_proj.weight", l);
		return;
	}
	uint64_t q = (uint64_t)d->heads * d->head_dim, kv = (uint64_t)d->kv_heads * d->head_dim;

	MAT(p, d, s, q, H, "model.layers.%u.self_attn.q_proj.weight", l);
	MAT(p, d, s, kv, H, "model.layers.%u.self_attn.k_proj.weight", l);
	MAT(p, d, s, kv, H, "model.layers.%u.self_attn.v_proj.weight", l);
	MAT(p, d, s, H, q, "model.layers.%u.self_attn.o_proj.weight", l);
	if (d->arch == MOE_ARCH_GPT_OSS) {
		/* GptOssAttention: attention_bias true on all four projections,
		 * and one learned sink logit per head */
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(q), "model.layers.%u.self_attn.q_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.k_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.v_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(H), "model.layers.%u.self_attn.o_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, 1.0f, 1, SHAPE(d->heads), "model.layers.%u.self_attn.sinks", l);
	} else if (d->arch == MOE_ARCH_QWEN2_MOE || d->arch == MOE_ARCH_GLM4_MOE) {
		/* GLM-4.5: attention_bias true, on q, k and v only */
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(q), "model.layers.%u.self_attn.q_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.k_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.v_proj.bias", l);
	}
	if (d->arch == MOE_ARCH_QWEN3_MOE || (d->arch == MOE_ARCH_GLM4_MOE && d->qk_norm)) {
		/* Qwen3, and GLM-4.5's use_qk_norm: RMSNorm over each head. */
		NORM(p, d, d->head_dim, "model.layers.%u.self_attn.q_norm.weight", l);
		NORM(p, d, d->head_dim, "model.layers.%u.self_attn.k_norm.weight", l);
	} else if (d->arch == MOE_ARCH_OLMOE) {
		/* OLMoE: RMSNorm over the whole projection. */
		NORM(p, d, q, "model.layers.%u.self_attn.q_norm.weight", l);
		NORM(p, d, kv, "model.layers.%u.self_attn.k_norm.weight", l);
	}
}

/* gate/up [I,H] and down [H,I] under @prefix (the plain MLP layout), FP8
 * when @q. */
static void plan_mlp(struct gen_plan *p, const struct gen_dims *d, bool q, uint64_t I, bool gated,
		     float in_std, float out_std, const char *prefix)
{
	if (gated)
		plan_qmat(p, d, q, in_std, I, d->H, "%s.gate_proj.weight", prefix);
	plan_qmat(p, d, q, in_std, I, d->H, "%s.up_proj.weight", prefix);
	plan_qmat(p, d, q, out_std, d->H, I, "%s.down_proj.weight", prefix);
}

static void plan_moe(struct gen_plan *p, const struct gen_dims *d, uint32_t l)
{
	bool mixtral = d->arch == MOE_ARCH_MIXTRAL;
	/* transformers v5 renames Mixtral's block_sparse_moe to mlp, and its
	 * fused layout is the same for every architecture. */
	const char *blk = mixtral && !d->fused ? "block_sparse_moe" : "mlp";
	float s_in = std_fanin(d, d->H, 1.0f), s_out = std_fanin(d, d->I, 1.0f);
	char prefix[96];

	if (d->arch == MOE_ARCH_GPT_OSS) {
		/* GptOssMLP: router with a bias; experts input-major (x @ W),
		 * gate and up interleaved in gate_up_proj's last dimension,
		 * every projection with a bias */
		plan_add(p, d->dtype, d->skew > 0.0f ? FILL_ROUTER : FILL_RANDOM, std_fanin(d, d->H, 2.0f), 2,
			 SHAPE(d->E, d->H), "model.layers.%u.mlp.router.weight", l);
		plan_add(p, d->dtype, FILL_RANDOM, 0.5f, 1, SHAPE(d->E), "model.layers.%u.mlp.router.bias", l);
		if (d->mxfp4) {
			plan_mxfp4(p, s_in, d->E, 2 * (uint64_t)d->I, d->H, "model.layers.%u.mlp.experts.gate_up_proj", l);
			plan_add(p, d->dtype, FILL_RANDOM, 0.5f, 2, SHAPE(d->E, 2 * (uint64_t)d->I),
				 "model.layers.%u.mlp.experts.gate_up_proj_bias", l);
			plan_mxfp4(p, s_out, d->E, d->H, d->I, "model.layers.%u.mlp.experts.down_proj", l);
			plan_add(p, d->dtype, FILL_RANDOM, 0.1f, 2, SHAPE(d->E, d->H),
				 "model.layers.%u.mlp.experts.down_proj_bias", l);
			return;
		}
		plan_add(p, d->dtype, FILL_RANDOM, s_in, 3, SHAPE(d->E, d->H, 2 * (uint64_t)d->I),
			 "model.layers.%u.mlp.experts.gate_up_proj", l);
		plan_add(p, d->dtype, FILL_RANDOM, 0.5f, 2, SHAPE(d->E, 2 * (uint64_t)d->I),
			 "model.layers.%u.mlp.experts.gate_up_proj_bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s_out, 3, SHAPE(d->E, d->I, d->H),
			 "model.layers.%u.mlp.experts.down_proj", l);
		plan_add(p, d->dtype, FILL_RANDOM, 0.1f, 2, SHAPE(d->E, d->H),
			 "model.layers.%u.mlp.experts.down_proj_bias", l);
		return;
	}

	/* Without skew, FILL_RANDOM: the bytes the generator wrote before the option. */
	plan_add(p, d->dtype, d->skew > 0.0f ? FILL_ROUTER : FILL_RANDOM, std_fanin(d, d->H, 2.0f), 2,
		 SHAPE(d->E, d->H), "model.layers.%u.%s.gate.weight", l, blk);
	if (d->v3_routing)
		/* F32 in the released checkpoints too, whatever the weights are. */
		plan_add(p, MOE_DTYPE_F32, FILL_RANDOM, 0.05f / 1.7320508f, 1, SHAPE(d->E),
			 "model.layers.%u.mlp.gate.e_score_correction_bias", l);
	if (d->fused) {
		/* Gate rows first, then up; plain experts have only up_proj [E,I,H]. */
		if (d->gated)
			plan_add(p, d->dtype, FILL_RANDOM, s_in, 3, SHAPE(d->E, 2 * (uint64_t)d->I, d->H),
				 "model.layers.%u.mlp.experts.gate_up_proj", l);
		else
			plan_add(p, d->dtype, FILL_RANDOM, s_in, 3, SHAPE(d->E, d->I, d->H),
				 "model.layers.%u.mlp.experts.up_proj", l);
		plan_add(p, d->dtype, FILL_RANDOM, s_out, 3, SHAPE(d->E, d->H, d->I),
			 "model.layers.%u.mlp.experts.down_proj", l);
	} else {
		for (uint32_t j = 0; j < d->E; j++) {
			if (mixtral) {
				if (d->gated)
					plan_qmat(p, d, d->fp8_routed, s_in, d->I, d->H,
						  "model.layers.%u.block_sparse_moe.experts.%u.w1.weight", l, j);
				plan_qmat(p, d, d->fp8_routed, s_out, d->H, d->I,
					  "model.layers.%u.block_sparse_moe.experts.%u.w2.weight", l, j);
				plan_qmat(p, d, d->fp8_routed, s_in, d->I, d->H,
					  "model.layers.%u.block_sparse_moe.experts.%u.w3.weight", l, j);
			} else {
				snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp.experts.%u", l, j);
				plan_mlp(p, d, d->fp8_routed, d->I, d->gated, s_in, s_out, prefix);
			}
		}
	}
	if (d->shared_I) {
		bool qwen = d->arch == MOE_ARCH_QWEN2_MOE;

		snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp.%s", l,
			 qwen ? "shared_expert" : "shared_experts");
		plan_mlp(p, d, d->fp8_shared, d->shared_I, d->gated, s_in, std_fanin(d, d->shared_I, 1.0f),
			 prefix);
		if (qwen)
			MAT(p, d, s_in, 1, d->H, "model.layers.%u.mlp.shared_expert_gate.weight", l);
	}
}

static void plan_layer(struct gen_plan *p, const struct gen_dims *d, uint32_t l, bool moe)
{
	char prefix[64];

	NORM(p, d, d->H, "model.layers.%u.input_layernorm.weight", l);
	plan_attention(p, d, l);
	NORM(p, d, d->H, "model.layers.%u.post_attention_layernorm.weight", l);
	if (moe) {
		plan_moe(p, d, l);
	} else {
		snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp", l);
		plan_mlp(p, d, d->fp8, d->dense_I, true, std_other(d), std_other(d), prefix);
	}
}

int gen_plan_build(struct gen_plan *p, const struct gen_dims *d, struct moe_err *err)
{
	float s = std_other(d);
	uint64_t used = 0;

	memset(p, 0, sizeof(*p));
	MAT(p, d, s, d->V, d->H, "model.embed_tokens.weight");
	for (uint32_t l = 0; l < d->L; l++)
		plan_layer(p, d, l, moe_layer_rule_is_moe(&d->rule, l));
	NORM(p, d, d->H, "model.norm.weight");
	MAT(p, d, s, d->V, d->H, "lm_head.weight");
	for (uint32_t m = 0; m < d->mtp; m++) {
		/* The multi-token-prediction module, saved as one more decoder
		 * layer with its own embedding.  DeepSeek-V3's has its own head
		 * too; GLM-4.5's shares lm_head (its release has
		 * shared_head.norm but no shared_head.head). */
		uint32_t l = d->L + m;

		MAT(p, d, s, d->V, d->H, "model.layers.%u.embed_tokens.weight", l);
		NORM(p, d, d->H, "model.layers.%u.enorm.weight", l);
		NORM(p, d, d->H, "model.layers.%u.hnorm.weight", l);
		MAT(p, d, s, d->H, 2 * (uint64_t)d->H, "model.layers.%u.eh_proj.weight", l);
		plan_layer(p, d, l, true);
		NORM(p, d, d->H, "model.layers.%u.shared_head.norm.weight", l);
		if (d->arch == MOE_ARCH_DEEPSEEK_V3)
			MAT(p, d, s, d->V, d->H, "model.layers.%u.shared_head.head.weight", l);
	}
	if (p->oom) {
		gen_plan_free(p);
		return moe_err_set(err, -ENOMEM, "out of memory planning %zu tensors", p->n);
	}
	/* Fill shards in order, as save_pretrained does: a new shard when the
	 * next tensor would push the current one past the limit. */
	for (size_t i = 0; i < p->n; i++) {
		if (used && used + p->t[i].nbytes > d->shard_bytes) {
			p->n_shards++;
			used = 0;
		}
		p->t[i].shard = p->n_shards;
		used += p->t[i].nbytes;
	}
	p->n_shards++;
	return 0;
}
