/* SPDX-License-Identifier: MIT */
/*
 * The engine: routes a batch, finds its experts in the host tier of the
 * expert cache or has the pager read them, computes the resident ones while
 * the others arrive, and runs the layer on the backend.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>

#include "clock.h"
#include "engine_impl.h"

#define HUGE_2M (2u << 20)

static void layer_free(struct engine_layer *l)
{
	free(l->router);
	free(l->bias);
	free(l->shared_gate);
	free(l->shared);
	free(l->load);
	free(l->predicted);
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

int engine_find_layer(const struct moe_engine *e, uint32_t layer, struct moe_err *err)
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
static int blob_load(struct moe_engine *e, enum moe_dtype dt, uint32_t I, uint64_t store_bytes,
		     int (*read)(const struct moe_store *s, uint32_t li, uint32_t x, void *buf,
				 struct moe_err *err),
		     uint32_t li, uint32_t x, void **ret, struct moe_err *err)
{
	const struct moe_backend_ops *ops = e->backend->ops;
	uint64_t bytes = ops->blob_prepare ? ops->blob_bytes(e->cfg, dt, I) : store_bytes;
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
		ops->blob_prepare(e->cfg, dt, I, e->staging, blob);
	*ret = blob;
	return 0;
}

static int read_shared(const struct moe_store *s, uint32_t li, uint32_t x, void *buf,
		       struct moe_err *err)
{
	(void)x;
	return moe_store_read_shared(s, li, buf, err);
}

int engine_layer_load(struct moe_engine *e, uint32_t li, struct moe_err *err)
{
	const struct moe_model_config *c = e->cfg;
	struct engine_layer *l = &e->layers[li];
	int r;

	if (l->loaded)
		return 0;
	l->router = malloc((size_t)c->num_experts * c->hidden_size * sizeof(float));
	l->bias = c->has_bias ? malloc(c->num_experts * sizeof(float)) : NULL;
	l->shared_gate = c->shared_gate ? malloc(c->hidden_size * sizeof(float)) : NULL;
	if (!l->router || (c->has_bias && !l->bias) || (c->shared_gate && !l->shared_gate))
		goto nomem;
	r = moe_store_read_router(e->store, li, l->router, l->bias, l->shared_gate, err);
	if (r < 0)
		goto fail;
	if (e->store->layers[li].flags & MOE_STORE_LAYER_HAS_SHARED) {
		r = blob_load(e, c->shared_dtype, c->shared_intermediate_size, e->store->layers[li].shared_bytes,
			      read_shared, li, 0, &l->shared, err);
		/* the staging copy is needed only while a layer comes in */
		free(e->staging);
		e->staging = NULL;
		e->staging_bytes = 0;
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


/* ------------------------------------------------------------------ the host tier */

uint32_t engine_key_of(const struct moe_engine *e, uint32_t li, uint32_t x)
{
	return li * e->cfg->num_experts + x;
}

/* The pager's sink: a chunk of the blob into the slot, in the backend's layout. */
static void slot_sink(void *ctx, const void *chunk, uint64_t off, uint64_t len)
{
	struct slot *s = ctx;
	struct moe_engine *e = s->e;
	const struct moe_backend_ops *ops = e->backend->ops;

	if (ops->blob_prepare_range)
		ops->blob_prepare_range(e->cfg, e->cfg->weight_dtype, e->cfg->moe_intermediate_size, chunk, off, len, s->mem);
	else
		memcpy(s->mem + off, chunk, len);
}

int engine_slot_read(struct moe_engine *e, uint32_t si, uint32_t key, bool prefetch)
{
	struct slot *s = &e->slots[si];
	uint32_t E = e->cfg->num_experts;
	int r;

	s->key = key;
	s->prefetched = prefetch;
	s->ld = (struct moe_pager_load){ .li = key / E, .expert = key % E, .prefetch = prefetch,
					 .sink = slot_sink, .sink_ctx = s };
	r = moe_pager_submit(e->pager, &s->ld);
	if (r < 0)
		return r;
	s->inflight = true;
	e->inflight[e->ninflight++] = si;
	if (prefetch)
		e->layers[key / E].st.prefetches++;
	return 0;
}

