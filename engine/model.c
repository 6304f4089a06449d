/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "err.h"
#include "model.h"

static const char *const arch_names[MOE_ARCH_COUNT] = {
	[MOE_ARCH_MIXTRAL] = "mixtral",
	[MOE_ARCH_QWEN2_MOE] = "qwen2_moe",
	[MOE_ARCH_QWEN3_MOE] = "qwen3_moe",
	[MOE_ARCH_OLMOE] = "olmoe",
	[MOE_ARCH_DEEPSEEK_V2] = "deepseek_v2",
	[MOE_ARCH_DEEPSEEK_V3] = "deepseek_v3",
	[MOE_ARCH_GLM4_MOE] = "glm4_moe",
	[MOE_ARCH_GPT_OSS] = "gpt_oss",
};

const char *moe_arch_name(enum moe_arch a)
{
	if ((unsigned)a >= MOE_ARCH_COUNT)
		return NULL;
	return arch_names[a];
}

int moe_arch_parse(const char *model_type, enum moe_arch *ret)
{
	for (int i = 0; i < MOE_ARCH_COUNT; i++)
		if (strcmp(model_type, arch_names[i]) == 0) {
			*ret = (enum moe_arch)i;
			return 0;
		}
	return -EINVAL;
}

const char *moe_act_name(enum moe_act a)
{
	switch (a) {
	case MOE_ACT_SILU: return "silu";
	case MOE_ACT_GELU: return "gelu";
	case MOE_ACT_GELU_TANH: return "gelu_pytorch_tanh";
	case MOE_ACT_RELU: return "relu";
	case MOE_ACT_SWIGLU_OAI: return "swiglu_oai";
	}
	return "?";
}

int moe_act_parse(const char *name, enum moe_act *ret)
{
	if (!strcmp(name, "silu") || !strcmp(name, "swish"))
		*ret = MOE_ACT_SILU;
	else if (!strcmp(name, "gelu"))
		*ret = MOE_ACT_GELU;
	else if (!strcmp(name, "gelu_pytorch_tanh") || !strcmp(name, "gelu_new") ||
		 !strcmp(name, "gelu_fast"))
		*ret = MOE_ACT_GELU_TANH;
	else if (!strcmp(name, "relu"))
		*ret = MOE_ACT_RELU;
	else
		return -EINVAL;
	return 0;
}

/* Bounds that keep every size product far from 64-bit overflow and reject
 * nonsense early; real models are well inside them. */
#define MOE_MAX_HIDDEN       (1u << 17)  /* 131072 */
#define MOE_MAX_INTERMEDIATE (1u << 19)
#define MOE_MAX_EXPERTS      4096u
#define MOE_MAX_LAYERS       1024u

/*
 * INT4 parameters: a group size that divides every K of the store's INT4
 * matrices (H and the intermediate sizes), a multiple of 16 so that a
 * kernel's vector of 16 columns lies in one group; every K a multiple of 16
 * too (the checkpoints pack 8 codes per int32 along K).  Without INT4
 * matrices both are 0.
 */
static int q4_check_k(const struct moe_model_config *c, const char *what, uint32_t K,
		      struct moe_err *err)
{
	if (K % 16)
		return moe_err_set(err, -EINVAL, "int4 weights need %s (%u) to be a multiple of 16",
				   what, K);
	if (c->q4_group && K % c->q4_group)
		return moe_err_set(err, -EINVAL, "int4 group size %u does not divide %s (%u)",
				   c->q4_group, what, K);
	return 0;
}

static int q4_validate(const struct moe_model_config *c, struct moe_err *err)
{
	bool routed = c->weight_dtype == MOE_DTYPE_INT4;
	bool shared = c->shared_intermediate_size && c->shared_dtype == MOE_DTYPE_INT4;
	int r;

	if (!routed && !shared) {
		if (c->q4_group || c->q4_flags)
			return moe_err_set(err, -EINVAL, "int4 parameters (group %u, flags %u) without "
					   "int4 weights", c->q4_group, c->q4_flags);
		return 0;
	}
	if (c->q4_flags & ~MOE_Q4_FLAGS_ALL)
		return moe_err_set(err, -EINVAL, "int4 flags %#x: unknown bits", c->q4_flags);
	if (c->q4_group % 16)
		return moe_err_set(err, -EINVAL, "int4 group size %u is not a multiple of 16",
				   c->q4_group);
	r = q4_check_k(c, "hidden_size", c->hidden_size, err);
	if (r == 0 && routed)
		r = q4_check_k(c, "moe_intermediate_size", c->moe_intermediate_size, err);
	if (r == 0 && shared)
		r = q4_check_k(c, "the shared expert's intermediate size", c->shared_intermediate_size,
			       err);
	return r;
}

