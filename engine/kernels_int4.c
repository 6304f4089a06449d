/* SPDX-License-Identifier: MIT */
/*
 * CPU kernels for MOE_DTYPE_INT4 (kernels.h, model.h moe_q4_layout()): the
 * 4-bit codes are read as the store holds them and dequantized in
 * registers, w = (q - z) * s in float32, which is exact (|q - z| <= 16
 * times a float16 or bfloat16 scale needs at most 16 significant bits), so
 * every instruction set computes the same weights and the canonical fused
 * multiply-add order of kernels.h gives batch-invariant results.
 *
 * A permuted matrix (act-order, MOE_Q4_PERM) takes x[perm[j]] for stored
 * column j: gathered once per chunk of tokens (q4_gather), or per vector
 * step for rows too wide for its buffer; the product is the same sum in
 * the same order as over the unpermuted matrix.
 *
 * The resident layout of an INT4 matrix is the store's: its rows of K/2
 * bytes are a quarter of a bf16 row, so a tile of four of them is already
 * a short stream per row; the group interleaving of the wider dtypes is
 * not used.
 */
#include "config.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"
#include "kernels_impl.h"
#include "model.h"


/*
 * Input column of stored column @j of a permuted matrix.  A store's
 * permutation is checked by nothing at load time (pack writes true ones and
 * blobs are checksummed), so an index past the row is clamped: a damaged
 * or crafted store gives wrong numbers, never a read outside x.  The vector
 * gathers clamp the same way (min with K - 1).
 */
static inline size_t q4_col(const struct moe_q4_matrix *m, size_t j)
{
	uint32_t p = m->perm[j];

	return p < m->K ? p : m->K - 1;
}

void moe_q4_matrix_at(const void *m, uint32_t q4_group, uint32_t q4_flags, size_t N, size_t K,
		      struct moe_q4_matrix *ret)
{
	struct moe_q4_layout l;
	const char *b = m;

	moe_q4_layout(q4_group, q4_flags, N, K, &l);
	ret->codes = (const uint8_t *)b;
	ret->scales = (const uint16_t *)(const void *)(b + l.scales);
	ret->zeros = l.zeros ? (const uint8_t *)b + l.zeros : NULL;
	ret->perm = l.perm ? (const uint32_t *)(const void *)(b + l.perm) : NULL;
	ret->N = N;
	ret->K = K;
	ret->G = l.G;
	ret->bf16 = (q4_flags & MOE_Q4_BF16_SCALES) != 0;
}

static ALWAYS_INLINE float q4_scale(const struct moe_q4_matrix *m, size_t row, size_t g)
{
	uint16_t h = m->scales[row * (m->K / m->G) + g];

	return m->bf16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
}

/* The same with the hardware's float16 conversion (F16C; exact, as
 * moe_f16_to_f32), for the vector kernels, which set up a row's group for
 * every 128 or so weights: the portable conversion's cost showed there. */
__attribute__((target("f16c"))) static ALWAYS_INLINE float q4_scale_hw(const struct moe_q4_matrix *m,
									size_t row, size_t g)
{
	uint16_t h = m->scales[row * (m->K / m->G) + g];

	return m->bf16 ? moe_bf16_to_f32(h) : _cvtsh_ss(h);
}

static ALWAYS_INLINE int q4_zero(const struct moe_q4_matrix *m, size_t row, size_t g)
{
	return m->zeros ? m->zeros[row * (m->K / m->G) + g] : 8;
}

/* ------------------------------------------------------------------------ */
/* Scalar reference: 8 emulated lanes, the AVX2 order.                        */

