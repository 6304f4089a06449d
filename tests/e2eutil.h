/* SPDX-License-Identifier: MIT */
/*
 * End to end: the harness of the check_daemon_* suites, which run a real
 * moed on a temporary socket and real clients in other processes, and
 * check what the clients get against the engine run in-process.
 *  - the model they share (model_make()) and its in-process engine;
 *  - client processes (spawn(), child_wait()) that report through their
 *    exit status and a shared page (struct board), print what went wrong
 *    on stderr, and leave with _exit(): an exit() would run the test's
 *    atexit handlers (which kill moed and remove the model);
 *  - moed, started and stopped with Check assertions that print its log;
 *  - requests of random sizes, layers and dtypes, checked bit for bit
 *    (client_round());
 *  - sessions made by libmoeclient (session_open()).
 *
 * Each test makes its own model and its own moed (Check forks each test;
 * a moed or client left behind is killed when the test's process exits,
 * files are removed with the run's directory).  $MOED and $MOECTL name the
 * programs (default ../daemon/moed, ../client/moectl).
 *
 * The names are short and unprefixed, as they were when the daemon tests
 * were one file: this header is for those suites only.  Functions that
 * return a status leave the reason in @why; the others assert.
 */
#ifndef MOE_E2EUTIL_H
#define MOE_E2EUTIL_H

#include <check.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "daemonutil.h"
#include "engine/engine.h"
#include "libmoeclient/moeclient.h"
#include "testutil.h"

#define READY_TIMEOUT_MS 60000   /* moed opens its store and listens (ASan is slow) */
#define STOP_TIMEOUT_MS 15000    /* moed exits after SIGTERM */
#define CLIENT_TIMEOUT_MS 60000  /* a client process finishes its work */
#define WAIT_MS 30000            /* one completion, when nothing is wrong */
#define MAX_CHILDREN 32

/* CLOCK_MONOTONIC in nanoseconds: the same clock in every process. */
uint64_t now_ns(void);

/* ------------------------------------------------------------------ the model */

/*
 * deepseek_v3, bf16 weights, 4 layers (layer 0 dense, so there is a layer
 * number that is not an MoE layer), hidden 256, 32 experts in 4 groups,
 * top-4, one shared expert: a 10 MB store, made in a fraction of a second
 * in moe_test_tmpdir(@tag).
 */
void model_make(struct moe_test_model *m, const char *tag);

/* The reference: the engine in this process, on the CPU backend as moed's
 * config says.  Only after the last fork() of a process (threads). */
int ref_open(const struct moe_test_model *m, struct moe_engine **ret, char *why, size_t len);

/* ------------------------------------------------------------------ children */

/* The running moed, 0 when none: killed when the test process exits. */
extern pid_t moed_pid;

/* Run @fn(@arg) in a child process; its return value is the exit status. */
pid_t spawn(int (*fn)(void *), void *arg);

/* Wait for @pid at most @timeout_ms: its exit status, -1 if a signal ended
 * it, -2 on timeout (then it is killed). */
int child_wait(pid_t pid, int timeout_ms, int *ret_sig);

/* @pid, named @what in messages, exits 0 within CLIENT_TIMEOUT_MS. */
void assert_child_ok(pid_t pid, const char *what);

/* Shared between the test and its client processes. */
struct board {
	atomic_int stop;                 /* clients: finish the round and go idle */
	atomic_int release;              /* idle clients: disconnect and exit */
	atomic_int ready[MAX_CHILDREN];  /* connected */
	atomic_int idle[MAX_CHILDREN];   /* stopped working, still connected */
	atomic_ullong rounds[MAX_CHILDREN];
	atomic_int state[MAX_CHILDREN];  /* test-specific */
	atomic_llong t_err[MAX_CHILDREN];
	atomic_int err[MAX_CHILDREN];
};

/* A zeroed board in a shared mapping (munmap() it). */
struct board *board_new(void);

