/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <errno.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

static char *tmpdirs[64];
static int n_tmpdirs;

static void cleanup_tmpdirs(void)
{
	if (getenv("MOE_TEST_KEEP"))
		return;
	for (int i = 0; i < n_tmpdirs; i++) {
		moe_test_rm_rf(tmpdirs[i]);
		free(tmpdirs[i]);
	}
	n_tmpdirs = 0;
}

char *moe_test_tmpdir(const char *tag)
{
	const char *base = getenv("TMPDIR");
	char *path;

	if (!base || !*base)
		base = "/tmp";
	if (asprintf(&path, "%s/moe-%s-XXXXXX", base, tag) < 0)
		abort();
	if (!mkdtemp(path)) {
		fprintf(stderr, "mkdtemp %s: %s\n", path, strerror(errno));
		abort();
	}
	if (n_tmpdirs == 0)
		atexit(cleanup_tmpdirs);
	if (n_tmpdirs < 64)
		tmpdirs[n_tmpdirs++] = strdup(path);
	return path;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

void moe_test_rm_rf(const char *path)
{
	nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int moe_test_sh(const char *out_path, const char *fmt, ...)
{
	char *cmd, *full;
	va_list ap;
	int st;

	va_start(ap, fmt);
	if (vasprintf(&cmd, fmt, ap) < 0)
		abort();
	va_end(ap);
	if (out_path) {
		if (asprintf(&full, "(%s) >'%s' 2>&1", cmd, out_path) < 0)
			abort();
	} else {
		full = strdup(cmd);
	}
	st = system(full);
	free(cmd);
	free(full);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	/* the shell reports a child killed by a signal as 128 + signal */
	if (WEXITSTATUS(st) > 128)
		return -1;
	return WEXITSTATUS(st);
}

char *moe_test_slurp(const char *path, uint64_t *ret_len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
		buf = malloc((size_t)n + 1);
		if (buf && fread(buf, 1, (size_t)n, f) == (size_t)n) {
			buf[n] = '\0';
			if (ret_len)
				*ret_len = (uint64_t)n;
		} else {
			free(buf);
			buf = NULL;
		}
	}
	fclose(f);
	return buf;
}

const char *moe_test_moectl(void)
{
	const char *p = getenv("MOECTL");

	return p && *p ? p : "../client/moectl";
}

uint64_t moe_test_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

double moe_test_randf(uint64_t *s)
{
	return (double)(moe_test_rand(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}