static void dot_rows_q4_scalar(const struct moe_q4_matrix *m, size_t row0, size_t nr,
			       const float *const *xs, size_t nt, float *y, size_t ldy)
{
	size_t K = m->K, G = m->G;

	for (size_t c = 0; c < nt; c++)
		for (size_t r = 0; r < nr; r++) {
			const uint8_t *q = m->codes + (row0 + r) * (K / 2);
			float acc[8] = { 0 };

			for (size_t g = 0; g < K / G; g++) {
				float s = q4_scale(m, row0 + r, g);
				int z = q4_zero(m, row0 + r, g);

				for (size_t k = g * G; k < (g + 1) * G; k += 8)
					for (size_t l = 0; l < 8; l++) {
						size_t j = k + l;
						int v = (q[j / 2] >> (4 * (j & 1))) & 15;
						float x = xs[c][m->perm ? q4_col(m, j) : j];

						acc[l] = __builtin_fmaf((float)(v - z) * s, x, acc[l]);
					}
			}
			y[c * ldy + r] = moe_kern_sc_hsum8(acc);
		}
}

/* ------------------------------------------------------------------------ */
/* AVX2: 8 lanes, tiles of up to 4 rows x 2 tokens.                            */

#define Q4_RMAX 4
#define AVX2_CMAX 2

/* Lanes l = 0..7: nibble l of the 4 bytes at @p (column k + l of the row). */
AVX2_TARGET static ALWAYS_INLINE __m256i avx2_nibbles(const uint8_t *p, __m256i shifts)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts),
				_mm256_set1_epi32(15));
}

AVX2_TARGET static ALWAYS_INLINE __m256 avx2_load_x(const float *x, const uint32_t *perm, size_t k, size_t K)
{
	if (perm)
		return _mm256_i32gather_ps(x, _mm256_min_epu32(_mm256_loadu_si256((const __m256i *)(perm + k)),
							       _mm256_set1_epi32((int)(K - 1))), 4);
	return _mm256_loadu_ps(x + k);
}

AVX2_TARGET static ALWAYS_INLINE void
avx2_tile_q4(int R, int C, const struct moe_q4_matrix *m, size_t row0, const float *const *xs,
	     float *y, size_t ldy)
{
	size_t K = m->K, G = m->G;
	const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
	__m256 acc[Q4_RMAX][AVX2_CMAX];
	const uint8_t *row[Q4_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = m->codes + (row0 + (size_t)r) * (K / 2);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	}
	for (size_t g = 0; g < K / G; g++) {
		__m256 s[Q4_RMAX], zs[Q4_RMAX];

#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			float sr = q4_scale_hw(m, row0 + (size_t)r, g);

			s[r] = _mm256_set1_ps(sr);
			zs[r] = _mm256_set1_ps(-(float)q4_zero(m, row0 + (size_t)r, g) * sr);
			/* one tile ahead, as avx512_tile_q4i says why */
			_mm_prefetch((const char *)row[r] + g * G / 2 + (size_t)R * K / 2, _MM_HINT_T0);
		}
		for (size_t k = g * G; k < (g + 1) * G; k += 8) {
			__m256 w[Q4_RMAX];

#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				/* q s - z s: both products exact, so the one rounding
				 * of the fused form gives (q - z) s exactly */
				w[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(avx2_nibbles(row[r] + k / 2, shifts)),
						       s[r], zs[r]);
			}
#pragma GCC unroll 4
			for (int c = 0; c < C; c++) {
				__m256 xv = avx2_load_x(xs[c], m->perm, k, m->K);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx2_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* AVX-512: 16 lanes, tiles of up to 4 rows x 4 tokens.                       */

#define AVX512_CMAX 4

/* Lanes l = 0..15: nibble l of the 8 bytes at @p in the low 4 bits (the
 * bits above are garbage: the table lookup ignores them).  @sel puts the
 * first 4 bytes in lanes 0..7 and the next 4 in lanes 8..15. */
AVX512_TARGET static ALWAYS_INLINE __m512i avx512_nibbles(const uint8_t *p, __m512i sel, __m512i shifts)
{
	__m512i b = _mm512_permutexvar_epi32(sel, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)p)));

	return _mm512_srlv_epi32(b, shifts);
}

