/* SPDX-License-Identifier: MIT */
/*
 * moed.conf(5): one table of settings (name, kind, field, default,
 * bounds, whether a reload applies it) drives the defaults, the checks,
 * the dump and the comparison of two configurations, so that a setting
 * cannot be parsed one way and documented or dumped another.
 *
 * Over 1,000 lines on purpose: every function here walks that table, which
 * is private to this file; splitting the file would publish the table and
 * its field offsets to other files for no reader's gain.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <libconfig.h>

#include "conf.h"
#include "engine/io.h"

/* A configuration file is a page of text; anything bigger is a mistake. */
#define FILE_MAX (1 << 20)
/* Room for the path in struct sockaddr_un, with its NUL. */
#define SOCKET_PATH_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)
/* Largest user or group id: (uid_t)-1 means "no id" to the kernel. */
#define ID_MAX UINT64_C(4294967294)
/* Layer and expert numbers in cache.pin (the model checks the real ones). */
#define PIN_MAX 65535
/* Longest group name (LOGIN_NAME_MAX less the NUL). */
#define GROUP_NAME_MAX 255
/* Files followed through @include for the integer scan. */
#define MAX_FILES 16

enum kind {
	K_STRING,   /* a non-empty string of at most max bytes */
	K_CHOICE,   /* one of choices */
	K_U32,      /* an integer in min..max, a multiple of step */
	K_U64,
	K_BOOL,
	K_MODE,     /* a file mode: an octal string "0660" or an integer */
	K_GROUP,    /* a group name or number, or "" */
	K_LEVEL,    /* a log level name or 0..7 */
	K_PINS,     /* an array of "L:E" / "L:*" strings */
	K_UIDS,     /* users / groups by name or number, resolved at load */
	K_GIDS,
};

struct setting {
	const char *name;            /* as in the file: "group.name" */
	enum kind kind;
	size_t off;                  /* the field in struct moed_config */
	size_t off_n;                /* K_PINS, K_UIDS, K_GIDS: the count */
	uint64_t min, max;           /* integers: bounds; strings: max length */
	uint32_t step;               /* integers: a multiple of this (0: any) */
	bool live;                   /* a reload (SIGHUP) applies it */
	uint64_t def;                /* default of numbers and booleans */
	const char *def_s;           /* default of strings */
	const char *const *choices;  /* K_CHOICE, NULL-terminated */
};

static const char *const backends[] = { "auto", "cpu", "cuda", NULL };
static const char *const policies[] = { "auto", "freq", "lru", NULL };
static const char *const level_names[8] = {
	"emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
};

#define OFF(f) offsetof(struct moed_config, f)

/* In the order of moed.conf(5) and of the dump. */
static const struct setting settings[] = {
	{ "model", K_STRING, OFF(model), .max = PATH_MAX - 1, .def_s = "/var/lib/moed/model.moe" },
	{ "backend", K_CHOICE, OFF(backend), .choices = backends, .def_s = "auto" },
	{ "threads", K_U32, OFF(threads), .max = MOE_ENGINE_THREADS_MAX },
	{ "socket.path", K_STRING, OFF(socket.path), .max = SOCKET_PATH_MAX, .def_s = "/run/moed/moed.sock" },
	{ "socket.mode", K_MODE, OFF(socket.mode), .max = 0777, .def = 0660 },
	{ "socket.group", K_GROUP, OFF(socket.group), .max = GROUP_NAME_MAX, .def_s = "moed" },
	{ "access.uids", K_UIDS, OFF(access.uids), OFF(access.n_uids), .max = ID_MAX, .live = true },
	{ "access.gids", K_GIDS, OFF(access.gids), OFF(access.n_gids), .max = ID_MAX, .live = true },
	{ "cache.gpu_mb", K_U64, OFF(cache.gpu_mb), .max = MOE_ENGINE_CACHE_MB_MAX },
	{ "cache.host_mb", K_U64, OFF(cache.host_mb), .min = 1, .max = MOE_ENGINE_CACHE_MB_MAX,
	  .def = MOE_ENGINE_HOST_MB_DEFAULT },
	{ "cache.pin", K_PINS, OFF(cache.pin), OFF(cache.n_pin), .live = true },
	{ "cache.pin_hot", K_U32, OFF(cache.pin_hot), .max = MOE_ENGINE_PIN_HOT_MAX, .live = true },
	{ "cache.policy", K_CHOICE, OFF(cache.policy), .choices = policies, .def_s = "auto" },
	{ "pager.queue_depth", K_U32, OFF(pager.queue_depth), .min = MOE_PAGER_QUEUE_DEPTH_MIN,
	  .max = MOE_PAGER_QUEUE_DEPTH_MAX, .def = MOE_PAGER_QUEUE_DEPTH_DEFAULT },
	{ "pager.chunk_kb", K_U32, OFF(pager.chunk_kb), .min = MOE_PAGER_CHUNK_KB_MIN,
	  .max = MOE_PAGER_CHUNK_KB_MAX, .step = MOE_PAGER_CHUNK_KB_STEP, .def = MOE_PAGER_CHUNK_KB_DEFAULT },
	{ "pager.prefetch", K_BOOL, OFF(pager.prefetch), .def = true },
	{ "batch.window_us", K_U32, OFF(batch.window_us), .max = 1000000, .live = true },
	{ "batch.max_tokens", K_U32, OFF(batch.max_tokens), .min = 1, .max = 1 << 20, .def = 8192,
	  .live = true },
	{ "limits.max_clients", K_U32, OFF(limits.max_clients), .min = 1, .max = 1024, .def = 64 },
	{ "limits.max_tokens_per_request", K_U32, OFF(limits.max_tokens_per_request), .min = 1,
	  .max = 1 << 20, .def = 8192, .live = true },
	{ "limits.segment_mb", K_U32, OFF(limits.segment_mb), .min = 1, .max = 65536, .def = 64 },
	{ "log.level", K_LEVEL, OFF(log.level), .max = 7, .def = 6, .live = true },
};

