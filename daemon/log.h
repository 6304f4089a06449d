/* SPDX-License-Identifier: MIT */
/*
 * moed's log: one line per message on stderr.  Under systemd (stderr
 * connected to the journal, $JOURNAL_STREAM) each line starts with the
 * "<N>" priority prefix that the journal turns into the message's
 * priority; on a terminal it says "moed: error: ...".  Only the daemon's
 * edges log (the server's files in daemon/, daemon/main.c); the engine
 * returns errors.
 */
#ifndef MOED_LOG_H
#define MOED_LOG_H

#include <errno.h>

/* syslog priorities */
#define MOED_LOG_ERR 3
#define MOED_LOG_WARNING 4
#define MOED_LOG_NOTICE 5
#define MOED_LOG_INFO 6
#define MOED_LOG_DEBUG 7

/* Messages above @level (a syslog priority) are dropped. */
void moed_log_set_level(int level);
int moed_log_get_level(void);

/* Use "<N>" prefixes (systemd) instead of "moed: level: " ones; decided
 * from the environment at the first message unless set. */
void moed_log_set_journal(int on);

void moed_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Log and return @r (a negative errno) in one statement. */
int moed_log_errno(int level, int r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* An engine callback (moe_log_fn) that logs through moed_log. */
void moed_log_engine(void *ctx, int level, const char *msg);

#define log_error(...) moed_log(MOED_LOG_ERR, __VA_ARGS__)
#define log_warning(...) moed_log(MOED_LOG_WARNING, __VA_ARGS__)
#define log_notice(...) moed_log(MOED_LOG_NOTICE, __VA_ARGS__)
#define log_info(...) moed_log(MOED_LOG_INFO, __VA_ARGS__)
#define log_debug(...) moed_log(MOED_LOG_DEBUG, __VA_ARGS__)
#define log_error_errno(r, ...) moed_log_errno(MOED_LOG_ERR, (r), __VA_ARGS__)
#define log_warning_errno(r, ...) moed_log_errno(MOED_LOG_WARNING, (r), __VA_ARGS__)

#endif
