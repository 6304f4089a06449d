/* SPDX-License-Identifier: MIT */
/*
 * .npy reading and writing, and .npz archives re-parsed byte by byte
 * (local headers, central directory, end record, CRC-32).
 */
#include "config.h"

#include <check.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "formats/npy.h"
#include "testutil.h"

static char *dir;

static void setup(void)
{
	dir = moe_test_tmpdir("npy");
}

static void teardown(void)
{
	moe_test_rm_rf(dir);
	free(dir);
	dir = NULL;
}

static char *tpath(const char *name)
{
	char *p;

	ck_assert_int_ge(asprintf(&p, "%s/%s", dir, name), 0);
	return p;
}

/*
 * Write a raw .npy of format @major with header dict @dict (padded to 64 as
 * numpy does unless @pad is false) followed by @data_len bytes of @data.
 */
static void write_raw(const char *path, int major, const char *dict, bool pad,
		      const void *data, size_t data_len)
{
	size_t pre = major == 1 ? 10 : 12, n = strlen(dict), total = pre + n + 1, hl;
	unsigned char head[12] = { 0x93, 'N', 'U', 'M', 'P', 'Y', (unsigned char)major, 0 };
	FILE *f = fopen(path, "wb");

	ck_assert_ptr_nonnull(f);
	if (pad)
		total += (64 - total % 64) % 64;
	hl = total - pre;
	head[8] = (unsigned char)hl;
	head[9] = (unsigned char)(hl >> 8);
	head[10] = (unsigned char)(hl >> 16);
	head[11] = (unsigned char)(hl >> 24);
	ck_assert_uint_eq(fwrite(head, 1, pre, f), pre);
	ck_assert_uint_eq(fwrite(dict, 1, n, f), n);
	for (size_t i = pre + n; i < total - 1; i++)
		fputc(' ', f);
	fputc('\n', f);
	if (data_len)
		ck_assert_uint_eq(fwrite(data, 1, data_len, f), data_len);
	ck_assert_int_eq(fclose(f), 0);
}

/* Read @path expecting failure @code and a message containing @needle. */
static void expect_reject(const char *path, int code, const char *needle)
{
	struct moe_npy a = { 0 };
	struct moe_err err = { 0 };
	int r = moe_npy_read(path, &a, &err);

	ck_assert_msg(r == code, "%s: expected %d, got %d (%s)", path, code, r, err.msg);
	ck_assert_msg(strstr(err.msg, needle), "message '%s' lacks '%s'", err.msg, needle);
	ck_assert_msg(strstr(err.msg, path), "message '%s' does not name the file", err.msg);
	ck_assert_ptr_null(a.data);
}

/* ---- round trips -------------------------------------------------------------- */

static const enum moe_npy_type types[] = { MOE_NPY_F32, MOE_NPY_BF16, MOE_NPY_I32 };
static const uint64_t shapes[3][3] = { { 7 }, { 3, 5 }, { 2, 3, 4 } };

