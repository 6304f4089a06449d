/* SPDX-License-Identifier: MIT */
/*
 * The float64 reference's decoders of the quantized checkpoint formats
 * (FP8 block-scaled, MXFP4, int4 GPTQ / AWQ / compressed-tensors), written
 * from each format's own definition and dequantization code, never from
 * the engine's (ARCHITECTURE.md 4.1a).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "ref.h"
#include "ref_load_impl.h"

/* float8 e4m3fn from its definition (OCP FP8, the "fn" variant): sign,
 * 4 exponent bits of bias 7, 3 mantissa bits; exponent 0 is subnormal
 * (m/8 * 2^-6); no infinities; exponent 15 with mantissa 7 is NaN. */
double ref_e4m3_to_double(uint8_t c)
{
	int e = (c >> 3) & 15, m = c & 7;
	double v;

	if (e == 15 && m == 7)
		return NAN;
	v = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);
	return c & 0x80 ? -v : v;
}

/*
 * An F8_E4M3 matrix [R][C] with its X_scale_inv [ceil(R/128)][ceil(C/128)]
 * (ARCHITECTURE.md 4.1a; DeepSeek-V3's weight_dequant): w[i][j] =
 * e4m3(code[i][j]) * scale[i/128][j/128], in double.
 */
int ref_ld_read_fp8(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem, double *dst)
{
	const struct moe_st_tensor *st;
	struct moe_err err = {0};
	uint64_t R, C, kb;
	unsigned char *codes;
	double *sc;
	int rc;

	if (t->ndim != 2 || t->shape[0] * t->shape[1] != nelem || t->nbytes != nelem)
		return ref_ld_fail(ld, -EINVAL, "%s: an FP8 matrix of %llu elements expected", t->name,
			    (unsigned long long)nelem);
	R = t->shape[0];
	C = t->shape[1];
	kb = (C + 127) / 128;
	st = ref_ld_find(ld, "%s_scale_inv", t->name);
	if (!st)
		return ref_ld_fail(ld, -ENOENT, "%s_scale_inv: not in the checkpoint", t->name);
	if (st->ndim != 2 || st->shape[0] != (R + 127) / 128 || st->shape[1] != kb)
		return ref_ld_fail(ld, -EINVAL, "%s: bad scale shape", st->name);
	codes = malloc(nelem ? nelem : 1);
	sc = malloc(sizeof(double) * st->shape[0] * kb);
	if (!codes || !sc) {
		free(codes);
		free(sc);
		return ref_ld_fail(ld, -ENOMEM, "out of memory");
	}
	rc = moe_st_read(ld->ck, t, 0, codes, nelem, &err);
	if (rc < 0)
		rc = ref_ld_fail(ld, rc, "%s", err.msg);
	else
		rc = ref_ld_read_elems(ld, st, st->shape[0] * kb, 0, st->shape[0] * kb, sc);
	if (rc == 0)
		for (uint64_t i = 0; i < R; i++)
			for (uint64_t j = 0; j < C; j++)
				dst[i * C + j] = ref_e4m3_to_double(codes[i * C + j]) * sc[i / 128 * kb + j / 128];
	free(codes);
	free(sc);
	return rc;
}

/*
 * MXFP4 from the OCP Microscaling spec and gpt-oss's release: @pfx_blocks
 * [E, N, K/32, 16] U8, two e2m1 values a byte, the low nibble first;
 * @pfx_scales [E, N, K/32] U8, E8M0 (2^(s - 127), 255 NaN), one per 32
 * values.  Decoded into *ret as [E][N][K] doubles, as transformers'
 * convert_moe_packed_tensors does before its transpose.
 */
static double ref_e2m1_to_double(unsigned c)
{
	unsigned e = (c >> 1) & 3u, m = c & 1u;
	double v = e ? ldexp(1.0 + m / 2.0, (int)e - 1) : m / 2.0;

	return c & 8u ? -v : v;
}

