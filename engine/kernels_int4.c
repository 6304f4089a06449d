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
 * The resident layout of an INT4 matrix is the store's but for the order
 * of the nibbles inside each row's 64-byte blocks (kernels.h,
 * moe_kern_q4_pack_bytes): byte 4p + j of a block holds values 32j + p
 * (low nibble) and 32j + 16 + p (high) of its 128, so that a 64-byte load
 * at byte j of the block gives 32-bit lane p value 32j + p in its low 4
 * bits, and the same shifted right by 4 value 32j + 16 + p: 16 weights for
 * a table lookup (vpermps) and half a shift, where the store's order took
 * a broadcast, a variable shift and the lookup, with the tokens put in a
 * matching lane order per call.  Rows keep their K/2 bytes (a quarter of a
 * bf16 row, so a tile of four of them is already a short stream per row;
 * the group interleaving of the wider dtypes is not used) and the values
 * after the last whole block of a row stay in the store's order.
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

/*
 * The resident layout (kernels.h): value k of a row is in byte q4_byte()
 * of the row, shifted by q4_shift().  Whole blocks of Q4_BLOCK values (64
 * bytes) are reordered, so that byte 4p + j holds values 32j + p and
 * 32j + 16 + p of its block; the rest of the row is as stored (byte k/2,
 * low nibble first).
 */
#define Q4_BLOCK 128

static inline size_t q4_byte(size_t K, size_t k)
{
	size_t v = k % Q4_BLOCK;

	if (k >= K / Q4_BLOCK * Q4_BLOCK)
		return k / 2;
	return k / Q4_BLOCK * (Q4_BLOCK / 2) + 4 * (v % 16) + v / 32;
}

static inline unsigned q4_shift(size_t K, size_t k)
{
	if (k >= K / Q4_BLOCK * Q4_BLOCK)
		return 4 * (unsigned)(k & 1);
	return 4 * (unsigned)(k % 32 / 16);
}

/*
 * Store bytes [b0, b0 + nb) of an N x K INT4 matrix (its codes, then the
 * rest as moe_q4_layout() lays it out) to the resident layout: each code
 * byte's two nibbles go to their places (written nibble by nibble, so
 * pieces may come in any order), everything after the codes as it is.
 */
void moe_kern_q4_pack_bytes(const void *src, size_t N, size_t K, uint64_t b0, uint64_t nb, void *dst)
{
	uint64_t codes = (uint64_t)N * (K / 2), end = b0 + nb;
	const uint8_t *s = src;
	uint8_t *d = dst;

	for (uint64_t j = b0; j < end && j < codes; j++) {
		uint64_t o = j % (K / 2);

		if (o % (Q4_BLOCK / 2) == 0 && o < K / Q4_BLOCK * (Q4_BLOCK / 2) && end - j >= Q4_BLOCK / 2) {
			moe_kern_nibble_block_pack(s + (j - b0), d + j);     /* a whole block at once */
			j += Q4_BLOCK / 2 - 1;
			continue;
		}
		uint8_t v = s[j - b0];
		uint64_t row = j / (K / 2);
		size_t col = (size_t)(j % (K / 2)) * 2;
		uint8_t *rd = d + row * (K / 2);

		for (unsigned h = 0; h < 2; h++) {
			uint8_t *p = rd + q4_byte(K, col + h);
			unsigned sh = q4_shift(K, col + h);

			*p = (uint8_t)((*p & ~(15u << sh)) | ((v >> (4 * h)) & 15u) << sh);
		}
	}
	if (end > codes) {
		uint64_t a = b0 > codes ? b0 : codes;

		memcpy(d + a, s + (a - b0), end - a);
	}
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
						int v = (q[q4_byte(K, j)] >> q4_shift(K, j)) & 15;
						float x = xs[c][m->perm ? q4_col(m, j) : j];

						acc[l] = __builtin_fmaf((float)(v - z) * s, x, acc[l]);
					}
			}
			y[c * ldy + r] = moe_kern_sc_hsum8(acc);
		}
}

