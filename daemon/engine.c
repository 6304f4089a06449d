/* SPDX-License-Identifier: MIT */
/*
 * The engine: routes a batch, brings in the experts it needs from the store
 * (checksums verified), and runs the layer on the backend.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "engine.h"

struct engine_layer {
	bool loaded;                /* router (and shared expert) read */
	float *router;              /* [E][H] */
	float *bias;                /* [E] or NULL */
	float *shared_gate;         /* [H] or NULL */
	void *shared;               /* shared blob or NULL */
	void **experts;             /* [E], NULL until first needed */
	uint64_t *load;             /* [E] tokens routed to each expert */
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
};

static void layer_free(struct engine_layer *l, uint32_t E)
{
	free(l->router);
	free(l->bias);
	free(l->shared_gate);
	free(l->shared);
	if (l->experts)
		for (uint32_t e = 0; e < E; e++)
			free(l->experts[e]);
	free(l->experts);
	free(l->load);
}

void moe_engine_close(struct moe_engine *e)
{
	if (!e)
		return;
	if (e->layers)
		for (uint32_t i = 0; i < e->store->hdr.num_moe_layers; i++)
			layer_free(&e->layers[i], e->cfg->num_experts);
	free(e->layers);
	free(e->staging);
	free(e->ids);
	free(e->w);
	moe_backend_close(e->backend);
	moe_store_close(e->store);
	free(e);
}

int moe_engine_open(const char *store_path, const struct moe_engine_options *opt,
		    struct moe_engine **ret, struct moe_err *err)
{
	struct moe_backend_options bo = { .threads = opt ? opt->threads : 0 };
	struct moe_engine *e;
	int r;

	e = calloc(1, sizeof(*e));
	if (!e)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = moe_store_open(store_path, &e->store, err);
	if (r < 0)
		goto fail;
	e->cfg = &e->store->cfg;
	e->layers = calloc(e->store->hdr.num_moe_layers, sizeof(*e->layers));
	if (!e->layers) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	r = moe_backend_open(opt && opt->backend ? opt->backend : "auto", &bo, &e->backend, err);
	if (r < 0)
		goto fail;
	*ret = e;
	return 0;
fail:
	moe_engine_close(e);
	return r;
}

const struct moe_model_config *moe_engine_config(const struct moe_engine *e)
{
	return e->cfg;
}

const struct moe_store *moe_engine_store(const struct moe_engine *e)
{
	return e->store;
}

const struct moe_backend *moe_engine_backend(const struct moe_engine *e)
{
	return e->backend;
}

/* "1-3, 5, 7-9": the MoE layers, for error messages. */
static void layer_list(const struct moe_store *s, char *buf, size_t len)
{
	size_t used = 0;
	uint32_t n = s->hdr.num_moe_layers;

	buf[0] = '\0';
	for (uint32_t i = 0; i < n && used + 24 < len;) {
		uint32_t j = i;
		while (j + 1 < n && s->layers[j + 1].layer == s->layers[j].layer + 1)
			j++;
		if (j > i)
			used += (size_t)snprintf(buf + used, len - used, "%s%u-%u", i ? ", " : "",
						 s->layers[i].layer, s->layers[j].layer);
		else
			used += (size_t)snprintf(buf + used, len - used, "%s%u", i ? ", " : "",
						 s->layers[i].layer);
		i = j + 1;
	}
}

static int find_layer(const struct moe_engine *e, uint32_t layer, struct moe_err *err)
{
	char list[256];
	int li = moe_store_layer_index(e->store, layer);

	if (li >= 0)
		return li;
	layer_list(e->store, list, sizeof(list));
	if (layer >= e->cfg->num_hidden_layers)
		return moe_err_set(err, -ENOENT,
				   "layer %u is out of range: the model has %u layers (0-%u); its MoE layers are %s",
				   layer, e->cfg->num_hidden_layers, e->cfg->num_hidden_layers - 1, list);
	return moe_err_set(err, -ENOENT, "layer %u is a dense layer of this %s model, not an MoE layer; its MoE layers are %s",
			   layer, moe_arch_name(e->cfg->arch), list);
}

