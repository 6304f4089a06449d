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

#include "engine/dtype.h"
#include "engine/err.h"
#include "engine/model.h"

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
	uint32_t n_group, topk_group;    /* deepseek, glm4_moe grouping (1,1: none) */
	uint32_t n_shared_experts;       /* deepseek, glm4_moe; qwen2_moe: shared expert if > 0 */
	uint32_t shared_intermediate_size; /* qwen2_moe shared_expert_intermediate_size */
	uint32_t first_k_dense_replace;  /* deepseek, glm4_moe */
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

	/*
	 * Added after the first version; a zero keeps the meaning it had
	 * before (a default, or "none").  They shape only tensors the packer
	 * ignores (attention) or the routing method.
	 */
	const char *topk_method;         /* deepseek_v2: "greedy" | "group_limited_greedy";
					    NULL: the architecture's default */
	uint32_t head_dim;               /* qwen3_moe, glm4_moe; 0: a default */
	uint32_t q_lora_rank;            /* deepseek MLA; 0: none (plain q_proj) */
	uint32_t kv_lora_rank;           /* deepseek MLA; 0: a default */
	uint32_t qk_nope_head_dim, qk_rope_head_dim, v_head_dim; /* deepseek; 0: defaults */
	uint32_t num_nextn_predict_layers; /* deepseek_v3, glm4_moe MTP layers (0 or 1),
					      written as layer num_layers, as the real
					      checkpoints have */
	float router_skew;               /* Zipf exponent of the expert popularity, 0 to
					    MOE_GEN_MAX_ROUTER_SKEW; 0: none (uniform routing) */
	bool quant_fp8;                  /* FP8 as DeepSeek-V3 is released: every MLP
					    and expert matrix F8_E4M3 with a float32
					    weight_scale_inv per 128 x 128 block, and
					    quantization_config in config.json */
	/*
	 * With quant_fp8: one kind of expert left in dtype, as a release whose
	 * quantization_config.modules_to_not_convert names it (written there:
	 * "mlp.shared_experts" or "mlp.experts"); the dense MLPs stay FP8.
	 */
	enum moe_gen_quant_skip {
		MOE_GEN_QUANT_SKIP_NONE = 0,
		MOE_GEN_QUANT_SKIP_SHARED,   /* the shared experts in dtype */
		MOE_GEN_QUANT_SKIP_ROUTED,   /* the routed experts in dtype */
	} quant_skip;
	bool qk_norm;                    /* glm4_moe use_qk_norm (GLM-4.5, GLM-4.6): per-head
					    q_norm/k_norm in every attention; attention only */
	uint32_t max_position_embeddings; /* glm4_moe config.json's (GLM-4.6: 202752); 0: 131072 */
	bool quant_mxfp4;                /* gpt_oss only: the experts in MXFP4 as
					    gpt-oss is released (*_blocks, *_scales
					    U8, gate and up rows interleaved), and
					    quantization_config in config.json */
	/* int4 as GPTQ, AWQ or compressed-tensors write it: every MLP and
	 * expert matrix, round to nearest per group (ARCHITECTURE.md 4.1a) */
	const char *quant_int4;          /* "gptq", "awq", "ct-int4"; NULL: none */
	int32_t q4_group_size;           /* 0: 128; -1: one group per row */
	bool q4_desc_act;                /* gptq: act-order g_idx (shuffled groups) */
	bool q4_sym;                     /* gptq: symmetric (zero point 8) */
};

/*
 * Largest router_skew.  Past about 3 little changes: the hottest experts
 * already get nearly all that a router without a bias can give an expert
 * of inputs symmetric around zero, half of the tokens.
 */
#define MOE_GEN_MAX_ROUTER_SKEW 10.0f

/*
 * Fill @opt with the named preset's shapes ("tiny", "small", "deepseek-v3",
 * "kimi-k2", "deepseek-v2-lite", "qwen3-30b-a3b", "qwen2-57b-a14b",
 * "mixtral-8x7b", "olmoe-1b-7b", "glm-4.5-air", "glm-4.5", "glm-4.6",
 * "gpt-oss-20b", "gpt-oss-120b"), which also sets arch.  "tiny" and "small" have no
 * architecture of their own: they use the arch already in @opt.  Every
 * field of @opt is reset (seed 0, bf16, ...), so set other options after.
 * The real presets keep the real vocabulary and layer count: lower
 * num_layers and vocab_size afterwards for a smaller file.  -EINVAL with a
 * message listing the presets when @name is unknown; @opt is untouched then.
 */
int moe_gen_preset(const char *name, struct moe_gen_options *opt, struct moe_err *err);

/* Defaults for @arch at a tiny size (what gen-model uses without a preset):
 * every field of @opt is set. */
void moe_gen_defaults(enum moe_arch arch, struct moe_gen_options *opt);

/*
 * Write the checkpoint into directory @dir (created if missing; existing
 * config.json, model.safetensors, model.safetensors.index.json and
 * model-NNNNN-of-NNNNN.safetensors in it are replaced).  Checks the options
 * first (k <= experts, groups divide experts, options that the architecture
 * has no field for...): -EINVAL with a one-line message naming the option.
 * @progress (may be NULL) is called from the calling thread with the bytes
 * of tensor data generated so far (at most 8 MB ahead of the disk: one
 * writer thread writes while the caller's thread generates) and the total.
 * Same options and seed: the same bytes.  On failure the shard being
 * written is removed; config.json and earlier shards stay.
 *
 * With router_skew S > 0 the routing of every MoE layer is made uneven the
 * way trained models route: the rows of the router (gate.weight) are scaled
 * so that, for inputs symmetric around zero, the expert of popularity rank
 * r (a random order per layer, from the seed) is chosen with a probability
 * roughly proportional to (r + E/16)^-S, a Zipf-Mandelbrot profile.
 * Nothing else changes: config.json stays the architecture's, and S = 0
 * writes the same bytes as before the option existed.
 */
int moe_gen_model(const struct moe_gen_options *opt, const char *dir,
		  void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		  struct moe_err *err);

#endif
