// SPDX-License-Identifier: MIT
// Inside the CUDA backend: what its translation units share (device.cu,
// blas.cu, tier.cu, launch.cu).  struct gpu is one backend instance; the
// helpers declared here are defined in the file named above each group.
// Everything is in namespace moe_gpu with hidden visibility: the module
// exports only the extern "C" functions of cuda.h.  Not a header for C.
#ifndef MOE_GPU_DEVICE_IMPL_CUH
#define MOE_GPU_DEVICE_IMPL_CUH

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "engine/backend.h"
}

namespace moe_gpu __attribute__((visibility("hidden"))) {

// cuBLAS, opened when a device is found: linking it would map its hundreds
// of megabytes into every process that only probes for a device.
struct blas_api {
	void *h;
	decltype(&cublasCreate_v2) create;
	decltype(&cublasDestroy_v2) destroy;
	decltype(&cublasSetStream_v2) set_stream;
	decltype(&cublasSetWorkspace_v2) set_workspace;
	decltype(&cublasSetMathMode) set_math;
	decltype(&cublasSgemm_v2) sgemm;
	cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
				  const void *, const void *, cudaDataType, int, const void *, cudaDataType, int,
				  const void *, void *, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
};

struct dbuf {                     // a device buffer that grows
	void *p = nullptr;
	size_t cap = 0;
};

struct hbuf {                     // a page-locked host buffer that grows
	void *p = nullptr;
	size_t cap = 0;
};

struct dlayer {                   // a layer's always-resident weights
	uint32_t layer = 0;
	const float *h_router = nullptr;  // the host copies uploaded, each on its own
	const float *h_bias = nullptr;
	const float *h_sgate = nullptr;
	const void *h_shared = nullptr;
	float *router = nullptr;      // [E][H]
	float *bias = nullptr;        // [E] or NULL
	float *sgate = nullptr;       // [H] or NULL
	void *shared = nullptr;       // shared expert blob or NULL
	int32_t *slot_of = nullptr;   // [E] device-tier slot of each expert, -1: none
};

struct slot {
	unsigned char *mem;
	int32_t layer_index;          // index into gpu::layers, -1: free
	uint32_t expert;
	int32_t prev, next;           // LRU list, head = most recently used
	bool busy;                    // used by the call in progress
};

struct gpu {
	int dev;
	cudaStream_t cs;              // compute
	cudaStream_t xs;              // host-to-device copies of experts
	cudaEvent_t copied;
	cublasHandle_t blas;
	void *blas_ws;

	// device tier
	uint64_t budget;              // bytes for slots
	uint64_t slot_bytes;          // 0 until the first call says the expert size
	uint32_t max_slots;
	uint32_t nslots;
	uint32_t chunk_slots;         // slots per chunk
	struct slot *slots;
	unsigned char **chunks;
	uint32_t nchunks;
	int32_t lru_head, lru_tail;

	struct dlayer *layers;
	uint32_t nlayers;

	// route
	dbuf r_x, r_logits, r_scratch, r_ids, r_w;
	hbuf rh_x, rh_ids, rh_w;

	// experts: the call in progress
	dbuf e_x, e_w, e_pos, e_tok, e_h, e_y, e_hsh, e_ysh, e_sg, e_out, e_items, e_blocks;
	dbuf g_xhi, g_xlo, g_G, g_hhi, g_hlo;
	dbuf g_whi, g_wlo;            // an FP8 or INT4 expert on cuBLAS: its weights as bf16
				      // hi + lo (MXFP4: hi alone, exact)
	hbuf eh_x, eh_w, eh_pos, eh_tok, eh_out, eh_items, eh_blocks;
	uint32_t *count;              // [E] entries per expert
	uint64_t *first;              // [E] first entry of each expert
	uint8_t *done;                // [E + 1] computed in this call (E: shared)
	uint32_t *list;               // [E + 1] experts of one launch
	unsigned char **mem;          // [E + 1] their weights on the device
	size_t cnt_cap;
	bool in_call;
	bool dev_io;                  // the call's x and out are device pointers
				      // (experts_begin's MOE_BACKEND_DEVICE_IO)
	const float *r_last;          // route()'s last x, and its tokens: r_x holds it
	size_t r_last_n;
	const struct moe_layer_weights *lw;
	uint32_t cli;                 // the call's layer in layers[]
	size_t n;
	uint32_t kk;
	float *out;
	size_t nitems, nblocks;       // used of e_items / e_blocks in this call
	size_t items_cap, blocks_cap; // their capacity in this call
	int status;                   // first failure of the call

