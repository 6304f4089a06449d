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
 * The decode is a table lookup in a register, on the resident order of
 * kernels.h (done once when the matrix is made resident): in a row's whole
 * blocks of 128 values, byte 4p + j of the 64 holds values 32j + p and
 * 32j + 16 + p, so a 64-byte load at byte j gives each 32-bit lane p its
 * value's nibble in its low 4 bits, and the same shifted right by 4 the
 * next 16 values'; vpermps then picks the weight from the 16 e2m1 values
 * already times the block's scale (AVX2: 8 magnitudes and a blend on bit
 * 3).  The values after the last whole block are in groups of 16 with
 * their even and odd nibbles apart, where a 64-bit broadcast of the group
 * and one variable shift do the same.  Measured on one core, 2880 x 2880,
 * one token, hot in cache: the store's order with a byte unpack, a
 * widening and an AND per 16 values and the scale multiplied per vector
 * ran at 0.12 ns a weight; the groups of 16 at 0.053; the blocks at 0.045.
 */
#include "config.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#include "kernels.h"
#include "kernels_mxfp4.h"
#include "kernels_impl.h"


/*
 * Bytes ahead of the current position each row stream prefetches.  The
 * rows of a tile are separate streams, but the matrix's rows lie back to
 * back, so far enough ahead this fetches the next tiles' rows: the
 * hardware prefetchers do not follow 4 streams of 1440 bytes.  Measured
 * on one core, 48 matrices of 2880 x 2880 (out of cache), one token,
 * paired runs on a shared host: 1024 bytes 0.12-0.14 ns a weight, 12288
 * 0.063-0.071 (bf16 packed: 0.22).
 */
#define MX_PREFETCH_AHEAD 12288

/* 2^(s - 127) as float32, by the byte: s << 23 is the float but for s = 0
 * (the subnormal 2^-127) and 255 (NaN, as the OCP spec says). */
static float e8m0_values[256] __attribute__((aligned(64)));

static void e8m0_init(void)
{
	for (unsigned s = 0; s < 256; s++) {
		uint32_t u = s == 0 ? 0x00400000u : s == 255 ? 0x7fc00000u : s << 23;

		memcpy(&e8m0_values[s], &u, sizeof(u));
	}
}

static const float e2m1_values[16] __attribute__((aligned(64))) = {
	0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
	-0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f,
};

/* Values of a whole block of the resident order: 64 bytes. */
#define MX_BLOCK 128

/* The resident code byte and shift of value k of a row of K (kernels.h):
 * in a whole block of 128 values, byte 4p + j holds values 32j + p (low
 * nibble) and 32j + 16 + p (high); after the row's last whole block, a
 * group of 16 values is 8 bytes, the even values' nibbles in bytes 0..3,
 * the odd values' in bytes 4..7, each half in order, low nibble first. */
static inline size_t mx_byte(size_t K, size_t k)
{
	size_t v = k % MX_BLOCK;

	if (k < K / MX_BLOCK * MX_BLOCK)
		return k / MX_BLOCK * (MX_BLOCK / 2) + 4 * (v % 16) + v / 32;
	return k / 16 * 8 + (k & 1) * 4 + (k % 16) / 4;
}

static inline unsigned mx_shift(size_t K, size_t k)
{
	if (k < K / MX_BLOCK * MX_BLOCK)
		return (unsigned)(k % 32 / 16) * 4;
	return (unsigned)((k % 16) / 2 % 2) * 4;
}

/* ------------------------------------------------------------------------ */
/* Scalar: 8 emulated lanes, the reference of the vector code.               */

#define SC_W 8

static void dot_rows_scalar_mxfp4(const uint8_t *W, const uint8_t *S, size_t K, size_t nr,
				  const float *const *xs, size_t nt, float *y, size_t ldy)
{
	for (size_t c = 0; c < nt; c++) {
		const float *x = xs[c];

		for (size_t r = 0; r < nr; r++) {
			const uint8_t *row = W + r * (K / 2), *sr = S + r * (K / MOE_MXFP4_BLOCK);
			float acc[SC_W] = { 0 };

			for (size_t k = 0; k < K; k++) {
				uint8_t code = (uint8_t)(row[mx_byte(K, k)] >> mx_shift(K, k)) & 15u;
				float w = e2m1_values[code] * e8m0_values[sr[k / MOE_MXFP4_BLOCK]];

				acc[k % SC_W] = __builtin_fmaf(w, x[k], acc[k % SC_W]);
			}
			y[c * ldy + r] = moe_kern_sc_hsum8(acc);
		}
	}
}

