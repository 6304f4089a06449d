/* SPDX-License-Identifier: MIT */
/*
 * moectl: the command-line client and model tool.  main() only dispatches;
 * each subcommand lives in a cmd_*.c file.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moectl.h"
#include "formats/outfile.h"

int moectl_fail(const char *fmt, ...)
{
	va_list ap;

	fputs("moectl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

int moectl_fail_err(const struct moe_err *err)
{
	return moectl_fail("%s", err->msg[0] ? err->msg : strerror(-err->code));
}

void moectl_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	/* errors also come back as the failing call's status and message,
	 * which moectl prints once: only warnings are shown here */
	if (level == 4)
		fprintf(stderr, "moectl: warning: %s\n", msg);
}

double moectl_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int moectl_parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	errno = 0;
	if (!s || !*s || *s == '-')
		return moectl_fail("%s: expected a number, got '%s'", opt, s ? s : ""), -EINVAL;
	v = strtoull(s, &end, 0);
	if (errno || *end)
		return moectl_fail("%s: expected a number, got '%s'", opt, s), -EINVAL;
	if (v < min || v > max)
		return moectl_fail("%s: %llu is out of range %" PRIu64 "..%" PRIu64, opt, v, min, max),
		       -EINVAL;
	*ret = v;
	return 0;
}

void moectl_progress_init(struct moectl_progress *p, const char *label)
{
	memset(p, 0, sizeof(*p));
	p->tty = isatty(STDERR_FILENO);
	p->label = label;
	p->start = moectl_now();
	p->last_pct = -1;
}

void moectl_progress(void *ctx, uint64_t done, uint64_t total)
{
	struct moectl_progress *p = ctx;
	double now, el, rate;
	int pct, width = 30, fill;

	if (!p || !p->tty || total == 0)
		return;
	now = moectl_now();
	pct = (int)(100.0 * (double)done / (double)total);
	if (pct == p->last_pct && now - p->last < 0.2 && done < total)
		return;
	p->last = now;
	p->last_pct = pct;
	el = now - p->start;
	rate = el > 0 ? (double)done / el / 1e6 : 0;
	fill = (int)((double)width * (double)done / (double)total);
	fprintf(stderr, "\r%-8s [", p->label);
	for (int i = 0; i < width; i++)
		fputc(i < fill ? '#' : '.', stderr);
	fprintf(stderr, "] %3d%% %8.1f MB/s", pct, rate);
	fflush(stderr);
}

void moectl_progress_done(struct moectl_progress *p)
{
	if (p && p->tty && p->last_pct >= 0)
		fputc('\n', stderr);
}

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *summary;
} commands[] = {
	{ "gen-model", cmd_gen_model, "write a random Hugging Face checkpoint" },
	{ "pack", cmd_pack, "pack a Hugging Face checkpoint into a .moe store" },
	{ "inspect", cmd_inspect, "describe a store" },
	{ "fingerprint", cmd_fingerprint, "print a checkpoint's fingerprint" },
	{ "verify", cmd_verify, "check every checksum of a store" },
	{ "forward", cmd_forward, "run an MoE layer on a .npy batch" },
	{ "trace-sim", cmd_trace_sim, "compare cache policies on a routing trace" },
	{ "info", cmd_info, "what moed serves" },
	{ "stats", cmd_stats, "moed's load, cache, pager and latency figures" },
	{ "bench", cmd_bench, "load moed from several client processes" },
};

static void usage(FILE *f)
{
	fputs("usage: moectl [--socket PATH] COMMAND [ARGS...]\n\ncommands:\n", f);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-11s %s\n", commands[i].name, commands[i].summary);
	fputs("\nmoectl COMMAND --help shows a command's options; see moectl(1).\n", f);
}

int main(int argc, char **argv)
{
	int i = 1;

	/* Global options before the command. */
	while (i < argc && argv[i][0] == '-') {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(argv[i], "--version")) {
			printf("moectl %s\n", PACKAGE_VERSION);
			return 0;
		} else if (!strcmp(argv[i], "--socket")) {
			if (i + 1 >= argc)
				return moectl_fail("--socket needs a path");
			setenv("MOED_SOCKET", argv[i + 1], 1);
			i += 2;
		} else if (!strncmp(argv[i], "--socket=", 9)) {
			setenv("MOED_SOCKET", argv[i] + 9, 1);
			i++;
		} else {
			usage(stderr);
			return moectl_fail("unknown option '%s'", argv[i]);
		}
	}
	if (i >= argc) {
		usage(stderr);
		return 2;
	}
	/* a store or output being written is removed on ^C, not left behind */
	moe_outfile_catch_signals();
	for (size_t c = 0; c < sizeof(commands) / sizeof(commands[0]); c++)
		if (!strcmp(argv[i], commands[c].name))
			return commands[c].fn(argc - i, argv + i);
	usage(stderr);
	return moectl_fail("unknown command '%s'", argv[i]);
}
