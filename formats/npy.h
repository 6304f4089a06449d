/* SPDX-License-Identifier: MIT */
/*
 * numpy .npy arrays (version 1.0/2.0/3.0, C order) and .npz archives of them.
 * float32 ('<f4'), bfloat16 as raw 16-bit words ('<u2', '|V2' or 'bfloat16'
 * as ml_dtypes writes it), int32 ('<i4').
 */
#ifndef MOE_NPY_H
#define MOE_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

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
 * Read @path.  Accepted descr values: float32 '<f4' ('=f4', 'f4'); bfloat16
 * '<u2', '|V2', '<V2', 'bfloat16', '<bf16' or the one-field list
 * [('', '<V2')]; int32 '<i4'.  Errors name the file: not an .npy (-EINVAL),
 * unsupported dtype or Fortran order (-ENOTSUP, dtype named), truncated data
 * or bytes after it (-EINVAL, expected and actual sizes), sizes that
 * overflow (-EOVERFLOW).  On success *ret owns a malloc'ed data buffer.
 */
int moe_npy_read(const char *path, struct moe_npy *ret, struct moe_err *err);

/*
 * Write an array as a version 1.0 .npy (header padded to 64 bytes, as numpy
 * does; bfloat16 as '<u2'); written under a temporary of its own and
 * renamed into place (formats/outfile.h).
 */
int moe_npy_write(const char *path, enum moe_npy_type type, uint32_t ndim,
		  const uint64_t *shape, const void *data, struct moe_err *err);

/* Bytes per element of @t (4, 2, 4); 0 for an invalid value. */
size_t moe_npy_type_size(enum moe_npy_type t);

/* The descr moe_npy_write puts in the header: "<f4", "<u2", "<i4"; NULL if invalid. */
const char *moe_npy_type_descr(enum moe_npy_type t);

/* "float32", "bfloat16", "int32"; "?" if invalid. */
const char *moe_npy_type_name(enum moe_npy_type t);

/* Free the data of @a (the struct itself is the caller's); NULL is fine. */
void moe_npy_free(struct moe_npy *a);

/* An array to put in an .npz archive under @name ("ids" -> "ids.npy"). */
struct moe_npz_entry {
	const char *name;
	enum moe_npy_type type;
	uint32_t ndim;
	uint64_t shape[MOE_NPY_MAX_DIMS];
	const void *data;
};

/*
 * Write an uncompressed .npz (zip, stored, CRC-32 from zlib), as np.savez,
 * via a temporary of its own and rename.  Zip64 is not written: an archive
 * of 4 GiB or more is refused with -EFBIG before anything is written.
 */
int moe_npz_write(const char *path, const struct moe_npz_entry *entries, uint32_t n,
		  struct moe_err *err);

#endif
