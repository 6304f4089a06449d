// SPDX-License-Identifier: MIT
// The CUDA backend: the backend ops of engine/backend.h on one device.
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
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>

#include <cublas_v2.h>
#include <cuda_runtime.h>

extern "C" {
#include "engine/backend.h"
}
#include "cuda.h"
#include "kernels.cuh"

// An expert with at least this many tokens in a batch goes to cuBLAS.
#define MOE_GEMM_MIN_TOKENS 64
// Device memory left free when device_bytes is 0, besides the working buffers.
#define MOE_RESERVE_MIN (2ull << 30)
// The tier grows by chunks of about this many bytes (at least one slot).
#define MOE_CHUNK_BYTES (1ull << 30)
#define MOE_BLAS_WORKSPACE (32u << 20)

namespace {

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
} blas;

#define MOE_STR2(x) #x
#define MOE_STR(x) MOE_STR2(x)
#define MOE_CUBLAS_SONAME "libcublas.so." MOE_STR(CUBLAS_VER_MAJOR)

int blas_open(char *why, size_t why_len)
{
	void *h;

	if (blas.h)
		return 0;
	h = dlopen(MOE_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#ifdef MOE_CUDA_LIBDIR
	if (!h)   // the toolkit this module was built with, when ld.so does not know it
		h = dlopen(MOE_CUDA_LIBDIR "/" MOE_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#endif
	if (!h) {
		snprintf(why, why_len, "cannot load cuBLAS: %s", dlerror());
		return -ENODEV;
	}
#define SYM(field, name)                                                                   \
	do {                                                                               \
		blas.field = (decltype(blas.field))dlsym(h, name);                        \
		if (!blas.field) {                                                         \
			snprintf(why, why_len, "%s lacks %s", MOE_CUBLAS_SONAME, name);    \
			dlclose(h);                                                        \
			return -ENODEV;                                                    \
		}                                                                          \
	} while (0)
	SYM(create, "cublasCreate_v2");
	SYM(destroy, "cublasDestroy_v2");
	SYM(set_stream, "cublasSetStream_v2");
	SYM(set_workspace, "cublasSetWorkspace_v2");
	SYM(set_math, "cublasSetMathMode");
	SYM(sgemm, "cublasSgemm_v2");
	SYM(gemm_ex, "cublasGemmEx");
#undef SYM
	blas.h = h;
	return 0;
}

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
};

// Set by an error that corrupts the CUDA context for good: every later
// call fails at once, and the log says that only a restart helps.
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

int fail(const char *what, cudaError_t rc)
{
	(void)cudaGetLastError();   // a non-sticky error must not fail the next call
	fprintf(stderr, "moed: cuda backend: %s: %s (%s)\n", what, cudaGetErrorString(rc), cudaGetErrorName(rc));
	if (sticky(rc) && !device_lost) {
		device_lost = true;
		fprintf(stderr, "moed: cuda backend: the CUDA context is lost; every request fails until moed "
			"restarts\n");
	}
	return device_lost ? -ENODEV : rc == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
}

int fail_blas(const char *what, cublasStatus_t st)
{
	fprintf(stderr, "moed: cuda backend: %s: cuBLAS status %d\n", what, (int)st);
	return st == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -EIO;
}

#define CK(call)                                          \
	do {                                              \
		cudaError_t rc_ = (call);                 \
		if (rc_ != cudaSuccess)                   \
			return fail(#call, rc_);          \
	} while (0)

#define CKB(call)                                          \
	do {                                               \
		cublasStatus_t st_ = (call);               \
		if (st_ != CUBLAS_STATUS_SUCCESS)          \
			return fail_blas(#call, st_);      \
	} while (0)

int tier_release_chunk(struct gpu *g);

// cudaMalloc, making room by giving back device-tier slots when the device
// is full: the tier's budget was fixed when the work buffers were small.
int dmalloc(struct gpu *g, void **p, size_t bytes)
{
	for (;;) {
		cudaError_t rc = cudaMalloc(p, bytes);
		size_t fr = 0, total = 0;

		if (rc == cudaSuccess)
			return 0;
		(void)cudaGetLastError();
		// give slots back only when that can make room for @bytes
		if (rc != cudaErrorMemoryAllocation || g->nchunks < 2 || cudaMemGetInfo(&fr, &total) != cudaSuccess ||
		    fr + (uint64_t)(g->nchunks - 1) * g->chunk_slots * g->slot_bytes < bytes ||
		    tier_release_chunk(g) < 0)
			return fail("cudaMalloc", rc);
	}
}

// Grow buffer @b to @bytes, allocating with @alloc(void **, size_t) and
// freeing with @release (work in flight may use the old one: wait for it).
template <typename Buf, typename Alloc, typename Release>
int grow(Buf *b, size_t bytes, Alloc alloc, Release release)
{
	if (bytes <= b->cap)
		return 0;
	size_t cap = bytes + bytes / 4;
	void *p;
	if (b->p) {
		CK(cudaDeviceSynchronize());
		release(b->p);
		b->p = nullptr;
		b->cap = 0;
	}
	int r = alloc(&p, cap);
	if (r < 0)
		return r;
	b->p = p;
	b->cap = cap;
	return 0;
}

int dgrow(struct gpu *g, dbuf *b, size_t bytes)
{
	return grow(b, bytes, [g](void **p, size_t n) { return dmalloc(g, p, n); },
		    [](void *p) { cudaFree(p); });
}

int hgrow(hbuf *b, size_t bytes)
{
	return grow(b, bytes, [](void **p, size_t n) {
		cudaError_t rc = cudaMallocHost(p, n);
		return rc == cudaSuccess ? 0 : fail("cudaMallocHost", rc);
	}, [](void *p) { cudaFreeHost(p); });
}

// *p = a new device copy of @bytes at @src, queued on the compute stream
// (the old one freed).
int dreplace(struct gpu *g, void **p, size_t bytes, const void *src)
{
	if (*p) {
		CK(cudaDeviceSynchronize());
		cudaFree(*p);
		*p = nullptr;
	}
	int r = dmalloc(g, p, bytes);
	if (r < 0)
		return r;
	CK(cudaMemcpyAsync(*p, src, bytes, cudaMemcpyHostToDevice, g->cs));
	return 0;
}

void dfree(dbuf *b)
{
	if (b->p)
		cudaFree(b->p);
	b->p = nullptr;
	b->cap = 0;
}

void hfree(hbuf *b)
{
	if (b->p)
		cudaFreeHost(b->p);
	b->p = nullptr;
	b->cap = 0;
}

size_t dtype_size(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 ? 4 : 2;
}

uint64_t expert_bytes(const struct moe_model_config *c, uint32_t inter)
{
	return (uint64_t)(c->gated ? 3 : 2) * c->hidden_size * inter * dtype_size(c->weight_dtype);
}

uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// ---- the layers' resident weights ----------------------------------------

void layer_free(struct dlayer *l)
{
	cudaFree(l->router);
	cudaFree(l->bias);
	cudaFree(l->sgate);
	cudaFree(l->shared);
	free(l->slot_of);
	*l = dlayer();
}

// The device copy of @lw's router, bias, shared gate and shared expert
// (uploaded on first use; the engine keeps them resident and in place).
int layer_get(struct gpu *g, const struct moe_layer_weights *lw, bool need_shared, struct dlayer **ret)
{
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size;
	struct dlayer *l = nullptr;

	for (uint32_t i = 0; i < g->nlayers; i++)
		if (g->layers[i].layer == lw->layer && g->layers[i].slot_of) {
			l = &g->layers[i];
			break;
		}
	if (!l) {
		struct dlayer *nl = (struct dlayer *)realloc(g->layers, (g->nlayers + 1) * sizeof(*nl));
		if (!nl)
			return -ENOMEM;
		g->layers = nl;
		l = &g->layers[g->nlayers];
		*l = dlayer();
		l->slot_of = (int32_t *)malloc(E * sizeof(int32_t));
		if (!l->slot_of)
			return -ENOMEM;
		for (uint32_t e = 0; e < E; e++)
			l->slot_of[e] = -1;
		l->layer = lw->layer;
		g->nlayers++;
	}
	// each piece on its own: predict_next's route() passes only the router
	// and bias.  The copies go on the compute stream, ahead of the kernels
	// that read them (the sources are the engine's and stay in place).
	int r;
	if (lw->router && l->h_router != lw->router) {
		l->h_router = nullptr;
		if ((r = dreplace(g, (void **)&l->router, (size_t)E * H * sizeof(float), lw->router)) < 0)
			return r;
		l->h_router = lw->router;
	}
	if (lw->bias && l->h_bias != lw->bias) {
		l->h_bias = nullptr;
		if ((r = dreplace(g, (void **)&l->bias, E * sizeof(float), lw->bias)) < 0)
			return r;
		l->h_bias = lw->bias;
	}
	if (lw->shared_gate && l->h_sgate != lw->shared_gate) {
		l->h_sgate = nullptr;
		if ((r = dreplace(g, (void **)&l->sgate, H * sizeof(float), lw->shared_gate)) < 0)
			return r;
		l->h_sgate = lw->shared_gate;
	}
	if (need_shared && lw->shared && l->h_shared != lw->shared) {
		l->h_shared = nullptr;
		if ((r = dreplace(g, &l->shared, expert_bytes(c, c->shared_intermediate_size), lw->shared)) < 0)
			return r;
		l->h_shared = lw->shared;
	}
	*ret = l;
	return 0;
}

// ---- the device tier -----------------------------------------------------

void lru_unlink(struct gpu *g, int32_t s)
{
	struct slot *x = &g->slots[s];
	if (x->prev >= 0)
		g->slots[x->prev].next = x->next;
	else
		g->lru_head = x->next;
	if (x->next >= 0)
		g->slots[x->next].prev = x->prev;
	else
		g->lru_tail = x->prev;
	x->prev = x->next = -1;
}

void lru_push_front(struct gpu *g, int32_t s)
{
	struct slot *x = &g->slots[s];
	x->prev = -1;
	x->next = g->lru_head;
	if (g->lru_head >= 0)
		g->slots[g->lru_head].prev = s;
	g->lru_head = s;
	if (g->lru_tail < 0)
		g->lru_tail = s;
}

// Size the tier for experts of @bytes on the first call.
int tier_setup(struct gpu *g, uint64_t bytes)
{
	if (g->slot_bytes)
		return bytes <= g->slot_bytes ? 0 : -EINVAL;
	uint64_t sb = (bytes + 255) / 256 * 256, m = g->budget / sb;
	uint32_t ms = m > (1u << 24) ? (1u << 24) : (uint32_t)m;
	if (ms == 0) {
		fprintf(stderr, "moed: cuda backend: the device tier (%llu bytes) holds no expert of %llu bytes\n",
			(unsigned long long)g->budget, (unsigned long long)sb);
		return -ENOMEM;
	}
	uint64_t cs = MOE_CHUNK_BYTES / sb;
	uint32_t per = cs < 1 ? 1 : cs > 4096 ? 4096 : (uint32_t)cs;
	struct slot *slots = (struct slot *)calloc(ms, sizeof(*slots));
	unsigned char **chunks = (unsigned char **)calloc((ms + per - 1) / per, sizeof(*chunks));
	if (!slots || !chunks) {
		free(slots);
		free(chunks);
		return -ENOMEM;
	}
	g->slots = slots;
	g->chunks = chunks;
	g->max_slots = ms;
	g->chunk_slots = per;
	g->slot_bytes = sb;
	return 0;
}

// A slot for a new expert: a fresh one while the budget allows, else the
// least recently used one not busy.  -1 when every slot is busy.
int32_t tier_take(struct gpu *g)
{
	if (g->nslots < g->max_slots) {
		uint32_t ci = g->nslots / g->chunk_slots;
		if (ci == g->nchunks) {
			uint32_t n = g->max_slots - g->nslots < g->chunk_slots ? g->max_slots - g->nslots
									       : g->chunk_slots;
			void *p;
			if (cudaMalloc(&p, (size_t)n * g->slot_bytes) == cudaSuccess) {
				g->chunks[g->nchunks++] = (unsigned char *)p;
			} else {
				cudaGetLastError();   // not sticky: the tier stops growing here
				g->max_slots = g->nslots;
			}
		}
		if (g->nslots < g->max_slots) {
			int32_t s = (int32_t)g->nslots++;
			struct slot *x = &g->slots[s];
			x->mem = g->chunks[s / g->chunk_slots] + (size_t)(s % g->chunk_slots) * g->slot_bytes;
			x->layer_index = -1;
			x->prev = x->next = -1;
			x->busy = false;
			lru_push_front(g, s);
			return s;
		}
	}
	for (int32_t s = g->lru_tail; s >= 0; s = g->slots[s].prev) {
		struct slot *x = &g->slots[s];
		if (x->busy)
			continue;
		if (x->layer_index >= 0)
			g->layers[x->layer_index].slot_of[x->expert] = -1;
		x->layer_index = -1;
		lru_unlink(g, s);
		lru_push_front(g, s);
		return s;
	}
	return -1;
}

void tier_touch(struct gpu *g, int32_t s)
{
	lru_unlink(g, s);
	lru_push_front(g, s);
}

// Give the last chunk of slots back to the device (none of them busy) and
// stop the tier from growing again.  -1 when there is none to give: the
// first chunk always stays, so that the tier never ends with no slot.
int tier_release_chunk(struct gpu *g)
{
	if (g->nchunks < 2)
		return -1;
	uint32_t ci = g->nchunks - 1, s0 = ci * g->chunk_slots;
	for (uint32_t s = s0; s < g->nslots; s++)
		if (g->slots[s].busy)
			return -1;
	if (cudaDeviceSynchronize() != cudaSuccess) {
		(void)cudaGetLastError();
		return -1;
	}
	for (uint32_t s = s0; s < g->nslots; s++) {
		struct slot *x = &g->slots[s];
		if (x->layer_index >= 0)
			g->layers[x->layer_index].slot_of[x->expert] = -1;
		lru_unlink(g, (int32_t)s);
	}
	cudaFree(g->chunks[ci]);
	g->chunks[ci] = nullptr;
	g->nchunks = ci;
	g->nslots = s0;
	g->max_slots = s0;
	return 0;
}

// After a failure: the slots this call touched may hold anything.
void tier_forget_busy(struct gpu *g)
{
	for (uint32_t s = 0; s < g->nslots; s++) {
		struct slot *x = &g->slots[s];
		if (!x->busy)
			continue;
		if (x->layer_index >= 0)
			g->layers[x->layer_index].slot_of[x->expert] = -1;
		x->layer_index = -1;
	}
}

// ---- launches --------------------------------------------------------------

// Launch the streaming kernels for items [i0, i1) and blocks [b0, b1) of
// phase A, with phase B's blocks following in [b1, b2).
template <typename T>
int launch_stream(struct gpu *g, const struct moe_model_config *c, size_t i0, size_t b0, size_t b1, size_t b2)
{
	const moe_witem *items = (const moe_witem *)g->e_items.p;
	const moe_wblock *blocks = (const moe_wblock *)g->e_blocks.p;
	(void)i0;
	if (b1 > b0)
		k_gate_up<T><<<(unsigned)(b1 - b0), MOE_WARPS * 32, 0, g->cs>>>(
			items, blocks + b0, (const float *)g->e_x.p, c->hidden_size, (int)c->act, c->gated);
	if (b2 > b1)
		k_down<T><<<(unsigned)(b2 - b1), MOE_WARPS * 32, 0, g->cs>>>(items, blocks + b1, c->hidden_size,
									     c->gated);
	CK(cudaGetLastError());
	return 0;
}

int launch_stream_any(struct gpu *g, const struct moe_model_config *c, size_t i0, size_t b0, size_t b1, size_t b2)
{
	switch (c->weight_dtype) {
	case MOE_DTYPE_BF16:
		return launch_stream<__nv_bfloat16>(g, c, i0, b0, b1, b2);
	case MOE_DTYPE_F16:
		return launch_stream<__half>(g, c, i0, b0, b1, b2);
	default:
		return launch_stream<float>(g, c, i0, b0, b1, b2);
	}
}

unsigned grid_for(size_t total)
{
	size_t b = (total + 255) / 256;
	return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

// One expert (or the shared one) with many tokens, by cuBLAS.  @it is the
// host copy of its item.
int launch_gemm(struct gpu *g, const struct moe_model_config *c, const moe_witem *it)
{
	uint32_t H = c->hidden_size, I = it->inter, nin = c->gated ? 2 : 1, m = it->count;
	const float one = 1.0f, zero = 0.0f;
	const unsigned char *w = it->w;
	const unsigned char *wd = w + (size_t)nin * I * H * dtype_size(c->weight_dtype);
	int r;

	if ((r = dgrow(g, &g->g_G, (size_t)m * nin * I * sizeof(float))) < 0)
		return r;
	if (c->weight_dtype == MOE_DTYPE_F32) {
		// float32 weights: plain float32 products
		if ((r = dgrow(g, &g->g_xhi, (size_t)m * (H > I ? H : I) * sizeof(float))) < 0)
			return r;
		float *xs = (float *)g->g_xhi.p, *G = (float *)g->g_G.p;
		k_gather_x<<<grid_for((size_t)m * H), 256, 0, g->cs>>>((const float *)g->e_x.p, it->tok, m, H, xs);
		CKB(blas.sgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(nin * I), (int)m, (int)H, &one,
				(const float *)w, (int)H, xs, (int)H, &zero, G, (int)(nin * I)));
		k_act_split<<<grid_for((size_t)m * I), 256, 0, g->cs>>>(G, m, I, (int)c->act, c->gated, nullptr,
									  nullptr, xs);
		CKB(blas.sgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)H, (int)m, (int)I, &one, (const float *)wd,
				(int)I, xs, (int)I, &zero, it->y, (int)H));
		CK(cudaGetLastError());
		return 0;
	}
	// bf16 weights: x = hi + lo in bf16, two tensor-core products summed in
	// float32 (C += lo W^T), which keeps float32-level accuracy
	size_t wid = H > I ? H : I;
	if ((r = dgrow(g, &g->g_xhi, (size_t)m * wid * 2)) < 0 || (r = dgrow(g, &g->g_xlo, (size_t)m * wid * 2)) < 0)
		return r;
	__nv_bfloat16 *hi = (__nv_bfloat16 *)g->g_xhi.p, *lo = (__nv_bfloat16 *)g->g_xlo.p;
	float *G = (float *)g->g_G.p;
	k_split_x<<<grid_for((size_t)m * H), 256, 0, g->cs>>>((const float *)g->e_x.p, it->tok, m, H, hi, lo);
	CKB(blas.gemm_ex(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(nin * I), (int)m, (int)H, &one, w, CUDA_R_16BF,
			 (int)H, hi, CUDA_R_16BF, (int)H, &zero, G, CUDA_R_32F, (int)(nin * I), CUBLAS_COMPUTE_32F,
			 CUBLAS_GEMM_DEFAULT));
	CKB(blas.gemm_ex(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(nin * I), (int)m, (int)H, &one, w, CUDA_R_16BF,
			 (int)H, lo, CUDA_R_16BF, (int)H, &one, G, CUDA_R_32F, (int)(nin * I), CUBLAS_COMPUTE_32F,
			 CUBLAS_GEMM_DEFAULT));
	k_act_split<<<grid_for((size_t)m * I), 256, 0, g->cs>>>(G, m, I, (int)c->act, c->gated, hi, lo, nullptr);
	CKB(blas.gemm_ex(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)H, (int)m, (int)I, &one, wd, CUDA_R_16BF, (int)I,
			 hi, CUDA_R_16BF, (int)I, &zero, it->y, CUDA_R_32F, (int)H, CUBLAS_COMPUTE_32F,
			 CUBLAS_GEMM_DEFAULT));
	CKB(blas.gemm_ex(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)H, (int)m, (int)I, &one, wd, CUDA_R_16BF, (int)I,
			 lo, CUDA_R_16BF, (int)I, &one, it->y, CUDA_R_32F, (int)H, CUBLAS_COMPUTE_32F,
			 CUBLAS_GEMM_DEFAULT));
	CK(cudaGetLastError());
	return 0;
}