int moe_model_config_validate(const struct moe_model_config *c, struct moe_err *err)
{
	int r;

	if ((unsigned)c->arch >= MOE_ARCH_COUNT)
		return moe_err_set(err, -EINVAL, "model_type: invalid architecture %d", (int)c->arch);
	if (c->hidden_size == 0 || c->hidden_size > MOE_MAX_HIDDEN)
		return moe_err_set(err, -EINVAL, "hidden_size %u is out of range 1..%u",
				   c->hidden_size, MOE_MAX_HIDDEN);
	if (c->moe_intermediate_size == 0 || c->moe_intermediate_size > MOE_MAX_INTERMEDIATE)
		return moe_err_set(err, -EINVAL, "moe_intermediate_size %u is out of range 1..%u",
				   c->moe_intermediate_size, MOE_MAX_INTERMEDIATE);
	if (c->num_experts == 0 || c->num_experts > MOE_MAX_EXPERTS)
		return moe_err_set(err, -EINVAL, "number of experts %u is out of range 1..%u",
				   c->num_experts, MOE_MAX_EXPERTS);
	if (c->top_k == 0 || c->top_k > c->num_experts)
		return moe_err_set(err, -EINVAL, "top_k %u must be in 1..%u (the number of experts)",
				   c->top_k, c->num_experts);
	if (c->num_hidden_layers == 0 || c->num_hidden_layers > MOE_MAX_LAYERS)
		return moe_err_set(err, -EINVAL, "num_hidden_layers %u is out of range 1..%u",
				   c->num_hidden_layers, MOE_MAX_LAYERS);
	if (c->n_group == 0 || c->num_experts % c->n_group)
		return moe_err_set(err, -EINVAL, "n_group %u must divide the %u experts",
				   c->n_group, c->num_experts);
	if (c->topk_group == 0 || c->topk_group > c->n_group)
		return moe_err_set(err, -EINVAL, "topk_group %u must be in 1..n_group (%u)",
				   c->topk_group, c->n_group);
	if ((uint64_t)c->topk_group * (c->num_experts / c->n_group) < c->top_k)
		return moe_err_set(err, -EINVAL,
				   "topk_group %u groups of %u experts hold fewer than top_k %u experts",
				   c->topk_group, c->num_experts / c->n_group, c->top_k);
	if (c->topk_method == MOE_TOPK_NOAUX_TC && c->num_experts / c->n_group < 2)
		return moe_err_set(err, -EINVAL, "noaux_tc routing needs at least 2 experts per group");
	if (c->shared_intermediate_size > MOE_MAX_INTERMEDIATE * 16u)
		return moe_err_set(err, -EINVAL, "shared expert intermediate size %u is too large",
				   c->shared_intermediate_size);
	if (!(c->routed_scaling_factor > 0.0f) || c->routed_scaling_factor > 1e6f)
		return moe_err_set(err, -EINVAL, "routed_scaling_factor %g must be positive and finite",
				   (double)c->routed_scaling_factor);
	if (moe_dtype_size(c->weight_dtype) == 0)
		return moe_err_set(err, -EINVAL, "invalid weight dtype %d", (int)c->weight_dtype);
	if (c->shared_intermediate_size && moe_dtype_size(c->shared_dtype) == 0)
		return moe_err_set(err, -EINVAL, "invalid shared expert dtype %d", (int)c->shared_dtype);
	if (c->act == MOE_ACT_SWIGLU_OAI && !c->gated)
		return moe_err_set(err, -EINVAL, "the clamped SwiGLU needs gated experts");
	if (c->act == MOE_ACT_SWIGLU_OAI &&
	    (!(c->swiglu_limit > 0.0f) || !isfinite(c->swiglu_limit) || !isfinite(c->swiglu_alpha)))
		return moe_err_set(err, -EINVAL, "swiglu_limit %g must be positive and finite, swiglu_alpha %g finite",
				   (double)c->swiglu_limit, (double)c->swiglu_alpha);
	if (c->has_expert_bias && c->shared_intermediate_size > 0)
		return moe_err_set(err, -EINVAL, "expert biases with shared experts are not supported");
	/* MXFP4 needs whole 32-value scale blocks along every K */
	if (c->weight_dtype == MOE_DTYPE_MXFP4 &&
	    (c->hidden_size % MOE_MXFP4_BLOCK || c->moe_intermediate_size % MOE_MXFP4_BLOCK))
		return moe_err_set(err, -EINVAL, "mxfp4 weights need hidden_size %u and moe_intermediate_size "
				   "%u to be multiples of %u (one E8M0 scale per %u values)", c->hidden_size,
				   c->moe_intermediate_size, MOE_MXFP4_BLOCK, MOE_MXFP4_BLOCK);
	if (c->shared_intermediate_size && c->shared_dtype == MOE_DTYPE_MXFP4 &&
	    (c->hidden_size % MOE_MXFP4_BLOCK || c->shared_intermediate_size % MOE_MXFP4_BLOCK))
		return moe_err_set(err, -EINVAL, "mxfp4 shared experts need hidden_size %u and shared "
				   "intermediate size %u to be multiples of %u", c->hidden_size,
				   c->shared_intermediate_size, MOE_MXFP4_BLOCK);
	r = q4_validate(c, err);
	if (r < 0)
		return r;
	/* gpt-oss is released in MXFP4 (biases allowed), never FP8 or int4: no
	 * blob layout puts biases after their scales (ARCHITECTURE.md 4.1a) */
	if (c->has_expert_bias &&
	    (c->weight_dtype == MOE_DTYPE_FP8_E4M3_B128 || c->weight_dtype == MOE_DTYPE_INT4))
		return moe_err_set(err, -ENOTSUP, "expert biases (gpt_oss) with fp8 weights are not supported "
				   "yet (weight dtype %s)", moe_dtype_name(c->weight_dtype));
	return 0;
}