int ref_ld_read_mxfp4(struct loader *ld, const char *pfx, uint64_t E, uint64_t N, uint64_t K, double **ret)
{
	const struct moe_st_tensor *tb = ref_ld_find(ld, "%s_blocks", pfx), *ts = ref_ld_find(ld, "%s_scales", pfx);
	uint64_t nb = E * N * (K / 32);
	struct moe_err err = {0};
	unsigned char *codes, *sc;
	double *d;
	int rc;

	if (!tb || !ts)
		return ref_ld_fail(ld, -ENOENT, "%s_blocks or _scales: not in the checkpoint", pfx);
	if (K % 32 || tb->ndim != 4 || tb->shape[0] != E || tb->shape[1] != N || tb->shape[2] != K / 32 ||
	    tb->shape[3] != 16 || strcmp(tb->st_dtype, "U8") || ts->ndim != 3 || ts->shape[0] != E ||
	    ts->shape[1] != N || ts->shape[2] != K / 32 || strcmp(ts->st_dtype, "U8"))
		return ref_ld_fail(ld, -EINVAL, "%s_blocks/_scales: not [%llu, %llu, %llu/32, 16] and [.., .., ..] U8",
			    pfx, (unsigned long long)E, (unsigned long long)N, (unsigned long long)K);
	codes = malloc(nb * 16);
	sc = malloc(nb);
	d = malloc(sizeof(double) * nb * 32);
	if (!codes || !sc || !d) {
		rc = ref_ld_fail(ld, -ENOMEM, "out of memory");
		goto out;
	}
	rc = moe_st_read(ld->ck, tb, 0, codes, nb * 16, &err);
	if (rc == 0)
		rc = moe_st_read(ld->ck, ts, 0, sc, nb, &err);
	if (rc < 0) {
		rc = ref_ld_fail(ld, rc, "%s", err.msg);
		goto out;
	}
	for (uint64_t b = 0; b < nb; b++)
		for (unsigned i = 0; i < 32; i++) {
			unsigned c = i % 2 ? codes[b * 16 + i / 2] >> 4 : codes[b * 16 + i / 2] & 15u;

			d[b * 32 + i] = sc[b] == 255 ? NAN : ldexp(ref_e2m1_to_double(c), (int)sc[b] - 127);
		}
	*ret = d;
	d = NULL;
out:
	free(codes);
	free(sc);
	free(d);
	return rc;
}

/* Tensor @base.@suffix decoded to doubles (any float dtype, or int32),
 * NULL when absent. */
static double *aux(struct loader *ld, const char *base, const char *suffix, uint64_t n)
{
	const struct moe_st_tensor *t = ref_ld_find(ld, "%s.%s", base, suffix);
	double *d;

	if (!t || t->nbytes == 0)
		return NULL;
	d = malloc(sizeof(double) * n);
	if (!d)
		return NULL;
	if (!strcmp(t->st_dtype, "I32")) {
		int32_t *v = malloc(t->nbytes);
		struct moe_err err = {0};

		if (!v || t->nbytes != n * 4 || moe_st_read(ld->ck, t, 0, v, t->nbytes, &err) < 0) {
			free(v);
			free(d);
			return NULL;
		}
		for (uint64_t i = 0; i < n; i++)
			d[i] = (double)v[i];
		free(v);
		return d;
	}
	if (ref_ld_read_elems(ld, t, n, 0, n, d) < 0) {
		free(d);
		return NULL;
	}
	return d;
}

/* Nibble @i (bits 4i .. 4i+3) of the int32 @v held as a double. */
static unsigned nib(double v, unsigned i)
{
	return ((uint32_t)(int32_t)v >> (4 * i)) & 15u;
}

/*
 * An int4 matrix [N][K] from its packed int32 tensor @t, as each project
 * dequantizes it:
 *   GPTQ (auto_gptq's dequantize): qweight [K/8][N], k in nibble k % 8;
 *     qzeros [K/G][N/8], n in nibble n % 8, plus one for checkpoint_format
 *     "gptq"; scales [K/G][N]; input column k uses group g_idx[k].
 *   AWQ (awq/utils/packing_utils.py, reverse order [0, 4, 1, 5, 2, 6, 3,
 *     7]): qweight [K][N/8] and qzeros [K/G][N/8], column 8c + j in
 *     nibble order[j]; scales [K/G][N]; group k / G.
 *   compressed-tensors (unpack_from_int32, minus the offset 8):
 *     weight_packed [N][K/8], k in nibble k % 8; weight_scale [N][K/G];
 *     asymmetric, weight_zero_point [N/8][K/G] packed along N, n in
 *     nibble n % 8, also minus 8.
 */
