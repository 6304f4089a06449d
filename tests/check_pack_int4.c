/* SPDX-License-Identifier: MIT */
/*
 * int4 group-quantized checkpoints (GPTQ, AWQ, compressed-tensors) from
 * pack to forward: checkpoints written here as each project writes them
 * (round to nearest per group from float weights), packed into the
 * canonical INT4 layout, served within 1e-4 of the float64 reference
 * (which decodes the checkpoint's own tensors, ref_load.c), batch
 * invariant; the odd shapes (act-order, symmetric and not, one group per
 * row, a shared expert left unquantized); the refusals; the kernels of
 * each instruction set against the scalar one.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/engine.h"
#include "engine/kernels.h"
#include "engine/store.h"
#include "formats/pack.h"
#include "ref.h"
#include "testutil.h"

#define H 64
#define I 32
#define E 4
#define K_TOP 2

enum fmt { GPTQ, AWQ, CT };

struct q4_ckpt {
	enum fmt fmt;
	int group;                 /* -1: one group per row */
	bool sym, desc_act, v2;    /* GPTQ */
	bool shared_plain;         /* the shared expert unquantized (CT: ignored) */
	bool routed_plain;         /* CT: the routed experts ignored, the shared quantized */
	bool ct_asym;              /* CT: asymmetric, with weight_zero_point */
	const char *quant;         /* another quantization_config */
	const char *drop;          /* a tensor left out */
	bool bad_g_idx;            /* one column moved to another group */
	bool bad_sym;              /* sym, with a zero point that is not 8 */
};

/* The tensors of the file being written. */
struct stw {
	json_t *hdr;
	uint8_t *data;
	uint64_t len, cap;
};

static void st_add(struct stw *w, const char *name, const char *dt, uint64_t a, uint64_t b,
		   const void *bytes, uint64_t n)
{
	json_t *shape = b ? json_pack("[I,I]", (json_int_t)a, (json_int_t)b) : json_pack("[I]", (json_int_t)a);

	if (w->len + n > w->cap) {
		w->cap = (w->len + n) * 2 + 4096;
		w->data = realloc(w->data, w->cap);
		ck_assert(w->data);
	}
	memcpy(w->data + w->len, bytes, n);
	json_object_set_new(w->hdr, name, json_pack("{s:s,s:o,s:[I,I]}", "dtype", dt, "shape", shape,
						    "data_offsets", (json_int_t)w->len,
						    (json_int_t)(w->len + n)));
	w->len += n;
}

static float randw(uint64_t *rng)
{
	return (float)(moe_test_randf(rng) * 2.0 - 1.0) * 0.25f;
}

/* float16 nearest to @f, as float */
static uint16_t f16(float f)
{
	return moe_f32_to_f16(f);
}

/*
 * One N x K matrix @w quantized as @o's format writes it: GPTQ and AWQ
 * min/max asymmetric (zero point in [1, 15], so that GPTQ's v1 "zero - 1"
 * stays a nibble) or GPTQ symmetric (zero 8), compressed-tensors symmetric
 * absmax / 7; scales float16 (bfloat16 for compressed-tensors).
 */
