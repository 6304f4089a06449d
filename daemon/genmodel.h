/* SPDX-License-Identifier: MIT */
/*
 * Random Hugging Face checkpoints in the real layout of each architecture
 * (`moectl gen-model`): config.json with that model_type's real field names
 * and defaults, safetensors with the real tensor names (embeddings,
 * attention, norms, dense MLPs, lm_head as well as the MoE tensors), sharded
 * with model.safetensors.index.json above a size limit.  Deterministic for a
 * seed.
 */
#ifndef MOE_GENMODEL_H
#define MOE_GENMODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "dtype.h"
#include "err.h"
#include "model.h"

struct moe_gen_options {
	enum moe_arch arch;
	enum moe_dtype dtype;            /* dtype of every weight tensor */
	uint64_t seed;
	uint32_t hidden_size;
	uint32_t moe_intermediate_size;
	uint32_t intermediate_size;      /* dense MLP layers; 0: a default */
	uint32_t num_experts;
	uint32_t top_k;
	uint32_t num_layers;             /* num_hidden_layers */
	uint32_t n_group, topk_group;    /* deepseek grouping (1,1: none) */
	uint32_t n_shared_experts;       /* deepseek; qwen2_moe: shared expert if > 0 */
	uint32_t shared_intermediate_size; /* qwen2_moe shared_expert_intermediate_size */
	uint32_t first_k_dense_replace;  /* deepseek */
	uint32_t decoder_sparse_step;    /* qwen */
	uint32_t vocab_size;             /* embeddings and lm_head rows */
	uint32_t num_attention_heads, num_key_value_heads;
	int norm_topk_prob;              /* -1: the architecture's default */
	float routed_scaling_factor;     /* 0: the architecture's default */
	const char *hidden_act;          /* NULL: "silu" */
	bool plain_experts;              /* no gate_proj/w1: down(act(up x)) */
	bool fused_experts;              /* transformers v5 fused gate_up_proj/down_proj */
	uint64_t shard_bytes;            /* shard above this size; 0: 5 GB default */
	float weight_scale;              /* std of the random weights; 0: a default */
};

/*
 * Fill @opt with the named preset's shapes ("tiny", "small", "deepseek-v3",
 * "deepseek-v2-lite", "qwen3-30b-a3b", "qwen2-57b-a14b", "mixtral-8x7b",
 * "olmoe-1b-7b"), which also sets arch.  -EINVAL with a message listing the
 * presets when @name is unknown.
 */
int moe_gen_preset(const char *name, struct moe_gen_options *opt, struct moe_err *err);

/* Defaults for @arch at a tiny size (what gen-model uses without a preset). */
void moe_gen_defaults(enum moe_arch arch, struct moe_gen_options *opt);

/*
 * Write the checkpoint into directory @dir (created if missing; existing
 * checkpoint files in it are replaced).  Progress callback may be NULL.
 */
int moe_gen_model(const struct moe_gen_options *opt, const char *dir,
		  void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		  struct moe_err *err);

#endif