/*
 * The vector decode.  In a whole block, the 64 (AVX2: 32) bytes at byte j
 * of it put value 32j + l (AVX2: 32j + 8u + l for the load at 32u + j) in
 * the low 4 bits of lane l, and shifted right by 4 value 32j + 16 + l, so
 * every lane holds its canonical column.  After the last whole block, a
 * group's 8 bytes broadcast as a 64-bit lane put the even half (a) in the
 * even 32-bit lanes and the odd half (b) in the odd ones, so lane i,
 * shifted right by 4 * (i / 2), has value i's nibble in its low 4 bits.
 * vpermps reads only those, from a table of the 16 values already
 * multiplied by the block's scale (exact products: the weights
 * themselves).  Per 16 weights and a row: a lookup and half a shift in
 * whole blocks, a broadcast, a shift and a lookup after them.  The loads
 * at bytes 1..3 of a row's last block read up to 3 bytes past it: the
 * next row's, or after the last row the scales (moe_kern_packed_bytes()),
 * into bits the lookup ignores.
 */

/* ------------------------------------------------------------------------ */
/* AVX2 + FMA: 8 lanes per step; tiles of 4 rows x 2.                        */

#define AVX2_RMAX 4
#define AVX2_CMAX 2

/* 8 weights from indices in the low 4 bits of @idx (bits above ignored):
 * vpermps picks the scaled magnitude by the low 3 bits, and bit 3, moved
 * to bit 31, is the sign (one table a row: the registers hold 4 rows x 2
 * tokens of sums). */
AVX2_TARGET static ALWAYS_INLINE __m256 avx2_mx_lookup(__m256i idx, __m256 mag)
{
	__m256i sign = _mm256_and_si256(_mm256_slli_epi32(idx, 28), _mm256_set1_epi32(INT32_MIN));

	return _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, idx), _mm256_castsi256_ps(sign));
}

