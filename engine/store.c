/* SPDX-License-Identifier: MIT */
/*
 * The .moe store: writer (pack) and reader (moed, moectl, the tests).
 *
 * The reader trusts nothing it has not checked: the header checksum first,
 * then every offset and size with overflow-safe arithmetic against the real
 * file size, then the tables' checksums.  After moe_store_open() succeeds a
 * read of any blob stays inside the file; the blob's own checksum is checked
 * when it is read.
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

#include "checked.h"
#include "io.h"
#include "store.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the .moe format is little-endian and store.c writes structures as they are in memory"
#endif

/* Largest single pread/pwrite: Linux transfers at most 0x7ffff000 bytes per
 * call anyway; asking for less keeps the loop honest. */
#define IO_CHUNK ((size_t)1 << 30)

/* Buffer for hashing regions the caller does not want (verify, skipped parts
 * of a router region): bounds memory whatever the blob size. */
#define HASH_CHUNK ((size_t)4 << 20)

/* --- small helpers -------------------------------------------------------- */

static bool is_pow2(uint64_t v)
{
	return v && !(v & (v - 1));
}

/* pread exactly @len bytes at @off; -EIO on end of file. */
static int pread_full(int fd, void *buf, uint64_t len, uint64_t off)
{
	int64_t n = moe_pread_full(fd, buf, len, off);

	if (n < 0)
		return (int)n;
	return (uint64_t)n == len ? 0 : -EIO;
}

uint64_t moe_store_checksum(const void *buf, uint64_t len)
{
	XXH3_state_t *st;
	const uint8_t *p = buf;
	uint64_t h;

	if (len <= IO_CHUNK)
		return XXH3_64bits(buf, (size_t)len);
	/* size_t is 64 bits on every target we build for, but stream anyway so
	 * that no single call is handed more than IO_CHUNK. */
	st = XXH3_createState();
	if (!st)
		abort();        /* a few hundred bytes: treat like a failed stack push */
	XXH3_64bits_reset(st);
	while (len > 0) {
		size_t n = len > IO_CHUNK ? IO_CHUNK : (size_t)len;

		XXH3_64bits_update(st, p, n);
		p += n;
		len -= n;
	}
	h = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	return h;
}

uint64_t moe_store_header_checksum(const struct moe_store_header *h)
{
	struct moe_store_header tmp;

	memcpy(&tmp, h, sizeof(tmp));
	tmp.header_checksum = 0;
	return XXH3_64bits(&tmp, sizeof(tmp));
}

uint64_t moe_store_router_bytes(const struct moe_model_config *cfg)
{
	uint64_t n = (uint64_t)cfg->num_experts * cfg->hidden_size;

	if (cfg->has_bias)
		n += cfg->num_experts;
	if (cfg->shared_gate)
		n += cfg->hidden_size;
	return n * sizeof(float);
}

void moe_store_header_from_config(const struct moe_model_config *c, struct moe_store_header *h)
{
	snprintf(h->model_type, sizeof(h->model_type), "%s", moe_arch_name(c->arch));
	h->arch = (uint32_t)c->arch;
	h->hidden_size = c->hidden_size;
	h->moe_intermediate_size = c->moe_intermediate_size;
	h->num_experts = c->num_experts;
	h->top_k = c->top_k;
	h->num_hidden_layers = c->num_hidden_layers;
	h->n_group = c->n_group;
	h->topk_group = c->topk_group;
	h->n_shared_experts = c->n_shared_experts;
	h->shared_intermediate_size = c->shared_intermediate_size;
	h->scoring = (uint32_t)c->scoring;
	h->topk_method = (uint32_t)c->topk_method;
	h->norm_topk_prob = c->norm_topk_prob;
	h->shared_gate = c->shared_gate;
	h->has_bias = c->has_bias;
	h->gated = c->gated;
	h->act = (uint32_t)c->act;
	h->weight_dtype = (uint32_t)c->weight_dtype;
	h->shared_dtype = (uint32_t)(c->shared_intermediate_size ? c->shared_dtype : c->weight_dtype);
	h->routed_scaling_factor = c->routed_scaling_factor;
	h->version = h->shared_dtype == h->weight_dtype ? 1 : 2;
	h->has_expert_bias = c->has_expert_bias;
	if (c->act == MOE_ACT_SWIGLU_OAI) {
		h->swiglu_alpha = c->swiglu_alpha;
		h->swiglu_limit = c->swiglu_limit;
	}
	h->q4_group = c->q4_group;
	h->q4_flags = c->q4_flags;
}

