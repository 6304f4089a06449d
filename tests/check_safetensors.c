/* SPDX-License-Identifier: MIT */
/*
 * The safetensors reader and writer (safetensors.c): round trips, damaged
 * files and headers, sharded checkpoints through their index.  The
 * checkpoints moectl gen-model writes are check_genmodel's.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "formats/safetensors.h"
#include "testutil.h"

/* ------------------------------------------------------------ helpers */

/* A file of: u64 length of @header, @header, @data_len bytes of 0xab. */
static void write_raw(const char *path, const char *header, size_t data_len)
{
	FILE *f = fopen(path, "wb");
	uint64_t n = strlen(header);
	unsigned char len[8];

	ck_assert_ptr_nonnull(f);
	for (int i = 0; i < 8; i++)
		len[i] = (unsigned char)(n >> (8 * i));
	ck_assert_uint_eq(fwrite(len, 1, 8, f), 8);
	ck_assert_uint_eq(fwrite(header, 1, n, f), n);
	for (size_t i = 0; i < data_len; i++)
		fputc(0xab, f);
	ck_assert_int_eq(fclose(f), 0);
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	ck_assert_ptr_nonnull(f);
	fputs(text, f);
	ck_assert_int_eq(fclose(f), 0);
}

/* Opening @path as one file must fail with @code and a message holding
 * every string of the NULL-terminated list. */
static void expect_file_error(const char *path, int code, ...)
{
	struct moe_st_checkpoint *c = (struct moe_st_checkpoint *)0x1;
	struct moe_err err = { 0 };
	const char *needle;
	va_list ap;
	int r;

	r = moe_st_file_open(path, &c, &err);
	ck_assert_msg(r == code, "open %s gave %d (%s), expected %d", path, r, err.msg, code);
	ck_assert_ptr_eq(c, (struct moe_st_checkpoint *)0x1);    /* untouched on failure */
	moe_test_assert_err_has(&err, path);
	va_start(ap, code);
	while ((needle = va_arg(ap, const char *)))
		moe_test_assert_err_has(&err, needle);
	va_end(ap);
}

/* Write tensors named @names[i] of F32 shape [i + 1] holding i + 0.5, in
 * declaration order, to @path. */
static void write_simple(const char *path, const char *const *names, int n)
{
	struct moe_st_writer *w;
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_st_writer_new(path, &w, &err), 0);
	for (int i = 0; i < n; i++) {
		uint64_t shape[1] = { (uint64_t)i + 1 };

		ck_assert_int_eq(moe_st_writer_declare(w, names[i], MOE_DTYPE_F32, 1, shape, &err), i);
	}
	ck_assert_int_eq(moe_st_writer_begin(w, &err), 0);
	for (int i = 0; i < n; i++)
		for (int j = 0; j <= i; j++) {
			float v = (float)i + 0.5f;

			ck_assert_int_eq(moe_st_writer_write(w, &v, sizeof(v), &err), 0);
		}
	ck_assert_msg(moe_st_writer_finish(w, &err) == 0, "%s", err.msg);
}

/* ------------------------------------------------------------ reader/writer */

