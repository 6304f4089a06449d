/* SPDX-License-Identifier: MIT */
/*
 * numpy .npy arrays and uncompressed .npz archives.
 *
 * The .npy format (numpy/lib/format.py, NEP 1): the magic "\x93NUMPY", a
 * major and minor version byte, the header length (uint16 little-endian in
 * version 1.0, uint32 in 2.0 and 3.0), then the header: a Python dict
 * literal with exactly the keys 'descr', 'fortran_order' and 'shape',
 * padded with spaces and ended by '\n' so that the data starts on a 64-byte
 * boundary.  The data follows in C order.  Version 3.0 only allows UTF-8 in
 * the header; we accept nothing but ASCII in the parts we read anyway.
 *
 * The header is parsed by hand and strictly: it is a Python literal, not
 * JSON, and a file whose header we do not fully understand is refused
 * rather than guessed at.
 *
 * An .npz is a zip archive with one "NAME.npy" member per array (np.savez).
 * We write the members stored (method 0), with the CRC-32 known before the
 * local header is written, so no data descriptors are needed.  Zip64 is not
 * written: an archive whose members or offsets would pass 4 GiB is refused
 * with -EFBIG (routing outputs are a few bytes per token).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "engine/io.h"
#include "npy.h"
#include "formats/outfile.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c reads and writes little-endian data in place: port it before using a big-endian host"
#endif

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
#define NPY_ALIGN 64                  /* numpy's ARRAY_ALIGN: data starts on this boundary */
#define NPY_MAX_HEADER (1u << 20)     /* numpy refuses > 10000 by default; be a bit kinder */
#define NPY_MAX_TOKEN 64              /* longest descr string we need to look at */

/* The message we give for a dtype we cannot use (the CLI's wording). */
#define NPY_DTYPE_HINT "use float32 ('<f4') or bfloat16 (--dtype bf16)"

size_t moe_npy_type_size(enum moe_npy_type t)
{
	switch (t) {
	case MOE_NPY_F32:
	case MOE_NPY_I32:
		return 4;
	case MOE_NPY_BF16:
		return 2;
	}
	return 0;
}

const char *moe_npy_type_descr(enum moe_npy_type t)
{
	switch (t) {
	case MOE_NPY_F32:
		return "<f4";
	case MOE_NPY_BF16:
		return "<u2";
	case MOE_NPY_I32:
		return "<i4";
	}
	return NULL;
}

const char *moe_npy_type_name(enum moe_npy_type t)
{
	switch (t) {
	case MOE_NPY_F32:
		return "float32";
	case MOE_NPY_BF16:
		return "bfloat16";
	case MOE_NPY_I32:
		return "int32";
	}
	return "?";
}

void moe_npy_free(struct moe_npy *a)
{
	if (!a)
		return;
	free(a->data);
	a->data = NULL;
}

/* ---- low-level I/O -------------------------------------------------------- */

static int write_full(int fd, const void *buf, uint64_t len)
{
	uint64_t done = 0;

	while (done < len) {
		size_t chunk = len - done > (1u << 30) ? (1u << 30) : (size_t)(len - done);
		ssize_t r = write(fd, (const char *)buf + done, chunk);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		done += (uint64_t)r;
	}
	return 0;
}

/* zlib's crc32() takes a uInt length: feed it in chunks. */
static uint32_t crc32_update(uint32_t crc, const void *buf, uint64_t len)
{
	const Bytef *p = buf;

	while (len > 0) {
		uInt chunk = len > (1u << 30) ? (1u << 30) : (uInt)len;

		crc = (uint32_t)crc32(crc, p, chunk);
		p += chunk;
		len -= chunk;
	}
	return crc;
}

/* An output file written under a temporary of its own and renamed into
 * place on commit (formats/outfile.h). */
struct out_file {
	struct moe_outfile f;
	const char *path;   /* the caller's */
};

