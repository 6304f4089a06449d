/* SPDX-License-Identifier: MIT */
/*
 * bench_gpu: the CUDA backend on real MoE layer shapes, every figure a ratio
 * to an anchor measured on the same device in the same run.
 *
 * bench_gpu [-t TORCH_RESULTS] [-r SECONDS] [-b TOKENS]... [-B BACKEND] NAME=STORE...
 * bench_gpu -p: say which device would be used (or exit 77), and stop
 *
 * For each store (one MoE layer is timed: the store's first), through the
 * engine API exactly as moed calls it (moe_engine_open with backend "cuda",
 * moe_engine_forward on float32 host buffers):
 *
 *   load       every routed expert pinned, so the host tier holds the whole
 *              layer before anything is timed (waits for the pager);
 *   host to    one 1-token forward (the router, the shared expert, the
 *   device     lazy CUDA set-up), then one forward with MOE_FWD_ALL_EXPERTS
 *              on 1 token: every expert not yet on the device is a device
 *              miss; bytes = device misses (moe_engine_get_stats) x the
 *              store's expert bytes, over the forward's time (the
 *              backend's own count of bytes and copy time is shown
 *              beside it).  Anchor: a cudaMemcpy of the same number of
 *              bytes from page-locked (cudaMallocHost) memory, in pieces
 *              of at most 1 GiB.  Then, after the layer timing, in steady
 *              state: a second engine whose device tier
 *              (moe_engine_options.device_bytes) holds half the experts,
 *              forwards over all of them, each missing about half;
 *   layer      batches of 1, 8, 64, 512 and 4096 tokens (random float32
 *              rows from a pool, a fresh slice for each forward), all
 *              experts resident on the device (the pass above put them
 *              there; device misses while timing are counted and shown):
 *              median microseconds per forward, and per forward
 *                bytes  = unique experts of the batch (from the routing ids
 *                         moe_engine_forward returns) x expert bytes, plus
 *                         the shared expert's;
 *                flops  = 2 x 3 x H x I per token per chosen expert (2 x 2
 *                         for plain experts), plus the shared expert's;
 *              GB/s as a ratio to the device-to-device cudaMemcpy anchor,
 *              TFLOP/s as a ratio to the cublasGemmEx anchor (medians of
 *              the per-forward ratios).  A row is memory-bound when its
 *              bytes at copy speed take longer than its flops at cuBLAS
 *              speed, compute-bound otherwise (the roofline), and is held
 *              to the target of that bound;
 *   dtypes     at the end, each store whose experts are not bf16 (FP8, say)
 *              against the bf16 store of the same shape (architecture,
 *              hidden size, expert size, experts, top-k) if one was timed
 *              too: tokens/s at each batch size and the speed-up; at 1
 *              token held to the target of its bytes (fp8 >= 1.7x, half
 *              the bytes of bf16).  The rows above already hold each store
 *              to the roofline of the bytes its format reads;
 *   PyTorch    with -t, the file bench/torch_moe.py wrote (same device, same
 *              weights, same batch sizes): its per-expert loop and batched
 *              times, and moed's speed-up over each (the target); and, for
 *              information, over the batched one fed float32 host buffers
 *              as moe_engine_forward is ("b+io").
 *
 * Anchors, once at the start:
 *   copy       cudaMemcpy device to device of 1 GiB, best of 5; counted as
 *              bytes read + bytes written, the traffic a streaming kernel
 *              can reach (half of it is the "bytes copied" figure);
 *   cuBLAS     cublasGemmEx 8192 x 8192 x 8192, bf16 in and out, float32
 *              accumulation (CUBLAS_COMPUTE_32F), random operands, best of 3;
 *   h2d        page-locked and pageable host to device cudaMemcpy (info).
 *
 * Columns also show "io us": the floor that moe_engine_forward's host
 * buffers put under each batch, a pageable cudaMemcpy of the float32 input
 * to the device and of the output back (measured, best of 3).  PyTorch's
 * times are on device tensors, without it.
 *
 * -B names another engine backend ("cpu"): a dry run of the benchmark's own
 * logic against the same anchors, not a measurement of the CUDA backend.
 *
 * Exits 77 when no CUDA device is usable.  Timing only: never part of make
 * check.  bench/run-gpu makes the stores, runs the PyTorch comparison and
 * this, and saves the output.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* the CUDA headers test macros that C leaves undefined (__cplusplus) */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wundef"
#include <cublas_v2.h>
#include <cuda_runtime.h>
#pragma GCC diagnostic pop

#include "engine/engine.h"
#include "engine/model.h"
#include "engine/store.h"
#include "benchutil.h"

/* The targets of the CUDA backend issue, printed beside each row. */
#define TARGET_DECODE 0.85     /* of copy bandwidth, memory-bound rows ... */
#define DECODE_MIN_BYTES 300e6 /* ... once the touched weights exceed this */
#define TARGET_PREFILL 0.65    /* of cuBLAS dense, compute-bound rows */
#define TARGET_H2D 0.85        /* of page-locked cudaMemcpy, host to device */
#define TARGET_FP8_SPEEDUP 1.7 /* fp8 over bf16 tokens/s at 1 token (half the bytes) */
#define MAX_STORES 16

#define GEMM_N 8192            /* the cuBLAS anchor's square size */
#define COPY_BYTES (1ull << 30) /* the device-to-device anchor's buffer */
#define PINNED_BYTES (1ull << 30) /* page-locked staging of the h2d anchor */
#define POOL_EXTRA 4096        /* pool rows beyond the largest batch */
#define MAX_BATCHES 16
#define MAX_REPS 400           /* timed forwards per batch size, at most */
#define MIN_REPS 5             /* ... and at least */
#define WARM_REPS 2            /* untimed forwards before each batch size */
#define LOAD_TIMEOUT_S 300     /* waiting for the host tier to fill */