START_TEST(round_trips_dtypes_shapes_and_bytes)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "model.safetensors");
	struct moe_st_checkpoint *c;
	struct moe_st_writer *w;
	struct moe_err err = { 0 };
	uint64_t s_f32[2] = { 3, 5 }, s_bf16[1] = { 7 }, s_f16[3] = { 2, 1, 3 }, s_empty[2] = { 0, 4 };
	uint64_t seed = 42;
	float f32[15];
	uint16_t bf16[7], f16[6];
	unsigned char back[64];
	const struct moe_st_tensor *t;
	uint64_t hlen = 0;
	unsigned char *file;

	for (int i = 0; i < 15; i++)
		f32[i] = (float)moe_test_randf(&seed);
	for (int i = 0; i < 7; i++)
		bf16[i] = (uint16_t)moe_test_rand(&seed);
	for (int i = 0; i < 6; i++)
		f16[i] = (uint16_t)moe_test_rand(&seed);

	ck_assert_int_eq(moe_st_writer_new(path, &w, &err), 0);
	ck_assert_int_eq(moe_st_writer_declare(w, "b.weight", MOE_DTYPE_F32, 2, s_f32, &err), 0);
	ck_assert_int_eq(moe_st_writer_declare(w, "a.bias", MOE_DTYPE_BF16, 1, s_bf16, &err), 1);
	ck_assert_int_eq(moe_st_writer_declare(w, "c.f16", MOE_DTYPE_F16, 3, s_f16, &err), 2);
	ck_assert_int_eq(moe_st_writer_declare(w, "d.empty", MOE_DTYPE_F32, 2, s_empty, &err), 3);
	ck_assert_int_eq(moe_st_writer_declare(w, "e.scalar", MOE_DTYPE_F32, 0, NULL, &err), 4);
	ck_assert_int_eq(moe_st_writer_begin(w, &err), 0);
	/* In pieces that cross tensor boundaries. */
	ck_assert_int_eq(moe_st_writer_write(w, f32, 10, &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, (char *)f32 + 10, sizeof(f32) - 10, &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, bf16, sizeof(bf16), &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, f16, sizeof(f16), &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, &f32[0], 4, &err), 0);
	ck_assert_msg(moe_st_writer_finish(w, &err) == 0, "%s", err.msg);

	/* The data starts 8-byte aligned, as the official writer pads. */
	file = (unsigned char *)moe_test_slurp(path, NULL);
	ck_assert_ptr_nonnull(file);
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | file[i];
	ck_assert_uint_eq(hlen % 8, 0);
	ck_assert_msg(strstr((char *)file + 8, "\"__metadata__\":{\"format\":\"pt\"}") != NULL,
		      "no __metadata__ in header");
	free(file);

	ck_assert_msg(moe_st_checkpoint_open(dir, &c, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(c->n_files, 1);
	ck_assert_uint_eq(c->n_tensors, 5);
	/* Sorted by name. */
	ck_assert_str_eq(c->tensors[0].name, "a.bias");
	ck_assert_str_eq(c->tensors[4].name, "e.scalar");

	t = moe_st_find(c, "b.weight");
	ck_assert_ptr_nonnull(t);
	ck_assert_int_eq(t->dtype, MOE_DTYPE_F32);
	ck_assert_str_eq(t->st_dtype, "F32");
	ck_assert_uint_eq(t->ndim, 2);
	ck_assert_uint_eq(t->shape[0], 3);
	ck_assert_uint_eq(t->shape[1], 5);
	ck_assert_uint_eq(t->nbytes, sizeof(f32));
	ck_assert_uint_eq(t->offset, 8 + hlen);
	ck_assert_int_eq(moe_st_read(c, t, 0, back, sizeof(f32), &err), 0);
	ck_assert_mem_eq(back, f32, sizeof(f32));
	ck_assert_int_eq(moe_st_read(c, t, 8, back, 12, &err), 0);
	ck_assert_mem_eq(back, (char *)f32 + 8, 12);

	t = moe_st_find(c, "a.bias");
	ck_assert_int_eq(t->dtype, MOE_DTYPE_BF16);
	ck_assert_str_eq(t->st_dtype, "BF16");
	ck_assert_uint_eq(t->shape[0], 7);
	ck_assert_int_eq(moe_st_read(c, t, 0, back, sizeof(bf16), &err), 0);
	ck_assert_mem_eq(back, bf16, sizeof(bf16));

	t = moe_st_find(c, "c.f16");
	ck_assert_int_eq(t->dtype, MOE_DTYPE_F16);
	ck_assert_uint_eq(t->ndim, 3);
	ck_assert_uint_eq(t->shape[2], 3);
	ck_assert_int_eq(moe_st_read(c, t, 0, back, sizeof(f16), &err), 0);
	ck_assert_mem_eq(back, f16, sizeof(f16));

	t = moe_st_find(c, "d.empty");
	ck_assert_uint_eq(t->nbytes, 0);
	t = moe_st_find(c, "e.scalar");
	ck_assert_uint_eq(t->ndim, 0);
	ck_assert_uint_eq(t->nbytes, 4);
	ck_assert_int_eq(moe_st_read(c, t, 0, back, 4, &err), 0);
	ck_assert_mem_eq(back, f32, 4);

	ck_assert_ptr_null(moe_st_find(c, "missing"));
	ck_assert_ptr_null(moe_st_find(c, "__metadata__"));
	moe_st_checkpoint_close(c);
	free(path);
	free(dir);
}
END_TEST

START_TEST(read_rejects_range_outside_tensor)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "x.safetensors");
	const char *names[] = { "t0", "t1" };
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	char buf[16];

	write_simple(path, names, 2);
	ck_assert_int_eq(moe_st_file_open(path, &c, &err), 0);
	ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "t1"), 4, buf, 8, &err), -EINVAL);
	moe_test_assert_err_has(&err, "'t1'");
	ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "t1"), UINT64_MAX, buf, 2, &err), -EINVAL);
	moe_st_checkpoint_close(c);
	free(path);
	free(dir);
}
END_TEST

