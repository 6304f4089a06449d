/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemonutil.h"
#include "proto/futex.h"
#include "proto/segment.h"

#define HELLO_TIMEOUT_MS 5000    /* each half of the HELLO/WELCOME exchange */
#define START_POLL_MS 10         /* between tries of moed's socket */
#define REAP_POLL_MS 1           /* between looks at an exiting moed */
#define CQ_POLL_US 50            /* between looks at an empty completion ring */

uint64_t moe_test_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void moe_test_sleep_ms(unsigned ms)
{
	struct timespec d = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };

	while (nanosleep(&d, &d) < 0 && errno == EINTR)
		;
}

/* ------------------------------------------------------------------ moed */

const char *moe_test_moed_path(void)
{
	const char *p = getenv("MOED");

	return p && *p ? p : "../daemon/moed";
}

int moe_test_moed_config(struct moe_test_moed *d, const char *dir, const char *sock_name, const char *store,
			 const char *sock_extra, const char *extra)
{
	FILE *f;

	memset(d, 0, sizeof(*d));
	if ((size_t)snprintf(d->dir, sizeof(d->dir), "%s", dir) >= sizeof(d->dir) ||
	    (size_t)snprintf(d->sock, sizeof(d->sock), "%s/%s", dir, sock_name) >= sizeof(d->sock))
		return -ENAMETOOLONG;
	snprintf(d->conf, sizeof(d->conf), "%s/moed.conf", dir);
	snprintf(d->log, sizeof(d->log), "%s/moed.log", dir);
	f = fopen(d->conf, "w");
	if (!f)
		return -errno;
	fprintf(f, "model = \"%s\";\nbackend = \"cpu\";\nsocket = { path = \"%s\"; group = \"\"; %s };\n%s\n", store,
		d->sock, sock_extra ? sock_extra : "", extra ? extra : "");
	if (fclose(f) != 0)
		return -errno;
	return 0;
}

/* Does something accept connections on @path? */
static bool socket_accepts(const char *path)
{
	int fd = moe_test_dial(path);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

int moe_test_moed_start(struct moe_test_moed *d, int timeout_ms, int *ret_status)
{
	pid_t parent = getpid();
	uint64_t end;
	int st;

	fflush(NULL);
	d->pid = fork();
	if (d->pid < 0) {
		d->pid = 0;
		return -errno;
	}
	if (d->pid == 0) {
		int fd = open(d->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		int null = open("/dev/null", O_RDONLY | O_CLOEXEC);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent || fd < 0 || null < 0)
			_exit(126);
		dup2(null, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		execl(moe_test_moed_path(), "moed", "--config", d->conf, (char *)NULL);
		dprintf(2, "exec %s: %s\n", moe_test_moed_path(), strerror(errno));
		_exit(127);
	}
	end = moe_test_now_ms() + (uint64_t)timeout_ms;
	while (!socket_accepts(d->sock)) {
		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			d->pid = 0;
			if (ret_status)
				*ret_status = st;
			return -ECHILD;
		}
		if (moe_test_now_ms() > end)
			return -ETIMEDOUT;
		moe_test_sleep_ms(START_POLL_MS);
	}
	return 0;
}

int moe_test_moed_reap(struct moe_test_moed *d, int timeout_ms, int *ret_status)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;
	int st = 0;

	while (waitpid(d->pid, &st, WNOHANG) == 0) {
		if (moe_test_now_ms() > end) {
			moe_test_moed_kill(d);
			return -ETIMEDOUT;
		}
		moe_test_sleep_ms(REAP_POLL_MS);
	}
	d->pid = 0;
	if (ret_status)
		*ret_status = st;
	return 0;
}

int moe_test_moed_stop(struct moe_test_moed *d, int timeout_ms, int *ret_status)
{
	kill(d->pid, SIGTERM);
	return moe_test_moed_reap(d, timeout_ms, ret_status);
}

void moe_test_moed_kill(struct moe_test_moed *d)
{
	if (d->pid > 0) {
		kill(d->pid, SIGKILL);
		waitpid(d->pid, NULL, 0);
	}
	d->pid = 0;
}

