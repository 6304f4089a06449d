/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient's internals, shared by its files: moeclient.c (errors,
 * version, sessions: connect, info, disconnect), arena.c (the arena
 * allocator), request.c (submit, wait, forward, stats) and device.c (GPU-resident
 * buffers).  Nothing here is exported: the library is built with
 * -fvisibility=hidden and libmoeclient.map, and only MOE_EXPORT functions
 * are public.
 */
#ifndef MOE_CLIENT_IMPL_H
#define MOE_CLIENT_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "moeclient.h"
#include "proto/proto.h"
#include "proto/segment.h"

#define MOE_EXPORT __attribute__((visibility("default")))

#define HELLO_TIMEOUT_MS 10000    /* moed answers a HELLO at once; this is for a stuck one */
#define WAIT_SLICE_NS 100000000u  /* a sleeper looks at the daemon's health this often */
#define SPIN_NS 20000u            /* poll the completion ring this long before sleeping,
				   * on machines with cores to spare (see client_spin) */
#define TAG_SYNC (1ull << 63)     /* user_data of moe_client_forward's own requests */
#define ARENA_ALIGN MOE_SEG_ARENA_ALIGN  /* allocations: the arena itself starts so aligned */

struct extent {
	uint64_t off, len;
};

struct moe_client {
	int fd;
	struct moe_seg_view seg;      /* the mapped segment (proto/segment.h) */
	struct moe_msg_welcome *w;
	uint32_t *layers;

	pthread_mutex_t sq_lock;      /* submitters */
	pthread_mutex_t cq_lock;      /* reapers; stash */
	pthread_mutex_t arena_lock;   /* the allocator */
	pthread_mutex_t ctl_lock;     /* the control socket (stats, device regions) */
	bool ctl_broken;              /* an exchange broke off: the stream is out of step */
	pthread_mutex_t dreg_lock;    /* dregion */
	struct {                      /* device memory moed mapped */
		uintptr_t start;
		uint64_t bytes;
		bool used;
	} dregion[MOE_MAX_REGIONS];
	uint32_t sleepers;            /* threads asleep on client_futex (cq_lock) */
	uint64_t spin_ns;             /* how long a waiter polls before it sleeps */
	uint64_t sync_seq;

	/* completions reaped but not yet returned (cq_lock) */
	struct moe_completion *stash;
	size_t nstash, capstash;

	/* the arena: free extents, sorted; live allocations */
	struct extent *free_ext, *used;
	size_t nfree, capfree, nused, capused;
};

/* Calls between the files (their contracts are above their definitions). */
uint64_t client_mono_ns(void);
int client_recv_full(int fd, void *buf, size_t len, int *fd_out);
int client_ctl_send(struct moe_client *c, uint32_t type, const void *payload, uint32_t len);
bool client_is_moe_layer(const struct moe_client *c, uint32_t layer);
int client_session_state(struct moe_client *c);
int client_wait_for(struct moe_client *c, uint64_t want, struct moe_completion *ret, int timeout_ms);
int client_submit_sync(struct moe_client *c, const struct moe_request *q, struct moe_sqe *raw, uint64_t *tag);

/* lasterr.c: the thread's last error text (moe_client_last_error).
 * client_error() sets it and returns @r; client_error_connect() words a
 * failed connect to @path, with moed's @refusal when it sent one;
 * client_error_layer() names the served layers. */
int client_error(int r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int client_error_connect(const char *path, int r, const char *refusal);
int client_error_layer(const struct moe_client *c, uint32_t layer);
void client_error_clear(void);

#endif
