/* SPDX-License-Identifier: MIT */
/*
 * Sessions, on the control thread: accept a connection and check the
 * peer's credentials (access.uids, access.gids) and its uid's share (the
 * connections waiting for HELLO, the sessions: limits.*_per_uid), read
 * its control messages, answer HELLO with a sealed memfd segment and hand
 * the session to the data thread, pass STATS and the CUDA messages on (stats.c,
 * cudaipc.c), queue and send the answers without blocking, and end the
 * session when its socket closes or it breaks the protocol.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "engine/clock.h"
#include "engine/engine.h"
#include "libmoeclient/moeclient.h"
#include "proto/proto.h"
#include "proto/segment.h"
#include "log.h"
#include "server_impl.h"

#define SQ_ENTRIES_DEFAULT 64u      /* requests a client may have queued */
#define SQ_ENTRIES_MAX 4096u        /* the most a HELLO may ask for */

void session_free(struct moed_server *s, struct client *c)
{
	if (!c)
		return;
	cudaipc_unmap_all(s, c);
	pthread_mutex_destroy(&c->rlock);
	if (c->seg.base)
		munmap(c->seg.base, c->seg.bytes);
	if (c->fd >= 0)
		close(c->fd);
	free(c->out);
	if (c->welcomed) {
		atomic_fetch_sub(&s->live_clients, 1);
		/* a session's coming and going is routine (debug); one whose
		 * requests failed still says so at info level */
		moed_log_event(MOED_EVENT_SESSION, c->errors ? MOED_LOG_INFO : MOED_LOG_DEBUG,
			       "client %u (pid %d, uid %u): session ended after "
			       "%" PRIu64 " requests, %" PRIu64 " tokens, %" PRIu64 " errors", c->id, (int)c->pid,
			       (unsigned)c->uid, c->requests, c->tokens, c->errors);
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

/* WELCOME's weight_dtype is the store's enum moe_dtype, which <moeclient.h>
 * documents by number; the activation dtypes of a request (enum moe_dtype_act)
 * are the same numbers for the same types. */
_Static_assert(MOE_DTYPE_F32 == 0 && MOE_DTYPE_BF16 == 1 && MOE_DTYPE_F16 == 2 &&
	       MOE_DTYPE_FP8_E4M3_B128 == 3 && MOE_DTYPE_MXFP4 == 4 && MOE_DTYPE_INT4 == 5,
	       "moe_model_info.weight_dtype is documented as 0 float32, 1 bfloat16, 2 float16, 3 fp8, "
	       "4 mxfp4, 5 int4");
_Static_assert((int)MOE_F32 == (int)MOE_DTYPE_F32 && (int)MOE_BF16 == (int)MOE_DTYPE_BF16,
	       "an activation dtype and the weight dtype of the same type share a number");

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
	w->features = MOE_FEAT_CUDA_MAP | MOE_FEAT_FINGERPRINT |
		      (moe_engine_has_device_memory(s->engine) ? MOE_FEAT_DEVICE_MEMORY : 0);
	/* all zero when the store records none; the feature bit tells a client
	 * that this daemon knows the field (an older one leaves it zero too) */
	memcpy(w->fingerprint, st->hdr.source_fingerprint, sizeof(w->fingerprint));
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

/* Wait for @c's socket to be writable too (@out), or not. */
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
int session_reply(struct moed_server *s, struct client *c, uint32_t type, const void *payload, size_t len)
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

static void greeting_remove(struct moed_server *s, struct client *c)
{
	for (struct client **pp = &s->greeting; *pp; pp = &(*pp)->ctl_next)
		if (*pp == c) {
			*pp = c->ctl_next;
			s->ngreeting--;
			return;
		}
}

/* Welcomed sessions of @uid (the per-uid quota; at most limits.max_clients). */
static uint32_t sessions_of(struct moed_server *s, uid_t uid)
{
	uint32_t n = 0;

	for (struct client *c = s->sessions; c; c = c->ctl_next)
		n += c->uid == uid;
	return n;
}

static void sessions_remove(struct moed_server *s, struct client *c)
{
	for (struct client **pp = &s->sessions; *pp; pp = &(*pp)->ctl_next)
		if (*pp == c) {
			*pp = c->ctl_next;
			return;
		}
}

/* Connections of @uid waiting for their HELLO, and the oldest of them in
 * *@oldest (the list has the newest first). */
static uint32_t greeting_of(struct moed_server *s, uid_t uid, struct client **oldest)
{
	uint32_t n = 0;

	*oldest = NULL;
	for (struct client *c = s->greeting; c; c = c->ctl_next)
		if (c->uid == uid) {
			n++;
			*oldest = c;
		}
	return n;
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
		moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): protocol version %u "
			       "refused", (int)c->pid, (unsigned)c->uid, h->version);
		free(w);
		return -MOE_E_PROTO;
	}
	pthread_mutex_lock(&s->cfg_lock);
	bool full = s->nclients >= s->cfg->limits.max_clients;
	pthread_mutex_unlock(&s->cfg_lock);
	if (full) {
		refuse(c->fd, -EUSERS, "moed serves its maximum of %u clients (limits.max_clients)",
		       s->cfg->limits.max_clients);
		moed_log_event(MOED_EVENT_LIMIT, MOED_LOG_WARNING, "client pid %d (uid %u) refused: "
			       "limits.max_clients (%u) reached", (int)c->pid, (unsigned)c->uid,
			       s->cfg->limits.max_clients);
		free(w);
		return -EUSERS;
	}
	/* one user may not hold every session (the control thread alone
	 * writes the live limits: no cfg_lock to read them here) */
	uint32_t per_uid = moed_config_clients_per_uid(s->cfg);
	if (sessions_of(s, c->uid) >= per_uid) {
		refuse(c->fd, -EUSERS, "uid %u holds its maximum of %u sessions (limits.max_clients_per_uid in %s): "
		       "end one of them, or raise the limit", (unsigned)c->uid, per_uid,
		       s->config_path ? s->config_path : "moed.conf");
		moed_log_event(MOED_EVENT_LIMIT, MOED_LOG_WARNING, "client pid %d (uid %u) refused: "
			       "limits.max_clients_per_uid (%u) reached", (int)c->pid, (unsigned)c->uid, per_uid);
		free(w);
		return -EUSERS;
	}
	fd = segment_make(s, c, h, why, sizeof(why));
	if (fd < 0) {
		refuse(c->fd, fd, "%s", why);
		moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): no segment: %s",
			       (int)c->pid, (unsigned)c->uid, why);
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
	c->ctl_next = s->sessions;
	s->sessions = c;
	s->nclients++;
	atomic_fetch_add(&s->live_clients, 1);
	moed_log_event(MOED_EVENT_SESSION, MOED_LOG_DEBUG, "client %u (pid %d, uid %u): connected, %" PRIu64
		       " MiB segment", c->id, (int)c->pid, (unsigned)c->uid, (uint64_t)(c->seg.bytes >> 20));
	pthread_mutex_lock(&s->lock);
	c->next = s->incoming;
	s->incoming = c;
	pthread_mutex_unlock(&s->lock);
	dataplane_wake(s);
	return 0;
}

