/* SPDX-License-Identifier: MIT */
/*
 * numpy .npy arrays (version 1.0/2.0/3.0, C order) and .npz archives of them.
 * float32 ('<f4'), bfloat16 as raw 16-bit words ('<u2', '|V2' or 'bfloat16'
 * as ml_dtypes writes it), int32 ('<i4').
 */
#ifndef MOE_NPY_H
#define MOE_NPY_H

#include <stdint.h>

#include "err.h"

enum moe_npy_type {
	MOE_NPY_F32 = 0,
	MOE_NPY_BF16 = 1,   /* raw bfloat16 bits in 16-bit words */
	MOE_NPY_I32 = 2,
};

#define MOE_NPY_MAX_DIMS 8

struct moe_npy {
	enum moe_npy_type type;
	uint32_t ndim;
	uint64_t shape[MOE_NPY_MAX_DIMS];
	uint64_t count;     /* product of shape */
	void *data;         /* count elements, malloc'ed */
};

/*
 * Read @path.  Errors name the file: not an .npy, unsupported dtype (named),
 * Fortran order, truncated data, sizes that overflow.
 */
int moe_npy_read(const char *path, struct moe_npy *ret, struct moe_err *err);

/* Write an array; written to @path.tmp and renamed. */
int moe_npy_write(const char *path, enum moe_npy_type type, uint32_t ndim,
		  const uint64_t *shape, const void *data, struct moe_err *err);

/* Free the data of @a (the struct itself is the caller's). */
void moe_npy_free(struct moe_npy *a);

/* An array to put in an .npz archive under @name ("ids" -> "ids.npy"). */
struct moe_npz_entry {
	const char *name;
	enum moe_npy_type type;
	uint32_t ndim;
	uint64_t shape[MOE_NPY_MAX_DIMS];
	const void *data;
};

/* Write an uncompressed .npz (zip, stored, CRC-32 from zlib), as np.savez. */
int moe_npz_write(const char *path, const struct moe_npz_entry *entries, uint32_t n,
		  struct moe_err *err);

#endif
