/* SPDX-License-Identifier: MIT */
/*
 * safetensors reader and writer.
 *
 * The reader trusts nothing in a file: every size and offset is checked with
 * overflow-safe arithmetic before it is used, and every message names the
 * file and the tensor or field at fault, because the person reading it has a
 * directory of multi-GB shards and needs to know which one is broken.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "engine/io.h"
#include "safetensors.h"

/* The official implementation refuses headers above 100 MB; a real header
 * (DeepSeek-V3's largest shard) is well under 1 MB. */
#define ST_MAX_HEADER (100u * 1000u * 1000u)

#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

/* Element sizes in bits of every dtype the safetensors format defines; the
 * sub-byte float formats are packed. */
static const struct {
	const char *name;
	unsigned bits;
	int dtype;            /* enum moe_dtype or -1 */
} st_dtypes[] = {
	{ "F64", 64, -1 },     { "F32", 32, MOE_DTYPE_F32 }, { "F16", 16, MOE_DTYPE_F16 },
	{ "BF16", 16, MOE_DTYPE_BF16 }, { "I64", 64, -1 }, { "I32", 32, -1 },
	{ "I16", 16, -1 },     { "I8", 8, -1 },     { "U64", 64, -1 },  { "U32", 32, -1 },
	{ "U16", 16, -1 },     { "U8", 8, -1 },     { "BOOL", 8, -1 },  { "F8_E4M3", 8, -1 },
	{ "F8_E5M2", 8, -1 },  { "F8_E8M0", 8, -1 }, { "E8M0", 8, -1 }, { "F6_E2M3", 6, -1 },
	{ "F6_E3M2", 6, -1 },  { "F4", 4, -1 },     { "C64", 64, -1 },
};

/* ---------------------------------------------------------------- reader */

static int ckpt_add_file(struct moe_st_checkpoint *c, const char *path, struct moe_err *err)
{
	struct moe_st_file *files, *f;
	struct stat st;
	int fd;

	files = realloc(c->files, (c->n_files + 1) * sizeof(*files));
	if (!files)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	c->files = files;
	f = &files[c->n_files];
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		int r = -errno;

		close(fd);
		return moe_err_set(err, r, "%s: %s", path, strerror(-r));
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return moe_err_set(err, -EINVAL, "%s: not a regular file", path);
	}
	f->path = strdup(path);
	if (!f->path) {
		close(fd);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}
	f->fd = fd;
	f->size = (uint64_t)st.st_size;
	c->n_files++;
	return 0;
}

static int st_dtype_lookup(const char *name, unsigned *ret_bits, int *ret_dtype)
{
	for (size_t i = 0; i < sizeof(st_dtypes) / sizeof(st_dtypes[0]); i++)
		if (!strcmp(name, st_dtypes[i].name)) {
			*ret_bits = st_dtypes[i].bits;
			*ret_dtype = st_dtypes[i].dtype;
			return 0;
		}
	return -ENOENT;
}

/* A JSON integer in [0, INT64_MAX]; -EINVAL otherwise. */
static int json_u64(const json_t *v, uint64_t *ret)
{
	json_int_t i;

	if (!json_is_integer(v))
		return -EINVAL;
	i = json_integer_value(v);
	if (i < 0)
		return -EINVAL;
	*ret = (uint64_t)i;
	return 0;
}

