/* SPDX-License-Identifier: MIT */
/*
 * The .moe store (store.c): a synthetic model written here round-trips,
 * huge experts are 2 MiB aligned, every kind of damage, byte by byte, is
 * refused with a message that says what, and the writer refuses an
 * incomplete store, leaves no temporary behind and lets two writers of one
 * path both finish whole.  Packing real checkpoints into stores is check_pack's.
 */
#include "config.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "formats/genmodel.h"
#include "engine/store.h"
#include "testutil.h"

/* --- a synthetic store -------------------------------------------------------- */

static void synth_config(struct moe_model_config *c)
{
	memset(c, 0, sizeof(*c));
	c->arch = MOE_ARCH_DEEPSEEK_V3;
	c->hidden_size = 64;
	c->moe_intermediate_size = 32;
	c->num_experts = 8;
	c->top_k = 2;
	c->num_hidden_layers = 5;
	c->n_group = 2;
	c->topk_group = 1;
	c->n_shared_experts = 1;
	c->shared_intermediate_size = 32;
	c->scoring = MOE_SCORING_SIGMOID;
	c->topk_method = MOE_TOPK_NOAUX_TC;
	c->norm_topk_prob = true;
	c->has_bias = true;
	c->gated = true;
	c->act = MOE_ACT_SILU;
	c->routed_scaling_factor = 2.5f;
	c->weight_dtype = MOE_DTYPE_BF16;
	c->shared_dtype = MOE_DTYPE_BF16;
}

static const uint32_t synth_layers[] = { 1, 2, 4 };
#define SYNTH_N 3

/* Deterministic content of every part, from (layer index, part, expert). */
static void fill(void *buf, uint64_t len, uint64_t seed)
{
	uint8_t *p = buf;
	uint64_t st = seed * 0x9e3779b97f4a7c15ull + 1;

	for (uint64_t i = 0; i < len; i++)
		p[i] = (uint8_t)moe_test_rand(&st);
}

static void fill_f32(float *buf, uint64_t n, uint64_t seed)
{
	uint64_t st = seed + 77;

	for (uint64_t i = 0; i < n; i++)
		buf[i] = (float)moe_test_randf(&st);
}

/* Put every part of the synthetic store into @w, its contents from @seed
 * (0: the one roundtrip_synthetic expects). */
static void put_synth(struct moe_store_writer *w, const struct moe_model_config *c, uint64_t seed)
{
	struct moe_err err = { 0 };
	uint64_t E = c->num_experts, H = c->hidden_size;
	float *router = malloc(E * H * 4), *bias = malloc(E * 4), *sg = malloc(H * 4);
	uint8_t *blob = malloc(moe_expert_bytes(c)), *shared = malloc(moe_shared_bytes(c) + 1);
	int r;

	for (uint32_t li = 0; li < SYNTH_N; li++) {
		fill_f32(router, E * H, seed + li * 1000);
		fill_f32(bias, E, seed + li * 1000 + 1);
		fill_f32(sg, H, seed + li * 1000 + 2);
		r = moe_store_writer_put_router(w, li, router, c->has_bias ? bias : NULL,
						c->shared_gate ? sg : NULL, &err);
		ck_assert_msg(r == 0, "put_router: %s", err.msg);
		if (c->shared_intermediate_size) {
			fill(shared, moe_shared_bytes(c), seed + li * 1000 + 3);
			r = moe_store_writer_put_shared(w, li, shared, &err);
			ck_assert_msg(r == 0, "put_shared: %s", err.msg);
		}
		for (uint32_t j = 0; j < E; j++) {
			fill(blob, moe_expert_bytes(c), seed + li * 1000 + 10 + j);
			r = moe_store_writer_put_expert(w, li, j, blob, &err);
			ck_assert_msg(r == 0, "put_expert: %s", err.msg);
		}
	}
	free(router);
	free(bias);
	free(sg);
	free(blob);
	free(shared);
}

static void write_synth(const char *path, const struct moe_model_config *c)
{
	struct moe_store_writer *w;
	struct moe_err err = { 0 };
	int r;

	r = moe_store_writer_open(path, c, SYNTH_N, synth_layers, "/synthetic", "bf16", &w, &err);
	ck_assert_msg(r == 0, "writer_open: %s", err.msg);
	put_synth(w, c, 0);
	r = moe_store_writer_finish(w, &err);
	ck_assert_msg(r == 0, "finish: %s", err.msg);
}

