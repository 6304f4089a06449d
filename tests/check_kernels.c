/* SPDX-License-Identifier: MIT */
/*
 * The dot-product kernels of every instruction set this CPU runs: accuracy
 * against a float64 sum, and the property batch invariance rests on: an
 * element's bits do not depend on the tile (rows, tokens) that computed it.
 */
#include "config.h"

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/dtype.h"
#include "engine/kernels.h"
#include "testutil.h"

/* GCC 12 sees a negative size in the unrolled K loop that cannot happen */
#pragma GCC diagnostic ignored "-Walloc-size-larger-than="

/* random weights of dtype dt: nr rows of K, row stride ldw */
static void *make_weights(enum moe_dtype dt, size_t nr, size_t ldw, uint64_t *seed)
{
	size_t n = nr * ldw;
	float *f = malloc(n * sizeof(float));
	void *w = malloc(n * moe_dtype_size(dt));

	for (size_t i = 0; i < n; i++)
		f[i] = (float)moe_test_randf(seed);
	moe_dtype_from_f32(dt, f, w, n);
	free(f);
	return w;
}

static double weight_at(enum moe_dtype dt, const void *w, size_t i)
{
	float f;

	moe_dtype_to_f32(dt, (const char *)w + i * moe_dtype_size(dt), &f, 1);
	return f;
}

static void check_isa_dtype(enum moe_kern_isa isa, enum moe_dtype dt)
{
	moe_kern_dot_rows_fn fn = moe_kern_get(isa);
	static const size_t Ks[] = { 1, 7, 8, 15, 16, 17, 33, 64, 100, 257 };
	uint64_t seed = 42 + (uint64_t)isa * 7 + (uint64_t)dt;

	if (!fn)
		return;
	for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++) {
		size_t K = Ks[ki], ldw = K + 3, nr = 11, nt = 13;
		void *W = make_weights(dt, nr, ldw, &seed);
		float *x = malloc(nt * K * sizeof(float));
		const float *xs[13];
		float *y = malloc(nr * nt * sizeof(float));

		for (size_t i = 0; i < nt * K; i++)
			x[i] = (float)moe_test_randf(&seed);
		for (size_t t = 0; t < nt; t++)
			xs[t] = x + t * K;
		fn(dt, W, ldw, K, nr, xs, nt, y, nr);
		for (size_t t = 0; t < nt; t++)
			for (size_t r = 0; r < nr; r++) {
				double ref = 0, mag = 0;
				for (size_t k = 0; k < K; k++) {
					double p = weight_at(dt, W, r * ldw + k) * x[t * K + k];
					ref += p;
					mag += fabs(p);
				}
				ck_assert_msg(fabs(y[t * nr + r] - ref) <= 1e-6 * mag + 1e-30,
					      "%s %s K=%zu row %zu token %zu: got %.9g want %.9g",
					      moe_kern_isa_name(isa), moe_dtype_name(dt), K, r, t,
					      (double)y[t * nr + r], ref);
				/* the same element alone: identical bits */
				float one;
				fn(dt, (const char *)W + r * ldw * moe_dtype_size(dt), ldw, K, 1, &xs[t], 1,
				   &one, 1);
				ck_assert_msg(memcmp(&one, &y[t * nr + r], sizeof(one)) == 0,
					      "%s %s K=%zu row %zu token %zu: alone %.9g in tile %.9g",
					      moe_kern_isa_name(isa), moe_dtype_name(dt), K, r, t,
					      (double)one, (double)y[t * nr + r]);
			}
		free(W);
		free(x);
		free(y);
	}
}

START_TEST(every_isa_matches_float64_and_is_tile_invariant)
{
	for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++)
		for (int dt = 0; dt < MOE_DTYPE_COUNT; dt++)
			/* FP8, INT4: their own tests; a number between dtypes is none */
			if (!moe_dtype_is_blocked((enum moe_dtype)dt) && moe_dtype_size((enum moe_dtype)dt))
				check_isa_dtype((enum moe_kern_isa)isa, (enum moe_dtype)dt);
}
END_TEST

START_TEST(scalar_is_always_available)
{
	ck_assert_ptr_nonnull(moe_kern_get(MOE_KERN_SCALAR));
	ck_assert_ptr_nonnull(moe_kern_get(moe_kern_active()));
}
END_TEST