static int out_open(struct out_file *o, const char *path, struct moe_err *err)
{
	o->path = path;
	return moe_outfile_open(&o->f, path, err);
}

static void out_abort(struct out_file *o)
{
	moe_outfile_abort(&o->f);
}

static int out_write(struct out_file *o, const void *buf, uint64_t len, struct moe_err *err)
{
	int r = write_full(o->f.fd, buf, len);

	if (r < 0)
		return moe_err_set(err, r, "%s: write failed: %s", o->path, strerror(-r));
	return 0;
}

/* Rename into place; ends @o in every case.  No fsync: outputs are results
 * a caller can recompute, and the rename alone already keeps a reader from
 * seeing a half-written file. */
static int out_commit(struct out_file *o, struct moe_err *err)
{
	return moe_outfile_commit(&o->f, false, err);
}

/* ---- the header dict ------------------------------------------------------ */

struct hdr_parser {
	const char *p, *end;
	const char *path;
	struct moe_err *err;
};

static void skip_ws(struct hdr_parser *hp)
{
	while (hp->p < hp->end && (*hp->p == ' ' || *hp->p == '\t' || *hp->p == '\n' ||
				   *hp->p == '\r'))
		hp->p++;
}

static int expect_char(struct hdr_parser *hp, char c, const char *what)
{
	skip_ws(hp);
	if (hp->p >= hp->end || *hp->p != c)
		return moe_err_set(hp->err, -EINVAL, "%s: not a valid .npy header: expected '%c' %s",
				   hp->path, c, what);
	hp->p++;
	return 0;
}

/* A Python string literal in single or double quotes, without escapes. */
static int parse_str(struct hdr_parser *hp, char *buf, size_t size, const char *what)
{
	char q;
	size_t n = 0;

	skip_ws(hp);
	if (hp->p >= hp->end || (*hp->p != '\'' && *hp->p != '"'))
		return moe_err_set(hp->err, -EINVAL, "%s: not a valid .npy header: expected a string %s",
				   hp->path, what);
	q = *hp->p++;
	while (hp->p < hp->end && *hp->p != q) {
		unsigned char c = (unsigned char)*hp->p;

		if (c == '\\' || c < 0x20 || c >= 0x7f)
			return moe_err_set(hp->err, -EINVAL,
					   "%s: not a valid .npy header: unexpected character in %s",
					   hp->path, what);
		if (n + 1 >= size)
			return moe_err_set(hp->err, -EINVAL, "%s: not a valid .npy header: %s is too long",
					   hp->path, what);
		buf[n++] = (char)c;
		hp->p++;
	}
	if (hp->p >= hp->end)
		return moe_err_set(hp->err, -EINVAL, "%s: not a valid .npy header: unterminated string %s",
				   hp->path, what);
	hp->p++;
	buf[n] = '\0';
	return 0;
}

static bool accept_word(struct hdr_parser *hp, const char *w)
{
	size_t n = strlen(w);

	skip_ws(hp);
	if ((size_t)(hp->end - hp->p) < n || memcmp(hp->p, w, n) != 0)
		return false;
	/* not a prefix of a longer identifier */
	if ((size_t)(hp->end - hp->p) > n) {
		char c = hp->p[n];

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')
			return false;
	}
	hp->p += n;
	return true;
}

static bool peek_char(struct hdr_parser *hp, char c)
{
	skip_ws(hp);
	return hp->p < hp->end && *hp->p == c;
}

