/* SPDX-License-Identifier: MIT */
/*
 * moed's server.
 *
 * Two threads.  The control thread owns the listening socket, every
 * client's control socket, the signals (a signalfd) and a one-second timer
 * (systemd status and watchdog), in one epoll loop: it accepts, checks the
 * peer's credentials, answers HELLO with a sealed memfd segment, answers
 * STATS, and notices a session's end when its socket closes.  The data
 * thread owns the engine and every client's rings: each pass it takes what
 * every client has submitted (copying and checking each descriptor), runs
 * all requests for a layer as one batch through the engine, writes the
 * outputs into the clients' arenas and the completions into their rings,
 * and sleeps on the clients' futex words when there is nothing to do.
 *
 * Nothing the data thread does waits on a client: a client that stops
 * reading its completion ring only stops getting more of its requests
 * taken.  Whatever a client writes into its segment can only make its own
 * requests fail or its own session end.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "engine/clock.h"
#include "engine/dtype.h"
#include "engine/engine.h"
#include "proto/futex.h"
#include "log.h"
#include "loop.h"
#include "libmoeclient/moeclient.h"
#include "proto/proto.h"
#include "proto/segment.h"
#include "server.h"

#define SQ_ENTRIES_DEFAULT 64u      /* requests a client may have queued */
#define SQ_ENTRIES_MAX 4096u
#define IDLE_SPIN_NS 50000u         /* poll the rings this long before sleeping */
#define WAIT_SLICE_NS 1000000000u   /* sleep at most this long (then look again) */
#define STATS_WAIT_MS 2000          /* STATS: how long a request waits for a fresh snapshot */
#define LAT_SAMPLES 4096u           /* request latencies kept for percentiles */
#define HELLO_TIMEOUT_S 10          /* a session that has not said HELLO by then is dropped */

struct client {
	struct moed_server *s;           /* its server (the loop hands handlers the client only) */
	uint32_t id;
	int fd;                          /* control socket */
	pid_t pid;
	uid_t uid;
	gid_t gid;
	time_t accepted;

	/* control thread only: the message being read (the largest kind) */
	uint8_t in[sizeof(struct moe_msg_header) +
		   (sizeof(struct moe_msg_hello) > sizeof(struct moe_msg_cuda_map) ? sizeof(struct moe_msg_hello)
										  : sizeof(struct moe_msg_cuda_map))];
	size_t in_len;
	bool welcomed;
	/* control thread only: replies waiting to be sent (STATS), and
	 * STATS requests waiting for the data thread's next snapshot */
	uint8_t *out;
	size_t out_len, out_off;
	uint32_t stats_waiting;
	uint64_t stats_since;            /* when the oldest of them came (ns) */
	struct client *stats_next;

	/* the segment */
	struct moe_seg_view seg;
	uint32_t max_tokens;             /* per request: what its arena holds, within the limit */

	/* data thread only: its own copies, never read back from the segment */
	uint32_t sq_head;
	uint32_t cq_tail;

	atomic_bool dead;                /* the control socket closed: free it */
	bool kicked;                     /* the data thread ended the session */

	/* figures (data thread writes, stats snapshot reads on the same thread) */
	uint64_t requests, tokens, errors;

	/* device memory the client mapped (CUDA backend): the control thread
	 * adds and removes regions, the data thread uses them, both under
	 * rlock, which the data thread holds while a request runs on one */
	pthread_mutex_t rlock;           /* held only briefly, never across a forward */
	struct region {
		enum { REG_FREE, REG_MAPPING, REG_MAPPED, REG_CLOSING } state;
		void *base;              /* the mapped allocation */
		uint64_t offset, bytes;  /* the region in it */
		uint32_t busy;           /* requests running on it (data thread) */
	} regions[MOE_MAX_REGIONS];
	uint32_t map_refusals;           /* logged: the first few */
	bool dev_taken;                  /* data thread: a device request taken this pass */

	struct client *next;             /* in the data thread's list */
	struct client *ctl_next;         /* in the control thread's list of sessions before HELLO */
};

/* A request taken from a ring, checked, waiting for its batch. */
struct req {
	struct client *c;
	struct moe_sqe sqe;              /* our copy */
	uint64_t t0;                     /* when it was taken */
	size_t seq;                      /* its place in the pass (qsort is not stable) */
};

struct moed_server {
	struct moed_config *cfg;         /* the live configuration (reloads swap it) */
	char *config_path;
	struct moed_override *ov;        /* the command line's settings (copies) */
	size_t nov;
	pthread_mutex_t cfg_lock;        /* the data thread reads live limits under it */
	struct moe_engine *engine;
	const struct moe_model_config *mc;
	int listen_fd;
	bool socket_activated;
	bool unlink_socket;              /* we bound it: remove it at exit */
	struct moed_loop *loop;          /* control thread: every descriptor below and each client's */
	bool running;                    /* control thread: false once a stop signal came */
	int sigfd, timerfd;
	uint32_t next_id;
	uint32_t nclients;               /* sessions welcomed and not yet freed */
	struct client *greeting;         /* control thread: sessions that have not said HELLO */
	uint32_t ngreeting;
	int spare_fd;                    /* given up to accept and drop a connection at EMFILE */

	/* sessions that said HELLO, handed to the data thread */
	pthread_mutex_t lock;
	struct client *incoming;
	atomic_uint wake_word;           /* the data thread also sleeps on this */
	atomic_bool stop;
	atomic_bool stats_wanted;
	uint64_t stats_gen;              /* bumped (under lock) with each snapshot */
	char *stats_json;                /* the latest snapshot (under lock) */
	int stats_efd;                   /* the data thread says "a snapshot is ready" */
	struct client *stats_waiters;    /* control thread: sessions waiting for one */
	atomic_uint live_clients;
	_Atomic uint64_t heartbeat;      /* the data thread's last sign of life (ns) */
	uint64_t watchdog_ns;            /* WatchdogSec, 0 without a watchdog */
	uint64_t slice_ns;               /* the data thread sleeps at most this long */

	pthread_t data_thread;
	bool data_ok;

	/* data thread state */
	struct client *clients;
	struct req *reqs;
	size_t reqs_cap;
	float *x, *y;
	int32_t *ids;
	float *w;
	size_t xcap, ycap, rcap;
	uint64_t lat[LAT_SAMPLES];
	uint64_t lat_n;
	uint64_t total_requests, total_tokens, total_errors, total_batches;
	uint64_t started_ns;
	double tps;                      /* tokens per second over the last status period */
	uint64_t tps_tokens, tps_t0;
};

static void notify(const char *msg)
{
#ifdef HAVE_SYSTEMD
	sd_notify(0, msg);
#else
	(void)msg;
#endif
}

static void wake_data(struct moed_server *s)
{
	atomic_fetch_add(&s->wake_word, 1);
	moe_futex_wake((uint32_t *)&s->wake_word, 1);
}

/* ------------------------------------------------------------------ segments */

static void client_free(struct moed_server *s, struct client *c)
{
	if (!c)
		return;
	for (int i = 0; i < MOE_MAX_REGIONS; i++)
		if (c->regions[i].state == REG_MAPPED || c->regions[i].state == REG_CLOSING)
			moe_engine_device_unmap(s->engine, c->regions[i].base);
	pthread_mutex_destroy(&c->rlock);
	if (c->seg.base)
		munmap(c->seg.base, c->seg.bytes);
	if (c->fd >= 0)
		close(c->fd);
	free(c->out);
	if (c->welcomed) {
		atomic_fetch_sub(&s->live_clients, 1);
		log_info("client %u (pid %d, uid %u): session ended after %" PRIu64 " requests, %" PRIu64
			 " tokens, %" PRIu64 " errors", c->id, (int)c->pid, (unsigned)c->uid, c->requests,
			 c->tokens, c->errors);
	}
	free(c);
}

static uint32_t pow2_at_least(uint32_t v)
{
	uint32_t p = 1;

	while (p < v)
		p <<= 1;
	return p;
}

/*
 * The segment for @c: a memfd sized from the HELLO within the configured
 * maximum, sealed so that neither side can shrink or grow it (a client
 * that truncated a shared file under the daemon would make it fault),
 * mapped here.  Returns the memfd to pass; the mapping stays with @c.
 */