START_TEST(token_order_in_batch_does_not_change_bits)
{
	moe_kern_dot_rows_fn fn = moe_kern_get(moe_kern_active());
	uint64_t seed = 9;
	size_t K = 200, nr = 9, nt = 50;
	void *W = make_weights(MOE_DTYPE_BF16, nr, K, &seed);
	float *x = malloc(nt * K * sizeof(float));
	const float *xs[50], *rev[50];
	float *y1 = malloc(nr * nt * sizeof(float)), *y2 = malloc(nr * nt * sizeof(float));

	for (size_t i = 0; i < nt * K; i++)
		x[i] = (float)moe_test_randf(&seed);
	for (size_t t = 0; t < nt; t++) {
		xs[t] = x + t * K;
		rev[nt - 1 - t] = x + t * K;
	}
	fn(MOE_DTYPE_BF16, W, K, K, nr, xs, nt, y1, nr);
	fn(MOE_DTYPE_BF16, W, K, K, nr, rev, nt, y2, nr);
	for (size_t t = 0; t < nt; t++)
		ck_assert_msg(memcmp(y1 + t * nr, y2 + (nt - 1 - t) * nr, nr * sizeof(float)) == 0,
			      "token %zu changed bits when the batch was reversed", t);
	free(W);
	free(x);
	free(y1);
	free(y2);
}
END_TEST

/* The packed layout gives the plain kernel's bits, for every instruction
 * set, dtype, K tail and row count (groups and leftover rows). */
START_TEST(packed_layout_gives_the_same_bits_as_row_major)
{
	static const size_t Ks[] = { 5, 16, 23, 64, 129 };
	static const size_t Ns[] = { 1, 3, 4, 9, 16, 18 };
	uint64_t seed = 77;

	for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
		moe_kern_dot_rows_fn plain = moe_kern_get((enum moe_kern_isa)isa);
		moe_kern_dot_rows_fn packed = moe_kern_get_packed((enum moe_kern_isa)isa);

		if (!plain)
			continue;
		ck_assert_ptr_nonnull(packed);
		for (int dt = 0; dt < MOE_DTYPE_COUNT; dt++)
			for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]) &&
					    !moe_dtype_is_blocked((enum moe_dtype)dt) &&
					    moe_dtype_size((enum moe_dtype)dt); ki++)
				for (size_t ni = 0; ni < sizeof(Ns) / sizeof(Ns[0]); ni++) {
					size_t K = Ks[ki], N = Ns[ni], nt = 7, ld = moe_kern_packed_ld(K);
					void *W = make_weights((enum moe_dtype)dt, N, K, &seed);
					void *P = malloc(N * ld * moe_dtype_size((enum moe_dtype)dt));
					float *x = malloc(nt * K * sizeof(float));
					float y1[18 * 7], y2[18 * 7];
					const float *xs[7];

					for (size_t i = 0; i < nt * K; i++)
						x[i] = (float)moe_test_randf(&seed);
					for (size_t t = 0; t < nt; t++)
						xs[t] = x + t * K;
					moe_kern_pack((enum moe_dtype)dt, W, N, K, P);
					plain((enum moe_dtype)dt, W, K, K, N, xs, nt, y1, N);
					packed((enum moe_dtype)dt, P, ld, K, N, xs, nt, y2, N);
					ck_assert_msg(memcmp(y1, y2, N * nt * sizeof(float)) == 0,
						      "%s %s K=%zu N=%zu: packed differs from row-major",
						      moe_kern_isa_name((enum moe_kern_isa)isa),
						      moe_dtype_name((enum moe_dtype)dt), K, N);
					/* a group-aligned slice of the rows, as tasks use them */
					if (N > 4) {
						packed((enum moe_dtype)dt,
						       (char *)P + 4 * ld * moe_dtype_size((enum moe_dtype)dt),
						       ld, K, N - 4, xs, nt, y2, N);
						for (size_t t = 0; t < nt; t++)
							ck_assert_msg(memcmp(y1 + t * N + 4, y2 + t * N,
									     (N - 4) * sizeof(float)) == 0,
								      "%s K=%zu N=%zu: slice from row 4 differs",
								      moe_kern_isa_name((enum moe_kern_isa)isa), K, N);
					}
					free(W);
					free(P);
					free(x);
				}
	}
}
END_TEST