/* Shape: a tuple of non-negative integers, "()", "(3,)", "(3, 4)", "(3, 4,)". */
static int parse_shape(struct hdr_parser *hp, uint32_t *ndim, uint64_t *shape)
{
	uint32_t n = 0;
	int r;

	r = expect_char(hp, '(', "to open 'shape'");
	if (r < 0)
		return r;
	for (;;) {
		uint64_t v = 0;
		const char *start;

		if (peek_char(hp, ')'))
			break;
		start = hp->p;
		while (hp->p < hp->end && *hp->p >= '0' && *hp->p <= '9') {
			uint64_t d = (uint64_t)(*hp->p - '0');

			if (v > (UINT64_MAX - d) / 10)
				return moe_err_set(hp->err, -EOVERFLOW,
						   "%s: a dimension of 'shape' is too large", hp->path);
			v = v * 10 + d;
			hp->p++;
		}
		if (hp->p == start)
			return moe_err_set(hp->err, -EINVAL,
					   "%s: not a valid .npy header: 'shape' must be a tuple of non-negative integers",
					   hp->path);
		if (hp->p < hp->end && (*hp->p == 'L' || *hp->p == 'l'))  /* Python 2 long */
			hp->p++;
		if (n >= MOE_NPY_MAX_DIMS)
			return moe_err_set(hp->err, -EINVAL, "%s: more than %d dimensions are not supported",
					   hp->path, MOE_NPY_MAX_DIMS);
		shape[n++] = v;
		if (peek_char(hp, ',')) {
			hp->p++;
			continue;
		}
		if (!peek_char(hp, ')'))
			return moe_err_set(hp->err, -EINVAL,
					   "%s: not a valid .npy header: expected ',' or ')' in 'shape'", hp->path);
	}
	hp->p++;   /* ')' */
	*ndim = n;
	return 0;
}

/*
 * Map a descr to our types.  @descr is the string form; for the list form
 * ([('', '<V2')], one unnamed 2-byte field, as a structured view of
 * bfloat16 prints) the caller passes the field's type.
 */
static int descr_type(const char *path, const char *descr, enum moe_npy_type *ret,
		      struct moe_err *err)
{
	static const struct {
		const char *descr;
		enum moe_npy_type type;
	} known[] = {
		{ "<f4", MOE_NPY_F32 }, { "=f4", MOE_NPY_F32 }, { "f4", MOE_NPY_F32 },
		{ "<u2", MOE_NPY_BF16 }, { "=u2", MOE_NPY_BF16 }, { "u2", MOE_NPY_BF16 },
		{ "|V2", MOE_NPY_BF16 }, { "<V2", MOE_NPY_BF16 }, { "V2", MOE_NPY_BF16 },
		{ "bfloat16", MOE_NPY_BF16 }, { "<bf16", MOE_NPY_BF16 }, { "bf16", MOE_NPY_BF16 },
		{ "<i4", MOE_NPY_I32 }, { "=i4", MOE_NPY_I32 }, { "i4", MOE_NPY_I32 },
	};

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (!strcmp(descr, known[i].descr)) {
			*ret = known[i].type;
			return 0;
		}
	if (descr[0] == '>' && (!strcmp(descr + 1, "f4") || !strcmp(descr + 1, "u2") ||
				!strcmp(descr + 1, "i4") || !strcmp(descr + 1, "bf16")))
		return moe_err_set(err, -ENOTSUP,
				   "%s: dtype '%s' is big-endian and not supported: %s", path, descr,
				   NPY_DTYPE_HINT);
	return moe_err_set(err, -ENOTSUP, "%s: dtype '%s' is not supported: %s", path, descr,
			   NPY_DTYPE_HINT);
}

