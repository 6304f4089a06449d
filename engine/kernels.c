/* SPDX-License-Identifier: MIT */
/*
 * CPU kernels: blocks of weight-row x token dot products (see kernels.h for
 * the canonical accumulation order that makes results batch invariant).
 *
 * Each instruction set has one tile function, inlined with constant row
 * count R, token count C and dtype, so every accumulator lives in a
 * register.  A call walks the tokens in chunks of CMAX and, for each chunk,
 * the rows in groups of RMAX (then single rows): the chunk's token vectors
 * stay in L1 while the weight rows stream past them.
 */
#include "config.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"
#include "kernels_mxfp4.h"
#include "kernels_impl.h"
#include "model.h"


/*
 * How far ahead of the current position a packed tile prefetches its own
 * stream.  The hardware prefetchers do not keep up here: streaming one
 * core's packed rows at 4 tokens per tile ran at 10 GB/s (what the
 * out-of-order window alone keeps in flight) against 45 GB/s with the rows
 * in L2.  Measured on the layer shapes (K = 7168, bf16, one thread),
 * GFLOP/s at 1 / 4 / 8 tokens per tile: no prefetch 21 / 39 / 68;
 * 1 KB 17 / 53 / 83; 2 KB 21 / 70 / 100; 4 KB 24 / 73 / 109; 8 KB
 * 23 / 77 / 104.
 */
#define PREFETCH_AHEAD 4096

/* Prefetch @bytes (a multiple of 64) starting at @p. */
static ALWAYS_INLINE void prefetch_span(const char *p, size_t bytes)
{
#pragma GCC unroll 4
	for (size_t i = 0; i < bytes; i += 64)
		_mm_prefetch(p + i, _MM_HINT_T0);
}

/* Element offset of column k of row 0 of a packed group; row r of the group
 * is MOE_KERN_CHUNK elements further (kernels.h). */
#define PACKED_OFF(k) \
	(((k) / MOE_KERN_CHUNK) * (MOE_KERN_GROUP * MOE_KERN_CHUNK) + (k) % MOE_KERN_CHUNK)

/* ------------------------------------------------------------------------ */
/* Scalar: 8 emulated lanes, same structure as the vector code.              */

#define SC_W 8

static ALWAYS_INLINE float sc_load(enum moe_dtype dt, const void *W, size_t i)
{
	switch (dt) {
	case MOE_DTYPE_BF16: return moe_bf16_to_f32(((const uint16_t *)W)[i]);
	case MOE_DTYPE_F16: return moe_f16_to_f32(((const uint16_t *)W)[i]);
	default: return ((const float *)W)[i];
	}
}

static ALWAYS_INLINE void dot_rows_scalar(enum moe_dtype dt, int packed, const void *W, size_t ldw,
					   size_t K, size_t nr, const float *const *xs, size_t nt,
					   float *y, size_t ldy)
{
	size_t es = moe_dtype_size(dt), full = packed ? nr / MOE_KERN_GROUP * MOE_KERN_GROUP : 0;

	for (size_t c = 0; c < nt; c++) {
		const float *x = xs[c];

		for (size_t r = 0; r < nr; r++) {
			float acc[SC_W] = { 0 };
			const char *base;
			size_t k = 0;

			/* element k of row r is at base + idx(k) elements */
#define SC_IDX(k) (r < full ? PACKED_OFF(k) : (k))
			if (r < full)
				base = (const char *)W + ((r / MOE_KERN_GROUP) * MOE_KERN_GROUP * ldw +
							  (r % MOE_KERN_GROUP) * MOE_KERN_CHUNK) * es;
			else
				base = (const char *)W + r * ldw * es;
			for (; k + SC_W <= K; k += SC_W)
				for (int l = 0; l < SC_W; l++)
					acc[l] = __builtin_fmaf(sc_load(dt, base, SC_IDX(k + (size_t)l)),
								x[k + (size_t)l], acc[l]);
			for (int l = 0; k + (size_t)l < K; l++)
				acc[l] = __builtin_fmaf(sc_load(dt, base, SC_IDX(k + (size_t)l)),
							x[k + (size_t)l], acc[l]);
#undef SC_IDX
			y[c * ldy + r] = moe_kern_sc_hsum8(acc);
		}
	}
}

static void dot_rows_scalar_0(enum moe_dtype dt, const void *W, size_t ldw, size_t K, size_t nr,
			      const float *const *xs, size_t nt, float *y, size_t ldy)
{
	dot_rows_scalar(dt, 0, W, ldw, K, nr, xs, nt, y, ldy);
}

static void dot_rows_scalar_1(enum moe_dtype dt, const void *W, size_t ldw, size_t K, size_t nr,
			      const float *const *xs, size_t nt, float *y, size_t ldy)
{
	dot_rows_scalar(dt, 1, W, ldw, K, nr, xs, nt, y, ldy);
}

/* FP8: the weight is e4m3(code), exact, times the token scaled by the
 * block's scale, x * scale rounded once (kernels.h). */
static ALWAYS_INLINE void dot_rows_scalar_fp8(int packed, const uint8_t *W, size_t ldw, size_t K,
					       size_t nr, const float *scales, size_t row0,
					       const float *const *xs, size_t nt, float *y, size_t ldy)
{
	size_t full = packed ? nr / MOE_KERN_GROUP * MOE_KERN_GROUP : 0;
	size_t kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;

	for (size_t c = 0; c < nt; c++) {
		const float *x = xs[c];

		for (size_t r = 0; r < nr; r++) {
			const float *sc = scales + (row0 + r) / MOE_FP8_BLOCK * kb;
			float acc[SC_W] = { 0 };
			const uint8_t *base;

#define SC_IDX(k) (r < full ? PACKED_OFF(k) : (k))
			if (r < full)
				base = W + (r / MOE_KERN_GROUP) * MOE_KERN_GROUP * ldw +
				       (r % MOE_KERN_GROUP) * MOE_KERN_CHUNK;
			else
				base = W + r * ldw;
			for (size_t k = 0; k < K; k++) {
				float w = moe_e4m3_to_f32(base[SC_IDX(k)]), xk = x[k] * sc[k / MOE_FP8_BLOCK];

				acc[k % SC_W] = __builtin_fmaf(w, xk, acc[k % SC_W]);
			}
#undef SC_IDX
			y[c * ldy + r] = moe_kern_sc_hsum8(acc);
		}
	}
}

