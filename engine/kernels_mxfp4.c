/* SPDX-License-Identifier: MIT */
/*
 * CPU kernels for MOE_DTYPE_MXFP4 (kernels.h): dot products of rows of
 * e2m1 codes with E8M0 scales, read in the store's own bytes and decoded in
 * registers, in the canonical order of kernels.h.
 *
 * Every weight is e2m1(code) * 2^(s - 127), one float32 multiplication of
 * two exact values, so every instruction set multiplies the same weights;
 * the sums differ only by the lane count W (8 scalar and AVX2, 16 AVX-512),
 * exactly as for the other dtypes.  K is a multiple of 32
 * (moe_model_config_validate), so there is no tail: a vector step never
 * crosses a scale block.
 *
 * The decode is a table lookup in a register: the nibbles become 32-bit
 * lane indices (bytes duplicated by one unpack, widened, shifted right by
 * 0 or 4 per lane), then one vpermps picks the e2m1 value (AVX-512: the 16
 * signed values, vpermps reads 4 index bits; AVX2: the 8 magnitudes, and
 * bit 3 moved to the sign).  About 6 operations per 16 weights, for 8.5
 * bytes read: the stream, not the decode, is the bound.
 */
#include "config.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Bytes ahead of the current position each row stream prefetches (the
 * rows are separate streams here; see PREFETCH_AHEAD in kernels.c). */
#define MX_PREFETCH_AHEAD 1024

/* 2^(s - 127) as float32: s << 23 is the float, but for s = 0 (the
 * subnormal 2^-127) and 255 (NaN, as the OCP spec says). */
static ALWAYS_INLINE float mx_scale(uint8_t s)
{
	uint32_t u = s == 0 ? 0x00400000u : s == 255 ? 0x7fc00000u : (uint32_t)s << 23;
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

static const float e2m1_values[16] __attribute__((aligned(64))) = {
	0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
	-0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f,
};

/* ------------------------------------------------------------------------ */
/* Scalar: 8 emulated lanes, the reference of the vector code.               */

#define SC_W 8

static float sc_hsum(const float *a)
{
	float b0 = a[0] + a[4], b1 = a[1] + a[5], b2 = a[2] + a[6], b3 = a[3] + a[7];
	float c0 = b0 + b2, c1 = b1 + b3;

	return c0 + c1;
}

static void dot_rows_scalar_mxfp4(const uint8_t *W, const uint8_t *S, size_t K, size_t nr,
				  const float *const *xs, size_t nt, float *y, size_t ldy)
{
	for (size_t c = 0; c < nt; c++) {
		const float *x = xs[c];

		for (size_t r = 0; r < nr; r++) {
			const uint8_t *row = W + r * (K / 2), *sr = S + r * (K / MOE_MXFP4_BLOCK);
			float acc[SC_W] = { 0 };

			for (size_t k = 0; k < K; k++) {
				uint8_t code = (uint8_t)(row[k / 2] >> (4 * (k & 1))) & 15u;
				float w = e2m1_values[code] * mx_scale(sr[k / MOE_MXFP4_BLOCK]);

				acc[k % SC_W] = __builtin_fmaf(w, x[k], acc[k % SC_W]);
			}
			y[c * ldy + r] = sc_hsum(acc);
		}
	}
}

/* ------------------------------------------------------------------------ */
/* AVX2 + FMA: 8 lanes (4 bytes of codes) per step, tiles of 4 rows x 2.     */

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_RMAX 4
#define AVX2_CMAX 2

AVX2_TARGET static ALWAYS_INLINE float avx2_hsum(__m256 v)
{
	__m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	__m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));

	return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* The 8 values of 4 code bytes at @p, times @scale. */
AVX2_TARGET static ALWAYS_INLINE __m256 avx2_mx_decode(const uint8_t *p, __m256 mags, __m256i shifts,
						       __m256 scale)
{
	uint32_t u;
	__m128i b;
	__m256i idx, sign;

	memcpy(&u, p, sizeof(u));
	b = _mm_cvtsi32_si128((int)u);
	b = _mm_unpacklo_epi8(b, b);                       /* b0 b0 b1 b1 b2 b2 b3 b3 */
	idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), _mm256_set1_epi32(15));
	sign = _mm256_and_si256(_mm256_slli_epi32(idx, 28), _mm256_set1_epi32((int)0x80000000u));
	return _mm256_mul_ps(_mm256_xor_ps(_mm256_permutevar8x32_ps(mags, idx), _mm256_castsi256_ps(sign)),
			     scale);
}