/* Header -> config, checking every enumerated value; the numbers are then
 * checked by moe_model_config_validate(). */
static int header_to_config(const struct moe_store_header *h, struct moe_model_config *c,
			    struct moe_err *err)
{
	const char *name;

	memset(c, 0, sizeof(*c));
	if (h->arch >= MOE_ARCH_COUNT)
		return moe_err_set(err, -EINVAL, "unknown architecture number %" PRIu32, h->arch);
	name = moe_arch_name((enum moe_arch)h->arch);
	if (!memchr(h->model_type, '\0', sizeof(h->model_type)) || strcmp(h->model_type, name))
		return moe_err_set(err, -EINVAL, "model_type does not match architecture %s", name);
	if (h->scoring > MOE_SCORING_SIGMOID)
		return moe_err_set(err, -EINVAL, "unknown scoring function %" PRIu32, h->scoring);
	if (h->topk_method > MOE_TOPK_NOAUX_TC)
		return moe_err_set(err, -EINVAL, "unknown top-k method %" PRIu32, h->topk_method);
	if (h->act > MOE_ACT_SWIGLU_OAI)
		return moe_err_set(err, -EINVAL, "unknown activation %" PRIu32, h->act);
	if (h->weight_dtype >= MOE_DTYPE_COUNT)
		return moe_err_set(err, -EINVAL, "unknown weight dtype %" PRIu32, h->weight_dtype);
	if (h->version >= 2 && h->shared_dtype >= MOE_DTYPE_COUNT)
		return moe_err_set(err, -EINVAL, "unknown shared expert dtype %" PRIu32, h->shared_dtype);
	if (h->norm_topk_prob > 1 || h->shared_gate > 1 || h->has_bias > 1 || h->gated > 1 ||
	    h->has_expert_bias > 1)
		return moe_err_set(err, -EINVAL, "a 0/1 flag holds another value");
	if ((h->shared_intermediate_size == 0) != (h->n_shared_experts == 0))
		return moe_err_set(err, -EINVAL,
				   "n_shared_experts %" PRIu32 " disagrees with shared intermediate size %" PRIu32,
				   h->n_shared_experts, h->shared_intermediate_size);
	if (h->shared_gate && h->shared_intermediate_size == 0)
		return moe_err_set(err, -EINVAL, "shared expert gate without a shared expert");
	if (h->has_bias && h->topk_method != MOE_TOPK_NOAUX_TC && h->arch != MOE_ARCH_GPT_OSS)
		return moe_err_set(err, -EINVAL, "correction bias without noaux_tc routing");
	if ((h->has_expert_bias || h->act == MOE_ACT_SWIGLU_OAI) && h->arch != MOE_ARCH_GPT_OSS)
		return moe_err_set(err, -EINVAL, "expert biases or the clamped SwiGLU outside gpt_oss");
	c->arch = (enum moe_arch)h->arch;
	c->hidden_size = h->hidden_size;
	c->moe_intermediate_size = h->moe_intermediate_size;
	c->num_experts = h->num_experts;
	c->top_k = h->top_k;
	c->num_hidden_layers = h->num_hidden_layers;
	c->n_group = h->n_group;
	c->topk_group = h->topk_group;
	c->n_shared_experts = h->n_shared_experts;
	c->shared_intermediate_size = h->shared_intermediate_size;
	c->scoring = (enum moe_scoring)h->scoring;
	c->topk_method = (enum moe_topk_method)h->topk_method;
	c->norm_topk_prob = h->norm_topk_prob;
	c->shared_gate = h->shared_gate;
	c->has_bias = h->has_bias;
	c->gated = h->gated;
	c->act = (enum moe_act)h->act;
	c->weight_dtype = (enum moe_dtype)h->weight_dtype;
	c->shared_dtype = h->version >= 2 ? (enum moe_dtype)h->shared_dtype : c->weight_dtype;
	c->routed_scaling_factor = h->routed_scaling_factor;
	c->has_expert_bias = h->has_expert_bias;
	c->swiglu_alpha = h->swiglu_alpha;
	c->swiglu_limit = h->swiglu_limit;
	c->q4_group = h->q4_group;
	c->q4_flags = h->q4_flags;
	return moe_model_config_validate(c, err);
}

