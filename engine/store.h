/* SPDX-License-Identifier: MIT */
/*
 * The .moe model store: moed's own file format, built for paging experts
 * with O_DIRECT reads.  Written by `moectl pack`, documented in moe-store(5).
 *
 * Layout (all integers little-endian, all offsets absolute, 64-bit):
 *
 *   [0, 4096)            struct moe_store_header
 *   [4096, ...)          layer table: num_moe_layers x struct moe_store_layer
 *                        expert checksum table: num_moe_layers x num_experts
 *                        uint64 XXH3-64 values (layer-major)
 *   then per MoE layer, in layer order:
 *     router region      (4096-aligned) float32 router [E][H]; then float32
 *                        bias [E] if has_bias (deepseek_v3/glm4_moe's
 *                        correction bias, gpt_oss's router bias); then float32
 *                        shared-expert gate [H] if shared_gate
 *     shared blob        (4096-aligned, only with shared experts) gate [Is][H],
 *                        up [Is][H], down [H][Is] in the shared dtype
 *                        (no gate when !gated)
 *     experts            (expert_align-aligned) expert j at
 *                        experts_offset + j * expert_stride: gate [I][H],
 *                        up [I][H], down [H][I] in the weight dtype, rows
 *                        contiguous (no gate when !gated); with
 *                        has_expert_bias (gpt_oss), zero padding to 16 bytes
 *                        and float32 biases gate [I], up [I], down [H];
 *                        zero padding to expert_stride.
 *   Each matrix is moe_matrix_bytes() long (model.h): for FP8 its codes and
 *   then its float32 block scales, each part padded to 64 bytes.  Expert
 *   biases with FP8 weights are refused (not a released format).
 *
 * Checksums are XXH3-64 (seed 0): the header's over its 4096 bytes with
 * header_checksum zeroed; each table's over the table; the router region's
 * and each blob's over its unpadded bytes.  The router is always float32 (a
 * bf16/fp16 router converts exactly) so logits are computed in float32.
 */
#ifndef MOE_STORE_H
#define MOE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"

#define MOE_STORE_MAGIC "MOESTOR1"     /* 8 bytes, no NUL */
/*
 * Version 2 adds the header's shared_dtype.  A writer writes version 1
 * whenever a version-1 reader would read the file right (the shared
 * expert's dtype is the routed experts'; an FP8 store of version 1 is
 * refused by such a reader for its unknown weight_dtype 3) and version 2
 * only when the shared expert's dtype differs, which a version-1 reader
 * would misread.  Readers take both.
 */
#define MOE_STORE_VERSION 2            /* the newest version this program reads and writes */
#define MOE_STORE_VERSION_MIN 1        /* the oldest it reads */
#define MOE_STORE_HEADER_SIZE 4096
#define MOE_STORE_MIN_ALIGN 4096u      /* O_DIRECT-safe on every device we know */
#define MOE_STORE_HUGE_ALIGN (2u << 20) /* experts of >= 2 MiB: huge-page aligned */

struct moe_store_header {
	char magic[8];                  /* MOE_STORE_MAGIC */
	uint32_t version;               /* MOE_STORE_VERSION */
	uint32_t header_size;           /* MOE_STORE_HEADER_SIZE */
	uint64_t file_size;             /* whole file; shorter on disk = truncated */
	uint64_t header_checksum;       /* XXH3-64 of the header, this field 0 */

	/* the model (struct moe_model_config) */
	char model_type[32];            /* NUL-terminated, e.g. "deepseek_v3" */
	uint32_t arch;                  /* enum moe_arch */
	uint32_t hidden_size;
	uint32_t moe_intermediate_size;
	uint32_t num_experts;
	uint32_t top_k;
	uint32_t num_hidden_layers;
	uint32_t n_group;
	uint32_t topk_group;
	uint32_t n_shared_experts;
	uint32_t shared_intermediate_size;
	uint32_t scoring;               /* enum moe_scoring */
	uint32_t topk_method;           /* enum moe_topk_method */
	uint32_t norm_topk_prob;        /* 0/1 */
	uint32_t shared_gate;           /* 0/1 */
	uint32_t has_bias;              /* 0/1 */
	uint32_t gated;                 /* 0/1 */
	uint32_t act;                   /* enum moe_act */
	uint32_t weight_dtype;          /* enum moe_dtype */
	float routed_scaling_factor;
	uint32_t num_moe_layers;

