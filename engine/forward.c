/* SPDX-License-Identifier: MIT */
/*
 * moe_engine_forward as named phases over one per-call state (struct fwd):
 * route, plan, look up in the host tier, run the experts while the pager
 * fetches the rest (fetch, compute, wait, settle), combine, account.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "engine_impl.h"

#define PIN_HOT_EVERY 64          /* forwards between choices of the hottest experts */

/* ------------------------------------------------------------------ forward */

static int route_grow(struct moe_engine *e, size_t need, size_t n, struct moe_err *err)
{
	if (need <= e->route_cap)
		return 0;
	int32_t *ni = realloc(e->ids, need * sizeof(*ni));
	if (ni)
		e->ids = ni;
	float *nw = ni ? realloc(e->w, need * sizeof(*nw)) : NULL;
	if (!ni || !nw)
		return moe_err_set(err, -ENOMEM, "out of memory for %zu tokens", n);
	e->w = nw;
	e->route_cap = need;
	return 0;
}

/*
 * Predict the experts of the MoE layer after @li from this batch's input
 * (@io: its MOE_BACKEND_DEVICE_IO) and prefetch those not resident, into
 * free or evictable slots.
 */
static void predict_next(struct moe_engine *e, uint32_t li, const float *x, size_t n, unsigned io)
{
	const struct moe_model_config *c = e->cfg;
	uint32_t nl = li + 1, E = c->num_experts, k = c->top_k, budget;
	struct engine_layer *l;
	struct moe_layer_weights lw;

	if (nl >= e->store->hdr.num_moe_layers || engine_layer_load(e, nl, NULL) < 0)
		return;
	if (n * k > e->pred_cap) {
		int32_t *pi = realloc(e->pred_ids, n * k * sizeof(*pi));
		if (pi)
			e->pred_ids = pi;
		float *pw = pi ? realloc(e->pred_w, n * k * sizeof(*pw)) : NULL;
		if (!pi || !pw)
			return;
		e->pred_w = pw;
		e->pred_cap = n * k;
	}
	l = &e->layers[nl];
	lw = (struct moe_layer_weights){ .cfg = c, .layer = e->store->layers[nl].layer,
					 .router = l->router, .bias = l->bias };
	if (e->backend->ops->route(e->backend, &lw, x, n, e->pred_ids, e->pred_w, io) < 0)
		return;
	memset(l->predicted, 0, E);
	for (size_t i = 0; i < n * k; i++)
		l->predicted[e->pred_ids[i]] = 1;
	for (uint32_t x2 = 0; x2 < E; x2++)
		l->st.predicted += l->predicted[x2];
	l->have_prediction = true;
	/* prefetches may take at most half the slots, so that they never crowd
	 * out what the current batches need */
	budget = e->nslots / 2;
	for (uint32_t x2 = 0; x2 < E && budget; x2++) {
		uint32_t key = engine_key_of(e, nl, x2);
		int si;

		if (!l->predicted[x2])
			continue;
		if (!moe_cache_admits(e->host, key))
			continue;     /* resident, loading, or not worth its victim */
		si = engine_slot_take(e, key);
		if (si < 0)
			break;
		if (engine_slot_read(e, (uint32_t)si, key, true) < 0) {
			moe_cache_remove(e->host, key);
			break;
		}
		budget--;
	}
}

/*
 * One forward call's state: on moe_engine_forward()'s stack, passed to each
 * phase below.  The per-expert lists are the engine's per-forward scratch
 * (e->uniq, e->deferred, e->pending, e->need, e->ready, e->ptrs, e->waitv,
 * sized for a whole layer in host_setup, so that the engine allocates
 * nothing for a forward once e->ids, e->w, e->pred_ids and e->pred_w have
 * grown to its batch); this struct says how much of them is in use.  e->ready[x] == 1: expert x of this layer is
 * resident and referenced, and not computed yet; e->ptrs[x] is its blob.
 */
