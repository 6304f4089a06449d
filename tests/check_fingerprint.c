/* SPDX-License-Identifier: MIT */
/*
 * Checkpoint fingerprints (moe_checkpoint_fingerprint(3),
 * moe_client_fingerprint(3)): what changes them and what does not, the
 * errors, the value against the stream of moe-store(5) built here from the
 * files and hashed with XXH3-128 directly, the store's field under the
 * header checksum, and a real moed reporting what pack recorded, or
 * -ENODATA for a store that records none.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "e2eutil.h"
#include "engine/store.h"
#include "formats/pack.h"

#define BIG_DATA ((3u << 20) + 123u)   /* sampled: over 1 MiB, not a multiple of 4 KiB */
#define SMALL_DATA 5000u               /* hashed whole */
#define SAMPLE 4096u

/* ------------------------------------------------------------------ a checkpoint by hand */

static void write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	ck_assert_msg(fd >= 0, "cannot create %s: %s", path, strerror(errno));
	ck_assert_msg(write(fd, buf, len) == (ssize_t)len, "cannot write %s", path);
	close(fd);
}

/* A safetensors file of one U8 tensor of @data bytes: its header JSON
 * padded with spaces to 8 bytes, as the format's writers do. */
static void write_st(const char *dir, const char *name, uint64_t data, uint64_t seed)
{
	char json[256], *path = moe_test_path_join(dir, name);
	size_t jl;
	unsigned char *buf;
	uint64_t rng = seed;

	jl = (size_t)snprintf(json, sizeof(json), "{\"w\":{\"dtype\":\"U8\",\"shape\":[%" PRIu64
			      "],\"data_offsets\":[0,%" PRIu64 "]}}", data, data);
	while (jl % 8)
		json[jl++] = ' ';
	buf = malloc(8 + jl + data);
	ck_assert(buf);
	for (int i = 0; i < 8; i++)
		buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
	memcpy(buf + 8, json, jl);
	for (uint64_t i = 0; i < data; i++)
		buf[8 + jl + i] = (unsigned char)moe_test_rand(&rng);
	write_file(path, buf, 8 + jl + data);
	free(buf);
	free(path);
}

/* config.json, a sampled shard, a small shard, and files that do not count */
static char *make_ckpt(const char *tag)
{
	static const char cfg[] = "{\n  \"model_type\": \"mixtral\",\n  \"hidden_size\": 64\n}\n";
	char *dir = moe_test_tmpdir(tag), *p;

	p = moe_test_path_join(dir, "config.json");
	write_file(p, cfg, strlen(cfg));
	free(p);
	write_st(dir, "model-00001-of-00002.safetensors", BIG_DATA, 1);
	write_st(dir, "model-00002-of-00002.safetensors", SMALL_DATA, 2);
	p = moe_test_path_join(dir, "tokenizer.json");
	write_file(p, "{}", 2);
	free(p);
	return dir;
}

static void fp_ok(const char *dir, char out[MOE_FINGERPRINT_LEN])
{
	int rc = moe_checkpoint_fingerprint(dir, out);

	ck_assert_msg(rc == 0, "moe_checkpoint_fingerprint(%s): %d %s", dir, rc, moe_strerror(rc));
	ck_assert_msg(strlen(out) == 32 && strspn(out, "0123456789abcdef") == 32,
		      "not 32 lowercase hex digits: '%s'", out);
}

/* Flip one byte of @dir/@name at @off (again: flip it back). */
static void flip(const char *dir, const char *name, uint64_t off)
{
	char *path = moe_test_path_join(dir, name);
	unsigned char b;
	int fd = open(path, O_RDWR | O_CLOEXEC);

	ck_assert_msg(fd >= 0, "cannot open %s", path);
	ck_assert(pread(fd, &b, 1, (off_t)off) == 1);
	b ^= 0x5a;
	ck_assert(pwrite(fd, &b, 1, (off_t)off) == 1);
	close(fd);
	free(path);
}

/* The header length of a safetensors file of ours. */
static uint64_t st_hlen(const char *dir, const char *name)
{
	char *path = moe_test_path_join(dir, name);
	uint64_t len = 0, h = 0;
	char *buf = moe_test_slurp(path, &len);

	ck_assert(buf && len >= 8);
	for (int i = 0; i < 8; i++)
		h |= (uint64_t)(unsigned char)buf[i] << (8 * i);
	free(buf);
	free(path);
	return h;
}