uint64_t moe_store_expert_align_for(uint64_t expert_bytes)
{
	return expert_bytes >= MOE_STORE_HUGE_ALIGN ? MOE_STORE_HUGE_ALIGN : MOE_STORE_MIN_ALIGN;
}

/* --- reader --------------------------------------------------------------- */

void moe_store_close(struct moe_store *s)
{
	if (!s)
		return;
	if (s->fd >= 0)
		close(s->fd);
	free(s->path);
	free(s->layers);
	free(s->expert_sums);
	free(s);
}

/* Check region [@off, @off + @len) lies inside [@lo, @file_size) and that
 * @off is a multiple of @align; advance *@lo past it.  Regions are laid out
 * in order and never overlap; requiring that catches a layer table pointing
 * two layers at the same bytes. */
static int check_region(const struct moe_store *s, const char *what, uint32_t layer,
			uint64_t off, uint64_t len, uint64_t align, uint64_t *lo, struct moe_err *err)
{
	uint64_t end;

	if (off % align)
		return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 " %s: offset %" PRIu64
				   " is not %" PRIu64 "-aligned", s->path, layer, what, off, align);
	if (off < *lo || moe_add_overflows(off, len, &end) || end > s->hdr.file_size)
		return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 " %s: bytes [%" PRIu64 ", +%" PRIu64
				   ") overlap another region or lie outside the file", s->path, layer,
				   what, off, len);
	*lo = end;
	return 0;
}

static int read_table(struct moe_store *s, const char *what, uint64_t off, uint64_t count,
		      uint64_t elem, uint64_t sum, void **ret, uint64_t *ret_end, struct moe_err *err)
{
	uint64_t bytes, end;
	void *buf;
	int r;

	if (moe_mul_overflows(count, elem, &bytes) || moe_add_overflows(off, bytes, &end) ||
	    off < MOE_STORE_HEADER_SIZE || end > s->hdr.file_size || off % 8)
		return moe_err_set(err, -EINVAL, "%s: %s at offset %" PRIu64 " (%" PRIu64
				   " entries) lies outside the file", s->path, what, off, count);
	if (bytes > SIZE_MAX || !(buf = malloc(bytes ? (size_t)bytes : 1)))
		return moe_err_set(err, -ENOMEM, "%s: %s: out of memory", s->path, what);
	r = pread_full(s->fd, buf, bytes, off);
	if (r < 0) {
		free(buf);
		return moe_err_set(err, r, "%s: reading %s: %s", s->path, what, strerror(-r));
	}
	if (moe_store_checksum(buf, bytes) != sum) {
		uint64_t got = moe_store_checksum(buf, bytes);

		free(buf);
		return moe_err_set(err, -EIO, "%s: %s: checksum mismatch (stored %016" PRIx64
				   ", computed %016" PRIx64 ")", s->path, what, sum, got);
	}
	*ret = buf;
	*ret_end = end;
	return 0;
}