AVX2_TARGET static ALWAYS_INLINE void
avx2_tile_mxfp4(int R, int C, const uint8_t *W, const uint8_t *S, size_t K, const float *const *xs,
		float *y, size_t ldy)
{
	__m256 mpos = _mm256_load_ps(e2m1_values);
	__m256i sh0 = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
	__m256i sh1 = _mm256_setr_epi32(16, 16, 20, 20, 24, 24, 28, 28);
	size_t kfull = K / MX_BLOCK * MX_BLOCK;
	__m256 acc[AVX2_RMAX][AVX2_CMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm256_setzero_ps();
	for (size_t k = 0; k < K; k += MOE_MXFP4_BLOCK) {
		__m256 mag[AVX2_RMAX];

#pragma GCC unroll 4
		for (int r = 0; r < R; r++) {
			mag[r] = _mm256_mul_ps(mpos, _mm256_broadcast_ss(&e8m0_values[S[(size_t)r * (K / MOE_MXFP4_BLOCK) +
										  k / MOE_MXFP4_BLOCK]]));
			if (k % 128 == 0)
				_mm_prefetch((const char *)W + (size_t)r * (K / 2) + k / 2 + MX_PREFETCH_AHEAD,
					     _MM_HINT_T0);
		}
#pragma GCC unroll 4
		for (size_t j = 0; j < MOE_MXFP4_BLOCK; j += 8) {
			__m256 xv[AVX2_CMAX];

#pragma GCC unroll 4
			for (int c = 0; c < C; c++)
				xv[c] = _mm256_loadu_ps(xs[c] + k + j);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				const uint8_t *rw = W + (size_t)r * (K / 2);
				__m256i idx;
				__m256 w;

				if (k < kfull) {
					/* value v = 32i + 16h + 8u + l of the block: the
					 * load at 32u + i, shifted by 4h */
					size_t v = k % MX_BLOCK + j;
					__m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(rw + (k - k % MX_BLOCK) / 2 +
												       32 * (v / 8 % 2) + v / 32));

					idx = v / 16 % 2 ? _mm256_srli_epi32(b, 4) : b;
				} else {
					int64_t g;

					memcpy(&g, rw + (k + j) / 16 * 8, sizeof(g));
					idx = _mm256_srlv_epi32(_mm256_set1_epi64x(g), j % 16 ? sh1 : sh0);
				}
				w = avx2_mx_lookup(idx, mag[r]);
#pragma GCC unroll 4
				for (int c = 0; c < C; c++)
					acc[r][c] = _mm256_fmadd_ps(w, xv[c], acc[r][c]);
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
/* AVX-512: 16 lanes per step, tiles of 4 rows x 6.                          */

#define AVX512_RMAX 4
#define AVX512_CMAX 6

/* A scale block's table of each row: the 16 e2m1 values times its scale. */
AVX512_TARGET static ALWAYS_INLINE void avx512_mx_tables(int R, const uint8_t *S, size_t K, size_t k, __m512 vals,
							 __m512 *tab)
{
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
		tab[r] = _mm512_mul_ps(vals, _mm512_set1_ps(e8m0_values[S[(size_t)r * (K / MOE_MXFP4_BLOCK) +
									  k / MOE_MXFP4_BLOCK]]));
}

AVX512_TARGET static ALWAYS_INLINE void
avx512_tile_mxfp4(int R, int C, const uint8_t *W, const uint8_t *S, size_t K, const float *const *xs,
		  float *y, size_t ldy)
{
	__m512 vals = _mm512_load_ps(e2m1_values);
	__m512i sh = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
	size_t kfull = K / MX_BLOCK * MX_BLOCK, k = 0;
	__m512 acc[AVX512_RMAX][AVX512_CMAX], tab[AVX512_RMAX];

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			acc[r][c] = _mm512_setzero_ps();
	for (; k < kfull; k += MX_BLOCK) {
#pragma GCC unroll 4
		for (int r = 0; r < R; r++)
			_mm_prefetch((const char *)W + (size_t)r * (K / 2) + k / 2 + MX_PREFETCH_AHEAD, _MM_HINT_T0);
#pragma GCC unroll 8
		for (int v = 0; v < MX_BLOCK / 16; v++) {
			__m512 w[AVX512_RMAX];

			if (v % 2 == 0)     /* a new scale block */
				avx512_mx_tables(R, S, K, k + 16 * (size_t)v, vals, tab);
#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				__m512i b = _mm512_loadu_si512(W + (size_t)r * (K / 2) + k / 2 + (size_t)v / 2);

				w[r] = _mm512_permutexvar_ps(v % 2 ? _mm512_srli_epi32(b, 4) : b, tab[r]);
			}
#pragma GCC unroll 6
			for (int c = 0; c < C; c++) {
				__m512 xv = _mm512_loadu_ps(xs[c] + k + 16 * (size_t)v);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
	for (; k < K; k += MOE_MXFP4_BLOCK) {
		avx512_mx_tables(R, S, K, k, vals, tab);
#pragma GCC unroll 2
		for (size_t j = 0; j < MOE_MXFP4_BLOCK; j += 16) {
			__m512 w[AVX512_RMAX];

#pragma GCC unroll 4
			for (int r = 0; r < R; r++) {
				int64_t g;

				memcpy(&g, W + (size_t)r * (K / 2) + (k + j) / 2, sizeof(g));
				w[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(g), sh), tab[r]);
			}
#pragma GCC unroll 6
			for (int c = 0; c < C; c++) {
				__m512 xv = _mm512_loadu_ps(xs[c] + k + j);
#pragma GCC unroll 4
				for (int r = 0; r < R; r++)
					acc[r][c] = _mm512_fmadd_ps(w[r], xv, acc[r][c]);
			}
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int c = 0; c < C; c++)
			y[(size_t)c * ldy + (size_t)r] = moe_kern_avx512_hsum(acc[r][c]);
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

static pthread_once_t mx_once = PTHREAD_ONCE_INIT;
static bool mx_usable[MOE_KERN_ISA_COUNT];

static void mx_init(void)
{
	e8m0_init();
	for (int i = 0; i < MOE_KERN_ISA_COUNT; i++)
		mx_usable[i] = moe_kern_get((enum moe_kern_isa)i) != NULL;
}

moe_kern_dot_rows_mxfp4_fn moe_kern_get_mxfp4(enum moe_kern_isa isa)
{
	pthread_once(&mx_once, mx_init);
	if ((unsigned)isa >= MOE_KERN_ISA_COUNT || !mx_usable[isa])   /* not on this CPU */
		return NULL;
	return kernels_mxfp4[isa];
}

/* Store bytes [b0, b0 + nb) of an N x K matrix to the resident layout:
 * each code byte's two nibbles go to their places (mx_byte(); a whole
 * block at once, else nibble by nibble, so pieces may come in any order),
 * the scales and the padding as they are. */
void moe_kern_mxfp4_pack_bytes(const void *src, size_t N, size_t K, uint64_t b0, uint64_t nb, void *dst)
{
	uint64_t codes = (uint64_t)N * (K / 2), end = b0 + nb;
	const uint8_t *s = src;
	uint8_t *d = dst;

	for (uint64_t j = b0; j < end && j < codes; j++) {
		uint64_t o = j % (K / 2);

		if (o % (MX_BLOCK / 2) == 0 && o < K / MX_BLOCK * (MX_BLOCK / 2) && end - j >= MX_BLOCK / 2) {
			moe_kern_nibble_block_pack(s + (j - b0), d + j);     /* a whole block at once */
			j += MX_BLOCK / 2 - 1;
			continue;
		}
		uint8_t v = s[j - b0];
		uint8_t *rd = d + (j - o);

		for (unsigned h = 0; h < 2; h++) {
			uint8_t *p = rd + mx_byte(K, 2 * o + h);
			unsigned sh = mx_shift(K, 2 * o + h);

			*p = (uint8_t)((*p & ~(15u << sh)) | ((v >> (4 * h)) & 15u) << sh);
		}
	}
	if (end > codes) {
		uint64_t a = b0 > codes ? b0 : codes;

		memcpy(d + a, s + (a - b0), end - a);
	}
}