int ref_ld_read_int4(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem, double *dst)
{
	static const unsigned awq_rev[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };
	const char *dot = strrchr(t->name, '.');
	char base[512];
	bool ct = dot && !strcmp(dot, ".weight_packed"), awq = !strcmp(ld->quant, "awq");
	uint64_t N, K, ng;
	double *q = NULL, *s = NULL, *z = NULL, *gi = NULL;
	int rc = 0;

	if (!dot || (!ct && strcmp(dot, ".qweight")) || t->ndim != 2)
		return ref_ld_fail(ld, -EINVAL, "%s: an I32 tensor that is no int4 weight", t->name);
	snprintf(base, sizeof(base), "%.*s", (int)(dot - t->name), t->name);
	if (ct) {
		N = t->shape[0];
		K = t->shape[1] * 8;
	} else if (awq) {
		K = t->shape[0];
		N = t->shape[1] * 8;
	} else {
		K = t->shape[0] * 8;
		N = t->shape[1];
	}
	if (N * K != nelem)
		return ref_ld_fail(ld, -EINVAL, "%s: %llu x %llu codes, %llu weights expected", t->name,
			    (unsigned long long)N, (unsigned long long)K, (unsigned long long)nelem);
	q = aux(ld, base, ct ? "weight_packed" : "qweight", N * K / 8);
	{
		const struct moe_st_tensor *st = ref_ld_find(ld, "%s.%s", base, ct ? "weight_scale" : "scales");

		if (!st || st->ndim != 2)
			return ref_ld_fail(ld, -ENOENT, "%s: no scales", t->name);
		ng = ct ? st->shape[1] : st->shape[0];
		s = aux(ld, base, ct ? "weight_scale" : "scales", N * ng);
	}
	if (!ct)
		z = aux(ld, base, "qzeros", ng * N / 8);
	else if (ld->ct_asym)
		z = aux(ld, base, "weight_zero_point", N / 8 * ng);
	if (!ct && !awq)
		gi = aux(ld, base, "g_idx", K);
	if (!q || !s || ((!ct || ld->ct_asym) && !z) || ng == 0 || K % ng) {
		rc = ref_ld_fail(ld, -EINVAL, "%s: int4 tensors missing or misshapen", t->name);
		goto out;
	}
	for (uint64_t n = 0; n < N; n++)
		for (uint64_t k = 0; k < K; k++) {
			uint64_t g = gi ? (uint64_t)gi[k] : k / (K / ng);
			double qv, zv, sv;

			if (g >= ng) {
				rc = ref_ld_fail(ld, -EINVAL, "%s: g_idx out of range", t->name);
				goto out;
			}
			if (ct) {
				/* the value and the zero point both stored plus 8 */
				qv = (double)nib(q[n * (K / 8) + k / 8], (unsigned)(k % 8)) - 8;
				zv = z ? (double)nib(z[(n / 8) * ng + g], (unsigned)(n % 8)) - 8 : 0;
				sv = s[n * ng + g];
			} else if (awq) {
				qv = nib(q[k * (N / 8) + n / 8], awq_rev[n % 8]);
				zv = nib(z[g * (N / 8) + n / 8], awq_rev[n % 8]);
				sv = s[g * N + n];
			} else {
				qv = nib(q[(k / 8) * N + n], (unsigned)(k % 8));
				zv = nib(z[g * (N / 8) + n / 8], (unsigned)(n % 8)) + (ld->gptq_v1 ? 1 : 0);
				sv = s[g * N + n];
			}
			dst[n * K + k] = (qv - zv) * sv;
		}
out:
	free(q);
	free(s);
	free(z);
	free(gi);
	return rc;
}
