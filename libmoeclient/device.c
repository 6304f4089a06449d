/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: hidden states in GPU memory (moe_client_cuda_register,
 * moe_client_cuda_unregister, moe_client_forward_cuda); libcuda is opened
 * only when these are called.
 */
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proto/futex.h"
#include "client_impl.h"

/* ------------------------------------------------------------------ device memory */

/* Send a control message and read the answer of the same type into @ans
 * (exactly @ans_len bytes); ctl_lock held. */
static int ctl_call(struct moe_client *c, uint32_t type, const void *payload, uint32_t len, void *ans,
		    uint32_t ans_len)
{
	struct moe_msg_header h;
	int r = c->ctl_broken ? -MOE_E_PROTO : client_ctl_send(c, type, payload, len);

	if (r == 0)
		r = client_recv_full(c->fd, &h, sizeof(h), NULL);
	if (r == 0 && (h.magic != MOE_MSG_MAGIC || h.type != type || h.len != ans_len))
		r = -MOE_E_PROTO;
	if (r == 0)
		r = client_recv_full(c->fd, ans, ans_len, NULL);
	if (r < 0)
		c->ctl_broken = true;    /* an answer may still come, or half of one */
	return r;
}

/* The few CUDA driver entry points the library needs, from libcuda.so.1 at
 * run time: the library itself needs no CUDA to build or to run. */
typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_range_fn)(unsigned long long *, size_t *, unsigned long long);
typedef int (*cu_ipc_fn)(void *, unsigned long long);
typedef int (*cu_attr_fn)(void *, int, unsigned long long);
typedef int (*cu_sync_fn)(void);
static struct {
	pthread_once_t once;
	cu_init_fn init;
	cu_range_fn range;
	cu_ipc_fn ipc;
	cu_attr_fn attr;
	cu_sync_fn sync;
	int status;
} cu = { .once = PTHREAD_ONCE_INIT };
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9

static void cu_load(void)
{
	void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);

	cu.status = -ENODEV;
	if (!h)
		return;
	cu.init = (cu_init_fn)(uintptr_t)dlsym(h, "cuInit");
	cu.range = (cu_range_fn)(uintptr_t)dlsym(h, "cuMemGetAddressRange_v2");
	cu.ipc = (cu_ipc_fn)(uintptr_t)dlsym(h, "cuIpcGetMemHandle");
	cu.attr = (cu_attr_fn)(uintptr_t)dlsym(h, "cuPointerGetAttribute");
	cu.sync = (cu_sync_fn)(uintptr_t)dlsym(h, "cuCtxSynchronize");
	if (!cu.init || !cu.range || !cu.ipc || !cu.attr || !cu.sync || cu.init(0) != 0) {
		dlclose(h);
		return;
	}
	cu.status = 0;
}

MOE_EXPORT int moe_client_cuda_register(struct moe_client *c, void *dev_ptr, size_t bytes, uint32_t *region)
{
	struct moe_msg_cuda_map m = { 0 };
	struct moe_msg_cuda_reply rep;
	unsigned long long base = 0;
	size_t size = 0;
	int r, ord = -1;

	if (!c || !dev_ptr || !bytes || !region)
		return -EINVAL;
	if (!(c->w->features & MOE_FEAT_DEVICE_MEMORY))
		return -EOPNOTSUPP;      /* a CPU backend, or a moed that predates this */
	pthread_once(&cu.once, cu_load);
	if (cu.status < 0)
		return cu.status;
	/* the allocation around dev_ptr, in the calling thread's context */
	if (cu.range(&base, &size, (unsigned long long)(uintptr_t)dev_ptr) != 0)
		return -EFAULT;
	if ((uintptr_t)dev_ptr - base > size || bytes > size - ((uintptr_t)dev_ptr - base))
		return -EFAULT;
	if (cu.ipc(m.handle, base) != 0)
		return -EOPNOTSUPP;
	if (cu.attr(&ord, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, base) != 0)
		ord = -1;
	m.offset = (uintptr_t)dev_ptr - base;
	m.bytes = bytes;
	m.device = (uint32_t)ord;
	pthread_mutex_lock(&c->ctl_lock);
	r = ctl_call(c, MOE_MSG_CUDA_MAP, &m, sizeof(m), &rep, sizeof(rep));
	if (r == 0 && rep.status < 0)
		r = rep.status;
	if (r == 0 && rep.region >= MOE_MAX_REGIONS)
		r = -MOE_E_PROTO;
	if (r == 0) {
		pthread_mutex_lock(&c->dreg_lock);
		c->dregion[rep.region].start = (uintptr_t)dev_ptr;
		c->dregion[rep.region].bytes = bytes;
		c->dregion[rep.region].used = true;
		pthread_mutex_unlock(&c->dreg_lock);
		*region = rep.region;
	}
	pthread_mutex_unlock(&c->ctl_lock);
	return r;
}

