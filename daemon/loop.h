/* SPDX-License-Identifier: MIT */
/*
 * The control thread's event loop, in the manner of Redis's ae: a
 * component registers each descriptor it owns with the events it wants, a
 * handler and that handler's data, and the loop calls the handler when the
 * descriptor is ready.  Nothing in the loop knows what a descriptor is: the
 * listening socket, the signalfd, the timerfd, the stats eventfd and each
 * client's socket all register themselves (daemon/lifecycle.c,
 * daemon/session.c).  Timers are timerfds, so they are descriptors too.
 *
 * One thread: a loop and its handlers run on the thread that calls
 * moed_loop_run_once().  A handler may add, modify and delete any
 * registration, its own included; an event still pending in the same pass
 * for a descriptor deleted (or deleted and registered again, the number
 * reused) is dropped, never delivered to the new owner.  Never logs.
 */
#ifndef MOED_LOOP_H
#define MOED_LOOP_H

/* Event masks: what a registration waits for, what a handler is told. */
#define MOED_LOOP_NONE 0u          /* not registered (internal) */
#define MOED_LOOP_READABLE 1u      /* data to read, or a connection to accept */
#define MOED_LOOP_WRITABLE 2u      /* room to write */
#define MOED_LOOP_HUP 4u           /* told only: the peer hung up or the
				    * descriptor failed (reading says which) */

struct moed_loop;

/* A handler: @mask has the events that happened (MOED_LOOP_*). */
typedef void moed_loop_fn(struct moed_loop *l, int fd, void *data, unsigned mask);

/* A new loop in *@ret: 0, or -errno (epoll_create1). */
int moed_loop_new(struct moed_loop **ret);

/* Free @l; the descriptors stay open (their owners close them).  NULL is fine. */
void moed_loop_free(struct moed_loop *l);

/*
 * Call @fn(l, @fd, @data, events) when @fd has any of the events in @mask
 * (READABLE and/or WRITABLE; HUP is always reported).  0, -EEXIST when @fd
 * is registered already, -EINVAL, -ENOMEM, or epoll's -errno.
 */
int moed_loop_add(struct moed_loop *l, int fd, unsigned mask, moed_loop_fn *fn, void *data);

/* Wait for @mask on @fd instead, same handler and data: 0, -ENOENT when
 * @fd is not registered, or epoll's -errno. */
int moed_loop_modify(struct moed_loop *l, int fd, unsigned mask);

/* Forget @fd (before its owner closes it).  Unknown descriptors are fine. */
void moed_loop_del(struct moed_loop *l, int fd);

/*
 * Wait at most @timeout_ms (-1: no limit) for events and run their
 * handlers.  Returns how many handlers ran (0 after a timeout or a
 * signal), or epoll's -errno.
 */
int moed_loop_run_once(struct moed_loop *l, int timeout_ms);

#endif