/*
 * How far ahead a tile prefetches its rows: the same block of the rows a
 * whole number of tiles on, at least this many bytes.  A tile reads R short
 * streams (a row is 1 KB at hidden 2048) that the hardware prefetchers
 * barely start on; 512 bytes ahead in the row ran into the next row, which
 * the tile already reads (1.6x at 1 token from memory, one thread).  One
 * tile ahead is 4 KB at K = 2048 but 1.5 KB at K = 768 (Qwen3-30B-A3B's
 * down), under the memory latency at 2 threads: there 8 KB took the kernel
 * from 0.063-0.079 to 0.055-0.060 ns a weight (mean of 300 passes, both
 * cores streaming), and K = 2048 did not change.
 */
#define Q4_PREFETCH_MIN 8192

/* The prefetch distance of a tile of R rows of K values. */
static inline size_t q4_ahead(int R, size_t K)
{
	size_t tile = (size_t)R * (K / 2);

	return tile * ((Q4_PREFETCH_MIN + tile - 1) / tile);
}

/*
 * The vector tiles below read a whole block of a row as overlapping loads
 * at its bytes 0..3, the last of which reads 3 bytes past the block: the
 * next row's, or after the last row the scales, which follow the codes in
 * every INT4 matrix (moe_q4_layout()); they land in bits that the decode
 * ignores.
 */

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

/* A new group @g: s and -z s of each row of the tile. */
AVX2_TARGET static ALWAYS_INLINE void avx2_q4_group(int R, const struct moe_q4_matrix *m, size_t row0, size_t g,
						    __m256 *s, __m256 *zs)
{
#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		float sr = q4_scale_hw(m, row0 + (size_t)r, g);

		s[r] = _mm256_set1_ps(sr);
		zs[r] = _mm256_set1_ps(-(float)q4_zero(m, row0 + (size_t)r, g) * sr);
	}
}

/* q s - z s: both products exact, so the one rounding of the fused form
 * gives (q - z) s exactly */
AVX2_TARGET static ALWAYS_INLINE __m256 avx2_q4_weights(__m256i q, __m256 s, __m256 zs)
{
	return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, zs);
}

/*
 * Value v = 32j + 16h + 8u + l of a whole block is lane l of the 32 bytes
 * at its byte 32u + j, shifted right by 4h; the tail is 4 bytes at a time
 * in the store's order.  Lane l takes the canonical columns.  @FAST: G is
 * a multiple of the block and there is no permutation (so no tail either).
 */
AVX2_TARGET static ALWAYS_INLINE void
avx2_tile_q4(int R, int C, int FAST, const struct moe_q4_matrix *m, size_t row0, const float *const *xs,
	     float *y, size_t ldy)
{
	size_t K = m->K, G = m->G, kfull = K / Q4_BLOCK * Q4_BLOCK, g = 0, gnext = 0, k = 0;
	size_t ahead = q4_ahead(R, K);
	const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
	const __m256i fifteen = _mm256_set1_epi32(15);
	__m256 acc[Q4_RMAX][AVX2_CMAX], s[Q4_RMAX], zs[Q4_RMAX];
	const uint8_t *row[Q4_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = m->codes + (row0 + (size_t)r) * (K / 2);
		s[r] = zs[r] = _mm256_setzero_ps();
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	}
	for (; k < kfull; k += Q4_BLOCK) {
		if (FAST && k == gnext) {
			avx2_q4_group(R, m, row0, g++, s, zs);
			gnext += G;
		}
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			_mm_prefetch((const char *)row[r] + k / 2 + ahead, _MM_HINT_T0);
#pragma GCC unroll 16
		for (int v = 0; v < Q4_BLOCK / 8; v++) {
			size_t kv = k + 8 * (size_t)v;
			__m256 w[Q4_RMAX];

			if (!FAST && kv == gnext) {
				avx2_q4_group(R, m, row0, g++, s, zs);
				gnext += G;
			}
#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				__m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(row[r] + k / 2 + 32 * (v % 2) +
											      v / 4));

				w[r] = avx2_q4_weights(_mm256_and_si256(v / 2 % 2 ? _mm256_srli_epi32(b, 4) : b, fifteen),
						       s[r], zs[r]);
			}
