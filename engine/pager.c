/* SPDX-License-Identifier: MIT */
/*
 * The io_uring pager.  One I/O thread owns the ring and the staging
 * buffers; callers queue loads under a mutex and wake the thread through an
 * eventfd whose read is always armed in the ring, so the thread sleeps in
 * exactly one place (io_uring_submit_and_wait) whatever it waits for.
 *
 * A load is split into chunks.  Chunks are submitted in order, into free
 * staging slots; they complete in any order, and a load's chunks are
 * hashed and handed to its sink in order, so a completed chunk keeps its
 * slot until the chunks before it are in.  Every slot is therefore either
 * in flight or waiting for an earlier chunk of the same load that is in
 * flight, and the pipeline cannot stall.
 *
 * The hashing and the sink (the bytes' only touch by the CPU) run on a
 * second thread, the verify thread, so that the I/O thread does nothing
 * but keep the ring full: a chunk's slot goes back to the I/O thread as
 * soon as it is verified.  Job and slot state is under the pager's lock;
 * the verify thread works on one claimed chunk outside it.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "clock.h"
#include "pager.h"

#define TAG_WAKE UINT64_MAX     /* user_data of the eventfd read */
#define HUGE_2M (2u << 20)

struct pjob {
	struct moe_pager_load *ld;
	uint64_t off;               /* file offset of the blob */
	uint64_t bytes;             /* unpadded size (hashed, given to the sink) */
	uint64_t span;              /* bytes read: bytes rounded up to the alignment */
	uint64_t sum;               /* expected XXH3-64 */
	uint32_t nchunks, next_submit, next_process, inflight;
	int32_t *slot_of;           /* [nchunks] staging slot of a done chunk, or -1 */
	XXH3_state_t *st;
	enum moe_pager_fault fault;
	int err;                    /* 0, or the error the load ends with */
	bool demand;                /* not (or no longer) a prefetch */
	bool started;               /* left the queue */
	bool processing;            /* the verify thread holds chunk next_process */
	struct pjob *next;
};

struct slot {
	struct pjob *job;           /* NULL: free */
	uint32_t chunk;
	uint32_t len;               /* bytes of this chunk */
	uint32_t got;               /* bytes read so far (short reads resume) */
	bool done;
};

struct moe_pager {
	const struct moe_store *store;
	struct moe_pager_options opt;
	int fd;
	bool direct;
	uint64_t align;             /* offset and length alignment of reads */
	uint64_t chunk;             /* bytes per chunk */
	uint32_t depth;             /* reads in flight at most */
	uint32_t nstage;            /* staging slots: 2 x depth, so that chunks
				     * waiting for the verify thread do not stop reads */
	uint64_t prefetch_cap;

	struct io_uring ring;
	bool ring_ok;
	bool fixed;                 /* staging registered as fixed buffers */
	uint8_t *staging;
	size_t staging_len;
	bool staging_huge;
	struct slot *slots;
	uint64_t inflight_bytes, prefetch_inflight;
	uint32_t inflight;          /* chunks in the ring */
	uint32_t held;              /* slots in use: in the ring, or read and waiting */

	int efd;
	uint64_t efd_buf;

	pthread_t thread, vthread;
	bool thread_ok, vthread_ok;
	pthread_mutex_t lock;
	pthread_cond_t done_cv;
	pthread_cond_t verify_cv;         /* the verify thread sleeps here */
	struct pjob *queue, *queue_tail;  /* not started yet, in submit order */
	struct pjob *active;              /* started, not finished */
	bool stop;
	int broken;                      /* the ring failed for good: -errno, else 0 */

	enum moe_pager_fault fault;
	uint32_t fault_li, fault_expert, fault_count;

	struct moe_store_health health;  /* under the lock */
	uint32_t bad_since_ok;           /* read and checksum failures since the state was ok */

	struct moe_pager_stats st;
	uint64_t busy_since;
};