bool use_gemm(const struct moe_model_config *c, uint32_t count)
{
	return count >= MOE_GEMM_MIN_TOKENS && c->weight_dtype != MOE_DTYPE_F16;
}

// Queue the experts @list[0..nl) (expert E: the shared one), whose weights
// are at @mem[]: items and blocks go up, then the launches.
int launch_experts(struct gpu *g, const uint32_t *list, unsigned char *const *mem, uint32_t nl)
{
	const struct moe_model_config *c = g->lw->cfg;
	uint32_t H = c->hidden_size, E = c->num_experts;
	size_t esz = dtype_size(c->weight_dtype);
	moe_witem *hi = (moe_witem *)g->eh_items.p;
	moe_wblock *hb = (moe_wblock *)g->eh_blocks.p;
	size_t i0 = g->nitems, b0 = g->nblocks, b1, b2;
	int r;

	if (!nl)
		return 0;
	if (i0 + nl > g->items_cap)
		return -EINVAL;
	for (uint32_t j = 0; j < nl; j++) {
		uint32_t e = list[j];
		moe_witem *it = &hi[i0 + j];
		bool sh = e == E;

		it->w = mem[j];
		it->inter = sh ? c->shared_intermediate_size : c->moe_intermediate_size;
		it->count = sh ? (uint32_t)g->n : g->count[e];
		it->tok = (const int32_t *)g->e_tok.p + (sh ? g->n * g->kk : g->first[e]);
		it->h = sh ? (float *)g->e_hsh.p : (float *)g->e_h.p + g->first[e] * c->moe_intermediate_size;
		it->y = sh ? (float *)g->e_ysh.p : (float *)g->e_y.p + g->first[e] * H;
		it->vec_a = (H * esz) % 16 == 0;
		it->vec_b = ((size_t)it->inter * esz) % 16 == 0 && it->inter % 4 == 0;
	}
	// phase A blocks, then phase B blocks, of the streaming experts
	size_t nb = b0;
	for (int phase = 0; phase < 2; phase++) {
		if (phase == 1)
			b1 = nb;
		for (uint32_t j = 0; j < nl; j++) {
			const moe_witem *it = &hi[i0 + j];
			uint32_t rows = phase == 0 ? it->inter : H;
			if (use_gemm(c, it->count))
				continue;
			for (uint32_t r0 = 0; r0 < rows; r0 += MOE_ROWS_PER_BLOCK) {
				if (nb >= g->blocks_cap)
					return -EINVAL;
				hb[nb].item = (uint32_t)(i0 + j);
				hb[nb].row0 = r0;
				nb++;
			}
		}
	}
	b2 = nb;
	CK(cudaMemcpyAsync((moe_witem *)g->e_items.p + i0, hi + i0, nl * sizeof(*hi), cudaMemcpyHostToDevice, g->cs));
	if (b2 > b0)
		CK(cudaMemcpyAsync((moe_wblock *)g->e_blocks.p + b0, hb + b0, (b2 - b0) * sizeof(*hb),
				   cudaMemcpyHostToDevice, g->cs));
	g->nitems = i0 + nl;
	g->nblocks = b2;
	if ((r = launch_stream_any(g, c, i0, b0, b1, b2)) < 0)
		return r;
	for (uint32_t j = 0; j < nl; j++)
		if (use_gemm(c, hi[i0 + j].count) && (r = launch_gemm(g, c, &hi[i0 + j])) < 0)
			return r;
	return 0;
}

