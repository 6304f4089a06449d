/* SPDX-License-Identifier: MIT */
/*
 * moed.conf(5): reading a file (and what it @includes) into a
 * configuration, a -o NAME=VALUE override, the defaults and the release.
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

/* A configuration file is a page of text; anything bigger is a mistake. */
#define FILE_MAX (1 << 20)

/* --- the file ----------------------------------------------------------------------- */

/*
 * The whole text file @path, NUL-terminated.  Opened with O_NONBLOCK so
 * that a FIFO or a device at the path cannot block the control thread in
 * open() (a FIFO with no writer does, for good), and refused by fstat
 * before a byte is read; for a regular file O_NONBLOCK changes nothing.
 */
int conf_read_text(const char *path, char **ret, struct moe_err *err)
{
	struct stat st;
	char *text = NULL;
	int64_t n;
	int fd, r;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
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
		r = moe_err_set(err, -EINVAL, "%s: not a regular file (%s); a configuration file must be one",
				path, S_ISFIFO(st.st_mode) ? "a FIFO" : S_ISSOCK(st.st_mode) ? "a socket" :
				S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device" : "not a file");
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

#define INCLUDE_DEPTH 10   /* libconfig 1.5's own limit on nested @include */
#define NEST_MAX 64        /* groups, arrays and lists open at once, for the string scan */

/*
 * libconfig (1.5, and its grammar still upstream) leaks the string of a
 * string token that is the lookahead of a syntax error (the parser has no
 * %destructor for it): a file holding just "" leaks a byte per reload.  So
 * the text is scanned first for a string where libconfig's grammar cannot
 * take one, and refused here with libconfig's own words, before the parser
 * sees it.  A string may start a value (after '=' or ':', '[' or '(', or
 * a ',' inside an array or a list) or continue one (after a string: they
 * are joined); anywhere else it is the syntax error that leaks.  Comments
 * and @include lines are skipped as the scanner skips them.
 */
int conf_check_strings(const char *file, const char *text, struct moe_err *err)
{
	char nest[NEST_MAX], prev = ';';    /* ';': the start, as after a setting */
	unsigned line = 1, depth = 0;
	const char *p = text, *q;

	while (*p) {
		char ch = *p;

		if (ch == '\n') {
			line++;
			p++;
		} else if (isspace((unsigned char)ch)) {
			p++;
		} else if ((q = conf_skip(p, false, &line)) != p) {
			p = q;           /* a comment, an @include line */
		} else if (ch == '"') {
			bool value_start = prev == '=' || prev == ':' || prev == '[' || prev == '(' ||
					   (prev == ',' && depth && nest[depth - 1] != '{');

			if (!value_start && prev != '"')
				return moe_err_set(err, -EINVAL, "%s:%u: syntax error (a string where a setting "
						   "name or a value's end is expected)", file, line);
			p = conf_skip(p, true, &line);
			prev = '"';
		} else if (strchr("[({", ch)) {
			if (depth < NEST_MAX)
				nest[depth] = ch;
			depth++;
			prev = ch;
			p++;
		} else if (strchr("])}=:,;", ch)) {
			if (strchr("])}", ch) && depth)
				depth--;
			prev = ch;
			p++;
		} else {
			/* a name, a number, a boolean: anything up to the next token */
			while (*p && !isspace((unsigned char)*p) && !strchr("\"#@[](){}=:,;", *p) &&
			       !(p[0] == '/' && (p[1] == '/' || p[1] == '*')))
				p++;
			prev = 'w';
		}
		if (depth > NEST_MAX)
			return moe_err_set(err, -EINVAL, "%s:%u: more than %d groups, arrays and lists inside "
					   "each other", file, line, NEST_MAX);
	}
	return 0;
}

/*
 * libconfig opens @include'd files itself, with a plain fopen() that blocks
 * for good on a FIFO: so each @include line of @text (and of the files it
 * names, down to libconfig's depth) is read here first with conf_read_text(),
 * which refuses what is not a regular file, before libconfig sees the text.
 * Paths are taken as libconfig 1.5 takes them without an include dir: as
 * written, relative to the working directory.
 */
static int check_includes(const char *file, const char *text, unsigned depth, struct moe_err *err)
{
	unsigned line = 1;

	for (const char *p = text; *p; line++) {
		const char *q = p + strspn(p, " \t");
		const char *eol = strchr(p, '\n');
		char name[PATH_MAX], *inc = NULL;
		size_t n = 0;
		int r;

		p = eol ? eol + 1 : p + strlen(p);
		if (strncmp(q, "@include", 8) != 0)
			continue;
		q += 8;
		q += strspn(q, " \t");
		if (*q != '"')
			continue;        /* libconfig reports the syntax error */
		for (q++; *q && *q != '"' && *q != '\n' && n + 1 < sizeof(name); q++) {
			if (*q == '\\' && q[1])
				q++;
			name[n++] = *q;
		}
		name[n] = '\0';
		if (depth >= INCLUDE_DEPTH)
			return moe_err_set(err, -EINVAL, "%s:%u: @include \"%s\": more than %d nested includes",
					   file, line, name, INCLUDE_DEPTH);
		r = conf_read_text(name, &inc, err);
		if (r < 0)
			return moe_err_prefix(err, r, "%s:%u: @include", file, line);
		r = conf_check_strings(name, inc, err);
		if (r == 0)
			r = check_includes(name, inc, depth + 1, err);
		free(inc);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Record where @k's value came from: @s in @path, or the command line. */
static int set_origin(struct moed_config *c, const struct setting *k, const config_setting_t *s,
		      const char *path, struct moe_err *err)
{
	char buf[PATH_MAX + 16];
	char **o = &c->origin[k - conf_settings];
	char *dup;

	if (path && s) {
		const char *file = config_setting_source_file(s);

		snprintf(buf, sizeof(buf), "%s:%u", file ? file : path, (unsigned)config_setting_source_line(s));
	} else {
		snprintf(buf, sizeof(buf), "the command line");
	}
	dup = strdup(buf);
	if (!dup)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", k->name);
	free(*o);
	*o = dup;
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

		if (conf_is_group(name)) {
			if (config_setting_type(s) != CONFIG_TYPE_GROUP)
				return conf_bad(err, path, s, name, "expected a group { ... }, not %s", conf_type_name(s));
			for (int j = 0; j < config_setting_length(s); j++) {
				const config_setting_t *e = config_setting_get_elem(s, (unsigned)j);

				snprintf(full, sizeof(full), "%s.%s", name, config_setting_name(e));
				k = conf_find_setting(full);
				if (!k) {
					conf_known_names(name, list, sizeof(list));
					conf_where(at, sizeof(at), path, e);
					return moe_err_set(err, -EINVAL, "%sunknown setting '%s' (%s has %s)",
							   at, full, name, list);
				}
				r = conf_apply(c, k, e, path, err);
				if (r == 0)
					r = set_origin(c, k, e, path, err);
				if (r < 0)
					return r;
				seen[k - conf_settings] = e;
			}
			continue;
		}
		k = conf_find_setting(name);
		if (!k) {
			conf_known_names("", list, sizeof(list));
			conf_where(at, sizeof(at), path, s);
			return moe_err_set(err, -EINVAL, "%sunknown setting '%s' (known: %s)", at, name, list);
		}
		r = conf_apply(c, k, s, path, err);
		if (r == 0)
			r = set_origin(c, k, s, path, err);
		if (r < 0)
			return r;
		seen[k - conf_settings] = s;
	}
	return 0;
}

int moed_config_load(const char *path, struct moed_config **ret, struct moe_err *err)
{
	const config_setting_t *seen[CONF_N_SETTINGS] = { 0 };
	const char *files[MAX_FILES];
	struct moed_config *c = NULL;
	size_t n_files = 0;
	char *text = NULL;
	config_t cfg;
	int r;

	r = conf_read_text(path, &text, err);
	if (r < 0)
		return r;
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

	r = conf_check_strings(path, text, err);
	if (r == 0)
		r = check_includes(path, text, 0, err);
	if (r < 0) {
		free(text);
		moed_config_free(c);
		return r;
	}
	config_init(&cfg);
	if (!config_read_string(&cfg, text)) {
		const char *file = config_error_file(&cfg);

		r = moe_err_set(err, -EINVAL, "%s:%d: %s", file ? file : path, config_error_line(&cfg),
				config_error_text(&cfg));
		goto out;
	}
	r = conf_scan_integers(path, text, NULL, err);
	if (r < 0)
		goto out;
	conf_collect_files(config_root_setting(&cfg), files, &n_files);
	for (size_t i = 0; i < n_files; i++) {
		char *inc = NULL;

		/* an @include'd file; the top file's settings have no name */
		if (conf_read_text(files[i], &inc, NULL) < 0)
			continue;
		r = conf_scan_integers(files[i], inc, NULL, err);
		free(inc);
		if (r < 0)
			goto out;
	}
	r = load_tree(c, config_root_setting(&cfg), path, seen, err);
	if (r < 0)
		goto out;
	r = conf_check_together(c, path, seen, err);
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
	const struct setting *k = conf_find_setting(name);
	const config_setting_t *root, *s;
	struct strbuf b = { 0 };
	config_t cfg;
	uint32_t old = 0;
	char list[512];
	bool quote;
	int r;

	if (!k && conf_is_group(name)) {
		conf_known_names(name, list, sizeof(list));
		return moe_err_set(err, -EINVAL, "'%s' is a group; set one of its settings (%s)", name, list);
	}
	if (!k) {
		conf_known_names(NULL, list, sizeof(list));
		return moe_err_set(err, -EINVAL, "unknown setting '%s' (known: %s)", name, list);
	}
	quote = conf_string_kind(k) && value[0] != '"';
	conf_sb_printf(&b, "v = ");
	if (quote)
		conf_sb_quoted(&b, value);
	else
		conf_sb_printf(&b, "%s", value);
	conf_sb_printf(&b, ";\n");
	if (b.oom) {
		free(b.p);
		return moe_err_set(err, -ENOMEM, "%s: out of memory", name);
	}

	config_init(&cfg);
	/* one line (no @include), one value (no "1; x = 2"); the root is
	 * new after reading */
	root = NULL;
	if ((quote || !strchr(value, '\n')) && conf_check_strings(name, b.p, NULL) == 0 &&
	    config_read_string(&cfg, b.p))
		root = config_root_setting(&cfg);
	if (!root || config_setting_length(root) != 1) {
		r = moe_err_set(err, -EINVAL, "%s: '%s' is not a value", name, value);
		goto out;
	}
	r = conf_scan_integers(NULL, b.p, k, err);
	if (r < 0)
		goto out;
	s = config_setting_get_elem(root, 0);
	if (k->kind == K_U32)
		old = *FIELD(c, k, uint32_t);
	r = conf_apply(c, k, s, NULL, err);
	if (r < 0)
		goto out;
	r = conf_check_together(c, NULL, NULL, err);
	if (r < 0 && k->kind == K_U32)
		*FIELD(c, k, uint32_t) = old;   /* only numbers take part in those checks */
	if (r == 0)
		r = set_origin(c, k, NULL, NULL, err);
out:
	config_destroy(&cfg);
	free(b.p);
	return r;
}

/* --- the rest ----------------------------------------------------------------------- */

int moed_config_defaults(struct moed_config **ret, struct moe_err *err)
{
	struct moed_config *c = calloc(1, sizeof(*c));

	if (!c || !(c->origin = calloc(CONF_N_SETTINGS, sizeof(*c->origin))))
		goto oom;
	for (size_t i = 0; i < CONF_N_SETTINGS; i++) {
		const struct setting *k = &conf_settings[i];

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
	for (size_t i = 0; i < CONF_N_SETTINGS; i++) {
		const struct setting *k = &conf_settings[i];

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
	for (size_t i = 0; c->origin && i < CONF_N_SETTINGS; i++)
		free(c->origin[i]);
	free(c->origin);
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
	eo->verify_open = strcmp(c->store.verify, "open") == 0;
	eo->pager.queue_depth = c->pager.queue_depth;
	eo->pager.chunk_kb = c->pager.chunk_kb;
}
