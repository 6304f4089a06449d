/* SPDX-License-Identifier: MIT */
/*
 * FP8 block-scaled checkpoints through the packer: the codes and 128x128
 * scales kept in their own bytes (shared expert apart), `--dtype`
 * dequantizing them, their errors naming the culprit; `--quantize fp8`
 * against gen-model --quant fp8 and against a quantization written here,
 * its refusals, and `--quantize-skip`.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "formats/genmodel.h"
#include "formats/hfmodel.h"
#include "formats/pack.h"
#include "formats/safetensors.h"
#include "engine/store.h"
#include "ref.h"
#include "testutil.h"

/* A tiny DeepSeek-V3 FP8 checkpoint, written by hand as DeepSeek released
 * V3: F8_E4M3 expert matrices with X.weight_scale_inv (F32, or @scale_dt),
 * H = 200 and I = 72 so that both dimensions end in a partial block; with
 * @shared a shared expert, FP8 unless @shared_bf16 (and then the routed
 * experts bf16 when @routed_bf16).  @quant is the quantization_config;
 * @drop names a scale tensor left out.  Every data byte is a pattern, so
 * that what pack copies can be compared. */
struct fp8_ckpt {
	const char *quant;
	const char *scale_dt;
	const char *drop;
	bool shared, shared_bf16, routed_bf16;
};

#define FP8_H 200
#define FP8_I 72
#define FP8_E 4
#define FP8_QUANT "{\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", " \
	"\"activation_scheme\": \"dynamic\", \"weight_block_size\": [128, 128]}"

