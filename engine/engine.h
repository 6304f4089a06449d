/* SPDX-License-Identifier: MIT */
/*
 * The engine: a store, a backend, an expert cache and a pager.  moed,
 * `moectl forward --model` and the tests all run MoE layers through it.
 *
 * Memory: every MoE layer's router (and correction bias, shared-expert
 * gate) and shared experts are always resident once the layer is first
 * used; routed experts live in the host tier, a fixed array of equal slots
 * (the host budget minus the always-resident part, divided by one expert's
 * size), and come in from the store through the io_uring pager when a
 * batch needs them, while the experts already resident compute.  When a
 * batch needs more experts than there are slots it runs in waves.  The
 * eviction policy (cache.h) picks which resident expert makes room.
 * Optionally, after routing layer L the engine routes the same input with
 * layer L+1's router and prefetches the experts that predicts.
 *
 * Not thread-safe: one caller at a time per engine.
 */
#ifndef MOE_ENGINE_H
#define MOE_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "err.h"
#include "model.h"
#include "pager.h"
#include "store.h"

/*
 * Bounds of the engine's options: the one table that moed.conf (daemon/conf.c)
 * and moectl forward both check against (the pager's are in pager.h).
 */
#define MOE_ENGINE_THREADS_MAX 4096u          /* beyond any machine moed runs on */
/* Cache sizes in MiB: 16 TiB, beyond any machine, and far from overflowing a
 * byte count (2^44). */
#define MOE_ENGINE_CACHE_MB_MAX (UINT64_C(1) << 24)
#define MOE_ENGINE_HOST_MB_DEFAULT 4096u      /* moed's host tier when not configured */
#define MOE_ENGINE_PIN_HOT_MAX 65536u         /* hot pins: more than any layer's experts */

struct moe_engine_options {
	const char *backend;   /* "auto", "cpu", "cuda"; NULL: "auto" */
	uint32_t threads;      /* CPU threads; 0: one per online CPU */
	uint64_t device_bytes; /* device tier of the CUDA backend; 0: all free
				* device memory minus a reserve */
	uint64_t host_bytes;   /* host budget for weights: routers, shared experts
				* and the routed-expert slots; 0: no limit */
	const char *policy;    /* eviction: "auto" (= "freq"), "lru", "freq"; NULL: auto */
	const char *const *pin;  /* NULL-terminated "L:E" / "L:*" (checkpoint layer L)
				  * experts never evicted, loaded at open; may be NULL */
	uint32_t pin_hot;      /* also keep the N experts with the most observed load
				* pinned (re-chosen every 64 forwards) */
	bool prefetch;         /* predict layer L+1's experts after routing L */
	bool verify_open;      /* check every checksum of the store at open and at
				* moe_engine_reopen_store() (store.verify = "open") */
	struct moe_pager_options pager;
	moe_log_fn log;        /* log lines (pager warnings, failed reads, the
				* backend's failed device calls); may be NULL */
	void *log_ctx;
};

/* Figures of one MoE layer, or of all (moe_engine_stats.total). */
struct moe_engine_layer_stats {
	uint64_t forwards;       /* moe_engine_forward calls */
	uint64_t tokens;
	uint64_t host_hits;      /* expert uses (one per expert per batch) found resident */
	uint64_t host_misses;    /* expert uses that had to wait for the store */
	uint64_t device_hits;    /* expert uses found in the device tier (CUDA backend) */
	uint64_t device_misses;  /* expert uses copied from the host tier to the device */
	uint64_t device_bytes;   /* bytes of those copies */
	uint64_t device_copy_ns; /* time of those copies */
	uint64_t loads;          /* blobs read by the pager for this layer */
	uint64_t load_bytes;
	uint64_t load_failures;  /* I/O errors and checksum mismatches */
	uint64_t evictions;      /* experts of this layer evicted */
	uint64_t stall_ns;       /* time a forward waited for reads */
	uint64_t busy_ns;        /* time in moe_engine_forward */
	uint64_t prefetches;     /* experts prefetched into this layer */
	uint64_t prefetch_used;  /* of which used by a batch before eviction */
	uint64_t predicted;      /* experts predicted for this layer */
	uint64_t predicted_hit;  /* of which the batch then used */
	uint64_t needed;         /* experts used by batches that had a prediction */
};

struct moe_engine_stats {
	struct moe_engine_layer_stats total;
	uint64_t host_budget;    /* bytes; 0: no limit */
	uint64_t host_fixed;     /* routers and shared experts of every MoE layer */
	uint64_t slot_bytes;     /* one routed expert in the host tier */
	uint32_t slots;          /* routed-expert slots in the host tier */
	uint32_t slots_used;
	uint32_t pinned;
	const char *policy;
	struct moe_pager_stats pager;
};

/* Forward flags. */
#define MOE_FWD_ALL_EXPERTS (1u << 0)  /* every expert for every token, weight 1/E
					* (the dense comparison of the demo) */
#define MOE_FWD_DEVICE_IO (1u << 1)    /* x and out are device pointers (float32)
					* of this process, e.g. from
					* moe_engine_device_map(); needs a
					* backend with device memory */