static int validate_layout(struct moe_store *s, struct moe_err *err)
{
	const struct moe_store_header *h = &s->hdr;
	const struct moe_model_config *c = &s->cfg;
	uint64_t stride, lo, tables_end, end1, end2, n_sums, router_bytes, shared_bytes;
	void *p;
	int r;

	if (h->num_moe_layers == 0 || h->num_moe_layers > c->num_hidden_layers)
		return moe_err_set(err, -EINVAL, "%s: num_moe_layers %" PRIu32 " is out of range 1..%" PRIu32,
				   s->path, h->num_moe_layers, c->num_hidden_layers);
	if (h->expert_bytes != moe_expert_bytes(c))
		return moe_err_set(err, -EINVAL, "%s: expert_bytes %" PRIu64 " disagrees with the model (%" PRIu64 ")",
				   s->path, h->expert_bytes, moe_expert_bytes(c));
	if (!is_pow2(h->expert_align) || h->expert_align < MOE_STORE_MIN_ALIGN ||
	    h->expert_align > ((uint64_t)1 << 30))
		return moe_err_set(err, -EINVAL, "%s: expert_align %" PRIu64
				   " is not a power of two in 4096..1 GiB", s->path, h->expert_align);
	if (!moe_align_up(h->expert_bytes, h->expert_align, &stride) || stride != h->expert_stride)
		return moe_err_set(err, -EINVAL, "%s: expert_stride %" PRIu64 " is not expert_bytes %" PRIu64
				   " rounded up to %" PRIu64, s->path, h->expert_stride, h->expert_bytes,
				   h->expert_align);

	n_sums = (uint64_t)h->num_moe_layers * c->num_experts;
	r = read_table(s, "layer table", h->layer_table_offset, h->num_moe_layers,
		       sizeof(struct moe_store_layer), h->layer_table_checksum, &p, &end1, err);
	if (r < 0)
		return r;
	s->layers = p;
	r = read_table(s, "expert checksum table", h->expert_sums_offset, n_sums, sizeof(uint64_t),
		       h->expert_sums_checksum, &p, &end2, err);
	if (r < 0)
		return r;
	s->expert_sums = p;
	/* the tables must not overlap each other */
	if (h->expert_sums_offset < end1 && h->layer_table_offset < end2)
		return moe_err_set(err, -EINVAL, "%s: the layer table and the expert checksum table overlap",
				   s->path);
	tables_end = end1 > end2 ? end1 : end2;

	router_bytes = moe_store_router_bytes(c);
	shared_bytes = moe_shared_bytes(c);
	lo = tables_end;
	for (uint32_t i = 0; i < h->num_moe_layers; i++) {
		const struct moe_store_layer *l = &s->layers[i];
		bool want_shared = c->shared_intermediate_size > 0;
		uint64_t experts_len;

		if (l->layer >= c->num_hidden_layers)
			return moe_err_set(err, -EINVAL, "%s: layer table entry %" PRIu32 ": layer %" PRIu32
					   " is not below num_hidden_layers %" PRIu32, s->path, i,
					   l->layer, c->num_hidden_layers);
		if (i > 0 && l->layer <= s->layers[i - 1].layer)
			return moe_err_set(err, -EINVAL, "%s: layer table entry %" PRIu32 ": layer %" PRIu32
					   " does not follow layer %" PRIu32, s->path, i, l->layer,
					   s->layers[i - 1].layer);
		if (l->flags & ~MOE_STORE_LAYER_HAS_SHARED)
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": unknown flags 0x%" PRIx32,
					   s->path, l->layer, l->flags);
		if (!!(l->flags & MOE_STORE_LAYER_HAS_SHARED) != want_shared)
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": shared expert flag disagrees with the model",
					   s->path, l->layer);
		if (l->router_bytes != router_bytes)
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": router region is %" PRIu64
					   " bytes, the model needs %" PRIu64, s->path, l->layer,
					   l->router_bytes, router_bytes);
		r = check_region(s, "router", l->layer, l->router_offset, l->router_bytes,
				 MOE_STORE_MIN_ALIGN, &lo, err);
		if (r < 0)
			return r;
		if (want_shared) {
			if (l->shared_bytes != shared_bytes)
				return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": shared expert is %" PRIu64
						   " bytes, the model needs %" PRIu64, s->path, l->layer,
						   l->shared_bytes, shared_bytes);
			r = check_region(s, "shared expert", l->layer, l->shared_offset, l->shared_bytes,
					 MOE_STORE_MIN_ALIGN, &lo, err);
			if (r < 0)
				return r;
		} else if (l->shared_offset || l->shared_bytes) {
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": shared expert region without a shared expert",
					   s->path, l->layer);
		}
		if (moe_mul_overflows(stride, c->num_experts, &experts_len))
			return moe_err_set(err, -EINVAL, "%s: layer %" PRIu32 ": experts overflow", s->path, l->layer);
		r = check_region(s, "experts", l->layer, l->experts_offset, experts_len,
				 h->expert_align, &lo, err);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Whether the directory @dirfd holds a checkpoint (config.json and
 * .safetensors files): what a user passes as the store before packing it. */
static bool is_checkpoint_dir(int dirfd)
{
	return faccessat(dirfd, "config.json", F_OK, 0) == 0 &&
	       (faccessat(dirfd, "model.safetensors", F_OK, 0) == 0 ||
		faccessat(dirfd, "model.safetensors.index.json", F_OK, 0) == 0);
}

/* Whether the first bytes of a file, @n of @b, are a .safetensors header:
 * a little-endian length, then the JSON's '{'. */
