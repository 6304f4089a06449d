/* SPDX-License-Identifier: MIT */
/*
 * gen-model's values: element i of a tensor is a pure function of the
 * tensor's key (seed, name) and i, so files are bit-identical run to run,
 * independent of sharding and write order; and the router skew, row scales
 * that give experts a Zipf-like popularity.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <jansson.h>

#include "genmodel_impl.h"

/* ------------------------------------------------------------- values */

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Chris Wellons' lowbias32: a 32-bit bijection with good avalanche, cheap
 * enough (two 32-bit multiplies) for the compiler to vectorise. */
static inline uint32_t hash32(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return x;
}

uint64_t gen_tensor_key(uint64_t seed, const char *name)
{
	uint64_t h = 0xcbf29ce484222325ull;   /* FNV-1a */

	for (const unsigned char *c = (const unsigned char *)name; *c; c++)
		h = (h ^ *c) * 0x100000001b3ull;
	return mix64(seed ^ h);
}

/* Four lanes with GCC/clang vector extensions: portable C that compiles to
 * SSE2/NEON at -O2, where the plain loop does not vectorise.  16 bytes so
 * that no vector crosses a function boundary in a wider register (-Wpsabi). */
typedef uint32_t gen_u32x4 __attribute__((vector_size(16)));
typedef int32_t gen_i32x4 __attribute__((vector_size(16)));
typedef float gen_f32x4 __attribute__((vector_size(16)));
typedef uint16_t gen_u16x4 __attribute__((vector_size(8)));

/* The value of the element whose hash input is @x: top 24 bits of the
 * hash, centred, times @scale: uniform in (-amp, amp). */
static inline float gen1(uint32_t x, float scale)
{
	return ((float)(int32_t)(hash32(x) >> 8) - 8388607.5f) * scale;
}

static inline gen_f32x4 gen4(uint32_t x0, float scale)
{
	gen_u32x4 x = x0 + (gen_u32x4){ 0, 1, 2, 3 };

	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return (__builtin_convertvector((gen_i32x4)(x >> 8), gen_f32x4) - 8388607.5f) * scale;
}

/* bfloat16 round to nearest even; the values are finite, no NaN case. */
static inline uint16_t bf16_rne(float v)
{
	uint32_t u;

	memcpy(&u, &v, sizeof(u));
	return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Element @i of @out in @dt, rounded as the vector paths round. */
static inline void gen_store(enum moe_dtype dt, void *out, size_t i, float v)
{
	switch (dt) {
	case MOE_DTYPE_BF16:
		((uint16_t *)out)[i] = bf16_rne(v);
		break;
	case MOE_DTYPE_F16:
		((uint16_t *)out)[i] = moe_f32_to_f16(v);
		break;
	default:
		((float *)out)[i] = v;
		break;
	}
}

/*
 * Elements [first, first + count) of tensor @t into @out; the range must not
 * cross a multiple of 2^32 elements.  Element i is
 *     gen1(lo32(i) + base),  base = lo32(mix64(key + hi32(i)))
 * a pure function of the key and i, so any chunk can be generated alone and
 * the vector and scalar paths agree bit for bit.
 */
void gen_values(const struct gen_tensor *t, uint64_t key, uint64_t first, size_t count, void *out)
{
	float scale = t->amp / 8388608.0f;
	uint32_t x0 = (uint32_t)first + (uint32_t)mix64(key + (first >> 32));
	size_t i = 0;

	if (t->fill == FILL_ONES) {
		for (i = 0; i < count; i++) {
			if (t->dtype == MOE_DTYPE_F32)
				((float *)out)[i] = 1.0f;
			else
				((uint16_t *)out)[i] = t->dtype == MOE_DTYPE_BF16 ? 0x3f80 : 0x3c00;
		}
		return;
	}
	if (t->fill == FILL_ROUTER) {
		/* gen1 is what gen4 computes, so row j is the unskewed row
		 * times its factor, rounded once.  Routers are small: scalar. */
		uint64_t cols = t->shape[1];

		for (i = 0; i < count; i++) {
			float f = t->row_scale[(first + i) / cols];

			gen_store(t->dtype, out, i, gen1(x0 + (uint32_t)i, scale) * f);
		}
		return;
	}
	switch (t->dtype) {
	case MOE_DTYPE_BF16: {
		uint16_t *o = out;

		for (; i + 4 <= count; i += 4) {
			gen_f32x4 f = gen4(x0 + (uint32_t)i, scale);
			gen_u32x4 u;
			gen_u16x4 h;

			memcpy(&u, &f, sizeof(u));
			h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, gen_u16x4);
			memcpy(o + i, &h, sizeof(h));
		}
		for (; i < count; i++)
			o[i] = bf16_rne(gen1(x0 + (uint32_t)i, scale));
		break;
	}
	case MOE_DTYPE_F16: {
		uint16_t *o = out;

		for (; i < count; i++)
			o[i] = moe_f32_to_f16(gen1(x0 + (uint32_t)i, scale));
		break;
	}
	default: {
		float *o = out;

		for (; i + 4 <= count; i += 4) {
			gen_f32x4 f = gen4(x0 + (uint32_t)i, scale);

			memcpy(o + i, &f, sizeof(f));
		}
		for (; i < count; i++)
			o[i] = gen1(x0 + (uint32_t)i, scale);
		break;
	}
	}
}

