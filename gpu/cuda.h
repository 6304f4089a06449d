/* SPDX-License-Identifier: MIT */
/*
 * Between the C side of the CUDA backend module (module.c) and its CUDA
 * side (device.cu).
 */
#ifndef MOE_GPU_CUDA_H
#define MOE_GPU_CUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Find a usable CUDA device.  Returns its index (>= 0), or a negative errno
 * with a one-line reason in @why: -ENODEV when there is no driver or no
 * device.
 */
int moe_cuda_probe(char *why, size_t why_len);

#ifdef __cplusplus
}
#endif

#endif