static void write_fp8_checkpoint(const char *dir, const struct fp8_ckpt *o)
{
	const uint32_t H = FP8_H, I = FP8_I, E = FP8_E;
	const char *scale_dt = o->scale_dt ? o->scale_dt : "F32";
	uint64_t ses = !strcmp(scale_dt, "F32") ? 4 : !strcmp(scale_dt, "F8_E4M3") ? 1 : 2;
	json_t *hdr = json_object();
	uint64_t pos = 0;
	char name[128], *path, *text;
	FILE *f;

	ck_assert(asprintf(&path, "%s/config.json", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	fprintf(f, "{\"model_type\": \"deepseek_v3\", \"hidden_size\": %u, \"num_hidden_layers\": 1,"
		" \"n_routed_experts\": %u, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": %u,"
		" \"n_shared_experts\": %d, \"n_group\": 1, \"topk_group\": 1,"
		" \"quantization_config\": %s}\n", H, E, I, o->shared ? 1 : 0,
		o->quant ? o->quant : FP8_QUANT);
	fclose(f);
	free(path);

#define T(dt, a, b, es, ...) do {                                                      \
		snprintf(name, sizeof(name), __VA_ARGS__);                             \
		json_object_set_new(hdr, name, json_pack("{s:s,s:[I,I],s:[I,I]}", "dtype", dt, \
				    "shape", (json_int_t)(a), (json_int_t)(b), "data_offsets",  \
				    (json_int_t)pos, (json_int_t)(pos + (uint64_t)(a) * (b) * (es)))); \
		pos += (uint64_t)(a) * (b) * (es);                                    \
	} while (0)
	T("BF16", E, H, 2, "model.layers.0.mlp.gate.weight");
	json_object_set_new(hdr, "model.layers.0.mlp.gate.e_score_correction_bias",
			    json_pack("{s:s,s:[I],s:[I,I]}", "dtype", "F32", "shape", (json_int_t)E,
				      "data_offsets", (json_int_t)pos, (json_int_t)(pos + 4 * E)));
	pos += 4 * E;
	for (uint32_t j = 0; j <= E; j++) {
		static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };
		bool sh = j == E, bf16 = sh ? o->shared_bf16 : o->routed_bf16;
		char base[96];

		if (sh && !o->shared)
			break;
		if (sh)
			snprintf(base, sizeof(base), "model.layers.0.mlp.shared_experts");
		else
			snprintf(base, sizeof(base), "model.layers.0.mlp.experts.%u", j);
		for (int p = 0; p < 3; p++) {
			uint64_t a = p == 2 ? H : I, b = p == 2 ? I : H;

			if (bf16) {
				T("BF16", a, b, 2, "%s.%s.weight", base, parts[p]);
				continue;
			}
			T("F8_E4M3", a, b, 1, "%s.%s.weight", base, parts[p]);
			snprintf(name, sizeof(name), "%s.%s.weight_scale_inv", base, parts[p]);
			if (o->drop && !strcmp(o->drop, name))
				continue;
			T(scale_dt, (a + 127) / 128, (b + 127) / 128, ses, "%s.%s.weight_scale_inv", base,
			  parts[p]);
		}
	}
#undef T
	text = json_dumps(hdr, JSON_COMPACT);
	json_decref(hdr);
	ck_assert(asprintf(&path, "%s/model.safetensors", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	{
		uint64_t n = strlen(text);

		fwrite(&n, 8, 1, f);
		fwrite(text, 1, n, f);
		/* a pattern with small exponents: scales and bf16 stay finite */
		for (uint64_t i = 0; i < pos; i++)
			fputc((int)((i * 37 + i / 251) & 0x3f), f);
	}
	fclose(f);
	free(path);
	free(text);
}

static int pack_fp8(const char *dir, const struct fp8_ckpt *o, char **ret_out, struct moe_err *err)
{
	struct moe_pack_options po = { .dtype = -1 };

	write_fp8_checkpoint(dir, o);
	ck_assert(asprintf(ret_out, "%s/out.moe", dir) > 0);
	return moe_pack(dir, *ret_out, &po, err);
}

/* The bytes of matrix @name: codes then float32 scales at @blob. */
static void expect_fp8_matrix(const struct moe_st_checkpoint *ck, const char *name, uint64_t rows,
			      uint64_t cols, const uint8_t *blob)
{
	const struct moe_st_tensor *t = moe_st_find(ck, name), *s;
	char sname[160];
	struct moe_err err = { 0 };
	uint8_t *codes = malloc(rows * cols);
	uint64_t nb = (rows + 127) / 128 * ((cols + 127) / 128);
	float *want = malloc(nb * sizeof(float));
	uint8_t *raw = malloc(nb * 4);

	ck_assert(t && codes && want && raw);
	snprintf(sname, sizeof(sname), "%s_scale_inv", name);
	s = moe_st_find(ck, sname);
	ck_assert(s);
	ck_assert_int_eq(moe_st_read(ck, t, 0, codes, rows * cols, &err), 0);
	ck_assert_msg(memcmp(codes, blob, rows * cols) == 0, "%s: the codes are not the checkpoint's", name);
	for (uint64_t i = rows * cols; i < moe_matrix_scales_offset(rows, cols); i++)
		ck_assert_msg(blob[i] == 0, "%s: padding byte %llu is not zero", name, (unsigned long long)i);
	ck_assert_int_eq(moe_st_read(ck, s, 0, raw, s->nbytes, &err), 0);
	moe_dtype_to_f32((enum moe_dtype)s->dtype, raw, want, nb);
	ck_assert_msg(memcmp(want, blob + moe_matrix_scales_offset(rows, cols), nb * 4) == 0,
		      "%s: the scales are not the checkpoint's", name);
	free(codes);
	free(want);
	free(raw);
}

/* pack keeps the release's bytes: each FP8 blob is the codes and the
 * scales of the checkpoint, partial blocks included; bf16 scales widen. */
START_TEST(pack_keeps_fp8_bytes)
{
	static const char *const scale_dts[] = { "F32", "BF16" };
	static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };

	for (int sd = 0; sd < 2; sd++) {
		char *dir = moe_test_tmpdir("fp8"), *out, name[128];
		struct fp8_ckpt o = { .scale_dt = scale_dts[sd], .shared = true };
		struct moe_st_checkpoint *ck;
		struct moe_store *s;
		struct moe_err err = { 0 };
		uint8_t *blob;
		int r = pack_fp8(dir, &o, &out, &err);

		ck_assert_msg(r == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->hdr.version, 1);   /* one dtype: old readers refuse dtype 3 */
		ck_assert_str_eq(s->hdr.source_dtype, "fp8");
		ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
		blob = malloc(s->hdr.expert_bytes > moe_shared_bytes(&s->cfg) ? s->hdr.expert_bytes
									       : moe_shared_bytes(&s->cfg));
		for (uint32_t j = 0; j <= FP8_E; j++) {
			uint64_t pos = 0;

			if (j < FP8_E)
				ck_assert_int_eq(moe_store_read_expert(s, 0, j, blob, &err), 0);
			else
				ck_assert_int_eq(moe_store_read_shared(s, 0, blob, &err), 0);
			for (int p = 0; p < 3; p++) {
				uint64_t a = p == 2 ? FP8_H : FP8_I, b = p == 2 ? FP8_I : FP8_H;

				if (j < FP8_E)
					snprintf(name, sizeof(name), "model.layers.0.mlp.experts.%u.%s.weight", j,
						 parts[p]);
				else
					snprintf(name, sizeof(name), "model.layers.0.mlp.shared_experts.%s.weight",
						 parts[p]);
				expect_fp8_matrix(ck, name, a, b, blob + pos);
				pos += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, a, b);
			}
		}
		free(blob);
		moe_st_checkpoint_close(ck);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

/* --dtype f32 or bf16 dequantizes: w = e4m3(code) * scale in float32, then
 * rounded, as DeepSeek's fp8_cast_bf16.py does; the store is one dtype. */
START_TEST(pack_dtype_dequantizes_fp8)
{
	static const enum moe_dtype tos[] = { MOE_DTYPE_F32, MOE_DTYPE_BF16 };
	static const char *const parts[3] = { "gate_proj", "up_proj", "down_proj" };

	for (int ti = 0; ti < 2; ti++) {
		char *dir = moe_test_tmpdir("fp8deq"), *out, name[160];
		struct fp8_ckpt o = { .shared = true, .scale_dt = "BF16" };
		struct moe_pack_options po = { .dtype = (int)tos[ti] };
		struct moe_st_checkpoint *ck;
		struct moe_store *s;
		struct moe_err err = { 0 };
		uint8_t *blob;
		uint64_t pos = 0;

		write_fp8_checkpoint(dir, &o);
		ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
		ck_assert_msg(moe_pack(dir, out, &po, &err) == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, tos[ti]);
		ck_assert_int_eq(s->cfg.shared_dtype, tos[ti]);
		ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
		blob = malloc(s->hdr.expert_bytes);
		ck_assert_int_eq(moe_store_read_expert(s, 0, 1, blob, &err), 0);
		for (int p = 0; p < 3; p++) {
			uint64_t a = p == 2 ? FP8_H : FP8_I, b = p == 2 ? FP8_I : FP8_H, kb = (b + 127) / 128;
			const struct moe_st_tensor *t, *st;
			uint8_t *codes = malloc(a * b);
			uint16_t sraw[4];
			float sc[4];

			snprintf(name, sizeof(name), "model.layers.0.mlp.experts.1.%s.weight", parts[p]);
			t = moe_st_find(ck, name);
			snprintf(name, sizeof(name), "model.layers.0.mlp.experts.1.%s.weight_scale_inv", parts[p]);
			st = moe_st_find(ck, name);
			ck_assert(t && st && st->nbytes <= sizeof(sraw));
			ck_assert_int_eq(moe_st_read(ck, t, 0, codes, a * b, &err), 0);
			ck_assert_int_eq(moe_st_read(ck, st, 0, sraw, st->nbytes, &err), 0);
			moe_dtype_to_f32(MOE_DTYPE_BF16, sraw, sc, st->nbytes / 2);
			for (uint64_t i = 0; i < a; i++)
				for (uint64_t j = 0; j < b; j++) {
					float w = moe_e4m3_to_f32(codes[i * b + j]) * sc[i / 128 * kb + j / 128];
					const uint8_t *at = blob + pos + (i * b + j) * moe_dtype_size(tos[ti]);

					if (tos[ti] == MOE_DTYPE_F32)
						ck_assert_msg(memcmp(at, &w, 4) == 0, "%s [%llu][%llu]", parts[p],
							      (unsigned long long)i, (unsigned long long)j);
					else {
						uint16_t h = moe_f32_to_bf16(w);

						ck_assert_msg(memcmp(at, &h, 2) == 0, "%s [%llu][%llu]", parts[p],
							      (unsigned long long)i, (unsigned long long)j);
					}
				}
			pos += a * b * moe_dtype_size(tos[ti]);
			free(codes);
		}
		free(blob);
		moe_st_checkpoint_close(ck);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

/* DeepSeek-V3's shared expert is FP8 like its routed ones; a release that
 * quantizes only one of them keeps each in its own dtype: version 2. */
START_TEST(pack_keeps_shared_expert_dtype_apart)
{
	for (int which = 0; which < 2; which++) {
		char *dir = moe_test_tmpdir("fp8mix"), *out;
		struct fp8_ckpt o = { .shared = true, .shared_bf16 = which == 0, .routed_bf16 = which == 1 };
		struct moe_store *s;
		struct moe_err err = { 0 };
		int r = pack_fp8(dir, &o, &out, &err);

		ck_assert_msg(r == 0, "pack: %s", err.msg);
		ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
		ck_assert_int_eq(s->cfg.weight_dtype, which ? MOE_DTYPE_BF16 : MOE_DTYPE_FP8_E4M3_B128);
		ck_assert_int_eq(s->cfg.shared_dtype, which ? MOE_DTYPE_FP8_E4M3_B128 : MOE_DTYPE_BF16);
		ck_assert_int_eq(s->hdr.version, 2);
		ck_assert_int_eq(moe_store_verify(s, NULL, NULL, NULL, &err), 0);
		moe_store_close(s);
		free(out);
		free(dir);
	}
}
END_TEST

static void expect_pack_fails(const struct fp8_ckpt *o, int code, const char *want)
{
	char *dir = moe_test_tmpdir("fp8bad"), *out;
	struct moe_err err = { 0 };
	int r = pack_fp8(dir, o, &out, &err);

	ck_assert_msg(r == code, "pack gave %d (%s), not %d", r, err.msg, code);
	ck_assert_msg(strstr(err.msg, want), "message '%s' lacks '%s'", err.msg, want);
	ck_assert(!moe_test_exists(out));
	free(out);
	free(dir);
}

START_TEST(pack_fp8_errors_name_the_culprit)
{
	struct fp8_ckpt o = { .drop = "model.layers.0.mlp.experts.2.up_proj.weight_scale_inv" };

	expect_pack_fails(&o, -ENOENT, "tensor 'model.layers.0.mlp.experts.2.up_proj.weight' in ");
	expect_pack_fails(&o, -ENOENT, "is F8_E4M3 but its scales "
			  "'model.layers.0.mlp.experts.2.up_proj.weight_scale_inv' are missing");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"bitsandbytes\", \"bits\": 4}" };
	expect_pack_fails(&o, -ENOTSUP, "quantization_config.quant_method 'bitsandbytes' is not supported "
			  "(supported: fp8 with weight_block_size [128, 128]; mxfp4; gptq, awq (gemm) and "
			  "compressed-tensors (pack-quantized) with 4 bits)");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 64]}" };
	expect_pack_fails(&o, -ENOTSUP, "weight_block_size [64, 64] is not supported");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\", \"fmt\": \"e5m2\", "
			       "\"weight_block_size\": [128, 128]}" };
	expect_pack_fails(&o, -ENOTSUP, "quantization_config.fmt 'e5m2' is not supported");
	o = (struct fp8_ckpt){ .quant = "{\"quant_method\": \"fp8\"}" };
	expect_pack_fails(&o, -ENOTSUP, "no weight_block_size: per-tensor FP8 is not supported");
	o = (struct fp8_ckpt){ .scale_dt = "F8_E4M3" };
	expect_pack_fails(&o, -ENOTSUP, "have dtype F8_E4M3; moed reads F32, BF16 and F16 scales");
}
END_TEST