static void write_matrix(struct stw *st, const struct q4_ckpt *o, const char *mod, uint64_t N,
			 uint64_t K, const float *w, uint64_t *rng)
{
	uint64_t G = o->group < 0 ? K : (uint64_t)o->group, ng = K / G;
	int32_t *g_idx = malloc(K * 4);
	uint8_t *q = calloc(N * K, 1), *z = calloc(N * ng, 1);
	uint16_t *s = calloc(N * ng, 2);
	uint32_t *perm = malloc(K * 4);
	char name[256];

	ck_assert(g_idx && q && z && s && perm);
	for (uint64_t k = 0; k < K; k++)
		perm[k] = (uint32_t)k;
	if (o->desc_act)           /* act-order: groups of shuffled columns */
		for (uint64_t k = K - 1; k > 0; k--) {
			uint64_t j = moe_test_rand(rng) % (k + 1);
			uint32_t t = perm[k];

			perm[k] = perm[j];
			perm[j] = t;
		}
	for (uint64_t i = 0; i < K; i++)
		g_idx[perm[i]] = (int32_t)(i / G);
	for (uint64_t n = 0; n < N; n++)
		for (uint64_t g = 0; g < ng; g++) {
			float lo = 0, hi = 0, sc;
			int zero;

			for (uint64_t k = 0; k < K; k++)
				if ((uint64_t)g_idx[k] == g) {
					lo = fminf(lo, w[n * K + k]);
					hi = fmaxf(hi, w[n * K + k]);
				}
			if ((o->fmt == CT && !o->ct_asym) || o->sym) {
				sc = fmaxf(-lo, hi) / (o->fmt == CT ? 7.0f : 7.5f);
				zero = 8;
			} else {
				sc = (hi - lo) / 15.0f;
				zero = (int)lrintf(-lo / (sc > 0 ? sc : 1));
				zero = zero < 1 ? 1 : zero > 15 ? 15 : zero;
			}
			if (!(sc > 0))
				sc = 1;
			s[n * ng + g] = o->fmt == CT ? moe_f32_to_bf16(sc) : f16(sc);
			sc = o->fmt == CT ? moe_bf16_to_f32(s[n * ng + g]) : moe_f16_to_f32(s[n * ng + g]);
			z[n * ng + g] = (uint8_t)zero;
			for (uint64_t k = 0; k < K; k++)
				if ((uint64_t)g_idx[k] == g) {
					long v = lrintf(w[n * K + k] / sc) + zero;

					q[n * K + k] = (uint8_t)(v < 0 ? 0 : v > 15 ? 15 : v);
				}
		}
	if (o->bad_sym)
		z[0] = 7;
	if (o->bad_g_idx)
		g_idx[0] = g_idx[0] == 0 ? 1 : 0;
	if (o->fmt == CT) {
		uint32_t *wp = calloc(N * K / 8, 4);
		int64_t shape[2] = { (int64_t)N, (int64_t)K };

		for (uint64_t n = 0; n < N; n++)
			for (uint64_t k = 0; k < K; k++)
				wp[n * (K / 8) + k / 8] |= (uint32_t)q[n * K + k] << (4 * (k % 8));
		snprintf(name, sizeof(name), "%s.weight_packed", mod);
		st_add(st, name, "I32", N, K / 8, wp, N * K / 2);
		snprintf(name, sizeof(name), "%s.weight_scale", mod);
		if (!o->drop || strcmp(o->drop, "weight_scale"))
			st_add(st, name, "BF16", N, ng, s, N * ng * 2);
		snprintf(name, sizeof(name), "%s.weight_shape", mod);
		st_add(st, name, "I64", 2, 0, shape, 16);
		if (o->ct_asym) {     /* zero point + 8 (= the unsigned zero), packed along N */
			uint32_t *zp = calloc(N / 8 * ng, 4);

			for (uint64_t n = 0; n < N; n++)
				for (uint64_t g = 0; g < ng; g++)
					zp[(n / 8) * ng + g] |= (uint32_t)z[n * ng + g] << (4 * (n % 8));
			snprintf(name, sizeof(name), "%s.weight_zero_point", mod);
			if (!o->drop || strcmp(o->drop, "weight_zero_point"))
				st_add(st, name, "I32", N / 8, ng, zp, N / 8 * ng * 4);
			free(zp);
		}
		free(wp);
	} else {
		static const unsigned awq_order[8] = { 0, 2, 4, 6, 1, 3, 5, 7 };
		uint32_t *qw = calloc(N * K / 8, 4), *qz = calloc(ng * N / 8, 4);
		uint16_t *sT = malloc(ng * N * 2);

		for (uint64_t n = 0; n < N; n++)
			for (uint64_t k = 0; k < K; k++) {
				if (o->fmt == GPTQ)
					qw[(k / 8) * N + n] |= (uint32_t)q[n * K + k] << (4 * (k % 8));
				else            /* nibble i holds column 8c + order[i] */
					for (unsigned i = 0; i < 8; i++)
						if (awq_order[i] == n % 8)
							qw[k * (N / 8) + n / 8] |= (uint32_t)q[n * K + k] << (4 * i);
			}
		for (uint64_t g = 0; g < ng; g++)
			for (uint64_t n = 0; n < N; n++) {
				unsigned zv = z[n * ng + g] - (o->fmt == GPTQ && !o->v2 ? 1 : 0);

				sT[g * N + n] = s[n * ng + g];
				if (o->fmt == GPTQ)
					qz[g * (N / 8) + n / 8] |= zv << (4 * (n % 8));
				else
					for (unsigned i = 0; i < 8; i++)
						if (awq_order[i] == n % 8)
							qz[g * (N / 8) + n / 8] |= zv << (4 * i);
			}
		snprintf(name, sizeof(name), "%s.qweight", mod);
		if (o->fmt == GPTQ)
			st_add(st, name, "I32", K / 8, N, qw, N * K / 2);
		else
			st_add(st, name, "I32", K, N / 8, qw, N * K / 2);
		snprintf(name, sizeof(name), "%s.qzeros", mod);
		st_add(st, name, "I32", ng, N / 8, qz, ng * N / 2);
		if (!o->drop || strcmp(o->drop, "scales")) {
			snprintf(name, sizeof(name), "%s.scales", mod);
			st_add(st, name, "F16", ng, N, sT, ng * N * 2);
		}
		if (o->fmt == GPTQ) {
			snprintf(name, sizeof(name), "%s.g_idx", mod);
			st_add(st, name, "I32", K, 0, g_idx, K * 4);
		}
		free(qw);
		free(qz);
		free(sT);
	}
	free(g_idx);
	free(q);
	free(z);
	free(s);
	free(perm);
}

