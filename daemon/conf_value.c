/* SPDX-License-Identifier: MIT */
/*
 * moed.conf(5): the check of each value against its row of the table
 * (conf.c), the integers libconfig 1.5 reads wrong, and the checks
 * between settings.
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

#include "conf_impl.h"
#include "engine/io.h"

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

	if (!k || !conf_integer_kind(k))
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
			   conf_range(k, r, sizeof(r)));
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
int conf_scan_integers(const char *file, const char *text, const struct setting *only,
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
		} else if ((q = conf_skip(p, true, &line)) != p) {
			p = q;           /* a comment, an @include line, a string */
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
				k = conf_find_setting(name);
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
void conf_collect_files(const config_setting_t *s, const char **files, size_t *n)
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
			conf_collect_files(config_setting_get_elem(s, (unsigned)j), files, n);
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
		return conf_bad(err, path, s, k->name, "expected an array of %s names or ids such as [ \"%s\", \"1000\" ], not %s",
			   what, group ? "adm" : "alice", conf_type_name(s));
	if (n > 0 && !(ids = malloc((size_t)n * sizeof(*ids))))
		return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	for (int i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
		const char *str = config_setting_get_string(e);
		long long v;

		if (get_int(e, &v)) {
			if (v < 0 || (uint64_t)v > k->max) {
				r = conf_bad(err, path, e, k->name, "%lld is out of range (0-%" PRIu64 ")", v, k->max);
				goto fail;
			}
			ids[i] = (uint32_t)v;
		} else if (config_setting_type(e) != CONFIG_TYPE_STRING) {
			r = conf_bad(err, path, e, k->name, "expected a %s name or id, not %s", what, conf_type_name(e));
			goto fail;
		} else if (isdigit((unsigned char)str[0]) && strspn(str, "0123456789") == strlen(str)) {
			unsigned long long u;

			errno = 0;
			u = strtoull(str, NULL, 10);
			if (errno || u > k->max) {
				r = conf_bad(err, path, e, k->name, "%s is out of range (0-%" PRIu64 ")", str, k->max);
				goto fail;
			}
			ids[i] = (uint32_t)u;
		} else {
			r = lookup_id(group, str, &ids[i]);
			if (r == -ENOENT) {
				r = conf_bad(err, path, e, k->name, "unknown %s '%s'", what, str);
				goto fail;
			}
			if (r < 0) {
				char at[PATH_MAX + 32];

				conf_where(at, sizeof(at), path, e);
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
		return conf_bad(err, path, s, k->name, "expected an array of strings such as [ \"3:17\", \"3:*\" ], not %s",
			   conf_type_name(s));
	pins = calloc((size_t)n + 1, sizeof(*pins));
	if (!pins)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	for (int i = 0; i < n && !r; i++) {
		const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
		const char *str = config_setting_get_string(e);

		if (config_setting_type(e) != CONFIG_TYPE_STRING)
			r = conf_bad(err, path, e, k->name, "expected a string such as \"3:17\", not %s", conf_type_name(e));
		else if (!pin_ok(str))
			r = conf_bad(err, path, e, k->name,
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
int conf_apply(struct moed_config *c, const struct setting *k, const config_setting_t *s,
		 const char *path, struct moe_err *err)
{
	const char *str = config_setting_get_string(s);
	char r[48];
	long long v;

	switch (k->kind) {
	case K_U32:
	case K_U64:
		if (!get_int(s, &v))
			return conf_bad(err, path, s, k->name, "expected an integer, not %s", conf_type_name(s));
		if (v < 0 || (uint64_t)v < k->min || (uint64_t)v > k->max)
			return conf_bad(err, path, s, k->name, "%lld is out of range (%s)", v, conf_range(k, r, sizeof(r)));
		if (k->step && v % k->step)
			return conf_bad(err, path, s, k->name, "%lld is not a multiple of %u", v, k->step);
		if (k->kind == K_U32)
			*FIELD(c, k, uint32_t) = (uint32_t)v;
		else
			*FIELD(c, k, uint64_t) = (uint64_t)v;
		return 0;
	case K_BOOL:
		if (config_setting_type(s) != CONFIG_TYPE_BOOL)
			return conf_bad(err, path, s, k->name, "expected true or false, not %s", conf_type_name(s));
		*FIELD(c, k, bool) = config_setting_get_bool(s);
		return 0;
	case K_MODE:
		if (get_int(s, &v)) {
			if (v < 0 || (uint64_t)v > k->max)
				return conf_bad(err, path, s, k->name,
					   "%lld is out of range (%s); write the mode as a string, e.g. \"0660\"",
					   v, conf_range(k, r, sizeof(r)));
		} else if (str) {
			const char *p = str;

			for (v = 0; *p >= '0' && *p <= '7' && p - str < 4; p++)
				v = v * 8 + (*p - '0');
			if (p == str || *p || (uint64_t)v > k->max)
				return conf_bad(err, path, s, k->name,
					   "'%s' is not an octal mode from 0 to 0777 (e.g. \"0660\")", str);
		} else {
			return conf_bad(err, path, s, k->name, "expected an octal string such as \"0660\", not %s",
				   conf_type_name(s));
		}
		*FIELD(c, k, unsigned) = (unsigned)v;
		return 0;
	case K_LEVEL:
		if (get_int(s, &v)) {
			if (v < 0 || (uint64_t)v > k->max)
				return conf_bad(err, path, s, k->name, "%lld is out of range (%s)", v, conf_range(k, r, sizeof(r)));
		} else if (str) {
			v = moed_config_parse_log_level(str);
			if (v < 0)
				return conf_bad(err, path, s, k->name,
					   "'%s' is not a log level (emerg, alert, crit, err, warning, notice, info, debug)",
					   str);
		} else {
			return conf_bad(err, path, s, k->name, "expected a level such as \"info\", not %s", conf_type_name(s));
		}
		*FIELD(c, k, int) = (int)v;
		return 0;
	case K_STRING:
	case K_CHOICE:
	case K_GROUP: {
		char *dup;

		if (config_setting_type(s) != CONFIG_TYPE_STRING)
			return conf_bad(err, path, s, k->name, "expected a string, not %s", conf_type_name(s));
		if (k->kind == K_STRING && !*str)
			return conf_bad(err, path, s, k->name, "must not be empty");
		if (k->kind != K_CHOICE && strlen(str) > k->max)
			return conf_bad(err, path, s, k->name, "'%.40s...' is %zu bytes long (at most %" PRIu64 ")",
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
				return conf_bad(err, path, s, k->name, "'%s' is not one of %s", str, list);
			}
		}
		if (k->kind == K_GROUP)
			for (const char *p = str; *p; p++)
				if (iscntrl((unsigned char)*p) || isspace((unsigned char)*p) || *p == ':' || *p == '/')
					return conf_bad(err, path, s, k->name, "'%s' is not a group name", str);
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
int conf_check_together(const struct moed_config *c, const char *path,
			  const config_setting_t *const *seen, struct moe_err *err)
{
	const struct setting *mtpr = conf_find_setting("limits.max_tokens_per_request");
	const struct setting *bmt = conf_find_setting("batch.max_tokens");
	const struct setting *seg = conf_find_setting("limits.segment_mb");
	size_t bytes;

	if (c->limits.max_tokens_per_request > c->batch.max_tokens) {
		const config_setting_t *s = NULL;

		if (seen)
			s = seen[mtpr - conf_settings] ? seen[mtpr - conf_settings] : seen[bmt - conf_settings];
		return conf_bad(err, path, s, mtpr->name, "%" PRIu32 " is more than batch.max_tokens (%" PRIu32 ")",
			   c->limits.max_tokens_per_request, c->batch.max_tokens);
	}
	/* the segment is mapped as one object: its bytes must fit a size_t */
	if (__builtin_mul_overflow((size_t)c->limits.segment_mb, (size_t)1 << 20, &bytes))
		return conf_bad(err, path, seen ? seen[seg - conf_settings] : NULL, seg->name,
			   "%" PRIu32 " MiB does not fit in this machine's address space", c->limits.segment_mb);
	return 0;
}
