/* SPDX-License-Identifier: MIT */
/*
 * Between kernels.c and kernels_mxfp4.c only: the MXFP4 half of the
 * resident layout (kernels.h), which kernels.c's moe_kern_pack_bytes()
 * and moe_kern_pack() hand MXFP4 matrices to.
 */
#ifndef MOE_KERNELS_MXFP4_H
#define MOE_KERNELS_MXFP4_H

#include <stddef.h>
#include <stdint.h>

/* Bytes [b0, b0 + nb) of an N x K MXFP4 matrix in the store's layout
 * (moe_matrix_bytes()), @src pointing at byte b0, into their places in
 * the resident matrix @dst (the same size); any split, in any order,
 * gives the same bytes. */
void moe_kern_mxfp4_pack_bytes(const void *src, size_t N, size_t K, uint64_t b0, uint64_t nb, void *dst);

#endif
