/* SPDX-License-Identifier: MIT */
/*
 * MXFP4 (MOE_DTYPE_MXFP4) below the checkpoint: the e2m1 and E8M0 decodes
 * and the quantizer against the OCP spec's values, the matrix layout, and
 * the kernels of every instruction set this CPU runs: against float64,
 * bit for bit against an 8- or 16-lane emulation of the canonical order
 * (kernels.h), and tile invariant.  The spec's values are written out here,
 * not taken from engine code.
 */
#include "config.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dtype.h"
#include "engine/kernels.h"
#include "engine/model.h"
#include "testutil.h"

/* e2m1: 1 sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
 * subnormal (m * 0.5) */
static double e2m1_spec(unsigned code)
{
	unsigned e = (code >> 1) & 3u, m = code & 1u;
	double v = e == 0 ? 0.5 * m : ldexp(1.0 + 0.5 * m, (int)e - 1);

	return (code & 8u) ? -v : v;
}

/* the weight of value k of row r of a matrix of moe_matrix_bytes() */
static double mx_weight(const uint8_t *M, size_t N, size_t K, size_t r, size_t k)
{
	uint8_t byte = M[r * (K / 2) + k / 2];
	uint8_t s = M[moe_mxfp4_scales_offset(N, K) + r * (K / 32) + k / 32];

	return e2m1_spec(k % 2 ? byte >> 4 : byte & 15u) * ldexp(1.0, (int)s - 127);
}

START_TEST(e2m1_and_e8m0_decode_as_the_spec_says)
{
	for (unsigned c = 0; c < 16; c++) {
		ck_assert_msg(moe_e2m1_to_f32((uint8_t)c) == (float)e2m1_spec(c), "code %u", c);
		ck_assert_int_eq(signbit(moe_e2m1_to_f32((uint8_t)c)) != 0, c >= 8);
	}
	ck_assert(moe_e2m1_to_f32(7) == 6.0f && moe_e2m1_to_f32(9) == -0.5f);
	for (unsigned s = 0; s < 255; s++)
		ck_assert_msg(moe_e8m0_to_f32((uint8_t)s) == (float)ldexp(1.0, (int)s - 127), "scale %u", s);
	ck_assert(isnan(moe_e8m0_to_f32(255)));
	ck_assert_str_eq(moe_dtype_name(MOE_DTYPE_MXFP4), "mxfp4");
	ck_assert_int_eq(MOE_DTYPE_MXFP4, 4);
	ck_assert(moe_dtype_is_blocked(MOE_DTYPE_MXFP4));
}
END_TEST

/* The exponent is floor(log2(amax)) - 2; values round to the nearest
 * code, ties to the smaller magnitude; past 6 saturates. */
START_TEST(quantizer_picks_the_scale_and_nearest_codes)
{
	float w[32] = { 0 };
	uint8_t codes[16], s;

	s = moe_mxfp4_quantize_block(w, codes);
	ck_assert_uint_eq(s, 0);
	for (int i = 0; i < 16; i++)
		ck_assert_uint_eq(codes[i], 0);
	w[0] = 6.0f;           /* amax 6: floor(log2 6) = 2, e = 0, s = 127 */
	w[1] = -0.75f;         /* halfway 0.5 and 1: 0.5 (code 9) */
	w[2] = 2.4f;           /* nearest 2 (code 4) */
	w[3] = 2.6f;           /* nearest 3 (code 5) */
	w[4] = -0.2f;          /* nearest 0 */
	w[31] = 1.25f;         /* halfway 1 and 1.5: 1 (code 2) */
	s = moe_mxfp4_quantize_block(w, codes);
	ck_assert_uint_eq(s, 127);
	ck_assert_uint_eq(codes[0], 0x97);
	ck_assert_uint_eq(codes[1], 0x54);
	ck_assert_uint_eq(codes[2], 0x00);
	ck_assert_uint_eq(codes[15], 0x20);
	w[0] = 7.9f;           /* amax 7.9: still e = 0; 7.9 saturates to 6 */
	s = moe_mxfp4_quantize_block(w, codes);
	ck_assert_uint_eq(s, 127);
	ck_assert_uint_eq(codes[0] & 15u, 7);
	w[0] = 8.0f;           /* the next binade: e = 1, 8 / 2 = 4 (code 6) */
	s = moe_mxfp4_quantize_block(w, codes);
	ck_assert_uint_eq(s, 128);
	ck_assert_uint_eq(codes[0] & 15u, 6);
	w[0] = 1e-39f;         /* below 2^-127 * 4: clamped to s = 0 */
	memset(w + 1, 0, 31 * sizeof(float));
	s = moe_mxfp4_quantize_block(w, codes);
	ck_assert_uint_eq(s, 0);
}
END_TEST

