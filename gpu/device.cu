// SPDX-License-Identifier: MIT
// The CUDA backend: the backend ops of engine/backend.h on one device.
// This file holds the ops' entry points (cuda.h), init and fini, the probe,
// IPC and host registration, and the error helpers; the work is in
// launch.cu (launches, routing, the experts call), tier.cu (device memory,
// the device tier) and blas.cu (cuBLAS), their shared types in
// device_impl.cuh.
//
// route    x goes up, k_logits computes the float32 logits (a fixed order:
//          the same bits whatever the batch), k_select picks the experts
//          with router_sel.h's rules, ids and weights come back.
// experts  (split as experts_begin/run/end so that what is resident
//          computes while the host tier still reads the rest)
//          begin: tokens grouped by expert on the host (the engine has the
//                 ids there anyway: it needs them for its own cache), x, the
//                 weights and the grouping go up;
//          run:   each ready expert is made resident in the device tier
//                 (cudaMemcpyAsync on the copy stream from the host tier,
//                 page-locked when the engine registered its arena), then
//                 computed: by the weight-streaming kernels when it has few
//                 tokens (each weight read once per 8 tokens; decode), by
//                 two cuBLAS bf16 products (x split into bf16 hi + lo, so the
//                 result keeps float32 accuracy) when it has many;
//          end:   k_combine sums the slots in order, the output comes back.
//
// The device tier is an LRU cache of experts in device memory, slots of one
// expert each, up to moe_backend_options.device_bytes (0: free memory minus
// a reserve).  Slots that a call in progress uses are never evicted; a call
// needing more than the tier holds waits for its launched work and goes on.
//
// Determinism: fixed summation orders everywhere, no float atomics, cuBLAS
// with a fixed workspace on one stream.  Batch invariance holds for the
// routing and the streaming kernels (a token's sums do not depend on the
// other tokens) but not across the switch to cuBLAS at MOE_GEMM_MIN_TOKENS
// tokens per expert, nor among cuBLAS products of different sizes:
// moed(8) documents it.
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.h"
#include "device_impl.cuh"

// Device memory left free when device_bytes is 0, besides the working buffers.
#define MOE_RESERVE_MIN (2ull << 30)
#define MOE_BLAS_WORKSPACE (32u << 20)

