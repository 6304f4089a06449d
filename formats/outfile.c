/* SPDX-License-Identifier: MIT */
/*
 * Output files that appear whole or not at all (formats/outfile.h).
 *
 * The signal handler may run at any point of a writer's life, in any
 * thread, so what it reads is a fixed table of slots: a directory fd and a
 * name, published by an atomic flag.  The writer changes a slot and the
 * name it stands for (create, link, rename) with those signals blocked, so
 * the handler never removes a name that is not ours or misses one that is.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "formats/outfile.h"

#define N_SLOTS 16

static struct {
	atomic_int used;
	int dirfd;
	char name[NAME_MAX + 1];
} slots[N_SLOTS];

static const int caught[] = { SIGINT, SIGTERM, SIGHUP };

static void block_signals(sigset_t *old)
{
	sigset_t set;

	sigemptyset(&set);
	for (size_t i = 0; i < sizeof(caught) / sizeof(caught[0]); i++)
		sigaddset(&set, caught[i]);
	pthread_sigmask(SIG_BLOCK, &set, old);
}

static void restore_signals(const sigset_t *old)
{
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

/* With the signals blocked.  A full table leaves the file without cleanup
 * on a signal, nothing worse. */
static void slot_set(struct moe_outfile *o)
{
	if (o->slot < 0) {
		for (int i = 0; i < N_SLOTS; i++) {
			int expected = 0;

			/* 2: taken, not yet published */
			if (atomic_compare_exchange_strong(&slots[i].used, &expected, 2)) {
				o->slot = i;
				break;
			}
		}
		if (o->slot < 0)
			return;
	} else {
		atomic_store(&slots[o->slot].used, 2);
	}
	slots[o->slot].dirfd = o->dirfd;
	memcpy(slots[o->slot].name, o->tmp, sizeof(o->tmp));
	atomic_store(&slots[o->slot].used, 1);
}

static void slot_clear(struct moe_outfile *o)
{
	if (o->slot >= 0)
		atomic_store(&slots[o->slot].used, 0);
	o->slot = -1;
}

static void on_signal(int sig)
{
	int saved = errno;

	for (int i = 0; i < N_SLOTS; i++)
		if (atomic_load(&slots[i].used) == 1)
			unlinkat(slots[i].dirfd, slots[i].name, 0);
	errno = saved;
	/* die of it, as without us: blocked until we return */
	signal(sig, SIG_DFL);
	raise(sig);
}