/* uniform in [-sqrt(3), sqrt(3)): unit variance, as normalised hidden states */
static float rngf(uint64_t *s)
{
	return (float)(((double)(bench_rng(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0) * 1.7320508);
}

static void *xmalloc(size_t bytes)
{
	void *p = malloc(bytes ? bytes : 1);

	if (!p) {
		fprintf(stderr, "bench_gpu: out of memory (%zu bytes)\n", bytes);
		exit(1);
	}
	return p;
}

/* A CUDA runtime or cuBLAS failure in the benchmark's own code (the
 * anchors) is fatal: the run's figures would mean nothing without them. */
#define CUDA_OK(call) cuda_ok((call), #call, __LINE__)
#define CUBLAS_OK(call) cublas_ok((call), #call, __LINE__)

static void cuda_ok(cudaError_t rc, const char *what, int line)
{
	if (rc != cudaSuccess) {
		fprintf(stderr, "bench_gpu:%d: %s: %s (%s)\n", line, what, cudaGetErrorString(rc),
			cudaGetErrorName(rc));
		exit(1);
	}
}

static void cublas_ok(cublasStatus_t rc, const char *what, int line)
{
	if (rc != CUBLAS_STATUS_SUCCESS) {
		fprintf(stderr, "bench_gpu:%d: %s: cuBLAS status %d\n", line, what, (int)rc);
		exit(1);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ------------------------------------------------------------------------ */
/* anchors                                                                   */

struct anchors {
	double copy_bw;        /* device to device, (read + write) bytes/s */
	double gemm_flops;     /* cublasGemmEx bf16, FLOP/s */
	double h2d_pinned;     /* page-locked host to device, bytes/s (1 GiB) */
	double h2d_pageable;   /* malloc'ed host to device, bytes/s (256 MiB) */
	void *pinned;          /* PINNED_BYTES page-locked, for h2d_same_size() */
};

/* Seconds between two events recorded around work on the default stream. */
static double event_seconds(cudaEvent_t a, cudaEvent_t b)
{
	float ms = 0;

	CUDA_OK(cudaEventSynchronize(b));
	CUDA_OK(cudaEventElapsedTime(&ms, a, b));
	return ms * 1e-3;
}

static double measure_copy(void)
{
	void *src, *dst;
	cudaEvent_t a, b;
	double best = 0;

	CUDA_OK(cudaMalloc(&src, COPY_BYTES));
	CUDA_OK(cudaMalloc(&dst, COPY_BYTES));
	CUDA_OK(cudaMemset(src, 0x5a, COPY_BYTES));
	CUDA_OK(cudaEventCreate(&a));
	CUDA_OK(cudaEventCreate(&b));
	CUDA_OK(cudaMemcpy(dst, src, COPY_BYTES, cudaMemcpyDeviceToDevice));
	for (int rep = 0; rep < 5; rep++) {
		CUDA_OK(cudaEventRecord(a, 0));
		for (int i = 0; i < 4; i++)
			CUDA_OK(cudaMemcpyAsync(i % 2 ? src : dst, i % 2 ? dst : src, COPY_BYTES,
						cudaMemcpyDeviceToDevice, 0));
		CUDA_OK(cudaEventRecord(b, 0));
		double bw = 2.0 * 4 * (double)COPY_BYTES / event_seconds(a, b);
		if (bw > best)
			best = bw;
	}
	CUDA_OK(cudaEventDestroy(a));
	CUDA_OK(cudaEventDestroy(b));
	CUDA_OK(cudaFree(src));
	CUDA_OK(cudaFree(dst));
	return best;
}

/* bf16 bit patterns of uniform values in about +-[0.5, 1): random mantissa
 * and sign, so the tensor cores see real data (zeros run cooler and faster) */
static void fill_bf16(uint16_t *v, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i += 4) {
		uint64_t r = bench_rng(&seed);
		for (size_t j = 0; j < 4 && i + j < n; j++)
			v[i + j] = (uint16_t)(((r >> (16 * j)) & 0x807f) | 0x3f00);
	}
}

static double measure_gemm(void)
{
	size_t elems = (size_t)GEMM_N * GEMM_N, bytes = elems * 2;
	uint16_t *host = xmalloc(bytes);
	void *A, *B, *C;
	cublasHandle_t h;
	cudaEvent_t a, b;
	const float alpha = 1.0f, beta = 0.0f;
	double best = 0, flops = 2.0 * GEMM_N * GEMM_N * (double)GEMM_N;
	const int reps = 10;

	CUDA_OK(cudaMalloc(&A, bytes));
	CUDA_OK(cudaMalloc(&B, bytes));
	CUDA_OK(cudaMalloc(&C, bytes));
	fill_bf16(host, elems, 1);
	CUDA_OK(cudaMemcpy(A, host, bytes, cudaMemcpyHostToDevice));
	fill_bf16(host, elems, 2);
	CUDA_OK(cudaMemcpy(B, host, bytes, cudaMemcpyHostToDevice));
	free(host);
	CUBLAS_OK(cublasCreate(&h));
	CUDA_OK(cudaEventCreate(&a));
	CUDA_OK(cudaEventCreate(&b));
	for (int trial = -1; trial < 3; trial++) {     /* trial -1: warm-up */
		CUDA_OK(cudaEventRecord(a, 0));
		for (int r = 0; r < reps; r++)
			CUBLAS_OK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, GEMM_N, GEMM_N, GEMM_N, &alpha,
					       A, CUDA_R_16BF, GEMM_N, B, CUDA_R_16BF, GEMM_N, &beta,
					       C, CUDA_R_16BF, GEMM_N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
		CUDA_OK(cudaEventRecord(b, 0));
		double rate = flops * reps / event_seconds(a, b);
		if (trial >= 0 && rate > best)
			best = rate;
	}
	CUDA_OK(cudaEventDestroy(a));
	CUDA_OK(cudaEventDestroy(b));
	CUBLAS_OK(cublasDestroy(h));
	CUDA_OK(cudaFree(A));
	CUDA_OK(cudaFree(B));
	CUDA_OK(cudaFree(C));
	return best;
}

/*
 * Host to device bandwidth of @bytes from page-locked memory (the anchor's
 * PINNED_BYTES buffer, in pieces of at most that), best of 3.
 */
static double h2d_same_size(const struct anchors *an, uint64_t bytes)
{
	size_t piece = bytes < PINNED_BYTES ? (size_t)bytes : PINNED_BYTES;
	cudaEvent_t a, b;
	double best = 0;
	void *dst;

	if (!bytes)
		return 0;
	CUDA_OK(cudaMalloc(&dst, piece));
	CUDA_OK(cudaEventCreate(&a));
	CUDA_OK(cudaEventCreate(&b));
	CUDA_OK(cudaMemcpy(dst, an->pinned, piece, cudaMemcpyHostToDevice));
	for (int rep = 0; rep < 3; rep++) {
		CUDA_OK(cudaEventRecord(a, 0));
		for (uint64_t done = 0; done < bytes;) {
			size_t len = bytes - done < piece ? (size_t)(bytes - done) : piece;
			CUDA_OK(cudaMemcpyAsync(dst, an->pinned, len, cudaMemcpyHostToDevice, 0));
			done += len;
		}
		CUDA_OK(cudaEventRecord(b, 0));
		double bw = (double)bytes / event_seconds(a, b);
		if (bw > best)
			best = bw;
	}
	CUDA_OK(cudaEventDestroy(a));
	CUDA_OK(cudaEventDestroy(b));
	CUDA_OK(cudaFree(dst));
	return best;
}

/* Seconds of a pageable float32 round trip of @bytes each way (host to
 * device, device to host), best of 3: what moe_engine_forward's host
 * buffers cost at least. */
static double io_floor(size_t bytes)
{
	void *h = xmalloc(bytes), *d;
	double best = INFINITY;

	memset(h, 1, bytes);
	CUDA_OK(cudaMalloc(&d, bytes));
	for (int rep = 0; rep < 4; rep++) {
		double t0 = bench_now();
		CUDA_OK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
		CUDA_OK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
		double dt = bench_now() - t0;
		if (rep > 0 && dt < best)
			best = dt;
	}
	CUDA_OK(cudaFree(d));
	free(h);
	return best;
}

static void measure_anchors(struct anchors *an)
{
	size_t pageable = 256u << 20;
	void *h = xmalloc(pageable), *d;
	double t0;

	an->copy_bw = measure_copy();
	an->gemm_flops = measure_gemm();
	CUDA_OK(cudaMallocHost(&an->pinned, PINNED_BYTES));
	memset(an->pinned, 0x3c, PINNED_BYTES);
	an->h2d_pinned = h2d_same_size(an, PINNED_BYTES);
	memset(h, 0x3c, pageable);
	CUDA_OK(cudaMalloc(&d, pageable));
	CUDA_OK(cudaMemcpy(d, h, pageable, cudaMemcpyHostToDevice));
	an->h2d_pageable = 0;
	for (int rep = 0; rep < 3; rep++) {
		t0 = bench_now();
		CUDA_OK(cudaMemcpy(d, h, pageable, cudaMemcpyHostToDevice));
		double bw = (double)pageable / (bench_now() - t0);
		if (bw > an->h2d_pageable)
			an->h2d_pageable = bw;
	}
	CUDA_OK(cudaFree(d));
	free(h);
}

/* ------------------------------------------------------------------------ */
/* the PyTorch figures (bench/torch_moe.py --out)                            */

struct torch_row {
	char name[64];
	uint32_t tokens;
	double loop_us, batched_us;
	double batched_host_us;    /* with float32 host input and output; NAN if absent */
};

struct torch_rows {
	struct torch_row *v;
	size_t n;
	char batched_impl[128];    /* from its "# batched: ..." line */
};

static int torch_load(const char *path, struct torch_rows *tr)
{
	FILE *f = fopen(path, "r");
	char line[512];
	size_t cap = 0;

	if (!f) {
		fprintf(stderr, "bench_gpu: -t %s: %s\n", path, strerror(errno));
		return -errno;
	}
	while (fgets(line, sizeof(line), f)) {
		struct torch_row r = { .batched_host_us = NAN };

		if (!strncmp(line, "# batched: ", 11)) {
			if (tr->batched_impl[0])
				continue;      /* the first model's; the others say the same */
			snprintf(tr->batched_impl, sizeof(tr->batched_impl), "%s", line + 11);
			tr->batched_impl[strcspn(tr->batched_impl, "\n")] = '\0';
			continue;
		}
		if (line[0] == '#' || sscanf(line, "%63s %" SCNu32 " %lf %lf %lf", r.name, &r.tokens,
					     &r.loop_us, &r.batched_us, &r.batched_host_us) < 4)
			continue;
		if (tr->n == cap) {
			cap = cap ? 2 * cap : 32;
			tr->v = realloc(tr->v, cap * sizeof(*tr->v));
			if (!tr->v) {
				fclose(f);
				return -ENOMEM;
			}
		}
		tr->v[tr->n++] = r;
	}
	fclose(f);
	return 0;
}

static const struct torch_row *torch_find(const struct torch_rows *tr, const char *name, uint32_t tokens)
{
	for (size_t i = 0; i < tr->n; i++)
		if (tr->v[i].tokens == tokens && !strcmp(tr->v[i].name, name))
			return &tr->v[i];
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* one store                                                                 */

struct tally {
	unsigned met, missed, failed;
	char misses[4096];
};

static void tally_add(struct tally *t, bool ok, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void tally_add(struct tally *t, bool ok, const char *fmt, ...)
{
	size_t o = strlen(t->misses);
	va_list ap;

	if (ok) {
		t->met++;
		return;
	}
	t->missed++;
	if (o + 8 >= sizeof(t->misses))
		return;
	o += (size_t)snprintf(t->misses + o, sizeof(t->misses) - o, "  ");
	va_start(ap, fmt);
	o += (size_t)vsnprintf(t->misses + o, sizeof(t->misses) - o, fmt, ap);
	va_end(ap);
	if (o + 1 < sizeof(t->misses))
		snprintf(t->misses + o, sizeof(t->misses) - o, "\n");
}

/* One store's layer times, for the dtype comparison at the end. */
struct store_result {
	char name[64];
	struct moe_model_config cfg;
	double tps[MAX_BATCHES];   /* tokens/s of ro->batches[i]; 0: not measured */
	bool done;
};

struct run_opts {
	const char *backend;       /* engine backend: "cuda" (-B for a dry run) */
	const uint32_t *batches;
	size_t n_batches;
	double budget_s;           /* timed seconds per batch size */
	const struct torch_rows *torch;
};

static void engine_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level <= 4)
		fprintf(stderr, "bench_gpu: engine: %s\n", msg);
}

/* Wait until the pager has finished @want loads (the pinned experts). */
static int wait_loads(struct moe_engine *e, uint64_t want)
{
	struct moe_engine_stats st;
	double t0 = bench_now();

	for (;;) {
		moe_engine_get_stats(e, &st, NULL);
		if (st.pager.failed)
			return -EIO;
		if (st.pager.loads >= want)
			return 0;
		if (bench_now() - t0 > LOAD_TIMEOUT_S)
			return -ETIMEDOUT;
		usleep(5000);
	}
}

/* The device-tier figures of the whole engine (moe_engine_get_stats). */
struct dev_snap {
	uint64_t misses;     /* expert uses copied host to device */
	uint64_t bytes;      /* the bytes of those copies */
	uint64_t copy_ns;    /* the time of those copies, as the backend saw it */
};

static struct dev_snap dev_snap(struct moe_engine *e)
{
	struct moe_engine_stats st;

	moe_engine_get_stats(e, &st, NULL);
	return (struct dev_snap){ st.total.device_misses, st.total.device_bytes, st.total.device_copy_ns };
}

static uint64_t device_misses(struct moe_engine *e)
{
	return dev_snap(e).misses;
}

/*
 * Open @path on @backend with every routed expert pinned in the
 * host tier, and wait until they are all there.
 */
static int open_loaded(const char *name, const char *path, const char *backend, uint64_t device_bytes,
		       struct moe_engine **ret, double *load_s)
{
	struct moe_engine_options opt = { .backend = backend, .log = engine_log };
	struct moe_err err = { 0 };
	struct moe_store *s;
	struct moe_engine *e;
	char **pins;
	uint32_t L;
	double t0 = bench_now();
	int r;

	/* the layer list first, for the pins */
	r = moe_store_open(path, &s, &err);
	if (r < 0) {
		fprintf(stderr, "bench_gpu: %s: %s\n", name, err.msg);
		return r;
	}
	L = s->hdr.num_moe_layers;
	pins = calloc(L + 1, sizeof(*pins));
	for (uint32_t i = 0; pins && i < L; i++) {
		pins[i] = xmalloc(24);
		snprintf(pins[i], 24, "%" PRIu32 ":*", s->layers[i].layer);
	}
	moe_store_close(s);
	if (!pins) {
		fprintf(stderr, "bench_gpu: out of memory\n");
		return -ENOMEM;
	}
	opt.pin = (const char *const *)pins;
	opt.device_bytes = device_bytes;
	r = moe_engine_open(path, &opt, &e, &err);
	for (uint32_t i = 0; i < L; i++)
		free(pins[i]);
	free(pins);
	if (r < 0) {
		fprintf(stderr, "bench_gpu: %s: cannot open %s on the %s backend: %s\n", name, path, backend,
			err.msg);
		return r;
	}
	r = wait_loads(e, (uint64_t)L * moe_engine_config(e)->num_experts);
	if (r < 0) {
		fprintf(stderr, "bench_gpu: %s: the host tier did not fill: %s\n", name,
			r == -EIO ? "an expert failed to load" : "timed out");
		moe_engine_close(e);
		return r;
	}
	*load_s = bench_now() - t0;
	*ret = e;
	return 0;
}

static void fill_pool(float *pool, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		pool[i] = rngf(&seed);
}

/*
 * Host to device in steady state: an engine whose device tier
 * (moe_engine_options.device_bytes) holds half of the layer's experts, and
 * forwards over all of them, each of which misses about half (every one,
 * under LRU).
 */
static void paging_steady(const char *name, const char *path, const struct run_opts *ro,
			  const struct anchors *an, struct tally *tally)
{
	struct moe_err err = { 0 };
	struct moe_engine *e;
	double load_s, bws[8], bytes_v[8], t0 = bench_now();
	int reps = 0, r;

	struct moe_store *s;
	if (moe_store_open(path, &s, &err) < 0) {
		fprintf(stderr, "bench_gpu: %s: %s\n", name, err.msg);
		tally->failed++;
		return;
	}
	uint32_t E = s->cfg.num_experts, layer = s->layers[0].layer;
	uint64_t ebytes = s->hdr.expert_bytes, H = s->cfg.hidden_size;
	moe_store_close(s);
	if (open_loaded(name, path, ro->backend, (uint64_t)(E / 2) * ebytes, &e, &load_s) < 0) {
		tally->failed++;
		return;
	}
	float *x = xmalloc(H * sizeof(float)), *out = xmalloc(H * sizeof(float));
	uint64_t seed = 7;
	fill_pool(x, H, seed);
	for (int it = -1; it < 5; it++) {       /* -1: fills the device tier */
		uint64_t m0 = device_misses(e);
		double t1 = bench_now();
		r = moe_engine_forward(e, layer, x, 1, out, NULL, NULL, MOE_FWD_ALL_EXPERTS, &err);
		double dt = bench_now() - t1;
		if (r < 0) {
			fprintf(stderr, "bench_gpu: %s: forward over all experts with a device tier of %" PRIu32
				" experts: %s\n", name, E / 2, err.msg);
			tally->failed++;
			goto out;
		}
		uint64_t dm = device_misses(e) - m0;
		if (it >= 0 && dm) {
			bytes_v[reps] = (double)(dm * ebytes);
			bws[reps++] = (double)(dm * ebytes) / dt;
		}
	}
	if (!reps) {
		printf("  host -> device, steady state: NOT MEASURED: no device misses with a device tier of %" PRIu32
		       " of %" PRIu32 " experts\n", E / 2, E);
		tally_add(tally, false, "%s: host -> device (steady state) not measured", name);
		goto out;
	}
	double bytes = median(bytes_v, reps), bw = median(bws, reps), anchor = h2d_same_size(an, (uint64_t)bytes);
	printf("  host -> device, steady state (device tier of %" PRIu32 " of %" PRIu32 " experts, %d forwards over all,\n"
	       "    median %.2f GB of misses each): %.1f GB/s; page-locked cudaMemcpy %.1f GB/s: %.2f  [>= %.2f %s]\n",
	       E / 2, E, reps, bytes / 1e9, bw / 1e9, anchor / 1e9, bw / anchor, TARGET_H2D,
	       bw / anchor >= TARGET_H2D ? "ok" : "MISS");
	tally_add(tally, bw / anchor >= TARGET_H2D, "%s: host -> device (steady state) %.2f of page-locked memcpy (>= %.2f)",
		  name, bw / anchor, TARGET_H2D);
out:
	free(x);
	free(out);
	moe_engine_close(e);
	printf("  (steady-state paging took %.1f s, the host tier filled again in %.1f s)\n", bench_now() - t0, load_s);
}

static int run_store(const char *name, const char *path, const struct run_opts *ro,
		     const struct anchors *an, struct tally *tally, struct store_result *res)
{
	struct moe_err err = { 0 };
	struct moe_engine *e;
	double load_s, t_part;
	int r;

	r = open_loaded(name, path, ro->backend, 0, &e, &load_s);
	if (r < 0)
		return r;

	const struct moe_model_config *c = moe_engine_config(e);
	const struct moe_store *s = moe_engine_store(e);
	uint32_t E = c->num_experts, H = c->hidden_size, Im = c->moe_intermediate_size, k = c->top_k;
	uint32_t layer = s->layers[0].layer, maxn = 1;
	uint64_t ebytes = s->hdr.expert_bytes, sbytes = moe_shared_bytes(c);
	double mats = c->gated ? 3 : 2;
	double store_gb = (double)s->hdr.num_moe_layers * E * ebytes / 1e9;

	for (size_t i = 0; i < ro->n_batches; i++)
		if (ro->batches[i] > maxn)
			maxn = ro->batches[i];
	size_t pool_rows = (size_t)maxn + POOL_EXTRA;
	float *pool = xmalloc(pool_rows * H * sizeof(float));
	float *out = xmalloc((size_t)maxn * H * sizeof(float));
	int32_t *ids = xmalloc((size_t)maxn * k * sizeof(int32_t));
	float *w = xmalloc((size_t)maxn * k * sizeof(float));
	uint8_t *seen = xmalloc(E);
	uint64_t seed = 42;

	snprintf(res->name, sizeof(res->name), "%s", name);
	res->cfg = *c;
	printf("\n%s (%s), layer %" PRIu32 ": hidden %" PRIu32 ", %" PRIu32 " experts of %" PRIu32
	       " (%s, %.1f MB each), top-%" PRIu32 "%s\n", name, moe_arch_name(c->arch), layer, H, E, Im,
	       moe_dtype_name(c->weight_dtype), (double)ebytes / 1e6, k,
	       sbytes ? ", shared expert" : "");
	printf("  engine opened and host tier filled in %.1f s (%.2f GB of routed experts from the store)\n",
	       load_s, store_gb);
	t_part = bench_now();
	fill_pool(pool, pool_rows * H, seed);

	/* --- host to device: the first pass over the cold experts ----------- */
	r = moe_engine_forward(e, layer, pool, 1, out, ids, w, 0, &err);
	if (r < 0) {
		fprintf(stderr, "bench_gpu: %s: forward of 1 token: %s\n", name, err.msg);
		goto done;
	}
	struct dev_snap d0 = dev_snap(e);
	double t0 = bench_now();
	r = moe_engine_forward(e, layer, pool + H, 1, out, NULL, NULL, MOE_FWD_ALL_EXPERTS, &err);
	double cold_s = bench_now() - t0;
	if (r < 0) {
		fprintf(stderr, "bench_gpu: %s: forward over all experts: %s\n", name, err.msg);
		goto done;
	}
	struct dev_snap d1 = dev_snap(e);
	uint64_t cold_miss = d1.misses - d0.misses;
	if (!cold_miss) {
		printf("  host -> device: NOT MEASURED: the pass over all %" PRIu32 " experts had no device miss\n"
		       "    (the backend fills the device tier before the first use, or reports no misses)\n", E);
		tally_add(tally, false, "%s: host -> device not measured (no device misses)", name);
	} else {
		uint64_t bytes = cold_miss * ebytes, cb = d1.bytes - d0.bytes, cns = d1.copy_ns - d0.copy_ns;
		double bw = (double)bytes / cold_s, anchor = h2d_same_size(an, bytes), ratio = bw / anchor;
		printf("  host -> device, first pass over %" PRIu64 " cold experts (%.2f GB, one forward of %.1f ms):\n"
		       "    %.1f GB/s; page-locked cudaMemcpy of the same size %.1f GB/s: %.2f  [>= %.2f %s]\n",
		       cold_miss, (double)bytes / 1e9, cold_s * 1e3, bw / 1e9, anchor / 1e9, ratio, TARGET_H2D,
		       ratio >= TARGET_H2D ? "ok" : "MISS");
		if (cns)
			printf("    (the backend's own count: %.2f GB copied in %.1f ms of copying, %.1f GB/s)\n",
			       (double)cb / 1e9, (double)cns * 1e-6, (double)cb / (double)cns);
		tally_add(tally, ratio >= TARGET_H2D, "%s: host -> device %.2f of page-locked memcpy (>= %.2f)",
			  name, ratio, TARGET_H2D);
	}
	printf("  (paging took %.1f s)\n", bench_now() - t_part);

	/* --- the layer, all experts resident --------------------------------- */
	double t_layer = bench_now();
	int total_reps = 0;
	printf("  %6s %9s %7s %7s %8s %6s %5s %7s %6s %5s  %-16s %9s %6s %9s %6s %-10s %6s\n", "tokens",
	       "moed us", "io us", "experts", "MB", "GB/s", "/copy", "TFLOP/s", "/cuBLAS", "bound", "target",
	       "loop us", "/moed", "batch us", "/moed", "vs PyTorch", "b+io");
	for (size_t bi = 0; bi < ro->n_batches; bi++) {
		uint32_t n = ro->batches[bi];
		double times[MAX_REPS], bws[MAX_REPS], frs[MAX_REPS], uniq[MAX_REPS], spent = 0;
		double flops = mats * 2.0 * H * Im * (double)n * k +
			       (sbytes ? mats * 2.0 * H * c->shared_intermediate_size * (double)n : 0);
		double io = io_floor((size_t)n * H * sizeof(float));
		uint64_t miss0 = 0;
		int reps = 0;

		for (int it = -WARM_REPS; it < MAX_REPS && (it < MIN_REPS || spent < ro->budget_s); it++) {
			size_t off = (size_t)(bench_rng(&seed) % (pool_rows - n + 1));

			if (it == 0)
				miss0 = device_misses(e);
			t0 = bench_now();
			r = moe_engine_forward(e, layer, pool + off * H, n, out, ids, w, 0, &err);
			double dt = bench_now() - t0;
			if (r < 0) {
				fprintf(stderr, "bench_gpu: %s: forward of %" PRIu32 " tokens: %s\n", name, n, err.msg);
				goto done;
			}
			if (it < 0)
				continue;
			spent += dt;
			memset(seen, 0, E);
			uint32_t u = 0;
			for (size_t i = 0; i < (size_t)n * k; i++)
				if (ids[i] >= 0 && (uint32_t)ids[i] < E && !seen[ids[i]]) {
					seen[ids[i]] = 1;
					u++;
				}
			double bytes = (double)u * (double)ebytes + (double)sbytes;
			times[reps] = dt;
			uniq[reps] = u;
			bws[reps] = bytes / dt;
			frs[reps] = flops / dt;
			reps++;
		}
		uint64_t miss = device_misses(e) - miss0;
		double t = median(times, reps), bw = median(bws, reps), fr = median(frs, reps);
		res->tps[bi] = n / t;
		double u = median(uniq, reps), bytes = u * (double)ebytes + (double)sbytes;
		bool membound = bytes / an->copy_bw >= flops / an->gemm_flops;
		double rb = bw / an->copy_bw, rf = fr / an->gemm_flops;
		char target[32], lus[16] = "-", lr[16] = "-", bus[16] = "-", br[16] = "-", vs[16] = "-";
		char hr[16] = "-";
		bool ok;

		if (membound && bytes <= DECODE_MIN_BYTES) {
			snprintf(target, sizeof(target), "n/a (<%.0f MB)", DECODE_MIN_BYTES / 1e6);
		} else if (membound) {
			ok = rb >= TARGET_DECODE;
			snprintf(target, sizeof(target), "bw>=%.2f %s", TARGET_DECODE, ok ? "ok" : "MISS");
			tally_add(tally, ok, "%s, %" PRIu32 " tokens: %.2f of copy bandwidth (>= %.2f)", name, n,
				  rb, TARGET_DECODE);
		} else {
			ok = rf >= TARGET_PREFILL;
			snprintf(target, sizeof(target), "flops>=%.2f %s", TARGET_PREFILL, ok ? "ok" : "MISS");
			tally_add(tally, ok, "%s, %" PRIu32 " tokens: %.2f of cuBLAS (>= %.2f)", name, n, rf,
				  TARGET_PREFILL);
		}
		const struct torch_row *tr = ro->torch ? torch_find(ro->torch, name, n) : NULL;
		if (tr) {
			double sl = tr->loop_us / (t * 1e6), sb = tr->batched_us / (t * 1e6);
			snprintf(lus, sizeof(lus), "%.1f", tr->loop_us);
			snprintf(lr, sizeof(lr), "%.2f", sl);
			snprintf(bus, sizeof(bus), "%.1f", tr->batched_us);
			snprintf(br, sizeof(br), "%.2f", sb);
			if (!isnan(tr->batched_host_us))
				snprintf(hr, sizeof(hr), "%.2f", tr->batched_host_us / (t * 1e6));
			ok = sl > 1 && sb > 1;
			snprintf(vs, sizeof(vs), ">1 %s", ok ? "ok" : "MISS");
			tally_add(tally, ok, "%s, %" PRIu32 " tokens: %.2fx the loop, %.2fx the batched PyTorch (> 1)",
				  name, n, sl, sb);
		} else if (ro->torch && c->weight_dtype == MOE_DTYPE_BF16) {
			/* torch_moe.py runs the bf16 checkpoints only: the other
			 * dtypes are compared with their bf16 store at the end */
			tally_add(tally, false, "%s, %" PRIu32 " tokens: no PyTorch figure", name, n);
		}
		printf("  %6" PRIu32 " %9.1f %7.1f %7.0f %8.0f %6.0f %5.2f %7.1f %6.2f %5s  %-16s %9s %6s %9s %6s %-10s %6s\n",
		       n, t * 1e6, io * 1e6, u, bytes / 1e6, bw / 1e9, rb, fr / 1e12, rf,
		       membound ? "mem" : "comp", target, lus, lr, bus, br, vs, hr);
		if (miss)
			printf("         ^ %" PRIu64 " device misses while timing: the device tier did not hold the layer\n",
			       miss);
		fflush(stdout);
		total_reps += reps;
	}
	printf("  (layer timing took %.1f s: %d timed forwards, each batch size after %d untimed)\n",
	       bench_now() - t_layer, total_reps, WARM_REPS);
	res->done = true;
	r = 0;
done:
	moe_engine_close(e);
	free(pool);
	free(out);
	free(ids);
	free(w);
	free(seen);
	return r;
}

/* ------------------------------------------------------------------------ */

/* The same layer shape, whatever the dtype of its weights. */
static bool same_shape(const struct moe_model_config *a, const struct moe_model_config *b)
{
	return a->arch == b->arch && a->hidden_size == b->hidden_size &&
	       a->moe_intermediate_size == b->moe_intermediate_size && a->num_experts == b->num_experts &&
	       a->top_k == b->top_k && a->shared_intermediate_size == b->shared_intermediate_size;
}

/*
 * Each store of another expert dtype against the bf16 store of its shape:
 * tokens/s at each batch size and the speed-up, the one at 1 token held to
 * the target of its bytes.
 */
static void compare_dtypes(const struct store_result *rs, size_t nr, const struct run_opts *ro,
			   struct tally *tally)
{
	bool header = false;

	for (size_t i = 0; i < nr; i++) {
		const struct store_result *q = &rs[i], *b = NULL;

		if (!q->done || q->cfg.weight_dtype == MOE_DTYPE_BF16)
			continue;
		for (size_t j = 0; j < nr && !b; j++)
			if (rs[j].done && rs[j].cfg.weight_dtype == MOE_DTYPE_BF16 && same_shape(&rs[j].cfg, &q->cfg))
				b = &rs[j];
		if (!header) {
			printf("\nexpert dtypes against bf16 of the same layer shape (tokens/s, median forwards):\n");
			header = true;
		}
		if (!b) {
			printf("  %s (%s): no bf16 store of its shape was timed\n", q->name,
			       moe_dtype_name(q->cfg.weight_dtype));
			continue;
		}
		printf("  %s (%s) against %s (bf16)\n  %6s %12s %12s %8s  %s\n", q->name,
		       moe_dtype_name(q->cfg.weight_dtype), b->name, "tokens", "tok/s", "bf16 tok/s", "speed-up",
		       "target");
		for (size_t bi = 0; bi < ro->n_batches; bi++) {
			uint32_t n = ro->batches[bi];
			double sp = b->tps[bi] > 0 ? q->tps[bi] / b->tps[bi] : 0;
			char target[32] = "";

			if (n == 1 && q->cfg.weight_dtype == MOE_DTYPE_FP8_E4M3_B128) {
				bool ok = sp >= TARGET_FP8_SPEEDUP;
				snprintf(target, sizeof(target), ">= %.1f %s", TARGET_FP8_SPEEDUP, ok ? "ok" : "MISS");
				tally_add(tally, ok, "%s: %.2fx the tokens/s of %s (bf16) at 1 token (>= %.1f)", q->name,
					  sp, b->name, TARGET_FP8_SPEEDUP);
			}
			printf("  %6" PRIu32 " %12.0f %12.0f %8.2f  %s\n", n, q->tps[bi], b->tps[bi], sp, target);
		}
	}
}

static long num_arg(char opt, const char *s, long lo, long hi)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (*s == '\0' || *end || v < lo || v > hi) {
		fprintf(stderr, "bench_gpu: -%c: expected a number in %ld..%ld, got '%s'\n", opt, lo, hi, s);
		exit(2);
	}
	return v;
}

static void usage(void)
{
	fprintf(stderr, "usage: bench_gpu [-t TORCH_RESULTS] [-r SECONDS] [-b TOKENS]... [-B BACKEND] NAME=STORE...\n"
		"       bench_gpu -p\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const uint32_t default_batches[] = { 1, 8, 64, 512, 4096 };
	uint32_t batches[MAX_BATCHES];
	size_t nb = 0;
	struct torch_rows torch = { 0 };
	const char *torch_path = NULL;
	struct run_opts ro = { .backend = "cuda", .budget_s = 0.3 };
	struct anchors an = { 0 };
	struct tally tally = { 0 };
	struct cudaDeviceProp prop;
	int opt, ndev = 0, drv = 0, rt = 0, cbv = 0;
	cudaError_t rc;
	cublasHandle_t h;
	double t0, t_all = bench_now();
	char *end;
	bool probe = false;

	/* a run stopped by a time limit keeps what it printed */
	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "t:r:b:B:ph")) != -1) {
		switch (opt) {
		case 'p': probe = true; break;
		case 'B': ro.backend = optarg; break;
		case 't': torch_path = optarg; break;
		case 'r':
			ro.budget_s = strtod(optarg, &end);
			if (*end || !(ro.budget_s > 0 && ro.budget_s <= 60)) {
				fprintf(stderr, "bench_gpu: -r: seconds in (0, 60], got '%s'\n", optarg);
				return 2;
			}
			break;
		case 'b':
			if (nb == MAX_BATCHES) {
				fprintf(stderr, "bench_gpu: -b: at most %d batch sizes\n", MAX_BATCHES);
				return 2;
			}
			batches[nb++] = (uint32_t)num_arg('b', optarg, 1, 65536);
			break;
		default: usage();
		}
	}
	if (optind == argc && !probe)
		usage();
	for (int i = optind; i < argc; i++)
		if (!strchr(argv[i], '=') || argv[i][0] == '=' || strlen(argv[i]) - strcspn(argv[i], "=") < 2)
			usage();
	ro.batches = nb ? batches : default_batches;
	ro.n_batches = nb ? nb : sizeof(default_batches) / sizeof(default_batches[0]);

	rc = cudaGetDeviceCount(&ndev);
	if (rc != cudaSuccess || ndev == 0) {
		fprintf(stderr, "bench_gpu: no usable CUDA device (%s): skipped\n",
			rc != cudaSuccess ? cudaGetErrorString(rc) : "the driver reports none");
		return 77;
	}
	if (probe) {
		CUDA_OK(cudaGetDeviceProperties(&prop, 0));
		printf("%s (compute %d.%d), 1 of %d device%s\n", prop.name, prop.major, prop.minor, ndev,
		       ndev > 1 ? "s" : "");
		return 0;
	}
	if (torch_path && torch_load(torch_path, &torch) < 0)
		return 1;
	ro.torch = torch_path ? &torch : NULL;
	if (!getenv("MOE_BACKEND_DIR"))
		fprintf(stderr, "bench_gpu: MOE_BACKEND_DIR is not set: the CUDA module comes from %s\n",
			MOE_BACKEND_DIR);

	CUDA_OK(cudaSetDevice(0));
	CUDA_OK(cudaGetDeviceProperties(&prop, 0));
	CUDA_OK(cudaDriverGetVersion(&drv));
	CUDA_OK(cudaRuntimeGetVersion(&rt));
	CUBLAS_OK(cublasCreate(&h));
	CUBLAS_OK(cublasGetVersion(h, &cbv));
	CUBLAS_OK(cublasDestroy(h));
	printf("moed CUDA backend benchmark: %s (compute %d.%d, %d SMs, %.0f GiB), driver %d.%d, runtime %d.%d, "
	       "cuBLAS %d\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
	       (double)prop.totalGlobalMem / (1u << 30), drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10, cbv);

	t0 = bench_now();
	measure_anchors(&an);
	printf("anchors (same run, same device; took %.1f s):\n"
	       "  copy     cudaMemcpy device to device, 1 GiB, best of 5: %.0f GB/s read + write (%.0f GB/s copied)\n"
	       "  cuBLAS   cublasGemmEx %dx%dx%d bf16, float32 accumulation, best of 3: %.0f TFLOP/s\n"
	       "  h2d      cudaMemcpy host to device, 1 GiB page-locked: %.1f GB/s; 256 MiB pageable: %.1f GB/s\n",
	       bench_now() - t0, an.copy_bw / 1e9, an.copy_bw / 2e9, GEMM_N, GEMM_N, GEMM_N, an.gemm_flops / 1e12,
	       an.h2d_pinned / 1e9, an.h2d_pageable / 1e9);
	printf("targets: memory-bound rows over %.0f MB >= %.2f of copy; compute-bound rows >= %.2f of cuBLAS;\n"
	       "  faster than both PyTorch implementations at every size; host to device >= %.2f of page-locked\n",
	       DECODE_MIN_BYTES / 1e6, TARGET_DECODE, TARGET_PREFILL, TARGET_H2D);
	printf("columns: moed us = median microseconds per moe_engine_forward (float32 host in and out); io us =\n"
	       "  pageable float32 copies of its input and output alone; experts, MB = median unique experts\n"
	       "  of a batch and their bytes (+ shared); bound = roofline (bytes at copy speed vs flops at cuBLAS\n"
	       "  speed); loop us, batch us = PyTorch on device tensors (bench/torch_moe.py), /moed = speed-up;\n"
	       "  b+io = speed-up over PyTorch batched with float32 host input and output, as moed has (info)\n");
	if (strcmp(ro.backend, "cuda"))
		printf("DRY RUN: the engine runs on the %s backend (-B), not on the CUDA backend\n", ro.backend);
	if (ro.torch)
		printf("PyTorch (%s): loop = Hugging Face's per-expert loop; batched = %s\n", torch_path,
		       torch.batched_impl[0] ? torch.batched_impl : "(not said)");

	int status = 0;
	struct store_result results[MAX_STORES] = { 0 };
	size_t nres = 0;
	for (int i = optind; i < argc; i++) {
		char name[64];
		size_t len = strcspn(argv[i], "=");
		struct store_result scratch, *res = nres < MAX_STORES ? &results[nres++] : &scratch;

		memset(res, 0, sizeof(*res));
		snprintf(name, sizeof(name), "%.*s", (int)(len < sizeof(name) ? len : sizeof(name) - 1), argv[i]);
		t0 = bench_now();
		if (run_store(name, argv[i] + len + 1, &ro, &an, &tally, res) < 0) {
			status = 1;
			tally.failed++;
		} else {
			paging_steady(name, argv[i] + len + 1, &ro, &an, &tally);
		}
		printf("  (%s took %.1f s)\n", name, bench_now() - t0);
		fflush(stdout);
	}
	compare_dtypes(results, nres, &ro, &tally);
	printf("\ntargets met: %u, missed: %u%s\n%s", tally.met, tally.missed,
	       tally.failed ? ", and some measurements FAILED (see above and stderr)" : "", tally.misses);
	printf("bench_gpu took %.1f s\n", bench_now() - t_all);
	CUDA_OK(cudaFreeHost(an.pinned));
	free(torch.v);
	return status;
}