/*
 * Memory for a weight blob.  Blobs of 2 MiB and more are 2 MiB aligned and
 * asked to be backed by transparent huge pages: streaming an expert through
 * 4 KB pages costs a TLB walk per row and stops the prefetchers at every
 * page, measured at 40% of the bandwidth on the decode path.
 */
static void *blob_alloc(uint64_t bytes)
{
	size_t huge = 2u << 20, align = bytes >= huge ? huge : 4096;
	size_t len = (size_t)((bytes + align - 1) / align * align);
	void *p;

	if (posix_memalign(&p, align, len ? len : align))
		return NULL;
	if (align == huge)
		madvise(p, len, MADV_HUGEPAGE);   /* advice only: failure is fine */
	return p;
}

/*
 * Read a blob of intermediate size @I (@store_bytes in the store) with
 * @read, in the backend's resident layout: directly when the backend uses
 * the store's layout, else through the staging buffer and blob_prepare.
 * Returns the new blob in *ret.
 */
static int blob_load(struct moe_engine *e, uint32_t I, uint64_t store_bytes,
		     int (*read)(const struct moe_store *s, uint32_t li, uint32_t x, void *buf,
				 struct moe_err *err),
		     uint32_t li, uint32_t x, void **ret, struct moe_err *err)
{
	const struct moe_backend_ops *ops = e->backend->ops;
	uint64_t bytes = ops->blob_prepare ? ops->blob_bytes(e->cfg, I) : store_bytes;
	void *blob = blob_alloc(bytes), *dst = blob;
	int r;

	if (!blob)
		return -ENOMEM;
	if (ops->blob_prepare) {
		if (e->staging_bytes < store_bytes) {
			free(e->staging);
			e->staging = blob_alloc(store_bytes);
			e->staging_bytes = e->staging ? store_bytes : 0;
			if (!e->staging) {
				free(blob);
				return -ENOMEM;
			}
		}
		dst = e->staging;
	}
	r = read(e->store, li, x, dst, err);
	if (r < 0) {
		free(blob);
		return r;
	}
	if (ops->blob_prepare)
		ops->blob_prepare(e->cfg, I, e->staging, blob);
	*ret = blob;
	return 0;
}

static int read_shared(const struct moe_store *s, uint32_t li, uint32_t x, void *buf,
		       struct moe_err *err)
{
	(void)x;
	return moe_store_read_shared(s, li, buf, err);
}

static int layer_load(struct moe_engine *e, uint32_t li, struct moe_err *err)
{
	const struct moe_model_config *c = e->cfg;
	struct engine_layer *l = &e->layers[li];
	int r;

	if (l->loaded)
		return 0;
	l->router = malloc((size_t)c->num_experts * c->hidden_size * sizeof(float));
	l->bias = c->has_bias ? malloc(c->num_experts * sizeof(float)) : NULL;
	l->shared_gate = c->shared_gate ? malloc(c->hidden_size * sizeof(float)) : NULL;
	l->experts = l->experts ? l->experts : calloc(c->num_experts, sizeof(void *));
	l->load = l->load ? l->load : calloc(c->num_experts, sizeof(uint64_t));
	if (!l->router || (c->has_bias && !l->bias) || (c->shared_gate && !l->shared_gate) ||
	    !l->experts || !l->load)
		goto nomem;
	r = moe_store_read_router(e->store, li, l->router, l->bias, l->shared_gate, err);
	if (r < 0)
		goto fail;
	if (e->store->layers[li].flags & MOE_STORE_LAYER_HAS_SHARED) {
		r = blob_load(e, c->shared_intermediate_size, e->store->layers[li].shared_bytes,
			      read_shared, li, 0, &l->shared, err);
		if (r == -ENOMEM)
			goto nomem;
		if (r < 0)
			goto fail;
	}
	l->loaded = true;
	return 0;
nomem:
	r = moe_err_set(err, -ENOMEM, "out of memory loading layer %u", e->store->layers[li].layer);
fail:
	free(l->router);
	free(l->bias);
	free(l->shared_gate);
	free(l->shared);
	l->router = NULL;
	l->bias = l->shared_gate = NULL;
	l->shared = NULL;
	return r;
}