/* Packing a matrix piece by piece, in pieces cut anywhere between elements
 * and handed over in any order, gives the bytes of packing it whole (the
 * pager converts experts chunk by chunk as they arrive). */
START_TEST(packing_in_pieces_gives_the_same_bytes)
{
	static const size_t Ks[] = { 16, 72, 200, 513 }, Ns[] = { 1, 4, 7, 33 };
	static const enum moe_dtype dts[] = { MOE_DTYPE_BF16, MOE_DTYPE_F16, MOE_DTYPE_F32 };
	uint64_t seed = 31;

	for (size_t di = 0; di < 3; di++)
		for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++)
			for (size_t ni = 0; ni < sizeof(Ns) / sizeof(Ns[0]); ni++) {
				size_t K = Ks[ki], N = Ns[ni], es = moe_dtype_size(dts[di]);
				size_t total = N * K, bytes = N * moe_kern_packed_ld(K) * es;
				unsigned char *W = malloc(total * es), *whole = malloc(bytes),
					      *pieces = malloc(bytes);
				size_t cuts[12], nc = 0;

				ck_assert(W && whole && pieces);
				for (size_t i = 0; i < total * es; i++)
					W[i] = (unsigned char)moe_test_rand(&seed);
				moe_kern_pack(dts[di], W, N, K, whole);
				memset(pieces, 0xee, bytes);   /* padding must be written, not assumed */
				cuts[nc++] = 0;
				for (int c = 0; c < 9; c++)
					cuts[nc++] = moe_test_rand(&seed) % (total + 1);
				cuts[nc++] = total;
				for (size_t a = 0; a < nc; a++)       /* sort */
					for (size_t b = a + 1; b < nc; b++)
						if (cuts[b] < cuts[a]) {
							size_t t = cuts[a];
							cuts[a] = cuts[b];
							cuts[b] = t;
						}
				for (size_t p = nc - 1; p-- > 0;)     /* last piece first */
					if (cuts[p + 1] > cuts[p])
						moe_kern_pack_range(dts[di], W + cuts[p] * es, N, K, cuts[p],
								    cuts[p + 1] - cuts[p], pieces);
				ck_assert_msg(memcmp(whole, pieces, bytes) == 0,
					      "dtype %d, %zu x %zu: pieces differ from the whole", (int)dts[di], N, K);
				free(W);
				free(whole);
				free(pieces);
			}
}
END_TEST

/* e4m3fn by its definition (1 sign, 4 exponent bits of bias 7, 3 mantissa
 * bits, subnormal at exponent 0, S.1111.111 NaN), in double, independently
 * of dtype.c. */
static double e4m3_spec(unsigned code)
{
	unsigned e = (code >> 3) & 15, m = code & 7;
	double v;

	if (e == 15 && m == 7)
		return NAN;
	v = e == 0 ? (m / 8.0) * pow(2, -6) : (1 + m / 8.0) * pow(2, (int)e - 7);
	return code & 0x80 ? -v : v;
}