AVX512_TARGET static ALWAYS_INLINE __m512 avx512_load_x(const float *x, const uint32_t *perm, size_t k,
							 size_t K)
{
	if (perm)
		return _mm512_i32gather_ps(_mm512_min_epu32(_mm512_loadu_si512(perm + k), _mm512_set1_epi32((int)(K - 1))),
					   x, 4);
	return _mm512_loadu_ps(x + k);
}

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_q4(int R, int C, const struct moe_q4_matrix *m, size_t row0, const float *const *xs,
	       float *y, size_t ldy)
{
	size_t K = m->K, G = m->G;
	const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28,
						 0, 4, 8, 12, 16, 20, 24, 28);
	const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
	const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
	__m512 acc[Q4_RMAX][AVX512_CMAX];
	const uint8_t *row[Q4_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = m->codes + (row0 + (size_t)r) * (K / 2);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (size_t g = 0; g < K / G; g++) {
		__m512 lut[Q4_RMAX];

		/* the group's 16 weights of a row, (q - z) s for q = 0..15,
		 * exact (q s - z s in one rounding): one lookup per lane */
#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			float sr = q4_scale_hw(m, row0 + (size_t)r, g);

			lut[r] = _mm512_fmadd_ps(iota, _mm512_set1_ps(sr),
						 _mm512_set1_ps(-(float)q4_zero(m, row0 + (size_t)r, g) * sr));
		}
		for (size_t k = g * G; k < (g + 1) * G; k += 16) {
			__m512 w[Q4_RMAX];

#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				_mm_prefetch((const char *)row[r] + k / 2 + 512, _MM_HINT_T0);
				w[r] = _mm512_permutexvar_ps(avx512_nibbles(row[r] + k / 2, sel, shifts), lut[r]);
			}
#pragma GCC unroll 4
			for (int c = 0; c < C; c++) {
				__m512 xv = avx512_load_x(xs[c], m->perm, k, m->K);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
}

/*
 * The 1 to 16 token AVX-512 kernel (the decode of a vector was the cost: a
 * row's 16 weights took two shuffles and a shift for one multiply-add).
 * Lane p of the vectors here holds column 16 i + c(p) with c(2q) = q and
 * c(2q + 1) = 8 + q: one 8-byte broadcast from memory (a load, no shuffle)
 * and one variable shift put nibble c(p) in the low bits of lane p, since an
 * even lane sees the first 4 bytes and an odd lane the next 4.  The tokens
 * are stored in that order once per chunk (px), and each accumulator is put
 * back in the canonical lane order before its horizontal sum, so every lane
 * sums the same columns in the same order as avx512_tile_q4: the same bits.
 */

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_q4i(int R, int C, const struct moe_q4_matrix *m, size_t row0, const float *const *px,
		float *y, size_t ldy)
{
	size_t K = m->K, G = m->G, ng = K / G;
	const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
	const __m512i back = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
	const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
	__m512 acc[Q4_RMAX][AVX512_CMAX];
	const uint8_t *row[Q4_RMAX];
	/* s and -z s of 16 groups of each row, converted 16 at a time */
	float sb[Q4_RMAX][16] __attribute__((aligned(64))), zb[Q4_RMAX][16] __attribute__((aligned(64)));

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = m->codes + (row0 + (size_t)r) * (K / 2);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (size_t g = 0; g < ng; g++) {
		__m512 lut[Q4_RMAX];

		if (g % 16 == 0) {
			__mmask16 mk = (__mmask16)(ng - g >= 16 ? 0xffff : (1u << (ng - g)) - 1);

#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				size_t at = (row0 + (size_t)r) * ng + g;
				__m256i h = _mm256_maskz_loadu_epi16(mk, m->scales + at);
				__m512 s = m->bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
						   : _mm512_cvtph_ps(h);
				__m512 z = m->zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
							      _mm_maskz_loadu_epi8(mk, m->zeros + at)))
						    : _mm512_set1_ps(8);
				/* -z with its sign flipped as -(float)z, so -0 for z = 0 */
				__m512 nz = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(z),
										 _mm512_set1_epi32(INT32_MIN)));

				_mm512_store_ps(sb[r], s);
				/* -z s: exact (4 and at most 11 significant bits) */
				_mm512_store_ps(zb[r], _mm512_mul_ps(nz, s));
			}
		}
		/* the group's 16 weights of a row, (q - z) s for q = 0..15,
		 * exact (q s - z s in one rounding), as avx512_tile_q4.  The
		 * prefetch is one tile ahead, the same group of the next R rows:
		 * a tile reads R short streams (a row is 1 KB at hidden 2048)
		 * that the hardware prefetchers barely start on; 512 bytes ahead
		 * in the row ran into the next row, which the tile already
		 * reads (1.6x at 1 token from memory, one thread). */
