/* SPDX-License-Identifier: MIT */
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
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proto/futex.h"
#include "moeclient.h"
#include "proto/proto.h"
#include "proto/segment.h"

#define MOE_EXPORT __attribute__((visibility("default")))

MOE_EXPORT const char *moe_strerror(int err)
{
	if (err == INT_MIN)     /* -INT_MIN overflows */
		return "Unknown error";
	if (err < 0)
		err = -err;
	switch (err) {
	case 0: return "Success";
	case MOE_E_PROTO: return "Protocol version not supported by moed";
	case MOE_E_LAYER: return "Not an MoE layer of the served model";
	case MOE_E_CHECKSUM: return "Expert weights failed their checksum";
	default: break;
	}
	if (err < MOE_E_BASE) {
		/* strerrordesc_np (glibc 2.32) is thread-safe and never NULL for a
		 * known errno; unknown values get a fixed text. */
		const char *s = strerrordesc_np(err);
		return s ? s : "Unknown error";
	}
	return "Unknown error";
}

MOE_EXPORT int moe_version(void)
{
	return MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH;
}

/* ------------------------------------------------------------------ sessions */

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

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int io_wait(int fd, short ev, int ms)
{
	struct pollfd p = { fd, ev, 0 };
	int r;

	do
		r = poll(&p, 1, ms);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		return -errno;
	return r == 0 ? -ETIMEDOUT : 0;
}

