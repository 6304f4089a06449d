/* SPDX-License-Identifier: MIT */
/*
 * The description of an MoE model as moed serves it: architecture, shapes,
 * routing rule and expert activation.  Filled from a Hugging Face
 * config.json (hfmodel.c), stored in the .moe header (store.c), used by the
 * router and the backends.  See ARCHITECTURE.md section 4.1.
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "dtype.h"

/*
 * The layout formulas below are inline so that the CUDA kernels use these
 * very functions (the module links no engine symbol): on the host and the
 * device alike under nvcc.
 */
#ifdef __CUDACC__
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

/* Each part of a quantized matrix (codes, scales, ...) starts at a
 * multiple of this many bytes, zero padded. */
#define MOE_MATRIX_PART_ALIGN 64u

static inline MOE_HOST_DEVICE uint64_t moe_part_align(uint64_t n)
{
	return (n + MOE_MATRIX_PART_ALIGN - 1) / MOE_MATRIX_PART_ALIGN * MOE_MATRIX_PART_ALIGN;
}

/* Values are stored in .moe files: never renumber. */
enum moe_arch {
	MOE_ARCH_MIXTRAL = 0,
	MOE_ARCH_QWEN2_MOE = 1,
	MOE_ARCH_QWEN3_MOE = 2,
	MOE_ARCH_OLMOE = 3,
	MOE_ARCH_DEEPSEEK_V2 = 4,
	MOE_ARCH_DEEPSEEK_V3 = 5,
	MOE_ARCH_GLM4_MOE = 6,     /* GLM-4.5/4.6: deepseek_v3's routing (4.1a) */
	MOE_ARCH_GPT_OSS = 7,      /* gpt-oss: biased router, top-k then softmax (4.1a) */
	MOE_ARCH_COUNT
};

/* How router logits become probabilities.  Stored: never renumber. */
enum moe_scoring {
	MOE_SCORING_SOFTMAX = 0,
	MOE_SCORING_SIGMOID = 1,
};

/*
 * How experts are selected.  Stored: never renumber.
 *  GREEDY:        plain top-k of the scores.
 *  GROUP_LIMITED: deepseek_v2 "group_limited_greedy": a group's score is its
 *                 max; keep topk_group groups; top-k inside them.
 *  NOAUX_TC:      deepseek_v3, glm4_moe: select on score + correction bias; a group's
 *                 score is the sum of its two highest biased scores; keep
 *                 topk_group groups (others -inf); weights are unbiased.
 */
enum moe_topk_method {
	MOE_TOPK_GREEDY = 0,
	MOE_TOPK_GROUP_LIMITED = 1,
	MOE_TOPK_NOAUX_TC = 2,
};

/* Expert activation.  Stored: never renumber. */
enum moe_act {
	MOE_ACT_SILU = 0,       /* silu(x) = x * sigmoid(x) */
	MOE_ACT_GELU = 1,       /* exact erf GELU */
	MOE_ACT_GELU_TANH = 2,  /* tanh approximation ("gelu_pytorch_tanh") */
	MOE_ACT_RELU = 3,
	/* gpt_oss, gated only: g = min(gate, limit), u = clamp(up, -limit,
	 * limit), h = (u + 1) * g * sigmoid(alpha * g); alpha and limit are
	 * swiglu_alpha and swiglu_limit of the config */
	MOE_ACT_SWIGLU_OAI = 4,
};

/*
 * After the top-k weights are chosen:
 *   if (norm_topk_prob && top_k > 1 [deepseek] / norm_topk_prob [others])
 *           w /= sum(w) + norm_eps
 *   w *= routed_scaling_factor
 * glm4_moe: divides whenever norm_topk_prob, even at top_k 1 (transformers'
 * Glm4MoeMoE has no top_k test), with norm_eps 1e-20, then scales.
 * gpt_oss: none of this: the weights are the softmax of the k chosen
 * biased logits (router_sel.h).
 * mixtral: norm_topk_prob = true, norm_eps = 0, scaling 1.
 * qwen/olmoe: norm_topk_prob from config (default false), eps 0, scaling 1.
 * deepseek_v2: scaling applies only when not normalised (router.c knows).
 *
 * Backend modules read it (moe_layer_weights.cfg): any change to it bumps
 * MOE_BACKEND_ABI_VERSION (backend.h).
 */