#define N_SETTINGS (sizeof(settings) / sizeof(settings[0]))

#define FIELD(c, k, type) ((type *)(void *)((char *)(c) + (k)->off))
#define CFIELD(c, k, type) ((type const *)(const void *)((const char *)(c) + (k)->off))
#define COUNT(c, k) ((size_t *)(void *)((char *)(c) + (k)->off_n))
#define CCOUNT(c, k) ((const size_t *)(const void *)((const char *)(c) + (k)->off_n))

/* --- a growing string ------------------------------------------------------------ */

struct strbuf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void sb_printf(struct strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(struct strbuf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->oom)
		return;
	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0) {
		b->oom = true;
		return;
	}
	if (b->len + (size_t)n + 1 > b->cap) {
		size_t cap = (b->len + (size_t)n + 1) * 2;
		char *p = realloc(b->p, cap);

		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

/* @s as a libconfig string literal. */
static void sb_quoted(struct strbuf *b, const char *s)
{
	sb_printf(b, "\"");
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			sb_printf(b, "\\%c", ch);
		else if (ch == '\n')
			sb_printf(b, "\\n");
		else if (ch == '\t')
			sb_printf(b, "\\t");
		else if (ch < 0x20 || ch == 0x7f)
			sb_printf(b, "\\x%02x", ch);
		else
			sb_printf(b, "%c", ch);
	}
	sb_printf(b, "\"");
}

/* --- names and messages --------------------------------------------------------- */

static const struct setting *find_setting(const char *name)
{
	for (size_t i = 0; i < N_SETTINGS; i++)
		if (strcmp(settings[i].name, name) == 0)
			return &settings[i];
	return NULL;
}

/* Whether @name is a group of settings ("cache"). */
static bool is_group(const char *name)
{
	size_t n = strlen(name);

	for (size_t i = 0; i < N_SETTINGS; i++)
		if (strncmp(settings[i].name, name, n) == 0 && settings[i].name[n] == '.')
			return true;
	return false;
}

/* The names known in @group ("" for the top level: settings and groups;
 * NULL: every full name), as "a, b, c". */
static void known_names(const char *group, char *buf, size_t len)
{
	size_t used = 0, prev_len = 0;
	const char *prev = NULL;

	buf[0] = '\0';
	for (size_t i = 0; i < N_SETTINGS && used < len; i++) {
		const char *n = settings[i].name, *dot;
		size_t nl = strlen(n);
		int w;

		if (group && *group) {
			size_t g = strlen(group);

			if (strncmp(n, group, g) != 0 || n[g] != '.')
				continue;
			n += g + 1;
			nl = strlen(n);
		} else if (group && (dot = strchr(n, '.'))) {
			nl = (size_t)(dot - n);
		}
		if (prev && prev_len == nl && strncmp(prev, n, nl) == 0)
			continue;   /* a group already listed */
		w = snprintf(buf + used, len - used, "%s%.*s", used ? ", " : "", (int)nl, n);
		used += w > 0 ? (size_t)w : 0;
		prev = n;
		prev_len = nl;
	}
}

static const char *type_name(const config_setting_t *s)
{
	switch (config_setting_type(s)) {
	case CONFIG_TYPE_GROUP: return "a group";
	case CONFIG_TYPE_INT:
	case CONFIG_TYPE_INT64: return "an integer";
	case CONFIG_TYPE_FLOAT: return "a float";
	case CONFIG_TYPE_STRING: return "a string";
	case CONFIG_TYPE_BOOL: return "a boolean";
	case CONFIG_TYPE_ARRAY: return "an array";
	case CONFIG_TYPE_LIST: return "a list";
	default: return "nothing";
	}
}

/* "FILE:LINE: " of @s when reading a file (@path), "" otherwise. */
static void where(char *buf, size_t len, const char *path, const config_setting_t *s)
{
	const char *file;

	buf[0] = '\0';
	if (!path || !s)
		return;
	file = config_setting_source_file(s);
	snprintf(buf, len, "%s:%u: ", file ? file : path, (unsigned)config_setting_source_line(s));
}

