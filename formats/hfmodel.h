/* SPDX-License-Identifier: MIT */
/*
 * Hugging Face checkpoints as moed reads them: config.json -> struct
 * moe_model_config and the list of MoE layers; the names, shapes and places
 * of the tensors each MoE layer needs (per-expert or transformers-v5 fused
 * layout).  See ARCHITECTURE.md 4.1 and moe-store(5).
 */
#ifndef MOE_HFMODEL_H
#define MOE_HFMODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/model.h"
#include "hfq4.h"
#include "safetensors.h"

/*
 * What config.json says.  cfg.gated is true and cfg.weight_dtype is
 * MOE_DTYPE_BF16 here: neither is in config.json, both come from the
 * checkpoint (moe_hf_model_open).
 */
struct moe_hf_config {
	struct moe_model_config cfg;
	bool fp8;                         /* quantization_config: quant_method fp8,
					   * weight_block_size [128, 128] */
	bool mxfp4;                       /* quantization_config: quant_method mxfp4
					   * (gpt_oss's *_blocks and *_scales) */
	struct moe_q4_config q4;          /* quant_method gptq, awq, compressed-tensors
					   * (format MOE_Q4F_NONE otherwise) */
	struct moe_layer_rule rule;       /* rule.mlp_only_layers points into this struct */
	uint32_t n_moe_layers;
	uint32_t *moe_layers;             /* checkpoint layer numbers, increasing */
	uint32_t *mlp_only_layers;        /* owned; rule.mlp_only_layers */
};

/*
 * Parse @dir/config.json.  Errors name the file and the field: missing file,
 * bad JSON (with line and column), missing or ill-typed field, unknown
 * model_type (the supported ones are listed), values out of range
 * (moe_model_config_validate).  Optional fields take the defaults of
 * transformers' config class, except n_group/topk_group: absent means no
 * grouping (1).
 */
int moe_hf_config_load(const char *dir, struct moe_hf_config **ret, struct moe_err *err);

/* As moe_hf_config_load, from a JSON text; @name is used in messages. */
int moe_hf_config_parse(const char *name, const char *json, struct moe_hf_config **ret,
			struct moe_err *err);

void moe_hf_config_free(struct moe_hf_config *hc);

/* The parts of a gated expert, in blob order (no GATE when !gated). */
enum moe_hf_part {
	MOE_HF_GATE = 0,   /* [I][H] */
	MOE_HF_UP = 1,     /* [I][H] */
	MOE_HF_DOWN = 2,   /* [H][I] */
};

/* How a part lies in its slice. */
enum moe_hf_layout {
	MOE_HF_ROWS = 0,           /* the part itself, row-major as in the blob */
	/* gpt_oss gate and up: the expert's input-major [H][2I] (x @ W), gate
	 * in the even columns, up in the odd; the part is the transpose of
	 * its columns.  For the [2I] bias: gate even, up odd. */
	MOE_HF_INTERLEAVED_T = 1,
	MOE_HF_TRANSPOSED = 2,     /* gpt_oss down: [I][H], the part's transpose */
	/* gpt_oss MXFP4 gate and up: the expert's output-major [2I][H] rows
	 * (codes and scales), gate in the even rows, up in the odd */
	MOE_HF_ROWS_INTERLEAVED = 3,
};

/* Bytes [offset, offset + nbytes) of tensor @t: one matrix of a checkpoint
 * (or, with another layout than MOE_HF_ROWS, the block it is taken from).
 * FP8 (dtype MOE_DTYPE_FP8_E4M3_B128, MOE_HF_ROWS only): @t holds the e4m3
 * codes and @scale the block scales ([ceil(rows/128)][ceil(cols/128)], F32,
 * BF16 or F16).  MXFP4 (MOE_DTYPE_MXFP4, gpt_oss): @t holds the codes
 * (U8 *_blocks, @offset and @nbytes the expert's, or the [2I][H] gate and up
 * block with MOE_HF_ROWS_INTERLEAVED), @scale the U8 *_scales, from
 * @scale_offset, one byte per 32 codes. */
struct moe_hf_slice {
	const struct moe_st_tensor *t;
	uint64_t offset;                  /* inside the tensor's data */
	uint64_t nbytes;
	uint64_t n_elems;
	enum moe_dtype dtype;
	const struct moe_st_tensor *scale; /* FP8 and MXFP4 only */
	uint64_t scale_offset;             /* MXFP4: inside the scales' data */
	const struct moe_hf_q4 *q4;        /* MOE_DTYPE_INT4 only: its tensors (t is
					    * the qweight / weight_packed) */
	uint64_t rows, cols;               /* the part's, whatever the layout */
	enum moe_hf_layout layout;
};