START_TEST(read_reports_file_shrunk_after_open)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "x.safetensors");
	const char *names[] = { "t0", "t1", "t2" };
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	char buf[16];

	write_simple(path, names, 3);
	ck_assert_int_eq(moe_st_file_open(path, &c, &err), 0);
	ck_assert_int_eq(truncate(path, (off_t)moe_st_find(c, "t2")->offset + 4), 0);
	ck_assert_int_eq(moe_st_read(c, moe_st_find(c, "t2"), 0, buf, 12, &err), -EIO);
	moe_test_assert_err_has(&err, path);
	moe_test_assert_err_has(&err, "'t2'");
	moe_test_assert_err_has(&err, "short read");
	moe_st_checkpoint_close(c);
	free(path);
	free(dir);
}
END_TEST

START_TEST(writer_rejects_missing_and_extra_bytes)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "x.safetensors");
	struct moe_st_writer *w;
	struct moe_err err = { 0 };
	uint64_t shape[2] = { 2, 2 };
	float v[5] = { 0 };

	ck_assert_int_eq(moe_st_writer_new(path, &w, &err), 0);
	ck_assert_int_eq(moe_st_writer_declare(w, "first", MOE_DTYPE_F32, 2, shape, &err), 0);
	ck_assert_int_eq(moe_st_writer_declare(w, "second", MOE_DTYPE_BF16, 2, shape, &err), 1);
	ck_assert_int_eq(moe_st_writer_begin(w, &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, v, 16, &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, v, 4, &err), 0);
	ck_assert_int_eq(moe_st_writer_finish(w, &err), -EINVAL);
	moe_test_assert_err_has(&err, "'second'");
	moe_test_assert_err_has(&err, "20 of 24");
	ck_assert_int_eq(access(path, F_OK), -1);     /* an incomplete file is removed */

	ck_assert_int_eq(moe_st_writer_new(path, &w, &err), 0);
	ck_assert_int_eq(moe_st_writer_declare(w, "first", MOE_DTYPE_F32, 2, shape, &err), 0);
	ck_assert_int_eq(moe_st_writer_begin(w, &err), 0);
	ck_assert_int_eq(moe_st_writer_write(w, v, 20, &err), -EINVAL);
	moe_test_assert_err_has(&err, "past the end");
	ck_assert_int_eq(moe_st_writer_declare(w, "late", MOE_DTYPE_F32, 2, shape, &err), -EINVAL);
	moe_st_writer_abort(w);
	moe_st_writer_abort(NULL);
	ck_assert_int_eq(access(path, F_OK), -1);
	free(path);
	free(dir);
}
END_TEST

START_TEST(rejects_bad_json)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "bad.safetensors");

	write_raw(path, "{\"a\": {\"dtype\": \"F32\", ", 0);
	expect_file_error(path, -EINVAL, "not valid JSON", NULL);
	write_raw(path, "[1, 2]  ", 0);
	expect_file_error(path, -EINVAL, "not a JSON object", NULL);
	write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
		  "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
	expect_file_error(path, -EINVAL, "not valid JSON", "duplicate", NULL);
	free(path);
	free(dir);
}
END_TEST

