/* SPDX-License-Identifier: MIT */
/*
 * What the kernel files share inside the engine (kernels.c picks the
 * instruction set; kernels_mxfp4.c and kernels_int4.c have the MXFP4 and
 * INT4 kernels): the instruction-set targets and the one fixed tree that
 * sums a vector's lanes (kernels.h's canonical order), which every kernel
 * of every format must use alike for their results to agree bit for bit.
 * Not an interface: kernels.h is.
 */
#ifndef MOE_KERNELS_IMPL_H
#define MOE_KERNELS_IMPL_H

#include <stdbool.h>

#include <immintrin.h>

#include "kernels.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

/* The scalar kernels' 8 emulated lanes summed as AVX2's are. */
static inline float moe_kern_sc_hsum8(const float *a)
{
	float b0 = a[0] + a[4], b1 = a[1] + a[5], b2 = a[2] + a[6], b3 = a[3] + a[7];
	float c0 = b0 + b2, c1 = b1 + b3;

	return c0 + c1;
}

/* 8 lanes: halves, then pairs, then the last two. */
AVX2_TARGET static ALWAYS_INLINE float moe_kern_avx2_hsum(__m256 v)
{
	__m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	__m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));

	return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

/* 16 lanes: halves, then as AVX2. */
AVX512_TARGET static ALWAYS_INLINE float moe_kern_avx512_hsum(__m512 v)
{
	__m256 lo = _mm512_castps512_ps256(v);
	__m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));

	return moe_kern_avx2_hsum(_mm256_add_ps(lo, hi));
}

/* True if this CPU can run @isa's kernels. */
bool moe_kern_isa_usable(enum moe_kern_isa isa);

/*
 * One 64-byte block of 128 4-bit codes (int4 and MXFP4 alike) from the
 * store's order to the resident one: byte 4p + j gets values 32j + p and
 * 32j + 16 + p, i.e. store bytes 16j + p/2 and 16j + 8 + p/2, their low
 * nibbles for even p, else their high.
 */
static inline void moe_kern_nibble_block_pack(const uint8_t *s, uint8_t *d)
{
	for (unsigned p = 0; p < 16; p++) {
		unsigned sh = 4 * (p % 2);

		for (unsigned j = 0; j < 4; j++)
			d[4 * p + j] = (uint8_t)((s[16 * j + p / 2] >> sh & 15u) |
						 (s[16 * j + 8 + p / 2] >> sh & 15u) << 4);
	}
}

#endif