void moe_outfile_catch_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(caught) / sizeof(caught[0]); i++)
		sigaddset(&sa.sa_mask, caught[i]);
	for (size_t i = 0; i < sizeof(caught) / sizeof(caught[0]); i++) {
		struct sigaction old;

		/* a signal the caller ignores (nohup) stays ignored */
		if (sigaction(caught[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
			continue;
		sigaction(caught[i], &sa, NULL);
	}
}

/* ".BASE.XXXXXXXX" with 8 random characters; BASE cut to fit NAME_MAX. */
static void tmp_name(struct moe_outfile *o)
{
	static const char chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
	unsigned char rnd[8];
	char suffix[9];
	int keep = NAME_MAX - 10;

	if (getrandom(rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
		/* no entropy yet: O_EXCL still guarantees the name is ours */
		struct timespec ts;
		uint64_t x;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		x = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid() << 32 ^
		    (uint64_t)(uintptr_t)o;
		for (size_t i = 0; i < sizeof(rnd); i++, x >>= 8)
			rnd[i] = (unsigned char)x;
	}
	for (size_t i = 0; i < sizeof(rnd); i++)
		suffix[i] = chars[rnd[i] % (sizeof(chars) - 1)];
	suffix[8] = '\0';
	snprintf(o->tmp, sizeof(o->tmp), ".%.*s.%s", keep, o->base, suffix);
}

/* Whether linkat() through /proc/self/fd can give an O_TMPFILE a name. */
static bool proc_fd_usable(void)
{
	return access("/proc/self/fd", X_OK) == 0;
}

int moe_outfile_open(struct moe_outfile *o, const char *path, struct moe_err *err)
{
	const char *slash;
	char *dir;
	sigset_t old;
	int r;

	memset(o, 0, sizeof(*o));
	o->fd = -1;
	o->dirfd = -1;
	o->slot = -1;
	o->path = strdup(path);
	if (!o->path)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	slash = strrchr(o->path, '/');
	o->base = slash ? slash + 1 : o->path;
	if (!o->base[0] || !strcmp(o->base, ".") || !strcmp(o->base, "..")) {
		r = moe_err_set(err, -EISDIR, "%s: names a directory; give a file name", path);
		goto fail;
	}
	if (!slash)
		dir = strdup(".");
	else if (slash == o->path)
		dir = strdup("/");
	else
		dir = strndup(o->path, (size_t)(slash - o->path));
	if (!dir) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", path);
		goto fail;
	}
	o->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (o->dirfd < 0) {
		r = moe_err_set(err, -errno, "%s: cannot open its directory %s: %s", path, dir,
				strerror(errno));
		free(dir);
		goto fail;
	}

	/* MOE_OUTFILE_NAMED=1 takes the path of filesystems without O_TMPFILE
	 * on one that has it: for the tests of that path. */
	if (!getenv("MOE_OUTFILE_NAMED") && proc_fd_usable()) {
		o->fd = openat(o->dirfd, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
		if (o->fd >= 0) {
			o->anonymous = true;
			free(dir);
			return 0;
		}
		if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
			r = moe_err_set(err, -errno, "%s: cannot create a file in %s: %s", path, dir,
					strerror(errno));
			free(dir);
			goto fail;
		}
	}
	for (int tries = 0; o->fd < 0; tries++) {
		tmp_name(o);
		block_signals(&old);
		o->fd = openat(o->dirfd, o->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		r = -errno;
		if (o->fd >= 0)
			slot_set(o);
		restore_signals(&old);
		if (o->fd < 0 && (r != -EEXIST || tries == 100)) {
			moe_err_set(err, r, "%s: cannot create %s in %s: %s", path, o->tmp, dir,
				    strerror(-r));
			free(dir);
			goto fail;
		}
	}
	free(dir);
	return 0;
fail:
	o->tmp[0] = '\0';
	moe_outfile_abort(o);
	return r;
}

void moe_outfile_abort(struct moe_outfile *o)
{
	sigset_t old;

	if (o->fd >= 0)
		close(o->fd);
	o->fd = -1;
	block_signals(&old);
	if (o->tmp[0] && o->dirfd >= 0)
		unlinkat(o->dirfd, o->tmp, 0);
	o->tmp[0] = '\0';
	slot_clear(o);
	restore_signals(&old);
	if (o->dirfd >= 0)
		close(o->dirfd);
	o->dirfd = -1;
	free(o->path);
	o->path = NULL;
}

/* Give an O_TMPFILE a temporary name, so that rename can replace @path. */
static int link_anonymous(struct moe_outfile *o, struct moe_err *err)
{
	char proc[64];
	sigset_t old;
	int r = 0;

	snprintf(proc, sizeof(proc), "/proc/self/fd/%d", o->fd);
	for (int tries = 0; ; tries++) {
		tmp_name(o);
		block_signals(&old);
		r = linkat(AT_FDCWD, proc, o->dirfd, o->tmp, AT_SYMLINK_FOLLOW) < 0 ? -errno : 0;
		if (r == -ENOENT)   /* /proc went away since open: needs CAP_DAC_READ_SEARCH */
			r = linkat(o->fd, "", o->dirfd, o->tmp, AT_EMPTY_PATH) < 0 ? -errno : 0;
		if (r == 0)
			slot_set(o);
		restore_signals(&old);
		if (r == 0)
			return 0;
		o->tmp[0] = '\0';
		if (r != -EEXIST || tries == 100)
			return moe_err_set(err, r, "%s: cannot give the finished file a name in its "
					   "directory: %s", o->path, strerror(-r));
	}
}

int moe_outfile_commit(struct moe_outfile *o, bool durable, struct moe_err *err)
{
	sigset_t old;
	int r = 0;

	if (o->fd < 0)
		return moe_err_set(err, -EBADF, "%s: the file was already ended", o->path ? o->path : "?");
	if (durable && fsync(o->fd) < 0)
		r = moe_err_set(err, -errno, "%s: cannot write it out (fsync): %s", o->path,
				strerror(errno));
	if (r == 0 && o->anonymous)
		r = link_anonymous(o, err);
	if (close(o->fd) < 0 && r == 0)
		r = moe_err_set(err, -errno, "%s: write failed: %s", o->path, strerror(errno));
	o->fd = -1;
	if (r == 0) {
		block_signals(&old);
		if (renameat(o->dirfd, o->tmp, o->dirfd, o->base) < 0) {
			r = moe_err_set(err, -errno, "%s: cannot rename %s into place: %s", o->path,
					o->tmp, strerror(errno));
		} else {
			o->tmp[0] = '\0';
			slot_clear(o);
		}
		restore_signals(&old);
	}
	/* the rename is durable once the directory is */
	if (r == 0 && durable && fsync(o->dirfd) < 0 && errno != EINVAL)
		r = moe_err_set(err, -errno, "%s: cannot write its directory out (fsync): %s",
				o->path, strerror(errno));
	moe_outfile_abort(o);   /* removes the temporary if it is still there */
	return r;
}
