/* SPDX-License-Identifier: MIT */
/*
 * int4 group-quantized checkpoints (ARCHITECTURE.md 4.1a): GPTQ, AWQ (gemm)
 * and compressed-tensors pack-quantized, read from their own tensors and
 * rearranged, losslessly, into the store's one canonical INT4 layout
 * (model.h moe_q4_layout()).
 */
#ifndef MOE_HFQ4_H
#define MOE_HFQ4_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "engine/err.h"
#include "safetensors.h"

enum moe_q4_format {
	MOE_Q4F_NONE = 0,
	MOE_Q4F_GPTQ = 1,    /* X.qweight [K/8][N], X.qzeros [K/G][N/8], X.scales, X.g_idx */
	MOE_Q4F_AWQ = 2,     /* X.qweight [K][N/8] in AWQ's order, X.qzeros, X.scales */
	MOE_Q4F_CT = 3,      /* X.weight_packed [N][K/8], X.weight_scale [N][K/G], X.weight_shape
			      * (X.weight_zero_point [N/8][K/G] when asymmetric) */
};

/* quantization_config of an int4 checkpoint. */
struct moe_q4_config {
	enum moe_q4_format format;
	uint32_t group;                  /* 0: one group per row (group_size -1) */
	bool desc_act;                   /* GPTQ act-order: g_idx permutes the columns */
	bool sym;                        /* zero point 8 everywhere */
	bool gptq_v1;                    /* checkpoint_format "gptq": stored zero + 1 */
	size_t n_ignore;                 /* compressed-tensors "ignore" */
	char **ignore;
};

/* "gptq", "awq", "ct-int4" (also the store's source_dtype). */
const char *moe_q4_format_name(enum moe_q4_format f);

/*
 * quantization_config @q whose quant_method is @method ("gptq", "awq" or
 * "compressed-tensors"): 4 bits, the group size, the zero convention.  What
 * moed does not read (other bit widths, AWQ's gemv layouts, Marlin's GPTQ,
 * other compressed-tensors formats, strategies or actorder) is refused by
 * name.  @file is for messages.
 */
int moe_q4_parse_config(json_t *q, const char *file, const char *method, struct moe_q4_config *ret,
			struct moe_err *err);
void moe_q4_config_clear(struct moe_q4_config *qc);

/* The store's q4_flags for this checkpoint, less MOE_Q4_BF16_SCALES (the
 * scales' dtype is the tensors'). */
uint32_t moe_q4_flags(const struct moe_q4_config *qc);

/* The tensors of one int4 matrix. */
struct moe_hf_q4 {
	const struct moe_st_tensor *qweight;   /* qweight, or weight_packed */
	const struct moe_st_tensor *scales;    /* scales, or weight_scale */
	const struct moe_st_tensor *qzeros;    /* GPTQ, AWQ; compressed-tensors' weight_zero_point */
	const struct moe_st_tensor *g_idx;     /* GPTQ; may be absent */
};

/*
 * The int4 tensors of module @module ("...experts.3.up_proj"), an N x K
 * matrix: *@found false (and 0) when the module is not quantized (no
 * X.qweight / X.weight_packed, or on compressed-tensors' ignore list);
 * else every tensor found with its shape and dtype checked, and K a
 * multiple of the group size and of 16.  Errors name the tensor.
 */
int moe_q4_find(const struct moe_st_checkpoint *ck, const struct moe_q4_config *qc,
		const char *module, uint64_t N, uint64_t K, struct moe_hf_q4 *ret, bool *found,
		struct moe_err *err);

/* True when the matrix's scales are bfloat16 (else float16). */
bool moe_q4_bf16_scales(const struct moe_hf_q4 *q);

/*
 * The N x K matrix of @q in the canonical layout of q4_group qc->group and
 * @flags into @dst (moe_q4_layout() bytes, zeroed by the caller): codes and
 * scales moved, never requantized.  GPTQ's act-order g_idx becomes the
 * permutation (columns sorted stably by group; a group without exactly G
 * columns is an error naming g_idx); a g_idx that is not k / G without
 * desc_act, or zero points other than 8 with sym, are errors too.
 */
int moe_q4_read(const struct moe_st_checkpoint *ck, const struct moe_q4_config *qc,
		const struct moe_hf_q4 *q, uint32_t flags, uint64_t N, uint64_t K, uint8_t *dst,
		struct moe_err *err);

/* The canonical matrix @m (q4_group @group, @flags) dequantized into the
 * N x K float32 rows @out: out[n][perm[j]] = (q - z) * s. */
void moe_q4_dequant(const void *m, uint32_t group, uint32_t flags, uint64_t N, uint64_t K, float *out);

#endif
