/* SPDX-License-Identifier: MIT */
/*
 * int4 checkpoints into the canonical INT4 layout (hfq4.h).  The bit
 * layouts, from each project's own packing code:
 *   GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"): qweight [K/8][N]
 *     int32, input column k in bits 4 (k % 8) of row k / 8; qzeros
 *     [K/G][N/8] int32, column n in bits 4 (n % 8); scales [K/G][N] F16;
 *     g_idx [K] int32, the group of input column k.  w = (q - (z + 1)) * s
 *     for format "gptq" (v1 stores the zero point less one), (q - z) * s
 *     for "gptq_v2".
 *   AWQ (AutoAWQ, version "gemm"): qweight [K][N/8] int32 and qzeros
 *     [K/G][N/8] packed along N in the order [0, 2, 4, 6, 1, 3, 5, 7]
 *     (nibble i holds column 8c + order[i]); scales [K/G][N] F16;
 *     w = (q - z) * s.
 *   compressed-tensors pack-quantized: weight_packed [N][K/8] int32, input
 *     column k in bits 4 (k % 8), the signed value plus 8; weight_scale
 *     [N][K/G]; weight_shape [N, K]; w = (q - 8) * s; asymmetric,
 *     weight_zero_point int32 [N/8][K/G] packed along N (row n in bits
 *     4 (n % 8)), the signed zero point plus 8: w = (q - zp) * s.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hfq4.h"
#include "engine/dtype.h"
#include "engine/model.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hfq4.c moves packed int32 words as the canonical code bytes: port it before using a big-endian host"
#endif

const char *moe_q4_format_name(enum moe_q4_format f)
{
	switch (f) {
	case MOE_Q4F_GPTQ: return "gptq";
	case MOE_Q4F_AWQ: return "awq";
	case MOE_Q4F_CT: return "ct-int4";
	default: return "?";
	}
}

void moe_q4_config_clear(struct moe_q4_config *qc)
{
	for (size_t i = 0; i < qc->n_ignore; i++)
		free(qc->ignore[i]);
	free(qc->ignore);
	memset(qc, 0, sizeof(*qc));
}

/* An integer field, or @def when absent or null. */
static int q_int(json_t *o, const char *file, const char *path, const char *key, json_int_t def,
		 json_int_t *ret, struct moe_err *err)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		*ret = def;
		return 0;
	}
	if (!json_is_integer(v))
		return moe_err_set(err, -EINVAL, "%s: %s.%s must be an integer", file, path, key);
	*ret = json_integer_value(v);
	return 0;
}

static int q_bool(json_t *o, const char *file, const char *path, const char *key, bool def,
		  bool *ret, struct moe_err *err)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		*ret = def;
		return 0;
	}
	if (!json_is_boolean(v))
		return moe_err_set(err, -EINVAL, "%s: %s.%s must be true or false", file, path, key);
	*ret = json_is_true(v);
	return 0;
}

static const char *q_str(json_t *o, const char *key, const char *def)
{
	json_t *v = json_object_get(o, key);

	return v && json_is_string(v) ? json_string_value(v) : def;
}

static int set_group(json_int_t g, const char *file, const char *path, struct moe_q4_config *qc,
		     struct moe_err *err)
{
	if (g == -1) {
		qc->group = 0;
		return 0;
	}
	if (g <= 0 || g > (1 << 20) || g % 16)
		return moe_err_set(err, -ENOTSUP, "%s: %s.group_size %lld is not supported (a multiple of "
				   "16, or -1 for one group per row)", file, path, (long long)g);
	qc->group = (uint32_t)g;
	return 0;
}

/* compressed-tensors: one config group of 4-bit symmetric int weights in
 * groups ("strategy": "group"), format pack-quantized. */
