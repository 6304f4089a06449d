/* SPDX-License-Identifier: MIT */
/*
 * moectl: the command-line client and model tool.  main() only dispatches;
 * each subcommand lives in a cmd_*.c file.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/suggest.h"
#include "libmoeclient/moeclient.h"
#include "formats/outfile.h"
#include "moectl.h"

static int vfail(int status, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
static int vfail(int status, const char *fmt, va_list ap)
{
	fputs("moectl: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	return status;
}

int moectl_fail(const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vfail(MOECTL_BAD_INPUT, fmt, ap);
	va_end(ap);
	return r;
}

int moectl_failx(int status, const char *fmt, ...)
{
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vfail(status, fmt, ap);
	va_end(ap);
	return r;
}

int moectl_usage(const char *cmd, const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, cmd ? "moectl: %s: " : "moectl: ", cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, cmd ? " (see moectl %s --help)\n" : " (see moectl --help)\n", cmd);
	return MOECTL_USAGE;
}

int moectl_unknown(const char *cmd, const char *what, const char *arg, const char *const *names, size_t n)
{
	const char *word = arg, *eq = strchr(arg, '=');
	char buf[64];
	const char *near;

	while (*word == '-')
		word++;
	if (eq && (size_t)(eq - word) < sizeof(buf) && eq > word) {
		memcpy(buf, word, (size_t)(eq - word));
		buf[eq - word] = '\0';
		word = buf;
	}
	near = *word ? moe_suggest(word, names, n) : NULL;
	if (near)
		return moectl_usage(cmd, "unknown %s '%s'; did you mean '%s%s'?", what, arg,
				    arg[0] == '-' ? "--" : "", near);
	return moectl_usage(cmd, "unknown %s '%s'", what, arg);
}

int moectl_getopt_error(const char *cmd, int o, int argc, char **argv, const struct option *opts)
{
	const char *names[64], *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "?";
	char shortopt[3] = { '-', (char)optopt, 0 };
	size_t n = 0;

	/* a short option's letter is in optopt, and argv[optind - 1] may hold
	 * several of them ("-xh") */
	if (optopt && strncmp(arg, "--", 2))
		arg = shortopt;
	if (o == ':')
		return moectl_usage(cmd, "%s needs a value", arg);
	for (; opts && opts[n].name && n < sizeof(names) / sizeof(names[0]); n++)
		names[n] = opts[n].name;
	return moectl_unknown(cmd, "option", arg, names, n);
}

int moectl_fail_err(const struct moe_err *err)
{
	int status = err->code == -EIO || err->code == -EBADMSG ? MOECTL_IO :
		     err->code == -ENOMEM ? MOECTL_INTERNAL : MOECTL_BAD_INPUT;

	return moectl_failx(status, "%s", err->msg[0] ? err->msg : strerror(-err->code));
}

int moectl_status_of(int code)
{
	switch (-code) {
	case 0:
		return MOECTL_OK;
	case ECONNRESET:
	case EPIPE:
	case ESHUTDOWN:
	case ENOENT:
	case ECONNREFUSED:
	case ETIMEDOUT:
	case MOE_E_PROTO:
		return MOECTL_UNREACHABLE;
	case EACCES:
	case EPERM:
	case EUSERS:
		return MOECTL_REFUSED;
	case EIO:
	case EBADMSG:            /* the engine's checksum mismatch, in process */
	case MOE_E_CHECKSUM:
		return MOECTL_IO;
	case ENOMEM:
		return MOECTL_INTERNAL;
	default:
		return MOECTL_BAD_INPUT;
	}
}

int moectl_connect(const char *cmd, struct moe_client **ret)
{
	int r = moe_client_connect(NULL, NULL, ret);
	const char *why;

	if (r == 0)
		return 0;
	why = moe_client_last_error();
	if (!*why)
		why = moe_strerror(r);
	if (r == -E2BIG || r == -ENOSPC)      /* the arena moed would not give */
		return moectl_failx(MOECTL_REFUSED, "%s: %s", cmd, why);
	return moectl_failx(moectl_status_of(r), "%s: %s", cmd, why);
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
	fputs("\noptions (before or after the command):\n"
	      "  -s, --socket PATH  moed's socket (default $MOED_SOCKET, else " MOE_DEFAULT_SOCKET ")\n"
	      "  -h, --help         this text; moectl COMMAND --help shows a command's options\n"
	      "  -V, --version      moectl's version\n"
	      "\nExit status: 0 success, 1 bad input, 2 usage, 3 cannot reach moed, 4 refused,\n"
	      "5 I/O error or checksum mismatch, 6 internal error; see moectl(1).\n", f);
}

/* --socket PATH / --socket=PATH / -s PATH at @i: sets MOED_SOCKET and
 * returns how many words it took, 0 when argv[i] is not one, -1 when the
 * path is missing. */
static int socket_option(int argc, char **argv, int i)
{
	if (!strcmp(argv[i], "--socket") || !strcmp(argv[i], "-s")) {
		if (i + 1 >= argc || !argv[i + 1][0])
			return -1;
		setenv("MOED_SOCKET", argv[i + 1], 1);
		return 2;
	}
	if (!strncmp(argv[i], "--socket=", 9)) {
		if (!argv[i][9])
			return -1;
		setenv("MOED_SOCKET", argv[i] + 9, 1);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	const char *names[sizeof(commands) / sizeof(commands[0])];
	const size_t ncmd = sizeof(commands) / sizeof(commands[0]);
	int i = 1, n;

	/* Global options before the command. */
	while (i < argc && argv[i][0] == '-') {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(argv[i], "--version") || !strcmp(argv[i], "-V")) {
			printf("moectl %s\n", PACKAGE_VERSION);
			return 0;
		} else if ((n = socket_option(argc, argv, i)) != 0) {
			if (n < 0)
				return moectl_failx(MOECTL_USAGE, "--socket needs a path (see moectl --help)");
			i += n;
		} else {
			static const char *const globals[] = { "socket", "help", "version" };

			return moectl_unknown(NULL, "option", argv[i], globals, 3);
		}
	}
	if (i >= argc) {
		usage(stderr);
		return MOECTL_USAGE;
	}
	/* ... and after it: moectl info --socket PATH.  None of the commands
	 * has an option of that name, so taking it out cannot take theirs
	 * (the short -s only before the command: it is too short to be sure). */
	for (int j = i + 1; j < argc;) {
		if (!strcmp(argv[j], "--"))
			break;
		n = strcmp(argv[j], "-s") ? socket_option(argc, argv, j) : 0;   /* -s only before */
		if (n < 0)
			return moectl_failx(MOECTL_USAGE, "%s: --socket needs a path (see moectl --help)", argv[i]);
		if (n == 0) {
			j++;
			continue;
		}
		memmove(argv + j, argv + j + n, (size_t)(argc - j - n + 1) * sizeof(*argv));
		argc -= n;
	}
	/* a store or output being written is removed on ^C, not left behind */
	moe_outfile_catch_signals();
	for (size_t c = 0; c < ncmd; c++) {
		if (!strcmp(argv[i], commands[c].name))
			return commands[c].fn(argc - i, argv + i);
		names[c] = commands[c].name;
	}
	return moectl_unknown(NULL, "command", argv[i], names, ncmd);
}