/* ---------------------------------------------------------------- FP8 */

/*
 * FP8 as DeepSeek-V3's release holds it (and its inference/kernel.py
 * act_quant computes scales): per 128 x 128 block, scale = max |w| / 448,
 * code = e4m3(w / scale) rounded to nearest even, from the float32 values
 * the same tensor has in an f32 checkpoint; partial blocks at the edges.
 * The quantizer is engine/dtype.c's, which pack --quantize fp8 shares.
 */

/* The float32 values of rows [r0, r0 + n) of the FILL_FP8 tensor @t. */
static void fp8_rows(const struct gen_tensor *t, uint64_t key, uint64_t r0, uint64_t n, float *tmp)
{
	struct gen_tensor f = *t;

	f.dtype = MOE_DTYPE_F32;
	f.fill = FILL_RANDOM;
	gen_values(&f, key, r0 * t->shape[1], (size_t)(n * t->shape[1]), tmp);
}

void gen_fp8_band(const struct gen_tensor *t, uint64_t key, uint64_t r0, float *tmp, uint8_t *out)
{
	uint64_t rows = t->shape[0], cols = t->shape[1];
	uint64_t n = rows - r0 < GEN_FP8_BAND ? rows - r0 : GEN_FP8_BAND;
	float sc[(1u << 16) / MOE_FP8_BLOCK];    /* cols <= 65536 (gen_resolve) */

	fp8_rows(t, key, r0, n, tmp);
	moe_fp8_quantize_band(tmp, n, cols, out, sc);
}