static int segment_make(struct moed_server *s, struct client *c, const struct moe_msg_hello *h,
			char *why, size_t whylen)
{
	uint64_t max = (uint64_t)s->cfg->limits.segment_mb << 20;
	uint32_t sq = h->sq_entries ? h->sq_entries : SQ_ENTRIES_DEFAULT;
	uint32_t cq;
	struct moe_seg_header layout;
	uint64_t rings, arena, total;
	uint8_t *base;
	char name[32];
	int fd, r;

	if (sq > SQ_ENTRIES_MAX || (sq & (sq - 1))) {
		snprintf(why, whylen, "sq_entries %u: must be a power of two up to %u", sq, SQ_ENTRIES_MAX);
		return -EINVAL;
	}
	cq = pow2_at_least(2 * sq);      /* only now: 2 * sq cannot wrap */
	rings = moe_seg_rings_bytes(sq, cq);
	if (MOE_SEG_HEADER_SIZE + rings + 4096 > max) {
		snprintf(why, whylen, "limits.segment_mb %u is too small for the rings", s->cfg->limits.segment_mb);
		return -ENOSPC;
	}
	arena = h->arena_bytes ? h->arena_bytes : max - MOE_SEG_HEADER_SIZE - rings;
	/* compare before rounding up: a size near 2^64 would wrap to 0 */
	if (arena > max - MOE_SEG_HEADER_SIZE - rings ||
	    (arena + 4095) / 4096 * 4096 > max - MOE_SEG_HEADER_SIZE - rings) {
		snprintf(why, whylen, "an arena of %" PRIu64 " bytes exceeds limits.segment_mb (%u MiB with the rings)",
			 h->arena_bytes, s->cfg->limits.segment_mb);
		return -E2BIG;
	}
	arena = (arena + 4095) / 4096 * 4096;
	r = moe_seg_layout(sq, cq, arena, &layout);
	if (r < 0) {
		snprintf(why, whylen, "no segment layout for %u submissions and %" PRIu64 " bytes", sq, arena);
		return r;
	}
	total = layout.segment_bytes;
	{
		/* the largest request the arena holds: float32 in and out, and routing */
		uint64_t per = 2ull * s->mc->hidden_size * 4 + 2ull * s->mc->top_k * 4;
		uint64_t fit = arena / per;

		if (fit == 0) {
			snprintf(why, whylen, "an arena of %" PRIu64 " bytes cannot hold one token (%" PRIu64 " bytes)",
				 arena, per);
			return -E2BIG;
		}
		pthread_mutex_lock(&s->cfg_lock);
		c->max_tokens = s->cfg->limits.max_tokens_per_request;
		pthread_mutex_unlock(&s->cfg_lock);
		if (fit < c->max_tokens)
			c->max_tokens = (uint32_t)fit;
	}
	snprintf(name, sizeof(name), "moed-client-%u", c->id);
	fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0) {
		r = -errno;
		snprintf(why, whylen, "memfd_create: %s", strerror(-r));
		return r;
	}
	if (ftruncate(fd, (off_t)total) < 0)
		goto fail;
	base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		goto fail;
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		r = -errno;
		munmap(base, total);
		errno = -r;
		goto fail;
	}
	/* the pointers come from the header we wrote, through the same view
	 * the client uses; the client cannot touch it before it has the fd */
	memcpy(base, &layout, sizeof(layout));
	r = moe_seg_view_init(base, total, &c->seg);
	if (r < 0) {
		munmap(base, total);
		close(fd);
		snprintf(why, whylen, "a segment of %" PRIu64 " bytes: its own layout is refused", total);
		return r;
	}
	return fd;
fail:
	r = -errno;
	snprintf(why, whylen, "a segment of %" PRIu64 " bytes: %s", total, strerror(-r));
	close(fd);
	return r;
}

/* ------------------------------------------------------------------ control messages */

static int send_all(int fd, const void *buf, size_t len, int pass_fd)
{
	const uint8_t *p = buf;
	bool first = true;

	while (len) {
		struct iovec iov = { (void *)p, len };
		union {
			char buf[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} u;
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n;

		if (first && pass_fd >= 0) {
			struct cmsghdr *cm;

			memset(&u, 0, sizeof(u));
			m.msg_control = u.buf;
			m.msg_controllen = sizeof(u.buf);
			cm = CMSG_FIRSTHDR(&m);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
		}
		n = sendmsg(fd, &m, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				/* the client does not read its socket: give it a moment */
				struct pollfd pfd = { fd, POLLOUT, 0 };
				if (poll(&pfd, 1, 1000) > 0)
					continue;
				return -ETIMEDOUT;
			}
			return -errno;
		}
		first = false;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int send_msg(int fd, uint32_t type, const void *payload, uint32_t len, int pass_fd)
{
	struct moe_msg_header h = { .magic = MOE_MSG_MAGIC, .type = type, .len = len };
	uint8_t *buf = malloc(sizeof(h) + len);
	int r;

	if (!buf)
		return -ENOMEM;
	memcpy(buf, &h, sizeof(h));
	if (len)
		memcpy(buf + sizeof(h), payload, len);
	r = send_all(fd, buf, sizeof(h) + len, pass_fd);
	free(buf);
	return r;
}

static void welcome_fill(struct moed_server *s, struct moe_msg_welcome *w)
{
	const struct moe_model_config *m = s->mc;
	const struct moe_store *st = moe_engine_store(s->engine);
	const struct moe_backend *be = moe_engine_backend(s->engine);

	w->version = MOE_PROTO_VERSION;
	snprintf(w->model_type, sizeof(w->model_type), "%s", st->hdr.model_type);
	snprintf(w->backend, sizeof(w->backend), "%s", be && be->ops ? be->ops->name : "?");
	w->hidden_size = m->hidden_size;
	w->moe_intermediate_size = m->moe_intermediate_size;
	w->num_experts = m->num_experts;
	w->top_k = m->top_k;
	w->num_hidden_layers = m->num_hidden_layers;
	w->num_moe_layers = st->hdr.num_moe_layers < MOE_INFO_MAX_LAYERS ? st->hdr.num_moe_layers
									  : MOE_INFO_MAX_LAYERS;
	for (uint32_t i = 0; i < w->num_moe_layers; i++)
		w->moe_layers[i] = st->layers[i].layer;
	w->weight_dtype = (uint32_t)m->weight_dtype;
	w->n_shared_experts = m->n_shared_experts;
	w->features = MOE_FEAT_CUDA_MAP | (moe_engine_has_device_memory(s->engine) ? MOE_FEAT_DEVICE_MEMORY : 0);
	pthread_mutex_lock(&s->cfg_lock);
	w->max_tokens = s->cfg->limits.max_tokens_per_request;
	pthread_mutex_unlock(&s->cfg_lock);
}

/* Refuse a session with @status and a reason, then drop it. */
static void refuse(int fd, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void refuse(int fd, int status, const char *fmt, ...)
{
	struct moe_msg_welcome w = { .status = status, .version = MOE_PROTO_VERSION };
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(w.message, sizeof(w.message), fmt, ap);
	va_end(ap);
	send_msg(fd, MOE_MSG_WELCOME, &w, sizeof(w), -1);
}

static bool id_allowed(const uint32_t *ids, size_t n, uint32_t id)
{
	for (size_t i = 0; i < n; i++)
		if (ids[i] == id)
			return true;
	return false;
}

/* access.uids / access.gids: empty lists leave it to the socket's mode. */
static bool peer_allowed(struct moed_server *s, uid_t uid, gid_t gid)
{
	const struct moed_config *c = s->cfg;

	if (!c->access.n_uids && !c->access.n_gids)
		return true;
	if (uid == 0)
		return true;       /* root can read the daemon's memory anyway */
	return id_allowed(c->access.uids, c->access.n_uids, uid) ||
	       id_allowed(c->access.gids, c->access.n_gids, gid);
}

/*
 * STATS never blocks the control thread: the request waits for the data
 * thread's next snapshot (stats_efd says it is ready; a session waits at
 * most STATS_WAIT_MS, then gets the latest one), and the answer goes out
 * with MSG_DONTWAIT, the rest when the socket is writable again.
 */
static void watch(struct moed_server *s, struct client *c, bool out)
{
	moed_loop_modify(s->loop, c->fd, MOED_LOOP_READABLE | (out ? MOED_LOOP_WRITABLE : 0));
}

/* Send what is queued for @c; 0, or -errno when the session must end. */
static int flush_out(struct moed_server *s, struct client *c)
{
	while (c->out_off < c->out_len) {
		ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				watch(s, c, true);
				return 0;
			}
			return -errno;
		}
		c->out_off += (size_t)n;
	}
	free(c->out);
	c->out = NULL;
	c->out_len = c->out_off = 0;
	watch(s, c, false);
	return 0;
}

/* Queue one message for @c and start sending it. */
static int reply(struct moed_server *s, struct client *c, uint32_t type, const void *payload, size_t len)
{
	struct moe_msg_header h = { .magic = MOE_MSG_MAGIC, .type = type, .len = (uint32_t)len };
	uint8_t *n;

	if (c->out_len + sizeof(h) + len > 4u * MOE_MSG_MAX)
		return -ENOBUFS;         /* a client that asks and never reads */
	n = realloc(c->out, c->out_len + sizeof(h) + len);
	if (!n)
		return -ENOMEM;
	c->out = n;
	memcpy(c->out + c->out_len, &h, sizeof(h));
	memcpy(c->out + c->out_len + sizeof(h), payload, len);
	c->out_len += sizeof(h) + len;
	return flush_out(s, c);
}

/* Queue one STATS answer (@json) for @c and start sending it. */
static int stats_answer(struct moed_server *s, struct client *c, const char *json)
{
	return reply(s, c, MOE_MSG_STATS, json, strlen(json));
}

/*
 * MOE_MSG_CUDA_MAP: map the client's device memory as a region.  The slot
 * is reserved (MAPPING) while the handle is opened without the lock.  The
 * region must lie inside the allocation as the device knows it: the
 * client's sizes are not trusted.
 */
static int cuda_map(struct moed_server *s, struct client *c, const struct moe_msg_cuda_map *m)
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
	return reply(s, c, MOE_MSG_CUDA_MAP, &rep, sizeof(rep));
}