/* -EINVAL with "FILE:LINE: NAME: reason". */
static int bad(struct moe_err *err, const char *path, const config_setting_t *s, const char *name,
	       const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static int bad(struct moe_err *err, const char *path, const config_setting_t *s, const char *name,
	       const char *fmt, ...)
{
	char at[PATH_MAX + 32], why[600];
	va_list ap;

	where(at, sizeof(at), path, s);
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return moe_err_set(err, -EINVAL, "%s%s: %s", at, name, why);
}

/* "lo-hi" of an integer setting. */
static const char *range(const struct setting *k, char *buf, size_t len)
{
	if (k->kind == K_MODE)
		snprintf(buf, len, "0-0%" PRIo64, k->max);   /* modes start at 0 */
	else
		snprintf(buf, len, "%" PRIu64 "-%" PRIu64, k->min, k->max);
	return buf;
}

static bool integer_kind(const struct setting *k)
{
	return k->kind == K_U32 || k->kind == K_U64 || k->kind == K_MODE || k->kind == K_LEVEL ||
	       k->kind == K_UIDS || k->kind == K_GIDS;
}

static bool string_kind(const struct setting *k)
{
	return k->kind == K_STRING || k->kind == K_CHOICE || k->kind == K_GROUP || k->kind == K_MODE ||
	       k->kind == K_LEVEL;
}

/* --- integers that libconfig 1.5 reads wrong --------------------------------------- */

/* Whether the literal @lit (a whole token) of setting @k was read right;
 * -EINVAL naming the setting otherwise. */
static int check_literal(const char *file, unsigned line, const struct setting *k, const char *tok,
			 size_t len, struct moe_err *err)
{
	char lit[64], at[PATH_MAX + 32] = "", r[48];
	unsigned long long mag;
	const char *d = lit;
	bool neg = false, hex, huge;
	size_t n;

	if (!k || !integer_kind(k))
		return 0;   /* the tree's checks will name the type */
	if (len >= sizeof(lit))
		len = sizeof(lit) - 1;
	memcpy(lit, tok, len);
	lit[len] = '\0';
	if (*d == '-' || *d == '+')
		neg = *d++ == '-';
	n = strlen(d);
	if (n && d[n - 1] == 'L')
		return 0;   /* a 64-bit literal, read right */
	hex = d[0] == '0' && (d[1] == 'x' || d[1] == 'X');
	if (!hex && strpbrk(d, ".eE"))
		return 0;   /* a float */
	errno = 0;
	mag = strtoull(hex ? d + 2 : d, NULL, hex ? 16 : 10);
	huge = errno == ERANGE;
	if (!huge && mag <= (unsigned long long)INT_MAX + neg)
		return 0;
	if (file)
		snprintf(at, sizeof(at), "%s:%u: ", file, line);
	if (!neg && !huge && mag <= k->max)
		return moe_err_set(err, -EINVAL, "%s%s: %s does not fit in a 32-bit integer; write %sL",
				   at, k->name, lit, lit);
	return moe_err_set(err, -EINVAL, "%s%s: %s is out of range (%s)", at, k->name, lit,
			   range(k, r, sizeof(r)));
}

static bool is_bool_word(const char *p, size_t n)
{
	return (n == 4 && strncasecmp(p, "true", 4) == 0) || (n == 5 && strncasecmp(p, "false", 5) == 0);
}

/*
 * libconfig 1.5 reads integer literals with atoi(): "host_mb = 4294971392;"
 * becomes 4096 without a word.  So before the parsed values are trusted,
 * the text is scanned for integer literals without the L of a 64-bit
 * integer that an int cannot hold.  Each literal is given to the setting
 * whose name (and group) came last, or to @only (moed_config_set()).
 * Comments, strings and @include lines are skipped; the text has already
 * parsed, so every token has libconfig's shape.
 */
static int scan_integers(const char *file, const char *text, const struct setting *only,
			 struct moe_err *err)
{
	char groups[4][64], last[64] = "", name[160];
	unsigned line = 1, depth = 0;
	const char *p = text, *q;
	int r;

	while (*p) {
		if (*p == '\n') {
			line++;
			p++;
		} else if (*p == '#' || *p == '@' || (p[0] == '/' && p[1] == '/')) {
			while (*p && *p != '\n')
				p++;
		} else if (p[0] == '/' && p[1] == '*') {
			for (p += 2; *p && !(p[0] == '*' && p[1] == '/'); p++)
				line += *p == '\n';
			if (*p)
				p += 2;
		} else if (*p == '"') {
			for (p++; *p && *p != '"'; p++) {
				if (*p == '\\' && p[1])
					p++;
				line += *p == '\n';
			}
			if (*p)
				p++;
		} else if (isalpha((unsigned char)*p) || *p == '*') {
			for (q = p; isalnum((unsigned char)*q) || *q == '-' || *q == '_' || *q == '*'; q++)
				;
			if (!is_bool_word(p, (size_t)(q - p)))
				snprintf(last, sizeof(last), "%.*s", (int)(q - p), p);
			p = q;
		} else if (*p == '{') {
			if (depth < 4)
				memcpy(groups[depth], last, sizeof(last));
			depth++;
			p++;
		} else if (*p == '}') {
			depth -= depth > 0;
			p++;
		} else if (isdigit((unsigned char)*p) ||
			   ((*p == '-' || *p == '+' || *p == '.') && isdigit((unsigned char)p[1]))) {
			const struct setting *k = only;

			for (q = p + 1; isalnum((unsigned char)*q) || *q == '.' ||
			     ((*q == '-' || *q == '+') && (q[-1] == 'e' || q[-1] == 'E')); q++)
				;
			if (!k && depth <= 1) {
				if (depth)
					snprintf(name, sizeof(name), "%s.%s", groups[0], last);
				else
					snprintf(name, sizeof(name), "%s", last);
				k = find_setting(name);
			}
			r = check_literal(file, line, k, p, (size_t)(q - p), err);
			if (r < 0)
				return r;
			p = q;
		} else {
			p++;
		}
	}
	return 0;
}

/* The files that settings under @s came from (@include), up to MAX_FILES. */
static void collect_files(const config_setting_t *s, const char **files, size_t *n)
{
	const char *f = config_setting_source_file(s);
	size_t i;

	if (f) {
		for (i = 0; i < *n && strcmp(files[i], f) != 0; i++)
			;
		if (i == *n && *n < MAX_FILES)
			files[(*n)++] = f;
	}
	if (config_setting_is_aggregate(s))
		for (int j = 0; j < config_setting_length(s); j++)
			collect_files(config_setting_get_elem(s, (unsigned)j), files, n);
}

/* --- values ------------------------------------------------------------------------ */

static bool get_int(const config_setting_t *s, long long *v)
{
	if (config_setting_type(s) != CONFIG_TYPE_INT && config_setting_type(s) != CONFIG_TYPE_INT64)
		return false;
	*v = config_setting_get_int64(s);
	return true;
}

/* Decimal digits at *@pp (at most 9, no sign), value at most @max. */
static bool number(const char **pp, uint32_t max, uint32_t *ret)
{
	const char *p = *pp;
	uint32_t v = 0;
	int n = 0;

	for (; isdigit((unsigned char)*p) && n < 10; p++, n++)
		v = v * 10 + (uint32_t)(*p - '0');
	if (n == 0 || n > 9 || v > max)
		return false;
	*pp = p;
	*ret = v;
	return true;
}

/* "L:E" or "L:*". */
static bool pin_ok(const char *s)
{
	uint32_t v;

	if (!number(&s, PIN_MAX, &v) || *s++ != ':')
		return false;
	if (s[0] == '*' && !s[1])
		return true;
	return number(&s, PIN_MAX, &v) && !*s;
}

int moed_config_parse_log_level(const char *s)
{
	if (s && isdigit((unsigned char)s[0]) && s[0] <= '7' && !s[1])
		return s[0] - '0';
	if (!s)
		return -EINVAL;
	if (strcasecmp(s, "error") == 0)
		return 3;
	if (strcasecmp(s, "warn") == 0)
		return 4;
	for (int i = 0; i < 8; i++)
		if (strcasecmp(s, level_names[i]) == 0)
			return i;
	return -EINVAL;
}

const char *moed_config_log_level_name(int level)
{
	return level >= 0 && level < 8 ? level_names[level] : "?";
}

/* Resolve a user (@group false) or group name: 0, -ENOENT when there is
 * none, or -errno of the lookup. */
static int lookup_id(bool group, const char *name, uint32_t *ret)
{
	long hint = sysconf(group ? _SC_GETGR_R_SIZE_MAX : _SC_GETPW_R_SIZE_MAX);
	size_t len = hint > 0 ? (size_t)hint : 4096;

	for (;;) {
		char *buf = malloc(len);
		int r;

		if (!buf)
			return -ENOMEM;
		if (group) {
			struct group gr, *res = NULL;

			r = getgrnam_r(name, &gr, buf, len, &res);
			if (!r && res)
				*ret = (uint32_t)res->gr_gid;
			else if (!r)
				r = ENOENT;
		} else {
			struct passwd pw, *res = NULL;

			r = getpwnam_r(name, &pw, buf, len, &res);
			if (!r && res)
				*ret = (uint32_t)res->pw_uid;
			else if (!r)
				r = ENOENT;
		}
		free(buf);
		if (r == ERANGE && len < (1u << 20)) {
			len *= 2;
			continue;
		}
		/* getpwnam_r(3): these also mean "no such name" */
		if (r == ENOENT || r == ESRCH || r == EBADF || r == EPERM)
			return -ENOENT;
		return -r;
	}
}

static int apply_ids(struct moed_config *c, const struct setting *k, const config_setting_t *s,
		     const char *path, struct moe_err *err)
{
	bool group = k->kind == K_GIDS;
	const char *what = group ? "group" : "user";
	int n = config_setting_length(s);
	uint32_t *ids = NULL;
	int r;

	if (config_setting_type(s) != CONFIG_TYPE_ARRAY && config_setting_type(s) != CONFIG_TYPE_LIST)
		return bad(err, path, s, k->name, "expected an array of %s names or ids such as [ \"%s\", \"1000\" ], not %s",
			   what, group ? "adm" : "alice", type_name(s));
	if (n > 0 && !(ids = malloc((size_t)n * sizeof(*ids))))
		return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	for (int i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
		const char *str = config_setting_get_string(e);
		long long v;

		if (get_int(e, &v)) {
			if (v < 0 || (uint64_t)v > k->max) {
				r = bad(err, path, e, k->name, "%lld is out of range (0-%" PRIu64 ")", v, k->max);
				goto fail;
			}
			ids[i] = (uint32_t)v;
		} else if (config_setting_type(e) != CONFIG_TYPE_STRING) {
			r = bad(err, path, e, k->name, "expected a %s name or id, not %s", what, type_name(e));
			goto fail;
		} else if (isdigit((unsigned char)str[0]) && strspn(str, "0123456789") == strlen(str)) {
			unsigned long long u;

			errno = 0;
			u = strtoull(str, NULL, 10);
			if (errno || u > k->max) {
				r = bad(err, path, e, k->name, "%s is out of range (0-%" PRIu64 ")", str, k->max);
				goto fail;
			}
			ids[i] = (uint32_t)u;
		} else {
			r = lookup_id(group, str, &ids[i]);
			if (r == -ENOENT) {
				r = bad(err, path, e, k->name, "unknown %s '%s'", what, str);
				goto fail;
			}
			if (r < 0) {
				char at[PATH_MAX + 32];

				where(at, sizeof(at), path, e);
				r = moe_err_set(err, r, "%s%s: cannot look up %s '%s': %s", at, k->name, what, str,
						strerror(-r));
				goto fail;
			}
		}
	}
	free(*FIELD(c, k, uint32_t *));
	*FIELD(c, k, uint32_t *) = ids;
	*COUNT(c, k) = (size_t)n;
	return 0;
fail:
	free(ids);
	return r;
}

static int apply_pins(struct moed_config *c, const struct setting *k, const config_setting_t *s,
		      const char *path, struct moe_err *err)
{
	int n = config_setting_length(s), r = 0;
	char **pins, **old;
	size_t n_old;

	if (config_setting_type(s) != CONFIG_TYPE_ARRAY)
		return bad(err, path, s, k->name, "expected an array of strings such as [ \"3:17\", \"3:*\" ], not %s",
			   type_name(s));
	pins = calloc((size_t)n + 1, sizeof(*pins));
	if (!pins)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	for (int i = 0; i < n && !r; i++) {
		const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
		const char *str = config_setting_get_string(e);

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			r = bad(err, path, e, k->name, "expected a string such as \"3:17\", not %s", type_name(e));
		else if (!pin_ok(str))
			r = bad(err, path, e, k->name,
				"'%s' is not LAYER:EXPERT or LAYER:* (numbers 0-%u, e.g. \"3:17\", \"3:*\")",
				str, PIN_MAX);
		else if (!(pins[i] = strdup(str)))
			r = moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	}
	if (r < 0) {
		old = pins;
		n_old = (size_t)n;
	} else {
		old = *FIELD(c, k, char **);
		n_old = *COUNT(c, k);
		*FIELD(c, k, char **) = pins;
		*COUNT(c, k) = (size_t)n;
	}
	for (size_t i = 0; old && i < n_old; i++)
		free(old[i]);
	free(old);
	return r;
}

/* Check the value @s of setting @k and store it in @c (which is unchanged
 * on error).  @path: the file, for "FILE:LINE: " in messages. */
static int apply(struct moed_config *c, const struct setting *k, const config_setting_t *s,
		 const char *path, struct moe_err *err)
{
	const char *str = config_setting_get_string(s);
	char r[48];
	long long v;

	switch (k->kind) {
	case K_U32:
	case K_U64:
		if (!get_int(s, &v))
			return bad(err, path, s, k->name, "expected an integer, not %s", type_name(s));
		if (v < 0 || (uint64_t)v < k->min || (uint64_t)v > k->max)
			return bad(err, path, s, k->name, "%lld is out of range (%s)", v, range(k, r, sizeof(r)));
		if (k->step && v % k->step)
			return bad(err, path, s, k->name, "%lld is not a multiple of %u", v, k->step);
		if (k->kind == K_U32)
			*FIELD(c, k, uint32_t) = (uint32_t)v;
		else
			*FIELD(c, k, uint64_t) = (uint64_t)v;
		return 0;
	case K_BOOL:
		if (config_setting_type(s) != CONFIG_TYPE_BOOL)
			return bad(err, path, s, k->name, "expected true or false, not %s", type_name(s));
		*FIELD(c, k, bool) = config_setting_get_bool(s);
		return 0;
	case K_MODE:
		if (get_int(s, &v)) {
			if (v < 0 || (uint64_t)v > k->max)
				return bad(err, path, s, k->name,
					   "%lld is out of range (%s); write the mode as a string, e.g. \"0660\"",
					   v, range(k, r, sizeof(r)));
		} else if (str) {
			const char *p = str;

			for (v = 0; *p >= '0' && *p <= '7' && p - str < 4; p++)
				v = v * 8 + (*p - '0');
			if (p == str || *p || (uint64_t)v > k->max)
				return bad(err, path, s, k->name,
					   "'%s' is not an octal mode from 0 to 0777 (e.g. \"0660\")", str);
		} else {
			return bad(err, path, s, k->name, "expected an octal string such as \"0660\", not %s",
				   type_name(s));
		}
		*FIELD(c, k, unsigned) = (unsigned)v;
		return 0;
	case K_LEVEL:
		if (get_int(s, &v)) {
			if (v < 0 || (uint64_t)v > k->max)
				return bad(err, path, s, k->name, "%lld is out of range (%s)", v, range(k, r, sizeof(r)));
		} else if (str) {
			v = moed_config_parse_log_level(str);
			if (v < 0)
				return bad(err, path, s, k->name,
					   "'%s' is not a log level (emerg, alert, crit, err, warning, notice, info, debug)",
					   str);
		} else {
			return bad(err, path, s, k->name, "expected a level such as \"info\", not %s", type_name(s));
		}
		*FIELD(c, k, int) = (int)v;
		return 0;
	case K_STRING:
	case K_CHOICE:
	case K_GROUP: {
		char *dup;

		if (config_setting_type(s) != CONFIG_TYPE_STRING)
			return bad(err, path, s, k->name, "expected a string, not %s", type_name(s));
		if (k->kind == K_STRING && !*str)
			return bad(err, path, s, k->name, "must not be empty");
		if (k->kind != K_CHOICE && strlen(str) > k->max)
			return bad(err, path, s, k->name, "'%.40s...' is %zu bytes long (at most %" PRIu64 ")",
				   str, strlen(str), k->max);
		if (k->kind == K_CHOICE) {
			const char *const *ch;
			char list[128];

			for (ch = k->choices; *ch && strcmp(*ch, str) != 0; ch++)
				;
			if (!*ch) {
				list[0] = '\0';
				for (ch = k->choices; *ch; ch++)
					snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s",
						 ch == k->choices ? "" : ", ", *ch);
				return bad(err, path, s, k->name, "'%s' is not one of %s", str, list);
			}
		}
		if (k->kind == K_GROUP)
			for (const char *p = str; *p; p++)
				if (iscntrl((unsigned char)*p) || isspace((unsigned char)*p) || *p == ':' || *p == '/')
					return bad(err, path, s, k->name, "'%s' is not a group name", str);
		dup = strdup(str);
		if (!dup)
			return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
		free(*FIELD(c, k, char *));
		*FIELD(c, k, char *) = dup;
		return 0;
	}
	case K_PINS:
		return apply_pins(c, k, s, path, err);
	case K_UIDS:
	case K_GIDS:
		return apply_ids(c, k, s, path, err);
	}
	return -EINVAL;
}

