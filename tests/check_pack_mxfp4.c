/* SPDX-License-Identifier: MIT */
/*
 * gpt-oss's MXFP4 release through the packer: the codes and E8M0 scales
 * kept in their own bytes (gate and up rows de-interleaved, biases after
 * them), `--dtype` decoding them as the OCP spec says, and the errors of a
 * checkpoint that is not quite the release naming the culprit.
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

#include "formats/genmodel.h"
#include "formats/hfmodel.h"
#include "formats/pack.h"
#include "formats/safetensors.h"
#include "engine/model.h"
#include "engine/store.h"
#include "testutil.h"

#define MX_H 64
#define MX_I 96
#define MX_E 4

static double e2m1_spec(unsigned code)
{
	static const double mag[8] = { 0, 0.5, 1, 1.5, 2, 3, 4, 6 };

	return code & 8u ? -mag[code & 7u] : mag[code & 7u];
}

/* A gen-model --quant mxfp4 gpt_oss of MX_H, MX_I, MX_E, 2 layers. */
static char *gen_mxfp4(void)
{
	struct moe_gen_options o;

	moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &o);
	o.hidden_size = MX_H;
	o.moe_intermediate_size = MX_I;
	o.num_experts = MX_E;
	o.top_k = 2;
	o.num_layers = 2;
	o.seed = 5;
	o.quant_mxfp4 = true;
	return moe_test_gen(&o, "mxfp4");
}

static uint8_t *read_all(const struct moe_st_checkpoint *ck, const char *name, uint64_t n)
{
	const struct moe_st_tensor *t = moe_st_find(ck, name);
	struct moe_err err = { 0 };
	uint8_t *b = malloc(n);

	ck_assert_msg(t && b, "%s", name);
	ck_assert_uint_eq(t->nbytes, n);
	ck_assert_int_eq(moe_st_read(ck, t, 0, b, n, &err), 0);
	return b;
}

/* The release's tensors of one layer, raw. */
struct mx_layer {
	uint8_t *gu, *gus, *dn, *dns;
};

static void layer_read(const struct moe_st_checkpoint *ck, uint32_t L, struct mx_layer *m)
{
	char name[128];

	snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj_blocks", L);
	m->gu = read_all(ck, name, (uint64_t)MX_E * 2 * MX_I * MX_H / 2);
	snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj_scales", L);
	m->gus = read_all(ck, name, (uint64_t)MX_E * 2 * MX_I * MX_H / 32);
	snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.down_proj_blocks", L);
	m->dn = read_all(ck, name, (uint64_t)MX_E * MX_H * MX_I / 2);
	snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.down_proj_scales", L);
	m->dns = read_all(ck, name, (uint64_t)MX_E * MX_H * MX_I / 32);
}

static void layer_free(struct mx_layer *m)
{
	free(m->gu);
	free(m->gus);
	free(m->dn);
	free(m->dns);
}

/* Row @src of the release (@codes, @scales, K values a row) is row @n of
 * the store matrix at @mat (N x K). */
static void expect_row(const uint8_t *mat, uint64_t N, uint64_t K, uint64_t n, const uint8_t *codes,
		       const uint8_t *scales, uint64_t src, const char *what)
{
	ck_assert_msg(memcmp(mat + n * K / 2, codes + src * K / 2, K / 2) == 0, "%s row %llu: codes", what,
		      (unsigned long long)n);
	ck_assert_msg(memcmp(mat + moe_mxfp4_scales_offset(N, K) + n * K / 32, scales + src * K / 32, K / 32) == 0,
		      "%s row %llu: scales", what, (unsigned long long)n);
}

/* Each blob: gate = the even rows of gate_up, up = the odd ones, down as
 * it is, codes then scales, zero padding; the float32 biases after. */