/* MOE_MSG_CUDA_UNMAP: at once, or when the request running on it ends
 * (the data thread closes it then); the answer does not wait. */
static int cuda_unmap(struct moed_server *s, struct client *c, const struct moe_msg_cuda_unmap *m)
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
	return reply(s, c, MOE_MSG_CUDA_UNMAP, &rep, sizeof(rep));
}

static void stats_waiter_remove(struct moed_server *s, struct client *c)
{
	for (struct client **pp = &s->stats_waiters; *pp; pp = &(*pp)->stats_next)
		if (*pp == c) {
			*pp = c->stats_next;
			c->stats_next = NULL;
			return;
		}
}

static void session_end(struct moed_server *s, struct client *c);

/* Answer the waiting sessions: all (@all) or those waiting too long. */
static void stats_deliver(struct moed_server *s, bool all)
{
	uint64_t now = moe_now_ns();
	char *json;

	pthread_mutex_lock(&s->lock);
	json = strdup(s->stats_json ? s->stats_json : "{}");
	pthread_mutex_unlock(&s->lock);
	for (struct client *c = s->stats_waiters, *next; c; c = next) {
		int r = 0;

		next = c->stats_next;
		if (!all && now - c->stats_since < (uint64_t)STATS_WAIT_MS * 1000000u)
			continue;
		stats_waiter_remove(s, c);
		for (; c->stats_waiting && r == 0; c->stats_waiting--)
			r = json ? stats_answer(s, c, json) : -ENOMEM;
		if (r < 0)
			session_end(s, c);   /* a partial answer would leave the stream out of step */
	}
	free(json);
}

static void stats_request(struct moed_server *s, struct client *c)
{
	if (!c->stats_waiting++) {
		c->stats_since = moe_now_ns();
		c->stats_next = s->stats_waiters;
		s->stats_waiters = c;
	}
	atomic_store(&s->stats_wanted, true);
	wake_data(s);
}

static void greeting_remove(struct moed_server *s, struct client *c)
{
	for (struct client **pp = &s->greeting; *pp; pp = &(*pp)->ctl_next)
		if (*pp == c) {
			*pp = c->ctl_next;
			s->ngreeting--;
			return;
		}
}

/* A HELLO arrived in full: answer it and hand the session over. */
static int hello(struct moed_server *s, struct client *c, const struct moe_msg_hello *h)
{
	struct moe_msg_welcome *w = calloc(1, sizeof(*w));
	char why[200] = "";
	int fd, r;

	if (!w)
		return -ENOMEM;
	if (h->version != MOE_PROTO_VERSION) {
		refuse(c->fd, -MOE_E_PROTO, "protocol version %u is not supported (moed speaks %u)",
		       h->version, MOE_PROTO_VERSION);
		log_warning("client pid %d: protocol version %u refused", (int)c->pid, h->version);
		free(w);
		return -MOE_E_PROTO;
	}
	pthread_mutex_lock(&s->cfg_lock);
	bool full = s->nclients >= s->cfg->limits.max_clients;
	pthread_mutex_unlock(&s->cfg_lock);
	if (full) {
		refuse(c->fd, -EUSERS, "moed serves its maximum of %u clients (limits.max_clients)",
		       s->cfg->limits.max_clients);
		log_warning("client pid %d refused: limits.max_clients (%u) reached", (int)c->pid,
			    s->cfg->limits.max_clients);
		free(w);
		return -EUSERS;
	}
	fd = segment_make(s, c, h, why, sizeof(why));
	if (fd < 0) {
		refuse(c->fd, fd, "%s", why);
		log_warning("client pid %d: no segment: %s", (int)c->pid, why);
		free(w);
		return fd;
	}
	welcome_fill(s, w);
	if (c->max_tokens < w->max_tokens)
		w->max_tokens = c->max_tokens;
	w->segment_bytes = c->seg.bytes;
	w->client_id = c->id;
	r = send_msg(c->fd, MOE_MSG_WELCOME, w, sizeof(*w), fd);
	close(fd);              /* the client has its own now; the mapping keeps ours */
	free(w);
	if (r < 0)
		return r;
	c->welcomed = true;
	greeting_remove(s, c);
	s->nclients++;
	atomic_fetch_add(&s->live_clients, 1);
	log_info("client %u (pid %d, uid %u): connected, %" PRIu64 " MiB segment", c->id, (int)c->pid,
		 (unsigned)c->uid, (uint64_t)(c->seg.bytes >> 20));
	pthread_mutex_lock(&s->lock);
	c->next = s->incoming;
	s->incoming = c;
	pthread_mutex_unlock(&s->lock);
	wake_data(s);
	return 0;
}

/* ------------------------------------------------------------------ the data thread */

static bool has_work(struct client *c)
{
	uint32_t tail = __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE);

	return tail != c->sq_head;
}

/* End @c's session from the data side: the control thread sees the socket
 * close and the next pass frees it. */
static void kick(struct client *c, const char *why)
{
	if (c->kicked)
		return;
	c->kicked = true;
	log_warning("client %u (pid %d): %s: disconnecting it", c->id, (int)c->pid, why);
	__atomic_store_n(&c->seg.hdr->daemon_state, MOE_SEG_CLOSED, __ATOMIC_RELEASE);
	shutdown(c->fd, SHUT_RDWR);
}

static void complete(struct moed_server *s, struct client *c, uint64_t user_data, int res)
{
	struct moe_cqe *e = &c->seg.cq[c->cq_tail & (c->seg.cq_entries - 1)];

	e->user_data = user_data;
	e->res = res;
	e->flags = 0;
	c->cq_tail++;
	if (res < 0) {
		c->errors++;
		s->total_errors++;
	}
}

/* Publish the completions and wake the client if it sleeps. */
static void publish(struct client *c)
{
	__atomic_store_n(&c->seg.hdr->cq_tail, c->cq_tail, __ATOMIC_RELEASE);
	__atomic_store_n(&c->seg.hdr->sq_head, c->sq_head, __ATOMIC_RELEASE);
	atomic_thread_fence(memory_order_seq_cst);
	moe_futex_kick(&c->seg.hdr->client_futex, &c->seg.hdr->client_wait, INT_MAX);
}