/* --- pack --quantize fp8 ------------------------------------------------------- */

/* A small deepseek_v3 with a shared expert whose matrices end in partial
 * blocks both ways (H = 200, I = 136) and span two block rows. */
static void quant_model(enum moe_dtype dt, struct moe_gen_options *o)
{
	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, dt, o);
	moe_test_gen_grouped(o);
	o->hidden_size = 200;
	o->moe_intermediate_size = 136;
	o->num_experts = 8;
	o->top_k = 2;
	o->n_group = 2;
	o->topk_group = 1;
	o->num_layers = 3;
	o->seed = 11;
}

static char *pack_quantized(const char *dir, struct moe_store **ret)
{
	struct moe_pack_options po = { .dtype = -1, .quantize = "fp8" };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/q.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == 0, "pack --quantize fp8 %s: %s", dir, err.msg);
	r = moe_store_open(out, ret, &err);
	ck_assert_msg(r == 0, "open %s: %s", out, err.msg);
	return out;
}

/* Blob @j (UINT32_MAX: shared) of layer @li of @s into a fresh buffer. */
static uint8_t *read_blob(const struct moe_store *s, uint32_t li, uint32_t j, uint64_t *ret_n)
{
	uint64_t n = j == UINT32_MAX ? moe_shared_bytes(&s->cfg) : moe_expert_bytes(&s->cfg);
	uint8_t *b = moe_test_page_alloc(n);
	struct moe_err err = { 0 };
	int r = j == UINT32_MAX ? moe_store_read_shared(s, li, b, &err)
				: moe_store_read_expert(s, li, j, b, &err);

	ck_assert_msg(r == 0, "layer %u expert %u: %s", li, j, err.msg);
	*ret_n = n;
	return b;
}