MOE_EXPORT int moe_client_cuda_unregister(struct moe_client *c, uint32_t region)
{
	struct moe_msg_cuda_unmap m = { .region = region };
	struct moe_msg_cuda_reply rep;
	bool used;
	int r;

	if (!c || region >= MOE_MAX_REGIONS)
		return -EINVAL;
	pthread_mutex_lock(&c->ctl_lock);
	pthread_mutex_lock(&c->dreg_lock);
	used = c->dregion[region].used;
	c->dregion[region].used = false;
	pthread_mutex_unlock(&c->dreg_lock);
	r = used ? ctl_call(c, MOE_MSG_CUDA_UNMAP, &m, sizeof(m), &rep, sizeof(rep)) : -EINVAL;
	if (r == 0 && rep.status < 0)
		r = rep.status;
	pthread_mutex_unlock(&c->ctl_lock);
	return r;
}

/* The region holding [p, p + len), and p's offset in it; -1 if none. */
static int dregion_find(struct moe_client *c, const void *p, uint64_t len, uint64_t *off)
{
	int found = -1;

	pthread_mutex_lock(&c->dreg_lock);
	for (int i = 0; i < MOE_MAX_REGIONS && found < 0; i++) {
		uintptr_t a = (uintptr_t)p, st = c->dregion[i].start;

		if (c->dregion[i].used && a >= st && a - st <= c->dregion[i].bytes &&
		    len <= c->dregion[i].bytes - (a - st)) {
			found = i;
			*off = a - st;
		}
	}
	pthread_mutex_unlock(&c->dreg_lock);
	return found;
}

MOE_EXPORT int moe_client_forward_cuda(struct moe_client *c, uint32_t layer, const float *input, float *output,
				       uint64_t tokens, int32_t *ids, float *weights)
{
	uint64_t H, k, bytes, in_off, out_off, done = 0, piece;
	int32_t *aids = NULL;
	float *aw = NULL;
	int rin, rout, r = 0;

	if (!c || !input || !output || (weights && !ids))
		return -EINVAL;
	if (!client_is_moe_layer(c, layer))
		return -MOE_E_LAYER;
	H = c->w->hidden_size;
	k = c->w->top_k;
	if (tokens == 0)
		return 0;
	if (tokens > UINT64_MAX / (H * 4))
		return -E2BIG;
	bytes = tokens * H * 4;
	rin = dregion_find(c, input, bytes, &in_off);
	rout = dregion_find(c, output, bytes, &out_off);
	if (rin < 0 || rout < 0 || in_off % 4 || out_off % 4)
		return -EFAULT;
	piece = c->w->max_tokens < tokens ? c->w->max_tokens : tokens;
	if (ids) {
		/* the routing comes back through the arena: smaller pieces, down
		 * to one token, then wait for room, as moe_client_forward() */
		while (piece > 1 && piece * k * 4 * 2 > c->seg.arena_bytes / 2)
			piece /= 2;
		for (;;) {
			if ((r = moe_client_alloc(c, piece * k * 4, (void **)&aids)) == 0 &&
			    (r = moe_client_alloc(c, piece * k * 4, (void **)&aw)) == 0)
				break;
			moe_client_free(c, aids);
			aids = NULL;
			if (r != -ENOMEM)
				return r;
			if (piece > 1) {
				piece /= 2;
				continue;
			}
			if ((r = client_session_state(c)) < 0)
				return r;
			usleep(100);
		}
	}
	/* the caller's work on the input (kernels, copies on any stream of
	 * this context) must be done before moed reads it */
	pthread_once(&cu.once, cu_load);
	if (cu.status < 0 || cu.sync() != 0) {
		moe_client_free(c, aids);
		moe_client_free(c, aw);
		return cu.status < 0 ? cu.status : -EIO;
	}
	while (done < tokens) {
		uint64_t n = tokens - done < piece ? tokens - done : piece, tag;
		struct moe_sqe e = {
			.opcode = MOE_OP_FORWARD, .layer = layer, .dtype = MOE_F32, .tokens = n,
			.flags = MOE_SQE_DEVICE | MOE_SQE_REGIONS(rin, rout) | (ids ? MOE_SQE_ROUTING : 0),
			.in_off = in_off + done * H * 4, .out_off = out_off + done * H * 4,
			.ids_off = ids ? (uint64_t)((uint8_t *)aids - c->seg.arena) : 0,
			.weights_off = ids ? (uint64_t)((uint8_t *)aw - c->seg.arena) : 0,
		};
		struct moe_completion cq;

		r = client_submit_sync(c, NULL, &e, &tag);
		if (r < 0)
			break;
		r = client_wait_for(c, tag, &cq, -1);
		if (r < 0) {
			if (r != -ESHUTDOWN && r != -ECONNRESET)
				aids = NULL, aw = NULL;    /* may still be written: stay taken */
			break;
		}
		if (cq.res < 0) {
			r = cq.res;
			break;
		}
		if (ids) {
			memcpy(ids + done * k, aids, n * k * 4);
			if (weights)
				memcpy(weights + done * k, aw, n * k * 4);
		}
		done += n;
	}
	moe_client_free(c, aids);
	moe_client_free(c, aw);
	return r;
}