bool moe_test_moed_alive(const struct moe_test_moed *d)
{
	int st;

	return d->pid > 0 && waitpid(d->pid, &st, WNOHANG) == 0;
}

/* The log's last @tail bytes (0: all), malloc'ed and NUL-terminated; NULL
 * if it cannot be read. */
static char *log_read(const struct moe_test_moed *d, size_t tail)
{
	int fd = open(d->log, O_RDONLY | O_CLOEXEC);
	off_t end, from;
	char *text;
	size_t used = 0;
	ssize_t n;

	if (fd < 0)
		return NULL;
	end = lseek(fd, 0, SEEK_END);
	from = tail && end > (off_t)tail ? end - (off_t)tail : 0;
	text = end >= 0 ? malloc((size_t)(end - from) + 1) : NULL;
	if (!text || lseek(fd, from, SEEK_SET) < 0) {
		free(text);
		close(fd);
		return NULL;
	}
	while (used < (size_t)(end - from) && (n = read(fd, text + used, (size_t)(end - from) - used)) > 0)
		used += (size_t)n;
	text[used] = '\0';
	close(fd);
	return text;
}

void moe_test_moed_dump_log(const struct moe_test_moed *d, size_t tail)
{
	char *text = log_read(d, tail);

	fprintf(stderr, "---- moed log (%s%s) ----\n%s---- end of moed log ----\n", d->log, tail ? ", the end" : "",
		text ? text : "(none)\n");
	free(text);
}

bool moe_test_moed_log_has(const struct moe_test_moed *d, const char *needle)
{
	char *text = log_read(d, 0);
	bool yes = text && strstr(text, needle);

	free(text);
	return yes;
}

int moe_test_count_fds(pid_t pid, char *list, size_t len)
{
	char dir[64], path[128], target[256];
	DIR *d;
	struct dirent *de;
	int n = 0;
	size_t used = 0;

	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
	d = opendir(dir);
	if (!d)
		return -1;
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		n++;
		if (list && used < len) {
			ssize_t t;

			snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
			t = readlink(path, target, sizeof(target) - 1);
			target[t > 0 ? t : 0] = '\0';
			used += (size_t)snprintf(list + used, len - used, " %s->%s", de->d_name, target);
		}
	}
	closedir(d);
	return n;
}

int moe_test_count_segments(pid_t pid)
{
	char path[64], line[512];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		n += strstr(line, "memfd:moed-client") != NULL;
	fclose(f);
	return n;
}

/* ------------------------------------------------------------------ raw sessions */

int moe_test_dial(const char *sock)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(sock) >= sizeof(a.sun_path))
		return -ENAMETOOLONG;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	strcpy(a.sun_path, sock);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

