/* SPDX-License-Identifier: MIT */
/*
 * The routing trace files (trace.c, moe-trace(5)) that the engine records
 * and moectl trace-sim replays on the cache simulator: the writer and the
 * reader agree, the reader names the file and line of every error, the
 * writer refuses bad batches and reports write errors.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cache.h"
#include "engine/err.h"
#include "engine/trace.h"
#include "testutil.h"

#define NONE MOE_CACHE_NONE          /* ends each batch in a trace's keys (trace.h) */

static char *write_file(const char *dir, const char *name, const char *text)
{
	char *path;
	FILE *f;

	ck_assert(asprintf(&path, "%s/%s", dir, name) > 0);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	fputs(text, f);
	ck_assert_int_eq(fclose(f), 0);
	return path;
}

START_TEST(trace_round_trips_through_the_writer_and_reader)
{
	static const uint32_t b0[] = { 5, 1 }, b1[] = { 7, 0, 2 }, b2[] = { 4 };
	static const uint32_t want[] = { 1, 5, NONE, 8, 10, 15, NONE, NONE, 4, NONE };
	char *dir = moe_test_tmpdir("trace"), *path, *text;
	struct moe_trace_writer *w;
	struct moe_err err = { 0 };
	struct moe_trace *t;
	int r;

	ck_assert(asprintf(&path, "%s/t.trace", dir) > 0);
	r = moe_trace_open_write(path, 2, 8, &w, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_int_eq(moe_trace_write(w, 0, b0, 2, &err), 0);
	ck_assert_int_eq(moe_trace_write(w, 1, b1, 3, &err), 0);
	ck_assert_int_eq(moe_trace_write(w, 1, NULL, 0, &err), 0);
	ck_assert_int_eq(moe_trace_write(w, 0, b2, 1, &err), 0);
	ck_assert_int_eq(moe_trace_close_write(w, &err), 0);

	text = moe_test_slurp(path, NULL);
	ck_assert_str_eq(text, "moed-trace 1 2 8\n0 1 5\n1 0 2 7\n1\n0 4\n");
	free(text);

	r = moe_trace_read(path, &t, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(t->n_layers, 2);
	ck_assert_uint_eq(t->n_experts, 8);
	ck_assert_uint_eq(t->n, sizeof(want) / sizeof(want[0]));
	for (size_t i = 0; i < t->n; i++)
		ck_assert_msg(t->keys[i] == want[i], "key %zu: %u, want %u", i, t->keys[i], want[i]);
	moe_trace_free(t);
	moe_trace_free(NULL);
	ck_assert_int_eq(moe_trace_close_write(NULL, &err), 0);
	free(path);

	/* comments, blank lines, tabs, CRLF, no final newline */
	path = write_file(dir, "hand.trace", "moed-trace 1 3 4\r\n# comment\n\n  # indented\n"
			  "2\t0  3\r\n\t\n0 1 2 3");
	r = moe_trace_read(path, &t, &err);
	ck_assert_msg(r == 0, "%s", err.msg);
	ck_assert_uint_eq(t->n, 7);
	ck_assert_uint_eq(t->keys[0], 8);
	ck_assert_uint_eq(t->keys[1], 11);
	ck_assert_uint_eq(t->keys[2], NONE);
	ck_assert_uint_eq(t->keys[5], 3);
	ck_assert_uint_eq(t->keys[6], NONE);
	moe_trace_free(t);
	free(path);
	free(dir);
}
END_TEST

START_TEST(trace_reader_names_file_and_line_of_every_error)
{
	static const struct {
		const char *text, *want;
	} bad[] = {
		{ "", ":1: empty file" },
		{ "moed-trace 1 2 8\n0 1\n", NULL },     /* the good one */
		{ "moe-trace 1 2 8\n", ":1: not a routing trace" },
		{ "\nmoed-trace 1 2 8\n", ":1: not a routing trace" },
		{ "# c\nmoed-trace 1 2 8\n", ":1: not a routing trace" },
		{ "moed-trace 2 2 8\n", ":1: trace version 2 is not supported" },
		{ "moed-trace 1 2\n", ":1: missing number of experts" },
		{ "moed-trace 1 2 8 9\n", ":1: unexpected '9' after the header" },
		{ "moed-trace 1 0 8\n", ":1: 0 layers x 8 experts is not a key space" },
		{ "moed-trace 1 65536 65536\n", ":1: 65536 layers x 65536 experts" },
		{ "moed-trace 1 -2 8\n", ":1: number of MoE layers '-2' is not a number" },
		{ "moed-trace 1 2 8\n0 1\n0 1 x\n", ":3: expert 'x' is not a number" },
		{ "moed-trace 1 2 8\n0 1\n3x 1\n", ":3: layer index '3x' is not a number" },
		{ "moed-trace 1 2 8\n0 99999999999\n", ":2: expert '99999999999' is too large" },
		{ "moed-trace 1 2 8\n# c\n2 1\n", ":3: layer index 2 is out of range (the trace has 2 MoE layers)" },
		{ "moed-trace 1 2 8\n1 8\n", ":2: expert 8 is out of range (the trace has 8 experts per layer)" },
		{ "moed-trace 1 2 8\n1 3 3\n", ":2: expert 3 is listed twice" },
		{ "moed-trace 1 2 8\n1 0\n1 4 2\n", ":3: experts are not in ascending order (2 after 4)" },
		{ "moed-trace 1 2 8\n1 +4\n", ":2: expert '+4' is not a number" },
	};
	char *dir = moe_test_tmpdir("badtrace");
	struct moe_err err = { 0 };
	struct moe_trace *t = NULL;
	int r;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char name[32], *path;

		snprintf(name, sizeof(name), "bad%zu.trace", i);
		path = write_file(dir, name, bad[i].text);
		moe_err_clear(&err);
		r = moe_trace_read(path, &t, &err);
		if (!bad[i].want) {
			ck_assert_msg(r == 0, "%s", err.msg);
			moe_trace_free(t);
			t = NULL;
		} else {
			char want[512];

			snprintf(want, sizeof(want), "%s%s", path, bad[i].want);
			ck_assert_msg(r == -EINVAL && strstr(err.msg, want),
				      "case %zu: %d '%s', want '%s'", i, r, err.msg, want);
			ck_assert_ptr_null(t);
		}
		free(path);
	}
	/* a missing file, a directory */
	r = moe_trace_read("/nonexistent/x.trace", &t, &err);
	ck_assert_int_eq(r, -ENOENT);
	ck_assert_msg(strstr(err.msg, "/nonexistent/x.trace: "), "%s", err.msg);
	r = moe_trace_read(dir, &t, &err);
	ck_assert_int_eq(r, -EISDIR);
	ck_assert_msg(strstr(err.msg, dir), "%s", err.msg);
	free(dir);
}
END_TEST

START_TEST(trace_writer_refuses_bad_batches_and_reports_write_errors)
{
	static const uint32_t dup[] = { 3, 1, 3 }, far[] = { 1, 8 }, ok[] = { 1 };
	char *dir = moe_test_tmpdir("wtrace"), *path, *text;
	struct moe_trace_writer *w;
	struct moe_err err = { 0 };
	int r;

	ck_assert(asprintf(&path, "%s/w.trace", dir) > 0);
	ck_assert_int_eq(moe_trace_open_write(path, 2, 8, &w, &err), 0);
	ck_assert_int_eq(moe_trace_write(w, 2, ok, 1, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, path) && strstr(err.msg, "layer index 2 is out of range"),
		      "%s", err.msg);
	ck_assert_int_eq(moe_trace_write(w, 1, far, 2, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "expert 8 is out of range"), "%s", err.msg);
	ck_assert_int_eq(moe_trace_write(w, 1, dup, 3, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "expert 3 is given twice"), "%s", err.msg);
	ck_assert_int_eq(moe_trace_write(w, 1, ok, 1, &err), 0);
	ck_assert_int_eq(moe_trace_close_write(w, &err), 0);
	text = moe_test_slurp(path, NULL);
	ck_assert_str_eq(text, "moed-trace 1 2 8\n1 1\n");     /* nothing of the bad ones */
	free(text);

	r = moe_trace_open_write(path, 0, 8, &w, &err);
	ck_assert_int_eq(r, -EINVAL);
	free(path);
	ck_assert(asprintf(&path, "%s/no/such/dir.trace", dir) > 0);
	ck_assert_int_eq(moe_trace_open_write(path, 2, 8, &w, &err), -ENOENT);
	ck_assert_msg(strstr(err.msg, path), "%s", err.msg);
	free(path);

	/* a full disk shows at the latest when the file is closed */
	ck_assert_int_eq(moe_trace_open_write("/dev/full", 2, 8, &w, &err), 0);
	for (int i = 0; i < 3000; i++)
		moe_trace_write(w, 1, ok, 1, &err);
	r = moe_trace_close_write(w, &err);
	ck_assert_int_eq(r, -ENOSPC);
	ck_assert_msg(strstr(err.msg, "/dev/full: write error"), "%s", err.msg);
	free(dir);
}
END_TEST

static Suite *trace_suite(void)
{
	Suite *s = suite_create("trace");
	TCase *tc = tcase_create("trace");

	tcase_add_test(tc, trace_round_trips_through_the_writer_and_reader);
	tcase_add_test(tc, trace_reader_names_file_and_line_of_every_error);
	tcase_add_test(tc, trace_writer_refuses_bad_batches_and_reports_write_errors);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(trace_suite(), "trace");
}