static void plog(struct moe_pager *p, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void plog(struct moe_pager *p, int level, const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (!p->opt.log)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	p->opt.log(p->opt.log_ctx, level, msg);
}

static const char *blob_name(const struct moe_pager_load *ld, char *buf, size_t len)
{
	if (ld->expert == UINT32_MAX)
		snprintf(buf, len, "shared expert");
	else
		snprintf(buf, len, "expert %" PRIu32, ld->expert);
	return buf;
}

const char *moe_store_state_name(enum moe_store_state st)
{
	switch (st) {
	case MOE_STORE_OK:
		return "ok";
	case MOE_STORE_CHANGED:
		return "changed";
	case MOE_STORE_DAMAGED:
		return "damaged";
	}
	return "unknown";
}

/*
 * Under the lock: is the open file still the one the header describes, at
 * the path?  Fills @why and returns true if not.  A file replaced under
 * the path (a new pack renamed over it) still reads right through the open
 * descriptor, but the path no longer names what moed serves: said too.
 */
static bool store_file_changed(struct moe_pager *p, char *why, size_t len)
{
	const struct moe_store *s = p->store;
	struct stat fs, ps;

	if (fstat(p->fd, &fs) < 0)
		return false;
	if ((uint64_t)fs.st_size != s->hdr.file_size) {
		snprintf(why, len, "the open file is %" PRIu64 " bytes, its header says %" PRIu64
			 " (truncated or rewritten under moed)", (uint64_t)fs.st_size, s->hdr.file_size);
		return true;
	}
	if (stat(s->path, &ps) < 0) {
		snprintf(why, len, "the path no longer exists (%s)", strerror(errno));
		return true;
	}
	if (fs.st_nlink == 0 || ps.st_dev != fs.st_dev || ps.st_ino != fs.st_ino) {
		snprintf(why, len, "the path names another file now (the open one was replaced or removed)");
		return true;
	}
	return false;
}

/* Under the lock: the state leaves ok, said once. */
static void store_state_set(struct moe_pager *p, enum moe_store_state st, const char *why)
{
	const char *path = p->store->path;

	p->health.state = st;
	snprintf(p->health.why, sizeof(p->health.why), "%s", why);
	if (st == MOE_STORE_CHANGED)
		plog(p, 3, "%s: the store changed under moed: %s; experts not in memory cannot be read "
		     "(requests that need them fail) until the file is whole again and the store "
		     "is reopened (moed: SIGHUP)", path, why);
	else
		plog(p, 3, "%s: the store is damaged: %" PRIu64 " failed reads and %" PRIu64 " checksum "
		     "mismatches (%s); requests that need those experts fail; check the disk "
		     "(moectl verify), repack, then reopen the store (moed: SIGHUP)", path,
		     p->health.read_errors, p->health.checksum_errors, why);
}

/* Under the lock: a read of the store failed (@checksum: a mismatch). */
static void store_failure(struct moe_pager *p, bool checksum, const char *msg)
{
	char why[256];

	if (checksum)
		p->health.checksum_errors++;
	else
		p->health.read_errors++;
	p->bad_since_ok++;
	if (p->health.state != MOE_STORE_OK)
		return;
	if (store_file_changed(p, why, sizeof(why)))
		store_state_set(p, MOE_STORE_CHANGED, why);
	else if (p->bad_since_ok >= MOE_PAGER_DAMAGED_AFTER)
		store_state_set(p, MOE_STORE_DAMAGED, msg);
}

/* Why a load failed: FAIL_OTHER (the ring, closing), or the store's fault. */
enum fail_kind { FAIL_OTHER, FAIL_READ, FAIL_CHECKSUM };

static void job_fail(struct moe_pager *p, struct pjob *j, enum fail_kind kind, int code,
		     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void job_fail(struct moe_pager *p, struct pjob *j, enum fail_kind kind, int code,
		     const char *fmt, ...)
{
	char why[192], name[32];
	va_list ap;

	if (j->err)
		return;          /* the first reason is the one reported */
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	j->err = code;
	snprintf(j->ld->msg, sizeof(j->ld->msg), "%s: layer %" PRIu32 " %s: %s", p->store->path,
		 p->store->layers[j->ld->li].layer, blob_name(j->ld, name, sizeof(name)), why);
	if (kind != FAIL_OTHER)
		store_failure(p, kind == FAIL_CHECKSUM, j->ld->msg);
	/* once the store is known bad, one line said so: each failure is a
	 * debug line, not an error per request */
	plog(p, kind != FAIL_OTHER && p->health.state != MOE_STORE_OK ? 7 : 3, "%s", j->ld->msg);
}

/* ---------------------------------------------------------------- both threads */

static void job_free(struct pjob *j)
{
	if (!j)
		return;
	XXH3_freeState(j->st);
	free(j->slot_of);
	free(j);
}

static void slot_release(struct moe_pager *p, struct slot *s)
{
	s->job = NULL;
	s->done = false;
	p->held--;
}

static void wake(struct moe_pager *p);

/* Finish @j, under the lock: hand the status to its waiter. */
static void job_finish(struct moe_pager *p, struct pjob *j)
{
	struct pjob **pp;

	for (pp = &p->active; *pp; pp = &(*pp)->next)
		if (*pp == j) {
			*pp = j->next;
			break;
		}
	p->st.loads++;
	if (!j->demand)
		p->st.prefetch_loads++;
	if (j->err)
		p->st.failed++;
	j->ld->done_ns = moe_now_ns();
	j->ld->priv = NULL;
	__atomic_store_n(&j->ld->status, j->err, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&p->done_cv);
	job_free(j);
}

/* Under the lock: a failed job drops its read chunks, and ends once nothing
 * of it is in flight or being verified. */
static void job_failed_progress(struct moe_pager *p, struct pjob *j)
{
	for (uint32_t c = j->next_process + (j->processing ? 1 : 0); c < j->next_submit; c++)
		if (j->slot_of[c] >= 0) {
			slot_release(p, &p->slots[j->slot_of[c]]);
			j->slot_of[c] = -1;
		}
	if (j->inflight == 0 && !j->processing)
		job_finish(p, j);
}

/* ---------------------------------------------------------------- the verify thread */

static void *verify_thread(void *arg)
{
	struct moe_pager *p = arg;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		struct pjob *j;

		for (j = p->active; j; j = j->next)
			if (!j->err && !j->processing && j->next_process < j->nchunks &&
			    j->slot_of[j->next_process] >= 0)
				break;
		if (!j) {
			if (p->stop)
				break;
			pthread_cond_wait(&p->verify_cv, &p->lock);
			continue;
		}
		uint32_t c = j->next_process, si = (uint32_t)j->slot_of[c];
		struct slot *s = &p->slots[si];
		uint8_t *buf = p->staging + (size_t)si * p->chunk;
		uint64_t off = (uint64_t)c * p->chunk;
		uint64_t len = off < j->bytes ? (j->bytes - off < s->len ? j->bytes - off : s->len) : 0;
		bool corrupt = j->fault == MOE_FAULT_CHECKSUM && c == 0;

		j->processing = true;
		pthread_mutex_unlock(&p->lock);
		if (len) {
			if (corrupt)
				buf[0] ^= 0x5a;   /* a flipped bit on the way, as a bad drive would */
			XXH3_64bits_update(j->st, buf, (size_t)len);
			if (j->ld->sink)
				j->ld->sink(j->ld->sink_ctx, buf, off, len);
		}
		pthread_mutex_lock(&p->lock);
		j->processing = false;
		slot_release(p, s);
		j->slot_of[c] = -1;
		j->next_process++;
		if (j->err) {
			job_failed_progress(p, j);
		} else if (j->next_process == j->nchunks) {
			uint64_t got = XXH3_64bits_digest(j->st);

			if (got != j->sum)
				job_fail(p, j, FAIL_CHECKSUM, -EBADMSG,
					 "checksum mismatch (stored %016" PRIx64 ", read %016" PRIx64 ") in %" PRIu64
					 " bytes at offset %" PRIu64, j->sum, got, j->bytes, j->off);
			job_finish(p, j);
		}
		/* a slot is free: wake the I/O thread if it has reads to start */
		bool more = p->queue != NULL;
		for (struct pjob *a = p->active; a && !more; a = a->next)
			more = !a->err && a->next_submit < a->nchunks;
		if (more) {
			pthread_mutex_unlock(&p->lock);
			wake(p);
			pthread_mutex_lock(&p->lock);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/* ---------------------------------------------------------------- the I/O thread */

static int submit_chunk(struct moe_pager *p, uint32_t si)
{
	struct slot *s = &p->slots[si];
	struct pjob *j = s->job;
	struct io_uring_sqe *sqe = io_uring_get_sqe(&p->ring);
	uint64_t off = j->off + (uint64_t)s->chunk * p->chunk + s->got;
	uint8_t *buf = p->staging + (size_t)si * p->chunk + s->got;
	unsigned len = s->len - s->got;

	if (!sqe)
		return -EBUSY;
	if (p->fixed)
		io_uring_prep_read_fixed(sqe, p->fd, buf, len, off, (int)si);
	else
		io_uring_prep_read(sqe, p->fd, buf, len, off);
	io_uring_sqe_set_data64(sqe, si);
	return 0;
}

/* Under the lock: the next job whose chunk may go now: demand first, then
 * prefetches under the cap. */
static struct pjob *pick_job(struct moe_pager *p)
{
	struct pjob *j, *a;

	for (j = p->active; j; j = j->next)
		if (j->demand && !j->err && j->next_submit < j->nchunks)
			return j;
	for (j = p->queue; j; j = j->next)
		if (j->demand)
			break;
	if (!j) {
		if (p->prefetch_inflight + p->chunk > p->prefetch_cap)
			return NULL;
		for (a = p->active; a; a = a->next)
			if (!a->err && a->next_submit < a->nchunks)
				return a;
		j = p->queue;
	}
	if (j) {     /* start it: queue -> active, at the end (oldest first) */
		struct pjob **pp, *prev = NULL;

		for (pp = &p->queue; *pp != j; pp = &(*pp)->next)
			prev = *pp;
		*pp = j->next;
		if (p->queue_tail == j)
			p->queue_tail = prev;
		j->started = true;
		j->ld->submit_ns = moe_now_ns();
		if (p->fault && p->fault != MOE_FAULT_OPEN && p->fault_count && j->ld->li == p->fault_li &&
		    j->ld->expert == p->fault_expert) {
			j->fault = p->fault;
			p->fault_count--;
		}
		j->next = NULL;
		for (pp = &p->active; *pp; pp = &(*pp)->next)
			;
		*pp = j;
	}
	return j;
}

/* Under the lock: start reads into every free slot. */
static void fill(struct moe_pager *p)
{
	while (p->held < p->nstage && p->inflight < p->depth) {
		struct pjob *j = pick_job(p);
		uint32_t si = 0;
		struct slot *s;
		uint64_t off;

		if (!j)
			break;
		while (p->slots[si].job)
			si++;          /* a free slot exists: fewer than nstage are held */
		s = &p->slots[si];
		off = (uint64_t)j->next_submit * p->chunk;
		*s = (struct slot){ .job = j, .chunk = j->next_submit,
				    .len = (uint32_t)(j->span - off < p->chunk ? j->span - off : p->chunk) };
		if (submit_chunk(p, si) < 0) {
			s->job = NULL;
			break;
		}
		j->next_submit++;
		j->inflight++;
		p->held++;
		if (!p->inflight)
			p->busy_since = moe_now_ns();
		p->inflight++;
		p->inflight_bytes += s->len;
		if (!j->demand)
			p->prefetch_inflight += s->len;
		if (p->inflight_bytes > p->st.max_inflight)
			p->st.max_inflight = p->inflight_bytes;
	}
}

/* Under the lock: a read came back. */
static void complete(struct moe_pager *p, uint32_t si, int res)
{
	struct slot *s = &p->slots[si];
	struct pjob *j = s->job;

	if (j->fault == MOE_FAULT_IO && s->chunk == 0 && res > 0)
		res = -EIO;
	if (j->fault == MOE_FAULT_SHORT && s->chunk == 0 && res > 0)
		res = s->got ? 0 : (res + 1) / 2;    /* half, then the end of the file */
	if (res > 0 && (uint32_t)res < s->len - s->got) {
		/* a short read: ask for the rest */
		s->got += (uint32_t)res;
		if (submit_chunk(p, si) == 0)
			return;
		res = -EAGAIN;
	}
	p->inflight--;
	p->inflight_bytes -= s->len;
	if (!j->demand)
		p->prefetch_inflight -= s->len;
	if (!p->inflight)
		p->st.busy_ns += moe_now_ns() - p->busy_since;
	j->inflight--;
	if (res <= 0) {
		uint64_t at = j->off + (uint64_t)s->chunk * p->chunk;

		if (res == 0)
			job_fail(p, j, FAIL_READ, -EIO, "the store ends early (a read of %u bytes at offset %" PRIu64
				 " returned nothing): truncated file?", s->len, at);
		else
			job_fail(p, j, FAIL_READ, -EIO, "a read of %u bytes at offset %" PRIu64 " failed: %s", s->len,
				 at, strerror(-res));
	} else {
		p->st.bytes += s->len;
	}
	if (j->err) {
		slot_release(p, s);
		job_failed_progress(p, j);
		return;
	}
	s->done = true;
	j->slot_of[s->chunk] = (int32_t)si;
	if (s->chunk == j->next_process)
		pthread_cond_signal(&p->verify_cv);
}

static void arm_wake(struct moe_pager *p)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&p->ring);

	/* the ring has room: it is sized for depth chunks plus this */
	io_uring_prep_read(sqe, p->efd, &p->efd_buf, sizeof(p->efd_buf), 0);
	io_uring_sqe_set_data64(sqe, TAG_WAKE);
}

/*
 * The ring cannot be used (enabling it failed, or io_uring_enter keeps
 * failing): every load queued or started fails with -EIO, and so will
 * every later one, instead of waiting for reads that never come.
 */
static void pager_break(struct moe_pager *p, int err)
{
	struct pjob *j;

	pthread_mutex_lock(&p->lock);
	if (!p->broken) {
		p->broken = err;
		plog(p, 3, "%s: the io_uring ring failed (%s): experts cannot be read until moed restarts",
		     p->store->path, strerror(-err));
	}
	while ((j = p->queue)) {
		p->queue = j->next;
		j->started = true;
		j->next = p->active;
		p->active = j;
	}
	p->queue_tail = NULL;
	for (struct pjob *a = p->active, *next; a; a = next) {
		next = a->next;
		int32_t busy = a->processing ? a->slot_of[a->next_process] : -1;

		if (!a->err)
			job_fail(p, a, FAIL_OTHER, -EIO, "the io_uring ring failed: %s", strerror(-err));
		/* reads in flight in a dead ring never come back: drop them; the
		 * chunk the verify thread holds is its to give back, and it then
		 * finishes the job (job_failed_progress) */
		for (uint32_t si = 0; si < p->nstage; si++)
			if (p->slots[si].job == a && (int32_t)si != busy)
				slot_release(p, &p->slots[si]);
		for (uint32_t c = 0; c < a->nchunks; c++)
			if (a->slot_of[c] != busy)
				a->slot_of[c] = -1;
		a->inflight = 0;
		if (!a->processing)
			job_finish(p, a);
	}
	p->inflight = 0;
	p->inflight_bytes = p->prefetch_inflight = 0;
	pthread_mutex_unlock(&p->lock);
}

static void *io_thread(void *arg)
{
	struct moe_pager *p = arg;
	bool stop = false;
	int fails = 0;

	arm_wake(p);
	for (;;) {
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		int r;

		pthread_mutex_lock(&p->lock);
		if (!stop)
			fill(p);
		pthread_mutex_unlock(&p->lock);
		if (stop && p->inflight == 0)
			break;
		r = io_uring_submit_and_wait(&p->ring, 1);
		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
			if (fails++ == 0)
				plog(p, 3, "%s: io_uring_enter failed: %s", p->store->path, strerror(-r));
			if (fails >= 100) {          /* 100 ms of failures: it will not recover */
				pager_break(p, r);
				return NULL;
			}
			usleep(1000);
		} else {
			fails = 0;
		}
		pthread_mutex_lock(&p->lock);
		io_uring_for_each_cqe(&p->ring, head, cqe) {
			uint64_t tag = io_uring_cqe_get_data64(cqe);

			seen++;
			if (tag == TAG_WAKE) {
				stop = p->stop;
				if (!stop)
					arm_wake(p);
				continue;
			}
			complete(p, (uint32_t)tag, cqe->res);
		}
		pthread_mutex_unlock(&p->lock);
		io_uring_cq_advance(&p->ring, seen);
	}
	return NULL;
}

/* ---------------------------------------------------------------- the public side */

static void wake(struct moe_pager *p)
{
	uint64_t one = 1;
	ssize_t n;

	do
		n = write(p->efd, &one, sizeof(one));
	while (n < 0 && errno == EINTR);
}

int moe_pager_submit(struct moe_pager *p, struct moe_pager_load *ld)
{
	const struct moe_store *s = p->store;
	const struct moe_store_layer *l = ld->li < s->hdr.num_moe_layers ? &s->layers[ld->li] : NULL;
	struct pjob *j = calloc(1, sizeof(*j));

	ld->msg[0] = '\0';
	ld->submit_ns = ld->done_ns = 0;
	if (!l ||
	    (ld->expert == UINT32_MAX ? !(l->flags & MOE_STORE_LAYER_HAS_SHARED)
				      : ld->expert >= s->cfg.num_experts)) {
		free(j);
		ld->status = -EINVAL;
		snprintf(ld->msg, sizeof(ld->msg), "%s: no such blob: layer index %" PRIu32 " expert %" PRIu32,
			 s->path, ld->li, ld->expert);
		return -EINVAL;
	}
	if (!j)
		goto nomem;
	j->ld = ld;
	if (ld->expert == UINT32_MAX) {
		j->off = l->shared_offset;
		j->bytes = l->shared_bytes;
		j->sum = l->shared_checksum;
	} else {
		j->off = moe_store_expert_offset(s, ld->li, ld->expert);
		j->bytes = s->hdr.expert_bytes;
		j->sum = s->expert_sums[(uint64_t)ld->li * s->cfg.num_experts + ld->expert];
	}
	j->span = (j->bytes + p->align - 1) / p->align * p->align;
	j->nchunks = (uint32_t)((j->span + p->chunk - 1) / p->chunk);
	j->slot_of = malloc(j->nchunks * sizeof(*j->slot_of));
	j->st = XXH3_createState();
	if (!j->slot_of || !j->st)
		goto nomem;
	memset(j->slot_of, 0xff, j->nchunks * sizeof(*j->slot_of));
	XXH3_64bits_reset(j->st);
	j->demand = !ld->prefetch;
	ld->priv = j;
	__atomic_store_n(&ld->status, MOE_PAGER_PENDING, __ATOMIC_RELEASE);
	pthread_mutex_lock(&p->lock);
	if (p->broken) {
		int err = p->broken;

		pthread_mutex_unlock(&p->lock);
		ld->priv = NULL;
		job_free(j);
		snprintf(ld->msg, sizeof(ld->msg), "%s: layer %" PRIu32 ": the io_uring ring failed: %s",
			 s->path, s->layers[ld->li].layer, strerror(-err));
		__atomic_store_n(&ld->status, -EIO, __ATOMIC_RELEASE);
		return -EIO;
	}
	if (p->queue_tail)
		p->queue_tail->next = j;
	else
		p->queue = j;
	p->queue_tail = j;
	pthread_mutex_unlock(&p->lock);
	wake(p);
	return 0;
nomem:
	job_free(j);
	ld->status = -ENOMEM;
	snprintf(ld->msg, sizeof(ld->msg), "out of memory queueing a read");
	return -ENOMEM;
}

void moe_pager_promote(struct moe_pager *p, struct moe_pager_load *ld)
{
	bool woke = false;

	pthread_mutex_lock(&p->lock);
	if (ld->status == MOE_PAGER_PENDING && ld->priv) {
		struct pjob *j = ld->priv;

		/* a started prefetch keeps its accounting until its chunks are back:
		 * only queued ones change class */
		if (!j->started) {
			j->demand = true;
			ld->prefetch = false;
			woke = true;
		}
	}
	pthread_mutex_unlock(&p->lock);
	if (woke)
		wake(p);
}

int moe_pager_wait(struct moe_pager *p, struct moe_pager_load *ld, struct moe_err *err)
{
	int r;

	pthread_mutex_lock(&p->lock);
	while (ld->status == MOE_PAGER_PENDING)
		pthread_cond_wait(&p->done_cv, &p->lock);
	r = ld->status;
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		moe_err_set(err, r, "%s", ld->msg[0] ? ld->msg : strerror(-r));
	return r;
}

int moe_pager_wait_any(struct moe_pager *p, struct moe_pager_load *const *lds, uint32_t n)
{
	int ret = -EINVAL;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		bool pending = false;

		for (uint32_t i = 0; i < n; i++) {
			if (lds[i]->status != MOE_PAGER_PENDING) {
				ret = (int)i;
				goto out;
			}
			pending = true;
		}
		if (!pending)
			break;
		pthread_cond_wait(&p->done_cv, &p->lock);
	}
out:
	pthread_mutex_unlock(&p->lock);
	return ret;
}