static bool is_safetensors(const unsigned char *b, size_t n)
{
	return n >= 9 && b[8] == '{' && b[6] == 0 && b[7] == 0;
}

int moe_store_open_file(const char *path, int flags, struct moe_err *err)
{
	struct stat st;
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | flags);
	if (fd < 0)
		return moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	} else if (S_ISDIR(st.st_mode) && is_checkpoint_dir(fd)) {
		r = moe_err_set(err, -EINVAL, "%s: a Hugging Face checkpoint, not a store: pack it first: "
				"moectl pack %s -o STORE.moe", path, path);
	} else if (!S_ISREG(st.st_mode)) {
		r = moe_err_set(err, -EINVAL, "%s: not a regular file (%s); a store must be one", path,
				S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" :
				S_ISSOCK(st.st_mode) ? "a socket" : "a device");
	} else if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		/* io_uring fails a read of an O_NONBLOCK file that would wait */
		r = moe_err_set(err, -errno, "%s: fcntl: %s", path, strerror(errno));
	} else {
		return fd;
	}
	close(fd);
	return r;
}

int moe_store_open(const char *path, struct moe_store **ret, struct moe_err *err)
{
	struct moe_store *s;
	struct stat st;
	uint64_t size;
	ssize_t n;
	int r;

	s = calloc(1, sizeof(*s));
	if (!s || !(s->path = strdup(path))) {
		free(s);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}
	s->fd = moe_store_open_file(path, 0, err);
	if (s->fd < 0) {
		r = s->fd;
		goto fail;
	}
	if (fstat(s->fd, &st) < 0) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	size = (uint64_t)st.st_size;

	/* Read what there is of the header: magic and version first, so that a
	 * file of another kind or version is named as such, not as truncated. */
	do
		n = pread(s->fd, &s->hdr, sizeof(s->hdr), 0);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	if ((size_t)n < sizeof(s->hdr.magic) || memcmp(s->hdr.magic, MOE_STORE_MAGIC, 8)) {
		if (is_safetensors((const unsigned char *)&s->hdr, (size_t)n))
			r = moe_err_set(err, -EINVAL, "%s: a .safetensors file of a checkpoint, not a store: "
					"pack its checkpoint directory first: moectl pack DIR -o STORE.moe", path);
		else
			r = moe_err_set(err, -EINVAL, "%s: not a .moe store (bad magic)", path);
		goto fail;
	}
	if ((size_t)n >= 12 && (s->hdr.version < MOE_STORE_VERSION_MIN ||
				s->hdr.version > MOE_STORE_VERSION)) {
		r = moe_err_set(err, -EPROTO, "%s: store format version %" PRIu32
				", this program reads versions %d to %d (repack the checkpoint)",
				path, s->hdr.version, MOE_STORE_VERSION_MIN, MOE_STORE_VERSION);
		goto fail;
	}
	if ((size_t)n < sizeof(s->hdr)) {
		r = moe_err_set(err, -EINVAL, "%s: truncated store: %" PRIu64 " bytes, shorter than the %d-byte header",
				path, size, MOE_STORE_HEADER_SIZE);
		goto fail;
	}
	if (s->hdr.header_size != MOE_STORE_HEADER_SIZE) {
		r = moe_err_set(err, -EINVAL, "%s: header_size %" PRIu32 ", expected %d", path,
				s->hdr.header_size, MOE_STORE_HEADER_SIZE);
		goto fail;
	}
	if (moe_store_header_checksum(&s->hdr) != s->hdr.header_checksum) {
		r = moe_err_set(err, -EIO, "%s: header checksum mismatch (stored %016" PRIx64
				", computed %016" PRIx64 ")", path, s->hdr.header_checksum,
				moe_store_header_checksum(&s->hdr));
		goto fail;
	}
	if (size < s->hdr.file_size) {
		r = moe_err_set(err, -EIO, "%s: truncated store: %" PRIu64 " bytes on disk, the header says %" PRIu64,
				path, size, s->hdr.file_size);
		goto fail;
	}
	if (size > s->hdr.file_size) {
		r = moe_err_set(err, -EINVAL, "%s: %" PRIu64 " bytes on disk, the header says %" PRIu64
				" (trailing data)", path, size, s->hdr.file_size);
		goto fail;
	}
	r = header_to_config(&s->hdr, &s->cfg, err);
	if (r < 0) {
		moe_err_prefix(err, r, "%s: header", path);
		goto fail;
	}
	r = validate_layout(s, err);
	if (r < 0)
		goto fail;
	*ret = s;
	return 0;
fail:
	moe_store_close(s);
	return r;
}

