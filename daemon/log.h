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
#include <stdbool.h>
#include <stdint.h>

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

/*
 * Rate-limited messages: whatever a peer can make moed say again and
 * again (a refused uid connecting in a loop, a client's bad requests, a
 * damaged store failing every request) goes through a class of its own.
 * Each class counts every event (the counts are exact: `moectl stats`
 * "events") and logs the first log.ratelimit_burst of each
 * log.ratelimit_interval_ms; the rest are counted only, and when the
 * interval is over one line says "N more <class> messages suppressed in
 * the last T s".  That line comes with the class's next event or from
 * moed_log_events_flush() (the control thread's status tick, every
 * second), whichever is first, so a flood that stops still gets its
 * summary.  Any thread; one mutex guards the windows, the counts are
 * atomics.
 */
enum moed_event {
	MOED_EVENT_REFUSED,     /* "refused": a peer access.uids/access.gids does not allow */
	MOED_EVENT_LIMIT,       /* "limit": a connection or session over a limits.* quota */
	MOED_EVENT_NO_HELLO,    /* "no_hello": a connection dropped before it said HELLO */
	MOED_EVENT_PROTOCOL,    /* "protocol": a peer that broke the protocol */
	MOED_EVENT_REQUEST,     /* "request_error": a request the engine failed */
	MOED_EVENT_STORE,       /* "store": the store failed a read or a check */
	MOED_EVENT_SESSION,     /* "session": a session began or ended (two per session;
				 * a peer may connect in a loop) */
	MOED_EVENT_COUNT
};

/* Count one @ev and log it (as moed_log) unless its class used up its
 * burst in this interval. */
void moed_log_event(enum moed_event ev, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Count one @ev; true when it may be logged (for a caller that builds its
 * own line, or logs more than one line per event). */
bool moed_log_event_ratelimit(enum moed_event ev, int level);

/* Every @ev so far, logged or not (0 for an unknown class). */
uint64_t moed_log_event_count(enum moed_event ev);

/* The class's name in the summary line and in the stats JSON ("refused"). */
const char *moed_log_event_name(enum moed_event ev);

/* Write the summary of each class whose interval is over. */
void moed_log_events_flush(void);

/* Log at most @burst lines of a class per @interval_ms (burst 0: only the
 * summaries; interval 0: every line); defaults 10 per 5000 ms. */
void moed_log_set_ratelimit(uint32_t burst, uint32_t interval_ms);

#define log_error(...) moed_log(MOED_LOG_ERR, __VA_ARGS__)
#define log_warning(...) moed_log(MOED_LOG_WARNING, __VA_ARGS__)
#define log_notice(...) moed_log(MOED_LOG_NOTICE, __VA_ARGS__)
#define log_info(...) moed_log(MOED_LOG_INFO, __VA_ARGS__)
#define log_debug(...) moed_log(MOED_LOG_DEBUG, __VA_ARGS__)
#define log_error_errno(r, ...) moed_log_errno(MOED_LOG_ERR, (r), __VA_ARGS__)
#define log_warning_errno(r, ...) moed_log_errno(MOED_LOG_WARNING, (r), __VA_ARGS__)

#endif