/* descr: a string, or a one-field structured list [('', '<V2')]. */
static int parse_descr(struct hdr_parser *hp, enum moe_npy_type *ret)
{
	char name[NPY_MAX_TOKEN], type[NPY_MAX_TOKEN];
	int r;

	if (!peek_char(hp, '[')) {
		r = parse_str(hp, type, sizeof(type), "in 'descr'");
		return r < 0 ? r : descr_type(hp->path, type, ret, hp->err);
	}
	hp->p++;
	if ((r = expect_char(hp, '(', "in 'descr'")) < 0 ||
	    (r = parse_str(hp, name, sizeof(name), "in 'descr'")) < 0 ||
	    (r = expect_char(hp, ',', "in 'descr'")) < 0 ||
	    (r = parse_str(hp, type, sizeof(type), "in 'descr'")) < 0 ||
	    (r = expect_char(hp, ')', "in 'descr' (fields with a shape are not supported)")) < 0)
		return r;
	if (peek_char(hp, ','))
		hp->p++;
	if (!peek_char(hp, ']'))
		return moe_err_set(hp->err, -ENOTSUP,
				   "%s: a structured dtype with several fields is not supported: %s",
				   hp->path, NPY_DTYPE_HINT);
	hp->p++;
	if (name[0] || (strcmp(type, "<V2") && strcmp(type, "|V2") && strcmp(type, "V2")))
		return moe_err_set(hp->err, -ENOTSUP,
				   "%s: structured dtype [('%s', '%s')] is not supported: %s", hp->path,
				   name, type, NPY_DTYPE_HINT);
	*ret = MOE_NPY_BF16;
	return 0;
}

static int parse_header(const char *path, const char *text, size_t len, struct moe_npy *a,
			struct moe_err *err)
{
	struct hdr_parser hp = { .p = text, .end = text + len, .path = path, .err = err };
	bool seen_descr = false, seen_fortran = false, seen_shape = false;
	int r;

	r = expect_char(&hp, '{', "at the start of the header");
	if (r < 0)
		return r;
	for (;;) {
		char key[NPY_MAX_TOKEN];

		if (peek_char(&hp, '}'))
			break;
		r = parse_str(&hp, key, sizeof(key), "as a key");
		if (r < 0)
			return r;
		r = expect_char(&hp, ':', "after a key");
		if (r < 0)
			return r;
		if (!strcmp(key, "descr") && !seen_descr) {
			seen_descr = true;
			r = parse_descr(&hp, &a->type);
		} else if (!strcmp(key, "fortran_order") && !seen_fortran) {
			seen_fortran = true;
			if (accept_word(&hp, "True"))
				r = moe_err_set(err, -ENOTSUP,
						"%s: Fortran-order arrays are not supported: save a C-order array (np.ascontiguousarray)",
						path);
			else if (!accept_word(&hp, "False"))
				r = moe_err_set(err, -EINVAL,
						"%s: not a valid .npy header: 'fortran_order' must be True or False",
						path);
		} else if (!strcmp(key, "shape") && !seen_shape) {
			seen_shape = true;
			r = parse_shape(&hp, &a->ndim, a->shape);
		} else {
			r = moe_err_set(err, -EINVAL, "%s: not a valid .npy header: %s key '%s'", path,
					strcmp(key, "descr") && strcmp(key, "fortran_order") &&
					strcmp(key, "shape") ? "unexpected" : "repeated", key);
		}
		if (r < 0)
			return r;
		if (peek_char(&hp, ',')) {
			hp.p++;
			continue;
		}
		if (!peek_char(&hp, '}'))
			return moe_err_set(err, -EINVAL,
					   "%s: not a valid .npy header: expected ',' or '}' after '%s'", path, key);
	}
	hp.p++;   /* '}' */
	skip_ws(&hp);
	while (hp.p < hp.end && *hp.p == '\0')   /* some writers pad with NULs */
		hp.p++;
	if (hp.p != hp.end)
		return moe_err_set(err, -EINVAL, "%s: not a valid .npy header: junk after the dict", path);
	if (!seen_descr || !seen_fortran || !seen_shape)
		return moe_err_set(err, -EINVAL, "%s: not a valid .npy header: no '%s' key", path,
				   !seen_descr ? "descr" : !seen_fortran ? "fortran_order" : "shape");
	return 0;
}

/* ---- reading --------------------------------------------------------------- */

