/* SPDX-License-Identifier: MIT */
/*
 * The pager: reads expert blobs from the store with io_uring and O_DIRECT
 * into staging buffers registered with the ring, verifies each blob's
 * checksum as its chunks arrive, and hands the chunks to a sink that puts
 * them where the expert will live (a host-cache slot, in the backend's
 * layout; later a device copy).
 *
 * One I/O thread owns one ring (IORING_SETUP_SINGLE_ISSUER and
 * DEFER_TASKRUN when the kernel has them; never SQPOLL).  Blobs are read
 * in chunks of chunk_kb with at most queue_depth chunks in flight (into
 * twice as many staging slots, so that chunks waiting to be verified do
 * not hold reads back); demand
 * loads go before prefetches, and prefetches never hold more than
 * prefetch_max_kb in flight.  Chunks of one blob are checked and handed to
 * the sink in order, on a second thread (the verify thread), so the I/O
 * thread only drives the ring.
 *
 * The store is opened a second time with O_DIRECT (alignment from
 * statx(STATX_DIOALIGN) where the kernel reports it); when the filesystem
 * refuses O_DIRECT the pager reads through the page cache instead and says
 * so once through the log callback.
 *
 * Thread-safety: every function but open and close may be called from
 * any thread; a load's sink runs on the verify thread.
 */
#ifndef MOE_PAGER_H
#define MOE_PAGER_H

#include <stdbool.h>
#include <stdint.h>

#include "err.h"
#include "store.h"

/* Where the chunks of a blob go: @len bytes of the blob at offset @off
 * (chunks arrive in order; @len stops at the blob's unpadded size). */
typedef void (*moe_pager_sink_fn)(void *ctx, const void *chunk, uint64_t off, uint64_t len);

/*
 * Fault injection (tests), one per stage of a read: the next @count loads
 * of blob (@li, @expert) fail with an I/O error (MOE_FAULT_IO), a short
 * read that then meets the end of the file (MOE_FAULT_SHORT: the read
 * resumes once, as after any short read, and gets nothing) or a checksum
 * mismatch (MOE_FAULT_CHECKSUM); or the next @count opens of the store's
 * file by moe_pager_reopen() fail with -EIO (MOE_FAULT_OPEN; @li and
 * @expert unused).  Each gives -EIO to the loads concerned and no other,
 * but a checksum mismatch, which gives -EBADMSG (as a real one does).
 */
enum moe_pager_fault { MOE_FAULT_NONE = 0, MOE_FAULT_IO, MOE_FAULT_CHECKSUM, MOE_FAULT_SHORT,
		       MOE_FAULT_OPEN };

/*
 * The store's health as the pager sees it (ARCHITECTURE.md 2.4).  A store
 * truncated, grown or replaced under moed is CHANGED (the open file's size
 * is not the header's, or the path names another file now); one whose
 * reads fail or whose checksums do not match MOE_PAGER_DAMAGED_AFTER times
 * while the file looks unchanged is DAMAGED.  The state changes once, with
 * one log line, until moe_pager_reopen() finds the file whole again.
 */
enum moe_store_state { MOE_STORE_OK = 0, MOE_STORE_CHANGED, MOE_STORE_DAMAGED };
#define MOE_PAGER_DAMAGED_AFTER 4u  /* failures before an unchanged file counts as damaged */

struct moe_store_health {
	enum moe_store_state state;
	uint64_t read_errors;       /* reads that failed or ended early (since open) */
	uint64_t checksum_errors;   /* blobs whose checksum did not match (since open) */
	uint64_t reopens;           /* successful moe_pager_reopen() calls */
	char why[256];              /* what made the state (empty when ok) */
};

/* "ok", "changed", "damaged" */
const char *moe_store_state_name(enum moe_store_state st);

/*
 * The pager's bounds and defaults: the one definition that moe_pager_open(),
 * moed.conf's pager.* settings and moectl forward's options all use.
 */
#define MOE_PAGER_QUEUE_DEPTH_MIN 1u
#define MOE_PAGER_QUEUE_DEPTH_MAX 256u     /* io_uring entries per ring stay small */
#define MOE_PAGER_QUEUE_DEPTH_DEFAULT 32u  /* 32 MiB in flight at the default chunk */
#define MOE_PAGER_CHUNK_KB_MIN 64u         /* below this a read costs more than it moves */
#define MOE_PAGER_CHUNK_KB_MAX 4096u
#define MOE_PAGER_CHUNK_KB_STEP 4u         /* O_DIRECT: a multiple of the 4 KiB block */
#define MOE_PAGER_CHUNK_KB_DEFAULT 1024u

