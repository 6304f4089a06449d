/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: a safetensors file (formats/safetensors.c), the
 * weights `moectl pack` reads from a checkpoint that may come from
 * anywhere.  The input is the whole file, opened with moe_st_file_open().
 * A refused file must come with a message naming it; in an accepted one
 * every tensor must lie inside the file, no two may share bytes, the names
 * must be sorted and findable, and reading each tensor whole must work
 * (moe_st_read) while reading one byte past its end is refused.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/err.h"
#include "formats/safetensors.h"
#include "fuzz.h"

static void fail(const char *fmt, const char *name, uint64_t a, uint64_t b) __attribute__((noreturn));
static void fail(const char *fmt, const char *name, uint64_t a, uint64_t b)
{
	fprintf(stderr, "fuzz_safetensors: ");
	fprintf(stderr, fmt, name, (unsigned long long)a, (unsigned long long)b);
	fputc('\n', stderr);
	abort();
}

static void check(const struct moe_st_checkpoint *c, uint64_t size)
{
	struct moe_err err;
	uint8_t *buf = malloc(size + 1);

	if (!buf)
		abort();
	for (size_t i = 0; i < c->n_tensors; i++) {
		const struct moe_st_tensor *t = &c->tensors[i];

		if (t->offset > size || t->nbytes > size - t->offset)
			fail("tensor '%s' at %llu, %llu bytes, lies outside the file", t->name,
			     t->offset, t->nbytes);
		if (i > 0 && strcmp(c->tensors[i - 1].name, t->name) >= 0)
			fail("tensor '%s' is out of order (%llu, %llu)", t->name, i, 0);
		if (moe_st_find(c, t->name) != t)
			fail("tensor '%s' is not found by name (%llu, %llu)", t->name, i, 0);
		memset(&err, 0, sizeof(err));
		if (moe_st_read(c, t, 0, buf, t->nbytes, &err) < 0)
			fail("reading tensor '%s' whole (%llu bytes at %llu) failed", t->name,
			     t->nbytes, t->offset);
		if (moe_st_read(c, t, 0, buf, t->nbytes + 1, &err) != -EINVAL)
			fail("reading tensor '%s' one byte past its %llu bytes was not refused (%llu)",
			     t->name, t->nbytes, 0);
	}
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_st_checkpoint *c = NULL;
	struct moe_err err = { 0 };
	char path[32];
	int fd, r;

	fd = fuzz_file(data, size, path, sizeof(path));
	r = moe_st_file_open(path, &c, &err);
	if (r < 0 && !strstr(err.msg, path))
		fail("%s: error %llu with a message that does not name the file (%llu)", err.msg,
		     (uint64_t)-r, 0);
	if (r == 0) {
		check(c, size);
		moe_st_checkpoint_close(c);
	}
	close(fd);
	return 0;
}