int moe_npy_read(const char *path, struct moe_npy *ret, struct moe_err *err)
{
	struct moe_npy a = { 0 };
	unsigned char pre[12];
	char *text = NULL;
	uint64_t hlen, data_off, count = 1, bytes, actual;
	struct stat st;
	int64_t got;
	int fd, r;
	uint8_t major;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		r = moe_err_set(err, -EINVAL, "%s: not a regular file", path);
		goto out;
	}

	got = moe_pread_full(fd, pre, sizeof(pre), 0);
	if (got < 0) {
		r = moe_err_set(err, (int)got, "%s: %s", path, strerror((int)-got));
		goto out;
	}
	if (got < 10 || memcmp(pre, NPY_MAGIC, NPY_MAGIC_LEN) != 0) {
		r = moe_err_set(err, -EINVAL, "%s: not an .npy file (no \\x93NUMPY magic)", path);
		goto out;
	}
	major = pre[6];
	if (major == 1) {
		hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8;
		data_off = 10;
	} else if (major == 2 || major == 3) {
		if (got < 12) {
			r = moe_err_set(err, -EINVAL, "%s: truncated .npy header", path);
			goto out;
		}
		hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8 | (uint64_t)pre[10] << 16 |
		       (uint64_t)pre[11] << 24;
		data_off = 12;
	} else {
		r = moe_err_set(err, -ENOTSUP, "%s: .npy format version %u.%u is not supported (1.0, 2.0, 3.0 are)",
				path, major, pre[7]);
		goto out;
	}
	if (hlen > NPY_MAX_HEADER) {
		r = moe_err_set(err, -EINVAL, "%s: .npy header of %" PRIu64 " bytes is implausibly long",
				path, hlen);
		goto out;
	}
	text = malloc(hlen + 1);
	if (!text) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", path);
		goto out;
	}
	got = moe_pread_full(fd, text, hlen, data_off);
	if (got < 0) {
		r = moe_err_set(err, (int)got, "%s: %s", path, strerror((int)-got));
		goto out;
	}
	if ((uint64_t)got < hlen) {
		r = moe_err_set(err, -EINVAL, "%s: truncated .npy header (%" PRIu64 " of %" PRIu64 " bytes)",
				path, (uint64_t)got, hlen);
		goto out;
	}
	text[hlen] = '\0';
	data_off += hlen;
	r = parse_header(path, text, hlen, &a, err);
	if (r < 0)
		goto out;

	for (uint32_t i = 0; i < a.ndim; i++) {
		if (a.shape[i] != 0 && count > UINT64_MAX / a.shape[i]) {
			r = moe_err_set(err, -EOVERFLOW, "%s: shape overflows 64 bits", path);
			goto out;
		}
		count *= a.shape[i];
	}
	if (count > UINT64_MAX / moe_npy_type_size(a.type) ||
	    count * moe_npy_type_size(a.type) > (uint64_t)SIZE_MAX / 2) {
		r = moe_err_set(err, -EOVERFLOW, "%s: shape is too large for this machine", path);
		goto out;
	}
	a.count = count;
	bytes = count * moe_npy_type_size(a.type);
	actual = (uint64_t)st.st_size > data_off ? (uint64_t)st.st_size - data_off : 0;
	if (actual < bytes) {
		r = moe_err_set(err, -EINVAL, "%s: truncated: the shape needs %" PRIu64
				" data bytes, the file has %" PRIu64, path, bytes, actual);
		goto out;
	}
	if (actual > bytes) {
		r = moe_err_set(err, -EINVAL, "%s: %" PRIu64 " bytes after the data (shape needs %"
				PRIu64 "): not a single .npy array", path, actual - bytes, bytes);
		goto out;
	}

	a.data = malloc(bytes ? bytes : 1);
	if (!a.data) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory for %" PRIu64 " bytes", path, bytes);
		goto out;
	}
	got = moe_pread_full(fd, a.data, bytes, data_off);
	if (got < 0) {
		r = moe_err_set(err, (int)got, "%s: %s", path, strerror((int)-got));
		goto out;
	}
	if ((uint64_t)got < bytes) {   /* shrank under us */
		r = moe_err_set(err, -EIO, "%s: truncated: the shape needs %" PRIu64
				" data bytes, read %" PRIu64, path, bytes, (uint64_t)got);
		goto out;
	}
	*ret = a;
	a.data = NULL;
	r = 0;