static char *synth_path(const char *tag)
{
	char *dir = moe_test_tmpdir(tag), *path;
	struct moe_model_config c;

	ck_assert(asprintf(&path, "%s/synth.moe", dir) > 0);
	free(dir);
	synth_config(&c);
	write_synth(path, &c);
	return path;
}

START_TEST(roundtrip_synthetic)
{
	struct moe_model_config c, *g;
	struct moe_store *s;
	struct moe_err err = { 0 };
	char *path = synth_path("store");
	uint64_t E, H;
	float *router, *bias, *sg, *want_f;
	uint8_t *blob, *want;
	int r;

	synth_config(&c);
	r = moe_store_open(path, &s, &err);
	ck_assert_msg(r == 0, "open: %s", err.msg);
	g = &s->cfg;
	ck_assert_int_eq(g->arch, c.arch);
	ck_assert_uint_eq(g->hidden_size, c.hidden_size);
	ck_assert_uint_eq(g->moe_intermediate_size, c.moe_intermediate_size);
	ck_assert_uint_eq(g->num_experts, c.num_experts);
	ck_assert_uint_eq(g->top_k, c.top_k);
	ck_assert_uint_eq(g->num_hidden_layers, c.num_hidden_layers);
	ck_assert_uint_eq(g->n_group, c.n_group);
	ck_assert_uint_eq(g->topk_group, c.topk_group);
	ck_assert_uint_eq(g->shared_intermediate_size, c.shared_intermediate_size);
	ck_assert_int_eq(g->scoring, c.scoring);
	ck_assert_int_eq(g->topk_method, c.topk_method);
	ck_assert(g->norm_topk_prob && g->has_bias && g->gated && !g->shared_gate);
	ck_assert(g->routed_scaling_factor == 2.5f);
	ck_assert_int_eq(g->weight_dtype, MOE_DTYPE_BF16);
	ck_assert_str_eq(s->hdr.model_type, "deepseek_v3");
	ck_assert_str_eq(s->hdr.source, "/synthetic");
	ck_assert_uint_eq(s->hdr.num_moe_layers, SYNTH_N);
	ck_assert_uint_eq(s->hdr.expert_align, 4096);
	ck_assert_uint_eq(s->hdr.expert_bytes, 3 * 64 * 32 * 2);
	ck_assert_uint_eq(s->hdr.expert_stride, 12288);

	ck_assert_int_eq(moe_store_layer_index(s, 2), 1);
	ck_assert_int_eq(moe_store_layer_index(s, 4), 2);
	ck_assert_int_eq(moe_store_layer_index(s, 0), -ENOENT);
	ck_assert_int_eq(moe_store_layer_index(s, 3), -ENOENT);

	E = c.num_experts;
	H = c.hidden_size;
	router = malloc(E * H * 4);
	bias = malloc(E * 4);
	sg = malloc(H * 4);
	want_f = malloc(E * H * 4);
	blob = moe_test_page_alloc(s->hdr.expert_stride);
	want = malloc(moe_shared_bytes(&c));
	for (uint32_t li = 0; li < SYNTH_N; li++) {
		ck_assert_uint_eq(s->layers[li].layer, synth_layers[li]);
		ck_assert_uint_eq(s->layers[li].router_offset % 4096, 0);
		ck_assert_uint_eq(s->layers[li].shared_offset % 4096, 0);
		r = moe_store_read_router(s, li, router, bias, NULL, &err);
		ck_assert_msg(r == 0, "read_router: %s", err.msg);
		fill_f32(want_f, E * H, li * 1000);
		ck_assert(memcmp(router, want_f, E * H * 4) == 0);
		fill_f32(want_f, E, li * 1000 + 1);
		ck_assert(memcmp(bias, want_f, E * 4) == 0);
		r = moe_store_read_shared(s, li, blob, &err);
		ck_assert_msg(r == 0, "read_shared: %s", err.msg);
		fill(want, moe_shared_bytes(&c), li * 1000 + 3);
		ck_assert(memcmp(blob, want, moe_shared_bytes(&c)) == 0);
		for (uint32_t j = 0; j < E; j++) {
			ck_assert_uint_eq(moe_store_expert_offset(s, li, j) % s->hdr.expert_align, 0);
			r = moe_store_read_expert(s, li, j, blob, &err);
			ck_assert_msg(r == 0, "read_expert: %s", err.msg);
			fill(want, s->hdr.expert_bytes, li * 1000 + 10 + j);
			ck_assert_msg(memcmp(blob, want, s->hdr.expert_bytes) == 0, "layer %u expert %u", li, j);
		}
	}
	/* bias not wanted: still verified, read into scratch */
	r = moe_store_read_router(s, 0, router, NULL, NULL, &err);
	ck_assert_msg(r == 0, "read_router without bias: %s", err.msg);
	ck_assert_int_eq(moe_store_verify(s, NULL, NULL, NULL, &err), 0);
	ck_assert_uint_eq(moe_store_blob_count(s), SYNTH_N * (1 + 1 + 8));
	/* out of range */
	ck_assert_int_eq(moe_store_read_expert(s, 3, 0, blob, &err), -EINVAL);
	ck_assert_int_eq(moe_store_read_expert(s, 0, 8, blob, &err), -EINVAL);
	moe_store_close(s);
	free(router);
	free(bias);
	free(sg);
	free(want_f);
	free(blob);
	free(want);
	free(path);
}
END_TEST