// Wait for everything queued so far, copies and launches, and let its
// slots go.
int drain(struct gpu *g)
{
	cudaError_t a = cudaStreamSynchronize(g->xs), b = cudaStreamSynchronize(g->cs);

	if (a != cudaSuccess || b != cudaSuccess)
		tier_forget_busy(g);   // what they copied may be incomplete
	for (uint32_t s = 0; s < g->nslots; s++)
		g->slots[s].busy = false;
	if (a != cudaSuccess)
		return fail("copy stream", a);
	if (b != cudaSuccess)
		return fail("compute stream", b);
	return 0;
}

// ---- the ops -----------------------------------------------------------------

int gpu_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
	      int32_t *ids, float *w, bool dev_x)
{
	struct gpu *g = (struct gpu *)be->priv;
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, k = c->top_k;
	struct dlayer *l;
	int r;

	if (n == 0)
		return 0;
	if (n > (size_t)UINT32_MAX / E || (n + MOE_LOGIT_TOKENS - 1) / MOE_LOGIT_TOKENS > 65535)
		return -EINVAL;
	g->r_last = nullptr;
	if (!lw->router)
		return -EINVAL;
	if ((r = layer_get(g, lw, false, &l)) < 0)
		return r;
	if ((r = dgrow(g, &g->r_x, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->r_logits, n * E * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->r_scratch, n * MOE_ROUTER_SCRATCH(E) * sizeof(double))) < 0 ||
	    (r = dgrow(g, &g->r_ids, n * k * sizeof(int32_t))) < 0 || (r = dgrow(g, &g->r_w, n * k * sizeof(float))) < 0 ||
	    (r = hgrow(&g->rh_x, n * H * sizeof(float))) < 0 || (r = hgrow(&g->rh_ids, n * k * sizeof(int32_t))) < 0 ||
	    (r = hgrow(&g->rh_w, n * k * sizeof(float))) < 0)
		return r;
	if (dev_x) {
		// a client's device memory: copied on the device (any alignment)
		CK(cudaMemcpyAsync(g->r_x.p, x, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	} else {
		memcpy(g->rh_x.p, x, n * H * sizeof(float));
		CK(cudaMemcpyAsync(g->r_x.p, g->rh_x.p, n * H * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	}
	dim3 grid((E + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK,
		  (unsigned)((n + MOE_LOGIT_TOKENS - 1) / MOE_LOGIT_TOKENS));
	k_logits<<<grid, MOE_WARPS * 32, 0, g->cs>>>(l->router, (const float *)g->r_x.p, n, E, H, H % 4 == 0,
						     (float *)g->r_logits.p);
	k_select<<<(unsigned)((n + 127) / 128), 128, 0, g->cs>>>(*c, (const float *)g->r_logits.p, l->bias,
								 (double *)g->r_scratch.p, n, (int32_t *)g->r_ids.p,
								 (float *)g->r_w.p);
	CK(cudaGetLastError());
	CK(cudaMemcpyAsync(g->rh_ids.p, g->r_ids.p, n * k * sizeof(int32_t), cudaMemcpyDeviceToHost, g->cs));
	CK(cudaMemcpyAsync(g->rh_w.p, g->r_w.p, n * k * sizeof(float), cudaMemcpyDeviceToHost, g->cs));
	CK(cudaStreamSynchronize(g->cs));
	g->r_last = x;
	g->r_last_n = n;
	memcpy(ids, g->rh_ids.p, n * k * sizeof(int32_t));
	memcpy(w, g->rh_w.p, n * k * sizeof(float));
	return 0;
}

int begin(struct gpu *g, const struct moe_layer_weights *lw, const float *x, size_t n, uint32_t kk,
	  const int32_t *ids, const float *w, float *out, unsigned flags)
{
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint32_t Is = c->shared_intermediate_size;
	bool shared = lw->shared && Is > 0;
	bool dev_io = (flags & MOE_BACKEND_DEVICE_IO) != 0;
	size_t nk = n * kk, ent = nk + (shared ? n : 0);
	int r;

	if (kk == 0 || nk / kk != n || nk > UINT32_MAX)
		return -EINVAL;
	if ((r = tier_setup(g, expert_bytes(c, I))) < 0)
		return r;
	struct dlayer *cl;
	if ((r = layer_get(g, lw, shared, &cl)) < 0)
		return r;
	g->cli = (uint32_t)(cl - g->layers);
	if (E > g->cnt_cap) {
		free(g->count);
		free(g->first);
		free(g->done);
		free(g->list);
		free(g->mem);
		g->count = (uint32_t *)malloc(E * sizeof(uint32_t));
		g->first = (uint64_t *)malloc(E * sizeof(uint64_t));
		g->done = (uint8_t *)malloc(E + 1);
		g->list = (uint32_t *)malloc((E + 1) * sizeof(uint32_t));
		g->mem = (unsigned char **)malloc((E + 1) * sizeof(unsigned char *));
		g->cnt_cap = g->count && g->first && g->done && g->list && g->mem ? E : 0;
		if (!g->cnt_cap)
			return -ENOMEM;
	}
	g->items_cap = (size_t)E + 1;
	g->blocks_cap = g->items_cap * ((size_t)((I > Is ? I : Is) + H) / MOE_ROWS_PER_BLOCK + 2);
	if ((r = dgrow(g, &g->e_x, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->e_w, nk * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_pos, nk * sizeof(uint32_t))) < 0 || (r = dgrow(g, &g->e_tok, ent * sizeof(int32_t))) < 0 ||
	    (r = dgrow(g, &g->e_h, nk * I * sizeof(float))) < 0 || (r = dgrow(g, &g->e_y, nk * H * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_out, n * H * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_items, g->items_cap * sizeof(moe_witem))) < 0 ||
	    (r = dgrow(g, &g->e_blocks, g->blocks_cap * sizeof(moe_wblock))) < 0 ||
	    (r = hgrow(&g->eh_w, nk * sizeof(float))) < 0 ||
	    (r = hgrow(&g->eh_pos, nk * sizeof(uint32_t))) < 0 || (r = hgrow(&g->eh_tok, ent * sizeof(int32_t))) < 0 ||
	    (r = hgrow(&g->eh_out, n * H * sizeof(float))) < 0 ||
	    (r = hgrow(&g->eh_items, g->items_cap * sizeof(moe_witem))) < 0 ||
	    (r = hgrow(&g->eh_blocks, g->blocks_cap * sizeof(moe_wblock))) < 0)
		return r;
	if (shared && ((r = dgrow(g, &g->e_hsh, n * Is * sizeof(float))) < 0 ||
		       (r = dgrow(g, &g->e_ysh, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->e_sg, n * sizeof(float))) < 0))
		return r;

	// group the entries by expert, tokens ascending within each (a
	// counting sort); pos[t][s] is the entry of slot s of token t
	uint32_t *pos = (uint32_t *)g->eh_pos.p;
	int32_t *tok = (int32_t *)g->eh_tok.p;
	memset(g->count, 0, E * sizeof(uint32_t));
	for (size_t i = 0; i < nk; i++) {
		if (ids[i] < 0 || (uint32_t)ids[i] >= E)
			return -EINVAL;
		g->count[ids[i]]++;
	}
	uint64_t acc = 0;
	for (uint32_t e = 0; e < E; e++) {
		g->first[e] = acc;
		acc += g->count[e];
	}
	for (size_t t = 0; t < n; t++)
		for (uint32_t s = 0; s < kk; s++) {
			uint32_t e = (uint32_t)ids[t * kk + s];
			uint64_t p = g->first[e]++;
			pos[t * kk + s] = (uint32_t)p;
			tok[p] = (int32_t)t;
		}
	for (uint32_t e = 0; e < E; e++)
		g->first[e] -= g->count[e];
	// the cuBLAS experts' scratch, grown now: in run() the device tier's
	// slots are busy and cannot make room
	{
		size_t need_g = 0, need_x = 0, esz = c->weight_dtype == MOE_DTYPE_F32 ? 4 : 2;
		uint32_t nin = c->gated ? 2 : 1;

		for (uint32_t e = 0; e <= E; e++) {
			size_t m = e < E ? g->count[e] : shared ? n : 0;
			uint32_t inter = e < E ? I : Is;

			if (!m || !use_gemm(c, (uint32_t)m))
				continue;
			need_g = std::max(need_g, m * nin * inter * sizeof(float));
			need_x = std::max(need_x, m * std::max(H, inter) * esz);
		}
		if (need_g && ((r = dgrow(g, &g->g_G, need_g)) < 0 || (r = dgrow(g, &g->g_xhi, need_x)) < 0 ||
			       (esz == 2 && (r = dgrow(g, &g->g_xlo, need_x)) < 0)))
			return r;
	}
	if (shared)
		for (size_t t = 0; t < n; t++)
			tok[nk + t] = (int32_t)t;
	memset(g->done, 0, E + 1);

	// x went up for the routing just before: copy it on the device
	bool routed = (flags & MOE_BACKEND_X_ROUTED) && g->r_last == x && g->r_last_n == n &&
		      g->r_x.cap >= n * H * sizeof(float);
	// the pinned staging of x only when x has to come from host memory
	if (!dev_io && !routed) {
		if ((r = hgrow(&g->eh_x, n * H * sizeof(float))) < 0)
			return r;
		memcpy(g->eh_x.p, x, n * H * sizeof(float));
	}
	memcpy(g->eh_w.p, w, nk * sizeof(float));
	if (routed)
		CK(cudaMemcpyAsync(g->e_x.p, g->r_x.p, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	else if (dev_io)
		CK(cudaMemcpyAsync(g->e_x.p, x, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	else
		CK(cudaMemcpyAsync(g->e_x.p, g->eh_x.p, n * H * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_w.p, g->eh_w.p, nk * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_pos.p, pos, nk * sizeof(uint32_t), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_tok.p, tok, ent * sizeof(int32_t), cudaMemcpyHostToDevice, g->cs));
	if (lw->shared_gate && !cl->sgate)
		return -EIO;
	if (shared && cl->sgate && n)
		k_shared_gate<<<(unsigned)((n + 7) / 8), 256, 0, g->cs>>>(cl->sgate, (const float *)g->e_x.p, n, H,
									  (float *)g->e_sg.p);
	CK(cudaGetLastError());
	g->lw = lw;
	g->n = n;
	g->kk = kk;
	g->out = out;
	g->dev_io = dev_io;
	g->nitems = g->nblocks = 0;
	return 0;
}

int run(struct gpu *g, const struct moe_layer_weights *lw, const uint8_t *ready, bool with_shared)
{
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts;
	uint64_t eb = expert_bytes(c, c->moe_intermediate_size);
	struct moe_device_counters *dc = lw->dev;
	struct dlayer *cl = &g->layers[g->cli];
	uint32_t *list = g->list, nl = 0;
	unsigned char **mem = g->mem;
	uint64_t t0, copied = 0;
	int r;

	// the resident experts (and the shared one) first: they compute
	// while the others copy
	for (uint32_t e = 0; e < E; e++) {
		int32_t s = cl->slot_of[e];
		if (!ready[e] || !g->count[e] || g->done[e] || s < 0)
			continue;
		g->slots[s].busy = true;
		tier_touch(g, s);
		list[nl] = e;
		mem[nl++] = g->slots[s].mem;
		g->done[e] = 1;
		if (dc)
			dc->hits++;
	}
	if (with_shared && !g->done[E] && lw->shared && c->shared_intermediate_size) {
		list[nl] = E;
		mem[nl++] = (unsigned char *)cl->shared;
		g->done[E] = 1;
	}
	if ((r = launch_experts(g, list, mem, nl)) < 0)
		return r;

	// the misses: each copied into a slot on the copy stream, then
	// computed together once the copies are in
	nl = 0;
	t0 = now_ns();
	for (uint32_t e = 0; e < E; e++) {
		if (!ready[e] || !g->count[e] || g->done[e])
			continue;
		if (!lw->experts[e])
			return -EINVAL;
		int32_t s = tier_take(g);
		if (s < 0) {
			// every slot is in use by this call: compute what is
			// copied, wait for all of it, and go on with free slots
			if (nl) {
				CK(cudaEventRecord(g->copied, g->xs));
				CK(cudaStreamWaitEvent(g->cs, g->copied, 0));
				if ((r = launch_experts(g, list, mem, nl)) < 0)
					return r;
				nl = 0;
			}
			if ((r = drain(g)) < 0)
				return r;
			if ((s = tier_take(g)) < 0)
				return -ENOMEM;
		}
		// tier_take cleared the slot's old owner; it names its new one
		// only once the copy is queued
		struct slot *x = &g->slots[s];
		x->busy = true;
		CK(cudaMemcpyAsync(x->mem, lw->experts[e], eb, cudaMemcpyHostToDevice, g->xs));
		x->layer_index = (int32_t)g->cli;
		x->expert = e;
		cl->slot_of[e] = s;
		copied += eb;
		list[nl] = e;
		mem[nl++] = x->mem;
		g->done[e] = 1;
		if (dc)
			dc->misses++;
	}
	if (nl) {
		CK(cudaEventRecord(g->copied, g->xs));
		CK(cudaStreamWaitEvent(g->cs, g->copied, 0));
		if ((r = launch_experts(g, list, mem, nl)) < 0)
			return r;
	}
	// the host tier's copies may be evicted once this returns
	CK(cudaStreamSynchronize(g->xs));
	if (dc && copied) {
		dc->bytes += copied;
		dc->copy_ns += now_ns() - t0;
	}
	return 0;
}

int end(struct gpu *g, bool abandon)
{
	const struct moe_model_config *c = g->lw->cfg;
	uint32_t H = c->hidden_size;
	size_t n = g->n;
	int r = 0;

	if (!abandon) {
		bool shared = g->done[c->num_experts];
		k_combine<<<grid_for(n * H), 256, 0, g->cs>>>((const float *)g->e_y.p, (const uint32_t *)g->e_pos.p,
						   (const float *)g->e_w.p, g->kk,
						   shared ? (const float *)g->e_ysh.p : nullptr,
						   shared && g->layers[g->cli].sgate ? (const float *)g->e_sg.p : nullptr, n, H,
						   (float *)g->e_out.p);
		cudaError_t rc = cudaGetLastError();
		if (rc == cudaSuccess)
			rc = cudaMemcpyAsync(g->dev_io ? (void *)g->out : g->eh_out.p, g->e_out.p, n * H * sizeof(float),
					     g->dev_io ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost,
					     g->cs);
		if (rc != cudaSuccess)
			r = fail("combine", rc);
	}
	int d = drain(g);
	if (!r && d < 0)
		r = d;
	if (!r && !abandon)
		if (!g->dev_io)
			memcpy(g->out, g->eh_out.p, n * H * sizeof(float));
	g->lw = nullptr;
	return r;
}

} // namespace

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
		if (cudaSetDevice(i) != cudaSuccess || cudaFuncGetAttributes(&fa, k_combine) != cudaSuccess) {
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
		      &g->e_blocks, &g->g_xhi, &g->g_xlo, &g->g_G, &g->g_hhi, &g->g_hlo };
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
		fail("cudaIpcOpenMemHandle", rc);
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