out:
	free(a.data);
	free(text);
	close(fd);
	return r;
}

/* ---- writing --------------------------------------------------------------- */

/* The longest header we produce: 8 dims of 20 digits plus the dict, padded. */
#define NPY_HEADER_BUF 512

/*
 * Build the complete v1.0 preamble (magic, version, length, dict, padding,
 * '\n') into @buf as numpy writes it; returns its length (a multiple of 64)
 * or -EINVAL for a bad type or too many dims.
 */
static int npy_header(char *buf, enum moe_npy_type type, uint32_t ndim, const uint64_t *shape)
{
	char dict[NPY_HEADER_BUF];
	size_t n, total, pad;
	int w;

	if (!moe_npy_type_size(type) || ndim > MOE_NPY_MAX_DIMS)
		return -EINVAL;
	w = snprintf(dict, sizeof(dict), "{'descr': '%s', 'fortran_order': False, 'shape': (",
		     moe_npy_type_descr(type));
	n = (size_t)w;
	for (uint32_t i = 0; i < ndim; i++)
		n += (size_t)snprintf(dict + n, sizeof(dict) - n, i ? ", %" PRIu64 : "%" PRIu64,
				      shape[i]);
	n += (size_t)snprintf(dict + n, sizeof(dict) - n, "%s), }", ndim == 1 ? "," : "");

	/* magic(6) + version(2) + length(2) + dict + pad spaces + '\n' */
	total = 10 + n + 1;
	pad = (NPY_ALIGN - total % NPY_ALIGN) % NPY_ALIGN;
	total += pad;
	memcpy(buf, NPY_MAGIC, NPY_MAGIC_LEN);
	buf[6] = 1;
	buf[7] = 0;
	buf[8] = (char)((total - 10) & 0xff);
	buf[9] = (char)((total - 10) >> 8);
	memcpy(buf + 10, dict, n);
	memset(buf + 10 + n, ' ', pad);
	buf[total - 1] = '\n';
	return (int)total;
}

/* Data bytes of an array, overflow-checked. */
static int npy_data_bytes(enum moe_npy_type type, uint32_t ndim, const uint64_t *shape,
			  uint64_t *ret)
{
	uint64_t count = 1, es = moe_npy_type_size(type);

	if (!es || ndim > MOE_NPY_MAX_DIMS)
		return -EINVAL;
	for (uint32_t i = 0; i < ndim; i++) {
		if (shape[i] != 0 && count > UINT64_MAX / shape[i])
			return -EOVERFLOW;
		count *= shape[i];
	}
	if (count > UINT64_MAX / es)
		return -EOVERFLOW;
	*ret = count * es;
	return 0;
}

int moe_npy_write(const char *path, enum moe_npy_type type, uint32_t ndim,
		  const uint64_t *shape, const void *data, struct moe_err *err)
{
	char hdr[NPY_HEADER_BUF + NPY_ALIGN + 16];
	struct out_file o;
	uint64_t bytes;
	int hl, r;

	r = npy_data_bytes(type, ndim, shape, &bytes);
	if (r < 0)
		return moe_err_set(err, r, "%s: %s", path, r == -EOVERFLOW ? "array size overflows"
				   : "invalid array type or more than 8 dimensions");
	hl = npy_header(hdr, type, ndim, shape);
	r = out_open(&o, path, err);
	if (r < 0)
		return r;
	r = out_write(&o, hdr, (uint64_t)hl, err);
	if (r == 0)
		r = out_write(&o, data, bytes, err);
	if (r < 0) {
		out_abort(&o);
		return r;
	}
	return out_commit(&o, err);
}