int moe_test_send_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int moe_test_recv_all(int fd, void *buf, size_t len, int *pass_fd, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;
	uint8_t *p = buf;

	while (len) {
		union {
			char b[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} u;
		struct iovec iov = { p, len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
		struct pollfd pf = { fd, POLLIN, 0 };
		int64_t left = (int64_t)(end - moe_test_now_ms());
		ssize_t n;

		if (left <= 0 || poll(&pf, 1, (int)left) == 0)
			return -ETIMEDOUT;
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				int got;

				memcpy(&got, CMSG_DATA(cm), sizeof(got));
				if (pass_fd && *pass_fd < 0)
					*pass_fd = got;
				else
					close(got);
			}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

bool moe_test_wait_hangup(int fd, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;

	for (;;) {
		char buf[4096];
		int pass = -1, r;
		int64_t left = (int64_t)(end - moe_test_now_ms());

		if (left <= 0)
			return false;
		/* a byte at a time would do; recv_all() with a short length
		 * also takes the descriptors off the socket */
		r = moe_test_recv_all(fd, buf, 1, &pass, (int)left);
		if (pass >= 0)
			close(pass);
		if (r == -ETIMEDOUT)
			return false;
		if (r < 0)
			return true;
		(void)recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
	}
}

int moe_test_hello_exchange(int fd, const struct moe_msg_hello *h, struct moe_msg_welcome *w, int *segfd)
{
	struct {
		struct moe_msg_header h;
		struct moe_msg_hello b;
	} msg = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 }, *h };
	struct moe_msg_header rh;
	int r = moe_test_send_all(fd, &msg, sizeof(msg));

	if (r == 0)
		r = moe_test_recv_all(fd, &rh, sizeof(rh), segfd, HELLO_TIMEOUT_MS);
	if (r < 0)
		return r;
	if (rh.magic != MOE_MSG_MAGIC || rh.type != MOE_MSG_WELCOME || rh.len != sizeof(*w))
		return -EPROTO;
	return moe_test_recv_all(fd, w, sizeof(*w), segfd, HELLO_TIMEOUT_MS);
}

int moe_test_raw_open(struct moe_test_raw *r, const char *sock, const struct moe_msg_hello *h)
{
	struct moe_msg_hello def = { .version = MOE_PROTO_VERSION };
	struct moe_seg_view v = { 0 };
	int segfd = -1, rc;

	memset(r, 0, sizeof(*r));
	r->fd = moe_test_dial(sock);
	if (r->fd < 0)
		return r->fd;
	rc = moe_test_hello_exchange(r->fd, h ? h : &def, &r->w, &segfd);
	if (rc == 0 && r->w.status < 0)
		rc = r->w.status;
	if (rc == 0 && segfd < 0)
		rc = -EPROTO;
	if (rc == 0) {
		r->seg_bytes = (size_t)r->w.segment_bytes;
		r->seg = mmap(NULL, r->seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, segfd, 0);
		if (r->seg == MAP_FAILED) {
			r->seg = NULL;
			rc = -ENOMEM;
		}
	}
	if (segfd >= 0)
		close(segfd);
	if (rc == 0 && (rc = moe_seg_view_init(r->seg, r->seg_bytes, &v)) < 0) {
		munmap(r->seg, r->seg_bytes);
		r->seg = NULL;
	}
	if (rc < 0) {
		close(r->fd);
		r->fd = -1;
		return rc;
	}
	r->hdr = v.hdr;
	r->sq_entries = v.sq_entries;
	r->cq_entries = v.cq_entries;
	r->sq = v.sq;
	r->cq = v.cq;
	r->arena = v.arena;
	r->arena_bytes = v.arena_bytes;
	return 0;
}

void moe_test_raw_close(struct moe_test_raw *r)
{
	if (r->seg)
		munmap(r->seg, r->seg_bytes);
	if (r->fd >= 0)
		close(r->fd);
	memset(r, 0, sizeof(*r));
	r->fd = -1;
}

void moe_test_raw_kick(struct moe_test_raw *r)
{
	/* the tail store before the look at daemon_wait (proto.h, wakeups) */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	moe_futex_kick(&r->hdr->daemon_futex, &r->hdr->daemon_wait, 1);
}

void moe_test_raw_push(struct moe_test_raw *r, const struct moe_sqe *q, uint32_t n)
{
	uint32_t tail = r->hdr->sq_tail;

	for (uint32_t i = 0; i < n; i++)
		r->sq[(tail + i) & (r->sq_entries - 1)] = q[i];
	__atomic_store_n(&r->hdr->sq_tail, tail + n, __ATOMIC_RELEASE);
	moe_test_raw_kick(r);
}

uint32_t moe_test_raw_reap(struct moe_test_raw *r, struct moe_cqe *out, uint32_t n, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;
	uint32_t got = 0;

	while (got < n) {
		uint32_t head = r->hdr->cq_head, tail = __atomic_load_n(&r->hdr->cq_tail, __ATOMIC_ACQUIRE);

		while (head != tail && got < n)
			out[got++] = r->cq[head++ & (r->cq_entries - 1)];
		__atomic_store_n(&r->hdr->cq_head, head, __ATOMIC_RELEASE);
		/* room in the completion ring: wake moed if it waits for that (proto.h) */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (__atomic_load_n(&r->hdr->daemon_wait, __ATOMIC_RELAXED) & MOE_DAEMON_WAIT_CQ) {
			__atomic_fetch_add(&r->hdr->daemon_futex, 1, __ATOMIC_RELEASE);
			moe_futex_wake(&r->hdr->daemon_futex, 1);
		}
		if (got == n || moe_test_now_ms() > end)
			break;
		usleep(CQ_POLL_US);
	}
	return got;
}