START_TEST(matrix_layout_sizes)
{
	/* 4 x 64: 128 code bytes, 8 scale bytes padded to 64 */
	ck_assert_uint_eq(moe_mxfp4_scales_offset(4, 64), 128);
	ck_assert_uint_eq(moe_matrix_bytes(MOE_DTYPE_MXFP4, 4, 64), 192);
	/* gpt-oss-20b's gate: 2880 x 2880, 4.25 bits per weight up to padding */
	ck_assert_uint_eq(moe_matrix_bytes(MOE_DTYPE_MXFP4, 2880, 2880),
			  2880ull * 1440 + 2880ull * 90);
	ck_assert_uint_eq(moe_kern_packed_bytes(MOE_DTYPE_MXFP4, 7, 96),
			  moe_matrix_bytes(MOE_DTYPE_MXFP4, 7, 96));
}
END_TEST

/* The sum of the canonical order with W lanes, as kernels.h describes it:
 * lane l takes k = l, l + W, ... by fused multiply-add (the weight one
 * float32 product), and the lanes fold by halves down to 8, then the
 * fixed 8-lane tree. */
static float canonical(const uint8_t *M, size_t N, size_t K, size_t r, const float *x, int W)
{
	float acc[16] = { 0 }, b[4];

	for (size_t k = 0; k < K; k++) {
		float w = (float)mx_weight(M, N, K, r, k);   /* exact in float32 */

		acc[k % (size_t)W] = fmaf(w, x[k], acc[k % (size_t)W]);
	}
	if (W == 16)
		for (int l = 0; l < 8; l++)
			acc[l] = acc[l] + acc[l + 8];
	for (int l = 0; l < 4; l++)
		b[l] = acc[l] + acc[l + 4];
	return (b[0] + b[2]) + (b[1] + b[3]);
}

static uint8_t *random_matrix(size_t N, size_t K, uint64_t *seed, int extreme)
{
	size_t mb = moe_matrix_bytes(MOE_DTYPE_MXFP4, N, K), so = moe_mxfp4_scales_offset(N, K);
	uint8_t *M = calloc(1, mb);

	ck_assert(M);
	for (size_t i = 0; i < N * K / 2; i++)
		M[i] = (uint8_t)moe_test_rand(seed);
	for (size_t i = 0; i < N * K / 32; i++)   /* around 2^0, or the whole range but NaN */
		M[so + i] = extreme ? (uint8_t)(moe_test_rand(seed) % 255) :
			    (uint8_t)(120 + moe_test_rand(seed) % 12);
	return M;
}

/* Every ISA: float64 within 1e-6 of the magnitude, bit for bit the
 * canonical order of its width, and an element's bits the same alone as
 * in any tile; odd row counts (tiles of 4 and the rows left). */