void moe_pager_inject(struct moe_pager *p, enum moe_pager_fault f, uint32_t li, uint32_t expert,
		      uint32_t count)
{
	pthread_mutex_lock(&p->lock);
	p->fault = f;
	p->fault_li = li;
	p->fault_expert = expert;
	p->fault_count = count;
	pthread_mutex_unlock(&p->lock);
}

void moe_pager_store_health(struct moe_pager *p, bool check, struct moe_store_health *h)
{
	char why[256];

	pthread_mutex_lock(&p->lock);
	if (check && p->health.state == MOE_STORE_OK && store_file_changed(p, why, sizeof(why)))
		store_state_set(p, MOE_STORE_CHANGED, why);
	*h = p->health;
	pthread_mutex_unlock(&p->lock);
}

int moe_pager_reopen(struct moe_pager *p, struct moe_err *err)
{
	const char *path = p->store->path;
	struct stat a, b;
	bool fault = false;
	int fd;

	pthread_mutex_lock(&p->lock);
	if (p->fault == MOE_FAULT_OPEN && p->fault_count) {
		p->fault_count--;
		fault = true;
	}
	pthread_mutex_unlock(&p->lock);
	if (fault)
		return moe_err_set(err, -EIO, "%s: cannot open for paging: %s (injected fault)", path,
				   strerror(EIO));
	fd = moe_store_open_file(path, p->direct ? O_DIRECT : 0, err);
	if (fd < 0)
		return moe_err_prefix(err, fd, "cannot open for paging");
	if (fstat(fd, &a) < 0 || fstat(p->store->fd, &b) < 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
		close(fd);
		return moe_err_set(err, -ESTALE, "%s: the file changed again while it was reopened; try again",
				   path);
	}
	/* atomic: every read from here on goes to the new file */
	if (dup3(fd, p->fd, O_CLOEXEC) < 0) {
		int r = -errno;

		close(fd);
		return moe_err_set(err, r, "%s: dup3: %s", path, strerror(-r));
	}
	close(fd);
	pthread_mutex_lock(&p->lock);
	p->health.state = MOE_STORE_OK;
	p->health.why[0] = '\0';
	p->health.reopens++;
	p->bad_since_ok = 0;
	pthread_mutex_unlock(&p->lock);
	return 0;
}

