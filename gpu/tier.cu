// SPDX-License-Identifier: MIT
// The CUDA backend's device memory: the working buffers (grown on demand,
// giving back device-tier slots when the device is full), the layers'
// always-resident weights, and the device tier, an LRU cache of experts in
// slots of one expert each, allocated by chunks.
#include <errno.h>
#include <stdlib.h>

#include "device_impl.cuh"

// The tier grows by chunks of about this many bytes (at least one slot).
#define MOE_CHUNK_BYTES (1ull << 30)

namespace moe_gpu __attribute__((visibility("hidden"))) {

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
			return fail(g, "cudaMalloc", rc);
	}
}

// Grow buffer @b to @bytes, allocating with @alloc(void **, size_t) and
// freeing with @release (work in flight may use the old one: wait for it).
template <typename Buf, typename Alloc, typename Release>
int grow(struct gpu *g, Buf *b, size_t bytes, Alloc alloc, Release release)
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
	return grow(g, b, bytes, [g](void **p, size_t n) { return dmalloc(g, p, n); },
		    [](void *p) { cudaFree(p); });
}

int hgrow(struct gpu *g, hbuf *b, size_t bytes)
{
	return grow(g, b, bytes, [g](void **p, size_t n) {
		cudaError_t rc = cudaMallocHost(p, n);
		return rc == cudaSuccess ? 0 : fail(g, "cudaMallocHost", rc);
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
		if ((r = dreplace(g, &l->shared, shared_bytes(c), lw->shared)) < 0)
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
		gpu_log(g, 3, "cuda backend: the device tier (%llu bytes) holds no expert of %llu bytes",
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

} // namespace moe_gpu