/* ---- .npz ------------------------------------------------------------------ */

#define ZIP_LOCAL_SIG 0x04034b50u
#define ZIP_CENTRAL_SIG 0x02014b50u
#define ZIP_END_SIG 0x06054b50u
#define ZIP_LOCAL_LEN 30           /* fixed part of a local file header */
#define ZIP_CENTRAL_LEN 46         /* fixed part of a central directory header */
#define ZIP_END_LEN 22             /* end of central directory record, no comment */
#define ZIP_VERSION 20             /* 2.0: what a stored member needs (APPNOTE 4.4.3) */
#define ZIP_MADE_BY (3u << 8 | 20) /* made on Unix (3), spec 2.0: external attrs are a mode */
#define ZIP_DOS_DATE 0x0021        /* 1980-01-01, the epoch of DOS dates: reproducible files */
#define ZIP_DOS_TIME 0
#define ZIP_MAX_NAME 240           /* our member names are short */
#define ZIP_LIMIT 0xffffffffu      /* above this a field needs zip64, which we do not write */

static void le16(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
}

static void le32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
	p[2] = (unsigned char)(v >> 16);
	p[3] = (unsigned char)(v >> 24);
}

/* The fields of a local header and its central directory entry share. */
static void zip_common(unsigned char *p, uint32_t crc, uint32_t size, size_t name_len)
{
	le16(p + 0, ZIP_VERSION);   /* version needed to extract */
	le16(p + 2, 0);             /* flags: no encryption, no data descriptor */
	le16(p + 4, 0);             /* method: stored */
	le16(p + 6, ZIP_DOS_TIME);
	le16(p + 8, ZIP_DOS_DATE);
	le32(p + 10, crc);
	le32(p + 14, size);         /* compressed size */
	le32(p + 18, size);         /* uncompressed size */
	le16(p + 22, (uint32_t)name_len);
	le16(p + 24, 0);            /* extra field length */
}

int moe_npz_write(const char *path, const struct moe_npz_entry *entries, uint32_t n,
		  struct moe_err *err)
{
	char (*hdrs)[NPY_HEADER_BUF + NPY_ALIGN + 16] = NULL;
	uint32_t *crcs = NULL, *hlens = NULL;
	uint64_t *sizes = NULL, *offsets = NULL, off = 0, cd_size = 0;
	unsigned char rec[ZIP_CENTRAL_LEN + ZIP_MAX_NAME + 8];
	struct out_file o;
	int r;

