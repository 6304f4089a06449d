/* SPDX-License-Identifier: MIT */
/*
 * safetensors files: reader (headers parsed with jansson) and writer.
 * Format: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}, ...,
 *  "__metadata__": {...}}, then the data; offsets relative to the data.
 */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include <stdint.h>

#include "engine/dtype.h"
#include "engine/err.h"

#define MOE_ST_MAX_DIMS 8

struct moe_st_tensor {
	char *name;
	char st_dtype[16];        /* dtype string as in the header ("BF16", "F8_E4M3"...) */
	int dtype;                /* enum moe_dtype, or -1 when not one we serve */
	uint32_t ndim;
	uint64_t shape[MOE_ST_MAX_DIMS];
	uint64_t offset;          /* absolute file offset of the data */
	uint64_t nbytes;
	uint32_t file;            /* index into the checkpoint's files */
};

struct moe_st_file {
	char *path;
	int fd;
	uint64_t size;
};

/* A checkpoint: one model.safetensors, or the shards that
 * model.safetensors.index.json names. */
struct moe_st_checkpoint {
	char *dir;
	uint32_t n_files;
	struct moe_st_file *files;
	size_t n_tensors;
	struct moe_st_tensor *tensors;   /* sorted by name */
};

/*
 * Open the checkpoint in directory @dir: model.safetensors.index.json if
 * present (every shard it names is opened and its header parsed, and every
 * tensor must be in the shard the index says), else model.safetensors.
 * Validates every header: JSON, dtypes and shapes against data_offsets,
 * offsets inside the file (a truncated file is named), no two tensors
 * sharing bytes, no name twice.  Tensors of dtypes moed does not serve are
 * kept (dtype -1, st_dtype as written).  Returns 0 and *ret (free with
 * moe_st_checkpoint_close), or a negative errno and a message that names
 * the file (DIR/NAME) and the tensor or field; -ENOENT when @dir has
 * neither file.  The files stay open for moe_st_read.
 */
int moe_st_checkpoint_open(const char *dir, struct moe_st_checkpoint **ret, struct moe_err *err);

/* Open a single safetensors file as a checkpoint of one file (dir is the
 * file's directory); same checks and returns as moe_st_checkpoint_open. */
int moe_st_file_open(const char *path, struct moe_st_checkpoint **ret, struct moe_err *err);

/* Close the files and free @c; NULL is fine. */
void moe_st_checkpoint_close(struct moe_st_checkpoint *c);

/* The tensor called @name (binary search), or NULL. */
const struct moe_st_tensor *moe_st_find(const struct moe_st_checkpoint *c, const char *name);

/* Read @len bytes at @off inside tensor @t into @buf; -EINVAL when the
 * range is outside the tensor, -EIO naming file and tensor on a short read
 * (the file shrank after opening).  Thread-safe (pread). */
int moe_st_read(const struct moe_st_checkpoint *c, const struct moe_st_tensor *t,
		uint64_t off, void *buf, uint64_t len, struct moe_err *err);

/*
 * Writer: declare every tensor, then write their data in declaration order.
 * The file is the one the official writer makes: header with
 * "__metadata__": {"format": "pt"}, padded with spaces to a multiple of 8,
 * data packed in declaration order.  Errors name the file (and tensor).
 */
struct moe_st_writer;

/* Create (truncate) @path; 0 and *ret, or -errno. */
int moe_st_writer_new(const char *path, struct moe_st_writer **ret, struct moe_err *err);
/* Declare a tensor; returns its index (>= 0) or -EINVAL (bad dtype or name,
 * more than MOE_ST_MAX_DIMS dims, size overflow, header already written).
 * Shapes are row-major; @shape may be NULL when @ndim is 0. */
int moe_st_writer_declare(struct moe_st_writer *w, const char *name, enum moe_dtype dtype,
			  uint32_t ndim, const uint64_t *shape, struct moe_err *err);

/* The same for an integer tensor ("I32" or "I64"): int4 checkpoints'
 * packed codes, g_idx and weight_shape. */
int moe_st_writer_declare_int(struct moe_st_writer *w, const char *name, const char *st_dtype,
			      uint32_t ndim, const uint64_t *shape, struct moe_err *err);
/* Write the header; after it, the tensors' data in declaration order. */
int moe_st_writer_begin(struct moe_st_writer *w, struct moe_err *err);
/* Append @len bytes of the data (any split: pieces may cross tensors).
 * Writes of 4 MB or more go straight to the file; smaller ones are
 * gathered.  -EINVAL past the declared total. */
int moe_st_writer_write(struct moe_st_writer *w, const void *data, uint64_t len, struct moe_err *err);
/* Check every declared byte was written, flush, close; frees @w.  On any
 * error the incomplete file is removed. */
int moe_st_writer_finish(struct moe_st_writer *w, struct moe_err *err);
/* Remove the file and free @w; NULL is fine. */
void moe_st_writer_abort(struct moe_st_writer *w);

#endif