START_TEST(kernels_match_float64_and_the_canonical_order)
{
	static const size_t Ks[] = { 32, 64, 96, 160, 2880 };
	const size_t N = 11, nt = 9;
	uint64_t seed = 17;

	for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++) {
		size_t K = Ks[ki];
		uint8_t *M = random_matrix(N, K, &seed, 0);
		uint8_t *P = malloc(moe_kern_packed_bytes(MOE_DTYPE_MXFP4, N, K));
		const uint8_t *S = P + moe_mxfp4_scales_offset(N, K);
		float *x = malloc(nt * K * sizeof(float)), *y = malloc(N * nt * sizeof(float));
		const float *xs[9];
		int ran = 0;

		ck_assert(x && y && P);
		moe_kern_pack(MOE_DTYPE_MXFP4, M, N, K, P);
		for (size_t i = 0; i < nt * K; i++)
			x[i] = (float)moe_test_randf(&seed);
		for (size_t t = 0; t < nt; t++)
			xs[t] = x + t * K;
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
			moe_kern_dot_rows_mxfp4_fn fn = moe_kern_get_mxfp4((enum moe_kern_isa)isa);
			const char *name = moe_kern_isa_name((enum moe_kern_isa)isa);
			int W = isa >= MOE_KERN_AVX512 ? 16 : 8;

			if (!fn)
				continue;
			ran++;
			fn(P, S, K, N, xs, nt, y, N);
			for (size_t t = 0; t < nt; t++)
				for (size_t r = 0; r < N; r++) {
					double ref = 0, mag = 0;
					float one, want = canonical(M, N, K, r, x + t * K, W);

					for (size_t k = 0; k < K; k++) {
						double p = mx_weight(M, N, K, r, k) * x[t * K + k];

						ref += p;
						mag += fabs(p);
					}
					ck_assert_msg(fabs(y[t * N + r] - ref) <= 1e-6 * mag + 1e-30,
						      "%s K=%zu row %zu token %zu: got %.9g want %.9g",
						      name, K, r, t, (double)y[t * N + r], ref);
					ck_assert_msg(memcmp(&want, &y[t * N + r], 4) == 0,
						      "%s K=%zu row %zu token %zu: %.9g, canonical order %.9g",
						      name, K, r, t, (double)y[t * N + r], (double)want);
					fn(P + r * (K / 2), S + r * (K / 32), K, 1, &xs[t], 1, &one, 1);
					ck_assert_msg(memcmp(&one, &y[t * N + r], 4) == 0,
						      "%s K=%zu row %zu token %zu: alone %.9g in tile %.9g",
						      name, K, r, t, (double)one, (double)y[t * N + r]);
				}
		}
		ck_assert_int_ge(ran, 1);
		free(M);
		free(P);
		free(x);
		free(y);
	}
}
END_TEST

/* The whole E8M0 range, subnormal products and overflow included: every
 * ISA gives the scalar kernel's bits where the width is the same (AVX2),
 * the 16-lane order's bits otherwise; NaN scale gives NaN. */
START_TEST(extreme_scales_and_nan)
{
	const size_t N = 5, K = 64;
	uint64_t seed = 3;
	uint8_t *M = random_matrix(N, K, &seed, 1);
	uint8_t *P = malloc(moe_kern_packed_bytes(MOE_DTYPE_MXFP4, N, K));
	uint8_t *S = P + moe_mxfp4_scales_offset(N, K);
	float x[64], y[5], ys[5], one;
	const float *xs[1] = { x };
	uint8_t keep;

	ck_assert(P);
	moe_kern_pack(MOE_DTYPE_MXFP4, M, N, K, P);
	for (size_t k = 0; k < K; k++)
		x[k] = (float)moe_test_randf(&seed);
	moe_kern_get_mxfp4(MOE_KERN_SCALAR)(P, S, K, N, xs, 1, ys, 1);
	for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
		moe_kern_dot_rows_mxfp4_fn fn = moe_kern_get_mxfp4((enum moe_kern_isa)isa);
		int W = isa >= MOE_KERN_AVX512 ? 16 : 8;

		if (!fn)
			continue;
		fn(P, S, K, N, xs, 1, y, 1);
		for (size_t r = 0; r < N; r++) {
			float want = canonical(M, N, K, r, x, W);

			ck_assert_msg(memcmp(&want, &y[r], 4) == 0 || (isnan(want) && isnan(y[r])),
				      "%s row %zu: %g want %g", moe_kern_isa_name((enum moe_kern_isa)isa), r,
				      (double)y[r], (double)want);
			if (W == 8)
				ck_assert(memcmp(&ys[r], &y[r], 4) == 0 || (isnan(ys[r]) && isnan(y[r])));
		}
		keep = S[1];
		S[1] = 255;             /* row 0's second block: NaN */
		fn(P, S, K, 1, xs, 1, &one, 1);
		ck_assert_msg(isnan(one), "%s: the NaN scale gives %g",
			      moe_kern_isa_name((enum moe_kern_isa)isa), (double)one);
		S[1] = keep;
	}
	free(M);
	free(P);
}
END_TEST