/* The checks between settings.  @seen: where each setting was in the file
 * (NULL entries: defaults), or NULL. */
static int check_together(const struct moed_config *c, const char *path,
			  const config_setting_t *const *seen, struct moe_err *err)
{
	const struct setting *mtpr = find_setting("limits.max_tokens_per_request");
	const struct setting *bmt = find_setting("batch.max_tokens");
	const struct setting *seg = find_setting("limits.segment_mb");
	size_t bytes;

	if (c->limits.max_tokens_per_request > c->batch.max_tokens) {
		const config_setting_t *s = NULL;

		if (seen)
			s = seen[mtpr - settings] ? seen[mtpr - settings] : seen[bmt - settings];
		return bad(err, path, s, mtpr->name, "%" PRIu32 " is more than batch.max_tokens (%" PRIu32 ")",
			   c->limits.max_tokens_per_request, c->batch.max_tokens);
	}
	/* the segment is mapped as one object: its bytes must fit a size_t */
	if (__builtin_mul_overflow((size_t)c->limits.segment_mb, (size_t)1 << 20, &bytes))
		return bad(err, path, seen ? seen[seg - settings] : NULL, seg->name,
			   "%" PRIu32 " MiB does not fit in this machine's address space", c->limits.segment_mb);
	return 0;
}