/* Is [off, off + len) inside the arena, with @align? */
static bool in_arena(const struct client *c, uint64_t off, uint64_t len, uint64_t align)
{
	return off % align == 0 && off <= c->seg.arena_bytes && len <= c->seg.arena_bytes - off;
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

static uint8_t *region_at(struct client *c, uint32_t r, uint64_t off, uint64_t len)
{
	uint8_t *p;

	pthread_mutex_lock(&c->rlock);
	p = region_at_locked(c, r, off, len);
	pthread_mutex_unlock(&c->rlock);
	return p;
}

/*
 * Check a copied descriptor against the model, the limits and the
 * daemon's own record of the segment.  0, or the error to complete it with.
 */
static int validate(struct moed_server *s, struct client *c, const struct moe_sqe *q,
		    uint32_t max_tokens)
{
	uint64_t H = s->mc->hidden_size, k = s->mc->top_k, es, bytes, rbytes;

	if (q->opcode == MOE_OP_NOP)
		return 0;
	if (q->opcode != MOE_OP_FORWARD)
		return -EOPNOTSUPP;
	if (q->flags & ~(MOE_SQE_ROUTING | MOE_SQE_DEVICE | MOE_SQE_REGIONS(0xff, 0xff)))
		return -EINVAL;
	if (!(q->flags & MOE_SQE_DEVICE) && (q->flags & MOE_SQE_REGIONS(0xff, 0xff)))
		return -EINVAL;
	if (moe_store_layer_index(moe_engine_store(s->engine), q->layer) < 0)
		return -MOE_E_LAYER;
	if (q->dtype != MOE_ACT_F32 && q->dtype != MOE_ACT_BF16)
		return -EINVAL;
	if (q->tokens == 0 || q->tokens > max_tokens)
		return -E2BIG;
	es = q->dtype == MOE_ACT_F32 ? 4 : 2;
	bytes = q->tokens * H * es;            /* tokens <= 2^20 and H < 2^32: no overflow */
	if (q->flags & MOE_SQE_DEVICE) {
		if (q->dtype != MOE_ACT_F32)
			return -EINVAL;          /* device memory holds float32 */
		if (region_at(c, MOE_SQE_IN_REGION(q->flags), q->in_off, bytes) == NULL ||
		    region_at(c, MOE_SQE_OUT_REGION(q->flags), q->out_off, bytes) == NULL)
			return -EFAULT;
	} else if (!in_arena(c, q->in_off, bytes, es) || !in_arena(c, q->out_off, bytes, es)) {
		return -EFAULT;
	}
	if (q->flags & MOE_SQE_ROUTING) {
		rbytes = q->tokens * k * 4;
		if (!in_arena(c, q->ids_off, rbytes, 4) || !in_arena(c, q->weights_off, rbytes, 4))
			return -EFAULT;
	}
	return 0;
}

/* Take what @c submitted: returns the number of requests added to s->reqs. */
static size_t take(struct moed_server *s, struct client *c, size_t nreq, size_t cap, uint64_t t0)
{
	/* each index read once; the client can change it any time after */
	uint32_t tail = __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE);
	uint32_t cq_head = __atomic_load_n(&c->seg.hdr->cq_head, __ATOMIC_ACQUIRE);
	uint32_t n = tail - c->sq_head, space, added = 0;

	if (n > c->seg.sq_entries) {
		kick(c, "its submission ring index is corrupt");
		return nreq;
	}
	if (c->cq_tail - cq_head > c->seg.cq_entries) {
		kick(c, "its completion ring index is corrupt");
		return nreq;
	}
	/* take only what has room for its completion, and in our array */
	space = c->seg.cq_entries - (c->cq_tail - cq_head);
	if (n > space)
		n = space;
	if (n > cap - nreq)
		n = (uint32_t)(cap - nreq);
	for (uint32_t i = 0; i < n; i++) {
		struct moe_sqe q;
		int r;

		memcpy(&q, &c->seg.sq[(c->sq_head + i) & (c->seg.sq_entries - 1)], sizeof(q));
		if ((q.flags & MOE_SQE_DEVICE) && q.opcode == MOE_OP_FORWARD) {
			/* a request on device memory runs alone: one per client
			 * per pass, so that a client flooding them delays the
			 * others by one forward at most; the rest waits */
			if (c->dev_taken) {
				n = i;
				break;
			}
			c->dev_taken = true;
		}
		c->requests++;
		/* the session's limit is the one it was welcomed with (its library
		 * cuts pieces by it): a reload changes the limit of new sessions */
		r = validate(s, c, &q, c->max_tokens);
		if (r < 0 || q.opcode == MOE_OP_NOP) {
			complete(s, c, q.user_data, r);
			continue;
		}
		s->reqs[nreq + added] = (struct req){ .c = c, .sqe = q, .t0 = t0, .seq = nreq + added };
		added++;
	}
	c->sq_head += n;
	return nreq + added;
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
	void *n;

	if (need <= *cap)
		return 0;
	n = realloc(*p, need * elem);
	if (!n)
		return -ENOMEM;
	*p = n;
	*cap = need;
	return 0;
}