	/* layout */
	uint64_t expert_align;          /* 4096, or 2 MiB for experts >= 2 MiB */
	uint64_t expert_bytes;          /* unpadded bytes of one expert */
	uint64_t expert_stride;         /* expert_bytes rounded up to expert_align */
	uint64_t layer_table_offset;
	uint64_t layer_table_checksum;
	uint64_t expert_sums_offset;    /* uint64[num_moe_layers * num_experts] */
	uint64_t expert_sums_checksum;

	char source[512];               /* checkpoint directory pack read (info) */
	char source_dtype[8];           /* checkpoint dtype of the experts (info) */
	uint32_t shared_dtype;          /* enum moe_dtype of the shared expert; version 2
					 * (version 1: weight_dtype's, whatever is here) */

	/*
	 * gpt_oss (taken from the reserved space, no new version: only
	 * arch 7 with act 4 sets them, and a reader that predates them
	 * refuses both numbers; 0 in every other store)
	 */
	uint32_t has_expert_bias;       /* 0/1: expert blobs end in float32 biases */
	float swiglu_alpha;             /* act swiglu_oai: sigmoid gain */
	float swiglu_limit;             /* act swiglu_oai: the clamp */
	/*
	 * MOE_DTYPE_INT4 (the same way: only a store with an int4 weight or
	 * shared dtype sets them, which an older reader refuses; 0 otherwise)
	 */
	uint32_t q4_group;              /* group size along K; 0: one group per row */
	uint32_t q4_flags;              /* MOE_Q4_* (model.h) */
	/*
	 * The fingerprint of the checkpoint directory pack read (the raw
	 * bytes of moe_checkpoint_fingerprint(3), big-endian XXH3-128), or
	 * all zero: none recorded.  Taken from the reserved space with no new
	 * version: a reader that predates it ignores it, as it did the zero
	 * bytes there, and the header checksum covers it either way.
	 */
	uint8_t source_fingerprint[16];
	uint8_t reserved[4096 - 8 - 4 - 4 - 8 - 8 - 32 - 20 * 4 - 8 * 7 - 512 - 8 - 4 - 3 * 4 - 2 * 4 - 16];
};
_Static_assert(sizeof(struct moe_store_header) == MOE_STORE_HEADER_SIZE, "store header is 4096 bytes");
/* the offsets moe-store(5) gives: FP8's shared_dtype, then gpt_oss's fields */
_Static_assert(offsetof(struct moe_store_header, shared_dtype) == 720, "shared_dtype at 720");
_Static_assert(offsetof(struct moe_store_header, has_expert_bias) == 724, "has_expert_bias at 724");
_Static_assert(offsetof(struct moe_store_header, swiglu_alpha) == 728, "swiglu_alpha at 728");
_Static_assert(offsetof(struct moe_store_header, swiglu_limit) == 732, "swiglu_limit at 732");
_Static_assert(offsetof(struct moe_store_header, q4_group) == 736, "q4_group at 736");
_Static_assert(offsetof(struct moe_store_header, q4_flags) == 740, "q4_flags at 740");
_Static_assert(offsetof(struct moe_store_header, source_fingerprint) == 744, "source_fingerprint at 744");
_Static_assert(offsetof(struct moe_store_header, reserved) == 760, "reserved from 760");

#define MOE_STORE_LAYER_HAS_SHARED (1u << 0)