/* Where one MoE layer's tensors are. */
struct moe_hf_layer {
	uint32_t layer;                   /* checkpoint layer number */
	bool fused;                       /* transformers v5 fused experts */
	char prefix[64];                  /* "model.layers.L.mlp." (or block_sparse_moe.) */
	const struct moe_st_tensor *router;       /* [E, H] */
	const struct moe_st_tensor *bias;         /* [E] (has_bias) */
	const struct moe_st_tensor *shared_gate;  /* [1, H] (shared_gate) */
	const struct moe_st_tensor *shared[3];    /* [Is,H] [Is,H] [H,Is] by part */
	const struct moe_st_tensor *shared_scale[3]; /* FP8: their weight_scale_inv */
	const struct moe_st_tensor *gate_up;      /* fused: [E, 2I, H] ([E, I, H] up when plain) */
	const struct moe_st_tensor *down;         /* fused: [E, H, I]; gpt_oss [E, I, H] */
	const struct moe_st_tensor *gate_up_bias; /* gpt_oss: [E, 2I] */
	const struct moe_st_tensor *down_bias;    /* gpt_oss: [E, H] */
	/* gpt_oss MXFP4: gate_up is gate_up_proj_blocks [E, 2I, H/32, 16] and
	 * down down_proj_blocks [E, H, I/32, 16] (U8), with their scales */
	const struct moe_st_tensor *gate_up_scales; /* [E, 2I, H/32] */
	const struct moe_st_tensor *down_scales;    /* [E, H, I/32] */
	const struct moe_st_tensor **experts;     /* per expert: [E * 3] by part, unfused */
	const struct moe_st_tensor **scales;      /* FP8: their weight_scale_inv, or NULL */
	struct moe_hf_q4 *q4;                     /* int4: per expert [E * 3] by part */
	struct moe_hf_q4 shared_q4[3];            /* int4: the shared expert's by part */
};

/* A checkpoint opened for packing: config plus every tensor located and
 * checked. */
struct moe_hf_model {
	char *dir;
	struct moe_hf_config *hc;
	struct moe_model_config cfg;      /* hc->cfg with gated set from the tensors */
	struct moe_st_checkpoint *ckpt;
	struct moe_hf_layer *layers;      /* hc->n_moe_layers */
	enum moe_dtype expert_dtype;      /* dtype of the first routed expert tensor
					   * (MOE_DTYPE_FP8_E4M3_B128 for F8_E4M3 + scales,
					   * MOE_DTYPE_MXFP4 for gpt_oss's U8 *_blocks) */
	char mixed_tensor[256];           /* first expert tensor in another dtype, "" if none */
	enum moe_dtype mixed_dtype;
	enum moe_dtype shared_dtype;      /* of the shared expert's first tensor */
	char shared_mixed_tensor[256];    /* first shared tensor in another dtype, "" if none */
	enum moe_dtype shared_mixed_dtype;
	bool q4_seen, q4_bf16;            /* int4: a matrix found; its scales' dtype */
	char q4_scales_tensor[256];       /* int4: first scales tensor in the other float
					   * dtype (F16 vs BF16), "" if none */
};

/*
 * Open config.json and the safetensors files of @dir and check every tensor
 * the MoE layers need: present (a missing one is named with the file or
 * checkpoint that should hold it), shape exact (expected and found shown),
 * dtype F32, BF16 or F16, or F8_E4M3 with its weight_scale_inv when
 * config.json's quantization_config says fp8 with 128 x 128 blocks (a
 * missing or misshapen scale tensor is named), or gpt_oss's MXFP4 *_blocks
 * and *_scales (U8) when it says mxfp4 (a blocks tensor without its scales
 * is named, and so is one whose K is not a multiple of 32).  Experts are gated unless no
 * expert of any layer has a gate tensor.  Routed experts in more than one
 * dtype are allowed here (mixed_tensor says so); moe_pack refuses them
 * unless asked to convert.  The shared expert's dtype is tracked apart.
 */
int moe_hf_model_open(const char *dir, struct moe_hf_model **ret, struct moe_err *err);

void moe_hf_model_close(struct moe_hf_model *m);

/*
 * Where part @part of expert @expert of layer index @li lies (@expert ==
 * UINT32_MAX: the shared expert); ret->layout says how (gpt_oss: gate and
 * up share one interleaved block, down is transposed).  Returns 0, or -ENOENT for the gate of a
 * plain expert or a shared expert the model does not have.
 */
int moe_hf_expert_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert,
			enum moe_hf_part part, struct moe_hf_slice *ret);

/*
 * With has_expert_bias (gpt_oss): the biases of routed expert @expert of
 * layer index @li: @down false, gate and up interleaved [2I]
 * (MOE_HF_INTERLEAVED_T); true, down's [H].  0, or -ENOENT.
 */
int moe_hf_expert_bias_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert, bool down,
			     struct moe_hf_slice *ret);

/* "gate", "up", "down" as Hugging Face names the projections. */
const char *moe_hf_part_name(enum moe_hf_part part);

/* The supported model_type values, comma-separated (for messages). */
const char *moe_hf_supported_types(void);

#endif