static int by_layer(const void *a, const void *b)
{
	const struct req *x = a, *y = b;

	if (x->sqe.layer != y->sqe.layer)
		return x->sqe.layer < y->sqe.layer ? -1 : 1;
	/* stable: the order they were taken in */
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void record_latency(struct moed_server *s, uint64_t ns)
{
	s->lat[s->lat_n++ % LAT_SAMPLES] = ns;
}

/* Run request @q on device memory: the client's regions in, out. */
static int run_device(struct moed_server *s, struct req *q, struct moe_err *err)
{
	struct client *c = q->c;
	uint64_t H = s->mc->hidden_size, k = s->mc->top_k, bytes = q->sqe.tokens * H * sizeof(float);
	bool routing = (q->sqe.flags & MOE_SQE_ROUTING) != 0;
	uint8_t *in, *out;
	int r;

	if (routing) {
		size_t cap = s->rcap;
		if (grow((void **)&s->ids, &cap, q->sqe.tokens * k, sizeof(int32_t)) < 0 ||
		    grow((void **)&s->w, &s->rcap, q->sqe.tokens * k, sizeof(float)) < 0)
			return -ENOMEM;
	}
	/* the regions are busy while the engine uses them: an unmap meanwhile
	 * is done here afterwards */
	uint32_t ri = MOE_SQE_IN_REGION(q->sqe.flags), ro = MOE_SQE_OUT_REGION(q->sqe.flags);
	void *closing[2] = { NULL, NULL };

	pthread_mutex_lock(&c->rlock);
	in = region_at_locked(c, ri, q->sqe.in_off, bytes);
	out = region_at_locked(c, ro, q->sqe.out_off, bytes);
	if (in && out) {
		c->regions[ri].busy++;
		c->regions[ro].busy++;
	}
	pthread_mutex_unlock(&c->rlock);
	if (!in || !out)
		return moe_err_set(err, -EFAULT, "client %u: its device region is gone", c->id);
	r = moe_engine_forward(s->engine, q->sqe.layer, (const float *)in, q->sqe.tokens, (float *)out,
			       routing ? s->ids : NULL, routing ? s->w : NULL, MOE_FWD_DEVICE_IO, err);
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
	if (r == 0 && routing) {
		memcpy(c->seg.arena + q->sqe.ids_off, s->ids, q->sqe.tokens * k * sizeof(int32_t));
		memcpy(c->seg.arena + q->sqe.weights_off, s->w, q->sqe.tokens * k * sizeof(float));
	}
	return r;
}

/* Run requests [r0, r1) of one layer as one engine call; 0 or the error. */
static int run_batch(struct moed_server *s, struct req *r0, struct req *r1, struct moe_err *err)
{
	uint32_t H = s->mc->hidden_size, k = s->mc->top_k;
	uint64_t tokens = 0, t = 0;
	bool routing = false;
	int r;

	if (r0->sqe.flags & MOE_SQE_DEVICE)
		return run_device(s, r0, err);      /* alone: run_layer */
	for (struct req *q = r0; q < r1; q++) {
		tokens += q->sqe.tokens;
		routing |= (q->sqe.flags & MOE_SQE_ROUTING) != 0;
	}
	if (grow((void **)&s->x, &s->xcap, tokens * H, sizeof(float)) < 0)
		return -ENOMEM;
	if (grow((void **)&s->y, &s->ycap, tokens * H, sizeof(float)) < 0)
		return -ENOMEM;
	if (routing) {
		size_t cap = s->rcap;
		if (grow((void **)&s->ids, &cap, tokens * k, sizeof(int32_t)) < 0 ||
		    grow((void **)&s->w, &s->rcap, tokens * k, sizeof(float)) < 0)
			return -ENOMEM;
	}
	/* gather: a copy, so that the client cannot change the input under us */
	for (struct req *q = r0; q < r1; q++) {
		const uint8_t *in = q->c->seg.arena + q->sqe.in_off;
		float *x = s->x + t * H;
		uint64_t n = q->sqe.tokens * H;

		if (q->sqe.dtype == MOE_ACT_F32)
			memcpy(x, in, n * sizeof(float));
		else
			for (uint64_t i = 0; i < n; i++) {
				uint16_t v;
				memcpy(&v, in + 2 * i, 2);
				x[i] = moe_bf16_to_f32(v);
			}
		t += q->sqe.tokens;
	}
	r = moe_engine_forward(s->engine, r0->sqe.layer, s->x, tokens, s->y, routing ? s->ids : NULL,
			       routing ? s->w : NULL, 0, err);
	if (r < 0)
		return r;
	/* scatter */
	t = 0;
	for (struct req *q = r0; q < r1; q++) {
		uint8_t *out = q->c->seg.arena + q->sqe.out_off;
		const float *y = s->y + t * H;
		uint64_t n = q->sqe.tokens * H;

		if (q->sqe.dtype == MOE_ACT_F32) {
			memcpy(out, y, n * sizeof(float));
		} else {
			for (uint64_t i = 0; i < n; i++) {
				uint16_t v = moe_f32_to_bf16(y[i]);
				memcpy(out + 2 * i, &v, 2);
			}
		}
		if (q->sqe.flags & MOE_SQE_ROUTING) {
			memcpy(q->c->seg.arena + q->sqe.ids_off, s->ids + t * k, q->sqe.tokens * k * sizeof(int32_t));
			memcpy(q->c->seg.arena + q->sqe.weights_off, s->w + t * k, q->sqe.tokens * k * sizeof(float));
		}
		t += q->sqe.tokens;
	}
	return 0;
}

/* Finish requests [r0, r1) with @res. */
static void finish(struct moed_server *s, struct req *r0, struct req *r1, int res)
{
	uint64_t t1 = moe_now_ns();

	for (struct req *q = r0; q < r1; q++) {
		complete(s, q->c, q->sqe.user_data, res);
		if (res == 0) {
			q->c->tokens += q->sqe.tokens;
			s->total_tokens += q->sqe.tokens;
			s->tps_tokens += q->sqe.tokens;
		}
		record_latency(s, t1 - q->t0);
	}
}

/*
 * Run the requests of one layer, in batches of at most batch.max_tokens
 * tokens.  When a batch fails (an expert that cannot be read), its
 * requests run one by one, so that exactly those that need the expert
 * fail.
 */
static void run_layer(struct moed_server *s, struct req *r0, struct req *r1, uint32_t batch_max)
{
	struct moe_err err = { 0 };

	while (r0 < r1) {
		struct req *e = r0;
		uint64_t tokens = 0;
		int r;

		/* a request on device memory runs alone: its tensors are not in
		 * host memory to be batched with the others' */
		while (e < r1 && (e == r0 || (tokens + e->sqe.tokens <= batch_max &&
					      !((r0->sqe.flags | e->sqe.flags) & MOE_SQE_DEVICE))))
			tokens += (e++)->sqe.tokens;
		r = run_batch(s, r0, e, &err);
		s->total_batches++;
		if (r < 0 && e - r0 > 1) {
			for (struct req *q = r0; q < e; q++) {
				moe_err_clear(&err);
				r = run_batch(s, q, q + 1, &err);
				if (r < 0)
					log_error("client %u: layer %u: %s", q->c->id, q->sqe.layer,
						  err.msg[0] ? err.msg : strerror(-r));
				finish(s, q, q + 1, r);
			}
		} else {
			if (r < 0)
				log_error("layer %u: %s", r0->sqe.layer, err.msg[0] ? err.msg : strerror(-r));
			finish(s, r0, e, r);
		}
		r0 = e;
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The stats snapshot, on the data thread (the engine is its alone). */
static void stats_snapshot(struct moed_server *s)
{
	const struct moe_store *st = moe_engine_store(s->engine);
	uint32_t E = s->mc->num_experts;
	char *eng = moe_engine_stats_json(s->engine);
	json_t *root = json_object(), *clients = json_array(), *load = json_array(), *lat;
	uint64_t n = s->lat_n < LAT_SAMPLES ? s->lat_n : LAT_SAMPLES;
	uint64_t *sorted = malloc((n ? n : 1) * sizeof(uint64_t));
	uint64_t *counts = malloc(E * sizeof(uint64_t));
	double up = (double)(moe_now_ns() - s->started_ns) / 1e9;
	char *text;

	json_object_set_new(root, "model", json_string(st->hdr.model_type));
	json_object_set_new(root, "store", json_string(st->path));
	json_object_set_new(root, "uptime_s", json_real(up));
	json_object_set_new(root, "clients_connected", json_integer(atomic_load(&s->live_clients)));
	json_object_set_new(root, "requests", json_integer((json_int_t)s->total_requests));
	json_object_set_new(root, "tokens", json_integer((json_int_t)s->total_tokens));
	json_object_set_new(root, "errors", json_integer((json_int_t)s->total_errors));
	json_object_set_new(root, "batches", json_integer((json_int_t)s->total_batches));
	json_object_set_new(root, "tokens_per_s", json_real(s->tps));
	lat = json_object();
	if (sorted && n) {
		memcpy(sorted, s->lat, n * sizeof(uint64_t));
		qsort(sorted, n, sizeof(uint64_t), cmp_u64);
		json_object_set_new(lat, "samples", json_integer((json_int_t)n));
		json_object_set_new(lat, "p50_us", json_real((double)sorted[n / 2] / 1e3));
		json_object_set_new(lat, "p90_us", json_real((double)sorted[n * 9 / 10] / 1e3));
		json_object_set_new(lat, "p99_us", json_real((double)sorted[n * 99 / 100] / 1e3));
		json_object_set_new(lat, "max_us", json_real((double)sorted[n - 1] / 1e3));
	}
	json_object_set_new(root, "latency", lat);
	for (struct client *c = s->clients; c; c = c->next)
		json_array_append_new(clients, json_pack("{s:i,s:i,s:i,s:I,s:I,s:I}", "id", (int)c->id,
							 "pid", (int)c->pid, "uid", (int)c->uid,
							 "requests", (json_int_t)c->requests,
							 "tokens", (json_int_t)c->tokens,
							 "errors", (json_int_t)c->errors));
	json_object_set_new(root, "clients", clients);
	for (uint32_t i = 0; counts && i < st->hdr.num_moe_layers; i++) {
		json_t *arr = json_array();

		moe_engine_expert_load(s->engine, st->layers[i].layer, counts);
		for (uint32_t e = 0; e < E; e++)
			json_array_append_new(arr, json_integer((json_int_t)counts[e]));
		json_array_append_new(load, json_pack("{s:i,s:o}", "layer", (int)st->layers[i].layer,
						      "experts", arr));
	}
	json_object_set_new(root, "expert_load", load);
	if (eng) {
		json_t *e = json_loads(eng, 0, NULL);
		if (e)
			json_object_set_new(root, "engine", e);
	}
	text = json_dumps(root, JSON_PRESERVE_ORDER | JSON_COMPACT);
	json_decref(root);
	free(eng);
	free(sorted);
	free(counts);
	pthread_mutex_lock(&s->lock);
	if (text) {
		free(s->stats_json);
		s->stats_json = text;
	}
	s->stats_gen++;
	pthread_mutex_unlock(&s->lock);
	{
		uint64_t one = 1;
		ssize_t w = write(s->stats_efd, &one, sizeof(one));

		(void)w;      /* the counter cannot overflow in practice; the next one says it too */
	}
}

/* Adopt new sessions, free ended ones. */
static void sessions_update(struct moed_server *s)
{
	struct client **pp, *c, *in;

	pthread_mutex_lock(&s->lock);
	in = s->incoming;
	s->incoming = NULL;
	pthread_mutex_unlock(&s->lock);
	while ((c = in)) {
		in = c->next;
		c->next = s->clients;
		s->clients = c;
	}
	for (pp = &s->clients; (c = *pp);) {
		if (atomic_load(&c->dead)) {
			*pp = c->next;
			client_free(s, c);
			continue;
		}
		pp = &c->next;
	}
}

/* Sleep until a client submits, a session comes or goes, or we are asked
 * for something.  The wakeup protocol of proto.h; @own is the wake word as
 * read before this pass looked at the sessions, so that a wake in between
 * is not lost. */
static void data_sleep(struct moed_server *s, uint32_t own)
{
	struct futex_waitv wv[FUTEX_WAITV_MAX];
	uint32_t n = 0;
	struct timespec ts;
	bool work = false;

	wv[n++] = (struct futex_waitv){ .val = own, .uaddr = (uintptr_t)&s->wake_word,
					.flags = FUTEX_32 };   /* woken by a shared FUTEX_WAKE */
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->kicked)
			continue;
		if (n < FUTEX_WAITV_MAX)
			wv[n++] = (struct futex_waitv){
				.val = __atomic_load_n(&c->seg.hdr->daemon_futex, __ATOMIC_ACQUIRE),
				.uaddr = (uintptr_t)&c->seg.hdr->daemon_futex, .flags = FUTEX_32 };
		__atomic_store_n(&c->seg.hdr->daemon_wait, 1, __ATOMIC_RELAXED);
	}
	atomic_thread_fence(memory_order_seq_cst);
	for (struct client *c = s->clients; c && !work; c = c->next)
		work = !c->kicked && has_work(c);
	if (!work && !atomic_load(&s->stop) && !atomic_load(&s->stats_wanted) &&
	    atomic_load(&s->wake_word) == own) {
		clock_gettime(CLOCK_MONOTONIC, &ts);
		/* more clients than one call can watch: poll the others every ms */
		uint64_t slice = n < FUTEX_WAITV_MAX || !s->clients ? s->slice_ns : 1000000u;
		ts.tv_sec += (time_t)(slice / 1000000000u);
		ts.tv_nsec += (long)(slice % 1000000000u);
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		syscall(SYS_futex_waitv, wv, n, 0, &ts, CLOCK_MONOTONIC);
	}
	for (struct client *c = s->clients; c; c = c->next)
		if (!c->kicked)
			__atomic_store_n(&c->seg.hdr->daemon_wait, 0, __ATOMIC_RELAXED);
}

/* At stop: fail every request still queued, and tell each client. */
static void drain(struct moed_server *s)
{
	for (struct client *c = s->clients; c; c = c->next) {
		if (c->kicked)
			continue;
		uint32_t tail = __atomic_load_n(&c->seg.hdr->sq_tail, __ATOMIC_ACQUIRE);
		uint32_t cq_head = __atomic_load_n(&c->seg.hdr->cq_head, __ATOMIC_ACQUIRE);
		uint32_t n = tail - c->sq_head;

		if (n <= c->seg.sq_entries && c->cq_tail - cq_head <= c->seg.cq_entries) {
			uint32_t space = c->seg.cq_entries - (c->cq_tail - cq_head);
			for (uint32_t i = 0; i < n && i < space; i++)
				complete(s, c, c->seg.sq[(c->sq_head + i) & (c->seg.sq_entries - 1)].user_data, -ESHUTDOWN);
			c->sq_head += n < space ? n : space;
		}
		/* the completions first, then the state, so that a client that sees
		 * the session closed has every answer already */
		publish(c);
		__atomic_store_n(&c->seg.hdr->daemon_state, MOE_SEG_CLOSED, __ATOMIC_RELEASE);
		atomic_thread_fence(memory_order_seq_cst);
		moe_futex_kick(&c->seg.hdr->client_futex, &c->seg.hdr->client_wait, INT_MAX);
	}
}

static void *data_main(void *arg)
{
	struct moed_server *s = arg;

	s->started_ns = s->tps_t0 = moe_now_ns();
	atomic_store(&s->heartbeat, s->started_ns);
	while (!atomic_load(&s->stop)) {
		uint32_t batch_max, own = atomic_load(&s->wake_word);
		size_t nreq = 0, cap = 0;
		uint64_t t0 = moe_now_ns();
		bool any = false;

		atomic_store(&s->heartbeat, t0);
		sessions_update(s);
		if (atomic_exchange(&s->stats_wanted, false))
			stats_snapshot(s);
		pthread_mutex_lock(&s->cfg_lock);
		batch_max = s->cfg->batch.max_tokens;
		uint32_t window = s->cfg->batch.window_us;
		pthread_mutex_unlock(&s->cfg_lock);

		for (struct client *c = s->clients; c && !any; c = c->next)
			any = !c->kicked && has_work(c);
		if (!any) {
			/* poll the rings (and the wake word, which says a session came
			 * or went or something was asked) a little, then sleep */
			for (uint64_t t = t0; t - t0 < IDLE_SPIN_NS && !any; t = moe_now_ns()) {
				moe_cpu_relax();
				any = atomic_load(&s->wake_word) != own;
				for (struct client *c = s->clients; c && !any; c = c->next)
					any = !c->kicked && has_work(c);
			}
			if (!any)
				data_sleep(s, own);
			continue;
		}
		if (window) {
			/* batch.window_us: let more requests gather before the pass */
			struct timespec d = { 0, (long)window * 1000 };
			nanosleep(&d, NULL);
		}
		/* room for every live client's whole ring: any of them may have
		 * submitted since we looked (take() clamps to the room as well) */
		cap = 0;
		for (struct client *c = s->clients; c; c = c->next)
			if (!c->kicked)
				cap += c->seg.sq_entries;
		if (grow((void **)&s->reqs, &s->reqs_cap, cap, sizeof(struct req)) < 0) {
			log_error("out of memory for %zu requests", cap);
			data_sleep(s, own);
			continue;
		}
		/* one pass: what every client has submitted right now */
		for (struct client *c = s->clients; c; c = c->next) {
			size_t before = nreq;
			uint32_t cq_before = c->cq_tail;

			if (c->kicked)
				continue;
			c->dev_taken = false;
			nreq = take(s, c, nreq, s->reqs_cap, t0);
			s->total_requests += (nreq - before) + (c->cq_tail - cq_before);
			if (c->cq_tail != cq_before)
				publish(c);         /* NOPs and refusals go back at once */
		}
		/* every layer's requests as one batch (or a few, by batch.max_tokens) */
		qsort(s->reqs, nreq, sizeof(struct req), by_layer);
		for (size_t i = 0; i < nreq;) {
			size_t j = i;

			while (j < nreq && s->reqs[j].sqe.layer == s->reqs[i].sqe.layer)
				j++;
			run_layer(s, s->reqs + i, s->reqs + j, batch_max);
			i = j;
		}
		for (struct client *c = s->clients; c; c = c->next)
			if (!c->kicked)
				publish(c);
	}
	/* sessions handed over just now are drained too: nothing goes unanswered */
	sessions_update(s);
	drain(s);
	return NULL;
}

/* ------------------------------------------------------------------ the control thread */

static int listen_setup(struct moed_server *s, struct moe_err *err)
{
	const struct moed_config *c = s->cfg;
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd, r;

#ifdef HAVE_SYSTEMD
	int n = sd_listen_fds(1);

	if (n > 1)
		return moe_err_set(err, -EINVAL, "systemd passed %d sockets; moed takes one", n);
	if (n == 1) {
		if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
			return moe_err_set(err, -EINVAL, "the socket systemd passed is not a listening unix stream socket");
		s->listen_fd = SD_LISTEN_FDS_START;
		s->socket_activated = true;
		fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
		fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
		return 0;
	}
#endif
	if (strlen(c->socket.path) >= sizeof(a.sun_path))
		return moe_err_set(err, -ENAMETOOLONG, "socket path %s is longer than %zu bytes", c->socket.path,
				   sizeof(a.sun_path) - 1);
	strcpy(a.sun_path, c->socket.path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return moe_err_set(err, -errno, "socket: %s", strerror(errno));
	r = bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ? -errno : 0;
	if (r == -EADDRINUSE) {
		/* a socket file left by a moed that died: remove it only if nobody
		 * answers on it */
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		struct stat st;

		if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0) {
			close(probe);
			close(fd);
			return moe_err_set(err, -EADDRINUSE, "%s: another moed is serving this socket", c->socket.path);
		}
		if (probe >= 0)
			close(probe);
		if (lstat(c->socket.path, &st) == 0 && S_ISSOCK(st.st_mode))
			unlink(c->socket.path);
		r = bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ? -errno : 0;
	}
	if (r < 0) {
		close(fd);
		return moe_err_set(err, r, "%s: bind: %s", c->socket.path, strerror(-r));
	}
	s->unlink_socket = true;
	if (chmod(c->socket.path, c->socket.mode) < 0)
		log_warning("%s: chmod %o: %s", c->socket.path, c->socket.mode, strerror(errno));
	if (c->socket.group && c->socket.group[0]) {
		struct group *g = getgrnam(c->socket.group);

		if (!g)
			log_warning("%s: group %s does not exist: the socket keeps its group", c->socket.path,
				    c->socket.group);
		else if (chown(c->socket.path, (uid_t)-1, g->gr_gid) < 0)
			log_warning("%s: chown to group %s: %s", c->socket.path, c->socket.group, strerror(errno));
	}
	if (listen(fd, 128) < 0) {
		r = -errno;
		close(fd);
		return moe_err_set(err, r, "%s: listen: %s", c->socket.path, strerror(-r));
	}
	s->listen_fd = fd;
	return 0;
}

static void client_event(struct moed_loop *l, int fd, void *data, unsigned mask);

/* The listening socket is readable: take one connection. */
static void accept_one(struct moed_loop *l, int lfd, void *data, unsigned mask)
{
	struct moed_server *s = data;
	struct ucred cred;
	socklen_t len = sizeof(cred);
	struct client *c;
	int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	(void)mask;

	if (fd < 0) {
		if ((errno == EMFILE || errno == ENFILE) && s->spare_fd >= 0) {
			/* out of descriptors: drop this connection rather than let it
			 * keep the listening socket readable and spin on it */
			close(s->spare_fd);
			fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (fd >= 0)
				close(fd);
			s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
			log_warning("out of file descriptors: a connection was dropped");
		} else if (errno != EAGAIN && errno != EINTR) {
			log_warning("accept: %s", strerror(errno));
		}
		return;
	}
	if (s->ngreeting >= 2 * s->cfg->limits.max_clients + 16) {
		/* connections that have not said HELLO are bounded too */
		close(fd);
		log_warning("too many connections waiting to say HELLO: one was dropped");
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		log_warning("SO_PEERCRED: %s", strerror(errno));
		close(fd);
		return;
	}
	pthread_mutex_lock(&s->cfg_lock);
	bool ok = peer_allowed(s, cred.uid, cred.gid);
	pthread_mutex_unlock(&s->cfg_lock);
	if (!ok) {
		refuse(fd, -EACCES, "uid %u (gid %u) is not allowed by access.uids/access.gids in %s",
		       (unsigned)cred.uid, (unsigned)cred.gid, s->config_path ? s->config_path : "the configuration");
		log_warning("client pid %d (uid %u, gid %u) refused: not in access.uids or access.gids",
			    (int)cred.pid, (unsigned)cred.uid, (unsigned)cred.gid);
		close(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	pthread_mutex_init(&c->rlock, NULL);
	c->s = s;
	c->fd = fd;
	c->pid = cred.pid;
	c->uid = cred.uid;
	c->gid = cred.gid;
	c->id = ++s->next_id;
	c->accepted = time(NULL);
	if (moed_loop_add(l, fd, MOED_LOOP_READABLE, client_event, c) < 0) {
		close(fd);
		pthread_mutex_destroy(&c->rlock);
		free(c);
		return;
	}
	c->ctl_next = s->greeting;
	s->greeting = c;
	s->ngreeting++;
}

/* The session's socket closed (or misbehaved): hand it back for freeing. */
static void session_end(struct moed_server *s, struct client *c)
{
	stats_waiter_remove(s, c);
	c->stats_waiting = 0;
	moed_loop_del(s->loop, c->fd);
	if (!c->welcomed) {
		/* a segment made for a WELCOME that could not be sent goes too */
		greeting_remove(s, c);
		client_free(s, c);
		return;
	}
	s->nclients--;
	atomic_store(&c->dead, true);
	wake_data(s);
}

/* A client's socket is ready: send what waits, read what came. */
static void client_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	struct client *c = data;
	struct moed_server *s = c->s;

	(void)l;
	(void)fd;
	if ((mask & MOED_LOOP_WRITABLE) && c->out && flush_out(s, c) < 0) {
		session_end(s, c);
		return;
	}
	if (!(mask & (MOED_LOOP_READABLE | MOED_LOOP_HUP)))
		return;
	for (;;) {
		struct moe_msg_header *h = (struct moe_msg_header *)c->in;
		size_t want = sizeof(*h);
		ssize_t n;

		if (c->in_len >= sizeof(*h)) {
			if (h->magic != MOE_MSG_MAGIC || h->len > sizeof(c->in) - sizeof(*h)) {
				log_warning("client pid %d: not the moed protocol: dropping it", (int)c->pid);
				session_end(s, c);
				return;
			}
			want += h->len;
		}
		if (c->in_len < want) {
			n = recv(c->fd, c->in + c->in_len, want - c->in_len, 0);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
				session_end(s, c);
				return;
			}
			if (n < 0) {
				if (mask & MOED_LOOP_HUP)
					session_end(s, c);
				return;
			}
			c->in_len += (size_t)n;
			continue;
		}
		/* a whole message */
		c->in_len = 0;
		switch (h->type) {
		case MOE_MSG_HELLO: {
			struct moe_msg_hello hello_msg = { 0 };

			if (c->welcomed || h->len != sizeof(hello_msg)) {
				log_warning("client pid %d: unexpected HELLO: dropping it", (int)c->pid);
				session_end(s, c);
				return;
			}
			memcpy(&hello_msg, c->in + sizeof(*h), sizeof(hello_msg));
			if (hello(s, c, &hello_msg) < 0) {
				session_end(s, c);
				return;
			}
			break;
		}
		case MOE_MSG_STATS:
			if (h->len != 0) {
				session_end(s, c);
				return;
			}
			stats_request(s, c);
			break;
		case MOE_MSG_CUDA_MAP:
		case MOE_MSG_CUDA_UNMAP: {
			struct moe_msg_cuda_map map = { 0 };
			struct moe_msg_cuda_unmap unmap = { 0 };
			bool is_map = h->type == MOE_MSG_CUDA_MAP;
			int r;

			if (!c->welcomed || h->len != (is_map ? sizeof(map) : sizeof(unmap))) {
				log_warning("client pid %d: unexpected %s message: dropping it", (int)c->pid,
					    is_map ? "CUDA_MAP" : "CUDA_UNMAP");
				session_end(s, c);
				return;
			}
			if (is_map) {
				memcpy(&map, c->in + sizeof(*h), sizeof(map));
				r = cuda_map(s, c, &map);
			} else {
				memcpy(&unmap, c->in + sizeof(*h), sizeof(unmap));
				r = cuda_unmap(s, c, &unmap);
			}
			if (r < 0) {
				session_end(s, c);
				return;
			}
			break;
		}
		default:
			log_warning("client pid %d: unknown message type %u: dropping it", (int)c->pid, h->type);
			session_end(s, c);
			return;
		}
	}
}

static void reload(struct moed_server *s)
{
	struct moe_err err = { 0 };
	struct moed_config *n, *old;

	if (!s->config_path) {
		log_notice("SIGHUP: no configuration file to reload");
		return;
	}
	notify("RELOADING=1");
	if (moed_config_load(s->config_path, &n, &err) < 0) {
		log_error("reload: %s: keeping the configuration in use", err.msg);
		notify("READY=1");
		return;
	}
	for (size_t i = 0; i < s->nov; i++)
		if (moed_config_set(n, s->ov[i].name, s->ov[i].value, &err) < 0) {
			log_error("reload: command line: %s: keeping the configuration in use", err.msg);
			moed_config_free(n);
			notify("READY=1");
			return;
		}
	/* what needs a restart stays as it is, said once */
	{
		char names[512];

		if (moed_config_diff(s->cfg, n, true, names, sizeof(names)) > 0)
			log_notice("reload: %s changed: that takes effect at the next start", names);
	}
	/* keep the restart-only settings of the running configuration */
	pthread_mutex_lock(&s->cfg_lock);
	old = s->cfg;
	free(old->access.uids);
	free(old->access.gids);
	old->access = n->access;
	n->access.uids = NULL;
	n->access.gids = NULL;
	n->access.n_uids = n->access.n_gids = 0;
	old->batch = n->batch;
	old->limits.max_tokens_per_request = n->limits.max_tokens_per_request;
	old->log = n->log;
	/* pins change with the next engine (a restart) for now */
	pthread_mutex_unlock(&s->cfg_lock);
	moed_log_set_level(old->log.level);
	moed_config_free(n);
	log_info("reloaded %s", s->config_path);
	notify("READY=1");
}

static void status_tick(struct moed_server *s)
{
	time_t now = time(NULL);
	char msg[256];

	stats_deliver(s, false);      /* no snapshot in time: the latest one */
	/* a session that never says HELLO does not keep its socket */
	for (struct client *c = s->greeting, *next; c; c = next) {
		next = c->ctl_next;
		if (now - c->accepted > HELLO_TIMEOUT_S) {
			log_warning("client pid %d: no HELLO in %d s: dropping it", (int)c->pid, HELLO_TIMEOUT_S);
			session_end(s, c);
		}
	}

	uint64_t t = moe_now_ns();
	double dt = (double)(t - s->tps_t0) / 1e9;

	if (dt > 0) {
		s->tps = (double)s->tps_tokens / dt;   /* a racy read of a counter: fine for a status line */
		s->tps_tokens = 0;
		s->tps_t0 = t;
	}
	snprintf(msg, sizeof(msg), "STATUS=Serving %s (%s), %u clients, %.0f tokens/s",
		 moe_engine_store(s->engine)->hdr.model_type, moe_engine_store(s->engine)->path,
		 atomic_load(&s->live_clients), s->tps);
	notify(msg);
#ifdef HAVE_SYSTEMD
	uint64_t usec;
	/* only while the data thread shows life: a hung engine or a stuck
	 * device call must trip WatchdogSec (it wakes at least once a second
	 * when idle; a batch longer than half the watchdog time counts as hung) */
	if (sd_watchdog_enabled(0, &usec) > 0) {
		uint64_t age = moe_now_ns() - atomic_load(&s->heartbeat);

		if (age < usec * 1000 / 2)
			notify("WATCHDOG=1");
		else
			log_warning("the data thread has shown no sign of life for %.1f s: not telling the "
				    "watchdog", (double)age / 1e9);
	}
#endif
}

/* The signalfd: SIGHUP reloads, SIGTERM and SIGINT stop. */
static void signal_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	struct moed_server *s = data;
	struct signalfd_siginfo si;

	(void)l;
	(void)mask;
	if (read(fd, &si, sizeof(si)) != sizeof(si))
		return;
	if (si.ssi_signo == SIGHUP) {
		reload(s);
	} else {
		log_info("%s: stopping", strsignal((int)si.ssi_signo));
		notify("STOPPING=1");
		s->running = false;
	}
}

