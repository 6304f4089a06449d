/* SPDX-License-Identifier: MIT */
/*
 * A real moed for the tests that talk to one (check_client, check_daemon_*,
 * fuzz_proto): start it on a config in a temporary directory, wait until it
 * listens, stop it, read its log, count what it holds; and raw sessions
 * that speak proto.h by hand, as a client that does not use libmoeclient
 * would.
 *
 * Nothing here asserts: functions return 0 or a negative errno and the
 * caller reports, with Check or without (fuzz_proto's libFuzzer build
 * compiles this file alone, without Check, testutil.c or the engine).
 */
#ifndef MOE_DAEMONUTIL_H
#define MOE_DAEMONUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto/proto.h"

/* CLOCK_MONOTONIC in milliseconds. */
uint64_t moe_test_now_ms(void);

/* Sleep @ms milliseconds, across signals. */
void moe_test_sleep_ms(unsigned ms);

/* ------------------------------------------------------------------ moed */

/* One moed: its files, all in @dir, and its process. */
struct moe_test_moed {
	char dir[4096];
	char conf[4200], log[4200];
	char sock[108];              /* sizeof(sun_path) */
	pid_t pid;                   /* 0: not running */
};

/* The moed under test ($MOED, else ../daemon/moed). */
const char *moe_test_moed_path(void);

/*
 * Fill @d for @dir (moed.conf, moed.log and the socket @sock_name in it)
 * and write the config: @store, the CPU backend, the socket with
 * @sock_extra inside socket = { } and @extra at the top level (either may
 * be NULL).  Nothing is started.  0, -ENAMETOOLONG when the socket path
 * does not fit, or -errno from writing the file.
 */
int moe_test_moed_config(struct moe_test_moed *d, const char *dir, const char *sock_name, const char *store,
			 const char *sock_extra, const char *extra);

/*
 * Start moed on @d's config (stdout and stderr appended to its log; it
 * gets SIGKILL when this thread's process dies) and wait at most
 * @timeout_ms until its socket accepts.  0; -ECHILD if moed exited first
 * (its wait status in *@ret_status, d->pid 0); -ETIMEDOUT (moed still
 * runs, d->pid set: the caller kills it or leaves it to its process
 * group); -errno if fork failed.
 */
int moe_test_moed_start(struct moe_test_moed *d, int timeout_ms, int *ret_status);

/*
 * Wait at most @timeout_ms for moed to exit (after a signal the caller
 * sent): 0 and its wait status in *@ret_status, or -ETIMEDOUT after which
 * it is SIGKILLed and reaped.  d->pid is 0 either way.
 */
int moe_test_moed_reap(struct moe_test_moed *d, int timeout_ms, int *ret_status);

/* SIGTERM, then moe_test_moed_reap(). */
int moe_test_moed_stop(struct moe_test_moed *d, int timeout_ms, int *ret_status);

/* SIGKILL and reap, if it runs. */
void moe_test_moed_kill(struct moe_test_moed *d);

/* Is moed still running?  (Does not reap it.) */
bool moe_test_moed_alive(const struct moe_test_moed *d);

/* moed's log to stderr, the last @tail bytes of it (0: all of it). */
void moe_test_moed_dump_log(const struct moe_test_moed *d, size_t tail);

/* Does moed's log contain @needle? */
bool moe_test_moed_log_has(const struct moe_test_moed *d, const char *needle);

/* Open descriptors of @pid (-1 if unreadable); with @list, their targets
 * appended there (for messages). */
int moe_test_count_fds(pid_t pid, char *list, size_t len);

/* Mappings of client segments (memfd:moed-client) in @pid, -1 if unreadable. */
int moe_test_count_segments(pid_t pid);

/* ------------------------------------------------------------------ raw sessions */

/* Connect to the socket @sock: the descriptor or -errno. */
int moe_test_dial(const char *sock);

/* Send all of @buf (MSG_NOSIGNAL): 0 or -errno (-EPIPE: the peer closed). */
int moe_test_send_all(int fd, const void *buf, size_t len);

/*
 * Exactly @len bytes within @timeout_ms; the first descriptor passed along
 * goes into *@pass_fd while it is negative, others are closed.  0,
 * -ECONNRESET on EOF, -ETIMEDOUT, or -errno.
 */
int moe_test_recv_all(int fd, void *buf, size_t len, int *pass_fd, int timeout_ms);

/* Read and drop whatever the peer sends on @fd (closing descriptors passed
 * along) until it hangs up: true if it does within @timeout_ms. */
bool moe_test_wait_hangup(int fd, int timeout_ms);

/* Send the HELLO @h and read the WELCOME into @w (5 s each way): 0 (see
 * w->status) or -errno; the segment's descriptor as moe_test_recv_all(). */
int moe_test_hello_exchange(int fd, const struct moe_msg_hello *h, struct moe_msg_welcome *w, int *segfd);

/* A session made by hand: its socket, its mapped segment, its WELCOME. */
struct moe_test_raw {
	int fd;
	uint8_t *seg;
	size_t seg_bytes;
	struct moe_seg_header *hdr;
	struct moe_sqe *sq;
	struct moe_cqe *cq;
	uint8_t *arena;
	uint64_t arena_bytes;
	uint32_t sq_entries, cq_entries;
	struct moe_msg_welcome w;
};

/*
 * A session as libmoeclient makes one, on @sock with the HELLO @h (NULL:
 * a default one of this protocol version): 0, the WELCOME's negative
 * status, or -errno.  On failure nothing is left open and r->fd is -1.
 */
int moe_test_raw_open(struct moe_test_raw *r, const char *sock, const struct moe_msg_hello *h);

/* Unmap and close; @r is zeroed with fd -1.  Safe twice. */
void moe_test_raw_close(struct moe_test_raw *r);

/* Wake the daemon, the way libmoeclient does (proto.h, wakeups). */
void moe_test_raw_kick(struct moe_test_raw *r);

/* Put @n descriptors in the submission ring, publish them and kick. */
void moe_test_raw_push(struct moe_test_raw *r, const struct moe_sqe *q, uint32_t n);

/* Up to @n completions within @timeout_ms: how many came. */
uint32_t moe_test_raw_reap(struct moe_test_raw *r, struct moe_cqe *out, uint32_t n, int timeout_ms);

#endif