static int parse_ct(json_t *q, const char *file, struct moe_q4_config *qc, struct moe_err *err)
{
	const char *fmt = q_str(q, "format", "?");
	json_t *groups = json_object_get(q, "config_groups"), *grp, *w, *ign;
	json_int_t bits = 0, gs = 0;
	const char *key;
	int r;

	if (strcmp(fmt, "pack-quantized"))
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.format '%s' is not supported "
				   "(compressed-tensors: pack-quantized)", file, fmt);
	if (!groups || !json_is_object(groups) || json_object_size(groups) != 1)
		return moe_err_set(err, -ENOTSUP, "%s: quantization_config.config_groups must hold exactly "
				   "one group (moed serves one int4 scheme per checkpoint)", file);
	json_object_foreach(groups, key, grp) {
		w = json_object_get(grp, "weights");
		if (!w || !json_is_object(w))
			return moe_err_set(err, -EINVAL, "%s: quantization_config.config_groups.%s has no "
					   "weights", file, key);
		r = q_int(w, file, "config_groups.weights", "num_bits", 0, &bits, err);
		if (r == 0)
			r = q_int(w, file, "config_groups.weights", "group_size", 0, &gs, err);
		if (r == 0)
			r = q_bool(w, file, "config_groups.weights", "symmetric", true, &qc->sym, err);
		if (r < 0)
			return r;
		if (bits != 4 || strcmp(q_str(w, "type", "int"), "int"))
			return moe_err_set(err, -ENOTSUP, "%s: compressed-tensors weights of %lld bits, type %s: "
					   "moed reads 4-bit int", file, (long long)bits, q_str(w, "type", "int"));
		if (strcmp(q_str(w, "strategy", "?"), "group"))
			return moe_err_set(err, -ENOTSUP, "%s: compressed-tensors strategy '%s' is not supported "
					   "(group)", file, q_str(w, "strategy", "?"));
		if (json_object_get(w, "actorder") && !json_is_null(json_object_get(w, "actorder")))
			return moe_err_set(err, -ENOTSUP, "%s: compressed-tensors actorder is not supported",
					   file);
		r = set_group(gs, file, "config_groups.weights", qc, err);
		if (r < 0)
			return r;
	}
	ign = json_object_get(q, "ignore");
	if (ign && json_is_array(ign)) {
		qc->ignore = calloc(json_array_size(ign) + 1, sizeof(char *));
		if (!qc->ignore)
			return moe_err_set(err, -ENOMEM, "out of memory");
		for (size_t i = 0; i < json_array_size(ign); i++) {
			json_t *e = json_array_get(ign, i);

			if (!json_is_string(e))
				return moe_err_set(err, -EINVAL, "%s: quantization_config.ignore[%zu] must be "
						   "a string", file, i);
			qc->ignore[qc->n_ignore] = strdup(json_string_value(e));
			if (!qc->ignore[qc->n_ignore++])
				return moe_err_set(err, -ENOMEM, "out of memory");
		}
	}
	return 0;
}

int moe_q4_parse_config(json_t *q, const char *file, const char *method, struct moe_q4_config *ret,
			struct moe_err *err)
{
	struct moe_q4_config qc = { 0 };
	json_int_t bits = 0, gs = 0;
	int r;