/* Settle a read that is done: the expert is resident, or (failed) gone. */
void engine_slot_reaped(struct moe_engine *e, uint32_t si)
{
	struct slot *s = &e->slots[si];
	struct engine_layer *l = &e->layers[s->key / e->cfg->num_experts];

	if (!s->inflight)
		return;
	for (uint32_t i = 0; i < e->ninflight; i++)
		if (e->inflight[i] == si) {
			e->inflight[i] = e->inflight[--e->ninflight];
			break;
		}
	s->inflight = false;
	l->st.loads++;
	if (s->ld.status == 0) {
		l->st.load_bytes += e->store->hdr.expert_bytes;
		moe_cache_loaded(e->host, s->key);
	} else {
		l->st.load_failures++;
		moe_cache_remove(e->host, s->key);
	}
}

/* Reap every read that has finished. */
void engine_reap(struct moe_engine *e)
{
	for (uint32_t i = 0; i < e->ninflight;) {
		uint32_t si = e->inflight[i];

		if (!e->slots[si].waited &&
		    __atomic_load_n(&e->slots[si].ld.status, __ATOMIC_ACQUIRE) != MOE_PAGER_PENDING)
			engine_slot_reaped(e, si);      /* moves the last entry here */
		else
			i++;
	}
}

/* A slot for @key (ABSENT): -ENOSPC when every slot is pinned, in use or loading. */
int engine_slot_take(struct moe_engine *e, uint32_t key)
{
	uint32_t victim = MOE_CACHE_NONE;
	int si = moe_cache_insert(e->host, key, &victim);

	if (si >= 0 && victim != MOE_CACHE_NONE)
		e->layers[victim / e->cfg->num_experts].st.evictions++;
	return si;
}

/*
 * Parse the pin @spec ("L:E" or "L:*", L the checkpoint's layer number)
 * against the model: its layer index in *ret_li and its experts
 * [*ret_first, *ret_last].  0, or -EINVAL / -ENOENT with a message that
 * names the pin.  Changes nothing.
 */
static int pin_spec(const struct moe_engine *e, const char *spec, int *ret_li, uint32_t *ret_first,
		    uint32_t *ret_last, struct moe_err *err)
{
	uint32_t E = e->cfg->num_experts;
	unsigned long layer, x = 0;
	bool all = false;
	char *end;
	int li;

	errno = 0;
	layer = strtoul(spec, &end, 10);
	if (end == spec || *end != ':' || errno || layer > UINT32_MAX)
		return moe_err_set(err, -EINVAL, "pin \"%s\": expected LAYER:EXPERT or LAYER:*", spec);
	if (strcmp(end + 1, "*") == 0) {
		all = true;
	} else {
		const char *xs = end + 1;

		x = strtoul(xs, &end, 10);
		if (end == xs || *end || errno || x >= E)
			return moe_err_set(err, -EINVAL, "pin \"%s\": expert must be * or 0-%u", spec, E - 1);
	}
	li = engine_find_layer(e, (uint32_t)layer, err);
	if (li < 0)
		return moe_err_prefix(err, li, "pin \"%s\"", spec);
	*ret_li = li;
	*ret_first = all ? 0 : (uint32_t)x;
	*ret_last = all ? E - 1 : (uint32_t)x;
	return 0;
}

static int pin_parse(struct moe_engine *e, const char *spec, struct moe_err *err)
{
	uint32_t first, last;
	int li, r;

	r = pin_spec(e, spec, &li, &first, &last, err);
	if (r < 0)
		return r;
	for (uint32_t i = first; i <= last; i++) {
		r = moe_cache_pin(e->host, engine_key_of(e, (uint32_t)li, i), true);
		if (r < 0)
			return moe_err_set(err, r, "pin \"%s\": more pinned experts than the %u slots of the host budget",
					   spec, e->nslots);
	}
	return 0;
}