/* --- the file ----------------------------------------------------------------------- */

/* The whole text file @path, NUL-terminated. */
static int read_text(const char *path, char **ret, struct moe_err *err)
{
	struct stat st;
	char *text = NULL;
	int64_t n;
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		return moe_err_set(err, r, "%s: %s", path, strerror(-r));
	}
	if (fstat(fd, &st) < 0) {
		r = -errno;
		r = moe_err_set(err, r, "%s: %s", path, strerror(-r));
	} else if (S_ISDIR(st.st_mode)) {
		r = moe_err_set(err, -EISDIR, "%s: %s", path, strerror(EISDIR));
	} else if (!S_ISREG(st.st_mode)) {
		r = moe_err_set(err, -EINVAL, "%s: not a regular file", path);
	} else if (st.st_size > FILE_MAX) {
		r = moe_err_set(err, -EINVAL, "%s: %lld bytes is too big for a configuration file (at most %d)",
				path, (long long)st.st_size, FILE_MAX);
	} else if (!(text = malloc((size_t)st.st_size + 1))) {
		r = moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	} else if ((n = moe_pread_full(fd, text, (uint64_t)st.st_size, 0)) < 0) {
		r = moe_err_set(err, (int)n, "%s: %s", path, strerror((int)-n));
	} else if (memchr(text, '\0', (size_t)n)) {
		r = moe_err_set(err, -EINVAL, "%s: contains a NUL byte; not a text file", path);
	} else {
		text[n] = '\0';
		*ret = text;
		text = NULL;
		r = 0;
	}
	free(text);
	close(fd);
	return r;
}