struct moe_engine;

int moe_engine_open(const char *store_path, const struct moe_engine_options *opt,
		    struct moe_engine **ret, struct moe_err *err);
void moe_engine_close(struct moe_engine *e);

const struct moe_model_config *moe_engine_config(const struct moe_engine *e);
const struct moe_store *moe_engine_store(const struct moe_engine *e);
const struct moe_backend *moe_engine_backend(const struct moe_engine *e);

/*
 * Run MoE layer @layer (the checkpoint's number) on @n tokens x[n][H]
 * float32, writing out[n][H].  @ids and @w (n*k each, may be NULL) receive
 * the routing.  Errors: -ENOENT for a layer that is not an MoE layer of the
 * model (message says which are), -EIO for an expert that cannot be read,
 * -EBADMSG for one that fails its checksum (the message names layer and
 * expert; the next forward that needs it reads it again; moed completes
 * such a request with -MOE_E_CHECKSUM), -ENOMEM.
 */
int moe_engine_forward(struct moe_engine *e, uint32_t layer, const float *x, size_t n,
		       float *out, int32_t *ids, float *w, unsigned flags, struct moe_err *err);

/*
 * The cache and pager figures: totals in *st, and per MoE layer (store
 * order, hdr.num_moe_layers entries) in @layers if not NULL.
 */
void moe_engine_get_stats(struct moe_engine *e, struct moe_engine_stats *st,
			  struct moe_engine_layer_stats *layers);

/* The same figures as a JSON object (what moed's stats command serves):
 * "host_cache", "pager", "store" (its health: "state", "read_errors",
 * "checksum_errors", "reopens", "why"), "total" and "layers" (one object
 * per MoE layer with its "layer" number).  A malloc'ed string, or NULL without memory. */
char *moe_engine_stats_json(struct moe_engine *e);

/* Write a routing trace (moe-trace(5)) of every forward from now on to
 * @path; NULL stops and closes it.  Errors name the file. */
int moe_engine_trace(struct moe_engine *e, const char *path, struct moe_err *err);

/* Fault injection for tests: the next @count reads of expert @expert of
 * checkpoint layer @layer fail (I/O error, short read or checksum
 * mismatch), or with MOE_FAULT_OPEN the next @count reopens of the store
 * (moe_pager_inject). */
int moe_engine_inject_fault(struct moe_engine *e, enum moe_pager_fault f, uint32_t layer,
			    uint32_t expert, uint32_t count);

/*
 * The store's health (pager.h): with @check, the open file is compared
 * with its header and its path first.  Safe from any thread, during a
 * forward too.
 */
void moe_engine_store_health(struct moe_engine *e, bool check, struct moe_store_health *h);

/*
 * Recovery of a store that changed or was damaged under the engine: when
 * the file at the store's path is the same store again, whole (with
 * @verify: every checksum), the engine reads from it from now on and the
 * health is ok again.  The experts in memory stay (their checksums are
 * the file's).  moe_store_reopen()'s and moe_pager_reopen()'s errors; on
 * error the state is unchanged.  Safe from any thread, during a forward
 * too (a read in flight ends on the old file).
 */
int moe_engine_reopen_store(struct moe_engine *e, bool verify, struct moe_err *err);

/*
 * Tokens routed to each expert of @layer since open, into counts[E].
 * -ENOENT for a layer that is not an MoE layer.
 */
/*
 * Map another process's device memory: the allocation of @handle (64 bytes,
 * a cudaIpcMemHandle_t) into this process, *base its address here and
 * *bytes its size.  Safe from any thread.  -EOPNOTSUPP when the backend has
 * no device memory (with why in @err).
 */
int moe_engine_device_map(struct moe_engine *e, const void *handle, void **base, uint64_t *bytes,
			  struct moe_err *err);

/* Does the backend take device memory (moe_engine_device_map)? */
bool moe_engine_has_device_memory(const struct moe_engine *e);
void moe_engine_device_unmap(struct moe_engine *e, void *base);

int moe_engine_expert_load(const struct moe_engine *e, uint32_t layer, uint64_t *counts);

/*
 * Make @pin (NULL-terminated "L:E" / "L:*", as moe_engine_options.pin; NULL
 * or empty: none) the explicitly pinned experts, and keep the @pin_hot
 * busiest experts pinned too (0: none), as if the engine had been opened
 * with them: experts no longer named are unpinned, newly named ones are
 * read in as prefetches, and the hot pins are re-chosen now from the load
 * seen so far.  Every pin is checked first: -EINVAL (syntax, expert out of
 * range), -ENOENT (no such MoE layer) or -ENOSPC (more pinned experts than
 * host-tier slots) with a message naming the pin, and then nothing has
 * changed; -ENOMEM.  Like every call that is not marked otherwise: one
 * caller at a time, not during a forward.
 */
int moe_engine_set_pins(struct moe_engine *e, const char *const *pin, uint32_t pin_hot,
			struct moe_err *err);

#endif