/* pack --quantize fp8 of the f32 checkpoint of seed S is, blob for blob,
 * the pack of gen-model --quant fp8 of seed S: gen-model quantizes the
 * float32 values its f32 checkpoint holds, with the same quantizer. */
START_TEST(pack_quantize_equals_gen_model_fp8)
{
	struct moe_gen_options o;
	struct moe_store *a, *b;
	char *fdir, *qdir, *aout, *bout;

	quant_model(MOE_DTYPE_F32, &o);
	fdir = moe_test_gen(&o, "qf32");
	o.quant_fp8 = true;
	qdir = moe_test_gen(&o, "qgen");
	aout = pack_quantized(fdir, &a);
	bout = moe_test_pack_to(qdir, -1, &b);
	ck_assert_int_eq(a->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(a->cfg.shared_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(b->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(a->hdr.num_moe_layers, 2);
	ck_assert_int_eq(b->hdr.num_moe_layers, 2);
	ck_assert_str_eq(a->hdr.source_dtype, "f32");
	for (uint32_t li = 0; li < 2; li++) {
		uint64_t E = a->cfg.num_experts, H = a->cfg.hidden_size;
		float *ra = calloc(E * H + E, sizeof(float)), *rb = calloc(E * H + E, sizeof(float));
		struct moe_err err = { 0 };

		ck_assert_int_eq(moe_store_read_router(a, li, ra, ra + E * H, NULL, &err), 0);
		ck_assert_int_eq(moe_store_read_router(b, li, rb, rb + E * H, NULL, &err), 0);
		ck_assert_msg(!memcmp(ra, rb, (E * H + E) * sizeof(float)), "layer %u: routers differ", li);
		free(ra);
		free(rb);
		for (uint32_t j = 0; j <= E; j++) {
			uint32_t e = j == E ? UINT32_MAX : j;
			uint64_t na, nb;
			uint8_t *ba = read_blob(a, li, e, &na), *bb = read_blob(b, li, e, &nb);

			ck_assert_uint_eq(na, nb);
			for (uint64_t i = 0; i < na; i++)
				ck_assert_msg(ba[i] == bb[i], "layer %u expert %u byte %" PRIu64
					      ": pack --quantize %#x, gen-model --quant %#x", li, e, i,
					      ba[i], bb[i]);
			free(ba);
			free(bb);
		}
	}
	moe_store_close(a);
	moe_store_close(b);
	free(aout);
	free(bout);
	free(fdir);
	free(qdir);
}
END_TEST

/* The e4m3fn code nearest to @q, found by search over the finite codes in
 * double (ties to the even code), not by engine/dtype.c's bit arithmetic. */
static uint8_t ref_e4m3_nearest(double q)
{
	double best_d = INFINITY;
	uint8_t best = 0;

	for (unsigned c = 0; c < 0x7f; c++) {
		double d = fabs(fabs(q) - ref_e4m3_to_double((uint8_t)c));

		if (d < best_d || (d == best_d && !(c & 1))) {
			best_d = d;
			best = (uint8_t)c;
		}
	}
	return signbit(q) ? (uint8_t)(best | 0x80) : best;
}

/* One [N][K] float matrix @w quantized as the release is, checked against
 * @fp8 (moe_matrix_bytes() layout): scale = amax / 448 per block (1 when
 * all zero), code = nearest e4m3 to w / scale (the division in float32, as
 * torch does it), ties to even. */
static void expect_reference_quant(const float *w, uint64_t N, uint64_t K, const uint8_t *fp8,
				   const char *what)
{
	uint64_t kb = (K + 127) / 128;
	const uint8_t *scb = fp8 + moe_matrix_scales_offset(N, K);

	for (uint64_t bi = 0; bi < (N + 127) / 128; bi++)
		for (uint64_t bj = 0; bj < kb; bj++) {
			double amax = 0;
			float scale, got;

			for (uint64_t i = bi * 128; i < N && i < bi * 128 + 128; i++)
				for (uint64_t j = bj * 128; j < K && j < bj * 128 + 128; j++)
					amax = fmax(amax, fabs((double)w[i * K + j]));
			scale = amax > 0 ? (float)(amax / 448.0) : 1.0f;
			memcpy(&got, scb + (bi * kb + bj) * sizeof(float), sizeof(got));
			ck_assert_msg(got == scale, "%s block (%" PRIu64 ", %" PRIu64 "): scale %.9g, "
				      "reference %.9g", what, bi, bj, got, scale);
			for (uint64_t i = bi * 128; i < N && i < bi * 128 + 128; i++)
				for (uint64_t j = bj * 128; j < K && j < bj * 128 + 128; j++) {
					uint8_t want = ref_e4m3_nearest((double)(w[i * K + j] / scale));

					ck_assert_msg(fp8[i * K + j] == want, "%s (%" PRIu64 ", %" PRIu64 "): "
						      "w %.9g scale %.9g: code %#x, reference %#x", what, i, j,
						      w[i * K + j], scale, fp8[i * K + j], want);
				}
		}
}

/* From bf16: gen-model --quant fp8 quantizes the float32 values before
 * their bf16 rounding, so the bytes differ from pack --quantize of the
 * bf16 checkpoint; those are checked against a quantization of the bf16
 * values (the store packed as bf16) done here. */
START_TEST(pack_quantize_bf16_matches_reference)
{
	struct moe_gen_options o;
	struct moe_store *q, *s;
	char *dir, *qout, *out;

	quant_model(MOE_DTYPE_BF16, &o);
	dir = moe_test_gen(&o, "qbf16");
	out = moe_test_pack_to(dir, -1, &s);
	qout = pack_quantized(dir, &q);
	ck_assert_str_eq(q->hdr.source_dtype, "bf16");
	for (uint32_t li = 0; li < 2; li++)
		for (uint32_t j = 0; j <= s->cfg.num_experts; j++) {
			uint32_t e = j == s->cfg.num_experts ? UINT32_MAX : j;
			uint64_t I = e == UINT32_MAX ? s->cfg.shared_intermediate_size
						     : s->cfg.moe_intermediate_size;
			uint64_t H = s->cfg.hidden_size, ns, nq, pos_s = 0, pos_q = 0;
			uint8_t *bs = read_blob(s, li, e, &ns), *bq = read_blob(q, li, e, &nq);
			float *w = malloc(I * H * sizeof(float));
			char what[64];

			for (int p = 0; p < 3; p++) {
				uint64_t N = p == 2 ? H : I, K = p == 2 ? I : H;

				snprintf(what, sizeof(what), "layer %u expert %d matrix %d", li,
					 e == UINT32_MAX ? -1 : (int)e, p);
				moe_dtype_to_f32(MOE_DTYPE_BF16, bs + pos_s, w, N * K);
				expect_reference_quant(w, N, K, bq + pos_q, what);
				pos_s += moe_matrix_bytes(MOE_DTYPE_BF16, N, K);
				pos_q += moe_matrix_bytes(MOE_DTYPE_FP8_E4M3_B128, N, K);
			}
			ck_assert_uint_eq(pos_q, nq);
			free(w);
			free(bs);
			free(bq);
		}
	moe_store_close(s);
	moe_store_close(q);
	free(out);
	free(qout);
	free(dir);
}
END_TEST

static void expect_quantize_fails(const char *dir, int dtype, const char *quant, int want,
				  const char *needle)
{
	struct moe_pack_options po = { .dtype = dtype, .quantize = quant };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/refused.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == want, "pack --quantize %s: %d (%s), want %d", quant, r, err.msg, want);
	moe_test_assert_err_has(&err, needle);
	ck_assert(!moe_test_exists(out));
	free(out);
}

/* --quantize refuses what it cannot do, saying what instead. */
START_TEST(pack_quantize_refusals_say_why)
{
	struct fp8_ckpt f = { .shared = true };
	struct moe_gen_options o;
	char *dir, *fdir = moe_test_tmpdir("qfp8");

	moe_test_gen_small(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, &o);
	dir = moe_test_gen(&o, "qrefuse");
	expect_quantize_fails(dir, MOE_DTYPE_BF16, "fp8", -EINVAL, "--quantize and --dtype cannot be combined");
	expect_quantize_fails(dir, -1, "int4", -EINVAL, "--quantize int4: not supported (supported: fp8)");
	write_fp8_checkpoint(fdir, &f);
	expect_quantize_fails(fdir, -1, "fp8", -EINVAL, "the checkpoint is already quantized (FP8); "
			      "pack it without --quantize");
	free(dir);
	moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &o);
	dir = moe_test_gen(&o, "qoss");
	expect_quantize_fails(dir, -1, "fp8", -ENOTSUP, "expert biases (gpt_oss), which the store "
			      "does not hold next to FP8 weights");
	free(dir);
	free(fdir);
}
END_TEST

static void expect_skip_fails(const char *dir, const char *quant, const char *skip, const char *needle)
{
	struct moe_pack_options po = { .dtype = -1, .quantize = quant, .quantize_skip = skip };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/refused.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == -EINVAL, "pack --quantize-skip %s: %d (%s), want -EINVAL", skip, r, err.msg);
	moe_test_assert_err_has(&err, needle);
	ck_assert(!moe_test_exists(out));
	free(out);
}

