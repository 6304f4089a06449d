/* SPDX-License-Identifier: MIT */
/*
 * The CPU backend: the reference every other backend is tested against.
 *
 * A forward runs as a few parallel loops over a thread pool:
 *   route:   logits = X W_g^T (tasks: token chunk x block of experts), then
 *            selection per token (router.c);
 *   experts: tokens grouped by expert (a counting sort, token order kept),
 *            phase A: h = act(gate x) * (up x) per (expert, block of rows),
 *            phase B: y = down h          per (expert, block of rows),
 *            combine: out[t] = sum_s w[t][s] y[t][s] + shared, per token.
 * Every output element is written by exactly one task, with the canonical
 * order of kernels.h, and the combine sums slots in a fixed order, so the
 * result does not depend on the thread count or on the other tokens.
 */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "act.h"
#include "backend.h"
#include "kernels.h"
#include "router.h"
#include "threadpool.h"

/* Rows of gate/up computed together: 2 x 16 rows of a 7168-wide bf16
 * expert is 460 KB, which stays in L2 while all of the expert's tokens pass. */
#define ROWS_A 16
/* Rows of down computed together. */
#define ROWS_B 32
/* Rows per task: a multiple of the blocks above, chosen per call so that
 * there are about TASKS_PER_WORKER tasks per worker (balance) but each is
 * a long contiguous read (at decode sizes the hardware prefetchers need
 * long streams to reach the memory bandwidth). */
#define TASK_ROWS_MAX 512
#define TASKS_PER_WORKER 4
/* Tokens per chunk inside a phase-A task (multiple of every kernel's CMAX),
 * bounds the per-worker scratch. */
#define TOKENS_A 48
/* Router: tokens per task, experts per task. */
#define ROUTE_TOKENS 16
#define ROUTE_EXPERTS 64
/* Tokens per combine / selection task. */
#define COMBINE_TOKENS 8

/* A growable scratch buffer. */
struct buf {
	void *p;
	size_t cap;
};

static void *buf_get(struct buf *b, size_t bytes)
{
	if (bytes > b->cap) {
		void *n;
		size_t cap = bytes + bytes / 4;
		if (posix_memalign(&n, 64, cap))
			return NULL;
		free(b->p);
		b->p = n;
		b->cap = cap;
	}
	return b->p;
}

struct worker_scratch {
	float g[TOKENS_A * ROWS_A];
	float u[TOKENS_A * ROWS_A];
	struct buf sel;           /* router selection scratch */
};

struct cpu {
	struct moe_threadpool *pool;
	uint32_t nworkers;
	struct worker_scratch *ws;
	struct buf xptr, rxptr, logits, hbuf, ybuf, hptr, order, pos, tasks, sh_h, sh_y, sh_hptr;
	struct expert_job *cur;   /* the split call in progress (cur->first != NULL) */
};

/* ------------------------------------------------------------------------ */
/* route                                                                     */

struct route_job {
	const struct moe_layer_weights *lw;
	const float *const *xs;
	size_t n;
	float *logits;              /* [n][E] */
	int32_t *ids;
	float *w;
	struct cpu *cpu;
	size_t expert_blocks;
};

static void route_logits_task(void *ctx, size_t task, uint32_t worker)
{
	struct route_job *j = ctx;
	const struct moe_model_config *c = j->lw->cfg;
	size_t tb = task / j->expert_blocks, eb = task % j->expert_blocks;
	size_t t0 = tb * ROUTE_TOKENS, e0 = eb * ROUTE_EXPERTS;
	size_t nt = j->n - t0 < ROUTE_TOKENS ? j->n - t0 : ROUTE_TOKENS;
	size_t ne = c->num_experts - e0 < ROUTE_EXPERTS ? c->num_experts - e0 : ROUTE_EXPERTS;

	(void)worker;
	moe_kern_dot_rows(MOE_DTYPE_F32, j->lw->router + e0 * c->hidden_size, c->hidden_size,
			  c->hidden_size, ne, j->xs + t0, nt, j->logits + t0 * c->num_experts + e0,
			  c->num_experts);
}

