/* SPDX-License-Identifier: MIT */
/*
 * bench_soak's parts (bench/bench_soak.c says what the soak does): the
 * board the driver and its client processes share, and the three kinds of
 * client.  Each client is a process of its own, forked by the driver
 * before anything opens an engine or a session, so that a client that
 * crashes, hangs or is stopped takes nothing else with it; it reports
 * through the board only (counters and the first failure's text) and
 * leaves with _exit().
 */
#ifndef MOE_BENCH_SOAK_H
#define MOE_BENCH_SOAK_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "libmoeclient/moeclient.h"

/*
 * Error kinds: a counter per negative errno below 134 (every errno Linux
 * defines), then one per -MOE_E_*; kind 0 is anything else (a positive or
 * unknown code).  soak_kind() and soak_code() convert.
 */
#define SOAK_ERRNO_KINDS 134
#define SOAK_KINDS (SOAK_ERRNO_KINDS + (MOE_E_MAX - MOE_E_BASE))

static inline int soak_kind(int code)
{
	int e = code < 0 ? -code : code;

	if (e >= MOE_E_BASE && e < MOE_E_MAX)
		return SOAK_ERRNO_KINDS + (e - MOE_E_BASE);
	return e > 0 && e < SOAK_ERRNO_KINDS && code < 0 ? e : 0;
}

static inline int soak_code(int kind)
{
	return kind >= SOAK_ERRNO_KINDS ? -(MOE_E_BASE + kind - SOAK_ERRNO_KINDS) : -kind;
}

/* What one class of client did: requests checked, and how they failed. */
struct soak_counters {
	atomic_ullong requests;          /* forwards checked against the engine in-process */
	atomic_ullong tokens;
	atomic_ullong nops;              /* empty requests completed */
	atomic_ullong wrong;             /* outputs that differ from the in-process ones */
	atomic_ullong errors;            /* all failures, the sum of err[] */
	atomic_ullong err[SOAK_KINDS];
};

/* The hostile client's actions (soak_hostile.c). */
enum soak_act {
	ACT_GARBAGE,                     /* random bytes for a HELLO */
	ACT_BAD_HELLO,                   /* a HELLO with one field wrong */
	ACT_DROP,                        /* connect and hang up, maybe mid-message */
	ACT_BAD_SQE,                     /* a batch of descriptors, each wrong in one field */
	ACT_BAD_LAYER,                   /* forwards of layers the model does not have */
	ACT_RING,                        /* ring indices out of bounds */
	ACT_ABANDON,                     /* requests in flight, then the session closed */
	ACT_SILENT,                      /* connected, saying nothing, for a while */
	NACTS
};

extern const char *const soak_act_names[NACTS];

/* The stalling client's state, which the driver reads. */
enum soak_stall_state {
	STALL_WORKING,
	STALL_RING_FULL,                 /* not reading its full completion ring */
	STALL_STOPPING,                  /* about to SIGSTOP itself: the driver SIGCONTs it */
	STALL_HOLDING,                   /* end of the run: ring full until quit */
};

#define SOAK_WHY_LEN 512

/* Shared by the driver and every client (MAP_SHARED). */
struct soak_board {
	atomic_int stop;                 /* clients: finish what is in hand */
	atomic_int quit;                 /* the stalling client: let go of its ring, leave */
	atomic_int ready;                /* clients that have connected once */

	struct soak_counters good;       /* the well-behaved clients */
	struct soak_counters stall;      /* the stalling client's checked requests */
	struct soak_counters hostile;    /* what moed answered the hostile client (expected) */

	atomic_ullong acts[NACTS];       /* hostile actions done */
	atomic_ullong refused;           /* bad descriptors and HELLOs moed refused */
	atomic_ullong accepted_hellos;   /* mutant HELLOs moed accepted (harmless ones) */
	atomic_ullong ended;             /* sessions moed ended for corrupt rings */
	atomic_ullong unexpected;        /* hostile-client outcomes moed must never give */

	atomic_int stall_state;          /* enum soak_stall_state */
	atomic_ullong stalls_full, stalls_stopped;
	atomic_ullong stall_inflight;    /* requests in flight during the last stall */
	atomic_ullong reconnects;        /* well-behaved sessions closed and opened again */

	atomic_int have_why;             /* the first failure's text is in why */
	char why[SOAK_WHY_LEN];
};

/* What a client process is given. */
struct soak_client {
	struct soak_board *b;
	const char *sock, *store;
	int id;                          /* 0..clients-1; the others after */
	uint64_t seed;
	uint32_t max_tokens;             /* largest request, tokens */
	unsigned stall_ms;               /* the stalling client: each stall */
	unsigned work_ms;                /* the stalling client: work between stalls */
};

/* Record a failure of @who: the board's first text, and stderr (the first
 * few of each process). */
void soak_fail(struct soak_board *b, const char *who, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Count error @code in @k. */
void soak_count_err(struct soak_counters *k, int code);

/* The client processes: each returns its exit status. */
int soak_good_client(const struct soak_client *a);
int soak_stall_client(const struct soak_client *a);
int soak_hostile_client(const struct soak_client *a);

#endif