/*
 * libconfig opens and reads an @include'd file itself, and its scanner
 * exit()s on a read error ("input in flex scanner failed"): an @include of
 * a directory ended moed, on a SIGHUP reload too, and a FIFO blocked it.
 * So every @include in @text (libconfig's syntax: at the start of a line,
 * a quoted name with \\ and \" escapes, relative to the working directory)
 * that names something which exists must be a regular file; the files it
 * names are checked the same way, as deep as libconfig nests.  A missing
 * file is left to libconfig, which reports it.  stat(), not open(): a
 * FIFO is refused without blocking.  Found by fuzz/fuzz_conf.c.
 */
#define INCLUDE_DEPTH 10   /* libconfig's own limit on nested includes */

static int check_includes(const char *file, const char *text, int depth, struct moe_err *err)
{
	unsigned line = 1;

	for (const char *p = text; *p; line++) {
		const char *eol = strchr(p, '\n'), *q = p;
		const char *end = eol ? eol : p + strlen(p);
		char name[PATH_MAX];
		struct stat st;
		size_t k = 0;
		char *inc;
		int r;

		while (q < end && (*q == ' ' || *q == '\t'))
			q++;
		if (end - q > 9 && !strncmp(q, "@include", 8) && (q[8] == ' ' || q[8] == '\t')) {
			for (q += 8; q < end && (*q == ' ' || *q == '\t'); q++)
				;
			if (q < end && *q == '"') {
				for (q++; q < end && *q != '"' && k < sizeof(name) - 1; q++) {
					if (*q == '\\' && q + 1 < end && (q[1] == '\\' || q[1] == '"'))
						q++;
					name[k++] = *q;
				}
				name[k] = '\0';
				if (q < end && *q == '"' && stat(name, &st) == 0) {
					if (!S_ISREG(st.st_mode))
						return moe_err_set(err, -EINVAL, "%s:%u: @include \"%s\": not a regular file",
								   file, line, name);
					if (depth < INCLUDE_DEPTH && read_text(name, &inc, NULL) == 0) {
						r = check_includes(name, inc, depth + 1, err);
						free(inc);
						if (r < 0)
							return r;
					}
				}
			}
		}
		if (!eol)
			break;
		p = eol + 1;
	}
	return 0;
}

/* Every setting under @root into @c, recording where each was in @seen. */
static int load_tree(struct moed_config *c, const config_setting_t *root, const char *path,
		     const config_setting_t **seen, struct moe_err *err)
{
	char list[512], full[160], at[PATH_MAX + 32];
	const struct setting *k;
	int r;

	for (int i = 0; i < config_setting_length(root); i++) {
		const config_setting_t *s = config_setting_get_elem(root, (unsigned)i);
		const char *name = config_setting_name(s);

		if (is_group(name)) {
			if (config_setting_type(s) != CONFIG_TYPE_GROUP)
				return bad(err, path, s, name, "expected a group { ... }, not %s", type_name(s));
			for (int j = 0; j < config_setting_length(s); j++) {
				const config_setting_t *e = config_setting_get_elem(s, (unsigned)j);

				snprintf(full, sizeof(full), "%s.%s", name, config_setting_name(e));
				k = find_setting(full);
				if (!k) {
					known_names(name, list, sizeof(list));
					where(at, sizeof(at), path, e);
					return moe_err_set(err, -EINVAL, "%sunknown setting '%s' (%s has %s)",
							   at, full, name, list);
				}
				r = apply(c, k, e, path, err);
				if (r < 0)
					return r;
				seen[k - settings] = e;
			}
			continue;
		}
		k = find_setting(name);
		if (!k) {
			known_names("", list, sizeof(list));
			where(at, sizeof(at), path, s);
			return moe_err_set(err, -EINVAL, "%sunknown setting '%s' (known: %s)", at, name, list);
		}
		r = apply(c, k, s, path, err);
		if (r < 0)
			return r;
		seen[k - settings] = s;
	}
	return 0;
}

int moed_config_load(const char *path, struct moed_config **ret, struct moe_err *err)
{
	const config_setting_t *seen[N_SETTINGS] = { 0 };
	const char *files[MAX_FILES];
	struct moed_config *c = NULL;
	size_t n_files = 0;
	char *text = NULL;
	config_t cfg;
	int r;

	r = read_text(path, &text, err);
	if (r < 0)
		return r;
	r = check_includes(path, text, 0, err);
	if (r < 0) {
		free(text);
		return r;
	}
	r = moed_config_defaults(&c, err);
	if (r < 0) {
		free(text);
		return r;
	}
	c->path = strdup(path);
	if (!c->path) {
		free(text);
		moed_config_free(c);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", path);
	}

	config_init(&cfg);
	if (!config_read_string(&cfg, text)) {
		const char *file = config_error_file(&cfg);

		r = moe_err_set(err, -EINVAL, "%s:%d: %s", file ? file : path, config_error_line(&cfg),
				config_error_text(&cfg));
		goto out;
	}
	r = scan_integers(path, text, NULL, err);
	if (r < 0)
		goto out;
	collect_files(config_root_setting(&cfg), files, &n_files);
	for (size_t i = 0; i < n_files; i++) {
		char *inc = NULL;

		/* an @include'd file; the top file's settings have no name */
		if (read_text(files[i], &inc, NULL) < 0)
			continue;
		r = scan_integers(files[i], inc, NULL, err);
		free(inc);
		if (r < 0)
			goto out;
	}
	r = load_tree(c, config_root_setting(&cfg), path, seen, err);
	if (r < 0)
		goto out;
	r = check_together(c, path, seen, err);
	if (r < 0)
		goto out;
	*ret = c;
	c = NULL;
out:
	config_destroy(&cfg);
	moed_config_free(c);
	free(text);
	return r;
}