struct moe_model_config {
	enum moe_arch arch;
	uint32_t hidden_size;            /* H */
	uint32_t moe_intermediate_size;  /* I of one routed expert */
	uint32_t num_experts;            /* E routed experts per MoE layer */
	uint32_t top_k;                  /* k experts per token */
	uint32_t num_hidden_layers;      /* layers in the checkpoint */
	uint32_t n_group;                /* expert groups (1: no grouping) */
	uint32_t topk_group;             /* groups kept */
	uint32_t n_shared_experts;       /* deepseek: count; qwen2_moe: 1 if any */
	uint32_t shared_intermediate_size; /* total I of the shared expert(s), 0: none */
	enum moe_scoring scoring;
	enum moe_topk_method topk_method;
	bool norm_topk_prob;
	bool shared_gate;                /* qwen2_moe: sigmoid(shared_expert_gate . x) */
	bool has_bias;                   /* deepseek_v3, glm4_moe: e_score_correction_bias;
					  * gpt_oss: the router's bias, added to the logits */
	bool gated;                      /* down(act(gate x) * up x); false: down(act(up x)) */
	bool has_expert_bias;            /* gpt_oss: gate, up and down have biases (routed
					  * experts only; float32 at the blob's end) */
	enum moe_act act;
	float swiglu_alpha;              /* MOE_ACT_SWIGLU_OAI only: sigmoid gain (1.702) */
	float swiglu_limit;              /* MOE_ACT_SWIGLU_OAI only: the clamp (7.0) */
	float routed_scaling_factor;     /* 1.0 unless the config says otherwise */
	enum moe_dtype weight_dtype;     /* dtype of routed expert weights in the store */
	enum moe_dtype shared_dtype;     /* dtype of the shared expert(s); DeepSeek-V3's
					  * release may quantize one and not the other */
	uint32_t q4_group;               /* MOE_DTYPE_INT4: group size G along K, 0 for
					  * one group per row (GPTQ's group_size -1) */
	uint32_t q4_flags;               /* MOE_DTYPE_INT4: MOE_Q4_* */
};

/*
 * Which checkpoint layers are MoE layers (ARCHITECTURE.md 4.1):
 *  mixtral, olmoe: all.
 *  qwen2_moe, qwen3_moe: L not in mlp_only_layers and (L+1) % decoder_sparse_step == 0.
 *  deepseek_v2/v3: L >= first_k_dense_replace and L % moe_layer_freq == 0.
 *  glm4_moe: L >= first_k_dense_replace (its config has no moe_layer_freq:
 *  the parser leaves it at 1).
 *  gpt_oss: all.
 * Layers >= num_hidden_layers (DeepSeek-V3's and GLM-4.5's MTP layer) never are.
 */
struct moe_layer_rule {
	enum moe_arch arch;
	uint32_t num_hidden_layers;
	uint32_t decoder_sparse_step;    /* qwen: default 1 */
	uint32_t first_k_dense_replace;  /* deepseek: default 0; glm4_moe: default 1 */
	uint32_t moe_layer_freq;         /* deepseek: default 1 */
	uint32_t n_mlp_only;             /* qwen: length of mlp_only_layers */
	const uint32_t *mlp_only_layers;
};

bool moe_layer_rule_is_moe(const struct moe_layer_rule *r, uint32_t layer);

/* Lower-case model_type string: "mixtral", "qwen2_moe", ...; NULL if invalid. */
const char *moe_arch_name(enum moe_arch a);

/* Parse a Hugging Face model_type.  0 and *ret, or -EINVAL. */
int moe_arch_parse(const char *model_type, enum moe_arch *ret);

/* Name of an activation as config.json spells it ("silu", "gelu", ...). */
const char *moe_act_name(enum moe_act a);

/* Parse a hidden_act value ("silu", "swish", "gelu", "gelu_pytorch_tanh",
 * "gelu_new", "relu").  0 and *ret, or -EINVAL. */
int moe_act_parse(const char *name, enum moe_act *ret);

/*
 * Check the shape and routing fields for consistency (k <= E, groups divide
 * E, k <= topk_group * E/n_group, sizes nonzero and bounded...).  Returns 0
 * or -EINVAL with a message naming the field.
 */
struct moe_err;
int moe_model_config_validate(const struct moe_model_config *cfg, struct moe_err *err);

/*
 * Bytes of one N x K (rows x columns) matrix of dtype @dt in an expert blob.
 * Plain dtypes: N * K elements, row-major.  MOE_DTYPE_FP8_E4M3_B128: the
 * N * K codes row-major, zeros up to a multiple of 64 bytes, then the
 * float32 scales [ceil(N/128)][ceil(K/128)] row-major, zeros up to a
 * multiple of 64 bytes: every part of a blob then starts 64-byte aligned
 * (blobs are 4096-aligned), so kernels load the scales as floats.
 */
uint64_t moe_matrix_bytes(enum moe_dtype dt, uint64_t N, uint64_t K);
/* (MOE_DTYPE_INT4's size depends on the store: moe_cfg_matrix_bytes().) */

/* Byte offset of the scales in an FP8 matrix of moe_matrix_bytes(). */
uint64_t moe_matrix_scales_offset(uint64_t N, uint64_t K);