/* The stats eventfd: the data thread has a fresh snapshot. */
static void stats_ready_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	uint64_t v;

	(void)l;
	(void)mask;
	if (read(fd, &v, sizeof(v)) == sizeof(v))
		stats_deliver(data, true);
}

/* The timerfd: the status and watchdog tick. */
static void tick_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	uint64_t ticks;

	(void)l;
	(void)mask;
	if (read(fd, &ticks, sizeof(ticks)) == sizeof(ticks))
		status_tick(data);
}

int moed_server_run(struct moed_server *s)
{
	int r;

	r = pthread_create(&s->data_thread, NULL, data_main, s);
	if (r) {
		log_error("cannot start the data thread: %s", strerror(r));
		return 1;
	}
	s->data_ok = true;
	log_info("serving %s (%s, %u MoE layers, backend %s) on %s", s->cfg->model,
		 moe_engine_store(s->engine)->hdr.model_type, moe_engine_store(s->engine)->hdr.num_moe_layers,
		 moe_engine_backend(s->engine)->ops->name,
		 s->socket_activated ? "the socket systemd passed (socket activation)" : s->cfg->socket.path);
	notify("READY=1");
	status_tick(s);
	s->running = true;
	while (s->running) {
		r = moed_loop_run_once(s->loop, -1);
		if (r < 0) {
			log_error("epoll_wait: %s", strerror(-r));
			break;
		}
	}
	atomic_store(&s->stop, true);
	wake_data(s);
	pthread_join(s->data_thread, NULL);
	s->data_ok = false;
	return 0;
}