static void route_select_task(void *ctx, size_t task, uint32_t worker)
{
	struct route_job *j = ctx;
	const struct moe_model_config *c = j->lw->cfg;
	double *scratch = j->cpu->ws[worker].sel.p;
	size_t t0 = task * COMBINE_TOKENS, t1 = t0 + COMBINE_TOKENS < j->n ? t0 + COMBINE_TOKENS : j->n;

	for (size_t t = t0; t < t1; t++)
		moe_router_select(c, j->logits + t * c->num_experts, j->lw->bias, scratch,
				  j->ids + t * c->top_k, j->w + t * c->top_k);
}

static int cpu_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x,
		     size_t n, int32_t *ids, float *w, unsigned flags)
{
	struct cpu *cpu = be->priv;
	const struct moe_model_config *c = lw->cfg;
	struct route_job j = { .lw = lw, .n = n, .ids = ids, .w = w, .cpu = cpu };
	const float **xs;

	if (flags & MOE_BACKEND_DEVICE_IO)
		return -EOPNOTSUPP;       /* no device memory here */
	if (n == 0)
		return 0;
	xs = buf_get(&cpu->rxptr, n * sizeof(*xs));   /* not xptr: a split experts call may be in progress */
	j.logits = buf_get(&cpu->logits, n * c->num_experts * sizeof(float));
	if (!xs || !j.logits)
		return -ENOMEM;
	for (uint32_t i = 0; i < cpu->nworkers; i++)
		if (!buf_get(&cpu->ws[i].sel, 4 * (size_t)c->num_experts * sizeof(double)))
			return -ENOMEM;
	for (size_t t = 0; t < n; t++)
		xs[t] = x + t * c->hidden_size;
	j.xs = xs;
	j.expert_blocks = (c->num_experts + ROUTE_EXPERTS - 1) / ROUTE_EXPERTS;
	moe_threadpool_run(cpu->pool, ((n + ROUTE_TOKENS - 1) / ROUTE_TOKENS) * j.expert_blocks,
			   route_logits_task, &j);
	moe_threadpool_run(cpu->pool, (n + COMBINE_TOKENS - 1) / COMBINE_TOKENS, route_select_task, &j);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* experts                                                                   */

/* One unit of phase A or B: rows [r0, r1) of one expert (or the shared one). */
struct task {
	int32_t expert;             /* -1: the shared expert */
	uint32_t r0, r1;
};

struct expert_job {
	const struct moe_layer_weights *lw;
	struct cpu *cpu;
	const float *x;
	size_t n;
	uint32_t kk;
	const int32_t *ids;
	const float *w;
	float *out;
	size_t *first;              /* [E + 1]: expert e owns sorted rows first[e]..first[e+1] */
	const float **xptr;         /* [n*kk] token vector of each sorted row */
	const float **hptr;         /* [n*kk] intermediate vector of each sorted row */
	uint32_t *pos;              /* [n*kk] (t, s) -> sorted row */
	float *h;                   /* [n*kk][I] */
	float *y;                   /* [n*kk][H] */
	/* shared expert */
	const float **sh_xptr;      /* [n] */
	const float **sh_hptr;      /* [n] */
	float *sh_h;                /* [n][Is] */
	float *sh_y;                /* [n][H] */
	struct task *tasks;
};

/*
 * One N x K matrix of @dt in the resident layout: the packed layout of
 * kernels.h, or for INT4 the store's own bytes with the codes reordered in
 * their rows (kernels.h, kernels_int4.c says why), whose size depends on
 * the store's q4_group and q4_flags.
 */
static uint64_t res_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint64_t N, uint64_t K)
{
	if (dt == MOE_DTYPE_INT4)
		return moe_cfg_matrix_bytes(c, dt, N, K);
	return moe_kern_packed_bytes(dt, N, K);
}

/* Bytes [b0, b0 + nb) of the matrix in the store's layout into @dst. */
static void res_pack_bytes(enum moe_dtype dt, const void *src, size_t N, size_t K, uint64_t b0,
			   uint64_t nb, void *dst)
{
	if (dt == MOE_DTYPE_INT4)
		moe_kern_q4_pack_bytes(src, N, K, b0, nb, dst);
	else
		moe_kern_pack_bytes(dt, src, N, K, b0, nb, dst);
}

