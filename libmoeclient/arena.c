/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: the arena allocator (moe_client_alloc, moe_client_free):
 * first fit over the session's shared arena; free extents sorted and merged
 * with their neighbours.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "proto/futex.h"
#include "client_impl.h"

/* ------------------------------------------------------------------ the arena */

static int ext_push(struct extent **a, size_t *n, size_t *cap, size_t at, struct extent e)
{
	if (*n == *cap) {
		size_t nc = *cap ? 2 * *cap : 8;
		struct extent *na = realloc(*a, nc * sizeof(*na));

		if (!na)
			return -ENOMEM;
		*a = na;
		*cap = nc;
	}
	memmove(*a + at + 1, *a + at, (*n - at) * sizeof(**a));
	(*a)[at] = e;
	(*n)++;
	return 0;
}

static void ext_del(struct extent *a, size_t *n, size_t at)
{
	memmove(a + at, a + at + 1, (*n - at - 1) * sizeof(*a));
	(*n)--;
}

MOE_EXPORT int moe_client_alloc(struct moe_client *c, size_t bytes, void **ret)
{
	uint64_t len;
	int r = -ENOMEM;

	if (!c || !ret || bytes == 0)
		return -EINVAL;
	if (bytes > c->seg.arena_bytes)
		return -ENOMEM;
	len = (bytes + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
	pthread_mutex_lock(&c->arena_lock);
	for (size_t i = 0; i < c->nfree; i++) {
		struct extent *f = &c->free_ext[i];
		size_t at = 0;

		if (f->len < len)
			continue;
		while (at < c->nused && c->used[at].off < f->off)
			at++;
		r = ext_push(&c->used, &c->nused, &c->capused, at, (struct extent){ f->off, len });
		if (r < 0)
			break;
		*ret = c->seg.arena + f->off;
		f->off += len;
		f->len -= len;
		if (!f->len)
			ext_del(c->free_ext, &c->nfree, i);
		break;
	}
	pthread_mutex_unlock(&c->arena_lock);
	return r;
}

MOE_EXPORT int moe_client_free(struct moe_client *c, void *p)
{
	uint64_t off;
	size_t lo = 0, hi, at;
	struct extent e;
	int r = 0;

	if (!p)
		return 0;
	if (!c || (uint8_t *)p < c->seg.arena || (uint8_t *)p >= c->seg.arena + c->seg.arena_bytes)
		return -EINVAL;
	off = (uint64_t)((uint8_t *)p - c->seg.arena);
	pthread_mutex_lock(&c->arena_lock);
	hi = c->nused;
	while (lo < hi) {           /* used[] is sorted by offset */
		size_t mid = (lo + hi) / 2;

		if (c->used[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == c->nused || c->used[lo].off != off) {
		pthread_mutex_unlock(&c->arena_lock);
		return -EINVAL;
	}
	e = c->used[lo];
	ext_del(c->used, &c->nused, lo);
	/* back into the free list, merged with its neighbours */
	for (at = 0; at < c->nfree && c->free_ext[at].off < e.off; at++)
		;
	if (at > 0 && c->free_ext[at - 1].off + c->free_ext[at - 1].len == e.off) {
		c->free_ext[at - 1].len += e.len;
		if (at < c->nfree && e.off + e.len == c->free_ext[at].off) {
			c->free_ext[at - 1].len += c->free_ext[at].len;
			ext_del(c->free_ext, &c->nfree, at);
		}
	} else if (at < c->nfree && e.off + e.len == c->free_ext[at].off) {
		c->free_ext[at].off = e.off;
		c->free_ext[at].len += e.len;
	} else {
		r = ext_push(&c->free_ext, &c->nfree, &c->capfree, at, e);
	}
	pthread_mutex_unlock(&c->arena_lock);
	return r;
}