/*
 * --quantize-skip: a release's modules_to_not_convert list (names of
 * modules the store does not hold included) keeps the shared expert's
 * bytes as they were and quantizes the routed experts as --quantize alone
 * does; a name covering part of a kind, one naming nothing, a list that
 * keeps everything and one without --quantize are refused, naming why.
 */
START_TEST(pack_quantize_skip_keeps_what_a_release_list_names)
{
	struct moe_pack_options po = { .dtype = -1, .quantize = "fp8",
				       .quantize_skip = "lm_head,model.embed_tokens,mlp.shared_experts" };
	struct moe_gen_options o;
	struct moe_store *sq, *sk, *sb;
	struct moe_err err = { 0 };
	char *dir, *qout, *kout, *bout;
	uint64_t n1, n2;

	quant_model(MOE_DTYPE_BF16, &o);
	dir = moe_test_gen(&o, "qskip");
	qout = pack_quantized(dir, &sq);
	ck_assert(asprintf(&kout, "%s/k.moe", dir) > 0);
	ck_assert_msg(moe_pack(dir, kout, &po, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(moe_store_open(kout, &sk, &err), 0);
	bout = moe_test_pack_to(dir, -1, &sb);
	ck_assert_int_eq(sk->cfg.weight_dtype, MOE_DTYPE_FP8_E4M3_B128);
	ck_assert_int_eq(sk->cfg.shared_dtype, MOE_DTYPE_BF16);
	for (uint32_t li = 0; li < sk->hdr.num_moe_layers; li++)
		for (uint32_t j = 0; j <= sk->cfg.num_experts; j++) {
			bool sh = j == sk->cfg.num_experts;
			uint8_t *a = read_blob(sk, li, sh ? UINT32_MAX : j, &n1);
			uint8_t *b = read_blob(sh ? sb : sq, li, sh ? UINT32_MAX : j, &n2);

			ck_assert_msg(n1 == n2 && memcmp(a, b, n1) == 0, "layer %u %s %u differs from the %s "
				      "pack's", li, sh ? "shared" : "expert", j, sh ? "bf16" : "--quantize");
			free(a);
			free(b);
		}
	moe_store_close(sq);
	moe_store_close(sk);
	moe_store_close(sb);

	/* layers 1 and 2 are MoE: one layer's experts are not all of them */
	expect_skip_fails(dir, "fp8", "model.layers.1.mlp.experts", "names tensor 'model.layers.1.mlp.experts.");
	expect_skip_fails(dir, "fp8", "model.layers.1.mlp.experts", "a name must cover all of them or none");
	expect_skip_fails(dir, "fp8", "mlp.shared_expert,shared_exprts", "'shared_exprts' names no tensor");
	expect_skip_fails(dir, "fp8", "shared,routed", "nothing is left to quantize");
	expect_skip_fails(dir, "fp8", "experts", "nothing is left to quantize");
	expect_skip_fails(dir, "fp8", ",", "the list is empty");
	expect_skip_fails(dir, NULL, "shared", "it needs --quantize fp8");
	free(qout);
	free(kout);
	free(bout);
	free(dir);
	/* no shared expert: 'shared' names nothing, 'routed' leaves nothing */
	moe_test_gen_small(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, &o);
	dir = moe_test_gen(&o, "qskipq3");
	expect_skip_fails(dir, "fp8", "shared", "this model has no shared expert");
	expect_skip_fails(dir, "fp8", "routed", "nothing is left to quantize");
	free(dir);
}
END_TEST

static Suite *pack_fp8_suite(void)
{
	Suite *s = suite_create("pack-fp8");
	TCase *tc = tcase_create("pack-fp8");

	tcase_set_timeout(tc, 600);
	tcase_add_test(tc, pack_keeps_fp8_bytes);
	tcase_add_test(tc, pack_dtype_dequantizes_fp8);
	tcase_add_test(tc, pack_keeps_shared_expert_dtype_apart);
	tcase_add_test(tc, pack_fp8_errors_name_the_culprit);
	tcase_add_test(tc, pack_quantize_equals_gen_model_fp8);
	tcase_add_test(tc, pack_quantize_bf16_matches_reference);
	tcase_add_test(tc, pack_quantize_refusals_say_why);
	tcase_add_test(tc, pack_quantize_skip_keeps_what_a_release_list_names);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(pack_fp8_suite(), "pack-fp8");
}