START_TEST(e4m3_decodes_all_256_codes_in_every_isa)
{
	float ones[16], y;
	const float *xs[1] = { ones };
	float scale = 1.0f;

	for (int i = 0; i < 16; i++)
		ones[i] = 1.0f;
	/* a few values written out, in case the formula above is wrong too */
	ck_assert(e4m3_spec(0x7e) == 448.0 && e4m3_spec(0x38) == 1.0 && e4m3_spec(0x01) == 0x1p-9 &&
		  e4m3_spec(0x08) == 0x1p-6 && e4m3_spec(0xbf) == -1.875 && e4m3_spec(0x07) == 7 * 0x1p-9);
	for (unsigned c = 0; c < 256; c++) {
		double want = e4m3_spec(c);
		float got = moe_e4m3_to_f32((uint8_t)c);

		if (isnan(want)) {
			ck_assert_msg(isnan(got), "code 0x%02x: got %g, want NaN", c, (double)got);
			continue;
		}
		ck_assert_msg((double)got == want && !!signbit(got) == !!signbit(want),
			      "code 0x%02x: got %.9g want %.9g", c, (double)got, want);
		ck_assert_msg(moe_f32_to_e4m3(got) == c, "code 0x%02x does not round-trip (0x%02x)", c,
			      moe_f32_to_e4m3(got));
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++)
			for (int packed = 0; packed < 2; packed++) {
				moe_kern_dot_rows_fp8_fn fn = moe_kern_get_fp8((enum moe_kern_isa)isa, packed);
				uint8_t w[16] = { (uint8_t)c };

				if (!fn)
					continue;
				fn(w, 16, 1, 1, &scale, 0, xs, 1, &y, 1);
				ck_assert_msg((double)y == want || (want == 0 && y == 0),
					      "%s: code 0x%02x gives %.9g, want %.9g",
					      moe_kern_isa_name((enum moe_kern_isa)isa), c, (double)y, want);
			}
	}
	/* all 256 codes in one packed group of 4 rows x 64 (the block decode
	 * of avx512vbmi): x one-hot picks each weight out (NaN times 0 is NaN,
	 * so the two NaN codes are zeros here and tested alone after) */
	{
		uint8_t M[4 * 64 + 64] = { 0 }, *P = malloc(moe_kern_packed_bytes(MOE_DTYPE_FP8_E4M3_B128, 4, 64));
		float one_hot[64], *sc = (float *)(void *)(M + moe_matrix_scales_offset(4, 64)), y4[4];
		const float *xo[1] = { one_hot };

		ck_assert_uint_eq(moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, 4, 64), sizeof(M));
		for (unsigned c = 0; c < 256; c++)
			M[c] = (c & 0x7f) == 0x7f ? 0 : (uint8_t)c;
		sc[0] = 1.0f;
		moe_kern_pack(MOE_DTYPE_FP8_E4M3_B128, M, 4, 64, P);
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
			moe_kern_dot_rows_fp8_fn fn = moe_kern_get_fp8((enum moe_kern_isa)isa, true);

			for (size_t k = 0; fn && k < 64; k++) {
				memset(one_hot, 0, sizeof(one_hot));
				one_hot[k] = 1.0f;
				fn(P, 64, 64, 4, (const float *)(const void *)((const char *)P + 4 * 64), 0, xo, 1,
				   y4, 1);
				for (unsigned r = 0; r < 4; r++) {
					double want = e4m3_spec(M[r * 64 + k]);

					ck_assert_msg((double)y4[r] == want,
						      "%s packed group: code 0x%02zx gives %.9g, want %.9g",
						      moe_kern_isa_name((enum moe_kern_isa)isa), r * 64 + k,
						      (double)y4[r], want);
				}
			}
		}
		memset(M, 0, 256);
		M[64 + 17] = 0xff;
		moe_kern_pack(MOE_DTYPE_FP8_E4M3_B128, M, 4, 64, P);
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
			moe_kern_dot_rows_fp8_fn fn = moe_kern_get_fp8((enum moe_kern_isa)isa, true);

			if (!fn)
				continue;
			fn(P, 64, 64, 4, (const float *)(const void *)((const char *)P + 4 * 64), 0, xo, 1, y4, 1);
			ck_assert_msg(y4[0] == 0 && isnan(y4[1]) && y4[2] == 0 && y4[3] == 0,
				      "%s packed group: the NaN code gives %g %g %g %g",
				      moe_kern_isa_name((enum moe_kern_isa)isa), (double)y4[0], (double)y4[1],
				      (double)y4[2], (double)y4[3]);
		}
		free(P);
	}
	for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
		moe_kern_dot_rows_fp8_fn fn = moe_kern_get_fp8((enum moe_kern_isa)isa, false);
		uint8_t w[16] = { 0x7f };

		if (fn) {
			fn(w, 16, 1, 1, &scale, 0, xs, 1, &y, 1);
			ck_assert_msg(isnan(y), "%s: the NaN code gives %g",
				      moe_kern_isa_name((enum moe_kern_isa)isa), (double)y);
		}
	}
}
END_TEST

START_TEST(e4m3_encoding_rounds_to_nearest_even_and_saturates)
{
	ck_assert_uint_eq(moe_f32_to_e4m3(1.0625f), 0x38);     /* halfway 1 and 1.125: even */
	ck_assert_uint_eq(moe_f32_to_e4m3(1.1875f), 0x3a);     /* halfway 1.125 and 1.25 */
	ck_assert_uint_eq(moe_f32_to_e4m3(1.07f), 0x39);
	ck_assert_uint_eq(moe_f32_to_e4m3(0x1p-10f), 0x00);    /* half the smallest: even, 0 */
	ck_assert_uint_eq(moe_f32_to_e4m3(0x1.8p-9f), 0x02);   /* 1.5 ulp: up to even */
	ck_assert_uint_eq(moe_f32_to_e4m3(0x1.ep-7f), 0x08);   /* rounds up into the normals */
	ck_assert_uint_eq(moe_f32_to_e4m3(1e9f), 0x7e);
	ck_assert_uint_eq(moe_f32_to_e4m3(-1e9f), 0xfe);
	ck_assert_uint_eq(moe_f32_to_e4m3(NAN), 0x7f);
}
END_TEST