uint64_t moe_matrix_scales_offset(uint64_t N, uint64_t K)
{
	return moe_part_align(N * K);
}

uint64_t moe_matrix_bytes(enum moe_dtype dt, uint64_t N, uint64_t K)
{
	uint64_t nb = (N + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK, kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;

	assert(dt != MOE_DTYPE_INT4);       /* moe_cfg_matrix_bytes() */
	if (dt == MOE_DTYPE_FP8_E4M3_B128)
		return moe_part_align(N * K) + moe_part_align(nb * kb * sizeof(float));
	if (dt == MOE_DTYPE_MXFP4)
		return moe_mxfp4_matrix_bytes(N, K);
	return N * K * moe_dtype_size(dt);
}

uint64_t moe_cfg_matrix_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint64_t N,
			      uint64_t K)
{
	struct moe_q4_layout l;

	if (dt != MOE_DTYPE_INT4)
		return moe_matrix_bytes(dt, N, K);
	moe_q4_layout(c->q4_group, c->q4_flags, N, K, &l);
	return l.bytes;
}

/* gate and up [I][H], down [H][I] */
static uint64_t ffn_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint64_t I)
{
	return (c->gated ? 2 : 1) * moe_cfg_matrix_bytes(c, dt, I, c->hidden_size) +
	       moe_cfg_matrix_bytes(c, dt, c->hidden_size, I);
}

uint64_t moe_expert_bias_offset(const struct moe_model_config *c)
{
	/* moe_model_config_validate refuses biases with FP8 and INT4 */
	assert(c->weight_dtype != MOE_DTYPE_FP8_E4M3_B128 && c->weight_dtype != MOE_DTYPE_INT4);
	return (ffn_bytes(c, c->weight_dtype, c->moe_intermediate_size) + 15) & ~15ull;
}

uint64_t moe_expert_bias_count(const struct moe_model_config *c)
{
	return c->has_expert_bias ? (c->gated ? 2ull : 1ull) * c->moe_intermediate_size + c->hidden_size : 0;
}

uint64_t moe_expert_bytes(const struct moe_model_config *c)
{
	if (c->has_expert_bias)
		return moe_expert_bias_offset(c) + moe_expert_bias_count(c) * sizeof(float);
	return ffn_bytes(c, c->weight_dtype, c->moe_intermediate_size);
}

uint64_t moe_shared_bytes(const struct moe_model_config *c)
{
	return c->shared_intermediate_size ? ffn_bytes(c, c->shared_dtype, c->shared_intermediate_size) : 0;
}

bool moe_layer_rule_is_moe(const struct moe_layer_rule *r, uint32_t layer)
{
	if (layer >= r->num_hidden_layers)
		return false;
	switch (r->arch) {
	case MOE_ARCH_MIXTRAL:
	case MOE_ARCH_OLMOE:
	case MOE_ARCH_GPT_OSS:
		return true;
	case MOE_ARCH_QWEN2_MOE:
	case MOE_ARCH_QWEN3_MOE:
		for (uint32_t i = 0; i < r->n_mlp_only; i++)
			if (r->mlp_only_layers[i] == layer)
				return false;
		return r->decoder_sparse_step > 0 && (layer + 1) % r->decoder_sparse_step == 0;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3:
	case MOE_ARCH_GLM4_MOE:
		return layer >= r->first_k_dense_replace && r->moe_layer_freq > 0 &&
		       layer % r->moe_layer_freq == 0;
	default:
		return false;
	}
}
