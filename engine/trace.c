/* SPDX-License-Identifier: MIT */
/*
 * Routing traces (trace.h, moe-trace(5)): a writer that the engine feeds
 * batch by batch, and a reader that checks every line and hands back the
 * keys in the form moe_cache_simulate() takes.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "trace.h"

/* Longest piece of a bad field quoted in a message. */
#define TRACE_QUOTE_MAX 32

struct moe_trace_writer {
	FILE *f;
	char *path;
	uint32_t n_layers, n_experts;
	uint32_t *buf;          /* sorted copy of one line's experts */
	size_t buf_cap;
	int error;              /* first write error, -errno; sticks */
};

/* Both counts at least 1 and every key below MOE_CACHE_NONE. */
static bool key_space_ok(uint32_t n_layers, uint32_t n_experts)
{
	return n_layers && n_experts && (uint64_t)n_layers * n_experts < MOE_CACHE_NONE;
}

/* --- writing ------------------------------------------------------------------ */

int moe_trace_open_write(const char *path, uint32_t n_layers, uint32_t n_experts,
			 struct moe_trace_writer **ret, struct moe_err *err)
{
	struct moe_trace_writer *w;

	if (!key_space_ok(n_layers, n_experts))
		return moe_err_set(err, -EINVAL, "%s: %" PRIu32 " layers x %" PRIu32 " experts is not "
				   "a trace key space", path, n_layers, n_experts);
	w = calloc(1, sizeof(*w));
	if (!w || !(w->path = strdup(path))) {
		free(w);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}
	w->n_layers = n_layers;
	w->n_experts = n_experts;
	w->f = fopen(path, "we");
	if (!w->f) {
		int r = -errno;

		free(w->path);
		free(w);
		return moe_err_set(err, r, "%s: cannot create: %s", path, strerror(-r));
	}
	if (fprintf(w->f, "%s %d %" PRIu32 " %" PRIu32 "\n", MOE_TRACE_MAGIC, MOE_TRACE_VERSION,
		    n_layers, n_experts) < 0)
		w->error = errno ? -errno : -EIO;
	*ret = w;
	return 0;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int moe_trace_write(struct moe_trace_writer *w, uint32_t li, const uint32_t *experts, uint32_t n,
		    struct moe_err *err)
{
	if (li >= w->n_layers)
		return moe_err_set(err, -EINVAL, "%s: layer index %" PRIu32 " is out of range "
				   "(%" PRIu32 " MoE layers)", w->path, li, w->n_layers);
	if (n > w->buf_cap) {
		uint32_t *b = realloc(w->buf, (size_t)n * sizeof(*b));

		if (!b)
			return moe_err_set(err, -ENOMEM, "%s: out of memory", w->path);
		w->buf = b;
		w->buf_cap = n;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (experts[i] >= w->n_experts)
			return moe_err_set(err, -EINVAL, "%s: layer index %" PRIu32 ": expert %" PRIu32
					   " is out of range (%" PRIu32 " experts)", w->path, li,
					   experts[i], w->n_experts);
		w->buf[i] = experts[i];
	}
	if (n > 1)
		qsort(w->buf, n, sizeof(*w->buf), cmp_u32);
	for (uint32_t i = 1; i < n; i++)
		if (w->buf[i] == w->buf[i - 1])
			return moe_err_set(err, -EINVAL, "%s: layer index %" PRIu32 ": expert %" PRIu32
					   " is given twice", w->path, li, w->buf[i]);
	if (w->error)
		return moe_err_set(err, w->error, "%s: write error: %s", w->path, strerror(-w->error));

