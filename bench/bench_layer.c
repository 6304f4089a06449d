/* SPDX-License-Identifier: MIT */
/*
 * bench_layer: the CPU backend on real MoE layer shapes against the
 * roofline measured in the same run.
 *
 * For each shape and batch size, each timed iteration routes a fresh random
 * batch through the real backend (router + experts + combine) and is
 * compared with its own roofline time:
 *
 *   roofline = max(bytes / read_bw, sum over matrices of flops / sgemm_rate)
 *
 *   bytes      the weights the batch touches: router (float32), every
 *              expert that got at least one token, the shared expert;
 *   read_bw    a read-only streaming probe over a buffer far larger than
 *              the caches, all threads, best of several passes;
 *   sgemm_rate OpenBLAS sgemm's FLOP/s on the same GEMM shapes (tokens of
 *              that expert x intermediate x hidden, and the down
 *              projection), operands hot in cache so it measures compute;
 *              the better of the rate at the expert's own token count and
 *              at 512 tokens, because sgemm is poor at a few rows and a
 *              roofline must bound the time from below, not excuse it.
 *
 * Successive iterations run on successive copies of the layer (the same
 * bytes at other addresses), enough copies for 8 times the last-level
 * cache (-L to choose), because a model's next layer never finds its
 * experts in the cache and a layer rerun alone would.
 *
 * Prints tokens/s and roofline/achieved time (1.0 = at the limit; above 1
 * means faster than the anchor, possible where OpenBLAS's kernel is not
 * the machine's best, e.g. AVX2 code on an AVX-512 CPU).  Timing only:
 * never part of make check.
 */
#include "config.h"

#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#include <immintrin.h>

#include "engine/backend.h"
#include "engine/dtype.h"
#include "engine/kernels.h"
#include "engine/model.h"
#include "engine/threadpool.h"
#include "benchutil.h"

