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

/* Print "moectl: <msg>" on stderr; returns 1 (the exit status). */
int moectl_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print "moectl: <err->msg>" on stderr; returns 1. */
int moectl_fail_err(const struct moe_err *err);

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