/* The resident layout (kernels.h): scales as stored; in a row's whole
 * blocks of 128 values byte 4p + j holds values 32j + p and 32j + 16 + p,
 * after them each group of 16 values has its even values' nibbles in
 * bytes 0..3 and its odd ones' in 4..7; packing in pieces, in any order,
 * gives the bytes of packing it whole; packed_at from any row gives the
 * rows' bits.  K = 160: a block and a tail of two groups. */
START_TEST(resident_layout_and_packed_at)
{
	const size_t N = 13, K = 160, nt = 3;
	size_t mb = moe_matrix_bytes(MOE_DTYPE_MXFP4, N, K);
	uint64_t seed = 11;
	uint8_t *M = random_matrix(N, K, &seed, 0), *P = malloc(mb), *Q = calloc(1, mb);
	float x[3 * 160], y[13 * 3], y2[13 * 3];
	const float *xs[3] = { x, x + K, x + 2 * K };
	uint64_t cut[] = { 0, 1, 63, 64, 500, 651, mb };

	ck_assert(P && Q);
	for (size_t i = 0; i < nt * K; i++)
		x[i] = (float)moe_test_randf(&seed);
	moe_kern_pack(MOE_DTYPE_MXFP4, M, N, K, P);
	ck_assert(memcmp(M + N * K / 2, P + N * K / 2, mb - N * K / 2) == 0);
	for (size_t r = 0; r < N; r++)
		for (size_t k = 0; k < K; k++) {
			size_t g = r * K / 2 + k / 16 * 8, m = k % 16 / 2;
			unsigned want = M[r * K / 2 + k / 2] >> (k % 2 * 4) & 15u;
			unsigned got = P[g + k % 2 * 4 + m / 2] >> (m % 2 * 4) & 15u;

			if (k < 128)      /* the block: p = k % 16, j = k / 32, high for k % 32 >= 16 */
				got = P[r * K / 2 + 4 * (k % 16) + k / 32] >> (k % 32 >= 16 ? 4 : 0) & 15u;
			ck_assert_msg(got == want, "row %zu value %zu: nibble %u, stored %u", r, k, got, want);
		}
	memset(Q, 0xa5, mb);     /* every byte is written */
	for (size_t p = sizeof(cut) / sizeof(cut[0]) - 1; p-- > 0;)
		moe_kern_pack_bytes(MOE_DTYPE_MXFP4, M + cut[p], N, K, cut[p], cut[p + 1] - cut[p], Q);
	ck_assert(memcmp(P, Q, mb) == 0);
	moe_kern_get_mxfp4(moe_kern_active())(P, P + moe_mxfp4_scales_offset(N, K), K, N, xs, nt, y, N);
	moe_kern_dot_rows_packed_at(MOE_DTYPE_MXFP4, P, N, K, 0, N, xs, nt, y2, N);
	ck_assert(memcmp(y, y2, sizeof(y)) == 0);
	moe_kern_dot_rows_packed_at(MOE_DTYPE_MXFP4, P, N, K, 5, N - 5, xs, nt, y2, N);
	for (size_t t = 0; t < nt; t++)
		ck_assert(memcmp(y + t * N + 5, y2 + t * N, (N - 5) * 4) == 0);
	free(M);
	free(P);
	free(Q);
}
END_TEST

static Suite *mxfp4_suite(void)
{
	Suite *s = suite_create("mxfp4");
	TCase *tc = tcase_create("mxfp4");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, e2m1_and_e8m0_decode_as_the_spec_says);
	tcase_add_test(tc, quantizer_picks_the_scale_and_nearest_codes);
	tcase_add_test(tc, matrix_layout_sizes);
	tcase_add_test(tc, kernels_match_float64_and_the_canonical_order);
	tcase_add_test(tc, extreme_scales_and_nan);
	tcase_add_test(tc, resident_layout_and_packed_at);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(mxfp4_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