/* Parse one tensor entry of the header of file @fi into @t (name set by caller). */
static int parse_tensor(const char *path, const char *name, json_t *obj, uint64_t data_start,
			uint64_t file_size, struct moe_st_tensor *t, struct moe_err *err)
{
	json_t *jd, *js, *jo, *v;
	const char *ds;
	uint64_t n_elem = 1, bits_total, b, e, abs_end;
	unsigned bits = 0;
	size_t i;

	if (!json_is_object(obj))
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': entry is not a JSON object", path, name);
	jd = json_object_get(obj, "dtype");
	if (!json_is_string(jd))
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': missing or non-string 'dtype'", path, name);
	ds = json_string_value(jd);
	if (strlen(ds) == 0 || strlen(ds) >= sizeof(t->st_dtype))
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': invalid dtype '%.32s'", path, name, ds);
	memcpy(t->st_dtype, ds, strlen(ds) + 1);
	if (st_dtype_lookup(ds, &bits, &t->dtype) < 0) {
		t->dtype = -1;   /* unknown to us: kept, its size cannot be checked */
		bits = 0;
	}

	js = json_object_get(obj, "shape");
	if (!json_is_array(js))
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': missing or non-array 'shape'", path, name);
	if (json_array_size(js) > MOE_ST_MAX_DIMS)
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': shape has %zu dimensions (at most %d)",
				   path, name, json_array_size(js), MOE_ST_MAX_DIMS);
	t->ndim = (uint32_t)json_array_size(js);
	json_array_foreach(js, i, v) {
		if (json_u64(v, &t->shape[i]) < 0)
			return moe_err_set(err, -EINVAL,
					   "%s: tensor '%s': shape[%zu] is not a non-negative integer",
					   path, name, i);
		if (__builtin_mul_overflow(n_elem, t->shape[i], &n_elem))
			return moe_err_set(err, -EINVAL, "%s: tensor '%s': shape overflows 64 bits",
					   path, name);
	}

	jo = json_object_get(obj, "data_offsets");
	if (!json_is_array(jo) || json_array_size(jo) != 2 ||
	    json_u64(json_array_get(jo, 0), &b) < 0 || json_u64(json_array_get(jo, 1), &e) < 0)
		return moe_err_set(err, -EINVAL,
				   "%s: tensor '%s': 'data_offsets' must be two non-negative integers",
				   path, name);
	if (b > e)
		return moe_err_set(err, -EINVAL,
				   "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] end before they begin",
				   path, name, b, e);
	if (bits) {
		if (__builtin_mul_overflow(n_elem, (uint64_t)bits, &bits_total))
			return moe_err_set(err, -EINVAL, "%s: tensor '%s': size overflows 64 bits",
					   path, name);
		if (bits_total % 8 || bits_total / 8 != e - b)
			return moe_err_set(err, -EINVAL,
					   "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] hold %" PRIu64
					   " bytes but shape and dtype %s need %" PRIu64 "%s",
					   path, name, b, e, e - b, ds, bits_total / 8,
					   bits_total % 8 ? " and a fraction" : "");
	}
	if (__builtin_add_overflow(data_start, e, &abs_end) || abs_end > file_size)
		return moe_err_set(err, -EINVAL,
				   "%s: truncated: tensor '%s' ends at byte %" PRIu64 " but the file has %" PRIu64
				   " bytes", path, name, data_start + e, file_size);
	t->offset = data_start + b;
	t->nbytes = e - b;
	return 0;
}

