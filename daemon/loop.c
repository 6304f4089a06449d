/* SPDX-License-Identifier: MIT */
/*
 * The event loop of loop.h, on epoll.  Registrations live in an array
 * indexed by descriptor, as ae's events[]; each carries a serial number
 * that also goes into the epoll event, so that an event for a descriptor
 * that was deleted, or deleted and reused, earlier in the same pass is
 * recognised as stale and dropped.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "loop.h"

#define LOOP_BATCH 32               /* events taken from epoll per pass */
#define LOOP_GROW_MIN 64u           /* descriptors the registry first has room for */

struct reg {
	unsigned mask;                  /* MOED_LOOP_NONE: free */
	uint32_t serial;                /* of this registration, in its epoll events */
	moed_loop_fn *fn;
	void *data;
};

struct moed_loop {
	int epfd;
	struct reg *regs;               /* [nregs], indexed by descriptor */
	size_t nregs;
	uint32_t next_serial;
};

static uint32_t epoll_mask(unsigned mask)
{
	/* EPOLLRDHUP with READABLE: a peer's shutdown shows as soon as it
	 * happens, not only at the next read */
	return (mask & MOED_LOOP_READABLE ? EPOLLIN | EPOLLRDHUP : 0) | (mask & MOED_LOOP_WRITABLE ? EPOLLOUT : 0);
}

static struct epoll_event event_of(int fd, const struct reg *r)
{
	/* the descriptor in the low half, the serial in the high one */
	return (struct epoll_event){ .events = epoll_mask(r->mask),
				     .data.u64 = (uint64_t)(uint32_t)fd | (uint64_t)r->serial << 32 };
}

int moed_loop_new(struct moed_loop **ret)
{
	struct moed_loop *l = calloc(1, sizeof(*l));

	if (!l)
		return -ENOMEM;
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (l->epfd < 0) {
		int r = -errno;

		free(l);
		return r;
	}
	*ret = l;
	return 0;
}

void moed_loop_free(struct moed_loop *l)
{
	if (!l)
		return;
	close(l->epfd);
	free(l->regs);
	free(l);
}

static struct reg *reg_of(struct moed_loop *l, int fd)
{
	if (fd < 0 || (size_t)fd >= l->nregs || l->regs[fd].mask == MOED_LOOP_NONE)
		return NULL;
	return &l->regs[fd];
}

int moed_loop_add(struct moed_loop *l, int fd, unsigned mask, moed_loop_fn *fn, void *data)
{
	struct epoll_event ev;
	struct reg *r;

	mask &= MOED_LOOP_READABLE | MOED_LOOP_WRITABLE;
	if (fd < 0 || !fn || mask == MOED_LOOP_NONE)
		return -EINVAL;
	if (reg_of(l, fd))
		return -EEXIST;
	if ((size_t)fd >= l->nregs) {
		size_t n = l->nregs ? l->nregs : LOOP_GROW_MIN;
		struct reg *g;

		while (n <= (size_t)fd)
			n *= 2;
		g = realloc(l->regs, n * sizeof(*g));
		if (!g)
			return -ENOMEM;
		for (size_t i = l->nregs; i < n; i++)
			g[i] = (struct reg){ .mask = MOED_LOOP_NONE };
		l->regs = g;
		l->nregs = n;
	}
	r = &l->regs[fd];
	*r = (struct reg){ .mask = mask, .serial = ++l->next_serial, .fn = fn, .data = data };
	ev = event_of(fd, r);
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int e = -errno;

		r->mask = MOED_LOOP_NONE;
		return e;
	}
	return 0;
}

int moed_loop_modify(struct moed_loop *l, int fd, unsigned mask)
{
	struct reg *r = reg_of(l, fd);
	struct epoll_event ev;

	mask &= MOED_LOOP_READABLE | MOED_LOOP_WRITABLE;
	if (!r)
		return -ENOENT;
	if (mask == MOED_LOOP_NONE)
		return -EINVAL;
	r->mask = mask;
	ev = event_of(fd, r);
	return epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev) < 0 ? -errno : 0;
}

void moed_loop_del(struct moed_loop *l, int fd)
{
	struct reg *r = reg_of(l, fd);

	if (!r)
		return;
	epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
	r->mask = MOED_LOOP_NONE;
}

int moed_loop_run_once(struct moed_loop *l, int timeout_ms)
{
	struct epoll_event evs[LOOP_BATCH];
	int n = epoll_wait(l->epfd, evs, LOOP_BATCH, timeout_ms), ran = 0;

	if (n < 0)
		return errno == EINTR ? 0 : -errno;
	for (int i = 0; i < n; i++) {
		int fd = (int)(uint32_t)evs[i].data.u64;
		uint32_t serial = (uint32_t)(evs[i].data.u64 >> 32), e = evs[i].events;
		struct reg *r = reg_of(l, fd);
		unsigned mask = 0;

		/* deleted, or deleted and registered again, by an earlier handler */
		if (!r || r->serial != serial)
			continue;
		if (e & EPOLLIN)
			mask |= MOED_LOOP_READABLE;
		if (e & EPOLLOUT)
			mask |= MOED_LOOP_WRITABLE;
		if (e & (EPOLLHUP | EPOLLRDHUP | EPOLLERR))
			mask |= MOED_LOOP_HUP;
		r->fn(l, fd, r->data, mask);
		ran++;
	}
	return ran;
}