	if (!strcmp(method, "compressed-tensors")) {
		qc.format = MOE_Q4F_CT;
		r = parse_ct(q, file, &qc, err);
		goto out;
	}
	qc.format = !strcmp(method, "gptq") ? MOE_Q4F_GPTQ : MOE_Q4F_AWQ;
	r = q_int(q, file, "quantization_config", "bits", qc.format == MOE_Q4F_AWQ ? 4 : 0, &bits, err);
	if (r == 0 && qc.format == MOE_Q4F_AWQ && !json_object_get(q, "bits"))
		r = q_int(q, file, "quantization_config", "w_bit", 4, &bits, err);
	if (r == 0)
		r = q_int(q, file, "quantization_config", "group_size", 128, &gs, err);
	if (r == 0 && qc.format == MOE_Q4F_AWQ && !json_object_get(q, "group_size"))
		r = q_int(q, file, "quantization_config", "q_group_size", 128, &gs, err);
	if (r < 0)
		goto out;
	if (bits != 4) {
		r = moe_err_set(err, -ENOTSUP, "%s: quantization_config.bits %lld is not supported (%s: 4)",
				file, (long long)bits, method);
		goto out;
	}
	r = set_group(gs, file, "quantization_config", &qc, err);
	if (r < 0)
		goto out;
	if (qc.format == MOE_Q4F_AWQ) {
		const char *v = q_str(q, "version", "gemm");

		if (strcasecmp(v, "gemm")) {
			r = moe_err_set(err, -ENOTSUP, "%s: AWQ version '%s' is not supported (gemm)", file, v);
			goto out;
		}
		if (json_is_false(json_object_get(q, "zero_point"))) {
			r = moe_err_set(err, -ENOTSUP, "%s: AWQ without zero points (zero_point false) is not "
					"supported (zero_point true)", file);
			goto out;
		}
		goto out;               /* zero points always, never permuted */
	}
	r = q_bool(q, file, "quantization_config", "desc_act", false, &qc.desc_act, err);
	if (r == 0)
		r = q_bool(q, file, "quantization_config", "sym", true, &qc.sym, err);
	if (r < 0)
		goto out;
	if (json_is_true(json_object_get(q, "is_marlin_format"))) {
		r = moe_err_set(err, -ENOTSUP, "%s: GPTQ in Marlin's layout (is_marlin_format) is not supported "
				"(checkpoint_format gptq, gptq_v2)", file);
		goto out;
	}
	{
		const char *cf = q_str(q, "checkpoint_format", "gptq");

		if (strcmp(cf, "gptq") && strcmp(cf, "gptq_v2")) {
			r = moe_err_set(err, -ENOTSUP, "%s: GPTQ checkpoint_format '%s' is not supported "
					"(gptq, gptq_v2)", file, cf);
			goto out;
		}
		qc.gptq_v1 = !strcmp(cf, "gptq");
	}
out:
	if (r < 0) {
		moe_q4_config_clear(&qc);
		return r;
	}
	*ret = qc;
	return 0;
}

uint32_t moe_q4_flags(const struct moe_q4_config *qc)
{
	uint32_t f = 0;

	if (qc->format == MOE_Q4F_AWQ || !qc->sym)
		f |= MOE_Q4_ZEROS;
	if (qc->format == MOE_Q4F_GPTQ && qc->desc_act)
		f |= MOE_Q4_PERM;
	return f;
}

/* compressed-tensors' ignore entries: a module name, or "re:" and a
 * regular expression matched from the start of the name (re.match). */
static bool ignored(const struct moe_q4_config *qc, const char *module)
{
	for (size_t i = 0; i < qc->n_ignore; i++) {
		const char *e = qc->ignore[i];
		regex_t re;
		char *pat;
		bool hit;

		if (strncmp(e, "re:", 3)) {
			if (!strcmp(e, module))
				return true;
			continue;
		}
		if (asprintf(&pat, "^(%s)", e + 3) < 0)
			continue;
		hit = regcomp(&re, pat, REG_EXTENDED | REG_NOSUB) == 0;
		free(pat);
		if (hit) {
			hit = regexec(&re, module, 0, NULL, 0) == 0;
			regfree(&re);
			if (hit)
				return true;
		}
	}
	return false;
}

static const char *tfile(const struct moe_st_checkpoint *ck, const struct moe_st_tensor *t)
{
	return t->file < ck->n_files ? ck->files[t->file].path : "the checkpoint";
}

/* Tensor @module.@suffix, 2-D [a][b] (1-D [a] when b is 0) of st dtype
 * @dt (or F16/BF16 when @dt is NULL). */