static int cmp_offset(const void *a, const void *b)
{
	const struct moe_st_tensor *x = *(const struct moe_st_tensor *const *)a;
	const struct moe_st_tensor *y = *(const struct moe_st_tensor *const *)b;

	return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Two tensors sharing bytes mean a corrupt or hand-edited header: reading
 * either would silently return the other's weights. */
static int check_overlap(const char *path, struct moe_st_tensor *ts, size_t n, struct moe_err *err)
{
	struct moe_st_tensor **order;
	const struct moe_st_tensor *prev = NULL;
	int r = 0;

	if (n < 2)
		return 0;
	order = malloc(n * sizeof(*order));
	if (!order)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	for (size_t i = 0; i < n; i++)
		order[i] = &ts[i];
	qsort(order, n, sizeof(*order), cmp_offset);
	for (size_t i = 0; i < n; i++) {
		if (order[i]->nbytes == 0)
			continue;
		if (prev && order[i]->offset < prev->offset + prev->nbytes) {
			r = moe_err_set(err, -EINVAL, "%s: tensor '%s' overlaps tensor '%s'", path,
					order[i]->name, prev->name);
			break;
		}
		prev = order[i];
	}
	free(order);
	return r;
}

/* Parse the header of file @fi and append its tensors to @c. */
static int parse_file_header(struct moe_st_checkpoint *c, uint32_t fi, struct moe_err *err)
{
	const struct moe_st_file *f = &c->files[fi];
	unsigned char lenbuf[8];
	uint64_t hlen = 0, data_start;
	json_error_t jerr;
	json_t *root = NULL, *v;
	const char *key;
	char *hdr = NULL;
	size_t first = c->n_tensors, n_new, k;
	struct moe_st_tensor *ts;
	int64_t n;
	int r;

	if (f->size < 8)
		return moe_err_set(err, -EINVAL, "%s: truncated: %" PRIu64 " bytes, too short for a safetensors header",
				   f->path, f->size);
	n = moe_pread_full(f->fd, lenbuf, 8, 0);
	if (n != 8)
		return moe_err_set(err, n < 0 ? (int)n : -EIO, "%s: cannot read the header length: %s",
				   f->path, n < 0 ? strerror((int)-n) : "short read");
	for (int i = 7; i >= 0; i--)
		hlen = hlen << 8 | lenbuf[i];
	if (hlen > ST_MAX_HEADER)
		return moe_err_set(err, -EINVAL,
				   "%s: header length %" PRIu64 " is above the %u byte limit (not a safetensors file?)",
				   f->path, hlen, ST_MAX_HEADER);
	if (hlen > f->size - 8)
		return moe_err_set(err, -EINVAL,
				   "%s: truncated: header length %" PRIu64 " runs past the end of the %" PRIu64
				   "-byte file", f->path, hlen, f->size);
	if (hlen < 2)
		return moe_err_set(err, -EINVAL, "%s: header length %" PRIu64 " is too short for JSON",
				   f->path, hlen);
	data_start = 8 + hlen;

	hdr = malloc(hlen);
	if (!hdr)
		return moe_err_set(err, -ENOMEM, "%s: out of memory for a %" PRIu64 "-byte header",
				   f->path, hlen);
	n = moe_pread_full(f->fd, hdr, hlen, 8);
	if (n < 0 || (uint64_t)n != hlen) {
		r = moe_err_set(err, n < 0 ? (int)n : -EIO, "%s: cannot read the header: %s", f->path,
				n < 0 ? strerror((int)-n) : "short read");
		goto out;
	}
	root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		r = moe_err_set(err, -EINVAL, "%s: header is not valid JSON: %s (at byte %d)", f->path,
				jerr.text, jerr.position);
		goto out;
	}
	if (!json_is_object(root)) {
		r = moe_err_set(err, -EINVAL, "%s: header is not a JSON object", f->path);
		goto out;
	}

	n_new = json_object_size(root);
	ts = realloc(c->tensors, (c->n_tensors + n_new) * sizeof(*ts));
	if (!ts && c->n_tensors + n_new > 0) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", f->path);
		goto out;
	}
	c->tensors = ts;
	json_object_foreach(root, key, v) {
		struct moe_st_tensor *t = &c->tensors[c->n_tensors];

		if (!strcmp(key, "__metadata__")) {
			if (!json_is_object(v)) {
				r = moe_err_set(err, -EINVAL, "%s: '__metadata__' is not a JSON object", f->path);
				goto out;
			}
			continue;
		}
		memset(t, 0, sizeof(*t));
		if (key[0] == '\0') {
			r = moe_err_set(err, -EINVAL, "%s: a tensor has an empty name", f->path);
			goto out;
		}
		r = parse_tensor(f->path, key, v, data_start, f->size, t, err);
		if (r < 0)
			goto out;
		t->name = strdup(key);
		if (!t->name) {
			r = moe_err_set(err, -ENOMEM, "%s: out of memory", f->path);
			goto out;
		}
		t->file = fi;
		c->n_tensors++;
	}
	r = check_overlap(f->path, c->tensors + first, c->n_tensors - first, err);
out:
	if (r < 0) {
		/* Leave @c as it was before this file. */
		for (k = first; k < c->n_tensors; k++)
			free(c->tensors[k].name);
		c->n_tensors = first;
	}
	json_decref(root);
	free(hdr);
	return r;
}

static int cmp_name(const void *a, const void *b)
{
	return strcmp(((const struct moe_st_tensor *)a)->name, ((const struct moe_st_tensor *)b)->name);
}

/* Sort by name (for bsearch) and reject a name that appears twice. */
static int ckpt_sort(struct moe_st_checkpoint *c, struct moe_err *err)
{
	if (c->n_tensors > 1)
		qsort(c->tensors, c->n_tensors, sizeof(*c->tensors), cmp_name);
	for (size_t i = 1; i < c->n_tensors; i++)
		if (!strcmp(c->tensors[i - 1].name, c->tensors[i].name))
			return moe_err_set(err, -EINVAL, "tensor '%s' is in both %s and %s",
					   c->tensors[i].name, c->files[c->tensors[i - 1].file].path,
					   c->files[c->tensors[i].file].path);
	return 0;
}

