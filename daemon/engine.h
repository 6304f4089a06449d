/* SPDX-License-Identifier: MIT */
/*
 * The engine: a store, a backend, and the layers' weights it has loaded.
 * moed, `moectl forward --model` and the tests all run MoE layers through
 * it.  Experts are read from the store when a batch first needs them (each
 * blob's checksum verified) and stay resident; the expert cache and paging
 * replace that in the cache issue.
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
#include "store.h"

struct moe_engine_options {
	const char *backend;   /* "auto", "cpu", "cuda"; NULL: "auto" */
	uint32_t threads;      /* CPU threads; 0: one per online CPU */
};

/* Forward flags. */
#define MOE_FWD_ALL_EXPERTS (1u << 0)  /* every expert for every token, weight 1/E
					* (the dense comparison of the demo) */

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
 * model (message says which are), -EIO for an expert that fails its
 * checksum (message names layer and expert), -ENOMEM.
 */
int moe_engine_forward(struct moe_engine *e, uint32_t layer, const float *x, size_t n,
		       float *out, int32_t *ids, float *w, unsigned flags, struct moe_err *err);

/*
 * Tokens routed to each expert of @layer since open, into counts[E].
 * -ENOENT for a layer that is not an MoE layer.
 */
int moe_engine_expert_load(const struct moe_engine *e, uint32_t layer, uint64_t *counts);

#endif