/* loop index: type * 3 + (ndim - 1) */
START_TEST(round_trips_every_type_and_rank)
{
	enum moe_npy_type t = types[_i / 3];
	uint32_t ndim = (uint32_t)(_i % 3) + 1;
	const uint64_t *shape = shapes[ndim - 1];
	uint64_t count = 1, state = 42 + (uint64_t)_i;
	size_t es = moe_npy_type_size(t);
	struct moe_err err = { 0 };
	struct moe_npy a = { 0 };
	char *p = tpath("rt.npy");
	unsigned char *data;
	uint64_t len;
	char *raw;

	for (uint32_t d = 0; d < ndim; d++)
		count *= shape[d];
	data = malloc(count * es);
	for (uint64_t k = 0; k < count * es; k++)
		data[k] = (unsigned char)moe_test_rand(&state);
	ck_assert_int_eq(moe_npy_write(p, t, ndim, shape, data, &err), 0);

	/* numpy's layout: v1.0, data on a 64-byte boundary, header ends in '\n' */
	raw = moe_test_slurp(p, &len);
	ck_assert_ptr_nonnull(raw);
	ck_assert_int_eq(memcmp(raw, "\x93NUMPY\x01\x00", 8), 0);
	{
		size_t hl = (unsigned char)raw[8] | (size_t)(unsigned char)raw[9] << 8;

		ck_assert_uint_eq((10 + hl) % 64, 0);
		ck_assert_int_eq(raw[10 + hl - 1], '\n');
		ck_assert_uint_eq(len, 10 + hl + count * es);
		ck_assert_msg(strstr(raw + 10, moe_npy_type_descr(t)), "descr missing in %.*s",
			      (int)hl, raw + 10);
		ck_assert_int_eq(memcmp(raw + 10 + hl, data, count * es), 0);
	}
	free(raw);
	/* renamed, no temporary (".rt.npy.XXXXXXXX") left behind */
	ck_assert_int_eq(moe_test_sh(NULL, "ls -A '%s' | grep -q '^\\.rt\\.npy\\.'", dir), 1);

	ck_assert_int_eq(moe_npy_read(p, &a, &err), 0);
	ck_assert_int_eq(a.type, t);
	ck_assert_uint_eq(a.ndim, ndim);
	for (uint32_t d = 0; d < ndim; d++)
		ck_assert_uint_eq(a.shape[d], shape[d]);
	ck_assert_uint_eq(a.count, count);
	ck_assert_int_eq(memcmp(a.data, data, count * es), 0);
	moe_npy_free(&a);
	moe_npy_free(&a);   /* twice is harmless */
	free(data);
	free(p);
}
END_TEST