void moe_st_checkpoint_close(struct moe_st_checkpoint *c)
{
	if (!c)
		return;
	for (uint32_t i = 0; i < c->n_files; i++) {
		if (c->files[i].fd >= 0)
			close(c->files[i].fd);
		free(c->files[i].path);
	}
	for (size_t i = 0; i < c->n_tensors; i++)
		free(c->tensors[i].name);
	free(c->files);
	free(c->tensors);
	free(c->dir);
	free(c);
}

static struct moe_st_checkpoint *ckpt_new(const char *dir, struct moe_err *err)
{
	struct moe_st_checkpoint *c = calloc(1, sizeof(*c));

	if (c)
		c->dir = strdup(dir);
	if (!c || !c->dir) {
		free(c);
		moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
		return NULL;
	}
	return c;
}

int moe_st_file_open(const char *path, struct moe_st_checkpoint **ret, struct moe_err *err)
{
	struct moe_st_checkpoint *c;
	const char *slash = strrchr(path, '/');
	char *dir;
	int r;

	dir = slash ? strndup(path, (size_t)(slash - path) + (slash == path)) : strdup(".");
	if (!dir)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	c = ckpt_new(dir, err);
	free(dir);
	if (!c)
		return -ENOMEM;
	r = ckpt_add_file(c, path, err);
	if (r >= 0)
		r = parse_file_header(c, 0, err);
	if (r >= 0)
		r = ckpt_sort(c, err);
	if (r < 0) {
		moe_st_checkpoint_close(c);
		return r;
	}
	*ret = c;
	return 0;
}

static int file_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

/* Shard names come from a file we do not trust: keep them inside @dir. */
static bool shard_name_ok(const char *s)
{
	return s[0] && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static int open_index(struct moe_st_checkpoint *c, const char *index_path, struct moe_err *err)
{
	json_error_t jerr;
	json_t *root, *wm, *v, *shards = NULL;
	const char *key;
	int r = 0;

	root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return moe_err_set(err, -EINVAL, "%s: not valid JSON: %s (line %d)", index_path,
				   jerr.text, jerr.line);
	wm = json_object_get(root, "weight_map");
	if (!json_is_object(root) || !json_is_object(wm)) {
		r = moe_err_set(err, -EINVAL, "%s: no 'weight_map' object", index_path);
		goto out;
	}
	if (json_object_size(wm) == 0) {
		r = moe_err_set(err, -EINVAL, "%s: 'weight_map' names no tensors", index_path);
		goto out;
	}
	/* shard name -> file index, in first-seen order so files[] is stable. */
	shards = json_object();
	if (!shards) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", index_path);
		goto out;
	}
	json_object_foreach(wm, key, v) {
		const char *shard;
		char *path;

		if (!json_is_string(v) || !shard_name_ok(json_string_value(v))) {
			r = moe_err_set(err, -EINVAL, "%s: weight_map: tensor '%s' has an invalid shard name",
					index_path, key);
			goto out;
		}
		shard = json_string_value(v);
		if (json_object_get(shards, shard))
			continue;
		if (asprintf(&path, "%s/%s", c->dir, shard) < 0) {
			r = moe_err_set(err, -ENOMEM, "%s: out of memory", index_path);
			goto out;
		}
		r = ckpt_add_file(c, path, err);
		free(path);
		if (r < 0) {
			moe_err_prefix(err, r, "%s: shard '%s' (named for tensor '%s')", index_path, shard, key);
			goto out;
		}
		if (json_object_set_new(shards, shard, json_integer(c->n_files - 1)) < 0) {
			r = moe_err_set(err, -ENOMEM, "%s: out of memory", index_path);
			goto out;
		}
		r = parse_file_header(c, c->n_files - 1, err);
		if (r < 0)
			goto out;
	}
	r = ckpt_sort(c, err);
	if (r < 0)
		goto out;
	/* Every tensor the index names must be where it says. */
	json_object_foreach(wm, key, v) {
		const struct moe_st_tensor *t = moe_st_find(c, key);
		json_int_t want = json_integer_value(json_object_get(shards, json_string_value(v)));

		if (!t || t->file != (uint32_t)want) {
			r = moe_err_set(err, -EINVAL,
					"%s names tensor '%s' in shard %s, but that shard has no such tensor%s%s",
					index_path, key, json_string_value(v), t ? "; it is in " : "",
					t ? c->files[t->file].path : "");
			goto out;
		}
	}
out:
	json_decref(shards);
	json_decref(root);
	return r;
}

