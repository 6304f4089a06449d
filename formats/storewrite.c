/* SPDX-License-Identifier: MIT */
/*
 * The .moe store's writer, used by pack (moectl) and the tests.  moed only
 * reads stores: the format's definition and its reader are engine/store.c;
 * this file lays a store out, checksums what it is given and renames the
 * finished file into place (formats/outfile.c: a temporary of its own, so
 * concurrent packs to one path cannot mix), then opens the result as moed
 * would before it says the store is written.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "engine/checked.h"
#include "engine/io.h"
#include "engine/store.h"
#include "formats/outfile.h"

struct moe_store_writer {
	int fd;                          /* out.fd: the temporary */
	struct moe_outfile out;
	char *path;                      /* final name */
	struct moe_model_config cfg;
	struct moe_store_header hdr;
	struct moe_store_layer *layers;
	uint64_t *expert_sums;
	uint8_t *put_router;             /* per layer: router written */
	uint8_t *put_shared;             /* per layer: shared blob written */
	uint8_t *put_expert;             /* per layer x expert */
};

void moe_store_writer_abort(struct moe_store_writer *w)
{
	if (!w)
		return;
	moe_outfile_abort(&w->out);
	free(w->path);
	free(w->layers);
	free(w->expert_sums);
	free(w->put_router);
	free(w->put_shared);
	free(w->put_expert);
	free(w);
}

/* Compute every offset; fills w->hdr layout fields and w->layers. */
static int writer_layout(struct moe_store_writer *w, uint32_t n_layers, const uint32_t *layers,
			 struct moe_err *err)
{
	const struct moe_model_config *c = &w->cfg;
	struct moe_store_header *h = &w->hdr;
	uint64_t pos, bytes, n_sums;

	h->expert_bytes = moe_expert_bytes(c);
	h->expert_align = moe_store_expert_align_for(h->expert_bytes);
	if (!moe_align_up(h->expert_bytes, h->expert_align, &h->expert_stride))
		return moe_err_set(err, -EOVERFLOW, "%s: expert size overflows", w->path);
	h->num_moe_layers = n_layers;
	h->layer_table_offset = MOE_STORE_HEADER_SIZE;
	pos = h->layer_table_offset + (uint64_t)n_layers * sizeof(struct moe_store_layer);
	h->expert_sums_offset = pos;
	n_sums = (uint64_t)n_layers * c->num_experts;
	pos += n_sums * sizeof(uint64_t);

	for (uint32_t i = 0; i < n_layers; i++) {
		struct moe_store_layer *l = &w->layers[i];

		l->layer = layers[i];
		if (!moe_align_up(pos, MOE_STORE_MIN_ALIGN, &l->router_offset))
			goto overflow;
		l->router_bytes = moe_store_router_bytes(c);
		pos = l->router_offset + l->router_bytes;
		if (c->shared_intermediate_size) {
			l->flags |= MOE_STORE_LAYER_HAS_SHARED;
			if (!moe_align_up(pos, MOE_STORE_MIN_ALIGN, &l->shared_offset))
				goto overflow;
			l->shared_bytes = moe_shared_bytes(c);
			pos = l->shared_offset + l->shared_bytes;
		}
		if (!moe_align_up(pos, h->expert_align, &l->experts_offset) ||
		    moe_mul_overflows(h->expert_stride, c->num_experts, &bytes) ||
		    moe_add_overflows(l->experts_offset, bytes, &pos))
			goto overflow;
	}
	h->file_size = pos;
	if (pos > (uint64_t)INT64_MAX)
		goto overflow;
	return 0;
overflow:
	return moe_err_set(err, -EOVERFLOW, "%s: the store would exceed 2^63 bytes", w->path);
}

int moe_store_writer_open(const char *path, const struct moe_model_config *cfg,
			  uint32_t n_layers, const uint32_t *layers,
			  const char *source, const char *source_dtype,
			  struct moe_store_writer **ret, struct moe_err *err)
{
	struct moe_store_writer *w;
	uint64_t n_sums;
	int r;

