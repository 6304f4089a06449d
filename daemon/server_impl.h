/* SPDX-License-Identifier: MIT */
/*
 * moed's server, inside: the structures its files share and the calls
 * between them.  Not for main.c (server.h is its interface).
 *
 * Two threads.  The control thread runs the event loop (loop.h): the
 * listening socket, every client's control socket, the signals (a
 * signalfd), a timer (systemd status and watchdog) and the stats eventfd.
 * It accepts, checks the peer's credentials, answers HELLO with a sealed
 * memfd segment, answers STATS and the CUDA messages, reloads, and notices
 * a session's end when its socket closes (session.c, stats.c, cudaipc.c,
 * lifecycle.c).  The data thread owns the engine and every client's rings:
 * each pass it takes what every client has submitted (copying and checking
 * each descriptor), runs all requests for a layer as one batch through the
 * engine, writes the outputs into the clients' arenas and the completions
 * into their rings, and sleeps on the clients' futex words when there is
 * nothing to do (dataplane.c).
 *
 * Nothing the data thread does waits on a client: a client that stops
 * reading its completion ring only stops getting more of its requests
 * taken.  Whatever a client writes into its segment can only make its own
 * requests fail or its own session end.
 *
 * Ownership, as the comments on the fields below say it:
 *   control  only the control thread reads or writes it;
 *   data     only the data thread;
 *   fixed    written before the other thread can see the object (a
 *            session before it is handed over under s->lock, the server
 *            before the data thread starts), read-only after;
 *   lock X   either thread, holding X;
 *   atomic   either thread, with the ordering its comment gives.
 * Handing over: a session goes from the control thread to the data thread
 * through s->incoming under s->lock (the mutex orders everything written
 * before); it comes back for freeing through c->dead; the control thread
 * asks the data thread for work on the engine (a stats snapshot, a
 * reload's pins) with a flag and dataplane_wake(), because only the data
 * thread may call the engine's forward, stats and pin functions.
 */
#ifndef MOED_SERVER_IMPL_H
#define MOED_SERVER_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "engine/engine.h"
#include "proto/proto.h"
#include "proto/segment.h"
#include "conf.h"
#include "loop.h"
#include "server.h"

#define LAT_SAMPLES 4096u           /* request latencies kept for percentiles */
#define PINS_MSG_MAX 256            /* why the engine refused a reload's pins */

/* A device-memory region a client mapped (MOE_MSG_CUDA_MAP), cudaipc.c. */
struct region {
	enum { REG_FREE, REG_MAPPING, REG_MAPPED, REG_CLOSING } state;
	void *base;                  /* the mapped allocation */
	uint64_t offset, bytes;      /* the region in it */
	uint32_t busy;               /* requests running on it (the data thread counts) */
};

/* One session: a client's control socket and, after HELLO, its segment. */
struct client {
	struct moed_server *s;           /* fixed: its server (the loop hands handlers the client only) */
	uint32_t id;                     /* fixed: the daemon's number for it */
	int fd;                          /* fixed: control socket (the data thread shuts it down
					  * to end a session; whoever frees the client closes it) */
	pid_t pid;                       /* fixed: SO_PEERCRED at accept */
	uid_t uid;                       /* fixed */
	gid_t gid;                       /* fixed */
	uint64_t accepted_ns;            /* fixed: for the HELLO timeout (moe_now_ns) */

	/* control: the message being read (the largest kind) */
	uint8_t in[sizeof(struct moe_msg_header) +
		   (sizeof(struct moe_msg_hello) > sizeof(struct moe_msg_cuda_map) ? sizeof(struct moe_msg_hello)
										  : sizeof(struct moe_msg_cuda_map))];
	size_t in_len;                   /* control */
	bool welcomed;                   /* control: the WELCOME went out; the data thread has it */
	/* control: replies waiting to be sent (STATS, CUDA), and STATS
	 * requests waiting for the data thread's next snapshot */
	uint8_t *out;
	size_t out_len, out_off;
	uint32_t stats_waiting;
	uint64_t stats_since;            /* control: when the oldest of them came (ns) */
	struct client *stats_next;       /* control: in s->stats_waiters */

	/* fixed: the segment, laid out by the control thread before the
	 * handover (session.c: segment_make); its contents are shared with
	 * the client as proto.h says, and the data thread alone touches the
	 * rings */
	struct moe_seg_view seg;
	uint32_t max_tokens;             /* fixed: per request, what its arena holds within the limit */

	/* data: its own copies, never read back from the segment */
	uint32_t sq_head;
	uint32_t cq_tail;

