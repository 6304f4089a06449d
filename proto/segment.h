/* SPDX-License-Identifier: MIT */
/*
 * The one view of a client's shared segment (proto.h, "Segment"): where
 * the header, the two rings and the arena lie in a mapped segment.  moed
 * lays a segment out with moe_seg_layout(); moed, libmoeclient and the
 * tests' raw sessions all find the pointers with moe_seg_view_init(), which
 * checks the header against the mapping first, as liburing's
 * io_uring_setup_ring_pointers() does for its rings.  So the three can
 * never disagree on the layout, and a bad header is refused in one place.
 *
 * Internal to the project (not installed).  Static inline: libmoeclient is
 * built with hidden visibility and a symbol map, and none of this may
 * enter its ABI.  Never logs.
 */
#ifndef MOE_PROTO_SEGMENT_H
#define MOE_PROTO_SEGMENT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

/* The rings end on a page boundary, so the arena starts on one: the
 * daemon's copies in and out of it run on whole pages. */
#define MOE_SEG_RINGS_ALIGN 4096u
/* The least alignment of the arena a reader accepts: a cache line, the
 * alignment libmoeclient's arena allocator hands out. */
#define MOE_SEG_ARENA_ALIGN 64u

/* A mapped segment, as pointers into it.  Plain values: the view owns
 * nothing (the mapping belongs to whoever mapped it). */
struct moe_seg_view {
	uint8_t *base;                  /* the mapping */
	size_t bytes;                   /* its size (the header's segment_bytes) */
	struct moe_seg_header *hdr;     /* at base */
	struct moe_sqe *sq;             /* sq_entries of them */
	struct moe_cqe *cq;             /* cq_entries of them */
	uint32_t sq_entries, cq_entries;
	uint8_t *arena;                 /* arena_bytes of it */
	uint64_t arena_bytes;
};

static inline int moe_seg_pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

/*
 * Bytes of both rings of @sq_entries and @cq_entries, rounded up to
 * MOE_SEG_RINGS_ALIGN: what lies between the header and the arena.
 */
static inline uint64_t moe_seg_rings_bytes(uint32_t sq_entries, uint32_t cq_entries)
{
	uint64_t rings = (uint64_t)sq_entries * sizeof(struct moe_sqe) +
			 (uint64_t)cq_entries * sizeof(struct moe_cqe);

	return (rings + MOE_SEG_RINGS_ALIGN - 1) / MOE_SEG_RINGS_ALIGN * MOE_SEG_RINGS_ALIGN;
}

/*
 * The header of a segment with @sq_entries and @cq_entries (powers of two,
 * cq_entries >= sq_entries) and an arena of @arena_bytes (a multiple of
 * MOE_SEG_RINGS_ALIGN): the header, the SQ, the CQ, padding to a page, the
 * arena.  0 and *ret_hdr (indices and wakeup words zero), or -EINVAL for
 * ring sizes that are not so; the size of the whole segment is
 * ret_hdr->segment_bytes.
 */
static inline int moe_seg_layout(uint32_t sq_entries, uint32_t cq_entries, uint64_t arena_bytes,
				 struct moe_seg_header *ret_hdr)
{
	uint64_t rings = moe_seg_rings_bytes(sq_entries, cq_entries);

	if (!moe_seg_pow2(sq_entries) || !moe_seg_pow2(cq_entries) || cq_entries < sq_entries ||
	    arena_bytes % MOE_SEG_RINGS_ALIGN ||
	    arena_bytes > UINT64_MAX - MOE_SEG_HEADER_SIZE - rings)
		return -EINVAL;
	*ret_hdr = (struct moe_seg_header){
		.magic = MOE_SEG_MAGIC, .version = MOE_PROTO_VERSION,
		.segment_bytes = MOE_SEG_HEADER_SIZE + rings + arena_bytes,
		.sq_entries = sq_entries, .cq_entries = cq_entries,
		.sq_off = MOE_SEG_HEADER_SIZE,
		.cq_off = MOE_SEG_HEADER_SIZE + (uint64_t)sq_entries * sizeof(struct moe_sqe),
		.arena_off = MOE_SEG_HEADER_SIZE + rings, .arena_bytes = arena_bytes,
	};
	return 0;
}

/*
 * The view of the segment mapped at @base (@bytes long), after checking its
 * header: the magic and version, segment_bytes equal to @bytes, rings of
 * powers of two (cq_entries >= sq_entries), the SQ, the CQ and the arena in
 * that order without overlap, each aligned and inside the mapping.  0 and
 * *ret, or -EPROTO for a header that says otherwise (*ret untouched).  The
 * header's layout fields are read once here; a caller keeps the view and
 * never reads them from the segment again.
 */
static inline int moe_seg_view_init(void *base, size_t bytes, struct moe_seg_view *ret)
{
	const struct moe_seg_header *h = base;
	uint64_t sq_off, cq_off, arena_off, arena_bytes, sq_end, cq_end;
	uint32_t sq_entries, cq_entries;

	if (!base || bytes < MOE_SEG_HEADER_SIZE)
		return -EPROTO;
	if (h->magic != MOE_SEG_MAGIC || h->version != MOE_PROTO_VERSION || h->segment_bytes != bytes)
		return -EPROTO;
	sq_entries = h->sq_entries;
	cq_entries = h->cq_entries;
	sq_off = h->sq_off;
	cq_off = h->cq_off;
	arena_off = h->arena_off;
	arena_bytes = h->arena_bytes;
	if (!moe_seg_pow2(sq_entries) || !moe_seg_pow2(cq_entries) || cq_entries < sq_entries)
		return -EPROTO;
	/* each offset is checked against the mapping before anything is added
	 * to it: an offset near 2^64 must not wrap */
	if (sq_off < MOE_SEG_HEADER_SIZE || sq_off % _Alignof(struct moe_sqe) || sq_off > bytes ||
	    (uint64_t)sq_entries * sizeof(struct moe_sqe) > bytes - sq_off)
		return -EPROTO;
	sq_end = sq_off + (uint64_t)sq_entries * sizeof(struct moe_sqe);
	if (cq_off < sq_end || cq_off % _Alignof(struct moe_cqe) || cq_off > bytes ||
	    (uint64_t)cq_entries * sizeof(struct moe_cqe) > bytes - cq_off)
		return -EPROTO;
	cq_end = cq_off + (uint64_t)cq_entries * sizeof(struct moe_cqe);
	if (arena_off < cq_end || arena_off % MOE_SEG_ARENA_ALIGN || arena_off > bytes ||
	    arena_bytes > bytes - arena_off)
		return -EPROTO;
	*ret = (struct moe_seg_view){
		.base = base, .bytes = bytes, .hdr = base,
		.sq = (struct moe_sqe *)((uint8_t *)base + sq_off),
		.cq = (struct moe_cqe *)((uint8_t *)base + cq_off),
		.sq_entries = sq_entries, .cq_entries = cq_entries,
		.arena = (uint8_t *)base + arena_off, .arena_bytes = arena_bytes,
	};
	return 0;
}

#endif