struct moe_store_layer {
	uint32_t layer;                 /* the checkpoint's layer number L */
	uint32_t flags;                 /* MOE_STORE_LAYER_* */
	uint64_t router_offset;         /* router region, 4096-aligned */
	uint64_t router_bytes;
	uint64_t router_checksum;
	uint64_t shared_offset;         /* 0 when no shared expert */
	uint64_t shared_bytes;
	uint64_t shared_checksum;
	uint64_t experts_offset;        /* expert_align-aligned */
	uint8_t reserved[64];
};
_Static_assert(sizeof(struct moe_store_layer) == 128, "store layer entry is 128 bytes");

/* An open store.  Fields are read-only for users. */
struct moe_store {
	int fd;
	char *path;
	struct moe_store_header hdr;
	struct moe_model_config cfg;
	struct moe_store_layer *layers;     /* hdr.num_moe_layers entries */
	uint64_t *expert_sums;              /* num_moe_layers * num_experts */
};

/*
 * Open and validate a store: magic, version, header and table checksums,
 * every offset and size inside the file, model fields (validate).  Blob
 * checksums are checked when blobs are read, or by moe_store_verify().
 * Errors name the file and what is wrong.
 */
int moe_store_open(const char *path, struct moe_store **ret, struct moe_err *err);

/*
 * Open @path read-only with @flags (O_DIRECT, or 0) added, for a store: a
 * FIFO or device there is refused naming the path (opened with O_NONBLOCK
 * first, so that nothing at the path can make open() wait).  The fd, or a
 * negative errno.
 */
int moe_store_open_file(const char *path, int flags, struct moe_err *err);

/* Close a store; NULL is fine. */
void moe_store_close(struct moe_store *s);

/* Index of checkpoint layer @layer in s->layers, or -ENOENT. */
int moe_store_layer_index(const struct moe_store *s, uint32_t layer);

/*
 * Read the router region of layer index @li: router [E*H] float32 (required),
 * bias [E] (has_bias), shared gate [H] (shared_gate); pointers for absent
 * parts may be NULL.  Verifies the checksum: -EIO with layer named.
 */
int moe_store_read_router(const struct moe_store *s, uint32_t li, float *router,
			  float *bias, float *shared_gate, struct moe_err *err);

/* Read the shared expert blob of layer index @li (shared_bytes) into @buf;
 * verifies the checksum (-EIO). */
int moe_store_read_shared(const struct moe_store *s, uint32_t li, void *buf, struct moe_err *err);

/* Read expert @expert of layer index @li (expert_bytes) into @buf; verifies
 * its checksum: -EIO naming layer and expert on mismatch or short read. */
int moe_store_read_expert(const struct moe_store *s, uint32_t li, uint32_t expert,
			  void *buf, struct moe_err *err);

/* Absolute file offset of expert @expert of layer index @li (no checks: the
 * caller keeps li < num_moe_layers and expert < num_experts).  The blob is
 * expert_bytes long, padded with zeros to expert_stride; offset and stride
 * are multiples of expert_align, so one O_DIRECT read of expert_stride
 * bytes brings it in. */
uint64_t moe_store_expert_offset(const struct moe_store *s, uint32_t li, uint32_t expert);

/* Verify the checksum of expert @expert of layer index @li already in @buf
 * (its first expert_bytes bytes), e.g. after an O_DIRECT read by the pager.
 * 0, or -EIO naming the store, layer and expert. */
int moe_store_check_expert(const struct moe_store *s, uint32_t li, uint32_t expert,
			   const void *buf, struct moe_err *err);

/* XXH3-64 (seed 0) of @len bytes: the checksum every part of a store uses. */
uint64_t moe_store_checksum(const void *buf, uint64_t len);

/* The expert_align a writer picks for experts of @expert_bytes. */
uint64_t moe_store_expert_align_for(uint64_t expert_bytes);

/* For the writer (formats/storewrite.c): the layout rules that reader and
 * writer must agree on. */