	atomic_bool dead;                /* atomic (seq_cst): the control socket closed, the control
					  * thread is done with it; the data thread frees it */
	bool kicked;                     /* data: the data thread ended the session */
	atomic_bool asked_stats;         /* atomic: it sent STATS; with no requests of its own it is
					  * an observer (moectl stats), not a client the stats count */

	/* data: figures (read by the stats snapshot, on the data thread too,
	 * and by the session's last log line, after the data thread let go) */
	uint64_t requests, tokens, errors;

	/* device memory the client mapped (CUDA backend): the control thread
	 * adds and removes regions, the data thread uses them, both under
	 * rlock, which the data thread holds while it looks a region up and
	 * counts it busy (cudaipc.c) */
	pthread_mutex_t rlock;           /* held only briefly, never across a forward */
	struct region regions[MOE_MAX_REGIONS];  /* lock rlock */
	uint32_t map_refusals;           /* control: logged, the first few */
	bool dev_taken;                  /* data: a device request taken this pass */

	struct client *next;             /* lock s->lock while in s->incoming; then data, in s->clients */
	struct client *ctl_next;         /* control: in s->greeting before HELLO, in
					  * s->sessions after it */
};

/* A request taken from a ring, checked, waiting for its batch (data). */
struct req {
	struct client *c;
	struct moe_sqe sqe;              /* our copy */
	uint64_t t0;                     /* when it was taken */
	size_t seq;                      /* its place in the pass (qsort is not stable) */
};

struct moed_server {
	/* the live configuration: the pointer is fixed; a reload writes its
	 * live fields in place (lifecycle.c) under cfg_lock, and the data
	 * thread reads them under cfg_lock; the control thread, their only
	 * writer, reads them without it; the other fields never change */
	struct moed_config *cfg;
	pthread_mutex_t cfg_lock;
	char *config_path;               /* fixed */
	struct moed_override *ov;        /* fixed: the command line's settings (copies) */
	size_t nov;                      /* fixed */

	/* the engine: its forward, stats and pin calls belong to the data
	 * thread alone (it is not thread-safe); the control thread only reads
	 * what never changes after open (store, model, backend) and maps
	 * device memory, which is safe from any thread */
	struct moe_engine *engine;
	const struct moe_model_config *mc;   /* fixed */

	/* control: the event loop and the descriptors registered in it */
	struct moed_loop *loop;
	bool running;                    /* control: false once a stop signal came */
	int listen_fd;
	bool socket_activated;           /* fixed */
	bool unlink_socket;              /* fixed: we bound it, so remove it at exit */
	char socket_path[108];           /* fixed: what we bound (moed_socket_place) */
	int sigfd, timerfd;
	int spare_fd;                    /* control: given up to accept and drop a connection at EMFILE */
	uint32_t next_id;                /* control */
	uint32_t nclients;               /* control: sessions welcomed and not yet ended */
	struct client *greeting;         /* control: sessions that have not said HELLO,
					  * the newest first */
	uint32_t ngreeting;              /* control */
	struct client *sessions;         /* control: the welcomed ones, for the per-uid quota */

	/* between the threads */
	pthread_mutex_t lock;            /* guards incoming, the stats snapshot and pins_req */
	struct client *incoming;         /* lock: sessions that said HELLO, for the data thread */
	atomic_uint wake_word;           /* atomic: the data thread's futex word (dataplane_wake) */
	atomic_bool stop;                /* atomic: the data thread drains and ends */
	atomic_bool stats_wanted;        /* atomic: the control thread asks for a snapshot */
	uint64_t stats_gen;              /* lock: bumped with each snapshot */
	char *stats_json;                /* lock: the latest snapshot */
	int stats_efd;                   /* fixed: the data thread says "a snapshot is ready" */
	struct client *stats_waiters;    /* control: sessions waiting for one */
	atomic_uint live_clients;        /* atomic: a count for STATUS= and the snapshot, nothing ordered by it */
	_Atomic uint64_t heartbeat;      /* atomic: the data thread's last sign of life (ns) */
	uint64_t watchdog_ns;            /* fixed: WatchdogSec, 0 without a watchdog */
	uint64_t slice_ns;               /* fixed: the data thread sleeps at most this long */

	/* a reload's pins for the engine: the control thread fills pins_req,
	 * sets pins_wanted and waits on pins_cond; the data thread applies
	 * them between passes, when no forward runs (dataplane.c) */
	atomic_bool pins_wanted;         /* atomic (seq_cst, before the wake): pins_req is filled */
	struct {
		const char *const *pin;  /* lock: borrowed from the reload's configuration,
					  * which outlives the wait */
		uint32_t pin_hot;        /* lock */
		bool done;               /* lock: the data thread answered */
		int result;              /* lock: 0, or moe_engine_set_pins's -errno */
		char msg[PINS_MSG_MAX];  /* lock: its message */
	} pins_req;
	pthread_cond_t pins_cond;        /* with lock: pins_req.done became true */