static void dot_rows_scalar_fp8_0(const uint8_t *W, size_t ldw, size_t K, size_t nr,
				  const float *scales, size_t row0, const float *const *xs,
				  size_t nt, float *y, size_t ldy)
{
	dot_rows_scalar_fp8(0, W, ldw, K, nr, scales, row0, xs, nt, y, ldy);
}

static void dot_rows_scalar_fp8_1(const uint8_t *W, size_t ldw, size_t K, size_t nr,
				  const float *scales, size_t row0, const float *const *xs,
				  size_t nt, float *y, size_t ldy)
{
	dot_rows_scalar_fp8(1, W, ldw, K, nr, scales, row0, xs, nt, y, ldy);
}

/* ------------------------------------------------------------------------ */
/* AVX2 + FMA + F16C: 8 lanes, tiles of up to 4 rows x 2 tokens.              */

#define AVX2_RMAX 4
#define AVX2_CMAX 2

AVX2_TARGET static ALWAYS_INLINE __m256 avx2_widen(enum moe_dtype dt, __m128i h)
{
	if (dt == MOE_DTYPE_BF16)
		return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
	return _mm256_cvtph_ps(h);
}

AVX2_TARGET static ALWAYS_INLINE __m256 avx2_load_w(enum moe_dtype dt, const void *p)
{
	if (dt == MOE_DTYPE_F32)
		return _mm256_loadu_ps(p);
	return avx2_widen(dt, _mm_loadu_si128(p));
}

/* Masked tail: the first n (< 8) elements, zeros after. */
AVX2_TARGET static ALWAYS_INLINE __m256 avx2_load_w_tail(enum moe_dtype dt, const void *p, size_t n)
{
	if (dt == MOE_DTYPE_F32) {
		float t[8] = { 0 };
		memcpy(t, p, n * sizeof(float));
		return _mm256_loadu_ps(t);
	}
	uint16_t t[8] = { 0 };
	memcpy(t, p, n * sizeof(uint16_t));
	return avx2_widen(dt, _mm_loadu_si128((const __m128i *)t));
}

AVX2_TARGET static ALWAYS_INLINE __m256 avx2_load_x_tail(const float *p, size_t n)
{
	float t[8] = { 0 };

	memcpy(t, p, n * sizeof(float));
	return _mm256_loadu_ps(t);
}