static void res_dot(const struct moe_model_config *c, enum moe_dtype dt, const void *Wp, size_t N,
		    size_t K, size_t row0, size_t nr, const float *const *xs, size_t nt, float *y,
		    size_t ldy)
{
	struct moe_q4_matrix m;

	if (dt != MOE_DTYPE_INT4) {
		moe_kern_dot_rows_packed_at(dt, Wp, N, K, row0, nr, xs, nt, y, ldy);
		return;
	}
	moe_q4_matrix_at(Wp, c->q4_group, c->q4_flags, N, K, &m);
	moe_kern_dot_rows_q4(&m, row0, nr, xs, nt, y, ldy);
}

/*
 * The resident layout of an expert: gate [I][H], up [I][H], down [H][I]
 * (no gate when !gated), each matrix in the packed layout of kernels.h,
 * so that a tile streams one sequential run of memory.
 */
static uint64_t cpu_matrix_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I)
{
	uint64_t H = c->hidden_size;

	return (c->gated ? 2 : 1) * res_bytes(c, dt, I, H) + res_bytes(c, dt, H, I);
}

/* With has_expert_bias (routed experts only) the float32 biases follow the
 * packed matrices, as in the store, at a 16-byte boundary.  Never with
 * FP8: moe_model_config_validate refuses expert biases with it. */
static uint64_t cpu_bias_offset(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I)
{
	assert(dt != MOE_DTYPE_FP8_E4M3_B128);
	return (cpu_matrix_bytes(c, dt, I) + 15) & ~(uint64_t)15;
}

static uint64_t cpu_blob_bytes(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I)
{
	if (c->has_expert_bias)
		return cpu_bias_offset(c, dt, I) + moe_expert_bias_count(c) * sizeof(float);
	return cpu_matrix_bytes(c, dt, I);
}

static void cpu_blob_prepare(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I,
			     const void *src, void *dst)
{
	size_t H = c->hidden_size;
	size_t in_store = moe_cfg_matrix_bytes(c, dt, I, H), in_packed = res_bytes(c, dt, I, H);
	const char *s = src;
	char *d = dst;
	int nin = c->gated ? 2 : 1;

	if (dt == MOE_DTYPE_INT4) {     /* the store's layout, its codes reordered */
		for (int m = 0; m < nin; m++)
			moe_kern_q4_pack_bytes(s + m * in_store, I, H, 0, in_store, d + m * in_packed);
		moe_kern_q4_pack_bytes(s + nin * in_store, H, I, 0, moe_cfg_matrix_bytes(c, dt, H, I),
				       d + nin * in_packed);
		return;     /* biases never come with INT4 (moe_model_config_validate) */
	}
	for (int m = 0; m < nin; m++)
		moe_kern_pack(dt, s + m * in_store, I, H, d + m * in_packed);
	moe_kern_pack(dt, s + nin * in_store, H, I, d + nin * in_packed);
	if (c->has_expert_bias)
		memcpy(d + cpu_bias_offset(c, dt, I), s + moe_expert_bias_offset(c),
		       moe_expert_bias_count(c) * sizeof(float));
}

/* The expert's biases in its resident blob, gate [I], up [I], down [H]
 * (gate absent when !gated), or NULL without has_expert_bias. */
static const float *expert_bias(const struct moe_model_config *c, enum moe_dtype dt, const void *blob,
				uint32_t I)
{
	if (!c->has_expert_bias)
		return NULL;
	return (const float *)((const char *)blob + cpu_bias_offset(c, dt, I));
}

/* Where the expert's matrices start in its resident blob. */
static void expert_parts(const struct moe_model_config *c, enum moe_dtype dt, const void *blob,
			 uint32_t I, const void **gate, const void **up, const void **down)
{
	size_t m = res_bytes(c, dt, I, c->hidden_size);
	const char *b = blob;

	if (c->gated) {
		*gate = b;
		*up = b + m;
		*down = b + 2 * m;
	} else {
		*gate = NULL;
		*up = b;
		*down = b + m;
	}
}