void moe_pager_get_stats(struct moe_pager *p, struct moe_pager_stats *st)
{
	clockid_t cid;
	struct timespec ts;

	pthread_mutex_lock(&p->lock);
	*st = p->st;
	pthread_mutex_unlock(&p->lock);
	if (p->thread_ok && pthread_getcpuclockid(p->thread, &cid) == 0 &&
	    clock_gettime(cid, &ts) == 0)
		st->io_cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	if (p->vthread_ok && pthread_getcpuclockid(p->vthread, &cid) == 0 &&
	    clock_gettime(cid, &ts) == 0)
		st->verify_cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- setup */

/* O_DIRECT when the filesystem takes it, with its alignment; else buffered. */
static int open_store(struct moe_pager *p, struct moe_err *err)
{
	const char *path = p->store->path;
	struct stat sb;

	p->align = MOE_STORE_MIN_ALIGN;
	if (!p->opt.buffered) {
		p->fd = moe_store_open_file(path, O_DIRECT, NULL);
		if (p->fd >= 0) {
#ifdef STATX_DIOALIGN
			struct statx sx;

			if (statx(p->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
			    (sx.stx_mask & STATX_DIOALIGN)) {
				p->st.dio_mem_align = sx.stx_dio_mem_align;
				p->st.dio_offset_align = sx.stx_dio_offset_align;
				if (sx.stx_dio_offset_align == 0 || sx.stx_dio_mem_align == 0 ||
				    sx.stx_dio_offset_align > MOE_STORE_MIN_ALIGN ||
				    sx.stx_dio_mem_align > 4096) {
					plog(p, 5, "%s: O_DIRECT needs %u-byte offsets and %u-byte buffers here "
					     "(statx), which the store's %u-byte layout cannot meet: reading "
					     "through the page cache", path, sx.stx_dio_offset_align,
					     sx.stx_dio_mem_align, MOE_STORE_MIN_ALIGN);
					close(p->fd);
					p->fd = -1;
				}
			}
#endif
			if (p->fd >= 0) {
				p->direct = true;
				return 0;
			}
		} else if (p->fd != -EINVAL) {
			return moe_err_set(err, p->fd, "%s: cannot open for paging: %s", path, strerror(-p->fd));
		} else {
			plog(p, 5, "%s: the filesystem refuses O_DIRECT: reading experts through the page cache",
			     path);
		}
	}
	p->fd = moe_store_open_file(path, 0, err);
	if (p->fd < 0)
		return moe_err_prefix(err, p->fd, "cannot open for paging");
	if (fstat(p->fd, &sb) == 0)
		posix_fadvise(p->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	return 0;
}

/* Staging: 2 MiB huge pages from hugetlbfs if the system has them, else
 * transparent huge pages asked for with madvise, else small pages. */
static int staging_alloc(struct moe_pager *p)
{
	size_t len = (size_t)p->nstage * p->chunk;
	size_t hlen = (len + HUGE_2M - 1) / HUGE_2M * HUGE_2M;
	void *m = mmap(NULL, hlen, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE, -1, 0);

	if (m != MAP_FAILED) {
		p->staging = m;
		p->staging_len = hlen;
		p->staging_huge = true;
		return 0;
	}
	/* over-map to place the buffer on a 2 MiB boundary for THP */
	m = mmap(NULL, hlen + HUGE_2M, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return -ENOMEM;
	{
		uintptr_t a = ((uintptr_t)m + HUGE_2M - 1) & ~((uintptr_t)HUGE_2M - 1);
		size_t head = a - (uintptr_t)m, tail = HUGE_2M - head;

		if (head)
			munmap(m, head);
		if (tail)
			munmap((uint8_t *)a + hlen, tail);
		p->staging = (uint8_t *)a;
	}
	p->staging_len = hlen;
	p->staging_huge = madvise(p->staging, hlen, MADV_HUGEPAGE) == 0;
	memset(p->staging, 0, hlen);     /* fault it in now, not on the first read */
	return 0;
}

static int ring_setup(struct moe_pager *p, struct moe_err *err)
{
	static const unsigned tries[] = {
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		IORING_SETUP_SINGLE_ISSUER,
		IORING_SETUP_COOP_TASKRUN,
		0,
	};
	struct io_uring_params prm;
	int r = -EINVAL;

	for (size_t i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
		memset(&prm, 0, sizeof(prm));
		prm.flags = tries[i];
		/* SINGLE_ISSUER: the thread that creates the ring is not the one that
		 * submits, so the ring starts disabled and the I/O thread enables it */
		if (tries[i] & IORING_SETUP_SINGLE_ISSUER)
			prm.flags |= IORING_SETUP_R_DISABLED;
		r = io_uring_queue_init_params(p->depth + 2, &p->ring, &prm);
		if (r == 0) {
			p->st.ring_flags = tries[i];
			p->ring_ok = true;
			return 0;
		}
		if (r != -EINVAL)
			break;
	}
	return moe_err_set(err, r, "%s: cannot set up io_uring: %s%s", p->store->path, strerror(-r),
			   r == -EPERM || r == -ENOSYS ? " (io_uring disabled here? see sysctl kernel.io_uring_disabled)" : "");
}

static void *io_thread_start(void *arg)
{
	struct moe_pager *p = arg;

	/* liburing 2.3 has no io_uring_enable_rings(): the register call itself */
	if (p->st.ring_flags & IORING_SETUP_SINGLE_ISSUER &&
	    syscall(__NR_io_uring_register, p->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0) {
		pager_break(p, -errno);
		return NULL;
	}
	return io_thread(p);
}

int moe_pager_open(const struct moe_store *s, const struct moe_pager_options *opt,
		   struct moe_pager **ret, struct moe_err *err)
{
	struct moe_pager *p = calloc(1, sizeof(*p));
	struct iovec *iov = NULL;
	int r;

	if (!p)
		return moe_err_set(err, -ENOMEM, "out of memory");
	p->fd = p->efd = -1;
	p->store = s;
	if (opt)
		p->opt = *opt;
	p->depth = p->opt.queue_depth ? p->opt.queue_depth : MOE_PAGER_QUEUE_DEPTH_DEFAULT;
	p->chunk = (uint64_t)(p->opt.chunk_kb ? p->opt.chunk_kb : MOE_PAGER_CHUNK_KB_DEFAULT) << 10;
	if (p->depth > MOE_PAGER_QUEUE_DEPTH_MAX || p->chunk < ((uint64_t)MOE_PAGER_CHUNK_KB_MIN << 10) ||
	    p->chunk > ((uint64_t)MOE_PAGER_CHUNK_KB_MAX << 10) || p->chunk % (MOE_PAGER_CHUNK_KB_STEP << 10)) {
		uint32_t depth = p->depth;
		uint64_t kb = p->chunk >> 10;

		free(p);
		return moe_err_set(err, -EINVAL, "pager: queue depth %u (%u-%u) or chunk of %" PRIu64
				   " KiB (%u-%u, a multiple of %u) is out of range", depth,
				   MOE_PAGER_QUEUE_DEPTH_MIN, MOE_PAGER_QUEUE_DEPTH_MAX, kb, MOE_PAGER_CHUNK_KB_MIN,
				   MOE_PAGER_CHUNK_KB_MAX, MOE_PAGER_CHUNK_KB_STEP);
	}
	p->prefetch_cap = p->opt.prefetch_max_kb ? (uint64_t)p->opt.prefetch_max_kb << 10
						  : p->depth * p->chunk / 2;
	if (p->prefetch_cap < p->chunk)
		p->prefetch_cap = p->chunk;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->done_cv, NULL);
	pthread_cond_init(&p->verify_cv, NULL);

	r = open_store(p, err);
	if (r < 0)
		goto fail;
	p->st.direct = p->direct;
	p->nstage = 2 * p->depth;
	p->slots = calloc(p->nstage, sizeof(*p->slots));
	if (!p->slots || staging_alloc(p) < 0) {
		r = moe_err_set(err, -ENOMEM, "pager: cannot allocate %" PRIu64 " MiB of staging buffers",
				p->nstage * p->chunk >> 20);
		goto fail;
	}
	p->st.hugepages = p->staging_huge;
	p->st.staging_bytes = p->staging_len;
	p->efd = eventfd(0, EFD_CLOEXEC);
	if (p->efd < 0) {
		r = moe_err_set(err, -errno, "pager: eventfd: %s", strerror(errno));
		goto fail;
	}
	r = ring_setup(p, err);
	if (r < 0)
		goto fail;
	iov = calloc(p->nstage, sizeof(*iov));
	if (!iov) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (uint32_t i = 0; i < p->nstage; i++)
		iov[i] = (struct iovec){ p->staging + (size_t)i * p->chunk, p->chunk };
	r = io_uring_register_buffers(&p->ring, iov, p->nstage);
	free(iov);
	if (r == 0)
		p->fixed = p->st.fixed_buffers = true;
	else
		plog(p, 5, "%s: cannot register %" PRIu64 " MiB of staging buffers with io_uring (%s%s): "
		     "using unregistered buffers", s->path, p->nstage * p->chunk >> 20, strerror(-r),
		     r == -ENOMEM ? "; RLIMIT_MEMLOCK too low? LimitMEMLOCK= in the unit raises it" : "");
	r = pthread_create(&p->thread, NULL, io_thread_start, p);
	if (r) {
		r = moe_err_set(err, -r, "pager: cannot start the I/O thread: %s", strerror(r));
		goto fail;
	}
	p->thread_ok = true;
	r = pthread_create(&p->vthread, NULL, verify_thread, p);
	if (r) {
		r = moe_err_set(err, -r, "pager: cannot start the verify thread: %s", strerror(r));
		goto fail;
	}
	p->vthread_ok = true;
	*ret = p;
	return 0;
fail:
	moe_pager_close(p);
	return r;
}

void moe_pager_close(struct moe_pager *p)
{
	struct pjob *j;

	if (!p)
		return;
	if (p->thread_ok) {
		pthread_mutex_lock(&p->lock);
		p->stop = true;
		/* queued loads never start */
		while ((j = p->queue)) {
			p->queue = j->next;
			j->ld->priv = NULL;
			snprintf(j->ld->msg, sizeof(j->ld->msg), "cancelled: the pager is closing");
			j->ld->status = -ECANCELED;
			job_free(j);
		}
		p->queue_tail = NULL;
		pthread_cond_broadcast(&p->done_cv);
		pthread_cond_broadcast(&p->verify_cv);
		pthread_mutex_unlock(&p->lock);
		wake(p);
		pthread_join(p->thread, NULL);
	}
	if (p->vthread_ok) {
		pthread_mutex_lock(&p->lock);
		p->stop = true;
		pthread_cond_broadcast(&p->verify_cv);
		pthread_mutex_unlock(&p->lock);
		pthread_join(p->vthread, NULL);
	}
	/* loads started and not finished when the reads drained */
	pthread_mutex_lock(&p->lock);
	while ((j = p->active)) {
		if (!j->err)
			job_fail(p, j, FAIL_OTHER, -ECANCELED, "cancelled: the pager is closing");
		job_finish(p, j);
	}
	pthread_mutex_unlock(&p->lock);
	if (p->ring_ok)
		io_uring_queue_exit(&p->ring);
	if (p->staging)
		munmap(p->staging, p->staging_len);
	free(p->slots);
	if (p->efd >= 0)
		close(p->efd);
	if (p->fd >= 0)
		close(p->fd);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->done_cv);
	pthread_cond_destroy(&p->verify_cv);
	free(p);
}