static void client_event(struct moed_loop *l, int fd, void *data, unsigned mask);

/* The listening socket is readable: take one connection. */
void session_accept(struct moed_loop *l, int lfd, void *data, unsigned mask)
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
			moed_log_event(MOED_EVENT_LIMIT, MOED_LOG_WARNING,
				       "out of file descriptors: a connection was dropped");
		} else if (errno != EAGAIN && errno != EINTR) {
			log_warning("accept: %s", strerror(errno));
		}
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
		moed_log_event(MOED_EVENT_REFUSED, MOED_LOG_WARNING, "client pid %d (uid %u, gid %u) refused: not in "
			       "access.uids or access.gids", (int)cred.pid, (unsigned)cred.uid, (unsigned)cred.gid);
		close(fd);
		return;
	}
	/* connections that have not said HELLO: the expired ones go first;
	 * then a uid over its own limit loses its oldest (not the new one,
	 * which is likelier to be a client about to say HELLO, and never
	 * another uid's), so that one user's idle connections cannot lock
	 * the others out; a cap on them all stays as the last resort */
	session_expire_greetings(s);
	{
		struct client *oldest;
		uint32_t pending = greeting_of(s, cred.uid, &oldest);

		if (pending >= s->cfg->limits.max_pending_per_uid && oldest) {
			moed_log_event(MOED_EVENT_LIMIT, MOED_LOG_WARNING, "uid %u has %u connections waiting to say "
				       "HELLO (limits.max_pending_per_uid): dropping its oldest (pid %d)",
				       (unsigned)cred.uid, pending, (int)oldest->pid);
			session_end(s, oldest);
		} else if (s->ngreeting >= 2 * s->cfg->limits.max_clients + 16) {
			close(fd);
			moed_log_event(MOED_EVENT_LIMIT, MOED_LOG_WARNING, "too many connections waiting to say HELLO "
				       "(%u): one of uid %u was dropped", s->ngreeting, (unsigned)cred.uid);
			return;
		}
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
	c->accepted_ns = moe_now_ns();
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
void session_end(struct moed_server *s, struct client *c)
{
	stats_forget(s, c);
	moed_loop_del(s->loop, c->fd);
	if (!c->welcomed) {
		/* a segment made for a WELCOME that could not be sent goes too */
		greeting_remove(s, c);
		session_free(s, c);
		return;
	}
	sessions_remove(s, c);
	s->nclients--;
	atomic_store(&c->dead, true);
	dataplane_wake(s);
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
				moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): not "
					       "the moed protocol: dropping it", (int)c->pid, (unsigned)c->uid);
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
				moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): "
					       "unexpected HELLO: dropping it", (int)c->pid, (unsigned)c->uid);
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
				moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): "
					       "unexpected %s message: dropping it", (int)c->pid, (unsigned)c->uid,
					       is_map ? "CUDA_MAP" : "CUDA_UNMAP");
				session_end(s, c);
				return;
			}
			if (is_map) {
				memcpy(&map, c->in + sizeof(*h), sizeof(map));
				r = cudaipc_map(s, c, &map);
			} else {
				memcpy(&unmap, c->in + sizeof(*h), sizeof(unmap));
				r = cudaipc_unmap(s, c, &unmap);
			}
			if (r < 0) {
				session_end(s, c);
				return;
			}
			break;
		}
		default:
			moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "client pid %d (uid %u): unknown "
				       "message type %u: dropping it", (int)c->pid, (unsigned)c->uid, h->type);
			session_end(s, c);
			return;
		}
	}
}

void session_expire_greetings(struct moed_server *s)
{
	uint64_t now = moe_now_ns(), limit = (uint64_t)s->cfg->limits.hello_timeout_ms * 1000000u;

	for (struct client *c = s->greeting, *next; c; c = next) {
		next = c->ctl_next;
		if (now - c->accepted_ns > limit) {
			moed_log_event(MOED_EVENT_NO_HELLO, MOED_LOG_WARNING, "client pid %d (uid %u): no HELLO in "
				       "%u ms (limits.hello_timeout_ms): dropping it", (int)c->pid, (unsigned)c->uid,
				       s->cfg->limits.hello_timeout_ms);
			session_end(s, c);
		}
	}
}