#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			lut[r] = _mm512_fmadd_ps(iota, _mm512_set1_ps(sb[r][g % 16]), _mm512_set1_ps(zb[r][g % 16]));
			_mm_prefetch((const char *)row[r] + g * G / 2 + (size_t)R * K / 2, _MM_HINT_T0);
		}
		for (size_t k = g * G; k < (g + 1) * G; k += 16) {
			__m512 w[Q4_RMAX];

#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				int64_t v;

				memcpy(&v, row[r] + k / 2, sizeof(v));
				w[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(v), shifts), lut[r]);
			}
#pragma GCC unroll 4
			for (int c = 0; c < C; c++) {
				__m512 xv = _mm512_load_ps(px[c] + k);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(_mm512_permutexvar_ps(back, acc[r][c]));
}

/* ------------------------------------------------------------------------ */
/* Drivers: chunks of CMAX tokens; rows by fours, then one at a time (a row's
 * result does not depend on its tile: the order is per row and token).      */

#define Q4_CASE(isa, R, C) case C: isa##_tile_q4(R, C, mm, row0 + r, xc, yc + r, ldy); break;

/*
 * With a permutation, a chunk's tokens are gathered once, x[perm[j]] into
 * a per-thread buffer, before its row tiles, which then read it as plain x (the
 * same values in the same order: the same bits as the in-register
 * gather, which rows wider than Q4_GATHER_MAX keep).  8192 covers the
 * released shapes (DeepSeek-V3's hidden 7168): 128 KiB of thread-local
 * storage per thread that runs the AVX-512 kernel, 64 KiB for AVX2.
 */
#define Q4_GATHER_MAX 8192

static ALWAYS_INLINE const struct moe_q4_matrix *
q4_gather(const struct moe_q4_matrix *m, const float *const *xs, size_t nc, float (*gx)[Q4_GATHER_MAX],
	  const float **xg, struct moe_q4_matrix *plain)
{
	if (!m->perm || m->K > Q4_GATHER_MAX)
		return m;
	for (size_t c = 0; c < nc; c++) {
		for (size_t j = 0; j < m->K; j++)
			gx[c][j] = xs[c][q4_col(m, j)];
		xg[c] = gx[c];
	}
	*plain = *m;
	plain->perm = NULL;
	return plain;
}

AVX2_TARGET static void dot_rows_q4_avx2(const struct moe_q4_matrix *m, size_t row0, size_t nr,
					 const float *const *xs, size_t nt, float *y, size_t ldy)
{
	static __thread float gx[AVX2_CMAX][Q4_GATHER_MAX] __attribute__((aligned(64)));

	for (size_t c0 = 0; c0 < nt; c0 += AVX2_CMAX) {
		size_t nc = nt - c0 < AVX2_CMAX ? nt - c0 : AVX2_CMAX, r = 0;
		const float *xg[AVX2_CMAX];
		struct moe_q4_matrix plain;
		const struct moe_q4_matrix *mm = q4_gather(m, xs + c0, nc, gx, xg, &plain);
		const float *const *xc = mm == m ? xs + c0 : xg;
		float *yc = y + c0 * ldy;

		for (; r + Q4_RMAX <= nr; r += Q4_RMAX)
			switch (nc) { Q4_CASE(avx2, 4, 1) Q4_CASE(avx2, 4, 2) }
		for (; r < nr; r++)
			switch (nc) { Q4_CASE(avx2, 1, 1) Q4_CASE(avx2, 1, 2) }
	}
}

/*
 * The tokens of a chunk in the lane order of avx512_tile_q4i, x[perm[j]]
 * with a permutation (the gather of q4_gather folded in): one shuffle per
 * 16 columns, against the rows' decode it saves.
 */