START_TEST(writes_numpy_header_text)
{
	static const char want[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
	static const char want1[] = "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }";
	float x[12] = { 0 };
	int32_t y[5] = { 0 };
	uint64_t s2[2] = { 3, 4 }, s1[1] = { 5 }, len;
	struct moe_err err = { 0 };
	char *p = tpath("h.npy"), *raw;

	ck_assert_int_eq(moe_npy_write(p, MOE_NPY_F32, 2, s2, x, &err), 0);
	raw = moe_test_slurp(p, &len);
	ck_assert_int_eq(memcmp(raw + 10, want, sizeof(want) - 1), 0);
	ck_assert_uint_eq(len, 128 + sizeof(x));   /* 69 header bytes pad to 128 */
	free(raw);
	ck_assert_int_eq(moe_npy_write(p, MOE_NPY_I32, 1, s1, y, &err), 0);
	raw = moe_test_slurp(p, &len);
	ck_assert_int_eq(memcmp(raw + 10, want1, sizeof(want1) - 1), 0);
	free(raw);
	free(p);
}
END_TEST

START_TEST(round_trips_scalar_and_empty)
{
	struct moe_err err = { 0 };
	struct moe_npy a = { 0 };
	float v = 2.5f;
	uint64_t s[2] = { 0, 16 };
	char *p = tpath("s.npy");

	ck_assert_int_eq(moe_npy_write(p, MOE_NPY_F32, 0, NULL, &v, &err), 0);
	ck_assert_int_eq(moe_npy_read(p, &a, &err), 0);
	ck_assert_uint_eq(a.ndim, 0);
	ck_assert_uint_eq(a.count, 1);
	ck_assert_float_eq(*(float *)a.data, 2.5f);
	moe_npy_free(&a);

	ck_assert_int_eq(moe_npy_write(p, MOE_NPY_F32, 2, s, NULL, &err), 0);
	ck_assert_int_eq(moe_npy_read(p, &a, &err), 0);
	ck_assert_uint_eq(a.ndim, 2);
	ck_assert_uint_eq(a.count, 0);
	moe_npy_free(&a);
	free(p);
}
END_TEST

/* ---- headers other writers produce --------------------------------------------- */

START_TEST(reads_v2_and_v3_headers)
{
	float x[6] = { 1, 2, 3, 4, 5, 6 };
	struct moe_err err = { 0 };
	struct moe_npy a = { 0 };
	char *p = tpath("v2.npy");

	for (int major = 2; major <= 3; major++) {
		write_raw(p, major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
			  true, x, sizeof(x));
		ck_assert_msg(moe_npy_read(p, &a, &err) == 0, "v%d: %s", major, err.msg);
		ck_assert_uint_eq(a.ndim, 2);
		ck_assert_uint_eq(a.shape[0], 2);
		ck_assert_uint_eq(a.shape[1], 3);
		ck_assert_float_eq(((float *)a.data)[5], 6.0f);
		moe_npy_free(&a);
	}
	free(p);
}
END_TEST

static const struct {
	const char *dict;
	enum moe_npy_type type;
} variants[] = {
	{ "{'descr': '=f4', 'fortran_order': False, 'shape': (4,), }", MOE_NPY_F32 },
	{ "{'descr': 'f4', 'fortran_order': False, 'shape': (4,)}", MOE_NPY_F32 },
	{ "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (4,)}", MOE_NPY_F32 },
	{ "{'shape': (4,), 'fortran_order': False, 'descr': '<f4'}", MOE_NPY_F32 },
	{ "{'descr':'<f4','fortran_order':False,'shape':(4L,)}", MOE_NPY_F32 },
	{ "{'descr': '<u2', 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': '|V2', 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': '<V2', 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': 'bfloat16', 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': '<bf16', 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': [('', '<V2')], 'fortran_order': False, 'shape': (8,), }", MOE_NPY_BF16 },
	{ "{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }", MOE_NPY_I32 },
};

START_TEST(accepts_descr_variants)
{
	unsigned char data[16] = { 0 };
	struct moe_err err = { 0 };
	struct moe_npy a = { 0 };
	char *p = tpath("var.npy");

	write_raw(p, 1, variants[_i].dict, _i % 2 == 0, data, sizeof(data));
	ck_assert_msg(moe_npy_read(p, &a, &err) == 0, "%s: %s", variants[_i].dict, err.msg);
	ck_assert_int_eq(a.type, variants[_i].type);
	ck_assert_uint_eq(a.count * moe_npy_type_size(a.type), sizeof(data));
	moe_npy_free(&a);
	free(p);
}
END_TEST

/* ---- rejections ------------------------------------------------------------------ */

START_TEST(rejects_bad_magic)
{
	char *p = tpath("bad.npy");
	FILE *f = fopen(p, "wb");

	fputs("PK\x03\x04 this is a zip, not an npy file", f);
	fclose(f);
	expect_reject(p, -EINVAL, "not an .npy file");
	free(p);
}
END_TEST

START_TEST(rejects_float64_naming_the_dtype)
{
	double x[2] = { 0 };
	char *p = tpath("f8.npy");

	write_raw(p, 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", true, x,
		  sizeof(x));
	expect_reject(p, -ENOTSUP,
		      "dtype '<f8' is not supported: use float32 ('<f4') or bfloat16 (--dtype bf16)");
	free(p);
}
END_TEST

START_TEST(rejects_big_endian)
{
	float x[2] = { 0 };
	char *p = tpath("be.npy");

	write_raw(p, 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", true, x,
		  sizeof(x));
	expect_reject(p, -ENOTSUP, "'>f4' is big-endian");
	free(p);
}
END_TEST

START_TEST(rejects_fortran_order)
{
	float x[6] = { 0 };
	char *p = tpath("fo.npy");

	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", true, x,
		  sizeof(x));
	expect_reject(p, -ENOTSUP, "Fortran-order");
	free(p);
}
END_TEST

START_TEST(rejects_truncated_data_with_sizes)
{
	float x[5] = { 0 };
	char *p = tpath("tr.npy");

	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", true, x,
		  sizeof(x));
	expect_reject(p, -EINVAL, "truncated: the shape needs 24 data bytes, the file has 20");
	free(p);
}
END_TEST