static int need_t(const struct moe_st_checkpoint *ck, const struct moe_st_tensor *q, const char *module,
		  const char *suffix, const char *why, uint64_t a, uint64_t b, const char *dt,
		  const struct moe_st_tensor **ret, struct moe_err *err)
{
	const struct moe_st_tensor *t;
	char name[512];

	snprintf(name, sizeof(name), "%s.%s", module, suffix);
	t = moe_st_find(ck, name);
	if (!t)
		return moe_err_set(err, -ENOENT, "int4 matrix '%s' (%s) in %s has no %s: tensor '%s' is "
				   "missing from the checkpoint", module, why, tfile(ck, q), suffix, name);
	if (dt ? strcmp(t->st_dtype, dt) != 0
	       : strcmp(t->st_dtype, "F16") != 0 && strcmp(t->st_dtype, "BF16") != 0)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s has dtype %s, expected %s", name,
				   tfile(ck, t), t->st_dtype, dt ? dt : "F16 or BF16");
	if (b ? t->ndim != 2 || t->shape[0] != a || t->shape[1] != b : t->ndim != 1 || t->shape[0] != a) {
		char want[64];

		if (b)
			snprintf(want, sizeof(want), "[%" PRIu64 ", %" PRIu64 "]", a, b);
		else
			snprintf(want, sizeof(want), "[%" PRIu64 "]", a);
		return moe_err_set(err, -EINVAL, "tensor '%s' in %s has the wrong shape: expected %s for a "
				   "%s matrix", name, tfile(ck, t), want, why);
	}
	*ret = t;
	return 0;
}

int moe_q4_find(const struct moe_st_checkpoint *ck, const struct moe_q4_config *qc,
		const char *module, uint64_t N, uint64_t K, struct moe_hf_q4 *ret, bool *found,
		struct moe_err *err)
{
	const char *qname = qc->format == MOE_Q4F_CT ? "weight_packed" : "qweight";
	uint64_t G = qc->group ? qc->group : K, ng;
	char name[512], shape[64];
	const struct moe_st_tensor *t;
	int r;

	memset(ret, 0, sizeof(*ret));
	*found = false;
	snprintf(name, sizeof(name), "%s.%s", module, qname);
	t = moe_st_find(ck, name);
	if (!t || (qc->format == MOE_Q4F_CT && ignored(qc, module)))
		return 0;
	snprintf(shape, sizeof(shape), "%" PRIu64 " x %" PRIu64, N, K);
	if (K % 16 || K % G)
		return moe_err_set(err, -EINVAL, "int4 tensor '%s' in %s: its %" PRIu64 " input columns are "
				   "not a multiple of the group size %" PRIu64 " and of 16", name, tfile(ck, t),
				   K, G);
	ng = K / G;
	switch (qc->format) {
	case MOE_Q4F_GPTQ:
		r = need_t(ck, t, module, "qweight", shape, K / 8, N, "I32", &ret->qweight, err);
		if (r == 0)
			r = need_t(ck, t, module, "scales", shape, ng, N, NULL, &ret->scales, err);
		if (r == 0)
			r = need_t(ck, t, module, "qzeros", shape, ng, N / 8, "I32", &ret->qzeros, err);
		snprintf(name, sizeof(name), "%s.g_idx", module);
		if (r == 0 && (moe_st_find(ck, name) || qc->desc_act))
			r = need_t(ck, t, module, "g_idx", shape, K, 0, "I32", &ret->g_idx, err);
		break;
	case MOE_Q4F_AWQ:
		r = need_t(ck, t, module, "qweight", shape, K, N / 8, "I32", &ret->qweight, err);
		if (r == 0)
			r = need_t(ck, t, module, "scales", shape, ng, N, NULL, &ret->scales, err);
		if (r == 0)
			r = need_t(ck, t, module, "qzeros", shape, ng, N / 8, "I32", &ret->qzeros, err);
		break;
	default:
		r = need_t(ck, t, module, "weight_packed", shape, N, K / 8, "I32", &ret->qweight, err);
		if (r == 0)
			r = need_t(ck, t, module, "weight_scale", shape, N, ng, NULL, &ret->scales, err);
		if (r == 0 && !qc->sym)
			r = need_t(ck, t, module, "weight_zero_point", shape, N / 8, ng, "I32", &ret->qzeros,
				   err);
		break;
	}
	if (r == 0 && N % 8)
		r = moe_err_set(err, -EINVAL, "int4 tensor '%s': %" PRIu64 " rows are not a multiple of 8",
				ret->qweight->name, N);
	if (r == 0)
		*found = true;
	return r;
}

bool moe_q4_bf16_scales(const struct moe_hf_q4 *q)
{
	return !strcmp(q->scales->st_dtype, "BF16");
}