/* MOE_DTYPE_MXFP4 (K a multiple of 32, which moe_model_config_validate
 * checks): the codes, N * K/2 bytes row-major (value k of row n in the
 * low nibble of byte n*K/2 + k/2 for even k, the high one for odd k),
 * zeros to a multiple of 64 bytes, then the E8M0 scales, N * K/32 bytes
 * row-major (one per 32 values along K), zeros to a multiple of 64.  This
 * is the byte offset of the scales. */
static inline MOE_HOST_DEVICE uint64_t moe_mxfp4_scales_offset(uint64_t N, uint64_t K)
{
	return moe_part_align(N * (K / 2));
}

/* Bytes of one N x K MXFP4 matrix: codes and scales (moe_matrix_bytes()). */
static inline MOE_HOST_DEVICE uint64_t moe_mxfp4_matrix_bytes(uint64_t N, uint64_t K)
{
	return moe_mxfp4_scales_offset(N, K) + moe_part_align(N * (K / MOE_MXFP4_BLOCK));
}

/*
 * MOE_DTYPE_INT4 (ARCHITECTURE.md 4.1a, moe-store(5)): the optional parts of
 * the store's INT4 matrices (moe_model_config q4_flags).
 */
#define MOE_Q4_ZEROS (1u << 0)        /* per-group uint8 zero points; else 8 */
#define MOE_Q4_PERM (1u << 1)         /* a uint32 column permutation (act-order) */
#define MOE_Q4_BF16_SCALES (1u << 2)  /* bfloat16 scales; else float16 */
#define MOE_Q4_FLAGS_ALL 7u

/*
 * Where the parts of one N x K INT4 matrix lie, each from a multiple of 64
 * bytes, zeros up to the next:
 *   codes   N * K/2 bytes, row n at n * K/2, column j in byte j/2, the low
 *           nibble for even j: unsigned q in [0, 15];
 *   scales  [N][K/G] float16 or bfloat16;
 *   zeros   (MOE_Q4_ZEROS) [N][K/G] uint8, the zero point z itself;
 *   perm    (MOE_Q4_PERM) [K] uint32: stored column j is input column
 *           perm[j]; column j is in group j / G.
 * w[n][perm[j]] = (q[n][j] - z[n][j/G]) * s[n][j/G], z = 8 without zeros.
 */
struct moe_q4_layout {
	uint64_t G;                       /* the group size of this matrix */
	uint64_t groups;                  /* K / G */
	uint64_t scales, zeros, perm;     /* byte offsets; 0 for an absent part */
	uint64_t bytes;                   /* the whole matrix */
};
static inline MOE_HOST_DEVICE void moe_q4_layout(uint32_t q4_group, uint32_t q4_flags, uint64_t N,
						  uint64_t K, struct moe_q4_layout *l)
{
	uint64_t at;

	l->G = q4_group ? q4_group : K;
	l->groups = l->G ? K / l->G : 0;
	at = moe_part_align(N * (K / 2));
	l->scales = at;
	at += moe_part_align(N * l->groups * 2);
	l->zeros = 0;
	if (q4_flags & MOE_Q4_ZEROS) {
		l->zeros = at;
		at += moe_part_align(N * l->groups);
	}
	l->perm = 0;
	if (q4_flags & MOE_Q4_PERM) {
		l->perm = at;
		at += moe_part_align(K * sizeof(uint32_t));
	}
	l->bytes = at;
}

/* Bytes of one N x K matrix of @dt as a blob of the store @c holds it: as
 * moe_matrix_bytes(), and for MOE_DTYPE_INT4 moe_q4_layout()'s with the
 * store's q4_group and q4_flags. */
uint64_t moe_cfg_matrix_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint64_t N,
			      uint64_t K);

/*
 * Bytes of one routed expert's blob, unpadded: gate [I][H], up [I][H],
 * down [H][I] back to back (no gate when !gated), each moe_matrix_bytes();
 * with has_expert_bias, at moe_expert_bias_offset() the float32 biases
 * gate [I], up [I], down [H].  Expert biases with FP8 are refused by
 * moe_model_config_validate(); this asserts it (MXFP4 has them: gpt-oss).
 */
uint64_t moe_expert_bytes(const struct moe_model_config *cfg);

/* Where a routed expert's biases start in its store blob: the matrices'
 * bytes rounded up to 16, so that the floats are aligned whatever the
 * weight dtype (not FP8). */
uint64_t moe_expert_bias_offset(const struct moe_model_config *cfg);

/* Number of float32 biases of a routed expert: 2 I + H, or 0. */
uint64_t moe_expert_bias_count(const struct moe_model_config *cfg);

/* Bytes of the shared expert(s) weights in shared_dtype, 0 when none. */
uint64_t moe_shared_bytes(const struct moe_model_config *cfg);

#endif