struct fwd {
	/* the call, as given */
	uint32_t layer;             /* the checkpoint's layer number */
	const float *x;             /* [n][H]: host memory, or device memory (io) */
	size_t n;
	float *out;                 /* [n][H], where x is */
	int32_t *ids;               /* the caller's copy of the routing [n][k], or NULL */
	float *w;                   /* and of its weights, or NULL */
	unsigned flags;             /* MOE_FWD_* */
	struct moe_err *err;
	uint64_t t0;                /* when the call started (busy_ns) */

	/* route */
	uint32_t li;                /* the layer's index among the MoE layers */
	struct engine_layer *l;
	unsigned io;                /* MOE_BACKEND_DEVICE_IO for device x and out, else 0 */
	uint32_t kk;                /* slots per token in e->ids, e->w: top_k, or E (dense) */
	struct moe_layer_weights lw;  /* the layer as the backend sees it; lw.experts
				       * is e->ptrs, filled as experts become ready;
				       * the split call holds on to it until experts_end */

	/* plan, lookup, fetch, settle: the experts the batch needs */
	uint32_t nu;                /* all of them, ascending, in e->uniq */
	uint32_t nd;                /* those waiting for a slot, in e->deferred */
	uint32_t np;                /* those being read for this call, in e->pending */
	bool predicted;             /* the next layer's experts were predicted */

	/* compute */
	bool begun;                 /* experts_begin succeeded: experts_end is owed */
	bool shared_done;           /* the shared expert went to an experts_run */
	int fail;                   /* the call's first failure (its message in err), or 0 */
	uint64_t stall;             /* ns spent waiting for reads */
};

/*
 * Route: load the layer's router (first use), route the batch on the
 * backend into e->ids and e->w, count each expert's tokens and give the
 * caller its copy.  For the dense comparison, the routing is then replaced
 * by every expert with equal weights.
 */
static int fwd_route(struct moe_engine *e, struct fwd *f)
{
	const struct moe_model_config *c = e->cfg;
	uint32_t k = c->top_k, E = c->num_experts;
	size_t n = f->n;
	int r;

	r = engine_layer_load(e, f->li, f->err);
	if (r < 0)
		return r;
	f->l = &e->layers[f->li];
	f->kk = f->flags & MOE_FWD_ALL_EXPERTS ? E : k;
	r = route_grow(e, n * (f->kk > k ? f->kk : k), n, f->err);
	if (r < 0)
		return r;
	f->lw = (struct moe_layer_weights){
		.cfg = c, .layer = f->layer, .router = f->l->router, .bias = f->l->bias,
		.shared_gate = f->l->shared_gate, .shared = f->l->shared, .experts = e->ptrs,
		.dev = &f->l->dev,
	};
	r = e->backend->ops->route(e->backend, &f->lw, f->x, n, e->ids, e->w, f->io);
	if (r < 0)
		return moe_err_set(f->err, r, "layer %u: routing failed: %s", f->layer, strerror(-r));
	for (size_t i = 0; i < n * k; i++)
		f->l->load[e->ids[i]]++;
	if (f->ids)
		memcpy(f->ids, e->ids, n * k * sizeof(*f->ids));
	if (f->w)
		memcpy(f->w, e->w, n * k * sizeof(*f->w));
	if (f->flags & MOE_FWD_ALL_EXPERTS) {
		/* the dense comparison: every expert, equal weights */
		for (size_t t = 0; t < n; t++)
			for (uint32_t s = 0; s < f->kk; s++) {
				e->ids[t * f->kk + s] = (int32_t)s;
				e->w[t * f->kk + s] = 1.0f / (float)f->kk;
			}
	}
	return 0;
}

/*
 * Plan: the experts this batch needs, ascending, into e->uniq; then what
 * is known of the batch before its experts are found: its figures, the
 * trace, how well the last prediction for this layer did, and (every
 * PIN_HOT_EVERY forwards) the choice of the hottest experts to pin.
 */
