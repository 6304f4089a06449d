/* SPDX-License-Identifier: MIT */
/*
 * Routing traces: which experts each batch used in each MoE layer, recorded
 * so that cache policies can be compared offline (moe_cache_simulate,
 * `moectl trace-sim`).  Documented in moe-trace(5).
 *
 * A trace is a text file:
 *
 *   moed-trace 1 <num_moe_layers> <num_experts>
 *   # a comment
 *   <layer_index> <expert> <expert> ...
 *   ...
 *
 * The first line is the header: the format's name, its version (1), and the
 * key space (the store's MoE-layer count and experts per layer, both at
 * least 1).  Then one line per batch and layer, in the order the engine ran
 * them: the store's MoE-layer index (0..num_moe_layers-1), then the distinct
 * experts that batch used in that layer, in strictly ascending order (a line
 * with no experts is an empty batch).  Numbers are unsigned decimal; fields
 * are separated by spaces or tabs; lines starting with '#' and blank lines
 * are ignored; the last newline may be missing.
 */
#ifndef MOE_TRACE_H
#define MOE_TRACE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define MOE_TRACE_MAGIC "moed-trace"
#define MOE_TRACE_VERSION 1    /* readers refuse other versions */

/*
 * A trace read into memory, in the form moe_cache_simulate() takes: each
 * line's keys (layer_index * n_experts + expert, ascending) followed by one
 * MOE_CACHE_NONE, so keys[] holds the accesses plus one separator per line.
 */
struct moe_trace {
	uint32_t n_layers, n_experts;
	uint32_t *keys;
	size_t n;               /* entries in keys, separators included */
};

struct moe_trace_writer;

/*
 * Create (or truncate) @path and write the header for @n_layers x
 * @n_experts keys (both at least 1, the product below UINT32_MAX).  Errors
 * name the file.
 */
int moe_trace_open_write(const char *path, uint32_t n_layers, uint32_t n_experts,
			 struct moe_trace_writer **ret, struct moe_err *err);

/*
 * Append one batch's use of MoE layer @li: @experts[0..n), distinct, in any
 * order (the writer sorts a copy).  -EINVAL with a message for a layer or
 * expert out of range or an expert given twice (nothing is written then);
 * -EIO etc. for a write error, which also sticks to the writer.
 */
int moe_trace_write(struct moe_trace_writer *w, uint32_t li, const uint32_t *experts, uint32_t n,
		    struct moe_err *err);

/*
 * Flush and close the file; reports the first write error of the writer's
 * life (e.g. -ENOSPC), naming the file.  Frees @w in every case; NULL is
 * fine (returns 0).
 */
int moe_trace_close_write(struct moe_trace_writer *w, struct moe_err *err);

/*
 * Read and check a whole trace file.  Every bad input is -EINVAL with a
 * message "PATH:LINE: what is wrong": a missing or malformed header, an
 * unknown version, a bad number, a layer or expert out of range, experts out
 * of order or repeated.  -errno naming the file for open or read errors,
 * -ENOMEM.  *ret is set only on success; free it with moe_trace_free().
 */
int moe_trace_read(const char *path, struct moe_trace **ret, struct moe_err *err);

/* NULL is fine. */
void moe_trace_free(struct moe_trace *t);

#endif