int moed_config_set(struct moed_config *c, const char *name, const char *value, struct moe_err *err)
{
	const struct setting *k = find_setting(name);
	const config_setting_t *root, *s;
	struct strbuf b = { 0 };
	config_t cfg;
	uint32_t old = 0;
	char list[512];
	bool quote;
	int r;

	if (!k && is_group(name)) {
		known_names(name, list, sizeof(list));
		return moe_err_set(err, -EINVAL, "'%s' is a group; set one of its settings (%s)", name, list);
	}
	if (!k) {
		known_names(NULL, list, sizeof(list));
		return moe_err_set(err, -EINVAL, "unknown setting '%s' (known: %s)", name, list);
	}
	quote = string_kind(k) && value[0] != '"';
	sb_printf(&b, "v = ");
	if (quote)
		sb_quoted(&b, value);
	else
		sb_printf(&b, "%s", value);
	sb_printf(&b, ";\n");
	if (b.oom) {
		free(b.p);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", name);
	}

	config_init(&cfg);
	/* one line (no @include), one value (no "1; x = 2"); the root is
	 * new after reading */
	root = NULL;
	if ((quote || !strchr(value, '\n')) && config_read_string(&cfg, b.p))
		root = config_root_setting(&cfg);
	if (!root || config_setting_length(root) != 1) {
		r = moe_err_set(err, -EINVAL, "%s: '%s' is not a value", name, value);
		goto out;
	}
	r = scan_integers(NULL, b.p, k, err);
	if (r < 0)
		goto out;
	s = config_setting_get_elem(root, 0);
	if (k->kind == K_U32)
		old = *FIELD(c, k, uint32_t);
	r = apply(c, k, s, NULL, err);
	if (r < 0)
		goto out;
	r = check_together(c, NULL, NULL, err);
	if (r < 0 && k->kind == K_U32)
		*FIELD(c, k, uint32_t) = old;   /* only numbers take part in those checks */
out:
	config_destroy(&cfg);
	free(b.p);
	return r;
}

/* --- the rest ----------------------------------------------------------------------- */

int moed_config_defaults(struct moed_config **ret, struct moe_err *err)
{
	struct moed_config *c = calloc(1, sizeof(*c));

	if (!c)
		goto oom;
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const struct setting *k = &settings[i];

		switch (k->kind) {
		case K_STRING:
		case K_CHOICE:
		case K_GROUP:
			if (!(*FIELD(c, k, char *) = strdup(k->def_s)))
				goto oom;
			break;
		case K_U32:
			*FIELD(c, k, uint32_t) = (uint32_t)k->def;
			break;
		case K_U64:
			*FIELD(c, k, uint64_t) = k->def;
			break;
		case K_BOOL:
			*FIELD(c, k, bool) = k->def != 0;
			break;
		case K_MODE:
			*FIELD(c, k, unsigned) = (unsigned)k->def;
			break;
		case K_LEVEL:
			*FIELD(c, k, int) = (int)k->def;
			break;
		case K_PINS:
			/* empty, and NULL-terminated like every pin list */
			if (!(*FIELD(c, k, char **) = calloc(1, sizeof(char *))))
				goto oom;
			break;
		case K_UIDS:
		case K_GIDS:
			break;   /* none */
		}
	}
	*ret = c;
	return 0;
oom:
	moed_config_free(c);
	return moe_err_set(err, -ENOMEM, "configuration: out of memory");
}

void moed_config_free(struct moed_config *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const struct setting *k = &settings[i];

		if (k->kind == K_STRING || k->kind == K_CHOICE || k->kind == K_GROUP) {
			free(*FIELD(c, k, char *));
		} else if (k->kind == K_PINS) {
			char **pins = *FIELD(c, k, char **);

			for (size_t j = 0; pins && j < *COUNT(c, k); j++)
				free(pins[j]);
			free(pins);
		} else if (k->kind == K_UIDS || k->kind == K_GIDS) {
			free(*FIELD(c, k, uint32_t *));
		}
	}
	free(c->path);
	free(c);
}

void moed_config_engine_options(const struct moed_config *c, struct moe_engine_options *eo)
{
	memset(eo, 0, sizeof(*eo));
	eo->backend = c->backend;
	eo->threads = c->threads;
	eo->host_bytes = c->cache.host_mb << 20;   /* at most 2^44: MOE_ENGINE_CACHE_MB_MAX */
	eo->device_bytes = c->cache.gpu_mb << 20;
	eo->policy = c->cache.policy;
	eo->pin = (const char *const *)c->cache.pin;
	eo->pin_hot = c->cache.pin_hot;
	eo->prefetch = c->pager.prefetch;
	eo->pager.queue_depth = c->pager.queue_depth;
	eo->pager.chunk_kb = c->pager.chunk_kb;
}

