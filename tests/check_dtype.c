/* SPDX-License-Identifier: MIT */
/*
 * dtype conversions: exact widening, round-to-nearest-even narrowing, and
 * the special values, checked against independent arithmetic.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dtype.h"

static uint32_t bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static float from_bits(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

START_TEST(bf16_widens_exactly_and_round_trips)
{
	for (uint32_t h = 0; h < 65536; h++) {
		float f = moe_bf16_to_f32((uint16_t)h);
		ck_assert_uint_eq(bits(f), h << 16);
		if (!isnan(f))
			ck_assert_uint_eq(moe_f32_to_bf16(f), h);
	}
}
END_TEST

START_TEST(bf16_rounds_to_nearest_even)
{
	/* 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: even is 1.0 */
	ck_assert_uint_eq(moe_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
	/* 1.0078125 + 2^-8 is halfway to 1.015625: even is 1.015625 (0x3f82) */
	ck_assert_uint_eq(moe_f32_to_bf16(1.0078125f + 0x1p-8f), 0x3f82);
	/* just above the midpoint rounds up */
	ck_assert_uint_eq(moe_f32_to_bf16(from_bits(0x3f808001)), 0x3f81);
	/* overflow to infinity, NaN stays NaN */
	ck_assert_uint_eq(moe_f32_to_bf16(from_bits(0x7f7fffff)), 0x7f80);
	ck_assert(isnan(moe_bf16_to_f32(moe_f32_to_bf16(NAN))));
}
END_TEST

START_TEST(f16_widens_to_the_value_it_encodes)
{
	for (uint32_t h = 0; h < 65536; h++) {
		uint32_t e = (h >> 10) & 31, m = h & 1023;
		double want;
		float f = moe_f16_to_f32((uint16_t)h);

		if (e == 31) {
			ck_assert(m ? isnan(f) : isinf(f));
			continue;
		}
		want = e ? ldexp(1024 + m, (int)e - 25) : ldexp(m, -24);
		if (h & 0x8000)
			want = -want;
		ck_assert_msg((double)f == want, "f16 %#x: got %g want %g", h, (double)f, want);
		ck_assert_uint_eq(moe_f32_to_f16(f), h);
	}
}
END_TEST

START_TEST(f16_rounds_to_nearest_even)
{
	/* 1 + 2^-11 is halfway between 1.0 and 1 + 2^-10: even is 1.0 */
	ck_assert_uint_eq(moe_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);
	ck_assert_uint_eq(moe_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
	/* 65520 rounds to infinity, 65519 to 65504 */
	ck_assert_uint_eq(moe_f32_to_f16(65520.0f), 0x7c00);
	ck_assert_uint_eq(moe_f32_to_f16(65519.0f), 0x7bff);
	/* subnormals: 2^-25 is halfway between 0 and 2^-24: even is 0 */
	ck_assert_uint_eq(moe_f32_to_f16(0x1p-25f), 0x0000);
	ck_assert_uint_eq(moe_f32_to_f16(0x1.8p-25f), 0x0001);
	ck_assert_uint_eq(moe_f32_to_f16(-0x1p-24f), 0x8001);
}
END_TEST

/* A band of 3 rows x 300 columns: an all-zero block gets scale 1 and zero
 * codes; a block's largest |w| becomes +-448 (0x7e), its scale amax / 448;
 * the partial last block has its own scale. */
START_TEST(fp8_band_scales_per_block_zero_block_scale_one)
{
	enum { N = 3, K = 300 };
	float w[N * K] = { 0 }, sc[3];
	uint8_t codes[N * K];

	w[1 * K + 130] = -3.5f;                 /* block 1's amax */
	w[2 * K + 200] = 1.75f;                 /* half of it: 224 */
	w[0 * K + 299] = 0.25f;                 /* block 2, alone */
	moe_fp8_quantize_band(w, N, K, codes, sc);
	ck_assert_float_eq(sc[0], 1.0f);
	ck_assert_float_eq(sc[1], 3.5f / 448.0f);
	ck_assert_float_eq(sc[2], 0.25f / 448.0f);
	for (int i = 0; i < N * K; i++)
		if (i % K < 128)
			ck_assert_msg(codes[i] == 0, "code %d of the zero block is %#x", i, codes[i]);
	ck_assert_uint_eq(codes[1 * K + 130], 0xfe);
	ck_assert_uint_eq(codes[0 * K + 299], 0x7e);
	ck_assert_float_eq(moe_e4m3_to_f32(codes[2 * K + 200]), 224.0f);
	moe_fp8_band_scales(w, N, K, sc);
	ck_assert_float_eq(sc[1], 3.5f / 448.0f);
}
END_TEST

START_TEST(dtype_names_parse)
{
	enum moe_dtype t;

	ck_assert_int_eq(moe_dtype_parse("bfloat16", &t), 0);
	ck_assert_int_eq(t, MOE_DTYPE_BF16);
	ck_assert_int_eq(moe_dtype_parse("F16", &t), 0);
	ck_assert_int_eq(t, MOE_DTYPE_F16);
	ck_assert_int_eq(moe_dtype_parse("f32", &t), 0);
	ck_assert_int_eq(t, MOE_DTYPE_F32);
	ck_assert_int_eq(moe_dtype_parse("F8_E4M3", &t), -EINVAL);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("dtype");
	TCase *tc = tcase_create("conversions");
	SRunner *sr;
	int failed;

	tcase_add_test(tc, bf16_widens_exactly_and_round_trips);
	tcase_add_test(tc, bf16_rounds_to_nearest_even);
	tcase_add_test(tc, f16_widens_to_the_value_it_encodes);
	tcase_add_test(tc, f16_rounds_to_nearest_even);
	tcase_add_test(tc, dtype_names_parse);
	tcase_add_test(tc, fp8_band_scales_per_block_zero_block_scale_one);
	suite_add_tcase(s, tc);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