	pthread_t data_thread;           /* control */
	bool data_ok;                    /* control: the data thread runs */

	/* data: the data thread's own state */
	struct client *clients;          /* the sessions it serves */
	struct req *reqs;
	size_t reqs_cap;
	float *x, *y;                    /* a batch's gathered input and output */
	int32_t *ids;                    /* its routing */
	float *w;
	size_t xcap, ycap, rcap;
	uint64_t lat[LAT_SAMPLES];
	uint64_t lat_n;
	uint64_t total_requests, total_tokens, total_errors, total_batches;
	uint64_t started_ns;             /* fixed once the data thread started */
	/* tokens per second over the last status period: the data thread adds
	 * to tps_tokens, the control thread's status tick takes it (an atomic
	 * exchange: no batch lost between read and reset) and writes tps,
	 * which the data thread's stats snapshot reads; tps_t0 is the control
	 * thread's alone */
	_Atomic double tps;
	_Atomic uint64_t tps_tokens;
	uint64_t tps_t0;
};

/* ------------------------------------------------------------------ dataplane.c (data thread) */

/* The data thread's main function (pthread_create's @arg is the server). */
void *dataplane_main(void *arg);

/* Wake the data thread (any thread): a session came or went, a stats
 * snapshot or new pins are wanted, or it must stop. */
void dataplane_wake(struct moed_server *s);

/* ------------------------------------------------------------------ session.c (control thread) */

/* The listening socket's handler: accept one connection, check the peer. */
void session_accept(struct moed_loop *l, int fd, void *data, unsigned mask);

/* The session's socket closed or misbehaved: stop watching it; free it
 * now (before HELLO) or hand it back to the data thread for freeing. */
void session_end(struct moed_server *s, struct client *c);

/* Free @c and its segment and regions, closing its socket and logging the
 * session's figures if it was welcomed.  The thread that holds it last:
 * the data thread for welcomed sessions, the control thread before HELLO,
 * moed_server_free at exit.  NULL is fine. */
void session_free(struct moed_server *s, struct client *c);

/* Queue one message for @c and start sending it: 0, or -errno when the
 * session must end (-ENOBUFS for a client that asks and never reads). */
int session_reply(struct moed_server *s, struct client *c, uint32_t type, const void *payload, size_t len);

/* Drop the sessions that have not said HELLO within limits.hello_timeout_ms
 * (the status tick, and each accept). */
void session_expire_greetings(struct moed_server *s);

/* ------------------------------------------------------------------ stats.c */

/* Control: MOE_MSG_STATS from @c; answered by the next snapshot. */
void stats_request(struct moed_server *s, struct client *c);

/* Control: answer the waiting sessions, all (@all) or only those that
 * waited longer than their limit (with the latest snapshot). */
void stats_deliver(struct moed_server *s, bool all);

/* Control: @c ends; it waits for nothing any more. */
void stats_forget(struct moed_server *s, struct client *c);

/* Control: the stats eventfd's handler (a snapshot is ready). */
void stats_ready_event(struct moed_loop *l, int fd, void *data, unsigned mask);

/* Data: take a snapshot (the engine's figures are the data thread's). */
void stats_snapshot(struct moed_server *s);

/* ------------------------------------------------------------------ cudaipc.c */

/* Control: MOE_MSG_CUDA_MAP / MOE_MSG_CUDA_UNMAP from @c, answered; 0 or
 * -errno when the session must end (the answer could not be queued). */
int cudaipc_map(struct moed_server *s, struct client *c, const struct moe_msg_cuda_map *m);
int cudaipc_unmap(struct moed_server *s, struct client *c, const struct moe_msg_cuda_unmap *m);

/* Data: is [off, off + len) inside @c's region @r?  (A check at take
 * time; the region may go before the request runs: cudaipc_hold.) */
bool cudaipc_region_ok(struct client *c, uint32_t r, uint64_t off, uint64_t len);

/* Data: the addresses of request @q's input and output regions (@bytes
 * each), both marked busy so that an unmap meanwhile waits: 0, or -EFAULT
 * when a region is gone.  Pair with cudaipc_release() after the forward. */
int cudaipc_hold(struct client *c, const struct moe_sqe *q, uint64_t bytes, uint8_t **ret_in,
		 uint8_t **ret_out);
void cudaipc_release(struct moed_server *s, struct client *c, const struct moe_sqe *q);

/* Whoever frees @c: unmap what it still has mapped. */
void cudaipc_unmap_all(struct moed_server *s, struct client *c);

#endif