static int send_full(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				int r = io_wait(fd, POLLOUT, HELLO_TIMEOUT_MS);
				if (r < 0)
					return r;
				continue;
			}
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read exactly @len bytes (and a passed fd, if any, into *fd_out). */
static int recv_full(int fd, void *buf, size_t len, int *fd_out)
{
	uint8_t *p = buf;

	while (len) {
		union {
			char b[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} u;
		struct iovec iov = { p, len };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b,
				    .msg_controllen = sizeof(u.b) };
		ssize_t n;
		int r = io_wait(fd, POLLIN, HELLO_TIMEOUT_MS);

		if (r < 0)
			return r;
		n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				int got;

				memcpy(&got, CMSG_DATA(cm), sizeof(int));
				if (fd_out && *fd_out < 0)
					*fd_out = got;
				else
					close(got);
			}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int ctl_send(struct moe_client *c, uint32_t type, const void *payload, uint32_t len)
{
	struct moe_msg_header h = { .magic = MOE_MSG_MAGIC, .type = type, .len = len };
	int r = send_full(c->fd, &h, sizeof(h));

	if (r == 0 && len)
		r = send_full(c->fd, payload, len);
	return r;
}

static void client_free(struct moe_client *c)
{
	if (c->seg.base)
		munmap(c->seg.base, c->seg.bytes);
	if (c->fd >= 0)
		close(c->fd);
	pthread_mutex_destroy(&c->sq_lock);
	pthread_mutex_destroy(&c->cq_lock);
	pthread_mutex_destroy(&c->arena_lock);
	pthread_mutex_destroy(&c->ctl_lock);
	pthread_mutex_destroy(&c->dreg_lock);
	free(c->w);
	free(c->layers);
	free(c->stash);
	free(c->free_ext);
	free(c->used);
	free(c);
}

/*
 * How long a waiter polls the completion ring before it sleeps on the
 * futex.  Polling saves the wakeup when moed answers within microseconds,
 * but it takes a core: on a machine of one or two cores that core is one
 * moed computes on, and measured there (bench/run-daemon) sleeping at once
 * added 9 us to a forward and polling 20 us added 28.  So: poll only where
 * there are cores to spare; $MOE_CLIENT_SPIN_US overrides it.
 */
static uint64_t client_spin(void)
{
	const char *e = getenv("MOE_CLIENT_SPIN_US");
	long cpus;

	if (e && *e) {
		char *end;
		unsigned long long us = strtoull(e, &end, 10);

		if (!*end && us <= 1000000u)
			return us * 1000u;
	}
	cpus = sysconf(_SC_NPROCESSORS_ONLN);
	return cpus >= 4 ? SPIN_NS : 0;
}

MOE_EXPORT int moe_client_connect(const char *socket_path, const struct moe_client_options *opt,
				  struct moe_client **ret)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct moe_msg_hello hello = { .version = MOE_PROTO_VERSION };
	struct moe_msg_header h;
	struct moe_client *c;
	size_t seg_bytes;
	void *seg;
	int segfd = -1, r;

	if (!ret)
		return -EINVAL;
	if (!socket_path)
		socket_path = getenv("MOED_SOCKET");
	if (!socket_path || !*socket_path)
		socket_path = MOE_DEFAULT_SOCKET;
	if (strlen(socket_path) >= sizeof(a.sun_path))
		return -ENAMETOOLONG;
	strcpy(a.sun_path, socket_path);
	if (opt) {
		hello.arena_bytes = opt->arena_bytes;
		hello.sq_entries = opt->sq_entries;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	pthread_mutex_init(&c->sq_lock, NULL);
	pthread_mutex_init(&c->cq_lock, NULL);
	pthread_mutex_init(&c->arena_lock, NULL);
	pthread_mutex_init(&c->ctl_lock, NULL);
	pthread_mutex_init(&c->dreg_lock, NULL);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		r = -errno;
		goto fail;
	}
	if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		r = -errno;
		goto fail;
	}
	r = ctl_send(c, MOE_MSG_HELLO, &hello, sizeof(hello));
	/* the memfd rides with the message's first bytes; a refusal (moed sends
	 * it and closes without reading our HELLO) is read even when the HELLO
	 * could not be sent */
	{
		int rr = recv_full(c->fd, &h, sizeof(h), &segfd);

		if (rr < 0) {
			r = r < 0 ? r : rr;
			goto fail;
		}
	}
	if (h.magic != MOE_MSG_MAGIC || h.type != MOE_MSG_WELCOME || h.len != sizeof(struct moe_msg_welcome)) {
		r = -MOE_E_PROTO;
		goto fail;
	}
	c->w = calloc(1, sizeof(*c->w));
	if (!c->w) {
		r = -ENOMEM;
		goto fail;
	}
	{
		int rs = r;

		r = recv_full(c->fd, c->w, sizeof(*c->w), &segfd);
		if (r < 0)
			goto fail;
		if (c->w->status >= 0 && rs < 0) {
			r = rs;
			goto fail;
		}
	}
	if (c->w->status < 0) {
		r = c->w->status;
		goto fail;
	}
	if (segfd < 0 || c->w->version != MOE_PROTO_VERSION || !c->w->segment_bytes ||
	    c->w->num_moe_layers > MOE_INFO_MAX_LAYERS) {
		r = -MOE_E_PROTO;
		goto fail;
	}
	seg_bytes = (size_t)c->w->segment_bytes;
	seg = mmap(NULL, seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, segfd, 0);
	close(segfd);
	segfd = -1;
	if (seg == MAP_FAILED) {
		r = -errno;
		goto fail;
	}
	/* check the segment the daemon describes against what was mapped */
	if (moe_seg_view_init(seg, seg_bytes, &c->seg) < 0) {
		munmap(seg, seg_bytes);
		r = -MOE_E_PROTO;
		goto fail;
	}
	c->layers = malloc((c->w->num_moe_layers ? c->w->num_moe_layers : 1) * sizeof(uint32_t));
	c->free_ext = malloc(sizeof(*c->free_ext));
	if (!c->layers || !c->free_ext) {
		r = -ENOMEM;
		goto fail;
	}
	memcpy(c->layers, c->w->moe_layers, c->w->num_moe_layers * sizeof(uint32_t));
	c->free_ext[0] = (struct extent){ 0, c->seg.arena_bytes / ARENA_ALIGN * ARENA_ALIGN };
	c->spin_ns = client_spin();
	c->nfree = c->capfree = 1;
	*ret = c;
	return 0;
fail:
	if (segfd >= 0)
		close(segfd);
	client_free(c);
	return r;
}

MOE_EXPORT void moe_client_disconnect(struct moe_client *c)
{
	if (c)
		client_free(c);
}