	errno = 0;
	if (fprintf(w->f, "%" PRIu32, li) < 0)
		goto fail;
	for (uint32_t i = 0; i < n; i++)
		if (fprintf(w->f, " %" PRIu32, w->buf[i]) < 0)
			goto fail;
	if (fputc('\n', w->f) == EOF)
		goto fail;
	return 0;
fail:
	w->error = errno ? -errno : -EIO;
	return moe_err_set(err, w->error, "%s: write error: %s", w->path, strerror(-w->error));
}

int moe_trace_close_write(struct moe_trace_writer *w, struct moe_err *err)
{
	int r = 0;

	if (!w)
		return 0;
	errno = 0;
	if (fflush(w->f) == EOF && !w->error)
		w->error = errno ? -errno : -EIO;
	errno = 0;
	if (fclose(w->f) == EOF && !w->error)
		w->error = errno ? -errno : -EIO;
	if (w->error)
		r = moe_err_set(err, w->error, "%s: write error: %s", w->path, strerror(-w->error));
	free(w->buf);
	free(w->path);
	free(w);
	return r;
}

/* --- reading ------------------------------------------------------------------ */

struct reader {
	const char *path;
	size_t line;            /* 1-based number of the line being parsed */
	const char *p, *end;    /* the rest of the line */
	struct moe_err *err;
};

static bool is_blank(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* The next field of the line, or false at its end. */
static bool next_field(struct reader *rd, const char **tok, size_t *len)
{
	const char *p = rd->p;

	while (p < rd->end && is_blank(*p))
		p++;
	if (p == rd->end)
		return false;
	*tok = p;
	while (p < rd->end && !is_blank(*p))
		p++;
	*len = (size_t)(p - *tok);
	rd->p = p;
	return true;
}

static int bad(struct reader *rd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "PATH:LINE: message"; returns -EINVAL. */
static int bad(struct reader *rd, const char *fmt, ...)
{
	char msg[MOE_ERR_MSG_MAX / 2];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return moe_err_set(rd->err, -EINVAL, "%s:%zu: %s", rd->path, rd->line, msg);
}

/* The next field as an unsigned decimal number; @what names it in messages. */
static int next_u32(struct reader *rd, const char *what, uint32_t *ret)
{
	const char *tok;
	uint64_t v = 0;
	size_t len;

	if (!next_field(rd, &tok, &len))
		return bad(rd, "missing %s", what);
	for (size_t i = 0; i < len; i++) {
		if (tok[i] < '0' || tok[i] > '9')
			return bad(rd, "%s '%.*s' is not a number", what,
				   (int)(len < TRACE_QUOTE_MAX ? len : TRACE_QUOTE_MAX), tok);
		v = v * 10 + (uint64_t)(tok[i] - '0');
		if (v > UINT32_MAX)
			return bad(rd, "%s '%.*s' is too large", what,
				   (int)(len < TRACE_QUOTE_MAX ? len : TRACE_QUOTE_MAX), tok);
	}
	*ret = (uint32_t)v;
	return 0;
}

static int parse_header(struct reader *rd, struct moe_trace *t)
{
	const char *tok;
	uint32_t version;
	size_t len;
	int r;

	if (!next_field(rd, &tok, &len) || len != strlen(MOE_TRACE_MAGIC) ||
	    memcmp(tok, MOE_TRACE_MAGIC, len))
		return bad(rd, "not a routing trace: the first line must be "
			   "'" MOE_TRACE_MAGIC " %d LAYERS EXPERTS'", MOE_TRACE_VERSION);
	if ((r = next_u32(rd, "version", &version)) < 0)
		return r;
	if (version != MOE_TRACE_VERSION)
		return bad(rd, "trace version %" PRIu32 " is not supported (this reader knows %d)",
			   version, MOE_TRACE_VERSION);
	if ((r = next_u32(rd, "number of MoE layers", &t->n_layers)) < 0 ||
	    (r = next_u32(rd, "number of experts", &t->n_experts)) < 0)
		return r;
	if (next_field(rd, &tok, &len))
		return bad(rd, "unexpected '%.*s' after the header",
			   (int)(len < TRACE_QUOTE_MAX ? len : TRACE_QUOTE_MAX), tok);
	if (!key_space_ok(t->n_layers, t->n_experts))
		return bad(rd, "%" PRIu32 " layers x %" PRIu32 " experts is not a key space "
			   "(each at least 1, fewer than 2^32-1 keys)", t->n_layers, t->n_experts);
	return 0;
}

static int push(struct moe_trace *t, size_t *cap, uint32_t key, struct reader *rd)
{
	if (t->n == *cap) {
		size_t nc = *cap ? *cap * 2 : 4096;
		uint32_t *k = nc > SIZE_MAX / sizeof(*k) ? NULL : realloc(t->keys, nc * sizeof(*k));

		if (!k)
			return moe_err_set(rd->err, -ENOMEM, "%s:%zu: out of memory", rd->path, rd->line);
		t->keys = k;
		*cap = nc;
	}
	t->keys[t->n++] = key;
	return 0;
}

/* One "<layer_index> <expert> ..." line. */
static int parse_batch(struct reader *rd, struct moe_trace *t, size_t *cap)
{
	uint32_t li, e, prev = 0;
	bool first = true;
	int r;

	if ((r = next_u32(rd, "layer index", &li)) < 0)
		return r;
	if (li >= t->n_layers)
		return bad(rd, "layer index %" PRIu32 " is out of range (the trace has %" PRIu32
			   " MoE layers)", li, t->n_layers);
	for (;;) {
		while (rd->p < rd->end && is_blank(*rd->p))
			rd->p++;
		if (rd->p == rd->end)
			break;
		if ((r = next_u32(rd, "expert", &e)) < 0)
			return r;
		if (e >= t->n_experts)
			return bad(rd, "expert %" PRIu32 " is out of range (the trace has %" PRIu32
				   " experts per layer)", e, t->n_experts);
		if (!first && e == prev)
			return bad(rd, "expert %" PRIu32 " is listed twice", e);
		if (!first && e < prev)
			return bad(rd, "experts are not in ascending order (%" PRIu32 " after %" PRIu32 ")",
				   e, prev);
		if ((r = push(t, cap, li * t->n_experts + e, rd)) < 0)
			return r;
		prev = e;
		first = false;
	}
	return push(t, cap, MOE_CACHE_NONE, rd);
}

int moe_trace_read(const char *path, struct moe_trace **ret, struct moe_err *err)
{
	struct reader rd = { .path = path, .err = err };
	struct moe_trace *t;
	char *line = NULL;
	size_t line_cap = 0, cap = 0;
	bool header = false;
	ssize_t len;
	FILE *f;
	int r = 0;

	f = fopen(path, "re");
	if (!f)
		return moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	t = calloc(1, sizeof(*t));
	if (!t) {
		fclose(f);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}
	for (;;) {
		errno = 0;
		len = getline(&line, &line_cap, f);
		if (len < 0)
			break;
		rd.line++;
		rd.p = line;
		rd.end = line + len;
		if (!header) {
			if ((r = parse_header(&rd, t)) < 0)
				goto fail;
			header = true;
			continue;
		}
		while (rd.p < rd.end && is_blank(*rd.p))
			rd.p++;
		if (rd.p == rd.end || *rd.p == '#')
			continue;
		if ((r = parse_batch(&rd, t, &cap)) < 0)
			goto fail;
	}
	if (!feof(f)) {
		int e = errno ? errno : EIO;

		r = moe_err_set(err, -e, "%s: read error after line %zu: %s", path, rd.line, strerror(e));
		goto fail;
	}
	if (!header) {
		rd.line = 1;
		r = bad(&rd, "empty file: no '" MOE_TRACE_MAGIC " %d LAYERS EXPERTS' header",
			MOE_TRACE_VERSION);
		goto fail;
	}
	free(line);
	fclose(f);
	*ret = t;
	return 0;

fail:
	free(line);
	fclose(f);
	moe_trace_free(t);
	return r;
}

void moe_trace_free(struct moe_trace *t)
{
	if (!t)
		return;
	free(t->keys);
	free(t);
}