	if (n > 0xffff)
		return moe_err_set(err, -EINVAL, "%s: too many arrays for a zip archive", path);
	hdrs = calloc(n ? n : 1, sizeof(*hdrs));
	crcs = calloc(n ? n : 1, sizeof(*crcs));
	hlens = calloc(n ? n : 1, sizeof(*hlens));
	sizes = calloc(n ? n : 1, sizeof(*sizes));
	offsets = calloc(n ? n : 1, sizeof(*offsets));
	if (!hdrs || !crcs || !hlens || !sizes || !offsets) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", path);
		goto out_free;
	}

	/* Lay out the whole archive first so that nothing is written when an
	 * entry is invalid or the archive would need zip64. */
	for (uint32_t i = 0; i < n; i++) {
		const struct moe_npz_entry *e = &entries[i];
		size_t nl = e->name ? strlen(e->name) : 0;
		uint64_t bytes;
		int hl;

		if (nl == 0 || nl + 4 > ZIP_MAX_NAME || strchr(e->name, '/') || strchr(e->name, '\\')) {
			r = moe_err_set(err, -EINVAL, "%s: invalid array name '%s'", path,
					e->name ? e->name : "(null)");
			goto out_free;
		}
		r = npy_data_bytes(e->type, e->ndim, e->shape, &bytes);
		if (r < 0) {
			r = moe_err_set(err, r, "%s: array '%s': %s", path, e->name,
					r == -EOVERFLOW ? "array size overflows"
					: "invalid array type or more than 8 dimensions");
			goto out_free;
		}
		hl = npy_header(hdrs[i], e->type, e->ndim, e->shape);
		if (bytes > ZIP_LIMIT - (uint64_t)hl) {
			r = moe_err_set(err, -EFBIG, "%s: array '%s' is 4 GiB or more: .npz archives that need zip64 are not written",
					path, e->name);
			goto out_free;
		}
		hlens[i] = (uint32_t)hl;
		sizes[i] = (uint64_t)hl + bytes;
		crcs[i] = crc32_update(crc32_update(0, hdrs[i], (uint64_t)hl), e->data, bytes);
		offsets[i] = off;
		off += ZIP_LOCAL_LEN + nl + 4 + sizes[i];
		cd_size += ZIP_CENTRAL_LEN + nl + 4;
	}
	if (off > ZIP_LIMIT || cd_size > ZIP_LIMIT || off + cd_size > ZIP_LIMIT) {
		r = moe_err_set(err, -EFBIG, "%s: the archive would be 4 GiB or more: .npz archives that need zip64 are not written",
				path);
		goto out_free;
	}

	r = out_open(&o, path, err);
	if (r < 0)
		goto out_free;
	for (uint32_t i = 0; i < n && r == 0; i++) {
		const struct moe_npz_entry *e = &entries[i];
		size_t nl = strlen(e->name);
		uint64_t hl = hlens[i];

		le32(rec, ZIP_LOCAL_SIG);
		zip_common(rec + 4, crcs[i], (uint32_t)sizes[i], nl + 4);
		memcpy(rec + ZIP_LOCAL_LEN, e->name, nl);
		memcpy(rec + ZIP_LOCAL_LEN + nl, ".npy", 4);
		r = out_write(&o, rec, ZIP_LOCAL_LEN + nl + 4, err);
		if (r == 0)
			r = out_write(&o, hdrs[i], hl, err);
		if (r == 0)
			r = out_write(&o, e->data, sizes[i] - hl, err);
	}
	for (uint32_t i = 0; i < n && r == 0; i++) {
		size_t nl = strlen(entries[i].name);

		le32(rec, ZIP_CENTRAL_SIG);
		le16(rec + 4, ZIP_MADE_BY);
		zip_common(rec + 6, crcs[i], (uint32_t)sizes[i], nl + 4);
		le16(rec + 32, 0);                    /* file comment length */
		le16(rec + 34, 0);                    /* disk number start */
		le16(rec + 36, 0);                    /* internal attributes */
		le32(rec + 38, (0100644u) << 16);     /* external: regular file, rw-r--r-- */
		le32(rec + 42, (uint32_t)offsets[i]); /* local header offset */
		memcpy(rec + ZIP_CENTRAL_LEN, entries[i].name, nl);
		memcpy(rec + ZIP_CENTRAL_LEN + nl, ".npy", 4);
		r = out_write(&o, rec, ZIP_CENTRAL_LEN + nl + 4, err);
	}
	if (r == 0) {
		le32(rec, ZIP_END_SIG);
		le16(rec + 4, 0);                     /* this disk */
		le16(rec + 6, 0);                     /* disk with the central directory */
		le16(rec + 8, n);                     /* entries on this disk */
		le16(rec + 10, n);                    /* entries in all */
		le32(rec + 12, (uint32_t)cd_size);
		le32(rec + 16, (uint32_t)off);        /* central directory offset */
		le16(rec + 20, 0);                    /* comment length */
		r = out_write(&o, rec, ZIP_END_LEN, err);
	}
	if (r < 0)
		out_abort(&o);
	else
		r = out_commit(&o, err);
out_free:
	free(hdrs);
	free(crcs);
	free(hlens);
	free(sizes);
	free(offsets);
	return r;
}