int moe_st_checkpoint_open(const char *dir, struct moe_st_checkpoint **ret, struct moe_err *err)
{
	struct moe_st_checkpoint *c;
	char *index_path = NULL, *single_path = NULL;
	int r;

	if (asprintf(&index_path, "%s/%s", dir, ST_INDEX_NAME) < 0)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	if (asprintf(&single_path, "%s/%s", dir, ST_SINGLE_NAME) < 0) {
		free(index_path);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	}
	c = ckpt_new(dir, err);
	if (!c) {
		r = -ENOMEM;
		goto out;
	}
	if (file_exists(index_path)) {
		r = open_index(c, index_path, err);
	} else if (file_exists(single_path)) {
		r = ckpt_add_file(c, single_path, err);
		if (r >= 0)
			r = parse_file_header(c, 0, err);
		if (r >= 0)
			r = ckpt_sort(c, err);
	} else if (!file_exists(dir)) {
		r = moe_err_set(err, -ENOENT, "%s: %s", dir, strerror(ENOENT));
	} else {
		r = moe_err_set(err, -ENOENT, "%s: no %s or %s", dir, ST_SINGLE_NAME, ST_INDEX_NAME);
	}
	if (r < 0) {
		moe_st_checkpoint_close(c);
		goto out;
	}
	*ret = c;
	r = 0;
out:
	free(index_path);
	free(single_path);
	return r;
}

const struct moe_st_tensor *moe_st_find(const struct moe_st_checkpoint *c, const char *name)
{
	struct moe_st_tensor key = { .name = (char *)name };

	if (!c || c->n_tensors == 0)
		return NULL;
	return bsearch(&key, c->tensors, c->n_tensors, sizeof(*c->tensors), cmp_name);
}

int moe_st_read(const struct moe_st_checkpoint *c, const struct moe_st_tensor *t,
		uint64_t off, void *buf, uint64_t len, struct moe_err *err)
{
	const struct moe_st_file *f = &c->files[t->file];
	uint64_t end;
	int64_t n;

	if (__builtin_add_overflow(off, len, &end) || end > t->nbytes)
		return moe_err_set(err, -EINVAL,
				   "%s: tensor '%s': read of %" PRIu64 " bytes at %" PRIu64
				   " is outside its %" PRIu64 " bytes", f->path, t->name, len, off, t->nbytes);
	n = moe_pread_full(f->fd, buf, len, t->offset + off);
	if (n < 0)
		return moe_err_set(err, (int)n, "%s: tensor '%s': %s", f->path, t->name, strerror((int)-n));
	if ((uint64_t)n != len)
		return moe_err_set(err, -EIO,
				   "%s: tensor '%s': short read, %" PRId64 " of %" PRIu64
				   " bytes at file offset %" PRIu64 " (file truncated after opening?)",
				   f->path, t->name, n, len, t->offset + off);
	return 0;
}

/* ---------------------------------------------------------------- writer */

/* Output is gathered into this much memory before each write(2); larger
 * writes from the caller go straight to the file. */
#define ST_WBUF (4u << 20)

struct st_wtensor {
	char *name;
	char st_dtype[16];        /* the header's dtype ("BF16", "I32") */
	enum moe_dtype dtype;
	uint32_t ndim;
	uint64_t shape[MOE_ST_MAX_DIMS];
	uint64_t nbytes;
};

struct moe_st_writer {
	char *path;
	int fd;
	bool begun;
	size_t n, cap;
	struct st_wtensor *tensors;
	uint64_t data_total;     /* sum of declared bytes */
	uint64_t data_written;
	char *buf;
	size_t buf_len;
};

int moe_st_writer_new(const char *path, struct moe_st_writer **ret, struct moe_err *err)
{
	struct moe_st_writer *w = calloc(1, sizeof(*w));

	if (!w || !(w->path = strdup(path))) {
		free(w);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}
	w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (w->fd < 0) {
		int r = -errno;

		free(w->path);
		free(w);
		return moe_err_set(err, r, "%s: %s", path, strerror(-r));
	}
	*ret = w;
	return 0;
}

static int declare(struct moe_st_writer *w, const char *name, enum moe_dtype dtype,
		   const char *st_dtype, uint64_t esize, uint32_t ndim, const uint64_t *shape,
		   struct moe_err *err);

