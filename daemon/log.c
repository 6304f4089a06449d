/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/clock.h"
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
	if (journal) {
		/* the journal stamps each line itself, and reads the <level> */
		n = snprintf(line, sizeof(line), "<%d>", level);
	} else {
		/* a file or a terminal has no time of its own: UTC, to the
		 * millisecond, ISO 8601, so that lines sort and compare across
		 * hosts and the daylight-saving change */
		struct timespec ts;
		struct tm tm;
		char when[32] = "";

		clock_gettime(CLOCK_REALTIME, &ts);
		if (gmtime_r(&ts.tv_sec, &tm))
			strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
		n = snprintf(line, sizeof(line), "%s.%03ldZ moed: %s: ", when, ts.tv_nsec / 1000000L,
			     names[level & 7]);
	}
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

/* --- rate-limited classes -------------------------------------------------------- */

#define RL_BURST_DEFAULT 10
#define RL_INTERVAL_MS_DEFAULT 5000

static const char *const event_names[MOED_EVENT_COUNT] = {
	[MOED_EVENT_REFUSED] = "refused",
	[MOED_EVENT_LIMIT] = "limit",
	[MOED_EVENT_NO_HELLO] = "no_hello",
	[MOED_EVENT_PROTOCOL] = "protocol",
	[MOED_EVENT_REQUEST] = "request_error",
	[MOED_EVENT_STORE] = "store",
	[MOED_EVENT_SESSION] = "session",
};

struct window {
	uint64_t start_ns;      /* lock: this interval began (0: no event yet) */
	uint32_t logged;        /* lock: lines written in it */
	uint64_t suppressed;    /* lock: events not written in it */
	int level;              /* lock: of the last suppressed one, for the summary */
};

static pthread_mutex_t rl_lock = PTHREAD_MUTEX_INITIALIZER;
static struct window windows[MOED_EVENT_COUNT];     /* lock rl_lock */
static _Atomic uint64_t event_counts[MOED_EVENT_COUNT];
static uint32_t rl_burst = RL_BURST_DEFAULT;        /* lock rl_lock */
static uint64_t rl_interval_ns = (uint64_t)RL_INTERVAL_MS_DEFAULT * 1000000u;  /* lock rl_lock */

void moed_log_set_ratelimit(uint32_t burst, uint32_t interval_ms)
{
	pthread_mutex_lock(&rl_lock);
	rl_burst = burst;
	rl_interval_ns = (uint64_t)interval_ms * 1000000u;
	pthread_mutex_unlock(&rl_lock);
}

const char *moed_log_event_name(enum moed_event ev)
{
	return (unsigned)ev < MOED_EVENT_COUNT ? event_names[ev] : "?";
}

uint64_t moed_log_event_count(enum moed_event ev)
{
	return (unsigned)ev < MOED_EVENT_COUNT ? atomic_load(&event_counts[ev]) : 0;
}

/* Close @w's interval if it is over at @now, with its summary (rl_lock held). */
static void window_roll(enum moed_event ev, struct window *w, uint64_t now)
{
	if (w->start_ns && now - w->start_ns < rl_interval_ns)
		return;
	if (w->suppressed)
		moed_log(w->level, "%" PRIu64 " more %s messages suppressed in the last %.1f s", w->suppressed,
			 event_names[ev], (double)(now - w->start_ns) / 1e9);
	/* a new interval begins with the next event, not now: an idle class
	 * has no interval running */
	w->start_ns = 0;
	w->logged = 0;
	w->suppressed = 0;
}

bool moed_log_event_ratelimit(enum moed_event ev, int level)
{
	struct window *w;
	bool pass;

	if ((unsigned)ev >= MOED_EVENT_COUNT)
		return true;
	atomic_fetch_add(&event_counts[ev], 1);
	if (level > max_level)
		return false;         /* not logged anyway: it uses up no burst */
	pthread_mutex_lock(&rl_lock);
	w = &windows[ev];
	if (!rl_interval_ns) {
		pthread_mutex_unlock(&rl_lock);
		return true;
	}
	uint64_t now = moe_now_ns();

	window_roll(ev, w, now);
	if (!w->start_ns)
		w->start_ns = now;
	pass = w->logged < rl_burst;
	if (pass) {
		w->logged++;
	} else {
		w->suppressed++;
		w->level = level;
	}
	pthread_mutex_unlock(&rl_lock);
	return pass;
}

void moed_log_event(enum moed_event ev, int level, const char *fmt, ...)
{
	va_list ap;

	if (!moed_log_event_ratelimit(ev, level))
		return;
	va_start(ap, fmt);
	vlog(level, fmt, ap);
	va_end(ap);
}

void moed_log_events_flush(void)
{
	uint64_t now = moe_now_ns();

	pthread_mutex_lock(&rl_lock);
	for (int ev = 0; ev < MOED_EVENT_COUNT; ev++)
		if (windows[ev].start_ns)
			window_roll((enum moed_event)ev, &windows[ev], now);
	pthread_mutex_unlock(&rl_lock);
}