static int read_all(const struct moe_st_checkpoint *ck, const struct moe_st_tensor *t, void **ret,
		    struct moe_err *err)
{
	void *b = malloc(t->nbytes ? t->nbytes : 1);
	int r;

	if (!b)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = moe_st_read(ck, t, 0, b, t->nbytes, err);
	if (r < 0) {
		free(b);
		return r;
	}
	*ret = b;
	return 0;
}

static void put_code(uint8_t *codes, uint64_t K, uint64_t n, uint64_t j, unsigned q)
{
	codes[n * (K / 2) + j / 2] |= (uint8_t)(q << (4 * (j & 1)));
}

/* AWQ's order: column 8c + j is in nibble awq_nibble[j]. */
static const unsigned awq_nibble[8] = { 0, 4, 1, 5, 2, 6, 3, 7 };

/* The permutation of GPTQ's g_idx: input columns sorted stably by group. */
static int gptq_perm(const struct moe_st_tensor *t, const int32_t *g_idx, uint64_t K, uint64_t G,
		     bool desc_act, uint32_t *perm, struct moe_err *err)
{
	uint64_t ng = K / G, *fill = calloc(ng, sizeof(uint64_t));

	if (!fill)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (uint64_t k = 0; k < K; k++) {
		if (g_idx[k] < 0 || (uint64_t)g_idx[k] >= ng) {
			free(fill);
			return moe_err_set(err, -EINVAL, "tensor '%s': g_idx[%" PRIu64 "] = %d is not a group "
					   "(0 .. %" PRIu64 ")", t->name, k, g_idx[k], ng - 1);
		}
		if (!desc_act && (uint64_t)g_idx[k] != k / G) {
			free(fill);
			return moe_err_set(err, -EINVAL, "tensor '%s': g_idx[%" PRIu64 "] = %d but desc_act is "
					   "false (column %" PRIu64 " belongs to group %" PRIu64 ")", t->name, k,
					   g_idx[k], k, k / G);
		}
		if (fill[g_idx[k]]++ == G) {
			free(fill);
			return moe_err_set(err, -EINVAL, "tensor '%s': group %d has more than %" PRIu64
					   " columns (each group must have exactly group_size)", t->name,
					   g_idx[k], G);
		}
	}
	for (uint64_t g = 0; g < ng; g++)
		fill[g] = g * G;                /* next stored column of group g */
	for (uint64_t k = 0; perm && k < K; k++)
		perm[fill[g_idx[k]]++] = (uint32_t)k;
	free(fill);
	return 0;
}

int moe_q4_read(const struct moe_st_checkpoint *ck, const struct moe_q4_config *qc,
		const struct moe_hf_q4 *q, uint32_t flags, uint64_t N, uint64_t K, uint8_t *dst,
		struct moe_err *err)
{
	struct moe_q4_layout l;
	void *qw = NULL, *sc = NULL, *qz = NULL, *gi = NULL;
	uint32_t *perm, *cols = NULL;
	uint16_t *scales;
	uint8_t *zeros;
	int r;