int moed_server_new(struct moed_config *cfg, const char *config_path, const struct moed_override *ov,
		    size_t nov, struct moed_server **ret, struct moe_err *err)
{
	struct moe_engine_options eo = { 0 };
	struct itimerspec its = { { 1, 0 }, { 1, 0 } };
	struct moed_server *s = calloc(1, sizeof(*s));
	sigset_t mask;
	int r;

	if (!s) {
		moed_config_free(cfg);
		return moe_err_set(err, -ENOMEM, "out of memory");
	}
	s->cfg = cfg;
	s->listen_fd = s->sigfd = s->timerfd = s->stats_efd = -1;
	s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->cfg_lock, NULL);
	if (config_path && !(s->config_path = strdup(config_path))) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	s->ov = calloc(nov ? nov : 1, sizeof(*s->ov));
	if (!s->ov) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (size_t i = 0; i < nov; i++) {
		s->ov[i].name = strdup(ov[i].name);
		s->ov[i].value = strdup(ov[i].value);
		s->nov++;
		if (!s->ov[i].name || !s->ov[i].value) {
			r = moe_err_set(err, -ENOMEM, "out of memory");
			goto fail;
		}
	}
	/* the signals come through a signalfd; every thread blocks them */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);

	moed_config_engine_options(cfg, &eo);
	eo.log = moed_log_engine;
	notify("EXTEND_TIMEOUT_USEC=60000000");
	r = moe_engine_open(cfg->model, &eo, &s->engine, err);
	if (r < 0)
		goto fail;
	s->mc = moe_engine_config(s->engine);
	{
		const struct moe_backend *be = moe_engine_backend(s->engine);
		if (be->reason[0])
			log_notice("backend: %s (%s)", be->ops->name, be->reason);
	}
	r = listen_setup(s, err);
	if (r < 0)
		goto fail;
	r = moed_loop_new(&s->loop);
	if (r < 0) {
		r = moe_err_set(err, r, "epoll: %s", strerror(-r));
		goto fail;
	}
	s->sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	s->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	s->stats_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (s->sigfd < 0 || s->timerfd < 0 || s->stats_efd < 0) {
		r = moe_err_set(err, -errno, "signalfd/timerfd/eventfd: %s", strerror(errno));
		goto fail;
	}
	/* the status and watchdog tick: every second, or twice per WatchdogSec;
	 * the data thread wakes four times per WatchdogSec to show it lives */
	s->slice_ns = WAIT_SLICE_NS;