AVX2_TARGET static ALWAYS_INLINE void
avx2_tile(enum moe_dtype dt, int packed, int R, int C, const void *W, size_t ldw, size_t K,
	  const float *const *xs, float *y, size_t ldy)
{
	size_t es = dt == MOE_DTYPE_F32 ? 4 : 2, k = 0;
	__m256 acc[AVX2_RMAX][AVX2_CMAX];
	const char *row[AVX2_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = (const char *)W + (size_t)r * (packed ? MOE_KERN_CHUNK : ldw) * es;
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	}
	for (; k + 8 <= K; k += 8) {
		__m256 w[AVX2_RMAX];
		size_t off = packed ? PACKED_OFF(k) * es : k * es;
		if (packed && R == MOE_KERN_GROUP)   /* this half of the group's block, ahead */
			prefetch_span(row[0] + (k / MOE_KERN_CHUNK) * MOE_KERN_GROUP * MOE_KERN_CHUNK * es +
				      (k % MOE_KERN_CHUNK) * MOE_KERN_GROUP * es + PREFETCH_AHEAD,
				      MOE_KERN_GROUP * 8 * es);
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx2_load_w(dt, row[r] + off);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = _mm256_loadu_ps(xs[c] + k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
	if (k < K) {
		__m256 w[AVX2_RMAX];
		size_t off = packed ? PACKED_OFF(k) * es : k * es;
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx2_load_w_tail(dt, row[r] + off, K - k);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = avx2_load_x_tail(xs[c] + k, K - k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx2_hsum(acc[r][c]);
}

/*
 * e4m3fn codes to float32 by bit manipulation (measured faster than a
 * table gather, see the commit): the code sign-extended to 32 bits and
 * shifted left by 20 puts the sign at bit 31 and exponent and mantissa at
 * bits 20..26, a float32 that is the e4m3 value times 2^-120 (also for the
 * subnormals, which become float32 subnormals); times 2^120 is exact.
 * S.1111.111 becomes NaN.
 */
#define FP8_BITS_MASK 0x87f00000
#define FP8_NAN_BITS 0x07f00000
#define FP8_MAG_MASK 0x7ff00000
#define FP8_2P120 0x1p120f

AVX2_TARGET static ALWAYS_INLINE __m256 avx2_fp8_widen(__m128i codes8)
{
	__m256i z = _mm256_cvtepi8_epi32(codes8);
	__m256i b = _mm256_and_si256(_mm256_slli_epi32(z, 20), _mm256_set1_epi32((int)FP8_BITS_MASK));
	__m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(FP8_MAG_MASK)),
					 _mm256_set1_epi32(FP8_NAN_BITS));
	__m256 f = _mm256_mul_ps(_mm256_castsi256_ps(b), _mm256_set1_ps(FP8_2P120));

	return _mm256_or_ps(f, _mm256_castsi256_ps(nan));    /* all ones: a NaN */
}

AVX2_TARGET static ALWAYS_INLINE void
avx2_tile_fp8(int packed, int R, int C, const uint8_t *W, size_t ldw, size_t K, const float *scales,
	      size_t row0, const float *const *xs, float *y, size_t ldy)
{
	size_t kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK, k = 0;
	__m256 acc[AVX2_RMAX][AVX2_CMAX];
	const uint8_t *row[AVX2_RMAX];
	/* the tile's rows share their block of scales (FP8_TILE_ROWS) */
	const float *sc = scales + row0 / MOE_FP8_BLOCK * kb;

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = W + (size_t)r * (packed ? MOE_KERN_CHUNK : ldw);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	}
	for (; k + 8 <= K; k += 8) {
		__m256 w[AVX2_RMAX];
		size_t off = packed ? PACKED_OFF(k) : k;
		if (packed && R == MOE_KERN_GROUP && k % MOE_KERN_CHUNK == 0)
			prefetch_span((const char *)row[0] + off + PREFETCH_AHEAD, MOE_KERN_GROUP * 16);
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx2_fp8_widen(_mm_loadl_epi64((const __m128i *)(row[r] + off)));
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = _mm256_mul_ps(_mm256_loadu_ps(xs[c] + k), _mm256_broadcast_ss(sc + k / MOE_FP8_BLOCK));
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
	if (k < K) {
		__m256 w[AVX2_RMAX];
		size_t off = packed ? PACKED_OFF(k) : k;
#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			uint8_t t[16] = { 0 };
			memcpy(t, row[r] + off, K - k);
			w[r] = avx2_fp8_widen(_mm_loadu_si128((const __m128i *)t));
		}
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = _mm256_mul_ps(avx2_load_x_tail(xs[c] + k, K - k),
						  _mm256_broadcast_ss(sc + k / MOE_FP8_BLOCK));
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx2_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* AVX-512: 16 lanes, tiles of up to 4 rows x 6 tokens (24 accumulators, 4  */
/* weight and 1 token register of the 32).                                   */

#define AVX512_RMAX 4
#define AVX512_CMAX 6

AVX512_TARGET static ALWAYS_INLINE __m512 avx512_widen(enum moe_dtype dt, __m256i h)
{
	if (dt == MOE_DTYPE_BF16)
		return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
	return _mm512_cvtph_ps(h);
}

AVX512_TARGET static ALWAYS_INLINE __m512 avx512_load_w(enum moe_dtype dt, const void *p, __mmask16 m,
							 int masked)
{
	if (dt == MOE_DTYPE_F32)
		return masked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
	return avx512_widen(dt, masked ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(p));
}

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile(enum moe_dtype dt, int packed, int R, int C, const void *W, size_t ldw, size_t K,
	    const float *const *xs, float *y, size_t ldy)
{
	size_t es = dt == MOE_DTYPE_F32 ? 4 : 2, k = 0;
	__m512 acc[AVX512_RMAX][AVX512_CMAX];
	const char *row[AVX512_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = (const char *)W + (size_t)r * (packed ? MOE_KERN_CHUNK : ldw) * es;
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (; k + 16 <= K; k += 16) {
		__m512 w[AVX512_RMAX];
		size_t off = packed ? PACKED_OFF(k) * es : k * es;
		if (packed && R == MOE_KERN_GROUP)   /* the group's block, ahead */
			prefetch_span(row[0] + off + PREFETCH_AHEAD, MOE_KERN_GROUP * 16 * es);
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx512_load_w(dt, row[r] + off, 0, 0);
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_loadu_ps(xs[c] + k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
	if (k < K) {
		__mmask16 m = (__mmask16)((1u << (K - k)) - 1);
		__m512 w[AVX512_RMAX];
		size_t off = packed ? PACKED_OFF(k) * es : k * es;
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx512_load_w(dt, row[r] + off, m, 1);
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_maskz_loadu_ps(m, xs[c] + k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
}

AVX512_TARGET static ALWAYS_INLINE __m512 avx512_fp8_widen(__m128i codes16)
{
	__m512i z = _mm512_cvtepi8_epi32(codes16);
	__m512i b = _mm512_and_si512(_mm512_slli_epi32(z, 20), _mm512_set1_epi32((int)FP8_BITS_MASK));
	__mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(FP8_MAG_MASK)),
						 _mm512_set1_epi32(FP8_NAN_BITS));
	__m512 f = _mm512_mul_ps(_mm512_castsi512_ps(b), _mm512_set1_ps(FP8_2P120));

	return _mm512_mask_mov_ps(f, nan, _mm512_set1_ps(__builtin_nanf("")));
}

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_fp8(int packed, int R, int C, const uint8_t *W, size_t ldw, size_t K,
		const float *scales, size_t row0, const float *const *xs, float *y, size_t ldy)
{
	size_t kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK, k = 0;
	__m512 acc[AVX512_RMAX][AVX512_CMAX];
	const uint8_t *row[AVX512_RMAX];
	/* the tile's rows share their block of scales (FP8_TILE_ROWS) */
	const float *sc = scales + row0 / MOE_FP8_BLOCK * kb;

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = W + (size_t)r * (packed ? MOE_KERN_CHUNK : ldw);
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (; k + 16 <= K; k += 16) {
		__m512 w[AVX512_RMAX];
		size_t off = packed ? PACKED_OFF(k) : k;
		if (packed && R == MOE_KERN_GROUP)
			prefetch_span((const char *)row[0] + off + PREFETCH_AHEAD, MOE_KERN_GROUP * 16);
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx512_fp8_widen(_mm_loadu_si128((const __m128i *)(row[r] + off)));
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_mul_ps(_mm512_loadu_ps(xs[c] + k), _mm512_set1_ps(sc[k / MOE_FP8_BLOCK]));
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
	if (k < K) {
		__mmask16 m = (__mmask16)((1u << (K - k)) - 1);
		__m512 w[AVX512_RMAX];
		size_t off = packed ? PACKED_OFF(k) : k;
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx512_fp8_widen(_mm_maskz_loadu_epi8(m, row[r] + off));
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs[c] + k), _mm512_set1_ps(sc[k / MOE_FP8_BLOCK]));
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
}

/*
 * AVX-512 VBMI: a packed group's 64-byte block (16 codes of each of its 4
 * rows) decoded at once.  e4m3 converts exactly to bfloat16, so two
 * 128-entry byte tables (vpermi2b on the 7 magnitude bits) give each
 * code's bf16 high and low byte, the sign is ORed in, and a byte unpack
 * pairs them into bf16 words; a 32-bit shift left by 16 makes the even
 * words float32, an AND with 0xffff0000 the odd ones (shifts and ANDs run
 * beside the shuffles, where word unpacks with zeros would queue on the
 * one shuffle port with the rest).  The unpacks work inside 128-bit
 * lanes, so the block's codes are first permuted (one vpermb) so that the
 * four results are the four rows, each 16 codes in order.  About 10
 * operations per 64 weights, 5 of them shuffles, where the
 * shift-and-multiply decode takes about 32.  The values are the same
 * exact e4m3 values, so the products and sums are those of the AVX512
 * kernel, bit for bit.
 */
#define AVX512VBMI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,fma,f16c")))

/* bf16 of e4m3 magnitude m (0..127): high and low bytes; 0x7f is NaN */
static uint8_t fp8_bf16_hi[128] __attribute__((aligned(64)));
static uint8_t fp8_bf16_lo[128] __attribute__((aligned(64)));
/* vpermb index: byte 16L + 8h + 2i + e of the result is code 4L + i of
 * row 2h + e, byte 16(2h + e) + 4L + i of the block */
static uint8_t fp8_transpose[64] __attribute__((aligned(64)));

static void fp8_tables_init(void)
{
	for (unsigned m = 0; m < 128; m++) {
		uint16_t b = moe_f32_to_bf16(moe_e4m3_to_f32((uint8_t)m));   /* exact */

		fp8_bf16_hi[m] = (uint8_t)(b >> 8);
		fp8_bf16_lo[m] = (uint8_t)b;
	}
	for (unsigned L = 0; L < 4; L++)
		for (unsigned h = 0; h < 2; h++)
			for (unsigned i = 0; i < 4; i++)
				for (unsigned e = 0; e < 2; e++)
					fp8_transpose[16 * L + 8 * h + 2 * i + e] = (uint8_t)(16 * (2 * h + e) + 4 * L + i);
}

AVX512VBMI_TARGET static ALWAYS_INLINE void
vbmi_fp8_decode4(const uint8_t *p, __m512i tr, __m512i hi0, __m512i hi1, __m512i lo0, __m512i lo1,
		 __m512 out[4])
{
	__m512i c = _mm512_permutexvar_epi8(tr, _mm512_loadu_si512(p));
	__m512i hi = _mm512_permutex2var_epi8(hi0, c, hi1);
	__m512i lo = _mm512_permutex2var_epi8(lo0, c, lo1);
	__m512i top = _mm512_set1_epi32((int)0xffff0000u), u0, u1;

	hi = _mm512_ternarylogic_epi32(hi, c, _mm512_set1_epi8((char)0x80), 0xf8);  /* hi | (c & 0x80) */
	u0 = _mm512_unpacklo_epi8(lo, hi);      /* bf16 of bytes 16L + 0..7 */
	u1 = _mm512_unpackhi_epi8(lo, hi);      /* bf16 of bytes 16L + 8..15 */
	out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(u0, 16));
	out[1] = _mm512_castsi512_ps(_mm512_and_si512(u0, top));
	out[2] = _mm512_castsi512_ps(_mm512_slli_epi32(u1, 16));
	out[3] = _mm512_castsi512_ps(_mm512_and_si512(u1, top));
}

/* A packed tile of a whole group uses the block decode; anything else is
 * the AVX512 tile (inlined here). */
AVX512VBMI_TARGET static ALWAYS_INLINE void
avx512vbmi_tile_fp8(int packed, int R, int C, const uint8_t *W, size_t ldw, size_t K,
		    const float *scales, size_t row0, const float *const *xs, float *y, size_t ldy)
{
	size_t kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK, k = 0;
	__m512 acc[MOE_KERN_GROUP][AVX512_CMAX];
	const float *sc = scales + row0 / MOE_FP8_BLOCK * kb;     /* shared (FP8_TILE_ROWS) */
	__m512i tr, hi0, hi1, lo0, lo1;

	if (!packed || R != MOE_KERN_GROUP) {
		avx512_tile_fp8(packed, R, C, W, ldw, K, scales, row0, xs, y, ldy);
		return;
	}
	tr = _mm512_load_si512(fp8_transpose);
	hi0 = _mm512_load_si512(fp8_bf16_hi);
	hi1 = _mm512_load_si512(fp8_bf16_hi + 64);
	lo0 = _mm512_load_si512(fp8_bf16_lo);
	lo1 = _mm512_load_si512(fp8_bf16_lo + 64);
#pragma GCC unroll 4
	for (int r = 0; r < MOE_KERN_GROUP; r++) {
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (; k + 16 <= K; k += 16) {
		const uint8_t *blk = W + PACKED_OFF(k);     /* 16 codes x 4 rows */
		__m512 w[MOE_KERN_GROUP];

		prefetch_span((const char *)blk + PREFETCH_AHEAD, MOE_KERN_GROUP * 16);
		vbmi_fp8_decode4(blk, tr, hi0, hi1, lo0, lo1, w);
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_mul_ps(_mm512_loadu_ps(xs[c] + k), _mm512_set1_ps(sc[k / MOE_FP8_BLOCK]));
#pragma GCC unroll 4
			for (int r = 0; r < MOE_KERN_GROUP; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
	if (k < K) {     /* the tail as the AVX512 tile has it: masked loads */
		__mmask16 m = (__mmask16)((1u << (K - k)) - 1);
		__m512 w[MOE_KERN_GROUP];

#pragma GCC unroll 4
		for (int r = 0; r < MOE_KERN_GROUP; r++)
			w[r] = avx512_fp8_widen(_mm_maskz_loadu_epi8(m, W + (size_t)r * MOE_KERN_CHUNK +
								     PACKED_OFF(k)));
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs[c] + k), _mm512_set1_ps(sc[k / MOE_FP8_BLOCK]));
#pragma GCC unroll 4
			for (int r = 0; r < MOE_KERN_GROUP; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < MOE_KERN_GROUP; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* Drivers: one per instruction set and dtype, with constant tile shapes.    */

/* Walk tokens in chunks of CMAX and rows in groups of RMAX (= the packing
 * group), then the leftover rows one by one; the switch makes the token
 * count of each tile constant.  PACKED: full groups are interleaved
 * (kernels.h), leftover rows plain with stride ldw (= the padded K). */
#define DEFINE_DRIVER(isa, TARGET, DT, dtname, PACKED, RMAX, CMAX)                      \
	TARGET static void dot_rows_##isa##_##dtname##_##PACKED(                         \
		const void *W, size_t ldw, size_t K, size_t nr, const float *const *xs,  \
		size_t nt, float *y, size_t ldy)                                         \
	{                                                                               \
		size_t es = moe_dtype_size(DT);                                         \
		for (size_t c0 = 0; c0 < nt; c0 += CMAX) {                              \
			size_t nc = nt - c0 < CMAX ? nt - c0 : CMAX;                    \
			const float *const *xc = xs + c0;                               \
			float *yc = y + c0 * ldy;                                       \
			size_t r = 0;                                                   \
			for (; r + RMAX <= nr; r += RMAX) {                             \
				const void *Wr = (const char *)W + r * ldw * es;        \
				switch (nc) {                                           \
				DRIVER_CASES_##isa(Wr, PACKED, RMAX)                    \
				}                                                       \
			}                                                               \
			for (; r < nr; r++) {                                           \
				const void *Wr = (const char *)W + r * ldw * es;        \
				switch (nc) {                                           \
				DRIVER_CASES_##isa(Wr, 0, 1)                            \
				}                                                       \
			}                                                               \
		}                                                                       \
	}

#define TILE_CASE(isa, Wr, P, R, C) \
	case C: isa##_tile(DT_CUR, P, R, C, Wr, ldw, K, xc, yc + r, ldy); break;
#define DRIVER_CASES_avx2(Wr, P, R) TILE_CASE(avx2, Wr, P, R, 1) TILE_CASE(avx2, Wr, P, R, 2)
#define DRIVER_CASES_avx512(Wr, P, R) \
	TILE_CASE(avx512, Wr, P, R, 1) TILE_CASE(avx512, Wr, P, R, 2) TILE_CASE(avx512, Wr, P, R, 3) \
	TILE_CASE(avx512, Wr, P, R, 4) TILE_CASE(avx512, Wr, P, R, 5) TILE_CASE(avx512, Wr, P, R, 6)

#define DEFINE_DRIVERS(DT, dtname)                                                       \
	DEFINE_DRIVER(avx2, AVX2_TARGET, DT, dtname, 0, AVX2_RMAX, AVX2_CMAX)            \
	DEFINE_DRIVER(avx2, AVX2_TARGET, DT, dtname, 1, AVX2_RMAX, AVX2_CMAX)            \
	DEFINE_DRIVER(avx512, AVX512_TARGET, DT, dtname, 0, AVX512_RMAX, AVX512_CMAX)    \
	DEFINE_DRIVER(avx512, AVX512_TARGET, DT, dtname, 1, AVX512_RMAX, AVX512_CMAX)

#define DT_CUR MOE_DTYPE_F32
DEFINE_DRIVERS(MOE_DTYPE_F32, f32)
#undef DT_CUR
#define DT_CUR MOE_DTYPE_BF16
DEFINE_DRIVERS(MOE_DTYPE_BF16, bf16)
#undef DT_CUR
#define DT_CUR MOE_DTYPE_F16
DEFINE_DRIVERS(MOE_DTYPE_F16, f16)
#undef DT_CUR

#define DEFINE_DISPATCH(isa, P)                                                         \
	static void dot_rows_##isa##_##P(enum moe_dtype dt, const void *W, size_t ldw, size_t K, \
					 size_t nr, const float *const *xs, size_t nt,   \
					 float *y, size_t ldy)                           \
	{                                                                               \
		switch (dt) {                                                           \
		case MOE_DTYPE_F32: dot_rows_##isa##_f32_##P(W, ldw, K, nr, xs, nt, y, ldy); break; \
		case MOE_DTYPE_BF16: dot_rows_##isa##_bf16_##P(W, ldw, K, nr, xs, nt, y, ldy); break; \
		case MOE_DTYPE_F16: dot_rows_##isa##_f16_##P(W, ldw, K, nr, xs, nt, y, ldy); break; \
		default: break;                                                         \
		}                                                                       \
	}
/*
 * FP8 drivers: as DEFINE_DRIVER, with the scales and the first row.  A
 * tile's rows must lie in one block of 128 rows, whose scales they share
 * (the tile scales each token once per step, for all its rows): always
 * so for packed tiles, which start at a multiple of MOE_KERN_GROUP; a
 * plain tile that would straddle two blocks is done a row at a time
 * (the order is per row: the same bits).
 */
#define FP8_TILE_ROWS(row, R) ((row) % MOE_FP8_BLOCK + (R) <= MOE_FP8_BLOCK)
#define DEFINE_DRIVER_FP8(isa, TARGET, PACKED, RMAX, CMAX)                               \
	TARGET static void dot_rows_##isa##_fp8_##PACKED(                                \
		const uint8_t *W, size_t ldw, size_t K, size_t nr, const float *scales,   \
		size_t row0, const float *const *xs, size_t nt, float *y, size_t ldy)     \
	{                                                                               \
		for (size_t c0 = 0; c0 < nt; c0 += CMAX) {                              \
			size_t nc = nt - c0 < CMAX ? nt - c0 : CMAX;                    \
			const float *const *xc = xs + c0;                               \
			float *yc = y + c0 * ldy;                                       \
			size_t r = 0;                                                   \
			for (; r + RMAX <= nr; r += RMAX) {                             \
				const uint8_t *Wr = W + r * ldw;                        \
				if (!FP8_TILE_ROWS(row0 + r, RMAX))                     \
					break;                                          \
				switch (nc) {                                           \
				DRIVER_CASES_FP8_##isa(Wr, PACKED, RMAX)                \
				}                                                       \
			}                                                               \
			for (; !PACKED && r < nr && !FP8_TILE_ROWS(row0 + r, RMAX); r++) { \
				const uint8_t *Wr = W + r * ldw;                        \
				switch (nc) {                                           \
				DRIVER_CASES_FP8_##isa(Wr, 0, 1)                        \
				}                                                       \
			}                                                               \
			for (; r + RMAX <= nr; r += RMAX) {                             \
				const uint8_t *Wr = W + r * ldw;                        \
				switch (nc) {                                           \
				DRIVER_CASES_FP8_##isa(Wr, PACKED, RMAX)                \
				}                                                       \
			}                                                               \
			for (; r < nr; r++) {                                           \
				const uint8_t *Wr = W + r * ldw;                        \
				switch (nc) {                                           \
				DRIVER_CASES_FP8_##isa(Wr, 0, 1)                        \
				}                                                       \
			}                                                               \
		}                                                                       \
	}
#define TILE_CASE_FP8(isa, Wr, P, R, C) \
	case C: isa##_tile_fp8(P, R, C, Wr, ldw, K, scales, row0 + r, xc, yc + r, ldy); break;
#define DRIVER_CASES_FP8_avx2(Wr, P, R) TILE_CASE_FP8(avx2, Wr, P, R, 1) TILE_CASE_FP8(avx2, Wr, P, R, 2)
#define DRIVER_CASES_FP8_avx512(Wr, P, R) \
	TILE_CASE_FP8(avx512, Wr, P, R, 1) TILE_CASE_FP8(avx512, Wr, P, R, 2) \
	TILE_CASE_FP8(avx512, Wr, P, R, 3) TILE_CASE_FP8(avx512, Wr, P, R, 4) \
	TILE_CASE_FP8(avx512, Wr, P, R, 5) TILE_CASE_FP8(avx512, Wr, P, R, 6)
#define DRIVER_CASES_FP8_avx512vbmi(Wr, P, R) \
	TILE_CASE_FP8(avx512vbmi, Wr, P, R, 1) TILE_CASE_FP8(avx512vbmi, Wr, P, R, 2) \
	TILE_CASE_FP8(avx512vbmi, Wr, P, R, 3) TILE_CASE_FP8(avx512vbmi, Wr, P, R, 4) \
	TILE_CASE_FP8(avx512vbmi, Wr, P, R, 5) TILE_CASE_FP8(avx512vbmi, Wr, P, R, 6)
DEFINE_DRIVER_FP8(avx2, AVX2_TARGET, 0, AVX2_RMAX, AVX2_CMAX)
DEFINE_DRIVER_FP8(avx2, AVX2_TARGET, 1, AVX2_RMAX, AVX2_CMAX)
DEFINE_DRIVER_FP8(avx512, AVX512_TARGET, 0, AVX512_RMAX, AVX512_CMAX)
DEFINE_DRIVER_FP8(avx512, AVX512_TARGET, 1, AVX512_RMAX, AVX512_CMAX)
DEFINE_DRIVER_FP8(avx512vbmi, AVX512VBMI_TARGET, 1, AVX512_RMAX, AVX512_CMAX)

DEFINE_DISPATCH(avx2, 0)
DEFINE_DISPATCH(avx2, 1)
DEFINE_DISPATCH(avx512, 0)
DEFINE_DISPATCH(avx512, 1)

/* ------------------------------------------------------------------------ */

static const char *const isa_names[MOE_KERN_ISA_COUNT] = { "scalar", "avx2", "avx512", "avx512vbmi" };

const char *moe_kern_isa_name(enum moe_kern_isa isa)
{
	return (unsigned)isa < MOE_KERN_ISA_COUNT ? isa_names[isa] : "?";
}

static bool isa_usable(enum moe_kern_isa isa)
{
	__builtin_cpu_init();
	switch (isa) {
	case MOE_KERN_SCALAR:
		return true;
	/* f16c too: a hypervisor may hide it while showing AVX2 or AVX-512,
	 * and both paths widen fp16 with it */
	case MOE_KERN_AVX2:
		return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
		       __builtin_cpu_supports("f16c");
	case MOE_KERN_AVX512:
		return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
		       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
		       __builtin_cpu_supports("f16c");
	case MOE_KERN_AVX512_VBMI:
		return isa_usable(MOE_KERN_AVX512) && __builtin_cpu_supports("avx512vbmi");
	default:
		return false;
	}
}

bool moe_kern_isa_usable(enum moe_kern_isa isa)
{
	return isa_usable(isa);
}

static const moe_kern_dot_rows_fn kernels[MOE_KERN_ISA_COUNT][2] = {
	[MOE_KERN_SCALAR] = { dot_rows_scalar_0, dot_rows_scalar_1 },
	[MOE_KERN_AVX2] = { dot_rows_avx2_0, dot_rows_avx2_1 },
	[MOE_KERN_AVX512] = { dot_rows_avx512_0, dot_rows_avx512_1 },
	[MOE_KERN_AVX512_VBMI] = { dot_rows_avx512_0, dot_rows_avx512_1 },  /* FP8 apart */
};

static const moe_kern_dot_rows_fp8_fn kernels_fp8[MOE_KERN_ISA_COUNT][2] = {
	[MOE_KERN_SCALAR] = { dot_rows_scalar_fp8_0, dot_rows_scalar_fp8_1 },
	[MOE_KERN_AVX2] = { dot_rows_avx2_fp8_0, dot_rows_avx2_fp8_1 },
	[MOE_KERN_AVX512] = { dot_rows_avx512_fp8_0, dot_rows_avx512_fp8_1 },
	[MOE_KERN_AVX512_VBMI] = { dot_rows_avx512_fp8_0, dot_rows_avx512vbmi_fp8_1 },
};

static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

moe_kern_dot_rows_fp8_fn moe_kern_get_fp8(enum moe_kern_isa isa, bool packed)
{
	pthread_once(&tables_once, fp8_tables_init);
	return isa_usable(isa) ? kernels_fp8[isa][packed] : NULL;
}

moe_kern_dot_rows_fn moe_kern_get(enum moe_kern_isa isa)
{
	return isa_usable(isa) ? kernels[isa][0] : NULL;
}

moe_kern_dot_rows_fn moe_kern_get_packed(enum moe_kern_isa isa)
{
	return isa_usable(isa) ? kernels[isa][1] : NULL;
}

static pthread_once_t pick_once = PTHREAD_ONCE_INIT;
static enum moe_kern_isa active_isa;

static void pick(void)
{
	const char *want = getenv("MOE_KERNEL");

	pthread_once(&tables_once, fp8_tables_init);
	active_isa = MOE_KERN_SCALAR;
	for (int i = MOE_KERN_ISA_COUNT - 1; i >= 0; i--)
		if (isa_usable((enum moe_kern_isa)i) &&
		    (!want || !*want || !strcmp(want, isa_names[i]))) {
			active_isa = (enum moe_kern_isa)i;
			return;
		}
	/* $MOE_KERNEL named something this CPU cannot run: take the best */
	for (int i = MOE_KERN_ISA_COUNT - 1; i >= 0; i--)
		if (isa_usable((enum moe_kern_isa)i)) {
			active_isa = (enum moe_kern_isa)i;
			return;
		}
}

enum moe_kern_isa moe_kern_active(void)
{
	pthread_once(&pick_once, pick);
	return active_isa;
}

void moe_kern_dot_rows(enum moe_dtype dt, const void *W, size_t ldw, size_t K, size_t nr,
		       const float *const *xs, size_t nt, float *y, size_t ldy)
{
	pthread_once(&pick_once, pick);
	kernels[active_isa][0](dt, W, ldw, K, nr, xs, nt, y, ldy);
}

void moe_kern_dot_rows_packed(enum moe_dtype dt, const void *Wp, size_t K, size_t nr,
			      const float *const *xs, size_t nt, float *y, size_t ldy)
{
	pthread_once(&pick_once, pick);
	kernels[active_isa][1](dt, Wp, moe_kern_packed_ld(K), K, nr, xs, nt, y, ldy);
}

/* The resident FP8 matrix: packed codes, then the scales (kernels.h). */
static uint64_t fp8_scales_at(uint64_t N, uint64_t K)
{
	return (N * moe_kern_packed_ld(K) + 63) / 64 * 64;
}

static uint64_t fp8_scales_bytes(uint64_t N, uint64_t K)
{
	return (N + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK * ((K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK) *
	       sizeof(float);
}

uint64_t moe_kern_packed_bytes(enum moe_dtype dt, uint64_t N, uint64_t K)
{
	if (dt == MOE_DTYPE_FP8_E4M3_B128)
		return fp8_scales_at(N, K) + (fp8_scales_bytes(N, K) + 63) / 64 * 64;
	if (dt == MOE_DTYPE_MXFP4)
		return moe_matrix_bytes(dt, N, K);
	return N * moe_kern_packed_ld(K) * moe_dtype_size(dt);
}

void moe_kern_pack_bytes(enum moe_dtype dt, const void *src, size_t N, size_t K, uint64_t b0,
			 uint64_t nb, void *dst)
{
	uint64_t so, sb, a, b;
	size_t es = moe_dtype_size(dt);

	if (dt == MOE_DTYPE_MXFP4) {
		moe_kern_mxfp4_pack_bytes(src, N, K, b0, nb, dst);
		return;
	}
	if (dt != MOE_DTYPE_FP8_E4M3_B128) {
		moe_kern_pack_range(dt, src, N, K, b0 / es, nb / es, dst);
		return;
	}
	/* codes [0, N*K), padding, scales [so, so + sb), padding */
	if (b0 < (uint64_t)N * K) {
		b = b0 + nb < (uint64_t)N * K ? b0 + nb : (uint64_t)N * K;
		moe_kern_pack_range(dt, src, N, K, b0, b - b0, dst);
	}
	so = moe_matrix_scales_offset(N, K);
	sb = fp8_scales_bytes(N, K);
	a = b0 > so ? b0 : so;
	b = b0 + nb < so + sb ? b0 + nb : so + sb;
	if (a < b)
		memcpy((char *)dst + fp8_scales_at(N, K) + (a - so), (const char *)src + (a - b0), b - a);
}

void moe_kern_dot_rows_packed_at(enum moe_dtype dt, const void *Wp, size_t N, size_t K, size_t row0,
				 size_t nr, const float *const *xs, size_t nt, float *y, size_t ldy)
{
	size_t ld = moe_kern_packed_ld(K);

	pthread_once(&pick_once, pick);
	if (dt == MOE_DTYPE_MXFP4) {
		moe_kern_get_mxfp4(active_isa)((const uint8_t *)Wp + row0 * (K / 2),
					       (const uint8_t *)Wp + moe_mxfp4_scales_offset(N, K) +
					       row0 * (K / MOE_MXFP4_BLOCK), K, nr, xs, nt, y, ldy);
		return;
	}
	if (dt != MOE_DTYPE_FP8_E4M3_B128) {
		kernels[active_isa][1](dt, (const char *)Wp + row0 * ld * moe_dtype_size(dt), ld, K, nr,
				       xs, nt, y, ldy);
		return;
	}
	kernels_fp8[active_isa][1]((const uint8_t *)Wp + row0 * ld, ld, K, nr,
				   (const float *)(const void *)((const char *)Wp + fp8_scales_at(N, K)),
				   row0, xs, nt, y, ldy);
}

size_t moe_kern_packed_ld(size_t K)
{
	return (K + MOE_KERN_CHUNK - 1) / MOE_KERN_CHUNK * MOE_KERN_CHUNK;
}

void moe_kern_pack(enum moe_dtype dt, const void *src, size_t N, size_t K, void *dst)
{
	size_t es = moe_dtype_size(dt), ld = moe_kern_packed_ld(K);
	size_t full = N / MOE_KERN_GROUP * MOE_KERN_GROUP;
	const char *s = src;
	char *d = dst;

	if (dt == MOE_DTYPE_MXFP4) {
		moe_kern_mxfp4_pack_bytes(src, N, K, 0, moe_matrix_bytes(dt, N, K), dst);
		return;
	}
	if (dt == MOE_DTYPE_FP8_E4M3_B128) {     /* the scales, then the codes as bytes */
		memset((char *)dst + N * ld, 0, fp8_scales_at(N, K) - N * ld);
		memset((char *)dst + fp8_scales_at(N, K), 0,
		       moe_kern_packed_bytes(dt, N, K) - fp8_scales_at(N, K));
		memcpy((char *)dst + fp8_scales_at(N, K), s + moe_matrix_scales_offset(N, K),
		       fp8_scales_bytes(N, K));
	}
	memset(dst, 0, N * ld * es);     /* the padding columns are zeros */
	for (size_t r = 0; r < N; r++) {
		const char *row = s + r * K * es;

		if (r >= full) {
			memcpy(d + r * ld * es, row, K * es);
			continue;
		}
		char *g = d + ((r / MOE_KERN_GROUP) * MOE_KERN_GROUP * ld +
			       (r % MOE_KERN_GROUP) * MOE_KERN_CHUNK) * es;
		for (size_t k = 0; k < K; k += MOE_KERN_CHUNK) {
			size_t n = K - k < MOE_KERN_CHUNK ? K - k : MOE_KERN_CHUNK;
			memcpy(g + PACKED_OFF(k) * es, row + k * es, n * es);
		}
	}
}

void moe_kern_pack_range(enum moe_dtype dt, const void *src, size_t N, size_t K, size_t e0,
			 size_t ne, void *dst)
{
	size_t es = moe_dtype_size(dt), ld = moe_kern_packed_ld(K);
	size_t full = N / MOE_KERN_GROUP * MOE_KERN_GROUP, e1 = e0 + ne;
	const char *s = src;
	char *d = dst;

	for (size_t e = e0; e < e1;) {
		size_t r = e / K, k = e % K, kb = K - k < e1 - e ? K : k + (e1 - e);

		if (r >= full) {
			memcpy(d + (r * ld + k) * es, s + (e - e0) * es, (kb - k) * es);
			if (kb == K)
				memset(d + (r * ld + K) * es, 0, (ld - K) * es);
		} else {
			char *g = d + ((r / MOE_KERN_GROUP) * MOE_KERN_GROUP * ld +
				       (r % MOE_KERN_GROUP) * MOE_KERN_CHUNK) * es;
			const char *sr = s + (e - e0 - k) * es;   /* element q of the row is sr[q * es] */
			size_t q = k;

			/* whole chunks with constant-size copies (inlined moves), ends apart */
			if (q % MOE_KERN_CHUNK == 0 && es == 2)
				for (; q + MOE_KERN_CHUNK <= kb; q += MOE_KERN_CHUNK)
					memcpy(g + PACKED_OFF(q) * 2, sr + q * 2, MOE_KERN_CHUNK * 2);
			else if (q % MOE_KERN_CHUNK == 0 && es == 4)
				for (; q + MOE_KERN_CHUNK <= kb; q += MOE_KERN_CHUNK)
					memcpy(g + PACKED_OFF(q) * 4, sr + q * 4, MOE_KERN_CHUNK * 4);
			while (q < kb) {
				size_t qe = (q / MOE_KERN_CHUNK + 1) * MOE_KERN_CHUNK;

				if (qe > kb)
					qe = kb;
				memcpy(g + PACKED_OFF(q) * es, sr + q * es, (qe - q) * es);
				q = qe;
			}
			if (kb == K && ld > K)
				memset(g + PACKED_OFF(K) * es, 0, (ld - K) * es);
		}
		e += kb - k;
	}
}