static void quant_config(const struct q4_ckpt *o, char *buf, size_t len)
{
	if (o->quant)
		snprintf(buf, len, "%s", o->quant);
	else if (o->fmt == GPTQ)
		snprintf(buf, len, "{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": %d, "
			 "\"desc_act\": %s, \"sym\": %s, \"checkpoint_format\": \"%s\"}", o->group,
			 o->desc_act ? "true" : "false", o->sym ? "true" : "false", o->v2 ? "gptq_v2" : "gptq");
	else if (o->fmt == AWQ)
		snprintf(buf, len, "{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": %d, "
			 "\"version\": \"gemm\", \"zero_point\": true}", o->group);
	else
		snprintf(buf, len, "{\"quant_method\": \"compressed-tensors\", \"format\": \"pack-quantized\", "
			 "\"config_groups\": {\"group_0\": {\"targets\": [\"Linear\"], \"weights\": "
			 "{\"num_bits\": 4, \"type\": \"int\", \"symmetric\": %s, \"strategy\": \"group\", "
			 "\"group_size\": %d, \"actorder\": null}}}, \"ignore\": [\"lm_head\", "
			 "\"re:.*self_attn.*\", \"re:.*mlp\\\\.gate$\"%s%s]}", o->ct_asym ? "false" : "true", o->group,
			 o->shared_plain ? ", \"re:.*shared_experts.*\"" : "",
			 o->routed_plain ? ", \"re:.*mlp\\\\.experts\\\\.[0-9]+\\\\..*\"" : "");
}