#ifdef HAVE_SYSTEMD
	{
		uint64_t usec;

		if (sd_watchdog_enabled(0, &usec) > 0 && usec) {
			s->watchdog_ns = usec * 1000;
			if (s->watchdog_ns / 4 < s->slice_ns)
				s->slice_ns = s->watchdog_ns / 4;
			if (s->watchdog_ns / 2 < 1000000000u) {
				its.it_interval = (struct timespec){ 0, (long)(s->watchdog_ns / 2) };
				its.it_value = its.it_interval;
			}
		}
	}
#endif
	timerfd_settime(s->timerfd, 0, &its, NULL);
	if ((r = moed_loop_add(s->loop, s->listen_fd, MOED_LOOP_READABLE, accept_one, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->sigfd, MOED_LOOP_READABLE, signal_event, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->timerfd, MOED_LOOP_READABLE, tick_event, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->stats_efd, MOED_LOOP_READABLE, stats_ready_event, s)) < 0) {
		r = moe_err_set(err, r, "epoll_ctl: %s", strerror(-r));
		goto fail;
	}
	*ret = s;
	return 0;
fail:
	moed_server_free(s);
	return r;
}

void moed_server_free(struct moed_server *s)
{
	struct client *c;

	if (!s)
		return;
	if (s->data_ok) {
		atomic_store(&s->stop, true);
		wake_data(s);
		pthread_join(s->data_thread, NULL);
	}
	while ((c = s->clients)) {
		s->clients = c->next;
		client_free(s, c);
	}
	while ((c = s->incoming)) {
		s->incoming = c->next;
		client_free(s, c);
	}
	while ((c = s->greeting)) {
		s->greeting = c->ctl_next;
		client_free(s, c);
	}
	if (s->listen_fd >= 0 && !s->socket_activated)
		close(s->listen_fd);
	if (s->unlink_socket)
		unlink(s->cfg->socket.path);
	moed_loop_free(s->loop);
	if (s->sigfd >= 0)
		close(s->sigfd);
	if (s->timerfd >= 0)
		close(s->timerfd);
	if (s->spare_fd >= 0)
		close(s->spare_fd);
	if (s->stats_efd >= 0)
		close(s->stats_efd);
	moe_engine_close(s->engine);
	moed_config_free(s->cfg);
	free(s->config_path);
	for (size_t i = 0; i < s->nov; i++) {
		free((char *)s->ov[i].name);
		free((char *)s->ov[i].value);
	}
	free(s->ov);
	free(s->stats_json);
	free(s->reqs);
	free(s->x);
	free(s->y);
	free(s->ids);
	free(s->w);
	pthread_mutex_destroy(&s->lock);
	pthread_mutex_destroy(&s->cfg_lock);
	free(s);
}
