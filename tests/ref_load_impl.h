/* SPDX-License-Identifier: MIT */
/*
 * The float64 reference's checkpoint loader, shared by ref_load.c (config,
 * layers, float tensors) and ref_quant.c (the quantized formats, decoded
 * from each project's definition).  Internal to the test library.
 */
#ifndef MOE_REF_LOAD_IMPL_H
#define MOE_REF_LOAD_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "formats/safetensors.h"

struct loader {
	struct moe_st_checkpoint *ck;
	char *msg;
	size_t msglen;
	char quant[32];          /* quantization_config.quant_method, "" if none */
	bool gptq_v1;            /* GPTQ checkpoint_format "gptq": zero = stored + 1 */
	bool ct_asym;            /* compressed-tensors not symmetric */
};

/* Set the loader's message; returns @code. */
int ref_ld_fail(struct loader *ld, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The tensor named by the format, or NULL. */
const struct moe_st_tensor *ref_ld_find(struct loader *ld, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Decode @count elements (F32, BF16, F16) of @t from element @first into
 * @dst, checking that @t has @nelem elements in all. */
int ref_ld_read_elems(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem, uint64_t first,
		      uint64_t count, double *dst);

/* An F8_E4M3 matrix of @nelem elements times its weight_scale_inv blocks. */
int ref_ld_read_fp8(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem, double *dst);

/* gpt-oss's @pfx_blocks / @pfx_scales [E, N, K/32(, 16)] decoded into a
 * new [E][N][K] array at *ret. */
int ref_ld_read_mxfp4(struct loader *ld, const char *pfx, uint64_t E, uint64_t N, uint64_t K, double **ret);

/* An int4 matrix (GPTQ qweight, AWQ qweight, compressed-tensors
 * weight_packed @t) of @nelem weights, dequantized into @dst [N][K]. */
int ref_ld_read_int4(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem, double *dst);

#endif