AVX2_TARGET static ALWAYS_INLINE void
avx2_tile_mxfp4(int R, int C, const uint8_t *W, const uint8_t *S, size_t K, const float *const *xs,
		float *y, size_t ldy)
{
	__m256 mags = _mm256_load_ps(e2m1_values);
	__m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
	__m256 acc[AVX2_RMAX][AVX2_CMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	for (size_t k = 0; k < K; k += 8) {
		__m256 w[AVX2_RMAX];

#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			const uint8_t *row = W + (size_t)r * (K / 2);

			if (k % 128 == 0)
				_mm_prefetch((const char *)row + k / 2 + MX_PREFETCH_AHEAD, _MM_HINT_T0);
			w[r] = avx2_mx_decode(row + k / 2, mags, shifts,
					      _mm256_set1_ps(mx_scale(S[(size_t)r * (K / MOE_MXFP4_BLOCK) +
									k / MOE_MXFP4_BLOCK])));
		}
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = _mm256_loadu_ps(xs[c] + k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = avx2_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* AVX-512: 16 lanes (8 bytes of codes) per step, tiles of 4 rows x 6.       */

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define AVX512_RMAX 4
#define AVX512_CMAX 6

AVX512_TARGET static ALWAYS_INLINE float avx512_hsum(__m512 v)
{
	__m256 lo = _mm512_castps512_ps256(v);
	__m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
	__m256 s = _mm256_add_ps(lo, hi);
	__m128 a = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
	__m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));

	return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* The 16 values of 8 code bytes at @p, times @scale. */
AVX512_TARGET static ALWAYS_INLINE __m512 avx512_mx_decode(const uint8_t *p, __m512 table,
							   __m512i shifts, __m512 scale)
{
	__m128i b = _mm_loadl_epi64((const __m128i *)p);
	__m512i idx;

	b = _mm_unpacklo_epi8(b, b);                       /* each byte twice */
	idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(b), shifts), _mm512_set1_epi32(15));
	return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), scale);
}

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_mxfp4(int R, int C, const uint8_t *W, const uint8_t *S, size_t K, const float *const *xs,
		  float *y, size_t ldy)
{
	__m512 table = _mm512_load_ps(e2m1_values);
	__m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
	__m512 acc[AVX512_RMAX][AVX512_CMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	for (size_t k = 0; k < K; k += 16) {
		__m512 w[AVX512_RMAX];

#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			const uint8_t *row = W + (size_t)r * (K / 2);

			if (k % 128 == 0)
				_mm_prefetch((const char *)row + k / 2 + MX_PREFETCH_AHEAD, _MM_HINT_T0);
			w[r] = avx512_mx_decode(row + k / 2, table, shifts,
						_mm512_set1_ps(mx_scale(S[(size_t)r * (K / MOE_MXFP4_BLOCK) +
									  k / MOE_MXFP4_BLOCK])));
		}
#pragma GCC unroll 6
		for (int c = 0; c < C; c++) {
			__m512 xv = _mm512_loadu_ps(xs[c] + k);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = avx512_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* Drivers: tokens in chunks of CMAX, rows in tiles of RMAX, then the rows  */
/* left one by one; the switch makes each tile's shape constant.             */

#define MX_DRIVER(isa, TARGET, RMAX, CMAX, CASES)                                       \
	TARGET static void dot_rows_##isa##_mxfp4(const uint8_t *W, const uint8_t *S,     \
						  size_t K, size_t nr,                    \
						  const float *const *xs, size_t nt,      \
						  float *y, size_t ldy)                   \
	{                                                                               \
		for (size_t c0 = 0; c0 < nt; c0 += CMAX) {                              \
			size_t nc = nt - c0 < CMAX ? nt - c0 : CMAX;                    \
			const float *const *xc = xs + c0;                               \
			float *yc = y + c0 * ldy;                                       \
			size_t r = 0;                                                   \
			for (; r + RMAX <= nr; r += RMAX) {                             \
				const uint8_t *Wr = W + r * (K / 2);                    \
				const uint8_t *Sr = S + r * (K / MOE_MXFP4_BLOCK);      \
				switch (nc) { CASES(isa, RMAX) }                        \
			}                                                               \
			for (; r < nr; r++) {                                           \
				const uint8_t *Wr = W + r * (K / 2);                    \
				const uint8_t *Sr = S + r * (K / MOE_MXFP4_BLOCK);      \
				switch (nc) { CASES(isa, 1) }                           \
			}                                                               \
		}                                                                       \
	}
#define MX_CASE(isa, R, C) \
	case C: isa##_tile_mxfp4(R, C, Wr, Sr, K, xc, yc + r, ldy); break;
#define MX_CASES_AVX2(isa, R) MX_CASE(isa, R, 1) MX_CASE(isa, R, 2)
#define MX_CASES_AVX512(isa, R) \
	MX_CASE(isa, R, 1) MX_CASE(isa, R, 2) MX_CASE(isa, R, 3) \
	MX_CASE(isa, R, 4) MX_CASE(isa, R, 5) MX_CASE(isa, R, 6)

MX_DRIVER(avx2, AVX2_TARGET, AVX2_RMAX, AVX2_CMAX, MX_CASES_AVX2)
MX_DRIVER(avx512, AVX512_TARGET, AVX512_RMAX, AVX512_CMAX, MX_CASES_AVX512)

/* AVX512_VBMI uses the AVX512 kernel: its vpermps lookup already decodes
 * 16 values in one shuffle, and a byte-permute decode would give the same
 * weights in the same order, so the same bits. */
static const moe_kern_dot_rows_mxfp4_fn kernels_mxfp4[MOE_KERN_ISA_COUNT] = {
	[MOE_KERN_SCALAR] = dot_rows_scalar_mxfp4,
	[MOE_KERN_AVX2] = dot_rows_avx2_mxfp4,
	[MOE_KERN_AVX512] = dot_rows_avx512_mxfp4,
	[MOE_KERN_AVX512_VBMI] = dot_rows_avx512_mxfp4,
};

moe_kern_dot_rows_mxfp4_fn moe_kern_get_mxfp4(enum moe_kern_isa isa)
{
	if ((unsigned)isa >= MOE_KERN_ISA_COUNT || !moe_kern_get(isa))   /* not on this CPU */
		return NULL;
	return kernels_mxfp4[isa];
}