int moe_st_writer_declare(struct moe_st_writer *w, const char *name, enum moe_dtype dtype,
			  uint32_t ndim, const uint64_t *shape, struct moe_err *err)
{
	return declare(w, name, dtype, moe_dtype_st_name(dtype), moe_dtype_size(dtype), ndim, shape, err);
}

int moe_st_writer_declare_int(struct moe_st_writer *w, const char *name, const char *st_dtype,
			      uint32_t ndim, const uint64_t *shape, struct moe_err *err)
{
	uint64_t es = !strcmp(st_dtype, "I32") ? 4 : !strcmp(st_dtype, "I64") ? 8 : 0;

	return declare(w, name, MOE_DTYPE_COUNT, st_dtype, es, ndim, shape, err);
}

static int declare(struct moe_st_writer *w, const char *name, enum moe_dtype dtype,
		   const char *st_dtype, uint64_t esize, uint32_t ndim, const uint64_t *shape,
		   struct moe_err *err)
{
	struct st_wtensor *t;
	uint64_t nbytes = esize;

	if (w->begun)
		return moe_err_set(err, -EINVAL, "%s: tensor '%s' declared after the header was written",
				   w->path, name);
	if (nbytes == 0)
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': invalid dtype %d", w->path, name, (int)dtype);
	if (ndim > MOE_ST_MAX_DIMS)
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': %u dimensions (at most %d)", w->path,
				   name, ndim, MOE_ST_MAX_DIMS);
	if (!name[0] || !strcmp(name, "__metadata__"))
		return moe_err_set(err, -EINVAL, "%s: invalid tensor name '%s'", w->path, name);
	for (uint32_t i = 0; i < ndim; i++)
		if (shape[i] > INT64_MAX || __builtin_mul_overflow(nbytes, shape[i], &nbytes))
			return moe_err_set(err, -EINVAL, "%s: tensor '%s': size overflows", w->path, name);
	if (nbytes > INT64_MAX - w->data_total)
		return moe_err_set(err, -EINVAL, "%s: tensor '%s': file size overflows", w->path, name);
	if (w->n == w->cap) {
		size_t cap = w->cap ? w->cap * 2 : 64;
		struct st_wtensor *ts = realloc(w->tensors, cap * sizeof(*ts));

		if (!ts)
			return moe_err_set(err, -ENOMEM, "%s: out of memory", w->path);
		w->tensors = ts;
		w->cap = cap;
	}
	t = &w->tensors[w->n];
	memset(t, 0, sizeof(*t));
	t->name = strdup(name);
	if (!t->name)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", w->path);
	t->dtype = dtype;
	snprintf(t->st_dtype, sizeof(t->st_dtype), "%s", st_dtype);
	t->ndim = ndim;
	if (ndim)
		memcpy(t->shape, shape, ndim * sizeof(*shape));
	t->nbytes = nbytes;
	w->data_total += nbytes;
	return (int)w->n++;
}

static int write_full(struct moe_st_writer *w, const void *data, size_t len, struct moe_err *err)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = write(w->fd, (const char *)data + done, len - done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return moe_err_set(err, -errno, "%s: write: %s", w->path, strerror(errno));
		}
		done += (size_t)n;
	}
	return 0;
}

static int wflush(struct moe_st_writer *w, struct moe_err *err)
{
	int r = 0;

	if (w->buf_len)
		r = write_full(w, w->buf, w->buf_len, err);
	w->buf_len = 0;
	return r;
}