#pragma GCC unroll 4
			for (int c = 0; c < C; c++) {
				__m256 xv = avx2_load_x(xs[c], FAST ? NULL : m->perm, kv, K);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm256_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
	for (; !FAST && k < K; k += 8) {
		__m256 w[Q4_RMAX];

		if (k == gnext) {
			avx2_q4_group(R, m, row0, g++, s, zs);
			gnext += G;
		}
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = avx2_q4_weights(avx2_nibbles(row[r] + k / 2, shifts), s[r], zs[r]);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m256 xv = avx2_load_x(xs[c], m->perm, k, K);
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
/* AVX-512: 16 lanes, tiles of up to 4 rows x 4 tokens.                       */

#define AVX512_CMAX 4

/* Lanes l = 0..15: nibble l of the 8 bytes at @p in the low 4 bits (the
 * bits above are garbage: the table lookup ignores them).  @sel puts the
 * first 4 bytes in lanes 0..7 and the next 4 in lanes 8..15.  For the
 * values after a row's last whole block, in the store's order. */
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

/* A new group @g: the tables of its 16 weights of each row of the tile,
 * (q - z) s for q = 0..15, exact (q s - z s in one rounding); s and -z s
 * are converted 16 groups at a time into @sb and @zb. */
AVX512_TARGET static ALWAYS_INLINE void avx512_q4_group(int R, const struct moe_q4_matrix *m, size_t row0, size_t g,
							float (*sb)[16], float (*zb)[16], __m512 *lut)
{
	const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
	size_t ng = m->K / m->G;

	if (g % 16 == 0) {
		__mmask16 mk = (__mmask16)(ng - g >= 16 ? 0xffff : (1u << (ng - g)) - 1);

#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			size_t at = (row0 + (size_t)r) * ng + g;
			__m256i h = _mm256_maskz_loadu_epi16(mk, m->scales + at);
			__m512 sv = m->bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
					    : _mm512_cvtph_ps(h);
			__m512 z = m->zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, m->zeros + at)))
					    : _mm512_set1_ps(8);
			/* -z with its sign flipped as -(float)z, so -0 for z = 0 */
			__m512 nz = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(z),
									 _mm512_set1_epi32(INT32_MIN)));

			_mm512_store_ps(sb[r], sv);
			/* -z s: exact (4 and at most 11 significant bits) */
			_mm512_store_ps(zb[r], _mm512_mul_ps(nz, sv));
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
		lut[r] = _mm512_fmadd_ps(iota, _mm512_set1_ps(sb[r][g % 16]), _mm512_set1_ps(zb[r][g % 16]));
}

/*
 * A whole block's 8 vectors of a row are the 64-byte loads at its bytes
 * 0..3, each as it is and shifted right by 4 (the resident layout above),
 * so every lane holds its canonical column: no lane reorder, the tokens
 * are read as they are, and the decode is a lookup and half a shift per
 * 16 weights.  The tail is 8 bytes at a time in the store's order.
 * @FAST: G is a multiple of the block and there is no permutation (so no
 * tail either), the groups change at block boundaries only.  The
 * prefetch is q4_ahead()'s.
 */
AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_q4(int R, int C, int FAST, const struct moe_q4_matrix *m, size_t row0, const float *const *xs,
	       float *y, size_t ldy)
{
	size_t K = m->K, G = m->G, kfull = K / Q4_BLOCK * Q4_BLOCK, g = 0, gnext = 0, k = 0;
	size_t ahead = q4_ahead(R, K);
	const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28,
						 0, 4, 8, 12, 16, 20, 24, 28);
	const __m512i sel = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
	__m512 acc[Q4_RMAX][AVX512_CMAX], lut[Q4_RMAX];
	const uint8_t *row[Q4_RMAX];
	float sb[Q4_RMAX][16] __attribute__((aligned(64))), zb[Q4_RMAX][16] __attribute__((aligned(64)));

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		row[r] = m->codes + (row0 + (size_t)r) * (K / 2);
		lut[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	}
	for (; k < kfull; k += Q4_BLOCK) {
		if (FAST && k == gnext) {
			avx512_q4_group(R, m, row0, g++, sb, zb, lut);
			gnext += G;
		}
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			_mm_prefetch((const char *)row[r] + k / 2 + ahead, _MM_HINT_T0);
#pragma GCC unroll 8
		for (int v = 0; v < Q4_BLOCK / 16; v++) {
			size_t kv = k + 16 * (size_t)v;
			__m512 w[Q4_RMAX];

			if (!FAST && kv == gnext) {
				avx512_q4_group(R, m, row0, g++, sb, zb, lut);
				gnext += G;
			}
#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				__m512i b = _mm512_loadu_si512(row[r] + k / 2 + (size_t)v / 2);

				w[r] = _mm512_permutexvar_ps(v % 2 ? _mm512_srli_epi32(b, 4) : b, lut[r]);
			}
#pragma GCC unroll 4
			for (int c = 0; c < C; c++) {
				__m512 xv = avx512_load_x(xs[c], FAST ? NULL : m->perm, kv, K);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
	for (; !FAST && k < K; k += 16) {
		__m512 w[Q4_RMAX];

		if (k == gnext) {
			avx512_q4_group(R, m, row0, g++, sb, zb, lut);
			gnext += G;
		}
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			w[r] = _mm512_permutexvar_ps(avx512_nibbles(row[r] + k / 2, sel, shifts), lut[r]);
#pragma GCC unroll 4
		for (int c = 0; c < C; c++) {
			__m512 xv = avx512_load_x(xs[c], m->perm, k, K);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++)
				acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
}

/* ------------------------------------------------------------------------ */
/* Drivers: chunks of CMAX tokens; rows by fours, then one at a time (a row's
 * result does not depend on its tile: the order is per row and token).      */

#define Q4_CASE(isa, R, C)                                                              \
	case C:                                                                         \
		if (fast)                                                               \
			isa##_tile_q4(R, C, 1, mm, row0 + r, xc, yc + r, ldy);          \
		else                                                                    \
			isa##_tile_q4(R, C, 0, mm, row0 + r, xc, yc + r, ldy);          \
		break;

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
		bool fast = !mm->perm && mm->G % Q4_BLOCK == 0;

		for (; r + Q4_RMAX <= nr; r += Q4_RMAX)
			switch (nc) { Q4_CASE(avx2, 4, 1) Q4_CASE(avx2, 4, 2) }
		for (; r < nr; r++)
			switch (nc) { Q4_CASE(avx2, 1, 1) Q4_CASE(avx2, 1, 2) }
	}
}

AVX512_TARGET static void dot_rows_q4_avx512(const struct moe_q4_matrix *m, size_t row0, size_t nr,
					     const float *const *xs, size_t nt, float *y, size_t ldy)
{
	static __thread float gx[AVX512_CMAX][Q4_GATHER_MAX] __attribute__((aligned(64)));

	for (size_t c0 = 0; c0 < nt; c0 += AVX512_CMAX) {
		size_t nc = nt - c0 < AVX512_CMAX ? nt - c0 : AVX512_CMAX, r = 0;
		const float *xg[AVX512_CMAX];
		struct moe_q4_matrix plain;
		const struct moe_q4_matrix *mm = q4_gather(m, xs + c0, nc, gx, xg, &plain);
		const float *const *xc = mm == m ? xs + c0 : xg;
		float *yc = y + c0 * ldy;
		bool fast = !mm->perm && mm->G % Q4_BLOCK == 0;

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