static int fwd_plan(struct moe_engine *e, struct fwd *f)
{
	struct engine_layer *l = f->l;
	uint32_t E = e->cfg->num_experts;
	int r;

	memset(e->need, 0, 2 * (size_t)E);   /* need and ready */
	for (size_t i = 0; i < f->n * f->kk; i++)
		e->need[e->ids[i]] = 1;
	for (uint32_t x = 0; x < E; x++)
		if (e->need[x])
			e->uniq[f->nu++] = x;
	l->st.forwards++;
	l->st.tokens += f->n;
	if (e->trace) {
		r = moe_trace_write(e->trace, f->li, e->uniq, f->nu, f->err);
		if (r < 0) {
			moe_trace_close_write(e->trace, NULL);
			e->trace = NULL;
			return r;
		}
	}
	if (l->have_prediction) {
		for (uint32_t i = 0; i < f->nu; i++)
			l->st.predicted_hit += l->predicted[e->uniq[i]];
		l->st.needed += f->nu;
		l->have_prediction = false;
	}
	if (e->pin_hot && ++e->forwards % PIN_HOT_EVERY == 1)
		moe_cache_pin_hottest(e->host, e->pin_hot);
	return 0;
}

/*
 * Lookup: each needed expert in the host tier.  A resident one is ready
 * now; one that a read (a prefetch) is already bringing in is waited for,
 * its read moved to the front of the pager's queue; the others are
 * deferred until a slot can be had.  Every expert ready or waited for is
 * referenced, so that no eviction takes it during the call.
 */
static void fwd_lookup(struct moe_engine *e, struct fwd *f)
{
	struct engine_layer *l = f->l;

	engine_reap(e);
	for (uint32_t i = 0; i < f->nu; i++) {
		uint32_t x = e->uniq[i], key = engine_key_of(e, f->li, x);
		enum moe_cache_state st = moe_cache_access(e->host, key);
		uint32_t si = moe_cache_slot(e->host, key);

		if (st == MOE_CACHE_RESIDENT) {
			l->st.host_hits++;
			moe_cache_ref(e->host, key);
			e->ready[x] = 1;
			e->ptrs[x] = e->slots[si].mem;
		} else {
			l->st.host_misses++;
			if (st == MOE_CACHE_LOADING) {
				moe_cache_ref(e->host, key);
				moe_pager_promote(e->pager, &e->slots[si].ld);
				e->slots[si].waited = true;
				e->pending[f->np++] = x;
			} else {
				e->deferred[f->nd++] = x;
			}
		}
		if (si != MOE_CACHE_NONE && e->slots[si].prefetched) {
			e->slots[si].prefetched = false;
			l->st.prefetch_used++;
		}
	}
}

/*
 * Fetch: start reads for the deferred experts while slots can be had (a
 * failure to submit fails the call).  Once nothing is deferred, and once
 * per call, predict the next layer's experts and prefetch them.
 */
static void fwd_fetch(struct moe_engine *e, struct fwd *f)
{
	int r;

	while (f->nd && !f->fail) {
		uint32_t x = e->deferred[f->nd - 1], key = engine_key_of(e, f->li, x);
		int si = engine_slot_take(e, key);

		if (si < 0)
			break;
		r = engine_slot_read(e, (uint32_t)si, key, false);
		if (r < 0) {
			moe_cache_remove(e->host, key);
			f->fail = moe_err_set(f->err, r, "layer %u expert %u: %s", f->layer, x, e->slots[si].ld.msg);
			break;
		}
		moe_cache_ref(e->host, key);
		e->slots[si].waited = true;
		e->pending[f->np++] = x;
		f->nd--;
	}
	if (e->prefetch && !f->predicted && !f->nd) {
		predict_next(e, f->li, f->x, f->n, f->io);
		f->predicted = true;
	}
}

/*
 * Compute: one experts_run for what is ready (and the shared expert, in the
 * first run); what it computed is released to the host tier.  Returns
 * whether anything was ready.
 */
