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
			for (size_t ki = 0; ki < sizeof(Ks) / sizeof(Ks[0]); ki++)
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