START_TEST(rejects_header_length_beyond_file)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "short.safetensors");
	FILE *f = fopen(path, "wb");
	unsigned char len[8] = { 0xe8, 0x03, 0, 0, 0, 0, 0, 0 };   /* 1000 */

	ck_assert_ptr_nonnull(f);
	fwrite(len, 1, 8, f);
	fputs("{\"__metadata__\":{}}", f);
	fclose(f);
	expect_file_error(path, -EINVAL, "header length 1000", "runs past the end", NULL);

	/* A huge length (not a safetensors file at all) is refused before any
	 * allocation. */
	f = fopen(path, "wb");
	fwrite("GGUF\x03\0\0\0 more bytes here", 1, 23, f);
	fclose(f);
	expect_file_error(path, -EINVAL, "above the 100000000 byte limit", NULL);

	write_text(path, "abc");
	expect_file_error(path, -EINVAL, "too short", NULL);
	free(path);
	free(dir);
}
END_TEST

START_TEST(rejects_data_offsets_not_matching_shape)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "m.safetensors");

	write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "hold 12 bytes", "need 16", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[8,4]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "end before they begin", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[3,-1],\"data_offsets\":[0,4]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "shape[1]", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,2]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "9 dimensions", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,2]}}",
		  16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "overflows", NULL);
	write_raw(path, "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "'dtype'", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "'data_offsets'", NULL);
	write_raw(path, "{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 16);
	expect_file_error(path, -EINVAL, "tensor 'w'", "'shape'", NULL);
	write_raw(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
		  "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 16);
	expect_file_error(path, -EINVAL, "overlaps", NULL);
	write_raw(path, "{\"__metadata__\":[1]}", 0);
	expect_file_error(path, -EINVAL, "'__metadata__'", NULL);
	free(path);
	free(dir);
}
END_TEST

START_TEST(rejects_truncated_file)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "model-00002-of-00003.safetensors");
	const char *names[] = { "model.layers.3.mlp.experts.7.gate_proj.weight",
				"model.layers.3.mlp.experts.7.up_proj.weight" };
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	uint64_t end, size;
	char want[256];

	write_simple(path, names, 2);
	ck_assert_int_eq(moe_st_file_open(path, &c, &err), 0);
	end = moe_st_find(c, names[1])->offset + moe_st_find(c, names[1])->nbytes;
	moe_st_checkpoint_close(c);
	size = end - 3;
	ck_assert_int_eq(truncate(path, (off_t)size), 0);
	snprintf(want, sizeof(want), "model-00002-of-00003.safetensors: truncated: tensor '%s' ends at byte %"
		 PRIu64 " but the file has %" PRIu64 " bytes", names[1], end, size);
	expect_file_error(path, -EINVAL, want, NULL);
	free(path);
	free(dir);
}
END_TEST