MOE_EXPORT int moe_client_info(struct moe_client *c, struct moe_model_info *ret)
{
	if (!c || !ret)
		return -EINVAL;
	memset(ret, 0, sizeof(*ret));
	memcpy(ret->model_type, c->w->model_type, sizeof(ret->model_type));
	ret->model_type[sizeof(ret->model_type) - 1] = '\0';
	memcpy(ret->backend, c->w->backend, sizeof(ret->backend));
	ret->backend[sizeof(ret->backend) - 1] = '\0';
	ret->hidden_size = c->w->hidden_size;
	ret->moe_intermediate_size = c->w->moe_intermediate_size;
	ret->num_experts = c->w->num_experts;
	ret->top_k = c->w->top_k;
	ret->num_hidden_layers = c->w->num_hidden_layers;
	ret->num_moe_layers = c->w->num_moe_layers;
	ret->moe_layers = c->layers;
	ret->weight_dtype = c->w->weight_dtype;
	ret->n_shared_experts = c->w->n_shared_experts;
	ret->max_tokens = c->w->max_tokens;
	ret->arena_bytes = c->seg.arena_bytes;
	return 0;
}

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

/* ------------------------------------------------------------------ requests */

static bool in_arena(const struct moe_client *c, const void *p, uint64_t len)
{
	const uint8_t *b = p;

	return b >= c->seg.arena && b <= c->seg.arena + c->seg.arena_bytes &&
	       len <= (uint64_t)(c->seg.arena + c->seg.arena_bytes - b);
}

static bool is_moe_layer(const struct moe_client *c, uint32_t layer)
{
	for (uint32_t i = 0; i < c->w->num_moe_layers; i++)
		if (c->layers[i] == layer)
			return true;
	return false;
}

/* Has moed closed the session's segment?  A memory read: submit's check. */
static int segment_state(struct moe_client *c)
{
	return __atomic_load_n(&c->seg.hdr->daemon_state, __ATOMIC_ACQUIRE) != MOE_SEG_SERVING ? -ESHUTDOWN : 0;
}

/* Is the session over? -ESHUTDOWN, -ECONNRESET or 0 (one poll() call:
 * waiters look before they sleep, not submitters). */
static int session_state(struct moe_client *c)
{
	struct pollfd p = { c->fd, POLLRDHUP, 0 };

	if (__atomic_load_n(&c->seg.hdr->daemon_state, __ATOMIC_ACQUIRE) != MOE_SEG_SERVING)
		return -ESHUTDOWN;
	if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
		return -ECONNRESET;
	return 0;
}

static int push_locked(struct moe_client *c, const struct moe_sqe *e);

static int submit_locked(struct moe_client *c, const struct moe_request *q, uint64_t user_data)
{
	uint64_t H = c->w->hidden_size, k = c->w->top_k, es, bytes;
	struct moe_sqe e;

	if (q->dtype != MOE_F32 && q->dtype != MOE_BF16)
		return -EINVAL;
	if (q->tokens == 0 || q->tokens > c->w->max_tokens)
		return -E2BIG;
	if (!is_moe_layer(c, q->layer))
		return -MOE_E_LAYER;
	es = q->dtype == MOE_F32 ? 4 : 2;
	bytes = q->tokens * H * es;
	if (!in_arena(c, q->input, bytes) || !in_arena(c, q->output, bytes) ||
	    ((const uint8_t *)q->input - c->seg.arena) % es || ((uint8_t *)q->output - c->seg.arena) % es ||
	    (q->ids && (((uint8_t *)q->ids - c->seg.arena) % 4 || ((uint8_t *)q->weights - c->seg.arena) % 4)))
		return -EFAULT;
	if ((q->weights && !q->ids) ||
	    (q->ids && (!q->weights || !in_arena(c, q->ids, q->tokens * k * 4) ||
			!in_arena(c, q->weights, q->tokens * k * 4))))
		return q->ids && q->weights ? -EFAULT : -EINVAL;
	e = (struct moe_sqe){
		.user_data = user_data, .opcode = MOE_OP_FORWARD, .layer = q->layer, .dtype = q->dtype,
		.tokens = q->tokens, .in_off = (uint64_t)((const uint8_t *)q->input - c->seg.arena),
		.out_off = (uint64_t)((uint8_t *)q->output - c->seg.arena),
	};
	if (q->ids) {
		e.flags = MOE_SQE_ROUTING;
		e.ids_off = (uint64_t)((uint8_t *)q->ids - c->seg.arena);
		e.weights_off = (uint64_t)((uint8_t *)q->weights - c->seg.arena);
	}
	return push_locked(c, &e);
}