START_TEST(huge_experts_are_2mib_aligned)
{
	struct moe_model_config c;
	struct moe_store *s;
	struct moe_err err = { 0 };
	struct moe_store_writer *w;
	char *dir = moe_test_tmpdir("store"), *path;
	uint32_t layer = 0;
	float *router;
	uint8_t *blob;
	int r;

	synth_config(&c);
	c.arch = MOE_ARCH_MIXTRAL;
	c.scoring = MOE_SCORING_SOFTMAX;
	c.topk_method = MOE_TOPK_GREEDY;
	c.has_bias = false;
	c.n_group = c.topk_group = 1;
	c.n_shared_experts = c.shared_intermediate_size = 0;
	c.routed_scaling_factor = 1.0f;
	c.num_experts = 2;
	c.top_k = 1;
	c.hidden_size = 1024;
	c.moe_intermediate_size = 352;          /* 3*1024*352*2 = 2.06 MiB */
	ck_assert(moe_expert_bytes(&c) >= MOE_STORE_HUGE_ALIGN);
	ck_assert(asprintf(&path, "%s/huge.moe", dir) > 0);
	router = calloc(2 * 1024, 4);
	blob = calloc(1, moe_expert_bytes(&c));
	r = moe_store_writer_open(path, &c, 1, &layer, NULL, NULL, &w, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_int_eq(moe_store_writer_put_router(w, 0, router, NULL, NULL, &err), 0);
	for (uint32_t j = 0; j < 2; j++) {
		blob[0] = (uint8_t)j;
		ck_assert_int_eq(moe_store_writer_put_expert(w, 0, j, blob, &err), 0);
	}
	ck_assert_int_eq(moe_store_writer_finish(w, &err), 0);
	r = moe_store_open(path, &s, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(s->hdr.expert_align, MOE_STORE_HUGE_ALIGN);
	ck_assert_uint_eq(s->hdr.expert_stride, 2 * MOE_STORE_HUGE_ALIGN);
	ck_assert_uint_eq(s->layers[0].experts_offset % MOE_STORE_HUGE_ALIGN, 0);
	ck_assert_uint_eq(s->hdr.file_size, s->layers[0].experts_offset + 2 * s->hdr.expert_stride);
	ck_assert_int_eq(moe_store_verify(s, NULL, NULL, NULL, &err), 0);
	moe_store_close(s);
	free(router);
	free(blob);
	free(path);
	free(dir);
}
END_TEST

/* --- damage ------------------------------------------------------------------- */

static void patch(const char *path, uint64_t off, const void *bytes, size_t n)
{
	int fd = open(path, O_WRONLY);

	ck_assert(fd >= 0);
	ck_assert(pwrite(fd, bytes, n, (off_t)off) == (ssize_t)n);
	close(fd);
}

static void flip(const char *path, uint64_t off)
{
	uint8_t b;
	int fd = open(path, O_RDWR);

	ck_assert(fd >= 0);
	ck_assert(pread(fd, &b, 1, (off_t)off) == 1);
	b ^= 0x5a;
	ck_assert(pwrite(fd, &b, 1, (off_t)off) == 1);
	close(fd);
}

static struct moe_store_header read_header(const char *path)
{
	struct moe_store_header h;
	int fd = open(path, O_RDONLY);

	ck_assert(fd >= 0);
	ck_assert(pread(fd, &h, sizeof(h), 0) == (ssize_t)sizeof(h));
	close(fd);
	return h;
}

/* Rewrite the header with a fresh checksum: damage that passes it. */
static void write_header(const char *path, struct moe_store_header *h)
{
	h->header_checksum = 0;
	h->header_checksum = moe_store_checksum(h, sizeof(*h));
	patch(path, 0, h, sizeof(*h));
}

static void expect_open_fails(const char *path, int code, const char *needle)
{
	struct moe_store *s = NULL;
	struct moe_err err = { 0 };
	int r = moe_store_open(path, &s, &err);

	ck_assert_msg(r == code, "open returned %d (%s), expected %d", r, err.msg, code);
	ck_assert_ptr_null(s);
	ck_assert_msg(strstr(err.msg, needle), "message '%s' lacks '%s'", err.msg, needle);
	ck_assert_msg(strstr(err.msg, path), "message '%s' does not name the file", err.msg);
}

START_TEST(rejects_bad_magic)
{
	char *path = synth_path("store");

	patch(path, 0, "MOESTORX", 8);
	expect_open_fails(path, -EINVAL, "bad magic");
	free(path);
}
END_TEST

START_TEST(rejects_other_version)
{
	char *path = synth_path("store");
	uint32_t v = MOE_STORE_VERSION + 1;

	patch(path, 8, &v, 4);
	expect_open_fails(path, -EPROTO, "version 3, this program reads versions 1 to 2");
	v = 0;
	patch(path, 8, &v, 4);
	expect_open_fails(path, -EPROTO, "version 0, this program reads versions 1 to 2");
	free(path);
}
END_TEST

START_TEST(rejects_flipped_header_checksum)
{
	char *path = synth_path("store");

	flip(path, offsetof(struct moe_store_header, source) + 3);
	expect_open_fails(path, -EIO, "header checksum mismatch");
	free(path);
}
END_TEST

START_TEST(rejects_truncated_store)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);

	ck_assert(truncate(path, (off_t)h.file_size - 1) == 0);
	expect_open_fails(path, -EIO, "truncated store");
	ck_assert(truncate(path, 100) == 0);
	expect_open_fails(path, -EINVAL, "truncated store");
	free(path);
}
END_TEST