static bool fwd_compute(struct moe_engine *e, struct fwd *f)
{
	bool any = false;
	int r;

	for (uint32_t i = 0; i < f->nu; i++)
		any |= e->ready[e->uniq[i]] == 1;
	if (!f->fail && (any || !f->shared_done)) {
		r = e->backend->ops->experts_run(e->backend, &f->lw, e->ready, !f->shared_done);
		if (r < 0)
			f->fail = moe_err_set(f->err, r, "layer %u: expert computation failed: %s", f->layer,
					      strerror(-r));
		f->shared_done = true;
	}
	for (uint32_t i = 0; i < f->nu; i++) {
		uint32_t x = e->uniq[i];

		if (e->ready[x] == 1 && !f->fail) {
			e->ready[x] = 0;     /* computed */
			moe_cache_unref(e->host, engine_key_of(e, f->li, x));
		}
	}
	return any;
}

/*
 * Wait for a read: one of this call's, or, with every slot busy, any (its
 * end may free a slot for a deferred expert).  -ENOSPC, failing the call,
 * when no read is in flight to wait for.
 */
static int fwd_wait(struct moe_engine *e, struct fwd *f)
{
	uint64_t w0 = moe_now_ns();

	if (f->np) {
		for (uint32_t i = 0; i < f->np; i++)
			e->waitv[i] = &e->slots[moe_cache_slot(e->host, engine_key_of(e, f->li, e->pending[i]))].ld;
		moe_pager_wait_any(e->pager, e->waitv, f->np);
	} else if (e->ninflight) {
		for (uint32_t i = 0; i < e->ninflight; i++)
			e->waitv[i] = &e->slots[e->inflight[i]].ld;
		moe_pager_wait_any(e->pager, e->waitv, e->ninflight);
	} else {
		f->fail = moe_err_set(f->err, -ENOSPC,
				      "layer %u: no host-cache slot can be freed for expert %u (%u slots, all pinned?)",
				      f->layer, e->deferred[f->nd - 1], e->nslots);
		return f->fail;
	}
	f->stall += moe_now_ns() - w0;
	return 0;
}

/*
 * Settle: this call's reads that have ended make their experts ready, or
 * (failed) fail the call; then the other reads that have ended are reaped.
 */
static void fwd_settle(struct moe_engine *e, struct fwd *f)
{
	for (uint32_t i = 0; i < f->np;) {
		uint32_t x = e->pending[i], key = engine_key_of(e, f->li, x);
		uint32_t si = moe_cache_slot(e->host, key);
		struct slot *s = &e->slots[si];

		if (__atomic_load_n(&s->ld.status, __ATOMIC_ACQUIRE) == MOE_PAGER_PENDING) {
			i++;
			continue;
		}
		e->pending[i] = e->pending[--f->np];
		s->waited = false;
		moe_cache_unref(e->host, key);
		if (s->ld.status == 0) {
			engine_slot_reaped(e, si);
			moe_cache_ref(e->host, key);
			e->ready[x] = 1;
			e->ptrs[x] = s->mem;
		} else {
			if (!f->fail)
				f->fail = moe_err_set(f->err, s->ld.status, "%s", s->ld.msg);
			engine_slot_reaped(e, si);
		}
	}
	engine_reap(e);
}

/*
 * The experts, the resident ones first: experts_begin, then rounds of
 * fetch, compute, wait and settle until every needed expert is computed
 * or the call has failed.
 */
static void fwd_experts(struct moe_engine *e, struct fwd *f)
{
	int r;

	/* x was routed by fwd_route, just before */
	r = e->backend->ops->experts_begin(e->backend, &f->lw, f->x, f->n, f->kk, e->ids, e->w, f->out,
					   f->io | MOE_BACKEND_X_ROUTED);
	if (r < 0) {
		f->fail = moe_err_set(f->err, r, "layer %u: expert computation failed: %s", f->layer, strerror(-r));
		return;
	}
	f->begun = true;
	for (;;) {
		fwd_fetch(e, f);
		bool progressed = fwd_compute(e, f);
		if (f->fail || (!f->np && !f->nd))
			break;
		/* computing freed slots: give them to the deferred experts first */
		if (progressed && f->nd && !f->np)
			continue;
		if (fwd_wait(e, f) < 0)
			break;
		fwd_settle(e, f);
	}
}