/* A DeepSeek-V3 layer (routed and one shared expert) as @o's checkpoint. */
static void write_checkpoint(const char *dir, const struct q4_ckpt *o)
{
	static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };
	struct stw st = { .hdr = json_object() };
	uint64_t rng = 0x1234 + (uint64_t)o->fmt * 77 + (uint64_t)o->group;
	char name[256], quant[1024], *path, *text;
	uint16_t router[E * H];
	float bias[E], *w = malloc(sizeof(float) * H * I);
	FILE *f;

	ck_assert(w);
	quant_config(o, quant, sizeof(quant));
	ck_assert(asprintf(&path, "%s/config.json", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	fprintf(f, "{\"model_type\": \"deepseek_v3\", \"hidden_size\": %u, \"num_hidden_layers\": 1,"
		" \"n_routed_experts\": %u, \"num_experts_per_tok\": %u, \"moe_intermediate_size\": %u,"
		" \"n_shared_experts\": 1, \"n_group\": 1, \"topk_group\": 1,"
		" \"quantization_config\": %s}\n", H, E, K_TOP, I, quant);
	fclose(f);
	free(path);

	for (int i = 0; i < E * H; i++)
		router[i] = moe_f32_to_bf16(randw(&rng) * 4);
	for (int i = 0; i < E; i++)
		bias[i] = 0.01f * (float)i;
	st_add(&st, "model.layers.0.mlp.gate.weight", "BF16", E, H, router, sizeof(router));
	st_add(&st, "model.layers.0.mlp.gate.e_score_correction_bias", "F32", E, 0, bias, sizeof(bias));
	for (uint32_t j = 0; j <= E; j++) {
		char base[96];

		if (j == E)
			snprintf(base, sizeof(base), "model.layers.0.mlp.shared_experts");
		else
			snprintf(base, sizeof(base), "model.layers.0.mlp.experts.%u", j);
		for (int p = 0; p < 3; p++) {
			uint64_t a = p == 2 ? H : I, b = p == 2 ? I : H;

			for (uint64_t i = 0; i < a * b; i++)
				w[i] = randw(&rng);
			snprintf(name, sizeof(name), "%s.%s", base, parts[p]);
			if (j == E ? o->shared_plain : o->routed_plain) {
				uint16_t *bf = malloc(a * b * 2);

				for (uint64_t i = 0; i < a * b; i++)
					bf[i] = moe_f32_to_bf16(w[i]);
				strcat(name, ".weight");
				st_add(&st, name, "BF16", a, b, bf, a * b * 2);
				free(bf);
				continue;
			}
			write_matrix(&st, o, name, a, b, w, &rng);
		}
	}
	text = json_dumps(st.hdr, JSON_COMPACT);
	ck_assert(asprintf(&path, "%s/model.safetensors", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	{
		uint64_t n = strlen(text);

		fwrite(&n, 8, 1, f);
		fwrite(text, 1, n, f);
		fwrite(st.data, 1, st.len, f);
	}
	fclose(f);
	free(path);
	free(text);
	free(st.data);
	json_decref(st.hdr);
	free(w);
}

static int pack_q4(const char *dir, const struct q4_ckpt *o, int dtype, char **ret_out,
		   struct moe_err *err)
{
	struct moe_pack_options po = { .dtype = dtype };

	write_checkpoint(dir, o);
	ck_assert(asprintf(ret_out, "%s/out.moe", dir) > 0);
	return moe_pack(dir, *ret_out, &po, err);
}

/* Forward batches of 1, 5 and 23 tokens against the reference, each token
 * within 1e-4; every token of the batch of 23 with the same bits alone. */
static void check_forward(const char *what, const char *dir, const char *store)
{
	struct moe_engine_options eopt = { .backend = "cpu", .threads = 2 };
	static const uint32_t ns[] = { 1, 5, 23 };
	struct moe_engine *e;
	struct ref_layer *ref;
	struct moe_err err = { 0 };
	char msg[512];
	uint64_t rng = 99;
	float x[23 * H], out[23 * H], one[H], w[23 * K_TOP], w1[K_TOP];
	int32_t ids[23 * K_TOP], ids1[K_TOP], rid[REF_MAX_EXPERTS];
	double want[H], rw[REF_MAX_EXPERTS], margin, worst = 0;
	int rc;

	rc = ref_layer_load(dir, 0, &ref, msg, sizeof(msg));
	ck_assert_msg(rc == 0, "%s: the reference cannot load the layer: %s", what, msg);
	rc = moe_engine_open(store, &eopt, &e, &err);
	ck_assert_msg(rc == 0, "%s: engine: %s", what, err.msg);
	for (size_t b = 0; b < sizeof(ns) / sizeof(ns[0]); b++) {
		uint32_t n = ns[b];

		for (size_t i = 0; i < (size_t)n * H; i++)
			x[i] = (float)(moe_test_randf(&rng) * 2 - 1);
		rc = moe_engine_forward(e, 0, x, n, out, ids, w, 0, &err);
		ck_assert_msg(rc == 0, "%s: forward: %s", what, err.msg);
		for (uint32_t t = 0; t < n; t++) {
			double rel;

			ref_layer_forward(ref, x + (size_t)t * H, want, rid, rw, &margin);
			if (margin < 1e-6)
				continue;
			ck_assert_msg(ref_routing_diff(K_TOP, ids + t * K_TOP, w + t * K_TOP, rid, rw, 1e-5,
						       msg, sizeof(msg)) == 0, "%s: token %u: %s", what, t, msg);
			rel = ref_rel_l2(out + (size_t)t * H, want, H);
			worst = rel > worst ? rel : worst;
			ck_assert_msg(rel <= 1e-4, "%s batch %u token %u: relative L2 %.3g > 1e-4", what, n,
				      t, rel);
			if (n == 23) {
				rc = moe_engine_forward(e, 0, x + (size_t)t * H, 1, one, ids1, w1, 0, &err);
				ck_assert_int_eq(rc, 0);
				ck_assert_msg(memcmp(one, out + (size_t)t * H, sizeof(one)) == 0,
					      "%s: token %u alone differs from its batch of 23", what, t);
			}
		}
	}
	fprintf(stderr, "%s: worst relative L2 %.3g\n", what, worst);
	moe_engine_close(e);
	ref_layer_free(ref);
}

static void run_case_mixed(const char *what, const struct q4_ckpt *o, uint32_t want_group,
			   uint32_t want_flags, enum moe_dtype want_routed, enum moe_dtype want_shared);

static void run_case(const char *what, const struct q4_ckpt *o, uint32_t want_group,
		     uint32_t want_flags, enum moe_dtype want_shared)
{
	run_case_mixed(what, o, want_group, want_flags, MOE_DTYPE_INT4, want_shared);
}

static void run_case_mixed(const char *what, const struct q4_ckpt *o, uint32_t want_group,
			   uint32_t want_flags, enum moe_dtype want_routed, enum moe_dtype want_shared)
{
	char *dir = moe_test_tmpdir("int4"), *out;
	struct moe_err err = { 0 };
	struct moe_store *s;
	int r = pack_q4(dir, o, -1, &out, &err);

	ck_assert_msg(r == 0, "%s: pack: %s", what, err.msg);
	ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
	ck_assert_int_eq(s->cfg.weight_dtype, want_routed);
	ck_assert_int_eq(s->cfg.shared_dtype, want_shared);
	ck_assert_uint_eq(s->cfg.q4_group, want_group);
	ck_assert_uint_eq(s->cfg.q4_flags, want_flags);
	ck_assert_uint_eq(s->hdr.q4_group, want_group);
	/* a quarter of bf16's bytes, and the scales, zero points, permutation
	 * and padding that weigh much in so small a matrix */
	ck_assert_msg(want_routed != MOE_DTYPE_INT4 || s->hdr.expert_bytes < 3ull * H * I * 2 / 2, "%s: %" PRIu64 " bytes per expert",
		      what, s->hdr.expert_bytes);
	moe_store_close(s);
	check_forward(what, dir, out);
	free(out);
	moe_test_rm_rf(dir);
	free(dir);
}

START_TEST(gptq_asym_served_within_contract)
{
	struct q4_ckpt o = { .fmt = GPTQ, .group = 32 };

	run_case("gptq asym g32", &o, 32, MOE_Q4_ZEROS, MOE_DTYPE_INT4);
}
END_TEST

START_TEST(gptq_sym_desc_act_served_within_contract)
{
	struct q4_ckpt o = { .fmt = GPTQ, .group = 16, .sym = true, .desc_act = true };

	run_case("gptq sym desc_act g16", &o, 16, MOE_Q4_PERM, MOE_DTYPE_INT4);
}
END_TEST

START_TEST(gptq_asym_desc_act_v2_served_within_contract)
{
	struct q4_ckpt o = { .fmt = GPTQ, .group = 32, .desc_act = true, .v2 = true };

	run_case("gptq_v2 asym desc_act g32", &o, 32, MOE_Q4_ZEROS | MOE_Q4_PERM, MOE_DTYPE_INT4);
}
END_TEST

/* group_size -1: one group per row of every matrix, whatever its K; the
 * shared expert left in bf16 by the checkpoint */
START_TEST(gptq_one_group_per_row_with_plain_shared_expert)
{
	struct q4_ckpt o = { .fmt = GPTQ, .group = -1, .shared_plain = true };

	run_case("gptq group -1, shared bf16", &o, 0, MOE_Q4_ZEROS, MOE_DTYPE_BF16);
}
END_TEST

START_TEST(awq_served_within_contract)
{
	struct q4_ckpt o = { .fmt = AWQ, .group = 32 };

	run_case("awq g32", &o, 32, MOE_Q4_ZEROS, MOE_DTYPE_INT4);
}
END_TEST

/* Kimi-K2-Thinking's layout: bf16 scales, the shared expert on the ignore
 * list (and in bf16), or quantized with the routed ones */
START_TEST(compressed_tensors_served_within_contract)
{
	struct q4_ckpt o = { .fmt = CT, .group = 32, .shared_plain = true };

	run_case("compressed-tensors g32, shared ignored", &o, 32, MOE_Q4_BF16_SCALES, MOE_DTYPE_BF16);
	o.shared_plain = false;
	run_case("compressed-tensors g32", &o, 32, MOE_Q4_BF16_SCALES, MOE_DTYPE_INT4);
	/* asymmetric: weight_zero_point, packed along the output */
	o = (struct q4_ckpt){ .fmt = CT, .group = 32, .ct_asym = true };
	run_case("compressed-tensors asymmetric g32", &o, 32, MOE_Q4_BF16_SCALES | MOE_Q4_ZEROS,
		 MOE_DTYPE_INT4);
	o = (struct q4_ckpt){ .fmt = CT, .group = 32 };
	/* the other way round: routed experts ignored (bf16), the shared int4 */
	o.routed_plain = true;
	run_case_mixed("compressed-tensors g32, routed ignored", &o, 32, MOE_Q4_BF16_SCALES,
		       MOE_DTYPE_BF16, MOE_DTYPE_INT4);
}
END_TEST

/* pack --dtype f32 dequantizes (exactly: (q - z) * s is a float32) */
START_TEST(pack_dtype_dequantizes_int4)
{
	static const struct q4_ckpt cases[] = {
		{ .fmt = GPTQ, .group = 16, .desc_act = true },
		{ .fmt = AWQ, .group = 32 },
		{ .fmt = CT, .group = 32 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *dir = moe_test_tmpdir("int4deq"), *out;
		struct moe_err err = { 0 };
		struct moe_store *s;
		int r = pack_q4(dir, &cases[i], MOE_DTYPE_F32, &out, &err);

		ck_assert_msg(r == 0, "pack --dtype f32: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_F32);
		ck_assert_uint_eq(s->cfg.q4_group, 0);
		moe_store_close(s);
		check_forward("dequantized", dir, out);
		free(out);
		moe_test_rm_rf(dir);
		free(dir);
	}
}
END_TEST

static void expect_refusal(const struct q4_ckpt *o, const char *needle)
{
	char *dir = moe_test_tmpdir("int4bad"), *out;
	struct moe_err err = { 0 };
	int r = pack_q4(dir, o, -1, &out, &err);

	ck_assert_msg(r < 0, "pack accepted a checkpoint that should fail with '%s'", needle);
	ck_assert_msg(strstr(err.msg, needle), "message '%s' does not say '%s'", err.msg, needle);
	free(out);
	moe_test_rm_rf(dir);
	free(dir);
}

START_TEST(int4_refusals_name_the_culprit)
{
	struct q4_ckpt o = { .fmt = GPTQ, .group = 32, .drop = "scales" };

	expect_refusal(&o, "model.layers.0.mlp.shared_experts.gate_proj.scales");
	o = (struct q4_ckpt){ .fmt = CT, .group = 32, .drop = "weight_scale" };
	expect_refusal(&o, "weight_scale' is missing");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32, .desc_act = true, .bad_g_idx = true };
	expect_refusal(&o, "g_idx");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32, .bad_g_idx = true };
	expect_refusal(&o, "desc_act is false");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32, .sym = true, .bad_sym = true };
	expect_refusal(&o, "sym");
	/* group 48 does not divide H = 64: the first matrix is named */
	o = (struct q4_ckpt){ .fmt = AWQ, .group = 48 };
	expect_refusal(&o, "gate_proj.qweight' in");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32,
			      .quant = "{\"quant_method\": \"bitsandbytes\", \"load_in_4bit\": true}" };
	expect_refusal(&o, "'bitsandbytes' is not supported (supported: fp8");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32,
			      .quant = "{\"quant_method\": \"gptq\", \"bits\": 8, \"group_size\": 32}" };
	expect_refusal(&o, "bits 8");
	o = (struct q4_ckpt){ .fmt = CT, .group = 32, .ct_asym = true, .drop = "weight_zero_point" };
	expect_refusal(&o, "has no weight_zero_point");
	o = (struct q4_ckpt){ .fmt = CT, .group = 32,
			      .quant = "{\"quant_method\": \"compressed-tensors\", \"format\": "
				       "\"pack-quantized\", \"config_groups\": {\"g\": {\"weights\": "
				       "{\"num_bits\": 4, \"type\": \"int\", \"symmetric\": true, "
				       "\"strategy\": \"channel\"}}}}" };
	expect_refusal(&o, "strategy 'channel' is not supported");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32,
			      .quant = "{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": 32, "
				       "\"is_marlin_format\": true}" };
	expect_refusal(&o, "Marlin");
	o = (struct q4_ckpt){ .fmt = GPTQ, .group = 32,
			      .quant = "{\"quant_method\": \"gptq\", \"bits\": 4, \"group_size\": 32, "
				       "\"checkpoint_format\": \"marlin\"}" };
	expect_refusal(&o, "checkpoint_format 'marlin' is not supported");
	o = (struct q4_ckpt){ .fmt = AWQ, .group = 32,
			      .quant = "{\"quant_method\": \"awq\", \"bits\": 4, \"group_size\": 32, "
				       "\"version\": \"gemv\"}" };
	expect_refusal(&o, "AWQ version 'gemv' is not supported");
}
END_TEST

