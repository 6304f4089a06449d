/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: errors, the version, and sessions (connect, HELLO, info,
 * disconnect).  See libmoeclient(3).
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proto/futex.h"
#include "client_impl.h"

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


uint64_t client_mono_ns(void)
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
int client_recv_full(int fd, void *buf, size_t len, int *fd_out)
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

int client_ctl_send(struct moe_client *c, uint32_t type, const void *payload, uint32_t len)
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

/*
 * The socket when none was named: MOE_DEFAULT_SOCKET, unless it is absent
 * and $XDG_RUNTIME_DIR/moed.sock exists, which is where a moed started by
 * hand by this user (not root, no systemd) puts it (moed(8), SOCKET).
 */
static const char *default_socket(char *buf, size_t len)
{
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	struct stat st;
	int n;

	if (lstat(MOE_DEFAULT_SOCKET, &st) == 0 || errno != ENOENT || !xdg || xdg[0] != '/')
		return MOE_DEFAULT_SOCKET;
	n = snprintf(buf, len, "%s/moed.sock", xdg);
	if (n < 0 || (size_t)n >= len || lstat(buf, &st) < 0)
		return MOE_DEFAULT_SOCKET;
	return buf;
}

MOE_EXPORT int moe_client_connect(const char *socket_path, const struct moe_client_options *opt,
				  struct moe_client **ret)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct moe_msg_hello hello = { .version = MOE_PROTO_VERSION };
	struct moe_msg_header h;
	struct moe_client *c;
	char xdg_path[sizeof(a.sun_path)];
	size_t seg_bytes;
	void *seg;
	int segfd = -1, r;

	if (!ret)
		return client_error(-EINVAL, "moe_client_connect: no place for the handle (ret is NULL)");
	if (!socket_path)
		socket_path = getenv("MOED_SOCKET");
	if (!socket_path || !*socket_path)
		socket_path = default_socket(xdg_path, sizeof(xdg_path));
	if (strlen(socket_path) >= sizeof(a.sun_path))
		return client_error_connect(socket_path, -ENAMETOOLONG, NULL);
	strcpy(a.sun_path, socket_path);
	if (opt) {
		hello.arena_bytes = opt->arena_bytes;
		hello.sq_entries = opt->sq_entries;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return client_error(-ENOMEM, "moe_client_connect: out of memory");
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
	r = client_ctl_send(c, MOE_MSG_HELLO, &hello, sizeof(hello));
	/* the memfd rides with the message's first bytes; a refusal (moed sends
	 * it and closes without reading our HELLO) is read even when the HELLO
	 * could not be sent */
	{
		int rr = client_recv_full(c->fd, &h, sizeof(h), &segfd);

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

		r = client_recv_full(c->fd, c->w, sizeof(*c->w), &segfd);
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
	client_error_clear();
	return 0;
fail:
	if (segfd >= 0)
		close(segfd);
	if (c->w && c->w->status < 0) {
		/* moed's own reason, as its log has it */
		c->w->message[sizeof(c->w->message) - 1] = '\0';
		client_error_connect(socket_path, r, c->w->message);
	} else {
		client_error_connect(socket_path, r, NULL);
	}
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