static float rngf(uint64_t *s)
{
	return (float)((double)(bench_rng(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

/* 2 MiB aligned and backed by huge pages, as the engine's expert blobs are
 * (and the bandwidth probe's buffer, so the anchor is the strictest one). */
static void *xalloc(size_t bytes)
{
	size_t huge = 2u << 20, len = (bytes + huge - 1) / huge * huge;
	void *p;

	if (posix_memalign(&p, huge, len ? len : huge)) {
		fprintf(stderr, "bench_layer: out of memory (%zu bytes)\n", bytes);
		exit(1);
	}
	madvise(p, len ? len : huge, MADV_HUGEPAGE);
	return p;
}

/* bf16 weights filled fast: random 16-bit patterns with a fixed small
 * exponent, values in about +-[0.004, 0.008), like real weights */
static void fill_bf16(uint16_t *w, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i += 4) {
		uint64_t r = bench_rng(&seed);
		for (size_t j = 0; j < 4 && i + j < n; j++) {
			uint16_t m = (uint16_t)(r >> (16 * j));
			w[i + j] = (uint16_t)((m & 0x807f) | 0x3b80);
		}
	}
}

/* ------------------------------------------------------------------------ */
/* read-bandwidth probe                                                      */

struct probe {
	const char *buf;
	size_t chunk;
	double sums[64];
};

__attribute__((target("avx2")))
static void probe_task(void *ctx, size_t task, uint32_t worker)
{
	struct probe *p = ctx;
	const __m256i *v = (const __m256i *)(p->buf + task * p->chunk);
	__m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;

	for (size_t i = 0; i < p->chunk / 32; i += 4) {
		a0 = _mm256_xor_si256(a0, _mm256_load_si256(v + i));
		a1 = _mm256_xor_si256(a1, _mm256_load_si256(v + i + 1));
		a2 = _mm256_xor_si256(a2, _mm256_load_si256(v + i + 2));
		a3 = _mm256_xor_si256(a3, _mm256_load_si256(v + i + 3));
	}
	a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
	p->sums[worker % 64] += (double)_mm256_extract_epi64(a0, 0);
}

static double probe_bandwidth(struct moe_threadpool *pool, size_t bytes)
{
	struct probe p = { .chunk = 4u << 20 };
	char *buf = xalloc(bytes);
	double best = 0;

	for (size_t i = 0; i < bytes; i += 8)
		*(uint64_t *)(buf + i) = i * 0x9e3779b97f4a7c15ull;
	p.buf = buf;
	for (int rep = 0; rep < 5; rep++) {
		double t0 = bench_now();
		moe_threadpool_run(pool, bytes / p.chunk, probe_task, &p);
		double bw = (double)bytes / (bench_now() - t0);
		if (bw > best)
			best = bw;
	}
	free(buf);
	return best;
}

/* ------------------------------------------------------------------------ */
/* sgemm rate on a shape (m tokens x n outputs x k inputs), memoised          */

#define RATE_N 256

struct rate_cache {
	uint32_t k;
	double rate[4097];   /* by m; 0: not measured */
};

static double sgemm_rate_at(struct rate_cache *rc, uint32_t m);

static double sgemm_rate(struct rate_cache *rc, uint32_t m)
{
	double a = sgemm_rate_at(rc, m), b = sgemm_rate_at(rc, 512);

	return a > b ? a : b;
}

static double sgemm_rate_at(struct rate_cache *rc, uint32_t m)
{
	uint32_t k = rc->k;
	size_t key = m < 4096 ? m : 4096;

	if (rc->rate[key] > 0)
		return rc->rate[key];
	float *A = xalloc((size_t)m * k * sizeof(float));
	float *B = xalloc((size_t)RATE_N * k * sizeof(float));
	float *C = xalloc((size_t)m * RATE_N * sizeof(float));
	uint64_t s = 7;
	double best = 0, flops = 2.0 * m * RATE_N * k;
	int reps = (int)fmin(200, fmax(3, 2e9 / flops));

	for (size_t i = 0; i < (size_t)m * k; i++)
		A[i] = rngf(&s);
	for (size_t i = 0; i < (size_t)RATE_N * k; i++)
		B[i] = rngf(&s);
	for (int trial = 0; trial < 3; trial++) {
		double t0 = bench_now();
		for (int r = 0; r < reps; r++)
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, RATE_N, (int)k, 1.0f,
				    A, (int)k, B, (int)k, 0.0f, C, RATE_N);
		double rate = flops * reps / (bench_now() - t0);
		if (rate > best)
			best = rate;
	}
	free(A);
	free(B);
	free(C);
	rc->rate[key] = best;
	return best;
}

/* An FP8 blob in the store's layout (moe_matrix_bytes): random codes of
 * moderate magnitude (no NaN), scales about 2^-9, like DeepSeek-V3's. */
static void fill_fp8(uint8_t *blob, const struct moe_model_config *c, uint32_t inter, uint64_t seed)
{
	uint64_t H = c->hidden_size, pos = 0;

	for (int m = c->gated ? 0 : 1; m < 3; m++) {
		uint64_t N = m < 2 ? inter : H, K = m < 2 ? H : inter;
		uint64_t nb = (N + 127) / 128 * ((K + 127) / 128), so = moe_matrix_scales_offset(N, K);
		float *sc = (float *)(void *)(blob + pos + so);

		for (uint64_t i = 0; i < N * K; i += 8) {
			uint64_t r = bench_rng(&seed);
			for (uint64_t j = 0; j < 8 && i + j < N * K; j++)
				blob[pos + i + j] = (uint8_t)(((r >> (8 * j)) & 0xb7) | 0x20);
		}
		for (uint64_t i = 0; i < nb; i++)
			sc[i] = 0x1p-9f * (1.0f + (float)(bench_rng(&seed) >> 40) * 0x1p-24f);
		pos += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
	}
}

/* An MXFP4 blob in the store's layout: random codes, E8M0 scales about
 * 2^-6 (as gpt-oss's), then small float32 biases when the model has them. */
static void fill_mxfp4(uint8_t *blob, const struct moe_model_config *c, uint32_t inter, uint64_t seed)
{
	uint64_t H = c->hidden_size, pos = 0;

	for (int m = c->gated ? 0 : 1; m < 3; m++) {
		uint64_t N = m < 2 ? inter : H, K = m < 2 ? H : inter, so = moe_mxfp4_scales_offset(N, K);

		for (uint64_t i = 0; i < N * K / 2; i += 8) {
			uint64_t r = bench_rng(&seed);
			for (uint64_t j = 0; j < 8 && i + j < N * K / 2; j++)
				blob[pos + i + j] = (uint8_t)(r >> (8 * j));
		}
		for (uint64_t i = 0; i < N * K / 32; i++)
			blob[pos + so + i] = (uint8_t)(119 + bench_rng(&seed) % 4);
		pos += moe_matrix_bytes(MOE_DTYPE_MXFP4, N, K);
	}
	if (c->has_expert_bias) {
		float *b = (float *)(void *)(blob + moe_expert_bias_offset(c));

		for (uint64_t i = 0; i < moe_expert_bias_count(c); i++)
			b[i] = rngf(&seed) * 0.1f;
	}
}

/* An int4 blob in the store's layout (moe_q4_layout): random codes and
 * zero points, float16 or bfloat16 scales about 2^-7, a shuffled
 * permutation when the store has one. */
static void fill_int4(uint8_t *blob, const struct moe_model_config *c, uint32_t inter, uint64_t seed)
{
	uint64_t H = c->hidden_size, pos = 0;

	for (int m = c->gated ? 0 : 1; m < 3; m++) {
		uint64_t N = m < 2 ? inter : H, K = m < 2 ? H : inter;
		struct moe_q4_layout l;

		moe_q4_layout(c->q4_group, c->q4_flags, N, K, &l);
		for (uint64_t i = 0; i < N * K / 2; i++)
			blob[pos + i] = (uint8_t)bench_rng(&seed);
		for (uint64_t i = 0; i < N * l.groups; i++) {
			float sc = 0x1p-7f * (1.0f + (float)(bench_rng(&seed) >> 40) * 0x1p-24f);
			uint16_t h = c->q4_flags & MOE_Q4_BF16_SCALES ? moe_f32_to_bf16(sc) : moe_f32_to_f16(sc);

			memcpy(blob + pos + l.scales + 2 * i, &h, 2);
			if (l.zeros)
				blob[pos + l.zeros + i] = (uint8_t)(bench_rng(&seed) % 16);
		}
		if (l.perm) {
			uint32_t *p = (uint32_t *)(void *)(blob + pos + l.perm);

			for (uint64_t k = 0; k < K; k++)
				p[k] = (uint32_t)k;
			for (uint64_t k = K - 1; k > 0; k--) {
				uint64_t j = bench_rng(&seed) % (k + 1);
				uint32_t t = p[k];

				p[k] = p[j];
				p[j] = t;
			}
		}
		pos += l.bytes;
	}
}

static void fill_blob(void *blob, const struct moe_model_config *c, enum moe_dtype dt, uint32_t inter,
		      uint64_t bytes, uint64_t seed)
{
	if (dt == MOE_DTYPE_FP8_E4M3_B128)
		fill_fp8(blob, c, inter, seed);
	else if (dt == MOE_DTYPE_MXFP4)
		fill_mxfp4(blob, c, inter, seed);
	else if (dt == MOE_DTYPE_INT4)
		fill_int4(blob, c, inter, seed);
	else
		fill_bf16(blob, bytes / 2, seed);
	if (dt == MOE_DTYPE_BF16 && c->has_expert_bias) {     /* biases: floats, not bf16 pairs */
		float *b = (float *)(void *)((char *)blob + moe_expert_bias_offset(c));

		for (uint64_t i = 0; i < moe_expert_bias_count(c); i++)
			b[i] = rngf(&seed) * 0.1f;
	}
}

/* ------------------------------------------------------------------------ */

struct shape {
	const char *name;
	struct moe_model_config cfg;
};

/*
 * The last-level cache, in bytes (0 if unknown).  A quantized layer can
 * nearly fit in a large LLC (this VM's is 260 MiB; an int4 Qwen3-30B-A3B
 * layer is 340 MB), and re-running one layer would then read most experts
 * from the cache, which a model of 48 layers never allows: run_shape
 * rotates over enough copies of the layer to exceed it many times.
 */
static uint64_t llc_bytes(void)
{
	long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
	FILE *f;
	char buf[64];
	unsigned long long n = 0;
	char unit = 0;

	if (v > 0)
		return (uint64_t)v;
	f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
	if (!f)
		return 0;
	if (fgets(buf, sizeof(buf), f) && sscanf(buf, "%llu%c", &n, &unit) >= 1)
		n *= unit == 'K' ? 1024ull : unit == 'M' ? 1048576ull : 1ull;
	fclose(f);
	return n;
}

/* Copies of the layer rotated through: total experts >= LLC_FACTOR x the
 * LLC, at most ROTATE_MAX_BYTES of them (this machine's memory). */
#define LLC_FACTOR 8
#define ROTATE_MAX_BYTES (10ull << 30)
#define ROTATE_MAX_COPIES 16

static uint32_t n_rotate = 0;     /* -L: 0 = from the LLC */

static void run_shape(const struct shape *sh, struct moe_backend *be, struct moe_threadpool *pool,
		      const uint32_t *batches, size_t n_batches, double budget_s)
{
	const struct moe_model_config *c = &sh->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, Im = c->moe_intermediate_size, k = c->top_k;
	uint64_t ebytes = moe_expert_bytes(c), sbytes = moe_shared_bytes(c);
	struct rate_cache *rc_up = calloc(1, sizeof(*rc_up)), *rc_down = calloc(1, sizeof(*rc_down));
	uint64_t rbytes = be->ops->blob_bytes(c, c->weight_dtype, Im), layer_bytes = rbytes * E;
	uint64_t llc = llc_bytes();
	uint32_t L = n_rotate;
	if (!L) {
		L = llc ? (uint32_t)((LLC_FACTOR * llc + layer_bytes - 1) / layer_bytes) : 1;
		if (L > ROTATE_MAX_COPIES)
			L = ROTATE_MAX_COPIES;
		while (L > 1 && L * layer_bytes > ROTATE_MAX_BYTES)
			L--;
	}
	void **experts = calloc((size_t)E * L, sizeof(void *));
	float *router = xalloc((size_t)E * H * sizeof(float));
	float *bias = c->has_bias ? xalloc(E * sizeof(float)) : NULL;
	void *shared = NULL;
	uint64_t s = 1234;
	double t0 = bench_now();

	rc_up->k = H;
	rc_down->k = Im;
	/* weights made in the store's layout, then put in the backend's
	 * resident layout as the engine does when it loads them */
	void *staging = xalloc(ebytes > sbytes ? ebytes : sbytes);
	for (uint32_t e = 0; e < E; e++) {
		fill_blob(staging, c, c->weight_dtype, Im, ebytes, 1000 + e);
		experts[e] = xalloc(rbytes);
		be->ops->blob_prepare(c, c->weight_dtype, Im, staging, experts[e]);
	}
	/* the other copies: the same bytes at other addresses */
	for (uint32_t l = 1; l < L; l++)
		for (uint32_t e = 0; e < E; e++) {
			experts[(size_t)l * E + e] = xalloc(rbytes);
			memcpy(experts[(size_t)l * E + e], experts[e], rbytes);
		}
	if (sbytes) {
		fill_blob(staging, c, c->shared_dtype, c->shared_intermediate_size, sbytes, 999);
		shared = xalloc(be->ops->blob_bytes(c, c->shared_dtype, c->shared_intermediate_size));
		be->ops->blob_prepare(c, c->shared_dtype, c->shared_intermediate_size, staging, shared);
	}
	free(staging);
	for (size_t i = 0; i < (size_t)E * H; i++)
		router[i] = rngf(&s) * 2.0f / sqrtf((float)H);
	for (uint32_t e = 0; bias && e < E; e++)
		bias[e] = rngf(&s) * 0.05f;

	printf("\n%s: hidden %u, %u experts of %u (%s, %.1f MB each), top-%u%s (weights made in %.1f s)\n",
	       sh->name, H, E, Im, moe_dtype_name(c->weight_dtype), (double)ebytes / 1e6, k,
	       sbytes ? ", 1 shared expert" : "", bench_now() - t0);
	printf("  rotating over %u cop%s of the layer (%.0f MB of experts; LLC %.0f MiB): a batch never\n"
	       "  finds the previous batch's experts in the cache unless a model would\n",
	       L, L == 1 ? "y" : "ies", (double)layer_bytes * L / 1e6, (double)llc / 1048576.0);
	printf("  %6s %10s %10s %9s %10s %8s %10s %8s  %s\n", "tokens", "tokens/s", "ms/batch",
	       "experts", "MB read", "GB/s bw", "roof ms", "bound", "roofline/achieved");

	struct moe_layer_weights lw = {
		.cfg = c, .router = router, .bias = bias, .shared = shared,
		.experts = (const void *const *)experts,
	};
	for (size_t bi = 0; bi < n_batches; bi++) {
		uint32_t n = batches[bi];
		float *x = xalloc((size_t)n * H * sizeof(float));
		float *out = xalloc((size_t)n * H * sizeof(float));
		int32_t *ids = xalloc((size_t)n * k * sizeof(int32_t));
		float *w = xalloc((size_t)n * k * sizeof(float));
		uint32_t *cnt = calloc(E, sizeof(uint32_t));
		double ratios[64], times[64], roofs[64], mbs[64], touched[64];
		int iters = 0, compute_bound = 0;
		double spent = 0;
		/* the anchor, measured just before this batch size: the machine's
		 * bandwidth drifts over minutes on a shared host */
		double bw = probe_bandwidth(pool, (size_t)1 << 30);

		/* one warm-up, then timed iterations, each on a fresh batch */
		for (int it = -1; it < 64 && (it < 3 || spent < budget_s); it++) {
			for (size_t i = 0; i < (size_t)n * H; i++)
				x[i] = rngf(&s);
			lw.experts = (const void *const *)(experts + (size_t)((uint32_t)(it + 1) % L) * E);
			double a = bench_now();
			be->ops->route(be, &lw, x, n, ids, w, 0);
			be->ops->experts(be, &lw, x, n, k, ids, w, out, 0);
			double dt = bench_now() - a;
			if (it < 0)
				continue;
			spent += dt;

			memset(cnt, 0, E * sizeof(uint32_t));
			for (size_t i = 0; i < (size_t)n * k; i++)
				cnt[ids[i]]++;
			double bytes = (double)E * H * 4 + (double)sbytes, tflop = 0;
			uint32_t nt = 0;
			double mats = c->gated ? 2 : 1;
			for (uint32_t e = 0; e < E; e++) {
				if (!cnt[e])
					continue;
				nt++;
				bytes += (double)ebytes;
				tflop += mats * 2.0 * cnt[e] * H * Im / sgemm_rate(rc_up, cnt[e]);
				tflop += 2.0 * cnt[e] * H * Im / sgemm_rate(rc_down, cnt[e]);
			}
			if (sbytes) {
				uint32_t Is = c->shared_intermediate_size;
				/* shared expert at full batch: rate of the same m */
				tflop += (mats + 1) * 2.0 * n * H * Is / sgemm_rate(rc_up, n);
			}
			tflop += 2.0 * n * H * E / sgemm_rate(rc_up, n);   /* router */
			double tbw = bytes / bw, roof = tflop > tbw ? tflop : tbw;
			compute_bound += tflop > tbw;
			times[iters] = dt;
			roofs[iters] = roof;
			ratios[iters] = roof / dt;
			mbs[iters] = bytes / 1e6;
			touched[iters] = nt;
			iters++;
		}
		/* medians */
		for (int i = 0; i < iters; i++)
			for (int j = i + 1; j < iters; j++)
				if (ratios[j] < ratios[i]) {
					double t;
					t = ratios[i]; ratios[i] = ratios[j]; ratios[j] = t;
					t = times[i]; times[i] = times[j]; times[j] = t;
					t = roofs[i]; roofs[i] = roofs[j]; roofs[j] = t;
					t = mbs[i]; mbs[i] = mbs[j]; mbs[j] = t;
					t = touched[i]; touched[i] = touched[j]; touched[j] = t;
				}
		int m = iters / 2;
		printf("  %6u %10.1f %10.2f %9.0f %10.0f %8.1f %10.2f %8s  %.2f\n", n, n / times[m],
		       times[m] * 1e3, touched[m], mbs[m], bw / 1e9, roofs[m] * 1e3,
		       compute_bound * 2 > iters ? "compute" : "memory", ratios[m]);
		fflush(stdout);
		free(x);
		free(out);
		free(ids);
		free(w);
		free(cnt);
	}
	for (size_t e = 0; e < (size_t)E * L; e++)
		free(experts[e]);
	free(experts);
	free(router);
	free(bias);
	free(shared);
	free(rc_up);
	free(rc_down);
}

/* A numeric option in [lo, hi], or exit with a message. */
static long num_arg(char opt, const char *s, long lo, long hi)
{
	char *end;
	long v = strtol(s, &end, 10);

	if (*s == '\0' || *end || v < lo || v > hi) {
		fprintf(stderr, "bench_layer: -%c: expected a number in %ld..%ld, got '%s'\n", opt, lo, hi, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	static const uint32_t batches[] = { 1, 4, 16, 64, 2048 };
	struct moe_backend_options bo = { 0 };
	struct moe_threadpool *pool;
	struct moe_backend *be;
	struct moe_err err = { 0 };
	uint32_t ds_experts = 64, qw_experts = 128;
	double budget = 2.0;
	bool quick = false;
	int opt;

	uint32_t sel_batches[8];
	size_t n_sel = 0;
	const char *only = NULL;

	enum moe_dtype wdt = MOE_DTYPE_BF16;
	uint32_t q4_flags = 0;

	while ((opt = getopt(argc, argv, "t:d:qs:b:w:L:")) != -1) {
		switch (opt) {
		case 't': bo.threads = (uint32_t)num_arg('t', optarg, 1, 1024); break;
		case 'd': ds_experts = (uint32_t)num_arg('d', optarg, 8, 256); break;
		case 'q': quick = true; break;
		case 'L': n_rotate = (uint32_t)num_arg('L', optarg, 1, ROTATE_MAX_COPIES); break;
		case 's':
			only = optarg;
			if (strcmp(only, "qwen") && strcmp(only, "deepseek") && strcmp(only, "gpt-oss-20b")) {
				fprintf(stderr, "bench_layer: -s: qwen, deepseek or gpt-oss-20b, not '%s'\n", only);
				return 2;
			}
			break;
		case 'w':
			/* int4 as the releases hold it, groups of 128: GPTQ and AWQ
			 * with zero points and float16 scales (the same canonical
			 * bytes), GPTQ act-order with its permutation too,
			 * compressed-tensors symmetric with bfloat16 scales */
			if (!strcmp(optarg, "fp8")) {
				wdt = MOE_DTYPE_FP8_E4M3_B128;
			} else if (!strcmp(optarg, "mxfp4")) {
				wdt = MOE_DTYPE_MXFP4;
			} else if (!strcmp(optarg, "gptq") || !strcmp(optarg, "awq")) {
				wdt = MOE_DTYPE_INT4;
				q4_flags = MOE_Q4_ZEROS;
			} else if (!strcmp(optarg, "gptq-desc-act")) {
				wdt = MOE_DTYPE_INT4;
				q4_flags = MOE_Q4_ZEROS | MOE_Q4_PERM;
			} else if (!strcmp(optarg, "ct-int4")) {
				wdt = MOE_DTYPE_INT4;
				q4_flags = MOE_Q4_BF16_SCALES;
			} else if (strcmp(optarg, "bf16")) {
				fprintf(stderr, "bench_layer: -w: bf16, fp8, mxfp4, gptq, gptq-desc-act, awq or "
					"ct-int4, not '%s'\n", optarg);
				return 2;
			}
			break;
		case 'b':
			if (n_sel < 8)
				sel_batches[n_sel++] = (uint32_t)num_arg('b', optarg, 1, 4096);
			break;
		default:
			fprintf(stderr, "usage: bench_layer [-t THREADS] [-d DEEPSEEK_EXPERTS] [-q] "
				"[-s qwen|deepseek|gpt-oss-20b] [-b TOKENS]... [-L COPIES] "
				"[-w bf16|fp8|mxfp4|gptq|gptq-desc-act|awq|ct-int4]\n");
			return 2;
		}
	}
	if (ds_experts % 8) {
		fprintf(stderr, "bench_layer: -d: DeepSeek-V3's 8 expert groups need a multiple of 8\n");
		return 2;
	}
	const uint32_t *bl = n_sel ? sel_batches : batches;
	size_t nb = n_sel ? n_sel : sizeof(batches) / sizeof(batches[0]);
	if (quick) {
		ds_experts = 16;
		qw_experts = 32;
		budget = 0.3;
	}
	if (moe_backend_open("cpu", &bo, &be, &err) < 0 || moe_threadpool_new(bo.threads, &pool) < 0) {
		fprintf(stderr, "bench_layer: %s\n", err.msg);
		return 1;
	}
	openblas_set_num_threads((int)moe_threadpool_size(pool));

	printf("moed CPU layer benchmark: %u threads, kernel %s, OpenBLAS %s\n",
	       moe_threadpool_size(pool), moe_kern_isa_name(moe_kern_active()), openblas_get_config());
	printf("anchors (same run): read bandwidth (1 GiB, huge pages, all threads, read only,\n"
	       "  best of 5, measured before each batch size: column 'GB/s bw'); OpenBLAS sgemm\n"
	       "  on each expert GEMM shape (m x %d x hidden or intermediate, hot operands,\n"
	       "  the better of m = the expert's tokens and m = 512)\n", RATE_N);

	struct shape qwen = { "Qwen3-30B-A3B layer", {
		.arch = MOE_ARCH_QWEN3_MOE, .hidden_size = 2048, .moe_intermediate_size = 768,
		.num_experts = qw_experts, .top_k = 8, .num_hidden_layers = 1, .n_group = 1,
		.topk_group = 1, .scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY,
		.norm_topk_prob = true, .gated = true, .act = MOE_ACT_SILU,
		.routed_scaling_factor = 1.0f, .weight_dtype = MOE_DTYPE_BF16 } };
	struct shape ds = { "DeepSeek-V3 layer", {
		.arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 7168, .moe_intermediate_size = 2048,
		.num_experts = ds_experts, .top_k = 8, .num_hidden_layers = 1,
		.n_group = 8, .topk_group = 4, .n_shared_experts = 1, .shared_intermediate_size = 2048,
		.scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC,
		.norm_topk_prob = true, .has_bias = true, .gated = true, .act = MOE_ACT_SILU,
		.routed_scaling_factor = 2.5f, .weight_dtype = MOE_DTYPE_BF16,
		.shared_dtype = MOE_DTYPE_BF16 } };
	/* gpt-oss-20b's layer: 32 experts of 2880 x 2880, top-4, router and
	 * expert biases, the clamped SwiGLU; released in MXFP4 */
	struct shape oss = { "gpt-oss-20b layer", {
		.arch = MOE_ARCH_GPT_OSS, .hidden_size = 2880, .moe_intermediate_size = 2880,
		.num_experts = 32, .top_k = 4, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY, .norm_topk_prob = true,
		.has_bias = true, .has_expert_bias = true, .gated = true, .act = MOE_ACT_SWIGLU_OAI,
		.swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16 } };
	oss.cfg.weight_dtype = oss.cfg.shared_dtype = wdt;
	if ((wdt == MOE_DTYPE_FP8_E4M3_B128 || wdt == MOE_DTYPE_INT4) && only && !strcmp(only, "gpt-oss-20b")) {
		fprintf(stderr, "bench_layer: gpt-oss-20b has no FP8 or int4 layout (expert biases): "
			"-w bf16 or mxfp4, or -s qwen|deepseek\n");
		return 2;
	}
	qwen.cfg.weight_dtype = qwen.cfg.shared_dtype = wdt;
	ds.cfg.weight_dtype = ds.cfg.shared_dtype = wdt;
	if (wdt == MOE_DTYPE_INT4) {
		qwen.cfg.q4_group = ds.cfg.q4_group = 128;
		qwen.cfg.q4_flags = ds.cfg.q4_flags = q4_flags;
	}
	if (ds_experts < 256)
		printf("  (DeepSeek-V3 with %u of its 256 experts: %u x 88 MB must fit in RAM)\n",
		       ds_experts, ds_experts);
	if (!only || !strcmp(only, "qwen"))
		run_shape(&qwen, be, pool, bl, nb, budget);
	if (!only || !strcmp(only, "deepseek"))
		run_shape(&ds, be, pool, bl, nb, budget);
	if (only && !strcmp(only, "gpt-oss-20b"))      /* asked for only: the default run is unchanged */
		run_shape(&oss, be, pool, bl, nb, budget);
	moe_threadpool_free(pool);
	moe_backend_close(be);
	return 0;
}
