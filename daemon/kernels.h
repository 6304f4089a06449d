/* SPDX-License-Identifier: MIT */
/*
 * CPU compute kernels.
 *
 * The one primitive is a block of dot products between weight rows (stored
 * float32, bfloat16 or float16, widened in registers: no float32 copy of an
 * expert is ever made) and float32 token vectors, accumulated in float32.
 *
 * Batch invariance: every output element is computed in one canonical
 * order, whatever the tile that computes it and however many rows and
 * tokens are in the call: lane l of one vector accumulator takes the
 * products k = l, l + W, l + 2W, ... by fused multiply-add, the tail is
 * loaded masked (as if zero padded), and the W lanes are summed by one
 * fixed tree.  So a token's output bits do not depend on its batch.  The
 * order (W) depends on the instruction set picked at start-up, so bits can
 * differ between machines, never between runs or batches on one machine.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>

#include "dtype.h"

enum moe_kern_isa {
	MOE_KERN_SCALAR = 0,   /* portable C, 8 lanes emulated */
	MOE_KERN_AVX2 = 1,     /* AVX2 + FMA + F16C, 8 lanes */
	MOE_KERN_AVX512 = 2,   /* AVX-512 F/BW/VL, 16 lanes */
	MOE_KERN_ISA_COUNT
};

/*
 * y[c * ldy + r] = sum_k W[r][k] * xs[c][k]   for r < nr, c < nt
 * W holds nr rows of K elements of type @dt, row r at element r * ldw.
 */
typedef void (*moe_kern_dot_rows_fn)(enum moe_dtype dt, const void *W, size_t ldw, size_t K,
				     size_t nr, const float *const *xs, size_t nt, float *y,
				     size_t ldy);

/* The kernel of the instruction set picked for this machine (the best one
 * the CPU has, or $MOE_KERNEL = scalar | avx2 | avx512 if set and usable). */
void moe_kern_dot_rows(enum moe_dtype dt, const void *W, size_t ldw, size_t K, size_t nr,
		       const float *const *xs, size_t nt, float *y, size_t ldy);

/* The kernel of @isa, or NULL if this CPU cannot run it (for tests). */
moe_kern_dot_rows_fn moe_kern_get(enum moe_kern_isa isa);

/* The instruction set moe_kern_dot_rows uses. */
enum moe_kern_isa moe_kern_active(void);

/* "scalar", "avx2", "avx512". */
const char *moe_kern_isa_name(enum moe_kern_isa isa);

#endif