	r = moe_model_config_validate(cfg, err);
	if (r < 0)
		return moe_err_prefix(err, r, "%s", path);
	if (n_layers == 0 || n_layers > cfg->num_hidden_layers)
		return moe_err_set(err, -EINVAL, "%s: %" PRIu32 " MoE layers, expected 1..%" PRIu32,
				   path, n_layers, cfg->num_hidden_layers);
	for (uint32_t i = 0; i < n_layers; i++)
		if (layers[i] >= cfg->num_hidden_layers || (i > 0 && layers[i] <= layers[i - 1]))
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 " is out of order or not below %" PRIu32,
					   path, layers[i], cfg->num_hidden_layers);
	if ((cfg->shared_intermediate_size == 0) != (cfg->n_shared_experts == 0) ||
	    (cfg->shared_gate && !cfg->shared_intermediate_size))
		return moe_err_set(err, -EINVAL, "%s: shared expert fields disagree", path);

	n_sums = (uint64_t)n_layers * cfg->num_experts;
	w = calloc(1, sizeof(*w));
	if (!w)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	w->fd = -1;
	w->out.fd = -1;
	w->out.dirfd = -1;
	w->out.slot = -1;
	w->cfg = *cfg;
	w->path = strdup(path);
	w->layers = calloc(n_layers, sizeof(*w->layers));
	w->expert_sums = calloc(n_sums, sizeof(*w->expert_sums));
	w->put_router = calloc(n_layers, 1);
	w->put_shared = calloc(n_layers, 1);
	w->put_expert = calloc(n_sums, 1);
	if (!w->path || !w->layers || !w->expert_sums || !w->put_router ||
	    !w->put_shared || !w->put_expert) {
		moe_store_writer_abort(w);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}

	memcpy(w->hdr.magic, MOE_STORE_MAGIC, 8);
	w->hdr.header_size = MOE_STORE_HEADER_SIZE;
	moe_store_header_from_config(cfg, &w->hdr);
	snprintf(w->hdr.source, sizeof(w->hdr.source), "%s", source ? source : "");
	snprintf(w->hdr.source_dtype, sizeof(w->hdr.source_dtype), "%s", source_dtype ? source_dtype : "");
	r = writer_layout(w, n_layers, layers, err);
	if (r < 0) {
		moe_store_writer_abort(w);
		return r;
	}

	r = moe_outfile_open(&w->out, path, err);
	if (r < 0) {
		moe_store_writer_abort(w);
		return r;
	}
	w->fd = w->out.fd;
	/* Sized up front: padding reads as zeros, and a full disk shows now
	 * rather than after an hour of packing (where the filesystem allocates). */
	if (ftruncate(w->fd, (off_t)w->hdr.file_size) < 0) {
		r = moe_err_set(err, -errno, "%s: cannot size to %" PRIu64 " bytes: %s", w->path,
				w->hdr.file_size, strerror(errno));
		moe_store_writer_abort(w);
		return r;
	}
	*ret = w;
	return 0;
}

static int writer_check_li(struct moe_store_writer *w, uint32_t li, struct moe_err *err)
{
	if (li >= w->hdr.num_moe_layers)
		return moe_err_set(err, -EINVAL, "%s: layer index %" PRIu32 " is out of range (%" PRIu32 " MoE layers)",
				   w->path, li, w->hdr.num_moe_layers);
	return 0;
}

static int writer_put(struct moe_store_writer *w, const char *what, uint32_t li,
		      const void *buf, uint64_t len, uint64_t off, struct moe_err *err)
{
	int r = moe_pwrite_full(w->fd, buf, len, off);

	if (r < 0)
		return moe_err_set(err, r, "%s: layer %" PRIu32 " %s: %s", w->path,
				   w->layers[li].layer, what, strerror(-r));
	return 0;
}

int moe_store_writer_put_router(struct moe_store_writer *w, uint32_t li, const float *router,
				const float *bias, const float *shared_gate, struct moe_err *err)
{
	const struct moe_model_config *c = &w->cfg;
	struct moe_store_layer *l;
	uint64_t n_router = (uint64_t)c->num_experts * c->hidden_size * sizeof(float);
	uint64_t n_bias = c->has_bias ? (uint64_t)c->num_experts * sizeof(float) : 0;
	uint64_t n_sg = c->shared_gate ? (uint64_t)c->hidden_size * sizeof(float) : 0;
	XXH3_state_t *st;
	int r;

	r = writer_check_li(w, li, err);
	if (r < 0)
		return r;
	l = &w->layers[li];
	if (!router || (c->has_bias && !bias) || (c->shared_gate && !shared_gate))
		return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 " router: a required part is missing",
				   w->path, l->layer);
	r = writer_put(w, "router", li, router, n_router, l->router_offset, err);
	if (r == 0 && n_bias)
		r = writer_put(w, "router bias", li, bias, n_bias, l->router_offset + n_router, err);
	if (r == 0 && n_sg)
		r = writer_put(w, "shared expert gate", li, shared_gate, n_sg,
			       l->router_offset + n_router + n_bias, err);
	if (r < 0)
		return r;
	st = XXH3_createState();
	if (!st)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", w->path);
	XXH3_64bits_reset(st);
	XXH3_64bits_update(st, router, (size_t)n_router);
	if (n_bias)
		XXH3_64bits_update(st, bias, (size_t)n_bias);
	if (n_sg)
		XXH3_64bits_update(st, shared_gate, (size_t)n_sg);
	l->router_checksum = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	w->put_router[li] = 1;
	return 0;
}