/* Read every expert named in ids[0..count) that is not resident yet. */
static int experts_load(struct moe_engine *e, uint32_t li, const int32_t *ids, size_t count,
			struct moe_err *err)
{
	struct engine_layer *l = &e->layers[li];

	for (size_t i = 0; i < count; i++) {
		uint32_t x = (uint32_t)ids[i];
		int r;

		if (l->experts[x])
			continue;
		/* on failure the expert stays absent: the next request reads it again */
		r = blob_load(e, e->cfg->moe_intermediate_size, e->store->hdr.expert_bytes,
			      moe_store_read_expert, li, x, &l->experts[x], err);
		if (r == -ENOMEM)
			return moe_err_set(err, -ENOMEM, "out of memory loading layer %u expert %u",
					   e->store->layers[li].layer, x);
		if (r < 0)
			return r;
	}
	return 0;
}

int moe_engine_forward(struct moe_engine *e, uint32_t layer, const float *x, size_t n,
		       float *out, int32_t *ids, float *w, unsigned flags, struct moe_err *err)
{
	const struct moe_model_config *c = e->cfg;
	struct moe_layer_weights lw;
	struct engine_layer *l;
	uint32_t k = c->top_k, kk = k;
	size_t need;
	int li, r;

	li = find_layer(e, layer, err);
	if (li < 0)
		return li;
	if (n == 0)
		return 0;
	r = layer_load(e, (uint32_t)li, err);
	if (r < 0)
		return r;
	l = &e->layers[li];
	if (flags & MOE_FWD_ALL_EXPERTS)
		kk = c->num_experts;
	need = n * (kk > k ? kk : k);
	if (need > e->route_cap) {
		int32_t *ni = realloc(e->ids, need * sizeof(*ni));
		if (ni)
			e->ids = ni;
		float *nw = ni ? realloc(e->w, need * sizeof(*nw)) : NULL;
		if (!ni || !nw)
			return moe_err_set(err, -ENOMEM, "out of memory for %zu tokens", n);
		e->w = nw;
		e->route_cap = need;
	}
	lw = (struct moe_layer_weights){
		.cfg = c, .layer = layer, .router = l->router, .bias = l->bias,
		.shared_gate = l->shared_gate, .shared = l->shared,
		.experts = (const void *const *)l->experts,
	};
	r = e->backend->ops->route(e->backend, &lw, x, n, e->ids, e->w);
	if (r < 0)
		return moe_err_set(err, r, "layer %u: routing failed: %s", layer, strerror(-r));
	for (size_t i = 0; i < n * k; i++)
		l->load[e->ids[i]]++;
	if (ids)
		memcpy(ids, e->ids, n * k * sizeof(*ids));
	if (w)
		memcpy(w, e->w, n * k * sizeof(*w));
	if (flags & MOE_FWD_ALL_EXPERTS) {
		/* the dense comparison: every expert, equal weights */
		for (size_t t = 0; t < n; t++)
			for (uint32_t s = 0; s < kk; s++) {
				e->ids[t * kk + s] = (int32_t)s;
				e->w[t * kk + s] = 1.0f / (float)kk;
			}
	}
	r = experts_load(e, (uint32_t)li, e->ids, n * kk, err);
	if (r < 0)
		return r;
	r = e->backend->ops->experts(e->backend, &lw, x, n, kk, e->ids, e->w, out);
	if (r < 0)
		return moe_err_set(err, r, "layer %u: expert computation failed: %s", layer, strerror(-r));
	return 0;
}

int moe_engine_expert_load(const struct moe_engine *e, uint32_t layer, uint64_t *counts)
{
	int li = moe_store_layer_index(e->store, layer);

	if (li < 0)
		return -ENOENT;
	if (e->layers[li].load)
		memcpy(counts, e->layers[li].load, e->cfg->num_experts * sizeof(uint64_t));
	else
		memset(counts, 0, e->cfg->num_experts * sizeof(uint64_t));
	return 0;
}
