/* SPDX-License-Identifier: MIT */
/*
 * Between the C side of the CUDA backend module (module.c: the ops table)
 * and its CUDA side (device.cu and the files it names: everything that
 * touches the device).  The functions are the backend ops of
 * engine/backend.h.
 */
#ifndef MOE_GPU_CUDA_H
#define MOE_GPU_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct moe_backend;
struct moe_backend_options;
struct moe_layer_weights;

/*
 * Find a usable CUDA device (compute capability 8.0 or newer).  Returns its
 * index (>= 0), or -ENODEV with a one-line reason in @why.
 */
int moe_cuda_probe(char *why, size_t why_len);

/* Start the backend on the device moe_cuda_probe() finds; a reason in @why
 * on failure. */
int moe_cuda_init(struct moe_backend *be, const struct moe_backend_options *opt, char *why, size_t why_len);
void moe_cuda_fini(struct moe_backend *be);

int moe_cuda_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
		   int32_t *ids, float *w, unsigned flags);
int moe_cuda_experts(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
		     uint32_t kk, const int32_t *ids, const float *w, float *out, unsigned flags);
int moe_cuda_experts_begin(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
			   uint32_t kk, const int32_t *ids, const float *w, float *out, unsigned flags);
int moe_cuda_experts_run(struct moe_backend *be, const struct moe_layer_weights *lw, const uint8_t *ready,
			 bool shared);
int moe_cuda_experts_end(struct moe_backend *be, bool abandon);
int moe_cuda_host_register(struct moe_backend *be, void *p, size_t len);
void moe_cuda_host_unregister(struct moe_backend *be, void *p);
int moe_cuda_ipc_open(struct moe_backend *be, const void *handle, void **base, uint64_t *bytes);
void moe_cuda_ipc_close(struct moe_backend *be, void *base);

#ifdef __cplusplus
}
#endif

#endif