/*
 * Let the backend page-lock the host tier (the CUDA backend copies experts
 * from it to the device at full speed only from page-locked memory).  Only
 * a tier of at most half the machine's memory: locking pins every page.
 */
static void arena_register(struct moe_engine *e)
{
	const struct moe_backend_ops *ops = e->backend->ops;
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
	char msg[256];
	int r;

	if (!ops->host_register || !e->arena_len)
		return;
	if (pages > 0 && psz > 0 && e->arena_len > (uint64_t)pages * (uint64_t)psz / 2) {
		snprintf(msg, sizeof(msg), "the host cache (%zu MiB) is not page-locked: it is over half of "
			 "this machine's memory; copies to the device go from pageable memory (set "
			 "cache.host_mb)", e->arena_len >> 20);
		if (e->log)
			e->log(e->log_ctx, 5, msg);
		return;
	}
	r = ops->host_register(e->backend, e->arena, e->arena_len);
	if (r < 0) {
		snprintf(msg, sizeof(msg), "the host cache (%zu MiB) could not be page-locked (%s); copies "
			 "to the device go from pageable memory", e->arena_len >> 20, strerror(-r));
		if (e->log)
			e->log(e->log_ctx, 5, msg);
		return;
	}
	e->arena_registered = true;
}

/* Bytes that are always resident: routers, biases, shared gates, shared experts. */
static uint64_t fixed_bytes(const struct moe_engine *e)
{
	const struct moe_model_config *c = e->cfg;
	const struct moe_backend_ops *ops = e->backend->ops;
	uint64_t per = (uint64_t)c->num_experts * c->hidden_size * 4 +
		       (c->has_bias ? c->num_experts * 4u : 0) + (c->shared_gate ? c->hidden_size * 4u : 0);
	uint64_t total = 0;

	for (uint32_t li = 0; li < e->store->hdr.num_moe_layers; li++) {
		total += per;
		if (e->store->layers[li].flags & MOE_STORE_LAYER_HAS_SHARED)
			total += ops->blob_prepare ? ops->blob_bytes(c, c->shared_dtype, c->shared_intermediate_size)
						   : e->store->layers[li].shared_bytes;
	}
	return total;
}

