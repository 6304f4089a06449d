/* SPDX-License-Identifier: MIT */
/*
 * gen-model's int4 checkpoints (--quant gptq | awq | ct-int4): each MLP and
 * expert weight quantized by round to nearest per group from the float32
 * values it has in an f32 checkpoint, and written in the tensors, packing
 * and dtypes of the release format (hfq4.c reads them back):
 *   gptq     X.qweight I32 [K/8][N], X.qzeros I32 [K/G][N/8] (zero point
 *            less one: checkpoint_format "gptq"), X.scales F16 [K/G][N],
 *            X.g_idx I32 [K].  Asymmetric: over [min(w, 0), max(w, 0)],
 *            scale = range / 15, zero = round(-min / scale) kept in
 *            [1, 15] (so that the stored zero - 1 stays a nibble);
 *            symmetric: scale = 2 max |w| / 15, zero 8.  With desc_act the
 *            columns are dealt to the groups in a shuffled order (g_idx).
 *   awq      X.qweight I32 [K][N/8], X.qzeros I32 [K/G][N/8], both in
 *            AWQ's order [0, 2, 4, 6, 1, 3, 5, 7]; X.scales F16 [K/G][N];
 *            scale = (max - min) / 15, zero = clamp(-round(min / scale),
 *            0, 15) as AutoAWQ's pseudo_quantize_tensor.
 *   ct-int4  X.weight_packed I32 [N][K/8] (value + 8, low nibble first),
 *            X.weight_scale BF16 [N][K/G] = max |w| / 7, X.weight_shape I64
 *            [2]; symmetric, as Kimi-K2-Thinking.
 * q = clamp(round(w / s) + zero, 0, 15) with s the scale as stored.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "genmodel_impl.h"
#include "hfq4.h"

void gen_q4_free(struct gen_q4 *q)
{
	free(q->wname);
	free(q->q);
	free(q->z);
	free(q->s);
	free(q->g_idx);
	memset(q, 0, sizeof(*q));
}

/* A deterministic shuffle of 0 .. K-1 from @key (splitmix64 steps). */
static void shuffle(uint32_t *p, uint64_t K, uint64_t key)
{
	uint64_t x = key;

	for (uint64_t k = 0; k < K; k++)
		p[k] = (uint32_t)k;
	for (uint64_t k = K - 1; k > 0; k--) {
		uint64_t z = (x += 0x9e3779b97f4a7c15ull);
		uint64_t j;
		uint32_t t;

		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		z ^= z >> 31;
		j = z % (k + 1);
		t = p[k];
		p[k] = p[j];
		p[j] = t;
	}
}

static int quantize(const struct gen_dims *d, const struct gen_tensor *t, uint64_t key,
		    struct gen_q4 *q)
{
	uint64_t N = t->qrows, K = t->qcols, G = d->q4_group ? d->q4_group : K, ng = K / G;
	struct gen_tensor f = *t;
	float *w = malloc(N * K * sizeof(float));
	uint32_t *perm = malloc(K * sizeof(uint32_t));
	bool ct = d->q4 == MOE_Q4F_CT, awq = d->q4 == MOE_Q4F_AWQ;

	gen_q4_free(q);
	q->wname = strdup(t->wname);
	q->q = malloc(N * K);
	q->z = malloc(N * ng);
	q->s = malloc(N * ng * 2);
	q->g_idx = malloc(K * sizeof(int32_t));
	if (!w || !perm || !q->wname || !q->q || !q->z || !q->s || !q->g_idx) {
		free(w);
		free(perm);
		gen_q4_free(q);
		return -ENOMEM;
	}
	q->N = N;
	q->K = K;
	q->G = G;
	f.dtype = MOE_DTYPE_F32;
	f.fill = FILL_RANDOM;
	f.ndim = 2;
	f.shape[0] = N;
	f.shape[1] = K;
	gen_values(&f, key, 0, (size_t)(N * K), w);
	if (d->q4 == MOE_Q4F_GPTQ && d->q4_desc_act)
		shuffle(perm, K, key ^ 0x5bd1e995u);
	else
		for (uint64_t k = 0; k < K; k++)
			perm[k] = (uint32_t)k;
	for (uint64_t i = 0; i < K; i++)
		q->g_idx[perm[i]] = (int32_t)(i / G);
	for (uint64_t n = 0; n < N; n++)
		for (uint64_t g = 0; g < ng; g++) {
			const float *row = w + n * K;
			float lo = awq ? INFINITY : 0.0f, hi = awq ? -INFINITY : 0.0f, sc, sv;
			int zero;

			for (uint64_t i = g * G; i < (g + 1) * G; i++) {
				lo = fminf(lo, row[perm[i]]);
				hi = fmaxf(hi, row[perm[i]]);
			}
			if (ct) {
				sc = fmaxf(-lo, hi) / 7.0f;
				zero = 8;
			} else if (d->q4_sym) {
				sc = 2.0f * fmaxf(-lo, hi) / 15.0f;
				zero = 8;
			} else {
				sc = (hi - lo) / 15.0f;
				if (awq && sc < 1e-5f)
					sc = 1e-5f;
				zero = sc > 0 ? (int)-lrintf(lo / sc) : 8;
				zero = zero < (awq ? 0 : 1) ? (awq ? 0 : 1) : zero > 15 ? 15 : zero;
			}
			if (!(sc > 0))
				sc = 1.0f;
			q->s[n * ng + g] = ct ? moe_f32_to_bf16(sc) : moe_f32_to_f16(sc);
			sv = ct ? moe_bf16_to_f32(q->s[n * ng + g]) : moe_f16_to_f32(q->s[n * ng + g]);
			if (!(sv > 0))          /* a scale below float16's range */
				sv = 1.0f;
			q->z[n * ng + g] = (uint8_t)zero;
			for (uint64_t i = g * G; i < (g + 1) * G; i++) {
				long v = lrintf(row[perm[i]] / sv) + zero;

				q->q[n * K + perm[i]] = (uint8_t)(v < 0 ? 0 : v > 15 ? 15 : v);
			}
		}
	free(w);
	free(perm);
	return 0;
}