/* Put @e in the submission ring and wake moed if it sleeps (sq_lock held). */
static int push_locked(struct moe_client *c, const struct moe_sqe *e)
{
	uint32_t tail = c->seg.hdr->sq_tail, head = __atomic_load_n(&c->seg.hdr->sq_head, __ATOMIC_ACQUIRE);
	int r = segment_state(c);

	if (r < 0)
		return r;
	if (tail - head >= c->seg.sq_entries) {
		/* full: because moed is slow, or because it is gone */
		r = session_state(c);
		return r < 0 ? r : -EAGAIN;
	}
	c->seg.sq[tail & (c->seg.sq_entries - 1)] = *e;
	/* the entry, then the tail (release); then, if the daemon may sleep, wake it */
	__atomic_store_n(&c->seg.hdr->sq_tail, tail + 1, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	moe_futex_kick(&c->seg.hdr->daemon_futex, &c->seg.hdr->daemon_wait, 1);
	return 0;
}

MOE_EXPORT int moe_client_submit(struct moe_client *c, const struct moe_request *req)
{
	int r;

	if (!c || !req)
		return -EINVAL;
	if (req->user_data & TAG_SYNC)
		return -EINVAL;      /* the top bit is moe_client_forward's */
	pthread_mutex_lock(&c->sq_lock);
	r = submit_locked(c, req, req->user_data);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

MOE_EXPORT int moe_client_nop(struct moe_client *c, uint64_t user_data)
{
	int r;

	if (!c || (user_data & TAG_SYNC))
		return -EINVAL;
	struct moe_sqe e = { .user_data = user_data, .opcode = MOE_OP_NOP };

	pthread_mutex_lock(&c->sq_lock);
	r = push_locked(c, &e);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

/* Move every completion in the ring to the stash (cq_lock held). */
static int reap(struct moe_client *c)
{
	uint32_t head = c->seg.hdr->cq_head, tail = __atomic_load_n(&c->seg.hdr->cq_tail, __ATOMIC_ACQUIRE);

	if (tail - head > c->seg.cq_entries)
		return -MOE_E_PROTO;
	if (c->nstash + (tail - head) > c->capstash) {
		size_t cap = c->nstash + (tail - head) + 16;
		struct moe_completion *n = realloc(c->stash, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		c->stash = n;
		c->capstash = cap;
	}
	for (; head != tail; head++) {
		const struct moe_cqe *e = &c->seg.cq[head & (c->seg.cq_entries - 1)];

		c->stash[c->nstash++] = (struct moe_completion){ e->user_data, e->res };
	}
	__atomic_store_n(&c->seg.hdr->cq_head, head, __ATOMIC_RELEASE);
	return 0;
}

/* Take a stashed completion: @want's, or with ANY the first that is not
 * moe_client_forward's (cq_lock held). */
#define ANY UINT64_MAX
static bool unstash(struct moe_client *c, uint64_t want, struct moe_completion *ret)
{
	for (size_t i = 0; i < c->nstash; i++) {
		uint64_t u = c->stash[i].user_data;

		if (want == ANY ? !(u & TAG_SYNC) : u == want) {
			*ret = c->stash[i];
			memmove(c->stash + i, c->stash + i + 1, (c->nstash - i - 1) * sizeof(*c->stash));
			c->nstash--;
			return true;
		}
	}
	return false;
}

static int wait_for(struct moe_client *c, uint64_t want, struct moe_completion *ret, int timeout_ms)
{
	uint64_t t0 = mono_ns(), limit = timeout_ms < 0 ? UINT64_MAX : (uint64_t)timeout_ms * 1000000u;
	int r = 0;

	pthread_mutex_lock(&c->cq_lock);
	for (;;) {
		uint64_t now, left;
		uint32_t val;

		r = reap(c);
		if (r < 0)
			break;
		if (unstash(c, want, ret)) {
			r = 0;
			break;
		}
		now = mono_ns();
		if (now - t0 < c->spin_ns && limit) {
			/* a completion is usually microseconds away: poll before sleeping
			 * (longer spins or sched_yield() lost more than they won on a
			 * 2-core machine, where the spinner takes a core from moed) */
			pthread_mutex_unlock(&c->cq_lock);
			moe_cpu_relax();
			pthread_mutex_lock(&c->cq_lock);
			continue;
		}
		r = session_state(c);
		if (r < 0) {
			/* what the daemon completed before it went still counts */
			if (reap(c) == 0 && unstash(c, want, ret))
				r = 0;
			break;
		}
		if (now - t0 >= limit) {
			r = timeout_ms == 0 ? -EAGAIN : -ETIMEDOUT;
			break;
		}
		left = limit - (now - t0);
		/* sleep: flag, fence, look once more, then wait on the word */
		val = __atomic_load_n(&c->seg.hdr->client_futex, __ATOMIC_ACQUIRE);
		if (c->sleepers++ == 0)
			__atomic_store_n(&c->seg.hdr->client_wait, 1, __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(&c->seg.hdr->cq_tail, __ATOMIC_ACQUIRE) == c->seg.hdr->cq_head) {
			pthread_mutex_unlock(&c->cq_lock);
			moe_futex_wait(&c->seg.hdr->client_futex, val, left < WAIT_SLICE_NS ? left : WAIT_SLICE_NS);
			pthread_mutex_lock(&c->cq_lock);
		}
		if (--c->sleepers == 0)
			__atomic_store_n(&c->seg.hdr->client_wait, 0, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&c->cq_lock);
	return r;
}

MOE_EXPORT int moe_client_wait(struct moe_client *c, struct moe_completion *ret, int timeout_ms)
{
	if (!c || !ret)
		return -EINVAL;
	return wait_for(c, ANY, ret, timeout_ms);
}

/*
 * Queue one of moe_client_forward's own requests (@q checked as a
 * submission, or the descriptor @raw as it is) under a tag of its own in
 * *tag; a full ring is waited out.
 */
static int submit_sync(struct moe_client *c, const struct moe_request *q, struct moe_sqe *raw, uint64_t *tag)
{
	int r;

	pthread_mutex_lock(&c->sq_lock);
	*tag = TAG_SYNC | ++c->sync_seq;
	if (raw)
		raw->user_data = *tag;
	do {
		r = raw ? push_locked(c, raw) : submit_locked(c, q, *tag);
		if (r == -EAGAIN) {
			/* the ring is full: move finished completions to the stash
			 * (moed takes no more while its completion ring is full),
			 * then let the others' requests drain */
			pthread_mutex_unlock(&c->sq_lock);
			pthread_mutex_lock(&c->cq_lock);
			int rr = reap(c);
			pthread_mutex_unlock(&c->cq_lock);
			if (rr < 0) {
				r = rr;
				pthread_mutex_lock(&c->sq_lock);
				break;
			}
			usleep(50);
			pthread_mutex_lock(&c->sq_lock);
		}
	} while (r == -EAGAIN);
	pthread_mutex_unlock(&c->sq_lock);
	return r;
}

MOE_EXPORT int moe_client_forward(struct moe_client *c, uint32_t layer, uint32_t dtype, const void *input,
				  void *output, uint64_t tokens, int32_t *ids, float *weights)
{
	uint64_t H, k, es, per, done = 0, piece;
	uint8_t *in = NULL, *out = NULL;
	int32_t *aids = NULL;
	float *aw = NULL;
	int r = 0;

	if (!c || !input || !output || (weights && !ids) || (dtype != MOE_F32 && dtype != MOE_BF16))
		return -EINVAL;
	if (!is_moe_layer(c, layer))
		return -MOE_E_LAYER;
	H = c->w->hidden_size;
	k = c->w->top_k;
	es = dtype == MOE_F32 ? 4 : 2;
	per = 2 * H * es + (ids ? 2 * k * 4 : 0) + 4 * ARENA_ALIGN / 64;
	/* the piece: what the limits allow and half the arena holds (others use it too) */
	piece = c->w->max_tokens;
	if (piece > c->seg.arena_bytes / 2 / per)
		piece = c->seg.arena_bytes / 2 / per;
	if (piece == 0)
		return -ENOMEM;
	if (piece > tokens)
		piece = tokens;
	/* the arena is shared by the handle's threads: take smaller pieces, down
	 * to one token, and then wait for room, rather than fail */
	for (;;) {
		if ((r = moe_client_alloc(c, piece * H * es, (void **)&in)) == 0 &&
		    (r = moe_client_alloc(c, piece * H * es, (void **)&out)) == 0 &&
		    (!ids || ((r = moe_client_alloc(c, piece * k * 4, (void **)&aids)) == 0 &&
			      (r = moe_client_alloc(c, piece * k * 4, (void **)&aw)) == 0)))
			break;
		moe_client_free(c, in);
		moe_client_free(c, out);
		moe_client_free(c, aids);
		moe_client_free(c, aw);
		in = out = NULL;
		aids = NULL;
		aw = NULL;
		if (r != -ENOMEM)
			return r;
		if (piece > 1) {
			piece /= 2;
			continue;
		}
		r = session_state(c);
		if (r < 0)
			return r;
		usleep(100);
	}
	while (done < tokens) {
		uint64_t n = tokens - done < piece ? tokens - done : piece;
		struct moe_request q = { .layer = layer, .dtype = dtype, .tokens = n, .input = in,
					 .output = out, .ids = aids, .weights = aw };
		struct moe_completion cq;
		uint64_t tag;

		memcpy(in, (const uint8_t *)input + done * H * es, n * H * es);
		r = submit_sync(c, &q, NULL, &tag);
		if (r < 0)
			goto out;
		r = wait_for(c, tag, &cq, -1);
		if (r < 0) {
			if (r != -ESHUTDOWN && r != -ECONNRESET) {
				/* the request may still be in flight: moed could write into
				 * these blocks later, so they stay taken */
				in = out = NULL;
				aids = NULL;
				aw = NULL;
			}
			goto out;
		}
		if (cq.res < 0) {
			r = cq.res;
			goto out;
		}
		memcpy((uint8_t *)output + done * H * es, out, n * H * es);
		if (ids) {
			memcpy(ids + done * k, aids, n * k * 4);
			if (weights)
				memcpy(weights + done * k, aw, n * k * 4);
		}
		done += n;
	}
out:
	moe_client_free(c, in);
	moe_client_free(c, out);
	moe_client_free(c, aids);
	moe_client_free(c, aw);
	return r;
}

MOE_EXPORT int moe_client_stats(struct moe_client *c, char **ret)
{
	struct moe_msg_header h;
	char *text;
	int r;

	if (!c || !ret)
		return -EINVAL;
	pthread_mutex_lock(&c->ctl_lock);
	r = c->ctl_broken ? -MOE_E_PROTO : ctl_send(c, MOE_MSG_STATS, NULL, 0);
	if (r == 0)
		r = recv_full(c->fd, &h, sizeof(h), NULL);
	if (r == 0 && (h.magic != MOE_MSG_MAGIC || h.type != MOE_MSG_STATS || h.len > MOE_MSG_MAX))
		r = -MOE_E_PROTO;
	if (r < 0) {
		/* an answer may still come: the next exchange would read it */
		c->ctl_broken = true;
		pthread_mutex_unlock(&c->ctl_lock);
		return r;
	}
	text = malloc((size_t)h.len + 1);
	if (!text) {
		/* the payload must still be read, or the stream is out of step */
		char sink[4096];
		for (uint32_t left = h.len; left && r == 0;) {
			uint32_t n = left < sizeof(sink) ? left : sizeof(sink);
			r = recv_full(c->fd, sink, n, NULL);
			left -= n;
		}
		if (r < 0)
			c->ctl_broken = true;
		pthread_mutex_unlock(&c->ctl_lock);
		return -ENOMEM;
	}
	r = recv_full(c->fd, text, h.len, NULL);
	if (r < 0)
		c->ctl_broken = true;
	pthread_mutex_unlock(&c->ctl_lock);
	if (r < 0) {
		free(text);
		return r;
	}
	text[h.len] = '\0';
	*ret = text;
	return 0;
}

/* ------------------------------------------------------------------ device memory */

/* Send a control message and read the answer of the same type into @ans
 * (exactly @ans_len bytes); ctl_lock held. */
static int ctl_call(struct moe_client *c, uint32_t type, const void *payload, uint32_t len, void *ans,
		    uint32_t ans_len)
{
	struct moe_msg_header h;
	int r = c->ctl_broken ? -MOE_E_PROTO : ctl_send(c, type, payload, len);

	if (r == 0)
		r = recv_full(c->fd, &h, sizeof(h), NULL);
	if (r == 0 && (h.magic != MOE_MSG_MAGIC || h.type != type || h.len != ans_len))
		r = -MOE_E_PROTO;
	if (r == 0)
		r = recv_full(c->fd, ans, ans_len, NULL);
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
	if (!is_moe_layer(c, layer))
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
			if ((r = session_state(c)) < 0)
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

		r = submit_sync(c, NULL, &e, &tag);
		if (r < 0)
			break;
		r = wait_for(c, tag, &cq, -1);
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
