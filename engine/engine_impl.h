/* SPDX-License-Identifier: MIT */
/*
 * The engine's internals, shared by engine.c (open and close, layers, the
 * host tier, pins, figures) and forward.c (moe_engine_forward's phases).
 * Not for use outside engine/engine.c and engine/forward.c.
 */
#ifndef MOE_ENGINE_IMPL_H
#define MOE_ENGINE_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "engine.h"
#include "trace.h"

struct engine_layer {
	bool loaded;                /* router (and shared expert) read */
	float *router;              /* [E][H] */
	float *bias;                /* [E] or NULL */
	float *shared_gate;         /* [H] or NULL */
	void *shared;               /* shared blob or NULL */
	uint64_t *load;             /* [E] tokens routed to each expert */
	uint8_t *predicted;         /* [E] the last prediction for this layer, or NULL */
	bool have_prediction;
	struct moe_engine_layer_stats st;
	struct moe_device_counters dev; /* the backend's device tier counts here */
};

/* A host-tier slot and the read that fills it. */
struct slot {
	struct moe_pager_load ld;
	struct moe_engine *e;
	uint8_t *mem;
	uint32_t key;
	bool inflight;              /* ld submitted and not yet reaped */
	bool waited;                /* a forward waits for it and settles it itself */
	bool prefetched;            /* filled by a prefetch and not used since */
};

struct moe_engine {
	struct moe_store *store;
	struct moe_backend *backend;
	const struct moe_model_config *cfg;
	struct engine_layer *layers;    /* one per MoE layer of the store */
	void *staging;                  /* a blob in store layout, before blob_prepare */
	size_t staging_bytes;
	int32_t *ids;                   /* scratch routing for callers passing NULL */
	float *w;
	size_t route_cap;               /* entries in ids/w */

	/* the host tier */
	struct moe_cache *host;
	enum moe_cache_policy policy;
	uint8_t *arena;                 /* slots * slot_bytes */
	size_t arena_len;
	bool arena_registered;          /* page-locked by the backend */
	uint64_t slot_bytes, budget, fixed;
	uint32_t nslots;
	struct slot *slots;
	uint32_t *inflight;             /* slots with a read in flight */
	uint32_t ninflight;
	uint32_t pin_hot;
	uint64_t forwards;

	/* per forward scratch, [E] or [slots] */
	uint8_t *need, *ready;
	uint32_t *uniq, *deferred, *pending;
	const void **ptrs;
	struct moe_pager_load **waitv;
	int32_t *pred_ids;
	float *pred_w;
	size_t pred_cap;

	struct moe_pager *pager;
	bool prefetch;
	struct moe_trace_writer *trace;
	moe_log_fn log;
	void *log_ctx;
};

/* Calls from forward.c into engine.c. */

/* The store's layer index of checkpoint layer @layer, or -ENOENT naming the
 * MoE layers when it is out of range or dense. */
int engine_find_layer(const struct moe_engine *e, uint32_t layer, struct moe_err *err);
/* Read layer index @li's router (and bias, shared gate, shared expert) on
 * its first use; 0 when already loaded. */
int engine_layer_load(struct moe_engine *e, uint32_t li, struct moe_err *err);
/* The host tier's key of expert @x of layer index @li. */
uint32_t engine_key_of(const struct moe_engine *e, uint32_t li, uint32_t x);
/* Have the pager read @key into slot @si (a prefetch when @prefetch). */
int engine_slot_read(struct moe_engine *e, uint32_t si, uint32_t key, bool prefetch);
/* Settle slot @si's read when it is done: resident, or (failed) absent. */
void engine_slot_reaped(struct moe_engine *e, uint32_t si);
/* Reap every read that has finished. */
void engine_reap(struct moe_engine *e);
/* A slot for @key (ABSENT), evicting one if need be; -ENOSPC when every slot
 * is pinned, in use or loading. */
int engine_slot_take(struct moe_engine *e, uint32_t key);

#endif