/* The value of @k in @c, as moed_config_set() reads it. */
static void value_text(struct strbuf *b, const struct moed_config *c, const struct setting *k)
{
	switch (k->kind) {
	case K_STRING:
	case K_CHOICE:
	case K_GROUP:
		sb_quoted(b, *CFIELD(c, k, char *));
		break;
	case K_U32:
		sb_printf(b, "%" PRIu32, *CFIELD(c, k, uint32_t));
		break;
	case K_U64:
		sb_printf(b, "%" PRIu64, *CFIELD(c, k, uint64_t));
		break;
	case K_BOOL:
		sb_printf(b, "%s", *CFIELD(c, k, bool) ? "true" : "false");
		break;
	case K_MODE:
		sb_printf(b, "\"%04o\"", *CFIELD(c, k, unsigned));
		break;
	case K_LEVEL:
		sb_printf(b, "\"%s\"", moed_config_log_level_name(*CFIELD(c, k, int)));
		break;
	case K_PINS: {
		char *const *pins = *CFIELD(c, k, char **);

		sb_printf(b, "[");
		for (size_t i = 0; i < *CCOUNT(c, k); i++) {
			sb_printf(b, i ? ", " : " ");
			sb_quoted(b, pins[i]);
		}
		sb_printf(b, " ]");
		break;
	}
	case K_UIDS:
	case K_GIDS: {
		const uint32_t *ids = *CFIELD(c, k, uint32_t *);
		const char *l = "";

		/* ids past an int need libconfig's L, and an array's elements
		 * one type: then every one gets it */
		for (size_t i = 0; i < *CCOUNT(c, k); i++)
			if (ids[i] > INT_MAX)
				l = "L";
		sb_printf(b, "[");
		for (size_t i = 0; i < *CCOUNT(c, k); i++)
			sb_printf(b, "%s%" PRIu32 "%s", i ? ", " : " ", ids[i], l);
		sb_printf(b, " ]");
		break;
	}
	}
}

char *moed_config_dump(const struct moed_config *c)
{
	struct strbuf b = { 0 };

	for (size_t i = 0; i < N_SETTINGS; i++) {
		sb_printf(&b, "%s = ", settings[i].name);
		value_text(&b, c, &settings[i]);
		sb_printf(&b, "\n");
	}
	if (b.oom) {
		free(b.p);
		return NULL;
	}
	return b.p;
}

static bool same(const struct moed_config *a, const struct moed_config *b, const struct setting *k)
{
	switch (k->kind) {
	case K_STRING:
	case K_CHOICE:
	case K_GROUP:
		return strcmp(*CFIELD(a, k, char *), *CFIELD(b, k, char *)) == 0;
	case K_U32:
		return *CFIELD(a, k, uint32_t) == *CFIELD(b, k, uint32_t);
	case K_U64:
		return *CFIELD(a, k, uint64_t) == *CFIELD(b, k, uint64_t);
	case K_BOOL:
		return *CFIELD(a, k, bool) == *CFIELD(b, k, bool);
	case K_MODE:
		return *CFIELD(a, k, unsigned) == *CFIELD(b, k, unsigned);
	case K_LEVEL:
		return *CFIELD(a, k, int) == *CFIELD(b, k, int);
	case K_PINS:
		if (*CCOUNT(a, k) != *CCOUNT(b, k))
			return false;
		for (size_t i = 0; i < *CCOUNT(a, k); i++)
			if (strcmp((*CFIELD(a, k, char **))[i], (*CFIELD(b, k, char **))[i]) != 0)
				return false;
		return true;
	case K_UIDS:
	case K_GIDS:
		return *CCOUNT(a, k) == *CCOUNT(b, k) &&
		       (*CCOUNT(a, k) == 0 ||
			memcmp(*CFIELD(a, k, uint32_t *), *CFIELD(b, k, uint32_t *),
			       *CCOUNT(a, k) * sizeof(uint32_t)) == 0);
	}
	return false;
}

int moed_config_diff(const struct moed_config *a, const struct moed_config *b, bool restart_only,
		     char *buf, size_t len)
{
	size_t used = 0;
	int n = 0;

	if (len)
		buf[0] = '\0';
	for (size_t i = 0; i < N_SETTINGS; i++) {
		const struct setting *k = &settings[i];

		if ((restart_only && k->live) || same(a, b, k))
			continue;
		if (used < len) {
			int w = snprintf(buf + used, len - used, "%s%s", n ? ", " : "", k->name);

			used += w > 0 ? (size_t)w : 0;
		}
		n++;
	}
	return n;
}

/* The bytes of @k's value in struct moed_config (its count apart). */
static size_t value_size(const struct setting *k)
{
	switch (k->kind) {
	case K_STRING:
	case K_CHOICE:
	case K_GROUP:
		return sizeof(char *);
	case K_U32:
		return sizeof(uint32_t);
	case K_U64:
		return sizeof(uint64_t);
	case K_BOOL:
		return sizeof(bool);
	case K_MODE:
		return sizeof(unsigned);
	case K_LEVEL:
		return sizeof(int);
	case K_PINS:
		return sizeof(char **);
	case K_UIDS:
	case K_GIDS:
		return sizeof(uint32_t *);
	}
	return 0;
}

/* Exchange @k's value, and its count if it has one, between @a and @b. */
static void swap_value(struct moed_config *a, struct moed_config *b, const struct setting *k)
{
	unsigned char tmp[sizeof(uint64_t)];
	size_t n = value_size(k);

	_Static_assert(sizeof(char *) <= sizeof(uint64_t), "a pointer fits the swap buffer");
	memcpy(tmp, FIELD(a, k, unsigned char), n);
	memcpy(FIELD(a, k, unsigned char), FIELD(b, k, unsigned char), n);
	memcpy(FIELD(b, k, unsigned char), tmp, n);
	if (k->kind == K_PINS || k->kind == K_UIDS || k->kind == K_GIDS) {
		size_t t = *COUNT(a, k);

		*COUNT(a, k) = *COUNT(b, k);
		*COUNT(b, k) = t;
	}
}

void moed_config_apply_live(struct moed_config *running, struct moed_config *from)
{
	for (size_t i = 0; i < N_SETTINGS; i++)
		if (settings[i].live)
			swap_value(running, from, &settings[i]);
}

bool moed_config_is_live(const char *name)
{
	const struct setting *k = find_setting(name);

	return k && k->live;
}