/* Bytes of a layer's router region (router, correction bias, shared gate). */
uint64_t moe_store_router_bytes(const struct moe_model_config *cfg);
/* The header's model fields from @cfg (layout and checksum fields
 * untouched), and the version these need (MOE_STORE_VERSION comment). */
void moe_store_header_from_config(const struct moe_model_config *cfg, struct moe_store_header *h);
/* The header's checksum: XXH3-64 of the header with header_checksum zero. */
uint64_t moe_store_header_checksum(const struct moe_store_header *h);

/* Number of checksummed blobs (routers, shared experts, experts). */
uint64_t moe_store_blob_count(const struct moe_store *s);

/*
 * Check every checksum in the file.  @on_bad (may be NULL) is called with a
 * one-line message for each bad blob; @progress (may be NULL) with bytes
 * done and total.  Returns the number of bad blobs (0: all good) or a
 * negative errno when the file cannot be read.
 */
int moe_store_verify(const struct moe_store *s,
		     void (*on_bad)(void *ctx, const char *msg),
		     void (*progress)(void *ctx, uint64_t done, uint64_t total),
		     void *ctx, struct moe_err *err);

/*
 * Every checksum, as moe_store_verify(), as one result: 0, or -EIO naming
 * the first damaged blob (layer and expert) and how many there are, or
 * the read error.  store.verify = "open" (moed.conf(5)).
 */
int moe_store_verify_all(const struct moe_store *s, struct moe_err *err);

/*
 * Open the file now at s->path and, if it is the store @s describes (the
 * same header, layer table and expert checksums) and whole (moe_store_open's
 * checks; with @verify, every checksum too), make s->fd refer to it,
 * atomically (dup3).  For a store truncated or damaged under a running
 * reader and then written whole again.  -ESTALE if the file holds another
 * store; moe_store_open's errors otherwise; @s is unchanged on error.
 */
int moe_store_reopen(struct moe_store *s, bool verify, struct moe_err *err);

/* Writer (formats/storewrite.c, not in the engine: moed never writes a
 * store), used by pack and the tests.  Offsets are all computed at open. */
struct moe_store_writer;

/*
 * Create @path (written under a temporary of its own in the same directory,
 * renamed into place by finish: see formats/outfile.h) for @cfg with the
 * MoE layers @layers[0..n_layers).  @source is recorded as information.
 */
int moe_store_writer_open(const char *path, const struct moe_model_config *cfg,
			  uint32_t n_layers, const uint32_t *layers,
			  const char *source, const char *source_dtype,
			  struct moe_store_writer **ret, struct moe_err *err);

/* Router of layer index @li: router [E*H], bias [E] or NULL, shared gate [H] or NULL. */
int moe_store_writer_put_router(struct moe_store_writer *w, uint32_t li, const float *router,
				const float *bias, const float *shared_gate, struct moe_err *err);

/* Record the 16 raw bytes of the source checkpoint's fingerprint (the
 * header's source_fingerprint; none is recorded unless this is called). */
void moe_store_writer_set_fingerprint(struct moe_store_writer *w, const uint8_t fingerprint[16]);

/* Shared expert blob (moe_shared_bytes) of layer index @li. */
int moe_store_writer_put_shared(struct moe_store_writer *w, uint32_t li, const void *blob,
				struct moe_err *err);

/* Routed expert blob (moe_expert_bytes) of layer index @li, expert @expert. */
int moe_store_writer_put_expert(struct moe_store_writer *w, uint32_t li, uint32_t expert,
				const void *blob, struct moe_err *err);

/* Write the tables and header, fsync, rename into place, fsync the
 * directory, then open the store now at the path as moed would (header,
 * tables, size).  Fails with -EINVAL if any part was not put.  Frees @w in
 * every case. */
int moe_store_writer_finish(struct moe_store_writer *w, struct moe_err *err);

/* Give up: remove the temporary file and free @w; NULL is fine. */
void moe_store_writer_abort(struct moe_store_writer *w);

#endif