START_TEST(rejects_trailing_bytes)
{
	float x[7] = { 0 };
	char *p = tpath("tb.npy");

	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", true, x,
		  sizeof(x));
	expect_reject(p, -EINVAL, "4 bytes after the data");
	free(p);
}
END_TEST

START_TEST(rejects_truncated_header)
{
	char *p = tpath("th.npy");
	FILE *f = fopen(p, "wb");

	fwrite("\x93NUMPY\x01\x00\x76\x00{'descr': '<f4'", 1, 25, f);
	fclose(f);
	expect_reject(p, -EINVAL, "truncated .npy header");
	free(p);
}
END_TEST

START_TEST(rejects_absurd_shapes)
{
	char *p = tpath("abs.npy");

	/* the product overflows 64 bits */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
		  true, NULL, 0);
	expect_reject(p, -EOVERFLOW, "overflows");
	/* the product times the element size does */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }",
		  true, NULL, 0);
	expect_reject(p, -EOVERFLOW, "too large");
	/* a dimension that does not fit 64 bits */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
		  true, NULL, 0);
	expect_reject(p, -EOVERFLOW, "too large");
	/* large but representable: caught as truncated before any allocation */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1024), }",
		  true, NULL, 0);
	expect_reject(p, -EINVAL, "truncated: the shape needs 4503599627370496 data bytes, the file has 0");
	/* more than 8 dimensions */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }",
		  true, "abcd", 4);
	expect_reject(p, -EINVAL, "more than 8 dimensions");
	/* negative */
	write_raw(p, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", true, NULL, 0);
	expect_reject(p, -EINVAL, "non-negative integers");
	free(p);
}
END_TEST