/* FP8 rows: float64 over the dequantized weights, with the partial blocks
 * of K and of the rows, for every instruction set, plain and packed; an
 * element's bits do not depend on its tile or on the layout. */
START_TEST(fp8_kernels_match_float64_and_are_tile_invariant)
{
	static const size_t Ks[] = { 1, 7, 8, 15, 16, 17, 100, 128, 129, 200, 257 };
	const size_t N = 136, nt = 9;   /* rows cross a block edge at 128 */
	uint64_t seed = 5;

	for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++) {
		size_t K = Ks[ki], kb = (K + 127) / 128, nb = (N + 127) / 128;
		size_t mb = moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
		size_t so = moe_matrix_scales_offset(N, K);
		uint8_t *M = calloc(1, mb);
		void *P = malloc(moe_kern_packed_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K));
		float *sc = (float *)(void *)(M + so), *x = malloc(nt * K * sizeof(float));
		float *y = malloc(N * nt * sizeof(float)), *y2 = malloc(N * nt * sizeof(float));
		const float *xs[9];

		ck_assert(M && P && x && y && y2);
		for (size_t i = 0; i < N * K; i++) {
			M[i] = (uint8_t)moe_test_rand(&seed);
			if ((M[i] & 0x7f) == 0x7f)
				M[i] = 0x3c;     /* no NaN here */
		}
		for (size_t i = 0; i < nb * kb; i++)
			sc[i] = (float)(0.001 + fabs(moe_test_randf(&seed)));
		for (size_t i = 0; i < nt * K; i++)
			x[i] = (float)moe_test_randf(&seed);
		for (size_t t = 0; t < nt; t++)
			xs[t] = x + t * K;
		moe_kern_pack(MOE_DTYPE_FP8_E4M3_B128, M, N, K, P);
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
			moe_kern_dot_rows_fp8_fn plain = moe_kern_get_fp8((enum moe_kern_isa)isa, false);
			moe_kern_dot_rows_fp8_fn packed = moe_kern_get_fp8((enum moe_kern_isa)isa, true);
			const char *name = moe_kern_isa_name((enum moe_kern_isa)isa);

			if (!plain)
				continue;
			plain(M, K, K, N, sc, 0, xs, nt, y, N);
			for (size_t t = 0; t < nt; t++)
				for (size_t r = 0; r < N; r++) {
					double ref = 0, mag = 0;
					float one;

					for (size_t k = 0; k < K; k++) {
						double p = e4m3_spec(M[r * K + k]) * sc[r / 128 * kb + k / 128] *
							   x[t * K + k];
						ref += p;
						mag += fabs(p);
					}
					ck_assert_msg(fabs(y[t * N + r] - ref) <= 1e-6 * mag + 1e-30,
						      "%s K=%zu row %zu token %zu: got %.9g want %.9g",
						      name, K, r, t, (double)y[t * N + r], ref);
					plain(M + r * K, K, K, 1, sc, r, &xs[t], 1, &one, 1);
					ck_assert_msg(memcmp(&one, &y[t * N + r], 4) == 0,
						      "%s K=%zu row %zu token %zu: alone %.9g in tile %.9g",
						      name, K, r, t, (double)one, (double)y[t * N + r]);
				}
			/* plain from row 2: a tile of rows 126..129 would straddle
			 * the two blocks of scales */
			plain(M + 2 * K, K, K, N - 2, sc, 2, xs, nt, y2, N);
			for (size_t t = 0; t < nt; t++)
				ck_assert_msg(memcmp(y + t * N + 2, y2 + t * N, (N - 2) * 4) == 0,
					      "%s K=%zu: rows from 2 differ", name, K);
			moe_kern_dot_rows_packed_at(MOE_DTYPE_FP8_E4M3_B128, P, N, K, 0, N, xs, nt, y2, N);
			if (isa == (int)moe_kern_active())
				ck_assert_msg(memcmp(y, y2, N * nt * 4) == 0, "%s K=%zu: packed differs", name, K);
			packed(P, moe_kern_packed_ld(K), K, N, (const float *)(const void *)
			       ((const char *)P + moe_kern_packed_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K) -
				((nb * kb * 4 + 63) / 64 * 64)), 0, xs, nt, y2, N);
			ck_assert_msg(memcmp(y, y2, N * nt * 4) == 0, "%s K=%zu: packed differs", name, K);
			/* rows 124.. (a group start) to the end: the second row block's scales */
			moe_kern_dot_rows_packed_at(MOE_DTYPE_FP8_E4M3_B128, P, N, K, 124, N - 124, xs, nt,
						    y2, N);
			if (isa == (int)moe_kern_active())
				for (size_t t = 0; t < nt; t++)
					ck_assert_msg(memcmp(y + t * N + 124, y2 + t * N, (N - 124) * 4) == 0,
						      "%s K=%zu: rows from 124 differ", name, K);
		}
		free(M);
		free(P);
		free(x);
		free(y);
		free(y2);
	}
}
END_TEST