/* A FIFO at the store's path: refused at once, not waited on in open()
 * for a writer that never comes (issue 13, finding 4: moed opens what
 * its configuration names) */
START_TEST(rejects_a_fifo_without_waiting)
{
	char *dir = moe_test_tmpdir("store"), *path = moe_test_path_join(dir, "fifo.moe");

	ck_assert(mkfifo(path, 0600) == 0);
	expect_open_fails(path, -EINVAL, "not a regular file (a FIFO)");
	moe_test_rm_rf(dir);
	free(path);
	free(dir);
}
END_TEST

START_TEST(rejects_trailing_data)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);

	ck_assert(truncate(path, (off_t)h.file_size + 4096) == 0);
	expect_open_fails(path, -EINVAL, "trailing data");
	free(path);
}
END_TEST

START_TEST(rejects_layer_table_corruption)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);

	flip(path, h.layer_table_offset + sizeof(struct moe_store_layer) + 9);
	expect_open_fails(path, -EIO, "layer table: checksum mismatch");
	free(path);
}
END_TEST

/* A layer table whose checksum is right but whose content is not: the
 * reader must still check each offset. */
START_TEST(rejects_misaligned_layer_with_good_checksums)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);
	struct moe_store_layer t[SYNTH_N];
	int fd = open(path, O_RDONLY);

	ck_assert(pread(fd, t, sizeof(t), (off_t)h.layer_table_offset) == (ssize_t)sizeof(t));
	close(fd);
	t[1].experts_offset += 512;
	patch(path, h.layer_table_offset, t, sizeof(t));
	h.layer_table_checksum = moe_store_checksum(t, sizeof(t));
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "layer 2 experts: offset");

	/* two layers at the same bytes */
	t[1].experts_offset -= 512;
	t[2].router_offset = t[1].router_offset;
	patch(path, h.layer_table_offset, t, sizeof(t));
	h.layer_table_checksum = moe_store_checksum(t, sizeof(t));
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "overlap");

	/* layers out of order */
	t[2].router_offset = t[1].router_offset + 4096 * 100;
	t[2].layer = 1;
	patch(path, h.layer_table_offset, t, sizeof(t));
	h.layer_table_checksum = moe_store_checksum(t, sizeof(t));
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "does not follow layer");
	free(path);
}
END_TEST