int moe_store_layer_index(const struct moe_store *s, uint32_t layer)
{
	uint32_t lo = 0, hi = s->hdr.num_moe_layers;

	/* layers are strictly increasing (checked at open) */
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (s->layers[mid].layer == layer)
			return (int)mid;
		if (s->layers[mid].layer < layer)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -ENOENT;
}

uint64_t moe_store_expert_offset(const struct moe_store *s, uint32_t li, uint32_t expert)
{
	return s->layers[li].experts_offset + (uint64_t)expert * s->hdr.expert_stride;
}

static int check_li(const struct moe_store *s, uint32_t li, struct moe_err *err)
{
	if (li >= s->hdr.num_moe_layers)
		return moe_err_set(err, -EINVAL, "%s: layer index %" PRIu32 " is out of range (%" PRIu32 " MoE layers)",
				   s->path, li, s->hdr.num_moe_layers);
	return 0;
}

static int mismatch(const struct moe_store *s, const char *what, uint32_t li,
		    uint64_t stored, uint64_t computed, struct moe_err *err)
{
	return moe_err_set(err, -EIO, "%s: layer %" PRIu32 " %s: checksum mismatch (stored %016" PRIx64
			   ", computed %016" PRIx64 ")", s->path, s->layers[li].layer, what, stored, computed);
}

static int read_error(const struct moe_store *s, const char *what, uint32_t li, int r,
		      struct moe_err *err)
{
	return moe_err_set(err, r, "%s: layer %" PRIu32 " %s: %s", s->path, s->layers[li].layer, what,
			   r == -EIO ? "short read (file changed since it was opened?)" : strerror(-r));
}

/* Read @len bytes at @off into @dst (or, when @dst is NULL, into a scratch
 * buffer) and fold them into the hash state. */
static int read_hash(const struct moe_store *s, XXH3_state_t *st, void *dst, uint64_t len,
		     uint64_t off, uint8_t **scratch)
{
	int r;

	if (dst) {
		r = pread_full(s->fd, dst, len, off);
		if (r < 0)
			return r;
		XXH3_64bits_update(st, dst, (size_t)len);
		return 0;
	}
	if (!*scratch && !(*scratch = malloc(HASH_CHUNK)))
		return -ENOMEM;
	while (len > 0) {
		size_t n = len > HASH_CHUNK ? HASH_CHUNK : (size_t)len;

		r = pread_full(s->fd, *scratch, n, off);
		if (r < 0)
			return r;
		XXH3_64bits_update(st, *scratch, n);
		off += n;
		len -= n;
	}
	return 0;
}

int moe_store_read_router(const struct moe_store *s, uint32_t li, float *router,
			  float *bias, float *shared_gate, struct moe_err *err)
{
	const struct moe_model_config *c = &s->cfg;
	uint64_t off, n_router = (uint64_t)c->num_experts * c->hidden_size * sizeof(float);
	uint8_t *scratch = NULL;
	XXH3_state_t *st;
	uint64_t got;
	int r;

	r = check_li(s, li, err);
	if (r < 0)
		return r;
	st = XXH3_createState();
	if (!st)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", s->path);
	XXH3_64bits_reset(st);
	off = s->layers[li].router_offset;
	r = read_hash(s, st, router, n_router, off, &scratch);
	off += n_router;
	if (r == 0 && c->has_bias) {
		r = read_hash(s, st, bias, (uint64_t)c->num_experts * sizeof(float), off, &scratch);
		off += (uint64_t)c->num_experts * sizeof(float);
	}
	if (r == 0 && c->shared_gate)
		r = read_hash(s, st, shared_gate, (uint64_t)c->hidden_size * sizeof(float), off, &scratch);
	got = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	free(scratch);
	if (r < 0)
		return read_error(s, "router", li, r, err);
	if (got != s->layers[li].router_checksum)
		return mismatch(s, "router", li, s->layers[li].router_checksum, got, err);
	return 0;
}

