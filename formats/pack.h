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
	/* Called as work advances (may be NULL): bytes done, total, and what. */
	void (*progress)(void *ctx, uint64_t done, uint64_t total, const char *what);
	void *ctx;
};

/*
 * Read config.json and the safetensors files (single or sharded) in @hf_dir,
 * and write the MoE layers' tensors to the store @out.  Every failure names
 * the file and the tensor or field: missing config.json, bad JSON, unknown
 * model_type, missing tensor, wrong shape, unsupported dtype, truncated file.
 * Nothing is left at @out on failure.
 */
int moe_pack(const char *hf_dir, const char *out, const struct moe_pack_options *opt,
	     struct moe_err *err);

#endif