/* The store's int4 parameters, checked with the model (a header that
 * passed its checksum can still hold them wrong). */
START_TEST(int4_store_parameters_are_validated)
{
	static const struct {
		enum moe_dtype routed, shared;
		uint32_t group, flags;
		const char *want;
	} cases[] = {
		{ MOE_DTYPE_INT4, MOE_DTYPE_INT4, 128, MOE_Q4_ZEROS, NULL },
		{ MOE_DTYPE_BF16, MOE_DTYPE_INT4, 0, MOE_Q4_PERM | MOE_Q4_BF16_SCALES, NULL },
		{ MOE_DTYPE_INT4, MOE_DTYPE_INT4, 24, 0, "int4 group size 24 is not a multiple of 16" },
		{ MOE_DTYPE_INT4, MOE_DTYPE_INT4, 96, 0, "int4 group size 96 does not divide hidden_size (256)" },
		{ MOE_DTYPE_INT4, MOE_DTYPE_INT4, 64, 8, "int4 flags 0x8: unknown bits" },
		{ MOE_DTYPE_BF16, MOE_DTYPE_BF16, 64, 0, "int4 parameters (group 64, flags 0) without int4 weights" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct moe_model_config c = {
			.arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 256, .moe_intermediate_size = 128,
			.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
			.n_shared_experts = 1, .shared_intermediate_size = 128,
			.scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC, .has_bias = true,
			.gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
			.weight_dtype = cases[i].routed, .shared_dtype = cases[i].shared,
			.q4_group = cases[i].group, .q4_flags = cases[i].flags,
		};
		struct moe_err err = { 0 };
		int r = moe_model_config_validate(&c, &err);

		if (!cases[i].want) {
			ck_assert_msg(r == 0, "case %zu: %s", i, err.msg);
			continue;
		}
		ck_assert_msg(r < 0 && strstr(err.msg, cases[i].want), "case %zu: '%s' does not say '%s'", i,
			      err.msg, cases[i].want);
	}
}
END_TEST

/* Each instruction set's INT4 kernel against the scalar one and against
 * float64 over the dequantized weights, for every flag combination; any
 * row split and token count gives the same bits. */
START_TEST(int4_kernels_match_scalar_and_float64)
{
	/* K = 8208: wider than the kernels' gather buffer, so a permutation
	 * is gathered in registers instead */
	const size_t N = 13, K = _i ? 8208 : 96, G = _i ? 16 : 32, ng = K / G;

	for (uint32_t flags = 0; flags <= MOE_Q4_FLAGS_ALL; flags++) {
		struct moe_q4_layout l;
		uint64_t rng = 7 + flags;
		uint8_t *M, *R, *R2;
		struct moe_q4_matrix m;
		float (*xs_)[8208] = malloc(sizeof(float) * 11 * 8208), y0[5 * 13], y[5 * 13], y1[13];
		float y11[11 * 13];
		double mags[5 * 13];
		const float *xs[11];

		moe_q4_layout((uint32_t)G, flags, N, K, &l);
		M = moe_test_page_alloc(l.bytes);
		for (size_t i = 0; i < N * K / 2; i++)
			M[i] = (uint8_t)moe_test_rand(&rng);
		for (size_t i = 0; i < N * ng; i++) {
			float sc = (float)(moe_test_randf(&rng) * 0.1 + 0.001);
			uint16_t h = flags & MOE_Q4_BF16_SCALES ? moe_f32_to_bf16(sc) : moe_f32_to_f16(sc);

			memcpy(M + l.scales + 2 * i, &h, 2);
			if (l.zeros)
				M[l.zeros + i] = (uint8_t)(moe_test_rand(&rng) % 17);
		}
		if (l.perm) {
			uint32_t *p = (uint32_t *)(void *)(M + l.perm);

			for (size_t k = 0; k < K; k++)
				p[k] = (uint32_t)k;
			for (size_t k = K - 1; k > 0; k--) {
				size_t j = moe_test_rand(&rng) % (k + 1);
				uint32_t t = p[k];

				p[k] = p[j];
				p[j] = t;
			}
		}
		for (int c = 0; c < 11; c++) {
			for (size_t k = 0; k < K; k++)
				xs_[c][k] = (float)(moe_test_randf(&rng) * 2 - 1);
			xs[c] = xs_[c];
		}
		/* the kernels read the resident layout: packed whole, and in
		 * pieces of 7 bytes from the end backwards, the same bytes */
		R = moe_test_page_alloc(l.bytes);
		R2 = moe_test_page_alloc(l.bytes);
		moe_kern_q4_pack_bytes(M, N, K, 0, l.bytes, R);
		for (uint64_t e = l.bytes; e > 0; e = e > 7 ? e - 7 : 0) {
			uint64_t b = e > 7 ? e - 7 : 0;

			moe_kern_q4_pack_bytes(M + b, N, K, b, e - b, R2);
		}
		ck_assert_msg(memcmp(R, R2, l.bytes) == 0, "flags %u: packing in pieces differs", flags);
		ck_assert_msg(memcmp(R + N * (K / 2), M + N * (K / 2), l.bytes - N * (K / 2)) == 0,
			      "flags %u: packing changed more than the codes", flags);
		moe_q4_matrix_at(R, (uint32_t)G, flags, N, K, &m);
		moe_kern_get_q4(MOE_KERN_SCALAR)(&m, 0, N, xs, 5, y0, N);
		/* float64 over w[n][perm[j]] = (q - z) * s */
		for (int c = 0; c < 5; c++)
			for (size_t n = 0; n < N; n++) {
				double acc = 0, mag = 0;

				for (size_t j = 0; j < K; j++) {
					int q = (M[n * (K / 2) + j / 2] >> (4 * (j & 1))) & 15;
					int z = l.zeros ? M[l.zeros + n * ng + j / G] : 8;
					uint16_t h;
					double s;

					memcpy(&h, M + l.scales + 2 * (n * ng + j / G), 2);
					s = flags & MOE_Q4_BF16_SCALES ? ref_bf16_to_double(h) : ref_f16_to_double(h);
					size_t col = l.perm ? ((uint32_t *)(void *)(M + l.perm))[j] : j;
					acc += (q - z) * s * xs_[c][col];
					mag += fabs((q - z) * s * xs_[c][col]);
				}
				mags[c * N + n] = mag;
				ck_assert_msg(fabs(y0[c * N + n] - acc) <= 1e-5 * mag + 1e-30,
					      "flags %u: scalar row %zu token %d: %g vs %g", flags, n, c,
					      (double)y0[c * N + n], acc);
			}
		for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
			moe_kern_dot_rows_q4_fn fn = moe_kern_get_q4((enum moe_kern_isa)isa);

			if (!fn)
				continue;
			fn(&m, 0, N, xs, 5, y, N);
			for (size_t i = 0; i < 5 * N; i++)
				ck_assert_msg(fabs((double)y[i] - y0[i]) <= 1e-5 * mags[i] + 1e-30,
					      "%s flags %u: %g vs scalar %g", moe_kern_isa_name((enum moe_kern_isa)isa),
					      flags, (double)y[i], (double)y0[i]);
			if (isa == MOE_KERN_AVX2)     /* the scalar order: the same bits */
				ck_assert(memcmp(y, y0, sizeof(y)) == 0);
			/* 11 tokens at once (a row tile dequantized once for all,
			 * without a permutation): the first 5 give the same bits */
			fn(&m, 0, N, xs, 11, y11, N);
			ck_assert_msg(memcmp(y11, y, sizeof(y)) == 0, "%s flags %u: a batch of 11 differs",
				      moe_kern_isa_name((enum moe_kern_isa)isa), flags);
			/* rows 5.. alone, one token at a time: the same bits */
			for (int c = 0; c < 5; c++) {
				fn(&m, 5, N - 5, xs + c, 1, y1, N);
				ck_assert_msg(memcmp(y1, y + c * N + 5, (N - 5) * 4) == 0,
					      "%s flags %u: tile split changes token %d",
					      moe_kern_isa_name((enum moe_kern_isa)isa), flags, c);
			}
		}
		free(M);
		free(R);
		free(R2);
		free(xs_);
	}
}
END_TEST