namespace moe_gpu __attribute__((visibility("hidden"))) {

bool device_lost;

bool sticky(cudaError_t rc)
{
	switch (rc) {
	case cudaErrorIllegalAddress:
	case cudaErrorLaunchFailure:
	case cudaErrorIllegalInstruction:
	case cudaErrorMisalignedAddress:
	case cudaErrorInvalidAddressSpace:
	case cudaErrorInvalidPc:
	case cudaErrorHardwareStackError:
	case cudaErrorECCUncorrectable:
	case cudaErrorLaunchTimeout:
	case cudaErrorAssert:
		return true;
	default:
		return false;
	}
}

void gpu_log(struct gpu *g, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (!g->log)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	g->log(g->log_ctx, level, msg);
}

int fail(struct gpu *g, const char *what, cudaError_t rc)
{
	(void)cudaGetLastError();   // a non-sticky error must not fail the next call
	gpu_log(g, 3, "cuda backend: %s: %s (%s)", what, cudaGetErrorString(rc), cudaGetErrorName(rc));
	if (sticky(rc) && !device_lost) {
		device_lost = true;
		gpu_log(g, 3, "cuda backend: the CUDA context is lost; every request fails until moed restarts");
	}
	return device_lost ? -ENODEV : rc == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

int fail_blas(struct gpu *g, const char *what, cublasStatus_t st)
{
	gpu_log(g, 3, "cuda backend: %s: cuBLAS status %d", what, (int)st);
	return st == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -EIO;
}
} // namespace moe_gpu

using namespace moe_gpu;

extern "C" {

int moe_cuda_probe(char *why, size_t why_len)
{
	int n = 0;
	cudaError_t rc = cudaGetDeviceCount(&n);

	if (rc != cudaSuccess) {
		snprintf(why, why_len, "no usable CUDA device: %s (%s)", cudaGetErrorString(rc), cudaGetErrorName(rc));
		return -ENODEV;
	}
	if (n == 0) {
		snprintf(why, why_len, "no usable CUDA device: the driver reports none");
		return -ENODEV;
	}
	why[0] = 0;
	for (int i = 0; i < n; i++) {
		cudaDeviceProp p;
		cudaFuncAttributes fa;
		if (cudaGetDeviceProperties(&p, i) != cudaSuccess || p.major < 8) {
			(void)cudaGetLastError();
			continue;
		}
		// this build's kernels must run there (sm_80 and sm_90 code)
		if (cudaSetDevice(i) != cudaSuccess || kernel_attributes(&fa) != cudaSuccess) {
			snprintf(why, why_len, "no usable CUDA device: %s (compute capability %d.%d) cannot run "
				 "this build's kernels: %s", p.name, p.major, p.minor,
				 cudaGetErrorString(cudaGetLastError()));
			continue;
		}
		return i;
	}
	if (!why[0])
		snprintf(why, why_len, "no usable CUDA device: none of the %d has compute capability 8.0 or newer",
			 n);
	return -ENODEV;
}

static void gpu_destroy(struct gpu *g)
{
	if (!g)
		return;
	cudaSetDevice(g->dev);
	if (g->cs)
		cudaStreamSynchronize(g->cs);
	if (g->xs)
		cudaStreamSynchronize(g->xs);
	for (uint32_t i = 0; i < g->nlayers; i++)
		layer_free(&g->layers[i]);
	free(g->layers);
	for (uint32_t i = 0; i < g->nchunks; i++)
		cudaFree(g->chunks[i]);
	free(g->chunks);
	free(g->slots);
	dbuf *d[] = { &g->r_x, &g->r_logits, &g->r_scratch, &g->r_ids, &g->r_w, &g->e_x, &g->e_w, &g->e_pos,
		      &g->e_tok, &g->e_h, &g->e_y, &g->e_hsh, &g->e_ysh, &g->e_sg, &g->e_out, &g->e_items,
		      &g->e_blocks, &g->g_xhi, &g->g_xlo, &g->g_G, &g->g_hhi, &g->g_hlo,
		      &g->g_whi, &g->g_wlo };
	for (dbuf *b : d)
		dfree(b);
	hbuf *h[] = { &g->rh_x, &g->rh_ids, &g->rh_w, &g->eh_x, &g->eh_w, &g->eh_pos, &g->eh_tok, &g->eh_out,
		      &g->eh_items, &g->eh_blocks };
	for (hbuf *b : h)
		hfree(b);
	free(g->count);
	free(g->first);
	free(g->done);
	free(g->list);
	free(g->mem);
	if (g->blas)
		blas.destroy(g->blas);
	if (g->blas_ws)
		cudaFree(g->blas_ws);
	if (g->copied)
		cudaEventDestroy(g->copied);
	if (g->cs)
		cudaStreamDestroy(g->cs);
	if (g->xs)
		cudaStreamDestroy(g->xs);
	free(g);
}

static int gpu_create(int dev, uint64_t device_bytes, struct gpu **ret, char *why, size_t why_len)
{
	// plain C allocation: the module links no C++ runtime (all zero is
	// the empty state of every member)
	struct gpu *g = (struct gpu *)calloc(1, sizeof(*g));
	size_t fr = 0, total = 0;
	cudaError_t rc;
	cublasStatus_t st;

	if (!g)
		return -ENOMEM;
	g->dev = dev;
	g->lru_head = g->lru_tail = -1;
#define CKW(call)                                                                                       \
	do {                                                                                            \
		rc = (call);                                                                            \
		if (rc != cudaSuccess) {                                                                \
			snprintf(why, why_len, "CUDA device %d: %s: %s", dev, #call, cudaGetErrorString(rc)); \
			gpu_destroy(g);                                                                 \
			return rc == cudaErrorMemoryAllocation ? -ENOMEM : -ENODEV;                     \
		}                                                                                       \
	} while (0)
	CKW(cudaSetDevice(dev));
	CKW(cudaStreamCreateWithFlags(&g->cs, cudaStreamNonBlocking));
	CKW(cudaStreamCreateWithFlags(&g->xs, cudaStreamNonBlocking));
	CKW(cudaEventCreateWithFlags(&g->copied, cudaEventDisableTiming));
	CKW(cudaMalloc(&g->blas_ws, MOE_BLAS_WORKSPACE));
	CKW(cudaMemGetInfo(&fr, &total));
#undef CKW
	if (blas_open(why, why_len) < 0) {
		gpu_destroy(g);
		return -ENODEV;
	}
	st = blas.create(&g->blas);
	if (st != CUBLAS_STATUS_SUCCESS) {
		snprintf(why, why_len, "CUDA device %d: cuBLAS did not start (status %d)", dev, (int)st);
		g->blas = nullptr;
		gpu_destroy(g);
		return -ENODEV;
	}
	// one stream and a fixed workspace: the same bits every run; the
	// default math mode never uses TF32 for float32 products
	if (blas.set_stream(g->blas, g->cs) != CUBLAS_STATUS_SUCCESS ||
	    blas.set_workspace(g->blas, g->blas_ws, MOE_BLAS_WORKSPACE) != CUBLAS_STATUS_SUCCESS ||
	    blas.set_math(g->blas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
		snprintf(why, why_len, "CUDA device %d: cannot set up cuBLAS", dev);
		gpu_destroy(g);
		return -ENODEV;
	}
	if (device_bytes) {
		g->budget = device_bytes;
	} else {
		// all free memory but a reserve for the working buffers
		uint64_t reserve = total / 16 > MOE_RESERVE_MIN ? total / 16 : MOE_RESERVE_MIN;
		g->budget = fr > reserve ? fr - reserve : 0;
	}
	*ret = g;
	return 0;
}

int moe_cuda_init(struct moe_backend *be, const struct moe_backend_options *opt, char *why, size_t why_len)
{
	struct gpu *g;
	int dev = moe_cuda_probe(why, why_len), r;

	if (dev < 0)
		return dev;
	r = gpu_create(dev, opt ? opt->device_bytes : 0, &g, why, why_len);
	if (r < 0)
		return r;
	g->log = opt ? opt->log : NULL;
	g->log_ctx = opt ? opt->log_ctx : NULL;
	be->priv = g;
	return 0;
}

void moe_cuda_fini(struct moe_backend *be)
{
	gpu_destroy((struct gpu *)be->priv);
	be->priv = NULL;
}

int moe_cuda_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
		   int32_t *ids, float *w, unsigned flags)
{
	struct gpu *g = (struct gpu *)be->priv;
	bool dev_x = (flags & MOE_BACKEND_DEVICE_IO) != 0;
	int r;

	if (device_lost)
		return -ENODEV;
	cudaSetDevice(g->dev);
	r = gpu_route(be, lw, x, n, ids, w, dev_x);
	if (r < 0 && dev_x) {
		// a failed call may have left the copy from the client's memory
		// in flight: it must be over before the request completes
		cudaStreamSynchronize(g->cs);
		(void)cudaGetLastError();
	}
	return r;
}

int moe_cuda_experts_begin(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
			   uint32_t kk, const int32_t *ids, const float *w, float *out, unsigned flags)
{
	struct gpu *g = (struct gpu *)be->priv;
	int r;

	if (g->in_call)
		return -EBUSY;
	if (device_lost)
		return -ENODEV;
	cudaSetDevice(g->dev);
	r = begin(g, lw, x, n, kk, ids, w, out, flags);
	if (r < 0) {
		// waits, too, for a copy from the client's memory (DEVICE_IO)
		drain(g);
		return r;
	}
	g->in_call = true;
	g->status = 0;
	return 0;
}

int moe_cuda_experts_run(struct moe_backend *be, const struct moe_layer_weights *lw, const uint8_t *ready,
			 bool shared)
{
	struct gpu *g = (struct gpu *)be->priv;
	int r;

	if (!g->in_call)
		return -EINVAL;
	if (g->status)
		return g->status;
	cudaSetDevice(g->dev);
	r = run(g, lw, ready, shared);
	if (r < 0) {
		// the host tier's copies are the engine's again once this returns,
		// and what this call copied may be incomplete
		cudaStreamSynchronize(g->xs);
		(void)cudaGetLastError();
		tier_forget_busy(g);
		g->status = r;
	}
	return r;
}

int moe_cuda_experts_end(struct moe_backend *be, bool abandon)
{
	struct gpu *g = (struct gpu *)be->priv;
	int r;

	if (!g->in_call)
		return -EINVAL;
	cudaSetDevice(g->dev);
	r = end(g, abandon || g->status);
	g->in_call = false;
	return g->status ? g->status : r;
}

int moe_cuda_experts(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
		     uint32_t kk, const int32_t *ids, const float *w, float *out, unsigned flags)
{
	uint32_t E = lw->cfg->num_experts;
	uint8_t *ready = (uint8_t *)malloc(E);
	int r, r2;

	if (!ready)
		return -ENOMEM;
	memset(ready, 1, E);
	r = moe_cuda_experts_begin(be, lw, x, n, kk, ids, w, out, flags);
	if (r == 0) {
		r = moe_cuda_experts_run(be, lw, ready, true);
		r2 = moe_cuda_experts_end(be, r < 0);
		if (r == 0)
			r = r2;
	}
	free(ready);
	return r;
}

int moe_cuda_host_register(struct moe_backend *be, void *p, size_t len)
{
	struct gpu *g = (struct gpu *)be->priv;
	cudaError_t rc;

	cudaSetDevice(g->dev);
	rc = cudaHostRegister(p, len, cudaHostRegisterDefault);
	if (rc != cudaSuccess) {
		cudaGetLastError();
		return rc == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
	}
	return 0;
}

int moe_cuda_ipc_open(struct moe_backend *be, const void *handle, void **base, uint64_t *bytes)
{
	typedef int (*range_fn)(unsigned long long *, size_t *, unsigned long long);
	struct gpu *g = (struct gpu *)be->priv;
	cudaDriverEntryPointQueryResult q;
	cudaIpcMemHandle_t h;
	unsigned long long b = 0;
	size_t size = 0;
	void *fn = nullptr;
	cudaError_t rc;

	static_assert(sizeof(h) == 64, "a CUDA IPC handle is 64 bytes");
	memcpy(&h, handle, sizeof(h));
	cudaSetDevice(g->dev);
	rc = cudaIpcOpenMemHandle(base, h, cudaIpcMemLazyEnablePeerAccess);
	if (rc != cudaSuccess) {
		fail(g, "cudaIpcOpenMemHandle", rc);
		return rc == cudaErrorMemoryAllocation ? -ENOMEM : -EINVAL;
	}
	// the allocation's size as the device knows it: the client's word for
	// it is not to be trusted
	if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault, &q) !=
		    cudaSuccess || q != cudaDriverEntryPointSuccess || !fn ||
	    ((range_fn)fn)(&b, &size, (unsigned long long)(uintptr_t)*base) != 0 ||
	    b != (unsigned long long)(uintptr_t)*base) {
		(void)cudaGetLastError();
		cudaIpcCloseMemHandle(*base);
		*base = nullptr;
		return -EINVAL;
	}
	*bytes = size;
	return 0;
}

void moe_cuda_ipc_close(struct moe_backend *be, void *base)
{
	struct gpu *g = (struct gpu *)be->priv;

	cudaSetDevice(g->dev);
	if (cudaIpcCloseMemHandle(base) != cudaSuccess)
		(void)cudaGetLastError();
}

void moe_cuda_host_unregister(struct moe_backend *be, void *p)
{
	struct gpu *g = (struct gpu *)be->priv;

	cudaSetDevice(g->dev);
	if (cudaHostUnregister(p) != cudaSuccess)
		cudaGetLastError();
}

} // extern "C"