int moe_st_writer_begin(struct moe_st_writer *w, struct moe_err *err)
{
	json_t *root, *meta, *tj;
	char *js = NULL;
	size_t jlen, pad;
	unsigned char lenbuf[8];
	uint64_t off = 0, hlen;
	int r = -ENOMEM;

	if (w->begun)
		return moe_err_set(err, -EINVAL, "%s: header already written", w->path);
	root = json_object();
	meta = json_pack("{s:s}", "format", "pt");
	if (!root || !meta || json_object_set_new(root, "__metadata__", meta) < 0) {
		json_decref(meta);
		goto out;
	}
	for (size_t i = 0; i < w->n; i++) {
		const struct st_wtensor *t = &w->tensors[i];
		json_t *shape = json_array();

		if (!shape)
			goto out;
		for (uint32_t d = 0; d < t->ndim; d++)
			json_array_append_new(shape, json_integer((json_int_t)t->shape[d]));
		tj = json_pack("{s:s,s:o,s:[I,I]}", "dtype", t->st_dtype, "shape", shape,
			       "data_offsets", (json_int_t)off, (json_int_t)(off + t->nbytes));
		/* json_pack takes over @shape ("o") even when it fails. */
		if (!tj || json_object_set_new(root, t->name, tj) < 0)
			goto out;
		off += t->nbytes;
	}
	/* Compact and in declaration order (jansson keeps insertion order), so
	 * the same tensors always give the same bytes. */
	js = json_dumps(root, JSON_COMPACT);
	if (!js)
		goto out;
	jlen = strlen(js);
	/* Pad with spaces to a multiple of 8 as the official writer does, so
	 * the data starts aligned. */
	pad = (8 - jlen % 8) % 8;
	hlen = jlen + pad;
	for (int i = 0; i < 8; i++)
		lenbuf[i] = (unsigned char)(hlen >> (8 * i));
	w->buf = malloc(ST_WBUF);
	if (!w->buf)
		goto out;
	r = write_full(w, lenbuf, 8, err);
	if (r >= 0)
		r = write_full(w, js, jlen, err);
	if (r >= 0 && pad)
		r = write_full(w, "        ", pad, err);
	if (r >= 0)
		w->begun = true;
	free(js);
	json_decref(root);
	return r;
out:
	free(js);
	json_decref(root);
	return moe_err_set(err, r, "%s: cannot build the header: out of memory", w->path);
}

/* The tensor that byte @pos of the data belongs to (for messages). */
static const char *tensor_at(const struct moe_st_writer *w, uint64_t pos)
{
	for (size_t i = 0; i < w->n; i++) {
		if (pos < w->tensors[i].nbytes)
			return w->tensors[i].name;
		pos -= w->tensors[i].nbytes;
	}
	return w->n ? w->tensors[w->n - 1].name : "(none)";
}

int moe_st_writer_write(struct moe_st_writer *w, const void *data, uint64_t len, struct moe_err *err)
{
	if (!w->begun)
		return moe_err_set(err, -EINVAL, "%s: data written before the header", w->path);
	if (len > w->data_total - w->data_written)
		return moe_err_set(err, -EINVAL,
				   "%s: %" PRIu64 " bytes written past the end of the declared tensors",
				   w->path, len - (w->data_total - w->data_written));
	w->data_written += len;
	if (len >= ST_WBUF) {
		/* Big pieces go straight to the file: no copy. */
		int r = wflush(w, err);

		return r < 0 ? r : write_full(w, data, len, err);
	}
	while (len) {
		size_t n = ST_WBUF - w->buf_len;

		if (n > len)
			n = (size_t)len;
		memcpy(w->buf + w->buf_len, data, n);
		w->buf_len += n;
		data = (const char *)data + n;
		len -= n;
		if (w->buf_len == ST_WBUF) {
			int r = wflush(w, err);

			if (r < 0)
				return r;
		}
	}
	return 0;
}

static void writer_free(struct moe_st_writer *w)
{
	for (size_t i = 0; i < w->n; i++)
		free(w->tensors[i].name);
	free(w->tensors);
	free(w->buf);
	free(w->path);
	free(w);
}

int moe_st_writer_finish(struct moe_st_writer *w, struct moe_err *err)
{
	int r = 0;

	if (!w->begun)
		r = moe_st_writer_begin(w, err);
	if (r >= 0 && w->data_written != w->data_total)
		r = moe_err_set(err, -EINVAL,
				"%s: incomplete: %" PRIu64 " of %" PRIu64 " data bytes written (tensor '%s' is short)",
				w->path, w->data_written, w->data_total, tensor_at(w, w->data_written));
	if (r >= 0)
		r = wflush(w, err);
	if (r < 0) {
		moe_st_writer_abort(w);
		return r;
	}
	if (close(w->fd) < 0) {
		r = moe_err_set(err, -errno, "%s: close: %s", w->path, strerror(errno));
		unlink(w->path);
	}
	writer_free(w);
	return r;
}

void moe_st_writer_abort(struct moe_st_writer *w)
{
	if (!w)
		return;
	close(w->fd);
	unlink(w->path);
	writer_free(w);
}