static void phase_a_task(void *ctx, size_t ti, uint32_t worker)
{
	struct expert_job *j = ctx;
	const struct moe_model_config *c = j->lw->cfg;
	const struct task *t = &j->tasks[ti];
	struct worker_scratch *ws = &j->cpu->ws[worker];
	const void *gate, *up, *down, *blob;
	const float *const *xs;
	uint32_t I, H = c->hidden_size;
	enum moe_dtype dt = t->expert < 0 ? c->shared_dtype : c->weight_dtype;
	size_t ntok;
	const float *bias;
	float *h;

	if (t->expert < 0) {
		blob = j->lw->shared;
		I = c->shared_intermediate_size;
		xs = j->sh_xptr;
		ntok = j->n;
		h = j->sh_h;
	} else {
		blob = j->lw->experts[t->expert];
		I = c->moe_intermediate_size;
		xs = j->xptr + j->first[t->expert];
		ntok = j->first[t->expert + 1] - j->first[t->expert];
		h = j->h + j->first[t->expert] * I;
	}
	expert_parts(c, dt, blob, I, &gate, &up, &down);
	bias = t->expert < 0 ? NULL : expert_bias(c, dt, blob, I);
	for (uint32_t b0 = t->r0; b0 < t->r1; b0 += ROWS_A) {
		uint32_t nr = t->r1 - b0 < ROWS_A ? t->r1 - b0 : ROWS_A;

		for (size_t c0 = 0; c0 < ntok; c0 += TOKENS_A) {
			size_t nc = ntok - c0 < TOKENS_A ? ntok - c0 : TOKENS_A;

			res_dot(c, dt, up, I, H, b0, nr, xs + c0, nc, ws->u, ROWS_A);
			if (gate)
				res_dot(c, dt, gate, I, H, b0, nr, xs + c0, nc, ws->g, ROWS_A);
			for (size_t i = 0; i < nc; i++) {
				float *hr = h + (c0 + i) * I + b0;
				float *ur = ws->u + i * ROWS_A, *gr = ws->g + i * ROWS_A;
				if (bias) {
					/* per element, after the canonical dot: batch invariant */
					const float *gb = bias + b0, *ub = bias + (gate ? I : 0) + b0;
					for (uint32_t r = 0; r < nr; r++) {
						ur[r] += ub[r];
						if (gate)
							gr[r] += gb[r];
					}
				}
				if (gate)
					for (uint32_t r = 0; r < nr; r++)
						hr[r] = moe_act_glu(c->act, c->swiglu_alpha, c->swiglu_limit,
								    gr[r], ur[r]);
				else
					for (uint32_t r = 0; r < nr; r++)
						hr[r] = moe_act_apply(c->act, ur[r]);
			}
		}
	}
}

static void phase_b_task(void *ctx, size_t ti, uint32_t worker)
{
	struct expert_job *j = ctx;
	const struct moe_model_config *c = j->lw->cfg;
	const struct task *t = &j->tasks[ti];
	const void *gate, *up, *down, *blob;
	const float *const *hs;
	uint32_t I, H = c->hidden_size;
	enum moe_dtype dt = t->expert < 0 ? c->shared_dtype : c->weight_dtype;
	size_t ntok;
	const float *bias;
	float *y;

	(void)worker;
	if (t->expert < 0) {
		blob = j->lw->shared;
		I = c->shared_intermediate_size;
		hs = j->sh_hptr;
		ntok = j->n;
		y = j->sh_y;
	} else {
		blob = j->lw->experts[t->expert];
		I = c->moe_intermediate_size;
		hs = j->hptr + j->first[t->expert];
		ntok = j->first[t->expert + 1] - j->first[t->expert];
		y = j->y + j->first[t->expert] * H;
	}
	expert_parts(c, dt, blob, I, &gate, &up, &down);
	bias = t->expert < 0 ? NULL : expert_bias(c, dt, blob, I);
	if (bias)
		bias += (c->gated ? 2 : 1) * (size_t)I;     /* down's */
	for (uint32_t b0 = t->r0; b0 < t->r1; b0 += ROWS_B) {
		uint32_t nr = t->r1 - b0 < ROWS_B ? t->r1 - b0 : ROWS_B;

		res_dot(c, dt, down, H, I, b0, nr, hs, ntok, y + b0, H);
		if (bias)
			for (size_t i = 0; i < ntok; i++)
				for (uint32_t r = 0; r < nr; r++)
					y[i * H + b0 + r] += bias[b0 + r];
	}
}