START_TEST(rejects_tables_outside_file)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);

	h.expert_sums_offset = UINT64_MAX - 8;          /* offset + length overflows */
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "outside the file");
	free(path);
}
END_TEST

START_TEST(rejects_bad_model_fields)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);

	h.top_k = 9;                                    /* > 8 experts */
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "top_k 9");
	h.top_k = 2;
	h.num_hidden_layers = 4;                        /* layer 4 is not below 4 */
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "is not below num_hidden_layers");
	free(path);
}
END_TEST

/* An architecture this reader does not know is refused, not misread: how a
 * reader from before an architecture was appended (glm4_moe is 6) treats a
 * store of it, so adding one needs no store version. */
START_TEST(rejects_unknown_architecture_number)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path);
	char want[64];

	h.arch = MOE_ARCH_COUNT;
	write_header(path, &h);
	snprintf(want, sizeof(want), "unknown architecture number %u", (unsigned)MOE_ARCH_COUNT);
	expect_open_fails(path, -EINVAL, want);
	h.arch = MOE_ARCH_GLM4_MOE;                     /* known number, other model_type */
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "model_type does not match architecture glm4_moe");
	free(path);
}
END_TEST

/* gpt_oss: the header keeps has_expert_bias, swiglu_alpha and swiglu_limit
 * (taken from the reserved space), and an expert blob is its matrices, 16-byte
 * padding and 2I + H float32 biases, read back as written. */
START_TEST(gpt_oss_store_keeps_expert_biases_and_clamp)
{
	char *dir = moe_test_tmpdir("store"), *path;
	struct moe_model_config c;
	struct moe_store *s;
	struct moe_err err = { 0 };
	uint8_t *blob, *want;
	int r;

	synth_config(&c);
	c.arch = MOE_ARCH_GPT_OSS;
	c.n_group = c.topk_group = 1;
	c.n_shared_experts = c.shared_intermediate_size = 0;
	c.scoring = MOE_SCORING_SOFTMAX;
	c.topk_method = MOE_TOPK_GREEDY;
	c.routed_scaling_factor = 1.0f;
	c.act = MOE_ACT_SWIGLU_OAI;
	c.has_expert_bias = true;
	c.swiglu_alpha = 1.702f;
	c.swiglu_limit = 7.0f;
	c.hidden_size = 62;                             /* 3 x 62 x 30 x 2 = 11160: padded to 11168 */
	c.moe_intermediate_size = 30;
	ck_assert(asprintf(&path, "%s/oss.moe", dir) > 0);
	write_synth(path, &c);
	r = moe_store_open(path, &s, &err);
	ck_assert_msg(r == 0, "open: %s", err.msg);
	ck_assert_str_eq(s->hdr.model_type, "gpt_oss");
	ck_assert(s->cfg.has_expert_bias && s->cfg.has_bias && s->cfg.act == MOE_ACT_SWIGLU_OAI);
	ck_assert_msg(s->cfg.swiglu_alpha == 1.702f && s->cfg.swiglu_limit == 7.0f,
		      "alpha %g limit %g", (double)s->cfg.swiglu_alpha, (double)s->cfg.swiglu_limit);
	ck_assert_uint_eq(moe_expert_bias_offset(&s->cfg), 11168);
	ck_assert_uint_eq(s->hdr.expert_bytes, 11168 + 4 * (2 * 30 + 62));
	blob = moe_test_page_alloc(s->hdr.expert_stride);
	want = malloc(s->hdr.expert_bytes);
	r = moe_store_read_expert(s, 1, 5, blob, &err);
	ck_assert_msg(r == 0, "read_expert: %s", err.msg);
	fill(want, s->hdr.expert_bytes, 1 * 1000 + 10 + 5);
	ck_assert(memcmp(blob, want, s->hdr.expert_bytes) == 0);
	moe_store_close(s);
	free(blob);
	free(want);
	moe_test_rm_rf(dir);
	free(dir);
	free(path);
}
END_TEST

