/* SPDX-License-Identifier: MIT */
/*
 * Device memory of the clients (MOE_MSG_CUDA_MAP / MOE_MSG_CUDA_UNMAP):
 * the control thread maps a client's allocation by its CUDA IPC handle as
 * one of the session's regions and unmaps it again; the data thread looks
 * regions up for requests that stay on the GPU and keeps them busy while
 * the engine uses them, so that an unmap meanwhile completes when the
 * request ends.  Both sides under the session's rlock, never held across
 * an engine call.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "engine/engine.h"
#include "proto/proto.h"
#include "log.h"
#include "server_impl.h"

/*
 * MOE_MSG_CUDA_MAP: map the client's device memory as a region.  The slot
 * is reserved (MAPPING) while the handle is opened without the lock.  The
 * region must lie inside the allocation as the device knows it: the
 * client's sizes are not trusted.
 */
int cudaipc_map(struct moed_server *s, struct client *c, const struct moe_msg_cuda_map *m)
{
	struct moe_msg_cuda_reply rep = { 0 };
	struct moe_err err = { 0 };
	uint64_t alloc = 0;
	void *base = NULL;
	int slot = -1;

	if (m->bytes == 0 || m->offset > UINT64_MAX - m->bytes) {
		rep.status = -EINVAL;
		snprintf(rep.message, sizeof(rep.message), "an empty or impossible region (offset %" PRIu64
			 ", %" PRIu64 " bytes)", m->offset, m->bytes);
		goto out;
	}
	pthread_mutex_lock(&c->rlock);
	for (int i = 0; i < MOE_MAX_REGIONS && slot < 0; i++)
		if (c->regions[i].state == REG_FREE)
			slot = i;
	if (slot >= 0)
		c->regions[slot].state = REG_MAPPING;
	pthread_mutex_unlock(&c->rlock);
	if (slot < 0) {
		rep.status = -ENOSPC;
		snprintf(rep.message, sizeof(rep.message), "a session maps at most %d regions", MOE_MAX_REGIONS);
		goto out;
	}
	rep.status = moe_engine_device_map(s->engine, m->handle, &base, &alloc, &err);
	if (rep.status < 0) {
		snprintf(rep.message, sizeof(rep.message), "%s", err.msg);
	} else if (m->offset > alloc || m->bytes > alloc - m->offset) {
		moe_engine_device_unmap(s->engine, base);
		rep.status = -EINVAL;
		snprintf(rep.message, sizeof(rep.message), "the region (offset %" PRIu64 ", %" PRIu64 " bytes) "
			 "does not fit its allocation (%" PRIu64 " bytes)", m->offset, m->bytes, alloc);
	}
	pthread_mutex_lock(&c->rlock);
	if (rep.status == 0)
		c->regions[slot] = (struct region){ .state = REG_MAPPED, .base = base, .offset = m->offset,
						    .bytes = m->bytes };
	else
		c->regions[slot] = (struct region){ .state = REG_FREE };
	pthread_mutex_unlock(&c->rlock);
	if (rep.status == 0) {
		rep.region = (uint32_t)slot;
		log_info("client %u (pid %d): device memory mapped as region %d (%" PRIu64 " bytes)", c->id,
			 (int)c->pid, slot, m->bytes);
	}
out:
	if (rep.status < 0 && c->map_refusals++ < 3)
		log_notice("client %u (pid %d): device memory refused: %s", c->id, (int)c->pid, rep.message);
	return session_reply(s, c, MOE_MSG_CUDA_MAP, &rep, sizeof(rep));
}

/* MOE_MSG_CUDA_UNMAP: at once, or when the request running on it ends
 * (the data thread closes it then); the answer does not wait. */
int cudaipc_unmap(struct moed_server *s, struct client *c, const struct moe_msg_cuda_unmap *m)
{
	struct moe_msg_cuda_reply rep = { .region = m->region };
	void *base = NULL;
	bool known = false;

	pthread_mutex_lock(&c->rlock);
	if (m->region < MOE_MAX_REGIONS && c->regions[m->region].state == REG_MAPPED) {
		struct region *g = &c->regions[m->region];

		known = true;
		if (g->busy) {
			g->state = REG_CLOSING;
		} else {
			base = g->base;
			*g = (struct region){ .state = REG_FREE };
		}
	}
	pthread_mutex_unlock(&c->rlock);
	if (base)
		moe_engine_device_unmap(s->engine, base);
	if (!known) {
		rep.status = -EINVAL;
		snprintf(rep.message, sizeof(rep.message), "no region %u", m->region);
	}
	return session_reply(s, c, MOE_MSG_CUDA_UNMAP, &rep, sizeof(rep));
}

/* The address of [off, off + len) of @c's region @r (rlock held), or NULL
 * when it has no such region or that is not inside it. */
static uint8_t *region_at_locked(struct client *c, uint32_t r, uint64_t off, uint64_t len)
{
	const struct region *g;

	if (r >= MOE_MAX_REGIONS || (g = &c->regions[r])->state != REG_MAPPED)
		return NULL;
	if (off % 4 || off > g->bytes || len > g->bytes - off)
		return NULL;
	return (uint8_t *)g->base + g->offset + off;
}

bool cudaipc_region_ok(struct client *c, uint32_t r, uint64_t off, uint64_t len)
{
	bool ok;

	pthread_mutex_lock(&c->rlock);
	ok = region_at_locked(c, r, off, len) != NULL;
	pthread_mutex_unlock(&c->rlock);
	return ok;
}

int cudaipc_hold(struct client *c, const struct moe_sqe *q, uint64_t bytes, uint8_t **ret_in,
		 uint8_t **ret_out)
{
	uint32_t ri = MOE_SQE_IN_REGION(q->flags), ro = MOE_SQE_OUT_REGION(q->flags);
	uint8_t *in, *out;

	pthread_mutex_lock(&c->rlock);
	in = region_at_locked(c, ri, q->in_off, bytes);
	out = region_at_locked(c, ro, q->out_off, bytes);
	if (in && out) {
		c->regions[ri].busy++;
		c->regions[ro].busy++;
	}
	pthread_mutex_unlock(&c->rlock);
	if (!in || !out)
		return -EFAULT;
	*ret_in = in;
	*ret_out = out;
	return 0;
}

void cudaipc_release(struct moed_server *s, struct client *c, const struct moe_sqe *q)
{
	uint32_t ri = MOE_SQE_IN_REGION(q->flags), ro = MOE_SQE_OUT_REGION(q->flags);
	void *closing[2] = { NULL, NULL };

	pthread_mutex_lock(&c->rlock);
	c->regions[ri].busy--;
	c->regions[ro].busy--;
	for (int i = 0; i < 2; i++) {
		struct region *g = &c->regions[i ? ro : ri];

		if (g->state == REG_CLOSING && !g->busy) {
			closing[i] = g->base;
			*g = (struct region){ .state = REG_FREE };
		}
	}
	pthread_mutex_unlock(&c->rlock);
	for (int i = 0; i < 2; i++)
		moe_engine_device_unmap(s->engine, closing[i]);
}

void cudaipc_unmap_all(struct moed_server *s, struct client *c)
{
	for (int i = 0; i < MOE_MAX_REGIONS; i++)
		if (c->regions[i].state == REG_MAPPED || c->regions[i].state == REG_CLOSING)
			moe_engine_device_unmap(s->engine, c->regions[i].base);
}