	moe_log_fn log;               // moe_backend_options.log: NULL, silent
	void *log_ctx;
};

// ---- blas.cu ---------------------------------------------------------------

extern struct blas_api blas;

int blas_open(char *why, size_t why_len);

// ---- device.cu: errors -------------------------------------------------------

// Set by an error that corrupts the CUDA context for good: every later
// call fails at once, and the log says that only a restart helps.
extern bool device_lost;

// Log a failed CUDA call and map it to -errno (-ENODEV once the context is
// lost for good); clears a non-sticky error.
int fail(struct gpu *g, const char *what, cudaError_t rc);
// Log a failed cuBLAS call and map it to -errno.
int fail_blas(struct gpu *g, const char *what, cublasStatus_t st);
// A line for the engine's log callback (moe_backend_options.log; none:
// silent); @level as syslog(3).
void gpu_log(struct gpu *g, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// Return fail()'s -errno from the function (which has a struct gpu *g).
#define CK(call)                                          \
	do {                                              \
		cudaError_t rc_ = (call);                 \
		if (rc_ != cudaSuccess)                   \
			return fail(g, #call, rc_);       \
	} while (0)

#define CKB(call)                                          \
	do {                                               \
		cublasStatus_t st_ = (call);               \
		if (st_ != CUBLAS_STATUS_SUCCESS)          \
			return fail_blas(g, #call, st_);   \
	} while (0)

// ---- tier.cu: device memory and the device tier --------------------------

int dgrow(struct gpu *g, dbuf *b, size_t bytes);
int hgrow(struct gpu *g, hbuf *b, size_t bytes);
void dfree(dbuf *b);
void hfree(hbuf *b);
void layer_free(struct dlayer *l);
int layer_get(struct gpu *g, const struct moe_layer_weights *lw, bool need_shared, struct dlayer **ret);
int tier_setup(struct gpu *g, uint64_t bytes);
int32_t tier_take(struct gpu *g);
void tier_touch(struct gpu *g, int32_t s);
int tier_release_chunk(struct gpu *g);
void tier_forget_busy(struct gpu *g);

// ---- launch.cu: the launches and the ops' work ------------------------------

int drain(struct gpu *g);
int gpu_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
	      int32_t *ids, float *w, bool dev_x);
int begin(struct gpu *g, const struct moe_layer_weights *lw, const float *x, size_t n, uint32_t kk,
	  const int32_t *ids, const float *w, float *out, unsigned flags);
int run(struct gpu *g, const struct moe_layer_weights *lw, const uint8_t *ready, bool with_shared);
int end(struct gpu *g, bool abandon);
// cudaFuncGetAttributes of a kernel of this build: it fails on a device that
// cannot run them (all the kernels are in launch.cu, one fatbinary).
cudaError_t kernel_attributes(cudaFuncAttributes *fa);

// ---- small helpers, inline -------------------------------------------------

// Bytes per element of a plain dtype (f32, bf16, f16), per code of FP8
// (the 4-bit dtypes are never asked).
inline size_t dtype_size(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 ? 4 : t == MOE_DTYPE_FP8_E4M3_B128 ? 1 : 2;
}

// The store's layout (model.h; the module links no engine symbol, so its
// formulas are written out here): an N x K matrix is N * K elements, or
// for FP8 the codes and the float32 scales [ceil(N/128)][ceil(K/128)],
// each padded to 64 bytes, or for MXFP4 and INT4 model.h's inline layouts
// (INT4 by the store's q4_group and q4_flags); a blob is gate, up, down back to
// back, then with expert biases the floats at a 16-byte boundary.
inline uint64_t pad64(uint64_t b)
{
	return moe_part_align(b);
}

inline uint64_t matrix_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint64_t N, uint64_t K)
{
	if (dt == MOE_DTYPE_FP8_E4M3_B128)
		return pad64(N * K) + pad64(((N + 127) / 128) * ((K + 127) / 128) * sizeof(float));
	if (dt == MOE_DTYPE_MXFP4)
		return moe_mxfp4_matrix_bytes(N, K);
	if (dt == MOE_DTYPE_INT4) {
		struct moe_q4_layout l;

		moe_q4_layout(c->q4_group, c->q4_flags, N, K, &l);
		return l.bytes;
	}
	return N * K * dtype_size(dt);
}

inline uint64_t ffn_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint32_t inter)
{
	return (c->gated ? 2 : 1) * matrix_bytes(c, dt, inter, c->hidden_size) +
	       matrix_bytes(c, dt, c->hidden_size, inter);
}

// Where a routed expert's biases start (model.h moe_expert_bias_offset).
inline uint64_t bias_offset(const struct moe_model_config *c)
{
	return (ffn_bytes(c, c->weight_dtype, c->moe_intermediate_size) + 15) & ~(uint64_t)15;
}

// A routed expert's blob as the store holds it (moe_expert_bytes).
inline uint64_t expert_bytes(const struct moe_model_config *c)
{
	uint64_t I = c->moe_intermediate_size;

	if (c->has_expert_bias)
		return bias_offset(c) + ((c->gated ? 2 : 1) * I + c->hidden_size) * sizeof(float);
	return ffn_bytes(c, c->weight_dtype, c->moe_intermediate_size);
}

// The shared expert's blob (moe_shared_bytes): no biases.
inline uint64_t shared_bytes(const struct moe_model_config *c)
{
	return ffn_bytes(c, c->shared_dtype, c->shared_intermediate_size);
}

inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

} // namespace moe_gpu

#endif