int moe_store_writer_put_shared(struct moe_store_writer *w, uint32_t li, const void *blob,
				struct moe_err *err)
{
	struct moe_store_layer *l;
	int r;

	r = writer_check_li(w, li, err);
	if (r < 0)
		return r;
	l = &w->layers[li];
	if (!(l->flags & MOE_STORE_LAYER_HAS_SHARED))
		return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": the model has no shared expert",
				   w->path, l->layer);
	r = writer_put(w, "shared expert", li, blob, l->shared_bytes, l->shared_offset, err);
	if (r < 0)
		return r;
	l->shared_checksum = moe_store_checksum(blob, l->shared_bytes);
	w->put_shared[li] = 1;
	return 0;
}

int moe_store_writer_put_expert(struct moe_store_writer *w, uint32_t li, uint32_t expert,
				const void *blob, struct moe_err *err)
{
	uint64_t off, idx;
	char what[32];
	int r;

	r = writer_check_li(w, li, err);
	if (r < 0)
		return r;
	if (expert >= w->cfg.num_experts)
		return moe_err_set(err, -EINVAL, "%s: expert %" PRIu32 " is out of range (%" PRIu32 " experts)",
				   w->path, expert, w->cfg.num_experts);
	off = w->layers[li].experts_offset + (uint64_t)expert * w->hdr.expert_stride;
	snprintf(what, sizeof(what), "expert %" PRIu32, expert);
	r = writer_put(w, what, li, blob, w->hdr.expert_bytes, off, err);
	if (r < 0)
		return r;
	idx = (uint64_t)li * w->cfg.num_experts + expert;
	w->expert_sums[idx] = moe_store_checksum(blob, w->hdr.expert_bytes);
	w->put_expert[idx] = 1;
	return 0;
}

void moe_store_writer_set_fingerprint(struct moe_store_writer *w, const uint8_t fingerprint[16])
{
	memcpy(w->hdr.source_fingerprint, fingerprint, sizeof(w->hdr.source_fingerprint));
}

/*
 * The store now at w->path, checked as moed opens it: header, tables and
 * size.  It is ours, or a concurrent writer's whose rename came after ours;
 * either way whole, since every writer renames only a finished file.  The
 * blobs' checksums are not read back: our temporary was ours alone and
 * fsync succeeded, so that would cost a read of the whole store to catch
 * only a failing disk, which `moectl verify` is for.
 */
static int check_written(struct moe_store_writer *w, struct moe_err *err)
{
	struct moe_store *s = NULL;
	int r;

	r = moe_store_open(w->path, &s, err);
	if (r < 0)
		return moe_err_prefix(err, r, "the store just written fails the check moed makes "
				      "(pack it again)");
	moe_store_close(s);
	return 0;
}

int moe_store_writer_finish(struct moe_store_writer *w, struct moe_err *err)
{
	struct moe_store_header *h = &w->hdr;
	uint64_t n_sums = (uint64_t)h->num_moe_layers * w->cfg.num_experts;
	uint64_t table_bytes = (uint64_t)h->num_moe_layers * sizeof(struct moe_store_layer);
	int r;

	for (uint32_t li = 0; li < h->num_moe_layers; li++) {
		const struct moe_store_layer *l = &w->layers[li];

		if (!w->put_router[li]) {
			r = moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": router was not written", w->path, l->layer);
			goto fail;
		}
		if ((l->flags & MOE_STORE_LAYER_HAS_SHARED) && !w->put_shared[li]) {
			r = moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": shared expert was not written",
					w->path, l->layer);
			goto fail;
		}
		for (uint32_t j = 0; j < w->cfg.num_experts; j++)
			if (!w->put_expert[(uint64_t)li * w->cfg.num_experts + j]) {
				r = moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 " expert %" PRIu32 " was not written",
						w->path, l->layer, j);
				goto fail;
			}
	}
	h->layer_table_checksum = moe_store_checksum(w->layers, table_bytes);
	h->expert_sums_checksum = moe_store_checksum(w->expert_sums, n_sums * sizeof(uint64_t));
	h->header_checksum = 0;
	h->header_checksum = moe_store_header_checksum(h);

	r = moe_pwrite_full(w->fd, w->layers, table_bytes, h->layer_table_offset);
	if (r == 0)
		r = moe_pwrite_full(w->fd, w->expert_sums, n_sums * sizeof(uint64_t), h->expert_sums_offset);
	/* the header last: a store cut short by a crash has no valid header */
	if (r == 0)
		r = moe_pwrite_full(w->fd, h, sizeof(*h), 0);
	if (r < 0) {
		r = moe_err_set(err, r, "%s: %s", w->path, strerror(-r));
		goto fail;
	}
	w->fd = -1;
	r = moe_outfile_commit(&w->out, true, err);
	if (r == 0)
		r = check_written(w, err);
fail:
	moe_store_writer_abort(w);
	return r;
}