/* ------------------------------------------------------------------ moed */

/* Like ck_assert_msg(), with moed's log on stderr first when it fails. */
#define moed_assert(d, cond, ...)                            \
	do {                                                 \
		if (!(cond)) {                               \
			moe_test_moed_dump_log(d, 0);        \
			ck_abort_msg(__VA_ARGS__);           \
		}                                            \
	} while (0)

/* Write the config (@sock_extra inside socket = { }, @extra at the top
 * level) in @m's directory, nothing started. */
void moed_config(struct moe_test_moed *d, const struct moe_test_model *m, const char *sock_extra,
		 const char *extra);

/* Start moed on the config and wait until its socket accepts. */
void moed_start(struct moe_test_moed *d);

/* SIGTERM; moed must exit 0 within STOP_TIMEOUT_MS. */
void moed_stop(struct moe_test_moed *d);

/* ------------------------------------------------------------------ requests */

/* A request's tensors and the in-process answers. */
struct job {
	uint32_t layer, dtype;
	uint64_t T;
	bool routing, async;
	size_t bytes;                /* T * H * element size */
	void *in, *out;              /* malloc'ed, or in the arena */
	int32_t *ids;
	float *w;
	void *want;
	int32_t *want_ids;
	float *want_w;
};

/* @n random activations in [-2, 2) of @dtype (MOE_F32 or MOE_BF16). */
void fill_input(void *in, uint32_t dtype, size_t n, uint64_t *rng);

/* What moed must answer for @j, into j->want*: bf16 goes through float32
 * both ways, as moed's gather and scatter do.  0, or < 0 with @why. */
int ref_forward(struct moe_engine *e, const struct moe_test_model *m, struct job *j, char *why, size_t len);

/* Free what ref_forward() made. */
void job_free(struct job *j);

/* The daemon's output for @j must be the in-process one, bit for bit:
 * 0, or -1 with the first difference in @why. */
int job_check(const struct moe_test_model *m, const struct job *j, char *why, size_t len);

/* Uniform in [0, @n). */
uint32_t rand_below(uint64_t *rng, uint64_t n);

/*
 * One round of @n requests of 1..@max_tokens tokens on random layers and
 * dtypes, some with routing out: with @async, all in the arena, submitted
 * together and reaped in any order; else one moe_client_forward() each.
 * 0, or -1 with @why.
 */
int client_round(struct moe_client *c, struct moe_engine *e, const struct moe_test_model *m, uint64_t *rng, int n,
		 bool async, uint32_t max_tokens, char *why, size_t len);

/* ------------------------------------------------------------------ client processes */

/* A client process's session: engine, connection, the model it reports. */
struct session {
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_model_info info;
};

/* Open the engine and connect to @sock; moe_client_info() must describe
 * @m.  0, or -1 with @why. */
int session_open(struct session *s, const struct moe_test_model *m, const char *sock, char *why, size_t len);

void session_close(struct session *s);

/* What a client process gets. */
struct client_arg {
	const struct moe_test_model *m;
	const char *sock;
	struct board *b;
	int id;
	int nreq;                    /* requests, or what the test says */
	uint32_t max_tokens;
};

/* Say on stderr that client @a failed and why: its exit status, 1. */
int client_fail(const struct client_arg *a, const char *why);

/*
 * Open a session, say so, and run rounds (random sizes, synchronous or up
 * to @nasync requests at once, checked bit for bit) until told to stop.
 * 0 with the session still open, or 1 after a failure was reported.
 */
int rounds_until_stop(const struct client_arg *a, struct session *s, uint64_t seed, uint32_t nasync);

/* ------------------------------------------------------------------ raw sessions (proto.h) */

/* Does the peer close @fd (EOF, reset, hang-up) within @timeout_ms?  What
 * it sends before is read and dropped. */
bool peer_closes(int fd, int timeout_ms);

#endif