int moe_store_read_shared(const struct moe_store *s, uint32_t li, void *buf, struct moe_err *err)
{
	const struct moe_store_layer *l;
	uint64_t got;
	int r;

	r = check_li(s, li, err);
	if (r < 0)
		return r;
	l = &s->layers[li];
	if (!(l->flags & MOE_STORE_LAYER_HAS_SHARED))
		return moe_err_set(err, -ENOENT, "%s: layer %" PRIu32 " has no shared expert", s->path, l->layer);
	r = pread_full(s->fd, buf, l->shared_bytes, l->shared_offset);
	if (r < 0)
		return read_error(s, "shared expert", li, r, err);
	got = moe_store_checksum(buf, l->shared_bytes);
	if (got != l->shared_checksum)
		return mismatch(s, "shared expert", li, l->shared_checksum, got, err);
	return 0;
}

int moe_store_check_expert(const struct moe_store *s, uint32_t li, uint32_t expert,
			   const void *buf, struct moe_err *err)
{
	uint64_t stored, got;
	char what[32];
	int r;

	r = check_li(s, li, err);
	if (r < 0)
		return r;
	if (expert >= s->cfg.num_experts)
		return moe_err_set(err, -EINVAL, "%s: expert %" PRIu32 " is out of range (%" PRIu32 " experts)",
				   s->path, expert, s->cfg.num_experts);
	stored = s->expert_sums[(uint64_t)li * s->cfg.num_experts + expert];
	got = moe_store_checksum(buf, s->hdr.expert_bytes);
	if (got != stored) {
		snprintf(what, sizeof(what), "expert %" PRIu32, expert);
		return mismatch(s, what, li, stored, got, err);
	}
	return 0;
}

int moe_store_read_expert(const struct moe_store *s, uint32_t li, uint32_t expert,
			  void *buf, struct moe_err *err)
{
	char what[32];
	int r;

	r = check_li(s, li, err);
	if (r < 0)
		return r;
	if (expert >= s->cfg.num_experts)
		return moe_err_set(err, -EINVAL, "%s: expert %" PRIu32 " is out of range (%" PRIu32 " experts)",
				   s->path, expert, s->cfg.num_experts);
	r = pread_full(s->fd, buf, s->hdr.expert_bytes, moe_store_expert_offset(s, li, expert));
	if (r < 0) {
		snprintf(what, sizeof(what), "expert %" PRIu32, expert);
		return read_error(s, what, li, r, err);
	}
	return moe_store_check_expert(s, li, expert, buf, err);
}

/* Hash [@off, @off + @len) with @buf (HASH_CHUNK bytes) as scratch. */
static int hash_range(const struct moe_store *s, uint8_t *buf, XXH3_state_t *st, uint64_t off,
		      uint64_t len, uint64_t *done, uint64_t total,
		      void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		      uint64_t *ret)
{
	int r;

	XXH3_64bits_reset(st);
	while (len > 0) {
		size_t n = len > HASH_CHUNK ? HASH_CHUNK : (size_t)len;

		r = pread_full(s->fd, buf, n, off);
		if (r < 0)
			return r;
		XXH3_64bits_update(st, buf, n);
		off += n;
		len -= n;
		*done += n;
		if (progress)
			progress(ctx, *done, total);
	}
	*ret = XXH3_64bits_digest(st);
	return 0;
}