static void combine_task(void *ctx, size_t task, uint32_t worker)
{
	struct expert_job *j = ctx;
	const struct moe_model_config *c = j->lw->cfg;
	uint32_t H = c->hidden_size, kk = j->kk;
	size_t t0 = task * COMBINE_TOKENS, t1 = t0 + COMBINE_TOKENS < j->n ? t0 + COMBINE_TOKENS : j->n;

	(void)worker;
	for (size_t t = t0; t < t1; t++) {
		float *o = j->out + t * H;
		float sg = 1.0f;

		memset(o, 0, H * sizeof(float));
		for (uint32_t s = 0; s < kk; s++) {
			const float *y = j->y + (size_t)j->pos[t * kk + s] * H;
			float ws = j->w[t * kk + s];
			for (uint32_t i = 0; i < H; i++)
				o[i] += ws * y[i];
		}
		if (!j->sh_y)
			continue;
		if (j->lw->shared_gate) {
			const float *xt = j->x + t * H;
			float g;
			moe_kern_dot_rows(MOE_DTYPE_F32, j->lw->shared_gate, H, H, 1, &xt, 1, &g, 1);
			sg = 1.0f / (1.0f + expf(-g));
		}
		const float *sy = j->sh_y + t * H;
		for (uint32_t i = 0; i < H; i++)
			o[i] += sg * sy[i];
	}
}

/* Rows per task for @total rows of work: a multiple of @block. */
static uint32_t task_rows(size_t total, uint32_t workers, uint32_t block)
{
	size_t r = total / ((size_t)workers * TASKS_PER_WORKER);

	r = (r + block - 1) / block * block;
	if (r < block)
		r = block;
	if (r > TASK_ROWS_MAX)
		r = TASK_ROWS_MAX;
	return (uint32_t)r;
}

static size_t add_tasks(struct task *tasks, size_t nt, int32_t expert, uint32_t rows, uint32_t block)
{
	for (uint32_t r = 0; r < rows; r += block) {
		tasks[nt].expert = expert;
		tasks[nt].r0 = r;
		tasks[nt].r1 = r + block < rows ? r + block : rows;
		nt++;
	}
	return nt;
}

static int cpu_experts_begin(struct moe_backend *be, const struct moe_layer_weights *lw,
			     const float *x, size_t n, uint32_t kk, const int32_t *ids,
			     const float *w, float *out, unsigned flags)
{
	struct cpu *cpu = be->priv;
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint32_t Is = c->shared_intermediate_size;
	bool shared = lw->shared && Is > 0;
	size_t rows = n * kk, max_tasks;
	struct expert_job *j = cpu->cur;
	size_t *first, *fill;
	uint32_t *order;

	*j = (struct expert_job){ .lw = lw, .cpu = cpu, .x = x, .n = n, .kk = kk, .ids = ids,
				  .w = w, .out = out };
	/* MOE_BACKEND_X_ROUTED: the experts read x in place anyway */
	if (flags & MOE_BACKEND_DEVICE_IO)
		return -EOPNOTSUPP;       /* no device memory here */
	first = calloc(2 * ((size_t)E + 1), sizeof(size_t));
	if (!first)
		return -ENOMEM;
	fill = first + E + 1;
	max_tasks = (size_t)E * ((H + ROWS_B - 1) / ROWS_B + (I + ROWS_A - 1) / ROWS_A) +
		    (shared ? (Is + ROWS_A - 1) / ROWS_A + (H + ROWS_B - 1) / ROWS_B : 0);
	j->xptr = buf_get(&cpu->xptr, rows * sizeof(*j->xptr));
	j->hptr = buf_get(&cpu->hptr, rows * sizeof(*j->hptr));
	order = buf_get(&cpu->order, rows * sizeof(*order));
	j->pos = buf_get(&cpu->pos, rows * sizeof(*j->pos));
	j->h = buf_get(&cpu->hbuf, rows * I * sizeof(float));
	j->y = buf_get(&cpu->ybuf, rows * H * sizeof(float));
	j->tasks = buf_get(&cpu->tasks, max_tasks * sizeof(*j->tasks));
	if (!j->xptr || !j->hptr || !order || !j->pos || !j->h || !j->y || !j->tasks)
		goto nomem;
	if (shared) {
		j->sh_h = buf_get(&cpu->sh_h, n * Is * sizeof(float));
		j->sh_y = buf_get(&cpu->sh_y, n * H * sizeof(float));
		j->sh_hptr = buf_get(&cpu->sh_hptr, 2 * n * sizeof(*j->sh_hptr));
		if (!j->sh_h || !j->sh_y || !j->sh_hptr)
			goto nomem;
		j->sh_xptr = j->sh_hptr + n;
		for (size_t t = 0; t < n; t++) {
			j->sh_xptr[t] = x + t * H;
			j->sh_hptr[t] = j->sh_h + t * Is;
		}
	}

	/* group (token, slot) rows by expert, tokens in order inside each */
	for (size_t i = 0; i < rows; i++)
		first[ids[i] + 1]++;
	for (uint32_t e = 0; e < E; e++)
		first[e + 1] += first[e];
	memcpy(fill, first, E * sizeof(size_t));
	for (size_t i = 0; i < rows; i++) {
		size_t p = fill[ids[i]]++;
		order[p] = (uint32_t)i;
		j->pos[i] = (uint32_t)p;
	}
	for (size_t p = 0; p < rows; p++) {
		j->xptr[p] = x + (size_t)(order[p] / kk) * H;
		j->hptr[p] = j->h + p * I;
	}
	j->first = first;
	return 0;
nomem:
	free(first);
	j->first = NULL;
	return -ENOMEM;
}

