/* SPDX-License-Identifier: MIT */
/*
 * moectl: shared pieces of the subcommands.
 */
#ifndef MOECTL_H
#define MOECTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"

/* Each subcommand: argv[0] is the subcommand name; returns the exit status. */
int cmd_gen_model(int argc, char **argv);
int cmd_pack(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_trace_sim(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_fingerprint(int argc, char **argv);

/*
 * moectl's exit statuses (moectl(1), EXIT STATUS): what a script can tell
 * apart without parsing the message.
 */
enum moectl_status {
	MOECTL_OK = 0,
	MOECTL_BAD_INPUT = 1,      /* a file, an option's value, a tensor, a layer */
	MOECTL_USAGE = 2,          /* an unknown command or option, a missing argument */
	MOECTL_UNREACHABLE = 3,    /* no moed at the socket, or it went away */
	MOECTL_REFUSED = 4,        /* the socket's permissions or moed refused this user */
	MOECTL_IO = 5,             /* an I/O error, a checksum mismatch */
	MOECTL_INTERNAL = 6,       /* out of memory, or a bug */
};

/*
 * The one style of moectl's JSON outputs (info, stats, trace, bench
 * --json): indented for a reader, keys in moed's order, and reals at ten
 * significant digits, so that 7.969476165 does not come out as
 * 7.9694761649999997 (jansson's default is 17).
 */
#define MOECTL_JSON_FLAGS (JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10))

/* Print "moectl: <msg>" on stderr; returns MOECTL_BAD_INPUT. */
int moectl_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The same with another status. */
int moectl_failx(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A usage error: the message, then "(see moectl CMD --help)"; returns
 * MOECTL_USAGE.  @cmd NULL: moectl's own (global options, commands). */
int moectl_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * An unknown option @arg of command @cmd: a usage error that suggests the
 * nearest of the @n names in @names (long options without their dashes,
 * or subcommands) when one is close; returns MOECTL_USAGE.
 */
int moectl_unknown(const char *cmd, const char *what, const char *arg, const char *const *names, size_t n);

/*
 * getopt_long's ':' (a value missing) or '?' (an unknown option) for
 * command @cmd, whose options are @opts: the usage error, with the nearest
 * option when one is close; returns MOECTL_USAGE.
 */
struct option;
int moectl_getopt_error(const char *cmd, int o, int argc, char **argv, const struct option *opts);

/* Print "moectl: <err->msg>" on stderr; returns the status for err->code
 * (-EIO: MOECTL_IO, -ENOMEM: MOECTL_INTERNAL, else MOECTL_BAD_INPUT). */
int moectl_fail_err(const struct moe_err *err);

/* The status for a libmoeclient error code of a call to a daemon that was
 * reachable (connect's are moectl_connect's). */
int moectl_status_of(int code);

/*
 * Connect to moed ($MOED_SOCKET, which --socket sets, or the default) for
 * command @cmd; on failure print libmoeclient's explanation (the socket,
 * the cause and the fix, or moed's reason) and return the exit status
 * (MOECTL_UNREACHABLE, MOECTL_REFUSED, ...), else 0.
 */
struct moe_client;
int moectl_connect(const char *cmd, struct moe_client **ret);

/* The engine's log callback: warnings as "moectl: warning: <msg>" on stderr. */
void moectl_log(void *ctx, int level, const char *msg);

/*
 * A progress bar on stderr when stderr is a terminal, nothing otherwise.
 * moectl_progress is shaped to be passed as a callback with a struct
 * moectl_progress * as its context.
 */
struct moectl_progress {
	bool tty;
	const char *label;
	double start;      /* monotonic seconds */
	double last;       /* last redraw */
	int last_pct;
};
void moectl_progress_init(struct moectl_progress *p, const char *label);
void moectl_progress(void *ctx, uint64_t done, uint64_t total);
void moectl_progress_done(struct moectl_progress *p);

/*
 * Checkpoint fingerprints (cmd_fingerprint.c, over libmoeclient's
 * moe_checkpoint_fingerprint): the 16 raw bytes a store records, into @raw
 * (0 or its negative errno); a message naming the file at fault for such an
 * errno, into @buf; the hex form of 16 raw bytes into @out (33 bytes),
 * false when they are all zero (none recorded).
 */
int moectl_fingerprint_raw(const char *dir, uint8_t raw[16]);
void moectl_fingerprint_why(const char *dir, int r, char *buf, size_t len);
bool moectl_fingerprint_hex(const uint8_t raw[16], char out[33]);

/* Monotonic clock in seconds. */
double moectl_now(void);

/* Parse a nonnegative integer option value with bounds; -EINVAL on junk. */
int moectl_parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max, uint64_t *ret);

#endif