void gen_fp8_scales(const struct gen_tensor *w, uint64_t key, float *tmp, float *out)
{
	uint64_t rows = w->shape[0], cols = w->shape[1];
	uint64_t kb = (cols + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;

	for (uint64_t r0 = 0; r0 < rows; r0 += GEN_FP8_BAND) {
		uint64_t n = rows - r0 < GEN_FP8_BAND ? rows - r0 : GEN_FP8_BAND;

		fp8_rows(w, key, r0, n, tmp);
		moe_fp8_band_scales(tmp, n, cols, out + r0 / GEN_FP8_BAND * kb);
	}
}

/* -------------------------------------------------------- router skew */

/*
 * Why row scales: the router is a linear map without a bias, and test
 * inputs (forward --random-input, a layer's input plus a small change) are
 * roughly symmetric around zero, so no weight can make an expert popular
 * for every token: top-k(-x) is the bottom-k of x.  What a row's norm does
 * set is how often its logit clears the top-k threshold.  With logits
 * f_j * g_j, g_j ~ N(0, s^2), and the k-th largest logit taken as a
 * constant T, expert j is chosen with probability Q(T / (f_j s)), Q the
 * normal tail; so f_j = 1 / Qinv(p_j) (up to a common factor) asks for
 * probability p_j.  The targets p_j follow a Zipf-Mandelbrot curve over
 * the popularity rank, (r + E/16)^-S: the offset keeps the head from being
 * a handful of experts, so S = 1 gives a max/mean load of about 5 at 128
 * or 256 experts, top-8, and a long smooth tail.  deepseek_v3's
 * e_score_correction_bias, which could favour experts for every token, is
 * left as it is: the real one is trained to even the load out.
 */

/* The offset of the Zipf-Mandelbrot curve, as a fraction of the experts. */
#define GEN_SKEW_OFFSET_DIV 16.0
/* The most tokens one expert is asked for: symmetric inputs allow under
 * 1/2, and the row scale for 1/2 is infinite. */
#define GEN_SKEW_PMAX 0.45
/* Qinv is searched in [0, 8]: Q(8) = 6e-16, below any target p. */
#define GEN_SKEW_ZMAX 8.0
/* Tells the key of the popularity order from the key of the values. */
#define GEN_SKEW_SALT 0x5a1f0c0ffee5eedull

/* The z with P(N(0,1) > z) = @p, 0 < p <= 1/2; bisection to double
 * precision (60 halvings of [0, 8]). */
static double gauss_tail_inv(double p)
{
	double lo = 0.0, hi = GEN_SKEW_ZMAX;

	for (int i = 0; i < 60; i++) {
		double mid = 0.5 * (lo + hi);

		if (0.5 * erfc(mid * 0.70710678118654752440) > p)
			lo = mid;
		else
			hi = mid;
	}
	return 0.5 * (lo + hi);
}

/* Unnormalised scale of the expert of popularity rank @r (0: hottest). */
static double skew_raw(uint32_t r, uint32_t E, uint32_t k, double S, double zipf_sum)
{
	double p = k * pow(r + 1 + E / GEN_SKEW_OFFSET_DIV, -S) / zipf_sum;

	return 1.0 / gauss_tail_inv(p < GEN_SKEW_PMAX ? p : GEN_SKEW_PMAX);
}

/*
 * The row factors of one router [E, H] into @f[E]: a popularity order from
 * @key (Fisher-Yates), scales from skew_raw, normalised to an RMS of 1 so
 * that the router's overall scale stays what it is without skew.
 */
static int skew_factors(uint32_t E, uint32_t k, double S, uint64_t key, float *f)
{
	uint32_t *order = malloc(E * sizeof(*order));   /* order[r]: expert of rank r */
	double zipf_sum = 0, sq = 0, rms;

	if (!order)
		return -ENOMEM;
	for (uint32_t j = 0; j < E; j++)
		order[j] = j;
	for (uint32_t j = E - 1; j > 0; j--) {
		uint32_t i = (uint32_t)(mix64(key + j) % (j + 1));
		uint32_t t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (uint32_t r = 0; r < E; r++)
		zipf_sum += pow(r + 1 + E / GEN_SKEW_OFFSET_DIV, -S);
	for (uint32_t r = 0; r < E; r++) {
		double v = skew_raw(r, E, k, S, zipf_sum);

		sq += v * v;
	}
	rms = sqrt(sq / E);
	for (uint32_t r = 0; r < E; r++)
		f[order[r]] = (float)(skew_raw(r, E, k, S, zipf_sum) / rms);
	free(order);
	return 0;
}

/* The row factors of every FILL_ROUTER tensor of @p; each layer has its
 * own popularity order, keyed by the seed and the tensor name. */
int gen_plan_skew(struct gen_plan *p, const struct gen_dims *d, uint64_t seed, struct moe_err *err)
{
	for (size_t i = 0; i < p->n; i++) {
		struct gen_tensor *t = &p->t[i];
		uint32_t E = (uint32_t)t->shape[0];

		if (t->fill != FILL_ROUTER)
			continue;
		t->row_scale = malloc(E * sizeof(*t->row_scale));
		if (!t->row_scale ||
		    skew_factors(E, d->k, d->skew, mix64(gen_tensor_key(seed, t->name) ^ GEN_SKEW_SALT),
				 t->row_scale) < 0)
			return moe_err_set(err, -ENOMEM, "%s: out of memory", t->name);
	}
	return 0;
}

/* -------------------------------------------------------------- MXFP4 */

/*
 * MXFP4 as gpt-oss is released: per 32 values of a row, the E8M0 exponent
 * floor(log2(amax)) - 2 and the nearest e2m1 codes of the values over it
 * (moe_mxfp4_quantize_block(), the rule of OpenAI's and ggml's
 * quantizers), from the float32 values the tensor would have unquantized.
 */
void gen_mxfp4_band(const struct gen_tensor *w, uint64_t key, uint64_t r0, float *tmp, uint8_t *codes,
		    uint8_t *scales)
{
	uint64_t K = w->shape[2] * MOE_MXFP4_BLOCK, rows = w->shape[0] * w->shape[1];
	uint64_t n = rows - r0 < GEN_MX_BAND ? rows - r0 : GEN_MX_BAND;
	struct gen_tensor f = *w;
	uint8_t junk[MOE_MXFP4_BLOCK / 2];

	f.dtype = MOE_DTYPE_F32;
	f.fill = FILL_RANDOM;
	gen_values(&f, key, r0 * K, (size_t)(n * K), tmp);
	for (uint64_t b = 0; b < n * (K / MOE_MXFP4_BLOCK); b++) {
		uint8_t s = moe_mxfp4_quantize_block(tmp + b * MOE_MXFP4_BLOCK,
						     codes ? codes + b * (MOE_MXFP4_BLOCK / 2) : junk);

		if (scales)
			scales[b] = s;
	}
}