	moe_q4_layout(qc->group, flags, N, K, &l);
	perm = l.perm ? (uint32_t *)(void *)(dst + l.perm) : NULL;
	scales = (uint16_t *)(void *)(dst + l.scales);
	zeros = l.zeros ? dst + l.zeros : NULL;
	r = read_all(ck, q->qweight, &qw, err);
	if (r == 0)
		r = read_all(ck, q->scales, &sc, err);
	if (r == 0 && q->qzeros)
		r = read_all(ck, q->qzeros, &qz, err);
	if (r == 0 && q->g_idx)
		r = read_all(ck, q->g_idx, &gi, err);
	if (r < 0)
		goto out;
	memset(dst, 0, N * K / 2);          /* put_code ORs the nibbles in */
	/* cols[j]: the input column stored at column j */
	cols = malloc(K * sizeof(uint32_t));
	if (!cols) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint64_t k = 0; k < K; k++)
		cols[k] = (uint32_t)k;
	if (gi) {
		r = gptq_perm(q->g_idx, gi, K, l.G, qc->desc_act, cols, err);
		if (r < 0)
			goto out;
	}
	if (perm)
		memcpy(perm, cols, K * sizeof(uint32_t));

	if (qc->format == MOE_Q4F_CT) {
		/* weight_packed is the canonical code bytes (little-endian int32,
		 * low nibble first), weight_scale the canonical scales */
		memcpy(dst, qw, N * K / 2);
		memcpy(scales, sc, N * l.groups * 2);
		/* asymmetric: weight_zero_point [N/8][K/G] packed along N, in
		 * the same +8 encoding as the values, so (q - 8) - (zp - 8)
		 * is q - zp: the stored nibble is the canonical zero point */
		for (uint64_t n = 0; zeros && n < N; n++)
			for (uint64_t g = 0; g < l.groups; g++)
				zeros[n * l.groups + g] = (uint8_t)((((const uint32_t *)qz)[(n / 8) * l.groups + g] >>
								      (4 * (n % 8))) & 15u);
		goto out;
	}
	{
		const uint32_t *w = qw, *z = qz;
		const uint16_t *s = sc;

		if (qc->format == MOE_Q4F_GPTQ && !perm) {
			/* a GPTQ word holds columns 8i .. 8i+7 of one row, low
			 * nibble first: as little-endian bytes, the canonical
			 * codes themselves; the matrix is a transpose of words */
			for (uint64_t n = 0; n < N; n++)
				for (uint64_t i = 0; i < K / 8; i++)
					memcpy(dst + n * (K / 2) + 4 * i, &w[i * N + n], 4);
		} else {
			for (uint64_t n = 0; n < N; n++)
				for (uint64_t j = 0; j < K; j++) {
					uint64_t k = cols[j];
					unsigned v = qc->format == MOE_Q4F_GPTQ
						? (w[(k / 8) * N + n] >> (4 * (k % 8))) & 15u
						: (w[k * (N / 8) + n / 8] >> (4 * awq_nibble[n % 8])) & 15u;

					put_code(dst, K, n, j, v);
				}
		}
		for (uint64_t g = 0; g < l.groups; g++)
			for (uint64_t n = 0; n < N; n++) {
				unsigned zv = qc->format == MOE_Q4F_GPTQ
					? ((z[g * (N / 8) + n / 8] >> (4 * (n % 8))) & 15u) + (qc->gptq_v1 ? 1 : 0)
					: (z[g * (N / 8) + n / 8] >> (4 * awq_nibble[n % 8])) & 15u;

				scales[n * l.groups + g] = s[g * N + n];
				if (zeros) {
					zeros[n * l.groups + g] = (uint8_t)zv;
				} else if (zv != 8) {
					r = moe_err_set(err, -EINVAL, "tensor '%s': zero point %u at group %" PRIu64
							", column %" PRIu64 ", but quantization_config says sym "
							"(zero point 8)", q->qzeros->name, zv, g, n);
					goto out;
				}
			}
	}
out:
	free(qw);
	free(sc);
	free(qz);
	free(gi);
	free(cols);
	return r;
}

void moe_q4_dequant(const void *m, uint32_t group, uint32_t flags, uint64_t N, uint64_t K, float *out)
{
	struct moe_q4_layout l;
	const uint8_t *b = m;
	const uint16_t *s;
	const uint32_t *perm;

	moe_q4_layout(group, flags, N, K, &l);
	s = (const uint16_t *)(const void *)(b + l.scales);
	perm = l.perm ? (const uint32_t *)(const void *)(b + l.perm) : NULL;
	for (uint64_t n = 0; n < N; n++)
		for (uint64_t j = 0; j < K; j++) {
			uint64_t g = j / l.G;
			int q = (b[n * (K / 2) + j / 2] >> (4 * (j & 1))) & 15;
			int z = l.zeros ? b[l.zeros + n * l.groups + g] : 8;
			uint16_t h = s[n * l.groups + g];
			float sf = flags & MOE_Q4_BF16_SCALES ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);

			out[n * K + (perm ? perm[j] : j)] = (float)(q - z) * sf;
		}
}