static int cpu_experts_run(struct moe_backend *be, const struct moe_layer_weights *lw,
			   const uint8_t *ready, bool with_shared)
{
	struct cpu *cpu = be->priv;
	struct expert_job *j = cpu->cur;
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint32_t Is = c->shared_intermediate_size;
	bool shared = with_shared && lw->shared && Is > 0;
	size_t *first = j->first, ntA = 0, n_tasks = 0, active = 0;
	uint32_t rows_a, rows_b;

	if (!first)
		return -EINVAL;
	j->lw = lw;
	for (uint32_t e = 0; e < E; e++)
		active += ready[e] && first[e + 1] > first[e];
	if (!active && !shared)
		return 0;
	rows_a = task_rows(active * I + (shared ? Is : 0), cpu->nworkers, ROWS_A);
	rows_b = task_rows((active + shared) * H, cpu->nworkers, ROWS_B);

	/* phase A: gate/up of every expert of this run and the shared one */
	if (shared)
		ntA = add_tasks(j->tasks, ntA, -1, Is, rows_a);
	for (uint32_t e = 0; e < E; e++)
		if (ready[e] && first[e + 1] > first[e])
			ntA = add_tasks(j->tasks, ntA, (int32_t)e, I, rows_a);
	moe_threadpool_run(cpu->pool, ntA, phase_a_task, j);

	/* phase B: down */
	if (shared)
		n_tasks = add_tasks(j->tasks, n_tasks, -1, H, rows_b);
	for (uint32_t e = 0; e < E; e++)
		if (ready[e] && first[e + 1] > first[e])
			n_tasks = add_tasks(j->tasks, n_tasks, (int32_t)e, H, rows_b);
	moe_threadpool_run(cpu->pool, n_tasks, phase_b_task, j);
	return 0;
}

static int cpu_experts_end(struct moe_backend *be, bool abandon)
{
	struct cpu *cpu = be->priv;
	struct expert_job *j = cpu->cur;

	if (!j->first)
		return -EINVAL;
	if (!abandon)
		moe_threadpool_run(cpu->pool, (j->n + COMBINE_TOKENS - 1) / COMBINE_TOKENS,
				   combine_task, j);
	free(j->first);
	j->first = NULL;
	return 0;
}

static int cpu_experts(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x,
		       size_t n, uint32_t kk, const int32_t *ids, const float *w, float *out,
		       unsigned flags)
{
	struct cpu *cpu = be->priv;
	uint8_t *all;
	int r;

	if (n == 0)
		return 0;
	all = malloc(lw->cfg->num_experts);
	if (!all)
		return -ENOMEM;
	memset(all, 1, lw->cfg->num_experts);
	r = cpu_experts_begin(be, lw, x, n, kk, ids, w, out, flags);
	if (r == 0)
		r = cpu_experts_run(be, lw, all, true);
	if (r == 0 || cpu->cur->first)
		cpu_experts_end(be, r < 0);
	free(all);
	return r;
}