/* The gpt_oss fields mean nothing to another architecture: a store that
 * sets them elsewhere is refused, as is an activation this reader does not
 * know (how a reader from before gpt_oss treats act 4). */
START_TEST(rejects_expert_bias_or_clamp_outside_gpt_oss)
{
	char *path = synth_path("store");
	struct moe_store_header h = read_header(path), orig = h;

	h.has_expert_bias = 1;
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "outside gpt_oss");
	h = orig;
	h.act = MOE_ACT_SWIGLU_OAI;
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "outside gpt_oss");
	h = orig;
	h.act = MOE_ACT_SWIGLU_OAI + 1;
	write_header(path, &h);
	expect_open_fails(path, -EINVAL, "unknown activation");
	free(path);
}
END_TEST

/* gpt_oss with FP8 weights is not a released format and has no blob layout
 * (biases after block scales): validation, the writer and the reader refuse
 * it, naming it, instead of placing the biases at a wrong offset. */
START_TEST(rejects_expert_biases_with_fp8_weights)
{
	char *dir = moe_test_tmpdir("store"), *path;
	struct moe_model_config c;
	struct moe_store_header h;
	struct moe_store_writer *w = NULL;
	struct moe_err err = { 0 };
	int r;

	synth_config(&c);
	c.arch = MOE_ARCH_GPT_OSS;
	c.n_group = c.topk_group = 1;
	c.n_shared_experts = c.shared_intermediate_size = 0;
	c.scoring = MOE_SCORING_SOFTMAX;
	c.topk_method = MOE_TOPK_GREEDY;
	c.routed_scaling_factor = 1.0f;
	c.act = MOE_ACT_SWIGLU_OAI;
	c.has_expert_bias = true;
	c.swiglu_alpha = 1.702f;
	c.swiglu_limit = 7.0f;
	ck_assert(asprintf(&path, "%s/oss.moe", dir) > 0);
	write_synth(path, &c);

	c.weight_dtype = c.shared_dtype = MOE_DTYPE_FP8_E4M3_B128;
	r = moe_model_config_validate(&c, &err);
	ck_assert_msg(r == -ENOTSUP && strstr(err.msg, "expert biases (gpt_oss) with fp8 weights are not "
					      "supported yet"), "validate: %d %s", r, err.msg);
	memset(&err, 0, sizeof(err));
	r = moe_store_writer_open(path, &c, 1, (uint32_t[]){ 0 }, "", "fp8", &w, &err);
	ck_assert_msg(r == -ENOTSUP && !w, "writer: %d %s", r, err.msg);
	ck_assert_msg(strstr(err.msg, "with fp8 weights"), "writer: %s", err.msg);

	h = read_header(path);
	h.weight_dtype = MOE_DTYPE_FP8_E4M3_B128;
	h.shared_dtype = MOE_DTYPE_FP8_E4M3_B128;
	write_header(path, &h);
	expect_open_fails(path, -ENOTSUP, "expert biases (gpt_oss) with fp8 weights are not supported yet");
	moe_test_rm_rf(dir);
	free(dir);
	free(path);
}
END_TEST

struct bad_log {
	int n;
	char first[MOE_ERR_MSG_MAX];
};

static void on_bad(void *ctx, const char *msg)
{
	struct bad_log *b = ctx;

	if (b->n++ == 0)
		snprintf(b->first, sizeof(b->first), "%s", msg);
}