static const struct {
	const char *dict;
	const char *needle;
} bad_headers[] = {
	{ "{'descr': '<f4', 'shape': (2,), }", "no 'fortran_order' key" },
	{ "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1}", "unexpected key 'extra'" },
	{ "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "repeated key 'descr'" },
	{ "{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}", "must be True or False" },
	{ "{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", "expected '('" },
	{ "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} junk", "junk after the dict" },
	{ "['descr', '<f4']", "expected '{'" },
	{ "{'descr': '<f4\\n', 'fortran_order': False, 'shape': (2,)}", "unexpected character" },
	{ "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}", "expected ',' or ')'" },
	{ "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (2,)}", "not supported" },
	{ "{'descr': 'O', 'fortran_order': False, 'shape': (2,)}", "dtype 'O' is not supported" },
};

START_TEST(rejects_malformed_headers)
{
	float x[2] = { 0 };
	char *p = tpath("mh.npy");
	struct moe_npy a = { 0 };
	struct moe_err err = { 0 };

	write_raw(p, 1, bad_headers[_i].dict, true, x, sizeof(x));
	ck_assert_int_lt(moe_npy_read(p, &a, &err), 0);
	ck_assert_msg(strstr(err.msg, bad_headers[_i].needle), "%s: message '%s' lacks '%s'",
		      bad_headers[_i].dict, err.msg, bad_headers[_i].needle);
	ck_assert_ptr_null(a.data);
	free(p);
}
END_TEST

START_TEST(rejects_unknown_version_and_missing_file)
{
	float x[2] = { 0 };
	char *p = tpath("v4.npy");

	write_raw(p, 2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", true, x,
		  sizeof(x));
	{
		/* patch the major version to 4 */
		FILE *f = fopen(p, "r+b");

		fseek(f, 6, SEEK_SET);
		fputc(4, f);
		fclose(f);
	}
	expect_reject(p, -ENOTSUP, "version 4.0 is not supported");
	free(p);
	p = tpath("missing.npy");
	expect_reject(p, -ENOENT, "No such file");
	free(p);
}
END_TEST

START_TEST(write_failure_names_the_file)
{
	struct moe_err err = { 0 };
	uint64_t s[1] = { 1 };
	float v = 0;
	char *p = tpath("no/such/dir/out.npy");

	ck_assert_int_eq(moe_npy_write(p, MOE_NPY_F32, 1, s, &v, &err), -ENOENT);
	ck_assert_msg(strstr(err.msg, p), "message '%s' does not name the file", err.msg);
	free(p);
}
END_TEST

/* ---- .npz ------------------------------------------------------------------------ */

static uint32_t rd16(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

START_TEST(npz_reparses_with_matching_crcs_and_offsets)
{
	enum { T = 5, K = 3 };
	int32_t ids[T * K];
	float w[T * K];
	struct moe_npz_entry ent[2] = {
		{ .name = "ids", .type = MOE_NPY_I32, .ndim = 2, .shape = { T, K }, .data = ids },
		{ .name = "weights", .type = MOE_NPY_F32, .ndim = 2, .shape = { T, K }, .data = w },
	};
	const char *names[2] = { "ids.npy", "weights.npy" };
	uint32_t local_off[2];
	struct moe_err err = { 0 };
	char *p = tpath("r.npz");
	const unsigned char *z, *end, *cd;
	uint64_t len, off = 0;
	char *raw;

	for (int i = 0; i < T * K; i++) {
		ids[i] = i * 7 % 64;
		w[i] = (float)i / 16.0f;
	}
	ck_assert_int_eq(moe_npz_write(p, ent, 2, &err), 0);
	raw = moe_test_slurp(p, &len);
	ck_assert_ptr_nonnull(raw);
	z = (const unsigned char *)raw;

	for (int i = 0; i < 2; i++) {
		const unsigned char *lh = z + off;
		uint32_t nl, csize, usize, crc;
		struct moe_npy a = { 0 };
		char *member;
		FILE *f;

		ck_assert_uint_le(off + 30, len);
		ck_assert_uint_eq(rd32(lh), 0x04034b50u);
		ck_assert_uint_eq(rd16(lh + 4), 20);     /* version needed */
		ck_assert_uint_eq(rd16(lh + 6), 0);      /* flags */
		ck_assert_uint_eq(rd16(lh + 8), 0);      /* stored */
		crc = rd32(lh + 14);
		csize = rd32(lh + 18);
		usize = rd32(lh + 22);
		nl = rd16(lh + 26);
		ck_assert_uint_eq(csize, usize);
		ck_assert_uint_eq(rd16(lh + 28), 0);     /* no extra field */
		ck_assert_uint_eq(nl, strlen(names[i]));
		ck_assert_int_eq(memcmp(lh + 30, names[i], nl), 0);
		ck_assert_uint_le(off + 30 + nl + csize, len);
		ck_assert_uint_eq(crc, (uint32_t)crc32(0, lh + 30 + nl, csize));
		local_off[i] = (uint32_t)off;

		/* the member is a valid .npy with the same contents */
		member = tpath("member.npy");
		f = fopen(member, "wb");
		fwrite(lh + 30 + nl, 1, csize, f);
		fclose(f);
		ck_assert_msg(moe_npy_read(member, &a, &err) == 0, "%s", err.msg);
		ck_assert_int_eq(a.type, ent[i].type);
		ck_assert_uint_eq(a.ndim, 2);
		ck_assert_uint_eq(a.shape[0], T);
		ck_assert_uint_eq(a.shape[1], K);
		ck_assert_int_eq(memcmp(a.data, ent[i].data, sizeof(ids)), 0);
		moe_npy_free(&a);
		free(member);
		off += 30 + nl + csize;
	}

	/* end of central directory record: the last 22 bytes (no comment) */
	ck_assert_uint_ge(len, off + 22);
	end = z + len - 22;
	ck_assert_uint_eq(rd32(end), 0x06054b50u);
	ck_assert_uint_eq(rd16(end + 4), 0);
	ck_assert_uint_eq(rd16(end + 6), 0);
	ck_assert_uint_eq(rd16(end + 8), 2);
	ck_assert_uint_eq(rd16(end + 10), 2);
	ck_assert_uint_eq(rd32(end + 16), off);                 /* directory right after the data */
	ck_assert_uint_eq(rd32(end + 12), len - 22 - off);      /* and fills the rest */
	ck_assert_uint_eq(rd16(end + 20), 0);

	cd = z + off;
	for (int i = 0; i < 2; i++) {
		const unsigned char *lh = z + local_off[i];
		uint32_t nl = rd16(cd + 28);

		ck_assert_uint_eq(rd32(cd), 0x02014b50u);
		ck_assert_uint_eq(rd16(cd + 6), 20);
		/* fields shared with the local header agree */
		ck_assert_int_eq(memcmp(cd + 6, lh + 4, 26), 0);
		ck_assert_uint_eq(rd16(cd + 30), 0);    /* extra */
		ck_assert_uint_eq(rd16(cd + 32), 0);    /* comment */
		ck_assert_uint_eq(rd16(cd + 34), 0);    /* disk */
		ck_assert_uint_eq(rd32(cd + 42), local_off[i]);
		ck_assert_int_eq(memcmp(cd + 46, names[i], nl), 0);
		cd += 46 + nl;
	}
	ck_assert_ptr_eq(cd, end);
	free(raw);

	/* a second opinion when Info-ZIP is installed */
	if (system("command -v unzip >/dev/null 2>&1") == 0) {
		char *log = tpath("unzip.log");

		ck_assert_msg(moe_test_sh(log, "unzip -t '%s'", p) == 0, "unzip -t failed: %s",
			      moe_test_slurp(log, NULL));
		free(log);
	}
	free(p);
}
END_TEST

START_TEST(npz_rejects_bad_names_without_writing)
{
	float v = 1;
	struct moe_npz_entry ent = { .name = "a/b", .type = MOE_NPY_F32, .ndim = 1, .shape = { 1 }, .data = &v };
	struct moe_err err = { 0 };
	char *p = tpath("bad.npz");

	ck_assert_int_eq(moe_npz_write(p, &ent, 1, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "invalid array name 'a/b'"), "%s", err.msg);
	ck_assert_int_ne(access(p, F_OK), 0);
	free(p);
}
END_TEST

static Suite *npy_suite(void)
{
	Suite *s = suite_create("npy");
	TCase *tc = tcase_create("npy");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_loop_test(tc, round_trips_every_type_and_rank, 0, 9);
	tcase_add_test(tc, writes_numpy_header_text);
	tcase_add_test(tc, round_trips_scalar_and_empty);
	tcase_add_test(tc, reads_v2_and_v3_headers);
	tcase_add_loop_test(tc, accepts_descr_variants, 0,
			    (int)(sizeof(variants) / sizeof(variants[0])));
	tcase_add_test(tc, rejects_bad_magic);
	tcase_add_test(tc, rejects_float64_naming_the_dtype);
	tcase_add_test(tc, rejects_big_endian);
	tcase_add_test(tc, rejects_fortran_order);
	tcase_add_test(tc, rejects_truncated_data_with_sizes);
	tcase_add_test(tc, rejects_trailing_bytes);
	tcase_add_test(tc, rejects_truncated_header);
	tcase_add_test(tc, rejects_absurd_shapes);
	tcase_add_loop_test(tc, rejects_malformed_headers, 0,
			    (int)(sizeof(bad_headers) / sizeof(bad_headers[0])));
	tcase_add_test(tc, rejects_unknown_version_and_missing_file);
	tcase_add_test(tc, write_failure_names_the_file);
	suite_add_tcase(s, tc);

	tc = tcase_create("npz");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, npz_reparses_with_matching_crcs_and_offsets);
	tcase_add_test(tc, npz_rejects_bad_names_without_writing);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(npy_suite(), "npy");
}