static int host_setup(struct moe_engine *e, const struct moe_engine_options *opt, struct moe_err *err)
{
	const struct moe_model_config *c = e->cfg;
	const struct moe_backend_ops *ops = e->backend->ops;
	uint32_t E = c->num_experts, L = e->store->hdr.num_moe_layers;
	uint64_t blob = ops->blob_prepare ? ops->blob_bytes(c, c->weight_dtype, c->moe_intermediate_size)
					  : e->store->hdr.expert_bytes;
	uint64_t all = (uint64_t)E * L, n;
	int r;

	if (ops->blob_prepare && !ops->blob_prepare_range)
		return moe_err_set(err, -EINVAL, "backend %s converts experts but not in pieces", ops->name);
	e->slot_bytes = (blob + 4095) / 4096 * 4096;
	if (e->slot_bytes >= HUGE_2M)
		e->slot_bytes = (e->slot_bytes + HUGE_2M - 1) / HUGE_2M * HUGE_2M;
	e->fixed = fixed_bytes(e);
	e->budget = opt ? opt->host_bytes : 0;
	if (e->budget) {
		if (e->budget < e->fixed + e->slot_bytes)
			return moe_err_set(err, -EINVAL,
					   "a host budget of %" PRIu64 " MiB is too small for %s: the routers and shared "
					   "experts need %" PRIu64 " MiB and one routed expert %" PRIu64 " MiB "
					   "(at least %" PRIu64 " MiB)", e->budget >> 20, e->store->path,
					   e->fixed >> 20, (e->slot_bytes + (1u << 20) - 1) >> 20,
					   (e->fixed + e->slot_bytes + (1u << 20) - 1) >> 20);
		n = (e->budget - e->fixed) / e->slot_bytes;
	} else {
		n = all;
	}
	if (n > all)
		n = all;
	if (n > UINT32_MAX - 1)
		return moe_err_set(err, -EINVAL, "%s: too many experts", e->store->path);
	e->nslots = (uint32_t)n;
	r = moe_cache_new(L, E, e->nslots, e->policy, &e->host, err);
	if (r < 0)
		return r;
	e->arena_len = (size_t)(e->nslots * e->slot_bytes);
	/* address space only: pages come in as slots fill, so the budget bounds
	 * what is resident and an unlimited budget costs nothing up front */
	e->arena = mmap(NULL, e->arena_len + HUGE_2M, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (e->arena == MAP_FAILED) {
		e->arena = NULL;
		return moe_err_set(err, -ENOMEM, "cannot reserve %zu MiB for the host cache", e->arena_len >> 20);
	}
	{
		/* place the slots on a 2 MiB boundary for transparent huge pages */
		uint8_t *base = e->arena;
		uintptr_t a = ((uintptr_t)base + HUGE_2M - 1) & ~((uintptr_t)HUGE_2M - 1);
		size_t head = a - (uintptr_t)base;

		if (head)
			munmap(base, head);
		munmap((uint8_t *)a + e->arena_len, HUGE_2M - head);
		e->arena = (uint8_t *)a;
		if (e->arena_len)
			madvise(e->arena, e->arena_len, MADV_HUGEPAGE);   /* advice only */
	}
	e->slots = calloc(e->nslots ? e->nslots : 1, sizeof(*e->slots));
	e->inflight = calloc(e->nslots ? e->nslots : 1, sizeof(*e->inflight));
	e->need = calloc(2 * (size_t)E, 1);
	e->uniq = calloc(3 * (size_t)E, sizeof(uint32_t));
	e->ptrs = calloc(E, sizeof(*e->ptrs));
	/* waits name this batch's reads (at most E) or every read in flight
	 * (at most one per slot) */
	e->waitv = calloc(E > e->nslots ? E : e->nslots, sizeof(*e->waitv));
	if (!e->slots || !e->inflight || !e->need || !e->uniq || !e->ptrs || !e->waitv)
		return moe_err_set(err, -ENOMEM, "out of memory");
	e->ready = e->need + E;
	e->deferred = e->uniq + E;
	e->pending = e->uniq + 2 * (size_t)E;
	for (uint32_t i = 0; i < e->nslots; i++) {
		e->slots[i].e = e;
		e->slots[i].mem = e->arena + (size_t)i * e->slot_bytes;
	}
	arena_register(e);
	return 0;
}

/* Read the explicitly pinned experts now, as prefetches. */
static void pins_warm(struct moe_engine *e)
{
	uint32_t keys = e->cfg->num_experts * e->store->hdr.num_moe_layers;

	for (uint32_t k = 0; k < keys; k++) {
		int si;

		if (!moe_cache_pinned(e->host, k) || moe_cache_state(e->host, k) != MOE_CACHE_ABSENT)
			continue;
		si = engine_slot_take(e, k);
		if (si < 0)
			break;
		if (engine_slot_read(e, (uint32_t)si, k, true) < 0)
			moe_cache_remove(e->host, k);
	}
}

/* ------------------------------------------------------------------ open and close */

void moe_engine_close(struct moe_engine *e)
{
	if (!e)
		return;
	/* stop the reads first: they write into the slots */
	moe_pager_close(e->pager);
	if (e->trace)
		moe_trace_close_write(e->trace, NULL);
	if (e->layers)
		for (uint32_t i = 0; i < e->store->hdr.num_moe_layers; i++)
			layer_free(&e->layers[i]);
	free(e->layers);
	if (e->arena_registered)
		e->backend->ops->host_unregister(e->backend, e->arena);
	if (e->arena)
		munmap(e->arena, e->arena_len);
	moe_cache_free(e->host);
	free(e->slots);
	free(e->inflight);
	free(e->need);
	free(e->uniq);
	free(e->ptrs);
	free(e->waitv);
	free(e->pred_ids);
	free(e->pred_w);
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
	struct moe_backend_options bo = { .threads = opt ? opt->threads : 0,
					  .device_bytes = opt ? opt->device_bytes : 0,
					  .log = opt ? opt->log : NULL,
					  .log_ctx = opt ? opt->log_ctx : NULL };
	struct moe_pager_options po = opt ? opt->pager : (struct moe_pager_options){ 0 };
	struct moe_engine *e;
	int r;

	e = calloc(1, sizeof(*e));
	if (!e)
		return moe_err_set(err, -ENOMEM, "out of memory");
	if (opt) {
		e->log = opt->log;
		e->log_ctx = opt->log_ctx;
		e->prefetch = opt->prefetch;
		e->pin_hot = opt->pin_hot;
	}
	e->policy = MOE_CACHE_FREQ;
	if (opt && opt->policy && moe_cache_policy_parse(opt->policy, &e->policy) < 0) {
		free(e);
		return moe_err_set(err, -EINVAL, "unknown cache policy \"%s\" (auto, lru, freq)", opt->policy);
	}
	r = moe_store_open(store_path, &e->store, err);
	if (r < 0)
		goto fail;
	if (opt && opt->verify_open) {
		r = moe_store_verify_all(e->store, err);
		if (r < 0)
			goto fail;
	}
	e->cfg = &e->store->cfg;
	e->layers = calloc(e->store->hdr.num_moe_layers, sizeof(*e->layers));
	if (!e->layers) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (uint32_t i = 0; i < e->store->hdr.num_moe_layers; i++) {
		e->layers[i].load = calloc(e->cfg->num_experts, sizeof(uint64_t));
		e->layers[i].predicted = calloc(e->cfg->num_experts, 1);
		if (!e->layers[i].load || !e->layers[i].predicted) {
			r = moe_err_set(err, -ENOMEM, "out of memory");
			goto fail;
		}
	}
	bo.model = e->cfg;
	r = moe_backend_open(opt && opt->backend ? opt->backend : "auto", &bo, &e->backend, err);
	if (r < 0)
		goto fail;
	r = host_setup(e, opt, err);
	if (r < 0)
		goto fail;
	if (!po.log) {
		po.log = e->log;
		po.log_ctx = e->log_ctx;
	}
	r = moe_pager_open(e->store, &po, &e->pager, err);
	if (r < 0)
		goto fail;
	for (const char *const *p = opt ? opt->pin : NULL; p && *p; p++) {
		r = pin_parse(e, *p, err);
		if (r < 0)
			goto fail;
	}
	pins_warm(e);
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

/* ------------------------------------------------------------------ figures */

static void stats_add(struct moe_engine_layer_stats *a, const struct moe_engine_layer_stats *b)
{
	const uint64_t *s = (const uint64_t *)b;
	uint64_t *d = (uint64_t *)a;

	for (size_t i = 0; i < sizeof(*a) / sizeof(uint64_t); i++)
		d[i] += s[i];
}

void moe_engine_get_stats(struct moe_engine *e, struct moe_engine_stats *st,
			  struct moe_engine_layer_stats *layers)
{
	memset(st, 0, sizeof(*st));
	engine_reap(e);
	for (uint32_t i = 0; i < e->store->hdr.num_moe_layers; i++) {
		struct engine_layer *l = &e->layers[i];

		l->st.device_hits = l->dev.hits;
		l->st.device_misses = l->dev.misses;
		l->st.device_bytes = l->dev.bytes;
		l->st.device_copy_ns = l->dev.copy_ns;
		stats_add(&st->total, &l->st);
		if (layers)
			layers[i] = e->layers[i].st;
	}
	st->host_budget = e->budget;
	st->host_fixed = e->fixed;
	st->slot_bytes = e->slot_bytes;
	st->slots = e->nslots;
	st->slots_used = moe_cache_used(e->host);
	st->policy = moe_cache_policy_name(e->policy);
	{
		uint32_t keys = e->cfg->num_experts * e->store->hdr.num_moe_layers;

		for (uint32_t k = 0; k < keys; k++)
			st->pinned += moe_cache_pinned(e->host, k);
	}
	moe_pager_get_stats(e->pager, &st->pager);
}

static json_t *layer_json(const struct moe_engine_layer_stats *l)
{
	json_t *o = json_object();

	json_object_set_new(o, "forwards", json_integer((json_int_t)l->forwards));
	json_object_set_new(o, "tokens", json_integer((json_int_t)l->tokens));
	json_object_set_new(o, "host", json_pack("{s:I,s:I}", "hits", (json_int_t)l->host_hits,
						 "misses", (json_int_t)l->host_misses));
	json_object_set_new(o, "device", json_pack("{s:I,s:I,s:I,s:I}", "hits", (json_int_t)l->device_hits,
						   "misses", (json_int_t)l->device_misses,
						   "bytes_copied", (json_int_t)l->device_bytes,
						   "copy_ns", (json_int_t)l->device_copy_ns));
	json_object_set_new(o, "loads", json_integer((json_int_t)l->loads));
	json_object_set_new(o, "bytes_read", json_integer((json_int_t)l->load_bytes));
	json_object_set_new(o, "load_failures", json_integer((json_int_t)l->load_failures));
	json_object_set_new(o, "evictions", json_integer((json_int_t)l->evictions));
	json_object_set_new(o, "stall_ns", json_integer((json_int_t)l->stall_ns));
	json_object_set_new(o, "busy_ns", json_integer((json_int_t)l->busy_ns));
	json_object_set_new(o, "prefetch", json_pack("{s:I,s:I,s:I,s:I,s:I}",
		"made", (json_int_t)l->prefetches, "used", (json_int_t)l->prefetch_used,
		"predicted", (json_int_t)l->predicted, "predicted_hit", (json_int_t)l->predicted_hit,
		"needed", (json_int_t)l->needed));
	return o;
}

char *moe_engine_stats_json(struct moe_engine *e)
{
	uint32_t L = e->store->hdr.num_moe_layers;
	struct moe_engine_layer_stats *ls = calloc(L ? L : 1, sizeof(*ls));
	struct moe_engine_stats st;
	json_t *root, *layers;
	char *text;

	if (!ls)
		return NULL;
	moe_engine_get_stats(e, &st, ls);
	root = json_object();
	json_object_set_new(root, "host_cache", json_pack("{s:I,s:I,s:I,s:i,s:i,s:i,s:s}",
		"budget_bytes", (json_int_t)st.host_budget, "fixed_bytes", (json_int_t)st.host_fixed,
		"slot_bytes", (json_int_t)st.slot_bytes, "slots", (int)st.slots,
		"slots_used", (int)st.slots_used, "pinned", (int)st.pinned, "policy", st.policy));
	json_object_set_new(root, "pager", json_pack("{s:b,s:b,s:b,s:i,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
		"direct", st.pager.direct, "hugepages", st.pager.hugepages,
		"fixed_buffers", st.pager.fixed_buffers, "ring_flags", (int)st.pager.ring_flags,
		"loads", (json_int_t)st.pager.loads, "prefetch_loads", (json_int_t)st.pager.prefetch_loads,
		"failed", (json_int_t)st.pager.failed, "bytes", (json_int_t)st.pager.bytes,
		"busy_ns", (json_int_t)st.pager.busy_ns, "io_cpu_ns", (json_int_t)st.pager.io_cpu_ns,
		"verify_cpu_ns", (json_int_t)st.pager.verify_cpu_ns,
		"max_inflight_bytes", (json_int_t)st.pager.max_inflight,
		"staging_bytes", (json_int_t)st.pager.staging_bytes));
	{
		struct moe_store_health h;

		moe_pager_store_health(e->pager, false, &h);
		json_object_set_new(root, "store", json_pack("{s:s,s:I,s:I,s:I,s:s}",
			"state", moe_store_state_name(h.state), "read_errors", (json_int_t)h.read_errors,
			"checksum_errors", (json_int_t)h.checksum_errors, "reopens", (json_int_t)h.reopens,
			"why", h.why));
	}
	json_object_set_new(root, "total", layer_json(&st.total));
	layers = json_array();
	for (uint32_t i = 0; i < L; i++) {
		json_t *o = layer_json(&ls[i]);

		json_object_set_new(o, "layer", json_integer(e->store->layers[i].layer));
		json_array_append_new(layers, o);
	}
	json_object_set_new(root, "layers", layers);
	text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	json_decref(root);
	free(ls);
	return text;
}

int moe_engine_trace(struct moe_engine *e, const char *path, struct moe_err *err)
{
	int r = 0;

	if (e->trace) {
		r = moe_trace_close_write(e->trace, err);
		e->trace = NULL;
	}
	if (path && r == 0)
		r = moe_trace_open_write(path, e->store->hdr.num_moe_layers, e->cfg->num_experts,
					 &e->trace, err);
	return r;
}

void moe_engine_store_health(struct moe_engine *e, bool check, struct moe_store_health *h)
{
	moe_pager_store_health(e->pager, check, h);
}

int moe_engine_reopen_store(struct moe_engine *e, bool verify, struct moe_err *err)
{
	/* the store's descriptor first (routers, shared experts), verified;
	 * the pager's then, checked to be the same file */
	int r = moe_store_reopen(e->store, verify, err);

	return r < 0 ? r : moe_pager_reopen(e->pager, err);
}

int moe_engine_inject_fault(struct moe_engine *e, enum moe_pager_fault f, uint32_t layer,
			    uint32_t expert, uint32_t count)
{
	int li = moe_store_layer_index(e->store, layer);

	if (f == MOE_FAULT_OPEN) {
		moe_pager_inject(e->pager, f, 0, 0, count);
		return 0;
	}
	if (li < 0 || expert >= e->cfg->num_experts)
		return -EINVAL;
	moe_pager_inject(e->pager, f, (uint32_t)li, expert, count);
	return 0;
}

int moe_engine_expert_load(const struct moe_engine *e, uint32_t layer, uint64_t *counts)
{
	int li = moe_store_layer_index(e->store, layer);

	if (li < 0)
		return -ENOENT;
	memcpy(counts, e->layers[li].load, e->cfg->num_experts * sizeof(uint64_t));
	return 0;
}

/* ------------------------------------------------------------------ pins at run time */

int moe_engine_set_pins(struct moe_engine *e, const char *const *pin, uint32_t pin_hot, struct moe_err *err)
{
	uint32_t keys = e->cfg->num_experts * e->store->hdr.num_moe_layers, n = 0;
	uint8_t *want = calloc(keys ? keys : 1, 1);
	int r = 0;

	if (!want)
		return moe_err_set(err, -ENOMEM, "out of memory");
	/* every pin checked, and counted, before anything changes */
	for (const char *const *p = pin; p && *p && r == 0; p++) {
		uint32_t first = 1, last = 0;
		int li = 0;

		r = pin_spec(e, *p, &li, &first, &last, err);
		for (uint32_t i = first; r == 0 && i <= last; i++) {
			uint32_t k = engine_key_of(e, (uint32_t)li, i);

			if (!want[k] && ++n > e->nslots)
				r = moe_err_set(err, -ENOSPC,
						"pin \"%s\": more pinned experts than the %u slots of the host budget",
						*p, e->nslots);
			want[k] = 1;
		}
	}
	if (r < 0) {
		free(want);
		return r;
	}
	/* the automatic pins go first, then the explicit ones that are not
	 * wanted any more: the new explicit pins (n <= slots) then always fit */
	moe_cache_pin_hottest(e->host, 0);
	for (uint32_t k = 0; k < keys; k++)
		if (!want[k])
			moe_cache_pin(e->host, k, false);
	for (uint32_t k = 0; k < keys; k++)
		if (want[k])
			moe_cache_pin(e->host, k, true);
	free(want);
	/* the hottest experts by the load seen so far, now rather than at the
	 * next re-choice; moe_cache_pin_hottest caps them to the free slots */
	e->pin_hot = pin_hot;
	if (pin_hot)
		moe_cache_pin_hottest(e->host, pin_hot);
	pins_warm(e);
	return 0;
}