/* An FP8 matrix packed in pieces cut at any byte (a float32 scale may be
 * split) gives the bytes of packing it whole. */
START_TEST(fp8_packing_in_pieces_gives_the_same_bytes)
{
	static const size_t Ks[] = { 16, 72, 200 }, Ns[] = { 4, 7, 130 };
	uint64_t seed = 3;

	for (size_t ki = 0; ki < 3; ki++)
		for (size_t ni = 0; ni < 3; ni++) {
			size_t K = Ks[ki], N = Ns[ni];
			size_t mb = moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
			size_t pb = moe_kern_packed_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
			unsigned char *M = calloc(1, mb), *whole = malloc(pb), *pieces = malloc(pb);
			size_t so = moe_matrix_scales_offset(N, K), sb = (N + 127) / 128 * ((K + 127) / 128) * 4;
			size_t cut[4] = { 0, 0, 0, mb };

			ck_assert(M && whole && pieces);
			for (size_t i = 0; i < N * K; i++)
				M[i] = (unsigned char)moe_test_rand(&seed);
			for (size_t i = 0; i < sb; i++)
				M[so + i] = (unsigned char)moe_test_rand(&seed);
			moe_kern_pack(MOE_DTYPE_FP8_E4M3_B128, M, N, K, whole);
			memcpy(pieces, whole, pb);
			memset(pieces, 0xee, N * moe_kern_packed_ld(K));   /* the codes' padding too */
			memset(pieces + pb - ((sb + 63) / 64 * 64), 0xee, sb);
			cut[1] = 1 + moe_test_rand(&seed) % (mb - 2);
			cut[2] = so + 2 < mb ? so + 2 : cut[1];     /* inside the first scale */
			if (cut[2] < cut[1]) {
				size_t t = cut[1];
				cut[1] = cut[2];
				cut[2] = t;
			}
			for (int p = 2; p >= 0; p--)
				if (cut[p + 1] > cut[p])
					moe_kern_pack_bytes(MOE_DTYPE_FP8_E4M3_B128, M + cut[p], N, K, cut[p],
							    cut[p + 1] - cut[p], pieces);
			ck_assert_msg(memcmp(whole, pieces, pb) == 0, "%zu x %zu: pieces differ", N, K);
			free(M);
			free(whole);
			free(pieces);
		}
}
END_TEST

static Suite *kernels_suite(void)
{
	Suite *s = suite_create("kernels");
	TCase *tc = tcase_create("dot_rows");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, scalar_is_always_available);
	tcase_add_test(tc, every_isa_matches_float64_and_is_tile_invariant);
	tcase_add_test(tc, token_order_in_batch_does_not_change_bits);
	tcase_add_test(tc, packed_layout_gives_the_same_bits_as_row_major);
	tcase_add_test(tc, packing_in_pieces_gives_the_same_bytes);
	tcase_add_test(tc, e4m3_decodes_all_256_codes_in_every_isa);
	tcase_add_test(tc, e4m3_encoding_rounds_to_nearest_even_and_saturates);
	tcase_add_test(tc, fp8_kernels_match_float64_and_are_tile_invariant);
	tcase_add_test(tc, fp8_packing_in_pieces_gives_the_same_bytes);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(kernels_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