/*
 * A store's permutation is not checked at load: an index past the row
 * (a damaged or crafted blob) must give a number, never a read outside
 * the token (here it would be 16 GiB past it).  Every instruction set
 * clamps to the last column, so the result is that of perm = K - 1 there;
 * K = 96 and 8208 cover the gathered and the in-register paths.
 */
START_TEST(int4_bad_permutation_index_is_clamped)
{
	const size_t N = 4, K = _i ? 8208 : 96, G = 16;
	const uint32_t flags = MOE_Q4_ZEROS | MOE_Q4_PERM;
	struct moe_q4_layout l;
	struct moe_q4_matrix m;
	uint64_t rng = 99;
	uint8_t *M, *M2, *R, *R2;
	float *x = malloc(sizeof(float) * K), y[4], y2[4];
	const float *xs[1] = { x };
	uint32_t *p, *p2;

	moe_q4_layout((uint32_t)G, flags, N, K, &l);
	M = moe_test_page_alloc(l.bytes);
	M2 = moe_test_page_alloc(l.bytes);
	for (size_t i = 0; i < l.bytes; i++)
		M[i] = (uint8_t)moe_test_rand(&rng);
	for (size_t i = 0; i < N * (K / G); i++) {
		uint16_t h = moe_f32_to_f16(0.01f);

		memcpy(M + l.scales + 2 * i, &h, 2);
	}
	p = (uint32_t *)(void *)(M + l.perm);
	for (size_t k = 0; k < K; k++)
		p[k] = (uint32_t)(K - 1 - k);
	memcpy(M2, M, l.bytes);
	p2 = (uint32_t *)(void *)(M2 + l.perm);
	p[3] = 0xffffffffu;            /* past the row */
	p[K - 2] = (uint32_t)K;        /* one past */
	p2[3] = p2[K - 2] = (uint32_t)(K - 1);
	for (size_t k = 0; k < K; k++)
		x[k] = (float)(moe_test_randf(&rng) * 2 - 1);
	R = moe_test_page_alloc(l.bytes);     /* the resident layouts */
	R2 = moe_test_page_alloc(l.bytes);
	moe_kern_q4_pack_bytes(M, N, K, 0, l.bytes, R);
	moe_kern_q4_pack_bytes(M2, N, K, 0, l.bytes, R2);
	for (int isa = 0; isa < MOE_KERN_ISA_COUNT; isa++) {
		moe_kern_dot_rows_q4_fn fn = moe_kern_get_q4((enum moe_kern_isa)isa);

		if (!fn)
			continue;
		moe_q4_matrix_at(R, (uint32_t)G, flags, N, K, &m);
		fn(&m, 0, N, xs, 1, y, N);
		moe_q4_matrix_at(R2, (uint32_t)G, flags, N, K, &m);
		fn(&m, 0, N, xs, 1, y2, N);
		ck_assert_msg(memcmp(y, y2, sizeof(y)) == 0, "%s: a bad index is not read as column K - 1",
			      moe_kern_isa_name((enum moe_kern_isa)isa));
	}
	free(x);
	free(M);
	free(M2);
	free(R);
	free(R2);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("pack_int4");
	TCase *tc = tcase_create("int4");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, gptq_asym_served_within_contract);
	tcase_add_test(tc, gptq_sym_desc_act_served_within_contract);
	tcase_add_test(tc, gptq_asym_desc_act_v2_served_within_contract);
	tcase_add_test(tc, gptq_one_group_per_row_with_plain_shared_expert);
	tcase_add_test(tc, awq_served_within_contract);
	tcase_add_test(tc, compressed_tensors_served_within_contract);
	tcase_add_test(tc, pack_dtype_dequantizes_int4);
	tcase_add_test(tc, int4_refusals_name_the_culprit);
	tcase_add_test(tc, int4_store_parameters_are_validated);
	tcase_add_loop_test(tc, int4_kernels_match_scalar_and_float64, 0, 2);
	tcase_add_loop_test(tc, int4_bad_permutation_index_is_clamped, 0, 2);
	suite_add_tcase(s, tc);
	return moe_test_run_suite(s, "pack_int4");
}