AVX512_TARGET static void q4_interleave(const struct moe_q4_matrix *m, const float *const *xs, size_t nc,
					float (*px)[Q4_GATHER_MAX], const float **pxc)
{
	const __m512i fwd = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
	const __m512i last = _mm512_set1_epi32((int)(m->K - 1));

	for (size_t c = 0; c < nc; c++) {
		for (size_t k = 0; k < m->K; k += 16) {
			__m512 v;

			if (m->perm)
				v = _mm512_i32gather_ps(_mm512_min_epu32(_mm512_permutexvar_epi32(fwd,
								_mm512_loadu_si512(m->perm + k)), last), xs[c], 4);
			else
				v = _mm512_permutexvar_ps(fwd, _mm512_loadu_ps(xs[c] + k));
			_mm512_store_ps(px[c] + k, v);
		}
		pxc[c] = px[c];
	}
}

#define Q4I_CASE(R, C) case C: avx512_tile_q4i(R, C, m, row0 + r, pxc, yc + r, ldy); break;

AVX512_TARGET static void dot_rows_q4_avx512(const struct moe_q4_matrix *m, size_t row0, size_t nr,
					     const float *const *xs, size_t nt, float *y, size_t ldy)
{
	static __thread float gx[AVX512_CMAX][Q4_GATHER_MAX] __attribute__((aligned(64)));

	for (size_t c0 = 0; c0 < nt; c0 += AVX512_CMAX) {
		size_t nc = nt - c0 < AVX512_CMAX ? nt - c0 : AVX512_CMAX, r = 0;
		const float *xg[AVX512_CMAX];
		float *yc = y + c0 * ldy;

		if (m->K <= Q4_GATHER_MAX) {
			const float *pxc[AVX512_CMAX];

			q4_interleave(m, xs + c0, nc, gx, pxc);
			for (; r + Q4_RMAX <= nr; r += Q4_RMAX)
				switch (nc) { Q4I_CASE(4, 1) Q4I_CASE(4, 2) Q4I_CASE(4, 3) Q4I_CASE(4, 4) }
			for (; r < nr; r++)
				switch (nc) { Q4I_CASE(1, 1) Q4I_CASE(1, 2) Q4I_CASE(1, 3) Q4I_CASE(1, 4) }
			continue;
		}
		/* too wide for the buffer: the canonical lane order, x gathered
		 * per vector step */
		struct moe_q4_matrix plain;
		const struct moe_q4_matrix *mm = q4_gather(m, xs + c0, nc, gx, xg, &plain);
		const float *const *xc = mm == m ? xs + c0 : xg;

		for (; r + Q4_RMAX <= nr; r += Q4_RMAX)
			switch (nc) {
			Q4_CASE(avx512, 4, 1) Q4_CASE(avx512, 4, 2) Q4_CASE(avx512, 4, 3) Q4_CASE(avx512, 4, 4)
			}
		for (; r < nr; r++)
			switch (nc) {
			Q4_CASE(avx512, 1, 1) Q4_CASE(avx512, 1, 2) Q4_CASE(avx512, 1, 3) Q4_CASE(avx512, 1, 4)
			}
	}
}

static const moe_kern_dot_rows_q4_fn kernels_q4[MOE_KERN_ISA_COUNT] = {
	[MOE_KERN_SCALAR] = dot_rows_q4_scalar,
	[MOE_KERN_AVX2] = dot_rows_q4_avx2,
	[MOE_KERN_AVX512] = dot_rows_q4_avx512,
	[MOE_KERN_AVX512_VBMI] = dot_rows_q4_avx512,    /* no byte permutes needed */
};

moe_kern_dot_rows_q4_fn moe_kern_get_q4(enum moe_kern_isa isa)
{
	return (unsigned)isa < MOE_KERN_ISA_COUNT && moe_kern_isa_usable(isa) ? kernels_q4[isa] : NULL;
}

void moe_kern_dot_rows_q4(const struct moe_q4_matrix *m, size_t row0, size_t nr,
			  const float *const *xs, size_t nt, float *y, size_t ldy)
{
	kernels_q4[moe_kern_active()](m, row0, nr, xs, nt, y, ldy);
}