static void cpu_blob_prepare_range(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I,
				   const void *src, uint64_t off, uint64_t len, void *dst)
{
	uint64_t H = c->hidden_size;
	uint64_t in_store = moe_cfg_matrix_bytes(c, dt, I, H), in_packed = res_bytes(c, dt, I, H);
	uint64_t down_store = moe_cfg_matrix_bytes(c, dt, H, I);
	uint32_t nin = c->gated ? 2 : 1;
	const char *s = src;
	char *d = dst;

	if (c->has_expert_bias) {
		/* the biases, after the matrices in both layouts: copied as they are */
		uint64_t b0 = moe_expert_bias_offset(c), b1 = moe_expert_bytes(c);
		uint64_t a = off > b0 ? off : b0, b = off + len < b1 ? off + len : b1;

		if (a < b)
			memcpy(d + cpu_bias_offset(c, dt, I) + (a - b0), s + (a - off), b - a);
	}
	/* the matrices of the blob, in store order: [gate], up, down */
	for (uint32_t m = 0; m <= nin && len; m++) {
		uint64_t m0 = m * in_store, m1 = m0 + (m < nin ? in_store : down_store);
		uint64_t a = off > m0 ? off : m0, b = off + len < m1 ? off + len : m1;

		if (a >= b)
			continue;
		if (m < nin)
			res_pack_bytes(dt, s + (a - off), I, H, a - m0, b - a, d + m * in_packed);
		else
			res_pack_bytes(dt, s + (a - off), H, I, a - m0, b - a, d + nin * in_packed);
	}
}

/* ------------------------------------------------------------------------ */

static void bufs_free(struct cpu *cpu)
{
	struct buf *all[] = { &cpu->xptr, &cpu->rxptr, &cpu->logits, &cpu->hbuf, &cpu->ybuf, &cpu->hptr,
			      &cpu->order, &cpu->pos, &cpu->tasks, &cpu->sh_h, &cpu->sh_y,
			      &cpu->sh_hptr };

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		free(all[i]->p);
	for (uint32_t i = 0; cpu->ws && i < cpu->nworkers; i++)
		free(cpu->ws[i].sel.p);
}

static void cpu_fini(struct moe_backend *be)
{
	struct cpu *cpu = be->priv;

	if (!cpu)
		return;
	moe_threadpool_free(cpu->pool);
	bufs_free(cpu);
	if (cpu->cur)
		free(cpu->cur->first);
	free(cpu->cur);
	free(cpu->ws);
	free(cpu);
	be->priv = NULL;
}

static int cpu_init(struct moe_backend *be, const struct moe_backend_options *opt,
		    struct moe_err *err)
{
	struct cpu *cpu;
	int r;

	if (!be)
		return 0;
	cpu = calloc(1, sizeof(*cpu));
	if (!cpu)
		return moe_err_set(err, -ENOMEM, "CPU backend: out of memory");
	r = moe_threadpool_new(opt ? opt->threads : 0, &cpu->pool);
	if (r < 0) {
		free(cpu);
		return moe_err_set(err, r, "CPU backend: cannot start worker threads: %s", strerror(-r));
	}
	cpu->nworkers = moe_threadpool_size(cpu->pool);
	cpu->ws = calloc(cpu->nworkers, sizeof(*cpu->ws));
	cpu->cur = calloc(1, sizeof(*cpu->cur));
	if (!cpu->ws || !cpu->cur) {
		free(cpu->cur);
		free(cpu->ws);
		moe_threadpool_free(cpu->pool);
		free(cpu);
		return moe_err_set(err, -ENOMEM, "CPU backend: out of memory");
	}
	be->priv = cpu;
	return 0;
}

const struct moe_backend_ops moe_backend_cpu_ops = {
	.name = "cpu",
	.init = cpu_init,
	.fini = cpu_fini,
	.route = cpu_route,
	.experts = cpu_experts,
	.blob_bytes = cpu_blob_bytes,
	.blob_prepare = cpu_blob_prepare,
	.blob_prepare_range = cpu_blob_prepare_range,
	.experts_begin = cpu_experts_begin,
	.experts_run = cpu_experts_run,
	.experts_end = cpu_experts_end,
};