START_TEST(blob_corruption_is_caught)
{
	char *path = synth_path("store");
	struct moe_store *s;
	struct moe_err err = { 0 };
	struct bad_log log = { 0 };
	uint64_t off;
	uint8_t *blob;
	float *router;
	int r;

	r = moe_store_open(path, &s, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	off = moe_store_expert_offset(s, 1, 3) + 100;
	moe_store_close(s);
	flip(path, off);

	/* the header and tables are intact: open succeeds */
	r = moe_store_open(path, &s, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	blob = moe_test_page_alloc(s->hdr.expert_stride);
	r = moe_store_read_expert(s, 1, 3, blob, &err);
	ck_assert_int_eq(r, -EIO);
	ck_assert_msg(strstr(err.msg, "layer 2 expert 3: checksum mismatch (stored "), "%s", err.msg);
	ck_assert_int_eq(moe_store_read_expert(s, 1, 2, blob, &err), 0);
	ck_assert_int_eq(moe_store_check_expert(s, 1, 2, blob, &err), 0);
	ck_assert_int_eq(moe_store_check_expert(s, 1, 3, blob, &err), -EIO);

	/* and a router */
	flip(path, s->layers[2].router_offset + 7);
	router = malloc((uint64_t)s->cfg.num_experts * s->cfg.hidden_size * 4);
	r = moe_store_read_router(s, 2, router, NULL, NULL, &err);
	ck_assert_int_eq(r, -EIO);
	ck_assert_msg(strstr(err.msg, "layer 4 router: checksum mismatch"), "%s", err.msg);

	r = moe_store_verify(s, on_bad, NULL, &log, &err);
	ck_assert_int_eq(r, 2);
	ck_assert_int_eq(log.n, 2);
	ck_assert_msg(strstr(log.first, "layer 2 expert 3: checksum mismatch"), "%s", log.first);
	moe_store_close(s);
	free(router);
	free(blob);
	free(path);
}
END_TEST

/* Entries of @dir besides . and ..; *@hidden (may be NULL): how many are
 * a writer's temporaries of x.moe (".x.moe.XXXXXXXX"). */
static int dir_entries(const char *dir, int *hidden)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	if (hidden)
		*hidden = 0;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		n++;
		if (hidden && !strncmp(e->d_name, ".x.moe.", 7) && strlen(e->d_name) == 15)
			(*hidden)++;
	}
	closedir(d);
	return n;
}

/* Both ways the writer makes its temporary: O_TMPFILE (no name until the
 * rename) and, where a filesystem lacks it, a name of its own. */
static void set_named(int named)
{
	if (named)
		ck_assert_int_eq(setenv("MOE_OUTFILE_NAMED", "1", 1), 0);
	else
		ck_assert_int_eq(unsetenv("MOE_OUTFILE_NAMED"), 0);
}