/* Sample @i of a data region of @D bytes, as moe-store(5) defines it. */
static uint64_t sample_off(uint64_t i, uint64_t D)
{
	return i * (D - SAMPLE) / 255;
}

/* ------------------------------------------------------------------ what changes it */

START_TEST(same_bytes_in_another_directory_give_the_same_fingerprint)
{
	char *a = make_ckpt("fp-a"), *b = make_ckpt("fp-b");
	char fa[MOE_FINGERPRINT_LEN], fb[MOE_FINGERPRINT_LEN], again[MOE_FINGERPRINT_LEN];

	fp_ok(a, fa);
	fp_ok(b, fb);
	ck_assert_str_eq(fa, fb);
	fp_ok(a, again);
	ck_assert_str_eq(fa, again);
	moe_test_rm_rf(a);
	moe_test_rm_rf(b);
	free(a);
	free(b);
}
END_TEST

/* One byte of config.json, of a header, of a sampled data position (first,
 * middle and last sample of the large shard) and of the small shard's data:
 * each changes the fingerprint, and flipping it back restores it. */
START_TEST(one_changed_byte_in_what_is_read_changes_it)
{
	static const char *const big = "model-00001-of-00002.safetensors";
	static const char *const small = "model-00002-of-00002.safetensors";
	char *d = make_ckpt("fp-change");
	char base[MOE_FINGERPRINT_LEN], now[MOE_FINGERPRINT_LEN];
	uint64_t hb = st_hlen(d, big), hs = st_hlen(d, small);
	struct {
		const char *file, *what;
		uint64_t off;
	} at[] = {
		{ "config.json", "config.json", 20 },
		{ big, "the large shard's header", 8 + 3 },
		{ small, "the small shard's header", 8 + hs - 2 },
		{ big, "sample 0", 8 + hb + 17 },
		{ big, "sample 100", 8 + hb + sample_off(100, BIG_DATA) + 4000 },
		{ big, "the last byte (sample 255)", 8 + hb + BIG_DATA - 1 },
		{ small, "the small shard's data", 8 + hs + SMALL_DATA / 2 },
	};

	fp_ok(d, base);
	for (size_t i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
		flip(d, at[i].file, at[i].off);
		fp_ok(d, now);
		ck_assert_msg(strcmp(now, base) != 0, "a byte changed in %s (%s, offset %" PRIu64
			      ") left the fingerprint %s", at[i].what, at[i].file, at[i].off, base);
		flip(d, at[i].file, at[i].off);
		fp_ok(d, now);
		ck_assert_msg(strcmp(now, base) == 0, "restoring %s gave %s, not %s", at[i].what, now, base);
	}
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

/* The documented price of sampling: a byte between samples 0 and 1 of a
 * large shard is not seen.  (Were everything hashed, this would fail and
 * the documentation would have to change with it.) */
START_TEST(a_byte_between_samples_is_not_seen)
{
	static const char *const big = "model-00001-of-00002.safetensors";
	char *d = make_ckpt("fp-gap");
	char base[MOE_FINGERPRINT_LEN], now[MOE_FINGERPRINT_LEN];
	uint64_t gap = sample_off(1, BIG_DATA) - 10;

	ck_assert_msg(gap > SAMPLE, "the test's shard is too small to have a gap");
	fp_ok(d, base);
	flip(d, big, 8 + st_hlen(d, big) + gap);
	fp_ok(d, now);
	ck_assert_str_eq(now, base);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

/* A renamed shard changes it; files other than config.json and
 * *.safetensors, and hidden ones, do not; symbolic links (the Hugging Face
 * cache's) count as their targets. */
START_TEST(names_count_other_files_do_not_links_are_followed)
{
	char *d = make_ckpt("fp-names"), *l = moe_test_tmpdir("fp-links");
	char base[MOE_FINGERPRINT_LEN], now[MOE_FINGERPRINT_LEN];
	char *from, *to;
	static const char *const files[] = {
		"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
	};

	fp_ok(d, base);
	write_st(d, ".hidden.safetensors", 100, 3);
	from = moe_test_path_join(d, "README.md");
	write_file(from, "hello", 5);
	free(from);
	from = moe_test_path_join(d, "sub.safetensors");
	ck_assert(mkdir(from, 0755) == 0);       /* not a regular file */
	free(from);
	/* a dangling link (an unfinished download in the Hugging Face cache),
	 * listed before and after the real shards */
	from = moe_test_path_join(d, "a-dangling.safetensors");
	ck_assert(symlink("/nonexistent/blob", from) == 0);
	free(from);
	from = moe_test_path_join(d, "z-dangling.safetensors");
	ck_assert(symlink("/nonexistent/blob", from) == 0);
	free(from);
	from = moe_test_path_join(d, "fifo.safetensors");
	ck_assert(mkfifo(from, 0644) == 0);
	free(from);
	fp_ok(d, now);
	ck_assert_msg(strcmp(now, base) == 0, "files that do not count changed it: %s, not %s", now, base);

	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		from = moe_test_path_join(d, files[i]);
		to = moe_test_path_join(l, files[i]);
		ck_assert_msg(symlink(from, to) == 0, "symlink %s: %s", to, strerror(errno));
		free(from);
		free(to);
	}
	fp_ok(l, now);
	ck_assert_msg(strcmp(now, base) == 0, "a directory of links gave %s, not %s", now, base);

	from = moe_test_path_join(d, "model-00002-of-00002.safetensors");
	to = moe_test_path_join(d, "model-00002-of-00002x.safetensors");
	ck_assert(rename(from, to) == 0);
	fp_ok(d, now);
	ck_assert_msg(strcmp(now, base) != 0, "a renamed shard left it %s", base);
	free(from);
	free(to);
	moe_test_rm_rf(d);
	moe_test_rm_rf(l);
	free(d);
	free(l);
}
END_TEST

/* ------------------------------------------------------------------ the definition */

struct stream {
	unsigned char *p;
	size_t n, cap;
};

static void put(struct stream *s, const void *buf, size_t len)
{
	if (s->n + len > s->cap) {
		s->cap = (s->n + len) * 2;
		s->p = realloc(s->p, s->cap);
		ck_assert(s->p);
	}
	memcpy(s->p + s->n, buf, len);
	s->n += len;
}

static void put_u64(struct stream *s, uint64_t v)
{
	unsigned char b[8];

	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	put(s, b, 8);
}

static void put_file(struct stream *s, const char *dir, const char *name)
{
	char *path = moe_test_path_join(dir, name);
	uint64_t len = 0, h = 0, D;
	char *buf = moe_test_slurp(path, &len);

	ck_assert(buf);
	put_u64(s, strlen(name));
	put(s, name, strlen(name));
	put_u64(s, len);
	for (int i = 0; i < 8; i++)
		h |= (uint64_t)(unsigned char)buf[i] << (8 * i);
	put(s, buf, 8 + h);
	D = len - 8 - h;
	if (D <= 256 * SAMPLE)
		put(s, buf + 8 + h, D);
	else
		for (uint64_t i = 0; i < 256; i++)
			put(s, buf + 8 + h + sample_off(i, D), SAMPLE);
	free(buf);
	free(path);
}

/* The stream of moe-store(5) FINGERPRINT, built here from the files and
 * hashed with XXH3_128bits in one call, printed high word first: the
 * library's value. */
START_TEST(matches_the_stream_of_the_definition)
{
	char *d = make_ckpt("fp-def"), *path = moe_test_path_join(d, "config.json");
	char got[MOE_FINGERPRINT_LEN], want[64];
	struct stream s = { 0 };
	uint64_t clen = 0;
	char *cfg = moe_test_slurp(path, &clen);
	XXH128_hash_t h;

	ck_assert(cfg);
	put(&s, "moed-fingerprint-1", 18);
	put_u64(&s, clen);
	put(&s, cfg, clen);
	/* bytewise order of the names: 00001 before 00002 */
	put_file(&s, d, "model-00001-of-00002.safetensors");
	put_file(&s, d, "model-00002-of-00002.safetensors");
	h = XXH3_128bits(s.p, s.n);
	snprintf(want, sizeof(want), "%016" PRIx64 "%016" PRIx64, (uint64_t)h.high64, (uint64_t)h.low64);
	fp_ok(d, got);
	ck_assert_msg(!strncmp(got, want, 16), "first 16 hex digits: library %.16s, definition %.16s", got, want);
	ck_assert_str_eq(got, want);
	free(s.p);
	free(cfg);
	free(path);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

/* ------------------------------------------------------------------ errors */

static void fp_fails(const char *dir, int want, const char *what)
{
	char out[MOE_FINGERPRINT_LEN];
	int rc;

	memset(out, 'z', sizeof(out));
	rc = moe_checkpoint_fingerprint(dir, out);
	ck_assert_msg(rc == want, "%s: got %d (%s), expected %d (%s)", what, rc, moe_strerror(rc), want,
		      moe_strerror(want));
	for (size_t i = 0; i < sizeof(out); i++)
		ck_assert_msg(out[i] == 'z', "%s: out was written on failure", what);
}

START_TEST(missing_config_json_is_enoent)
{
	char *d = make_ckpt("fp-noconfig"), *p = moe_test_path_join(d, "config.json"), *gone;

	ck_assert(unlink(p) == 0);
	fp_fails(d, -ENOENT, "no config.json");
	gone = moe_test_path_join(d, "no-such-dir");
	fp_fails(gone, -ENOENT, "no directory");
	fp_fails(p, -ENOENT, "a path that does not exist");
	free(gone);
	free(p);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

START_TEST(no_safetensors_is_enodata)
{
	char *d = moe_test_tmpdir("fp-nost"), *p = moe_test_path_join(d, "config.json");

	write_file(p, "{}", 2);
	fp_fails(d, -ENODATA, "config.json alone");
	free(p);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

START_TEST(malformed_headers_are_einval)
{
	char *d = make_ckpt("fp-trunc");
	char *p = moe_test_path_join(d, "model-00002-of-00002.safetensors");
	uint64_t h = st_hlen(d, "model-00002-of-00002.safetensors");
	int fd;

	/* truncated inside its header */
	ck_assert(truncate(p, (off_t)(8 + h - 1)) == 0);
	fp_fails(d, -EINVAL, "header length past the file");
	/* shorter than the length itself */
	ck_assert(truncate(p, 5) == 0);
	fp_fails(d, -EINVAL, "a 5-byte file");
	/* a length over 100 MB in a file long enough for it (sparse) */
	fd = open(p, O_WRONLY | O_CLOEXEC);
	ck_assert(fd >= 0);
	{
		uint64_t big = 100u * 1000u * 1000u + 1u;
		unsigned char b[8];

		for (int i = 0; i < 8; i++)
			b[i] = (unsigned char)(big >> (8 * i));
		ck_assert(pwrite(fd, b, 8, 0) == 8);
		ck_assert(ftruncate(fd, (off_t)(200u * 1000u * 1000u)) == 0);
	}
	close(fd);
	fp_fails(d, -EINVAL, "a header over 100 MB");
	free(p);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

START_TEST(a_config_json_that_is_no_file_is_einval)
{
	char *d = make_ckpt("fp-fifo"), *p = moe_test_path_join(d, "config.json");

	ck_assert(unlink(p) == 0);
	ck_assert(mkfifo(p, 0644) == 0);        /* must not hang the call */
	fp_fails(d, -EINVAL, "config.json a FIFO");
	free(p);
	moe_test_rm_rf(d);
	free(d);
}
END_TEST

START_TEST(null_arguments_are_einval)
{
	char out[MOE_FINGERPRINT_LEN];

	ck_assert_int_eq(moe_checkpoint_fingerprint(NULL, out), -EINVAL);
	ck_assert_int_eq(moe_checkpoint_fingerprint("/", NULL), -EINVAL);
	ck_assert_int_eq(moe_client_fingerprint(NULL, out), -EINVAL);
}
END_TEST

/* ------------------------------------------------------------------ through moed */

/* Pack @m's checkpoint (model_make writes it in m->dir) again, recording
 * its fingerprint as moectl pack does, and return the fingerprint. */
static void repack_with_fingerprint(const struct moe_test_model *m, char hex[MOE_FINGERPRINT_LEN])
{
	struct moe_pack_options po = { .dtype = -1 };
	struct moe_err err = { 0 };
	uint8_t raw[16];
	int rc;

	fp_ok(m->dir, hex);
	for (int i = 0; i < 16; i++) {
		unsigned v;

		ck_assert(sscanf(hex + 2 * i, "%2x", &v) == 1);
		raw[i] = (uint8_t)v;
	}
	po.source_fingerprint = raw;
	rc = moe_pack(m->dir, m->store, &po, &err);
	ck_assert_msg(rc == 0, "pack: %s", err.msg);
}

/* The store holds the raw bytes at offset 744, inside what the header
 * checksum covers: one flipped bit there makes the store unreadable. */
START_TEST(the_store_records_it_under_the_header_checksum)
{
	struct moe_test_model m;
	struct moe_store *st;
	struct moe_err err = { 0 };
	char hex[MOE_FINGERPRINT_LEN], got[64];
	int rc, fd;
	unsigned char b;

	model_make(&m, "fp-store");
	repack_with_fingerprint(&m, hex);
	rc = moe_store_open(m.store, &st, &err);
	ck_assert_msg(rc == 0, "store open: %s", err.msg);
	for (int i = 0; i < 16; i++)
		snprintf(got + 2 * i, sizeof(got) - 2 * (size_t)i, "%02x", st->hdr.source_fingerprint[i]);
	ck_assert_str_eq(got, hex);
	moe_store_close(st);

	fd = open(m.store, O_RDWR | O_CLOEXEC);
	ck_assert(fd >= 0);
	ck_assert(pread(fd, &b, 1, 744 + 15) == 1);
	b ^= 1;
	ck_assert(pwrite(fd, &b, 1, 744 + 15) == 1);
	close(fd);
	rc = moe_store_open(m.store, &st, &err);
	ck_assert_msg(rc < 0, "a store with a changed fingerprint opened");
	moe_test_assert_err_has(&err, "checksum");
	moe_test_model_free(&m);
}
END_TEST

START_TEST(moed_reports_the_fingerprint_pack_recorded)
{
	struct moe_test_model m;
	struct moe_test_moed d;
	struct moe_client *c;
	struct moe_model_info info;
	char want[MOE_FINGERPRINT_LEN], got[MOE_FINGERPRINT_LEN];
	int rc;

	model_make(&m, "fp-moed");
	repack_with_fingerprint(&m, want);
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "connect: %s", moe_strerror(rc));
	rc = moe_client_fingerprint(c, got);
	moed_assert(&d, rc == 0, "moe_client_fingerprint: %d %s", rc, moe_strerror(rc));
	ck_assert_str_eq(got, want);
	/* the fields around WELCOME's fingerprint are as before */
	ck_assert_int_eq(moe_client_info(c, &info), 0);
	ck_assert_int_eq(info.max_tokens > 0, 1);
	ck_assert_int_eq(info.num_moe_layers, m.nl);
	ck_assert_int_eq(info.moe_layers[0], m.layers[0]);
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

START_TEST(a_store_without_one_gives_enodata)
{
	struct moe_test_model m;
	struct moe_test_moed d;
	struct moe_client *c;
	char out[MOE_FINGERPRINT_LEN];
	int rc;

	model_make(&m, "fp-none");          /* packed without a fingerprint: all zero */
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "connect: %s", moe_strerror(rc));
	memset(out, 'z', sizeof(out));
	rc = moe_client_fingerprint(c, out);
	ck_assert_msg(rc == -ENODATA, "got %d (%s), expected -ENODATA", rc, moe_strerror(rc));
	ck_assert_msg(out[0] == 'z' && out[32] == 'z', "out was written on failure");
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("fingerprint");
	TCase *tc = tcase_create("directory");
	TCase *td = tcase_create("moed");

	tcase_add_test(tc, same_bytes_in_another_directory_give_the_same_fingerprint);
	tcase_add_test(tc, one_changed_byte_in_what_is_read_changes_it);
	tcase_add_test(tc, a_byte_between_samples_is_not_seen);
	tcase_add_test(tc, names_count_other_files_do_not_links_are_followed);
	tcase_add_test(tc, matches_the_stream_of_the_definition);
	tcase_add_test(tc, missing_config_json_is_enoent);
	tcase_add_test(tc, no_safetensors_is_enodata);
	tcase_add_test(tc, malformed_headers_are_einval);
	tcase_add_test(tc, a_config_json_that_is_no_file_is_einval);
	tcase_add_test(tc, null_arguments_are_einval);
	suite_add_tcase(s, tc);
	tcase_set_timeout(td, 240);
	tcase_add_test(td, the_store_records_it_under_the_header_checksum);
	tcase_add_test(td, moed_reports_the_fingerprint_pack_recorded);
	tcase_add_test(td, a_store_without_one_gives_enodata);
	suite_add_tcase(s, td);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "fingerprint");
}