int moe_store_verify(const struct moe_store *s,
		     void (*on_bad)(void *ctx, const char *msg),
		     void (*progress)(void *ctx, uint64_t done, uint64_t total),
		     void *ctx, struct moe_err *err)
{
	const struct moe_store_header *h = &s->hdr;
	uint64_t total = 0, done = 0, got;
	XXH3_state_t *st;
	uint8_t *buf;
	int bad = 0, r = 0;

	for (uint32_t li = 0; li < h->num_moe_layers; li++)
		total += s->layers[li].router_bytes + s->layers[li].shared_bytes +
			 h->expert_bytes * s->cfg.num_experts;
	buf = malloc(HASH_CHUNK);
	st = XXH3_createState();
	if (!buf || !st) {
		free(buf);
		XXH3_freeState(st);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", s->path);
	}

#define CHECK_ONE(what_fmt, ...) do {                                            \
		if (got != stored) {                                             \
			char msg_[MOE_ERR_MSG_MAX], what_[64];                   \
			snprintf(what_, sizeof(what_), what_fmt, __VA_ARGS__);   \
			bad++;                                                   \
			if (on_bad) {                                            \
				struct moe_err e_;                               \
				mismatch(s, what_, li, stored, got, &e_);        \
				snprintf(msg_, sizeof(msg_), "%s", e_.msg);      \
				on_bad(ctx, msg_);                               \
			}                                                        \
		}                                                                \
	} while (0)

	for (uint32_t li = 0; li < h->num_moe_layers && r == 0; li++) {
		const struct moe_store_layer *l = &s->layers[li];
		uint64_t stored;

		r = hash_range(s, buf, st, l->router_offset, l->router_bytes, &done, total,
			       progress, ctx, &got);
		if (r < 0) {
			r = read_error(s, "router", li, r, err);
			break;
		}
		stored = l->router_checksum;
		CHECK_ONE("%s", "router");
		if (l->flags & MOE_STORE_LAYER_HAS_SHARED) {
			r = hash_range(s, buf, st, l->shared_offset, l->shared_bytes, &done, total,
				       progress, ctx, &got);
			if (r < 0) {
				r = read_error(s, "shared expert", li, r, err);
				break;
			}
			stored = l->shared_checksum;
			CHECK_ONE("%s", "shared expert");
		}
		for (uint32_t j = 0; j < s->cfg.num_experts; j++) {
			r = hash_range(s, buf, st, moe_store_expert_offset(s, li, j), h->expert_bytes,
				       &done, total, progress, ctx, &got);
			if (r < 0) {
				char what[32];

				snprintf(what, sizeof(what), "expert %" PRIu32, j);
				r = read_error(s, what, li, r, err);
				break;
			}
			stored = s->expert_sums[(uint64_t)li * s->cfg.num_experts + j];
			CHECK_ONE("expert %" PRIu32, j);
		}
	}
#undef CHECK_ONE
	free(buf);
	XXH3_freeState(st);
	return r < 0 ? r : bad;
}

uint64_t moe_store_blob_count(const struct moe_store *s)
{
	uint64_t per_layer = 1 + (uint64_t)s->cfg.num_experts + (s->cfg.shared_intermediate_size ? 1 : 0);

	return per_layer * s->hdr.num_moe_layers;
}

struct first_bad {
	char msg[MOE_ERR_MSG_MAX];
	int n;
};

static void note_bad(void *ctx, const char *msg)
{
	struct first_bad *b = ctx;

	if (b->n++ == 0)
		snprintf(b->msg, sizeof(b->msg), "%s", msg);
}

int moe_store_verify_all(const struct moe_store *s, struct moe_err *err)
{
	struct first_bad b = { .n = 0 };
	int r = moe_store_verify(s, note_bad, NULL, &b, err);

	if (r < 0)
		return r;
	if (r > 0)
		return moe_err_set(err, -EIO, "%s (%d damaged blob%s of %" PRIu64 "; moectl verify lists them)",
				   b.msg, r, r == 1 ? "" : "s", moe_store_blob_count(s));
	return 0;
}

int moe_store_reopen(struct moe_store *s, bool verify, struct moe_err *err)
{
	uint64_t nsums = (uint64_t)s->hdr.num_moe_layers * s->cfg.num_experts;
	struct moe_store *n;
	int r;

	r = moe_store_open(s->path, &n, err);
	if (r < 0)
		return r;
	/* the same store, byte for byte in what describes it: then every expert
	 * the engine holds in memory is still the file's, and nothing but the
	 * descriptor needs to change */
	if (memcmp(&n->hdr, &s->hdr, sizeof(s->hdr)) != 0 ||
	    memcmp(n->layers, s->layers, s->hdr.num_moe_layers * sizeof(*s->layers)) != 0 ||
	    memcmp(n->expert_sums, s->expert_sums, nsums * sizeof(*s->expert_sums)) != 0) {
		moe_store_close(n);
		return moe_err_set(err, -ESTALE, "%s: the file there now is another store (its header or tables "
				   "differ from the one in use): restart to serve it", s->path);
	}
	if (verify) {
		r = moe_store_verify_all(n, err);
		if (r < 0) {
			moe_store_close(n);
			return r;
		}
	}
	/* atomic for every thread that reads through s->fd */
	if (dup3(n->fd, s->fd, O_CLOEXEC) < 0) {
		r = moe_err_set(err, -errno, "%s: dup3: %s", s->path, strerror(errno));
		moe_store_close(n);
		return r;
	}
	moe_store_close(n);
	return 0;
}