START_TEST(keeps_unknown_dtypes_as_minus_one)
{
	char *dir = moe_test_tmpdir("st"), *path = moe_test_path_join(dir, "q.safetensors");
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	const struct moe_st_tensor *t;

	/* F8_E4M3 is a safetensors dtype moed does not serve (its size is still
	 * checked); Q4_K is not one at all (its size cannot be). */
	write_raw(path, "{\"__metadata__\":{\"format\":\"pt\"},"
		  "\"fp8\":{\"dtype\":\"F8_E4M3\",\"shape\":[2,3],\"data_offsets\":[0,6]},"
		  "\"scale\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[6,10]},"
		  "\"odd\":{\"dtype\":\"Q4_K\",\"shape\":[5],\"data_offsets\":[10,13]},"
		  "\"i64\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[13,21]}}", 21);
	ck_assert_msg(moe_st_file_open(path, &c, &err) == 0, "%s", err.msg);
	t = moe_st_find(c, "fp8");
	ck_assert_int_eq(t->dtype, -1);
	ck_assert_str_eq(t->st_dtype, "F8_E4M3");
	ck_assert_uint_eq(t->nbytes, 6);
	t = moe_st_find(c, "odd");
	ck_assert_int_eq(t->dtype, -1);
	ck_assert_str_eq(t->st_dtype, "Q4_K");
	ck_assert_uint_eq(t->nbytes, 3);
	ck_assert_int_eq(moe_st_find(c, "i64")->dtype, -1);
	ck_assert_int_eq(moe_st_find(c, "scale")->dtype, MOE_DTYPE_F32);
	moe_st_checkpoint_close(c);

	write_raw(path, "{\"fp8\":{\"dtype\":\"F8_E4M3\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 12);
	expect_file_error(path, -EINVAL, "tensor 'fp8'", "F8_E4M3", NULL);
	free(path);
	free(dir);
}
END_TEST

/* Two shards and an index, as save_pretrained writes them. */
static char *make_sharded(const char *index_text)
{
	char *dir = moe_test_tmpdir("shard"), *p;
	const char *s1[] = { "model.embed_tokens.weight", "model.layers.0.mlp.gate.weight" };
	const char *s2[] = { "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight" };

	p = moe_test_path_join(dir, "model-00001-of-00002.safetensors");
	write_simple(p, s1, 2);
	free(p);
	p = moe_test_path_join(dir, "model-00002-of-00002.safetensors");
	write_simple(p, s2, 3);
	free(p);
	p = moe_test_path_join(dir, "model.safetensors.index.json");
	write_text(p, index_text);
	free(p);
	return dir;
}

static const char index_ok[] =
	"{\"metadata\": {\"total_size\": 36}, \"weight_map\": {"
	"\"lm_head.weight\": \"model-00002-of-00002.safetensors\","
	"\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
	"\"model.layers.0.mlp.gate.weight\": \"model-00001-of-00002.safetensors\","
	"\"model.layers.1.mlp.gate.weight\": \"model-00002-of-00002.safetensors\","
	"\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}";

START_TEST(opens_sharded_checkpoint_via_index)
{
	char *dir = make_sharded(index_ok);
	struct moe_st_checkpoint *c;
	struct moe_err err = { 0 };
	const struct moe_st_tensor *t;
	float v[3];

	ck_assert_msg(moe_st_checkpoint_open(dir, &c, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(c->n_files, 2);
	ck_assert_uint_eq(c->n_tensors, 5);
	for (size_t i = 1; i < c->n_tensors; i++)
		ck_assert_int_lt(strcmp(c->tensors[i - 1].name, c->tensors[i].name), 0);
	t = moe_st_find(c, "model.norm.weight");
	ck_assert_ptr_nonnull(strstr(c->files[t->file].path, "model-00002-of-00002.safetensors"));
	ck_assert_uint_eq(t->shape[0], 3);
	ck_assert_int_eq(moe_st_read(c, t, 0, v, sizeof(v), &err), 0);
	ck_assert_float_eq(v[2], 2.5f);
	t = moe_st_find(c, "model.layers.0.mlp.gate.weight");
	ck_assert_ptr_nonnull(strstr(c->files[t->file].path, "model-00001-of-00002.safetensors"));
	ck_assert_int_eq(moe_st_read(c, t, 4, v, 4, &err), 0);
	ck_assert_float_eq(v[0], 1.5f);
	moe_st_checkpoint_close(c);
	free(dir);
}
END_TEST

static void expect_dir_error(const char *dir, int code, const char *a, const char *b, const char *c3)
{
	struct moe_st_checkpoint *c = NULL;
	struct moe_err err = { 0 };
	int r = moe_st_checkpoint_open(dir, &c, &err);

	ck_assert_msg(r == code, "open %s gave %d (%s), expected %d", dir, r, err.msg, code);
	ck_assert_ptr_null(c);
	if (a)
		moe_test_assert_err_has(&err, a);
	if (b)
		moe_test_assert_err_has(&err, b);
	if (c3)
		moe_test_assert_err_has(&err, c3);
}

START_TEST(rejects_index_naming_missing_shard)
{
	char *dir = make_sharded(
		"{\"weight_map\": {\"model.norm.weight\": \"model-00002-of-00002.safetensors\","
		"\"lm_head.weight\": \"model-00003-of-00003.safetensors\"}}");

	expect_dir_error(dir, -ENOENT, "model.safetensors.index.json", "model-00003-of-00003.safetensors",
			 "'lm_head.weight'");
	free(dir);
}
END_TEST

START_TEST(rejects_index_naming_tensor_not_in_shard)
{
	char *dir = make_sharded(
		"{\"weight_map\": {\"model.norm.weight\": \"model-00001-of-00002.safetensors\","
		"\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\","
		"\"lm_head.weight\": \"model-00002-of-00002.safetensors\"}}");

	/* model.norm.weight is in shard 2, the index says 1. */
	expect_dir_error(dir, -EINVAL, "model.safetensors.index.json", "'model.norm.weight'",
			 "model-00001-of-00002.safetensors");
	free(dir);

	dir = make_sharded(
		"{\"weight_map\": {\"model.norm.weight\": \"model-00002-of-00002.safetensors\","
		"\"model.layers.9.mlp.gate.weight\": \"model-00002-of-00002.safetensors\"}}");
	expect_dir_error(dir, -EINVAL, "model.safetensors.index.json", "'model.layers.9.mlp.gate.weight'",
			 "has no such tensor");
	free(dir);

	dir = make_sharded("{\"weight_map\": {\"model.norm.weight\": \"../../etc/passwd\"}}");
	expect_dir_error(dir, -EINVAL, "invalid shard name", "'model.norm.weight'", NULL);
	free(dir);

	dir = make_sharded("{\"metadata\": {}, \"weight_map\": {}}");
	expect_dir_error(dir, -EINVAL, "model.safetensors.index.json", "names no tensors", NULL);
	free(dir);

	dir = make_sharded("{\"weight_map\": 3}");
	expect_dir_error(dir, -EINVAL, "model.safetensors.index.json", "weight_map", NULL);
	free(dir);

	dir = make_sharded("{\"weight_map\": {\"model.norm.weight\"");
	expect_dir_error(dir, -EINVAL, "model.safetensors.index.json", "not valid JSON", NULL);
	free(dir);
}
END_TEST

START_TEST(rejects_dir_without_checkpoint_files)
{
	char *dir = moe_test_tmpdir("empty"), want[512], *missing = moe_test_path_join(dir, "nope");

	snprintf(want, sizeof(want), "%s: no model.safetensors or model.safetensors.index.json", dir);
	expect_dir_error(dir, -ENOENT, want, NULL, NULL);
	expect_dir_error(missing, -ENOENT, missing, NULL, NULL);
	free(missing);
	free(dir);
}
END_TEST

static Suite *safetensors_suite(void)
{
	Suite *s = suite_create("safetensors");
	TCase *tc = tcase_create("reader-writer");

	tcase_add_test(tc, round_trips_dtypes_shapes_and_bytes);
	tcase_add_test(tc, read_rejects_range_outside_tensor);
	tcase_add_test(tc, read_reports_file_shrunk_after_open);
	tcase_add_test(tc, writer_rejects_missing_and_extra_bytes);
	tcase_add_test(tc, rejects_bad_json);
	tcase_add_test(tc, rejects_header_length_beyond_file);
	tcase_add_test(tc, rejects_data_offsets_not_matching_shape);
	tcase_add_test(tc, rejects_truncated_file);
	tcase_add_test(tc, keeps_unknown_dtypes_as_minus_one);
	tcase_add_test(tc, opens_sharded_checkpoint_via_index);
	tcase_add_test(tc, rejects_index_naming_missing_shard);
	tcase_add_test(tc, rejects_index_naming_tensor_not_in_shard);
	tcase_add_test(tc, rejects_dir_without_checkpoint_files);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(safetensors_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