struct moe_pager_options {
	uint32_t queue_depth;       /* chunks in flight (MOE_PAGER_QUEUE_DEPTH_*; 0: the default) */
	uint32_t chunk_kb;          /* chunk size in KiB (MOE_PAGER_CHUNK_KB_*; 0: the default) */
	uint32_t prefetch_max_kb;   /* prefetch bytes in flight (0: half the in-flight bytes) */
	bool buffered;              /* never try O_DIRECT (tests, tmpfs) */
	moe_log_fn log;             /* (err.h) level 3 error, 5 notice (a fallback
				     * that costs speed, not correctness: no
				     * O_DIRECT, no fixed buffers); may be NULL */
	void *log_ctx;
};

/* Load states, in struct moe_pager_load.status. */
#define MOE_PAGER_PENDING 1

struct moe_pager_load {
	/* set by the caller */
	uint32_t li;                /* store layer index */
	uint32_t expert;            /* expert index; UINT32_MAX: the layer's shared expert */
	bool prefetch;              /* lower priority, capped in flight */
	moe_pager_sink_fn sink;
	void *sink_ctx;
	/* set by the pager */
	int status;                 /* MOE_PAGER_PENDING, 0, or -EIO, -EBADMSG (a checksum
				     * mismatch), -ENOMEM */
	uint64_t submit_ns, done_ns;  /* CLOCK_MONOTONIC */
	char msg[256];              /* why it failed (names layer and expert) */
	void *priv;                 /* pager-internal */
};

struct moe_pager_stats {
	uint64_t loads;             /* blobs completed (good or bad) */
	uint64_t prefetch_loads;    /* of which prefetches */
	uint64_t failed;            /* blobs failed (I/O error or checksum) */
	uint64_t bytes;             /* bytes read from the store */
	uint64_t busy_ns;           /* time with at least one read in flight */
	uint64_t io_cpu_ns;         /* the I/O thread's CPU time (ring work only) */
	uint64_t verify_cpu_ns;     /* the verify thread's: checksums and the sinks */
	uint64_t max_inflight;      /* most bytes ever in flight */
	uint64_t staging_bytes;     /* staging buffers (2 x queue_depth x chunk) */
	bool direct;                /* O_DIRECT in use */
	bool hugepages;             /* staging in huge pages (hugetlb or THP) */
	bool fixed_buffers;         /* staging registered with the ring */
	uint32_t ring_flags;        /* IORING_SETUP_* the ring got */
	uint32_t dio_mem_align, dio_offset_align;  /* from statx, 0 if unknown */
};

struct moe_pager;

/*
 * Start a pager for the open store @s (its path is opened again, with
 * O_DIRECT).  Errors name the file and what failed (io_uring setup, buffer
 * registration, memory lock limits).
 */
int moe_pager_open(const struct moe_store *s, const struct moe_pager_options *opt,
		   struct moe_pager **ret, struct moe_err *err);

/* Stop the I/O thread after the reads in flight, fail queued loads with
 * -ECANCELED, free everything.  NULL is fine. */
void moe_pager_close(struct moe_pager *p);

/*
 * Queue @ld (which must stay valid until its status is no longer
 * MOE_PAGER_PENDING).  A demand load queued while prefetches wait goes
 * first.  Returns 0.
 */
int moe_pager_submit(struct moe_pager *p, struct moe_pager_load *ld);

/* Make a queued prefetch a demand load (it was needed after all). */
void moe_pager_promote(struct moe_pager *p, struct moe_pager_load *ld);

/* Wait until @ld is done; returns its status.  A failed load's message
 * (layer, expert, reason) is in @err. */
int moe_pager_wait(struct moe_pager *p, struct moe_pager_load *ld, struct moe_err *err);

/*
 * Wait until any of @lds[0..n) that is still pending completes (or return
 * at once if one already has); returns the index of a completed one or
 * -EINVAL if none is pending.
 */
int moe_pager_wait_any(struct moe_pager *p, struct moe_pager_load *const *lds, uint32_t n);

/*
 * The store's health into @h.  With @check, first compare the open file
 * with the header and the path (fstat, stat: cheap enough for once a
 * second), which can turn the state CHANGED before a read fails.
 */
void moe_pager_store_health(struct moe_pager *p, bool check, struct moe_store_health *h);

/*
 * Reopen the store's path for paging after moe_store_reopen() verified
 * the file there and gave it to the store (the pager's file must be that
 * same file, else -ESTALE), swap it in atomically (dup3: a read in flight
 * ends on the old file, the next goes to the new one) and set the state
 * back to ok.  On error (message naming the path) nothing changes.
 */
int moe_pager_reopen(struct moe_pager *p, struct moe_err *err);

/* Fault injection for tests (enum moe_pager_fault). */
void moe_pager_inject(struct moe_pager *p, enum moe_pager_fault f, uint32_t li, uint32_t expert,
		      uint32_t count);

void moe_pager_get_stats(struct moe_pager *p, struct moe_pager_stats *st);

#endif