START_TEST(pack_keeps_mxfp4_bytes)
{
	char *dir = gen_mxfp4(), *out;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_st_checkpoint *ck;
	struct moe_store *s;
	struct moe_err err = { 0 };
	uint64_t gm = moe_matrix_bytes(MOE_DTYPE_MXFP4, MX_I, MX_H);
	uint64_t dm = moe_matrix_bytes(MOE_DTYPE_MXFP4, MX_H, MX_I);

	ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
	ck_assert_msg(moe_pack(dir, out, &po, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
	ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_MXFP4);
	ck_assert(s->cfg.has_expert_bias);
	ck_assert_uint_eq(moe_expert_bias_offset(&s->cfg), (2 * gm + dm + 15) / 16 * 16);
	for (uint32_t L = 0; L < 2; L++) {
		struct mx_layer m;
		uint8_t *blob = moe_test_page_alloc(moe_expert_bytes(&s->cfg));

		layer_read(ck, L, &m);
		/* gen-model's quantizer: amax / 2^e in [4, 8) goes to 4 or 6, so
		 * every block not all zero has a code of magnitude 4 or 6 and
		 * none above */
		for (uint64_t b = 0; b < (uint64_t)MX_E * 2 * MX_I * MX_H / 32; b++) {
			unsigned top = 0;

			for (unsigned i = 0; i < 32; i++) {
				unsigned c = m.gu[b * 16 + i / 2] >> (i % 2 * 4) & 7u;

				top = c > top ? c : top;
			}
			ck_assert_msg(top >= 6 || (top == 0 && m.gus[b] == 0),
				      "layer %u block %llu: largest code magnitude %g at scale %u", L,
				      (unsigned long long)b, e2m1_spec(top), m.gus[b]);
		}
		for (uint32_t j = 0; j < MX_E; j++) {
			const uint8_t *gc = m.gu + (uint64_t)j * 2 * MX_I * MX_H / 2;
			const uint8_t *gs = m.gus + (uint64_t)j * 2 * MX_I * MX_H / 32;
			const float *bias;
			char name[128];
			float want[2 * MX_I];

			ck_assert_int_eq(moe_store_read_expert(s, L, j, blob, &err), 0);
			for (uint64_t n = 0; n < MX_I; n++) {
				expect_row(blob, MX_I, MX_H, n, gc, gs, 2 * n, "gate");
				expect_row(blob + gm, MX_I, MX_H, n, gc, gs, 2 * n + 1, "up");
			}
			for (uint64_t n = 0; n < MX_H; n++)
				expect_row(blob + 2 * gm, MX_H, MX_I, n, m.dn + (uint64_t)j * MX_H * MX_I / 2,
					   m.dns + (uint64_t)j * MX_H * MX_I / 32, n, "down");
			for (uint64_t i = MX_I * MX_H / 2; i < moe_mxfp4_scales_offset(MX_I, MX_H); i++)
				ck_assert_uint_eq(blob[i], 0);
			/* biases: gate even, up odd, widened exactly */
			snprintf(name, sizeof(name), "model.layers.%u.mlp.experts.gate_up_proj_bias", L);
			{
				uint16_t *raw = (uint16_t *)(void *)read_all(ck, name, (uint64_t)MX_E * 2 * MX_I * 2);

				for (uint64_t i = 0; i < 2 * MX_I; i++)
					want[i] = moe_bf16_to_f32(raw[(uint64_t)j * 2 * MX_I + i]);
				free(raw);
			}
			bias = (const float *)(const void *)(blob + moe_expert_bias_offset(&s->cfg));
			for (uint64_t i = 0; i < MX_I; i++)
				ck_assert(bias[i] == want[2 * i] && bias[MX_I + i] == want[2 * i + 1]);
		}
		layer_free(&m);
		free(blob);
	}
	moe_st_checkpoint_close(ck);
	moe_store_close(s);
	moe_test_rm_rf(dir);
	free(out);
	free(dir);
}
END_TEST

/* --dtype f32 decodes: w = e2m1(code) * 2^(s - 127), exactly. */
START_TEST(pack_dtype_decodes_mxfp4)
{
	char *dir = gen_mxfp4(), *out;
	struct moe_pack_options po = { .dtype = MOE_DTYPE_F32 };
	struct moe_st_checkpoint *ck;
	struct moe_store *s;
	struct moe_err err = { 0 };
	struct mx_layer m;
	uint8_t *blob;
	const float *w;

	ck_assert(asprintf(&out, "%s/f32.moe", dir) > 0);
	ck_assert_msg(moe_pack(dir, out, &po, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(moe_store_open(out, &s, &err), 0);
	ck_assert_int_eq(moe_st_checkpoint_open(dir, &ck, &err), 0);
	ck_assert_int_eq(s->cfg.weight_dtype, MOE_DTYPE_F32);
	blob = moe_test_page_alloc(moe_expert_bytes(&s->cfg));
	layer_read(ck, 1, &m);
	ck_assert_int_eq(moe_store_read_expert(s, 1, 3, blob, &err), 0);
	w = (const float *)(const void *)blob;
	for (uint64_t p = 0; p < 3; p++) {
		uint64_t N = p == 2 ? MX_H : MX_I, K = p == 2 ? MX_I : MX_H;

		for (uint64_t n = 0; n < N; n++)
			for (uint64_t k = 0; k < K; k++) {
				/* source row in the release: gate 2n, up 2n + 1, down n */
				uint64_t src = p == 2 ? 3 * N + n : 3 * 2 * N + 2 * n + p;
				const uint8_t *c = p == 2 ? m.dn : m.gu, *sc = p == 2 ? m.dns : m.gus;
				unsigned byte = c[src * K / 2 + k / 2];
				double want = ldexp(e2m1_spec(k % 2 ? byte >> 4 : byte & 15u),
						    (int)sc[src * K / 32 + k / 32] - 127);

				ck_assert_msg(w[n * K + k] == want, "part %llu [%llu][%llu]: %g, want %g",
					      (unsigned long long)p, (unsigned long long)n, (unsigned long long)k,
					      (double)w[n * K + k], want);
			}
		w += N * K;
	}
	layer_free(&m);
	free(blob);
	moe_st_checkpoint_close(ck);
	moe_store_close(s);
	moe_test_rm_rf(dir);
	free(out);
	free(dir);
}
END_TEST

/* A one-layer gpt_oss MXFP4 checkpoint written here (H 64, @I, 4 experts),
 * with quantization_config @quant (NULL: none) and tensor @drop left out. */
static void write_checkpoint(const char *dir, uint32_t I, const char *quant, const char *drop)
{
	const uint64_t H = 64, E = 4;
	json_t *hdr = json_object();
	uint64_t pos = 0, n;
	char *path, *text;
	FILE *f;

	ck_assert(asprintf(&path, "%s/config.json", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	fprintf(f, "{\"model_type\": \"gpt_oss\", \"hidden_size\": %llu, \"num_hidden_layers\": 1, "
		"\"intermediate_size\": %u, \"num_local_experts\": %llu, \"num_experts_per_tok\": 2%s%s}\n",
		(unsigned long long)H, I, (unsigned long long)E, quant ? ", \"quantization_config\": " : "",
		quant ? quant : "");
	fclose(f);
	free(path);
#define T(dt, es, name, ...) do {                                                         \
		json_t *sh = json_array();                                                \
		uint64_t d_[] = { __VA_ARGS__ }, cnt = es;                                \
		for (size_t i_ = 0; i_ < sizeof(d_) / sizeof(d_[0]); i_++) {              \
			json_array_append_new(sh, json_integer((json_int_t)d_[i_]));      \
			cnt *= d_[i_];                                                    \
		}                                                                         \
		if (!drop || strcmp(drop, name)) {                                        \
			json_object_set_new(hdr, name, json_pack("{s:s,s:o,s:[I,I]}", "dtype", dt, \
					    "shape", sh, "data_offsets", (json_int_t)pos,  \
					    (json_int_t)(pos + cnt)));                     \
			pos += cnt;                                                       \
		} else {                                                                  \
			json_decref(sh);                                                  \
		}                                                                         \
	} while (0)
	T("BF16", 2, "model.layers.0.mlp.router.weight", E, H);
	T("BF16", 2, "model.layers.0.mlp.router.bias", E);
	T("U8", 1, "model.layers.0.mlp.experts.gate_up_proj_blocks", E, 2 * I, H / 32, 16);
	T("U8", 1, "model.layers.0.mlp.experts.gate_up_proj_scales", E, 2 * I, H / 32);
	T("BF16", 2, "model.layers.0.mlp.experts.gate_up_proj_bias", E, 2 * I);
	T("U8", 1, "model.layers.0.mlp.experts.down_proj_blocks", E, H, I / 32, 16);
	T("U8", 1, "model.layers.0.mlp.experts.down_proj_scales", E, H, I / 32);
	T("BF16", 2, "model.layers.0.mlp.experts.down_proj_bias", E, H);
#undef T
	text = json_dumps(hdr, JSON_COMPACT);
	json_decref(hdr);
	ck_assert(asprintf(&path, "%s/model.safetensors", dir) > 0);
	f = fopen(path, "w");
	ck_assert(f != NULL);
	n = strlen(text);
	fwrite(&n, 8, 1, f);
	fwrite(text, 1, n, f);
	for (uint64_t i = 0; i < pos; i++)
		fputc((int)((i * 37) & 0x3f), f);
	fclose(f);
	free(path);
	free(text);
}

#define MXQ "{\"quant_method\": \"mxfp4\", \"modules_to_not_convert\": [\"lm_head\"]}"

static void expect_pack_fails(uint32_t I, const char *quant, const char *drop, int code, const char *want)
{
	char *dir = moe_test_tmpdir("mxbad"), *out;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_err err = { 0 };
	int r;

	write_checkpoint(dir, I, quant, drop);
	ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == code, "pack gave %d (%s), not %d", r, err.msg, code);
	ck_assert_msg(strstr(err.msg, want), "message '%s' lacks '%s'", err.msg, want);
	ck_assert(!moe_test_exists(out));
	moe_test_rm_rf(dir);
	free(out);
	free(dir);
}

START_TEST(pack_mxfp4_errors_name_the_culprit)
{
	char *dir = moe_test_tmpdir("mxgood"), *out;
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_err err = { 0 };

	/* the hand-written release packs: the cases below differ in one thing */
	write_checkpoint(dir, 32, MXQ, NULL);
	ck_assert(asprintf(&out, "%s/out.moe", dir) > 0);
	ck_assert_msg(moe_pack(dir, out, &po, &err) == 0, "%s", err.msg);
	moe_test_rm_rf(dir);
	free(out);
	free(dir);

	expect_pack_fails(32, MXQ, "model.layers.0.mlp.experts.gate_up_proj_scales", -ENOENT,
			  "tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks' in ");
	expect_pack_fails(32, MXQ, "model.layers.0.mlp.experts.down_proj_scales", -ENOENT,
			  "is MXFP4 codes but its scales 'model.layers.0.mlp.experts.down_proj_scales' "
			  "are missing");
	expect_pack_fails(32, MXQ, "model.layers.0.mlp.experts.down_proj_blocks", -ENOENT,
			  "tensor 'model.layers.0.mlp.experts.down_proj_blocks' not found");
	/* I = 40: down's K is not whole 32-value blocks */
	expect_pack_fails(40, MXQ, NULL, -EINVAL, "tensor 'model.layers.0.mlp.experts.down_proj_blocks' in ");
	expect_pack_fails(40, MXQ, NULL, -EINVAL, "(intermediate_size 40) to be a multiple of 32");
	expect_pack_fails(32, NULL, NULL, -ENOTSUP,
			  "tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks' in ");
	expect_pack_fails(32, NULL, NULL, -ENOTSUP, "is MXFP4 blocks but config.json has no "
			  "quantization_config with quant_method mxfp4");
	expect_pack_fails(32, "{\"quant_method\": \"bitsandbytes\"}", NULL, -ENOTSUP,
			  "quant_method 'bitsandbytes' is not supported (supported: fp8 with "
			  "weight_block_size [128, 128]; mxfp4");
}
END_TEST

/* The engine's config and gen-model refuse what MXFP4 cannot hold. */
START_TEST(mxfp4_shapes_and_options_refused)
{
	struct moe_model_config c = {
		.arch = MOE_ARCH_GPT_OSS, .hidden_size = 64, .num_hidden_layers = 1,
		.num_experts = 4, .top_k = 2, .moe_intermediate_size = 48, .n_group = 1,
		.topk_group = 1, .routed_scaling_factor = 1.0f, .gated = true,
		.act = MOE_ACT_SWIGLU_OAI, .swiglu_alpha = 1.702f, .swiglu_limit = 7.0f,
		.has_bias = true, .has_expert_bias = true, .weight_dtype = MOE_DTYPE_MXFP4,
		.shared_dtype = MOE_DTYPE_MXFP4, .norm_topk_prob = true,
	};
	struct moe_gen_options o;
	struct moe_err err = { 0 };
	char *dir = moe_test_tmpdir("mxgen");

	ck_assert_int_eq(moe_model_config_validate(&c, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "moe_intermediate_size 48 to be multiples of 32"), "%s", err.msg);
	c.moe_intermediate_size = 64;
	ck_assert_msg(moe_model_config_validate(&c, &err) == 0, "%s", err.msg);
	c.weight_dtype = MOE_DTYPE_FP8_E4M3_B128;      /* biases: MXFP4 yes, FP8 no */
	ck_assert_int_eq(moe_model_config_validate(&c, &err), -ENOTSUP);

	moe_test_gen_small(MOE_ARCH_MIXTRAL, MOE_DTYPE_BF16, &o);
	o.quant_mxfp4 = true;
	ck_assert_int_eq(moe_gen_model(&o, dir, NULL, NULL, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "--quant mxfp4 writes gpt-oss's release layout"), "%s", err.msg);
	moe_test_gen_small(MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, &o);
	o.quant_mxfp4 = true;
	o.hidden_size = 72;
	ck_assert_int_eq(moe_gen_model(&o, dir, NULL, NULL, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "hidden_size 72"), "%s", err.msg);
	moe_test_rm_rf(dir);
	free(dir);
}
END_TEST

static Suite *pack_mxfp4_suite(void)
{
	Suite *s = suite_create("pack-mxfp4");
	TCase *tc = tcase_create("pack-mxfp4");

	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, pack_keeps_mxfp4_bytes);
	tcase_add_test(tc, pack_dtype_decodes_mxfp4);
	tcase_add_test(tc, pack_mxfp4_errors_name_the_culprit);
	tcase_add_test(tc, mxfp4_shapes_and_options_refused);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(pack_mxfp4_suite(), "pack-mxfp4");
}