START_TEST(writer_refuses_incomplete_store)
{
	int named = _i;
	char *dir = moe_test_tmpdir("store"), *path;
	struct moe_model_config c;
	struct moe_store_writer *w;
	struct moe_err err = { 0 };
	float *router;
	int r, hidden;

	set_named(named);
	synth_config(&c);
	ck_assert(asprintf(&path, "%s/x.moe", dir) > 0);
	router = calloc((uint64_t)c.num_experts * c.hidden_size + 64, 4);
	r = moe_store_writer_open(path, &c, SYNTH_N, synth_layers, NULL, NULL, &w, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	/* the temporary: a hidden name, or none at all */
	ck_assert_int_eq(dir_entries(dir, &hidden), named);
	ck_assert_int_eq(hidden, named);
	ck_assert_int_eq(moe_store_writer_put_router(w, 0, router, router, NULL, &err), 0);
	r = moe_store_writer_finish(w, &err);
	ck_assert_int_eq(r, -EINVAL);
	ck_assert_msg(strstr(err.msg, "layer 1: shared expert was not written"), "%s", err.msg);
	ck_assert_int_eq(dir_entries(dir, NULL), 0);

	r = moe_store_writer_open(path, &c, SYNTH_N, synth_layers, NULL, NULL, &w, &err);
	ck_assert_int_eq(r, 0);
	moe_store_writer_abort(w);
	ck_assert_int_eq(dir_entries(dir, NULL), 0);
	moe_store_writer_abort(NULL);
	moe_store_close(NULL);

	/* layers out of order */
	{
		uint32_t bad[2] = { 2, 1 };

		r = moe_store_writer_open(path, &c, 2, bad, NULL, NULL, &w, &err);
		ck_assert_int_eq(r, -EINVAL);
	}
	/* a directory that is not there: named in the message */
	free(path);
	ck_assert(asprintf(&path, "%s/no/x.moe", dir) > 0);
	r = moe_store_writer_open(path, &c, SYNTH_N, synth_layers, NULL, NULL, &w, &err);
	ck_assert_int_eq(r, -ENOENT);
	ck_assert_msg(strstr(err.msg, "cannot open its directory") && strstr(err.msg, "/no"), "%s", err.msg);
	set_named(0);
	free(router);
	free(path);
	free(dir);
}
END_TEST

/* Whether @path opens and every checksum in it holds; its source into @source. */
static bool store_whole(const char *path, char *source, size_t len)
{
	struct moe_store *s;
	struct moe_err err = { 0 };
	int bad;

	if (moe_store_open(path, &s, &err) < 0) {
		fprintf(stderr, "%s\n", err.msg);
		return false;
	}
	bad = moe_store_verify(s, NULL, NULL, NULL, &err);
	snprintf(source, len, "%s", s->hdr.source);
	moe_store_close(s);
	return bad == 0;
}

/*
 * Two writers of one path at once (two packs to one output): each has a
 * temporary of its own, so both succeed and the store at the path is
 * always one of them whole, the last renamed.  A file named like the old
 * fixed temporary (x.moe.tmp) is somebody else's and stays as it was.
 */
START_TEST(two_writers_of_one_path)
{
	int named = _i;
	char *dir = moe_test_tmpdir("store"), *path, *other, *got;
	struct moe_model_config c;
	struct moe_store_writer *w1, *w2;
	struct moe_err err = { 0 };
	char source[64];
	uint64_t len;
	int r, hidden;

	set_named(named);
	synth_config(&c);
	ck_assert(asprintf(&path, "%s/x.moe", dir) > 0);
	ck_assert(asprintf(&other, "%s/x.moe.tmp", dir) > 0);
	ck_assert(moe_test_sh(NULL, "printf 'not a store' > '%s'", other) == 0);

	r = moe_store_writer_open(path, &c, SYNTH_N, synth_layers, "/one", "bf16", &w1, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	r = moe_store_writer_open(path, &c, SYNTH_N, synth_layers, "/two", "bf16", &w2, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_int_eq(dir_entries(dir, &hidden), 1 + 2 * named);
	ck_assert_int_eq(hidden, 2 * named);
	put_synth(w1, &c, 0);
	put_synth(w2, &c, 7);

	r = moe_store_writer_finish(w1, &err);
	ck_assert_msg(r == 0, "first writer: %s", err.msg);
	ck_assert(store_whole(path, source, sizeof(source)));
	ck_assert_str_eq(source, "/one");
	r = moe_store_writer_finish(w2, &err);
	ck_assert_msg(r == 0, "second writer: %s", err.msg);
	ck_assert(store_whole(path, source, sizeof(source)));
	ck_assert_str_eq(source, "/two");

	/* the store and the bystander, no temporary */
	ck_assert_int_eq(dir_entries(dir, &hidden), 2);
	ck_assert_int_eq(hidden, 0);
	got = moe_test_slurp(other, &len);
	ck_assert_ptr_nonnull(got);
	ck_assert_uint_eq(len, 11);
	ck_assert_int_eq(memcmp(got, "not a store", 11), 0);
	set_named(0);
	free(got);
	free(other);
	free(path);
	free(dir);
}
END_TEST

static Suite *store_suite(void)
{
	Suite *s = suite_create("store");
	TCase *tc = tcase_create("store");

	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, roundtrip_synthetic);
	tcase_add_test(tc, huge_experts_are_2mib_aligned);
	tcase_add_test(tc, rejects_bad_magic);
	tcase_add_test(tc, rejects_other_version);
	tcase_add_test(tc, rejects_flipped_header_checksum);
	tcase_add_test(tc, rejects_truncated_store);
	tcase_add_test(tc, rejects_trailing_data);
	tcase_add_test(tc, rejects_a_fifo_without_waiting);
	tcase_add_test(tc, rejects_layer_table_corruption);
	tcase_add_test(tc, rejects_misaligned_layer_with_good_checksums);
	tcase_add_test(tc, rejects_tables_outside_file);
	tcase_add_test(tc, rejects_bad_model_fields);
	tcase_add_test(tc, rejects_unknown_architecture_number);
	tcase_add_test(tc, gpt_oss_store_keeps_expert_biases_and_clamp);
	tcase_add_test(tc, rejects_expert_bias_or_clamp_outside_gpt_oss);
	tcase_add_test(tc, rejects_expert_biases_with_fp8_weights);
	tcase_add_test(tc, blob_corruption_is_caught);
	tcase_add_loop_test(tc, writer_refuses_incomplete_store, 0, 2);
	tcase_add_loop_test(tc, two_writers_of_one_path, 0, 2);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(store_suite(), "store");
}