/* AWQ packs column 8c + order[i] in nibble i, order [0, 2, 4, 6, 1, 3, 5,
 * 7]: column 8c + j goes to nibble awq_order_pos(j). */
static unsigned awq_order_pos(uint64_t j)
{
	static const unsigned pos[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };

	return pos[j];
}

int gen_q4_tensor(const struct gen_dims *d, const struct gen_tensor *t, uint64_t key,
		  struct gen_q4 *q, void *out)
{
	uint64_t N, K, ng;
	uint32_t *o = out;
	int r;

	if (!q->wname || strcmp(q->wname, t->wname)) {
		r = quantize(d, t, key, q);
		if (r < 0)
			return r;
	}
	N = q->N;
	K = q->K;
	ng = K / q->G;
	memset(out, 0, t->nbytes);
	switch (t->q4_part) {
	case Q4_QWEIGHT:
		for (uint64_t n = 0; n < N; n++)
			for (uint64_t k = 0; k < K; k++) {
				uint32_t v = q->q[n * K + k];

				if (d->q4 == MOE_Q4F_GPTQ)
					o[(k / 8) * N + n] |= v << (4 * (k % 8));
				else
					o[k * (N / 8) + n / 8] |= v << (4 * awq_order_pos(n % 8));
			}
		break;
	case Q4_QZEROS:
		for (uint64_t g = 0; g < ng; g++)
			for (uint64_t n = 0; n < N; n++) {
				uint32_t v = q->z[n * ng + g];

				if (d->q4 == MOE_Q4F_GPTQ)
					o[g * (N / 8) + n / 8] |= (v - 1) << (4 * (n % 8));   /* v1: zero - 1 */
				else
					o[g * (N / 8) + n / 8] |= v << (4 * awq_order_pos(n % 8));
			}
		break;
	case Q4_SCALES:
		for (uint64_t g = 0; g < ng; g++)
			for (uint64_t n = 0; n < N; n++)
				((uint16_t *)out)[g * N + n] = q->s[n * ng + g];
		break;
	case Q4_G_IDX:
		memcpy(out, q->g_idx, K * sizeof(int32_t));
		break;
	case Q4_PACKED:
		for (uint64_t n = 0; n < N; n++)
			for (uint64_t k = 0; k < K; k++)
				o[n * (K / 8) + k / 8] |= (uint32_t)q->q[n * K + k] << (4 * (k % 8));
		break;
	case Q4_SCALE:
		memcpy(out, q->s, N * ng * 2);
		break;
	case Q4_SHAPE: {
		int64_t shape[2] = { (int64_t)N, (int64_t)K };

		memcpy(out, shape, sizeof(shape));
		break;
	}
	}
	return 0;
}

/* --quant gptq | awq | ct-int4 and their options, checked into @d. */
int gen_resolve_q4(const struct moe_gen_options *o, struct gen_dims *d, struct moe_err *err)
{
	const char *f = o->quant_int4;

	if (!f) {
		if (o->q4_group_size || o->q4_desc_act || o->q4_sym)
			return moe_err_set(err, -EINVAL, "--group-size, --desc-act and --sym need --quant "
					   "gptq, awq or ct-int4");
		return 0;
	}
	if (!strcmp(f, "gptq"))
		d->q4 = MOE_Q4F_GPTQ;
	else if (!strcmp(f, "awq"))
		d->q4 = MOE_Q4F_AWQ;
	else if (!strcmp(f, "ct-int4"))
		d->q4 = MOE_Q4F_CT;
	else
		return moe_err_set(err, -EINVAL, "--quant %s: unknown (fp8, gptq, awq, ct-int4)", f);
	if (d->fp8)
		return moe_err_set(err, -EINVAL, "--quant fp8 and --quant %s cannot be combined", f);
	if ((o->q4_desc_act || o->q4_sym) && d->q4 != MOE_Q4F_GPTQ)
		return moe_err_set(err, -EINVAL, "--desc-act and --sym are GPTQ's (--quant gptq), not %s", f);
	if (o->q4_group_size < -1 || (o->q4_group_size > 0 && o->q4_group_size % 16))
		return moe_err_set(err, -EINVAL, "--group-size %d: a multiple of 16, or -1 for one group "
				   "per row", (int)o->q4_group_size);
	d->q4_group = o->q4_group_size == 0 ? 128 : o->q4_group_size < 0 ? 0 : (uint32_t)o->q4_group_size;
	d->q4_desc_act = o->q4_desc_act;
	d->q4_sym = o->q4_sym;
	return 0;
}