/*
 * Combine: let go of what the call still holds (after a failure, what is
 * still loading stays as a prefetch would; what was waiting for a slot is
 * simply not read), then experts_end sums the experts' outputs into out,
 * or after a failure only frees.
 */
static void fwd_combine(struct moe_engine *e, struct fwd *f)
{
	for (uint32_t i = 0; i < f->np; i++) {
		uint32_t key = engine_key_of(e, f->li, e->pending[i]);

		e->slots[moe_cache_slot(e->host, key)].waited = false;
		moe_cache_unref(e->host, key);
	}
	for (uint32_t i = 0; i < f->nu; i++)
		if (e->ready[e->uniq[i]] == 1)
			moe_cache_unref(e->host, engine_key_of(e, f->li, e->uniq[i]));
	if (f->begun)
		e->backend->ops->experts_end(e->backend, f->fail != 0);
}

/* Account: the call's time waiting for reads and in all. */
static void fwd_account(const struct fwd *f)
{
	f->l->st.stall_ns += f->stall;
	f->l->st.busy_ns += moe_now_ns() - f->t0;
}

/* The phases above, in order; the contract is in engine.h. */
int moe_engine_forward(struct moe_engine *e, uint32_t layer, const float *x, size_t n,
		       float *out, int32_t *ids, float *w, unsigned flags, struct moe_err *err)
{
	struct fwd f = { .layer = layer, .x = x, .n = n, .out = out, .ids = ids, .w = w,
			 .flags = flags, .err = err };
	int li, r;

	if ((flags & MOE_FWD_DEVICE_IO) && !moe_engine_has_device_memory(e))
		return moe_err_set(err, -EOPNOTSUPP, "the %s backend has no device memory", e->backend->ops->name);
	/* the routing of the next layer (prefetch) reads x too: device x */
	f.io = flags & MOE_FWD_DEVICE_IO ? MOE_BACKEND_DEVICE_IO : 0;
	f.t0 = moe_now_ns();
	li = engine_find_layer(e, layer, err);
	if (li < 0)
		return li;
	if (n == 0)
		return 0;
	f.li = (uint32_t)li;
	r = fwd_route(e, &f);
	if (r < 0)
		return r;
	r = fwd_plan(e, &f);
	if (r < 0)
		return r;
	fwd_lookup(e, &f);
	fwd_experts(e, &f);
	fwd_combine(e, &f);
	fwd_account(&f);
	return f.fail;
}

bool moe_engine_has_device_memory(const struct moe_engine *e)
{
	/* a backend with ipc_open takes MOE_BACKEND_DEVICE_IO */
	return e->backend->ops->ipc_open != NULL;
}

int moe_engine_device_map(struct moe_engine *e, const void *handle, void **base, uint64_t *bytes,
			  struct moe_err *err)
{
	const struct moe_backend_ops *ops = e->backend->ops;
	int r;

	if (!moe_engine_has_device_memory(e))
		return moe_err_set(err, -EOPNOTSUPP, "moed runs on the %s backend: device memory needs the CUDA "
				   "backend", ops->name);
	r = ops->ipc_open(e->backend, handle, base, bytes);
	if (r < 0)
		return moe_err_set(err, r, "cannot map the client's device memory (cudaIpcOpenMemHandle: %s)",
				   strerror(-r));
	return 0;
}

void moe_engine_device_unmap(struct moe_engine *e, void *base)
{
	if (base && e->backend->ops->ipc_close)
		e->backend->ops->ipc_close(e->backend, base);
}
