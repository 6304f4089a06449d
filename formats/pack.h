/* SPDX-License-Identifier: MIT */
/*
 * Hugging Face checkpoint -> .moe store (`moectl pack`).
 */
#ifndef MOE_PACK_H
#define MOE_PACK_H

#include <stdint.h>

#include "engine/err.h"
#include "engine/dtype.h"

struct moe_pack_options {
	int dtype;          /* enum moe_dtype to convert expert weights to, or -1: keep */
	const char *quantize; /* "fp8": quantize float expert weights (routed and
			       * shared) to MOE_DTYPE_FP8_E4M3_B128; NULL: don't */
	/* With quantize: what stays in the checkpoint's dtype, a comma-separated
	 * list of "shared", "routed" or names as in a release's
	 * modules_to_not_convert (a tensor whose name contains one is not
	 * quantized; a name must cover all the shared experts, or all the
	 * routed ones, or neither: the store holds one dtype for each kind).
	 * NULL or "": nothing. */
	const char *quantize_skip;
	/* The 16 raw bytes of @hf_dir's checkpoint fingerprint, recorded in the
	 * store's header (moe_checkpoint_fingerprint(3): libmoeclient computes
	 * it, which formats/ may not link); NULL: none recorded. */
	const uint8_t *source_fingerprint;
	/* Called as work advances (may be NULL): bytes done, total, and what. */
	void (*progress)(void *ctx, uint64_t done, uint64_t total, const char *what);
	void *ctx;
};

/*
 * Read config.json and the safetensors files (single or sharded) in @hf_dir,
 * and write the MoE layers' tensors to the store @out.  Every failure names
 * the file and the tensor or field: missing config.json, bad JSON, unknown
 * model_type, missing tensor, wrong shape, unsupported dtype, truncated file.
 * Nothing is left at @out on failure.  @opt->quantize quantizes a
 * bf16/f16/f32 checkpoint (moe_fp8_quantize_band(), a block row at a
 * time); it refuses @opt->dtype too, an FP8 checkpoint and expert biases.
 */
int moe_pack(const char *hf_dir, const char *out, const struct moe_pack_options *opt,
	     struct moe_err *err);

#endif
