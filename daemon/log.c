/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "log.h"

static int max_level = MOED_LOG_INFO;
static int journal = -1;        /* -1: not decided yet */

void moed_log_set_level(int level)
{
	max_level = level;
}

int moed_log_get_level(void)
{
	return max_level;
}

void moed_log_set_journal(int on)
{
	journal = on;
}

/* stderr is the journal when $JOURNAL_STREAM names its device and inode. */
static int on_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (!js || sscanf(js, "%llu:%llu", &dev, &ino) != 2 || fstat(2, &st) < 0)
		return 0;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

static void vlog(int level, const char *fmt, va_list ap)
{
	static const char *const names[] = { "emerg", "alert", "crit", "error", "warning",
					      "notice", "info", "debug" };
	char line[2048];
	int n;

	if (level > max_level)
		return;
	if (journal < 0)
		journal = on_journal();
	if (journal)
		n = snprintf(line, sizeof(line), "<%d>", level);
	else
		n = snprintf(line, sizeof(line), "moed: %s: ", names[level & 7]);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	n = (int)strlen(line);
	line[n++] = '\n';
	/* one write per line, so lines of different threads do not mix */
	fwrite(line, 1, (size_t)n, stderr);
	fflush(stderr);
}

void moed_log(int level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(level, fmt, ap);
	va_end(ap);
}

int moed_log_errno(int level, int r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(level, fmt, ap);
	va_end(ap);
	return r;
}

void moed_log_engine(void *ctx, int level, const char *msg)
{
	(void)ctx;
	moed_log(level, "%s", msg);
}
