/* SPDX-License-Identifier: MIT */
/*
 * moed.conf(5): one table of settings (name, kind, field, default,
 * bounds, whether a reload applies it) drives the defaults, the checks,
 * the dump and the comparison of two configurations, so that a setting
 * cannot be parsed one way and documented or dumped another.
 *
 * This file holds the table and the words every message uses; the values'
 * checks are in conf_value.c, the files in conf_file.c, the dump and the
 * comparison in conf_dump.c, all of them through conf_impl.h.
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

/* Room for the path in struct sockaddr_un, with its NUL. */
#define SOCKET_PATH_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)
/* Largest user or group id: (uid_t)-1 means "no id" to the kernel. */
#define ID_MAX UINT64_C(4294967294)
/* Longest group name (LOGIN_NAME_MAX less the NUL). */
#define GROUP_NAME_MAX 255

static const char *const backends[] = { "auto", "cpu", "cuda", NULL };
static const char *const policies[] = { "auto", "freq", "lru", NULL };
static const char *const verify_modes[] = { "off", "open", NULL };
static const char *const level_names[8] = {
	"emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
};

#define OFF(f) offsetof(struct moed_config, f)

/* In the order of moed.conf(5) and of the dump. */
const struct setting conf_settings[] = {
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
	{ "store.verify", K_CHOICE, OFF(store.verify), .choices = verify_modes, .def_s = "off", .live = true },
	{ "batch.window_us", K_U32, OFF(batch.window_us), .max = 1000000, .live = true },
	{ "batch.max_tokens", K_U32, OFF(batch.max_tokens), .min = 1, .max = 1 << 20, .def = 8192,
	  .live = true },
	{ "limits.max_clients", K_U32, OFF(limits.max_clients), .min = 1, .max = 1024, .def = 64 },
	{ "limits.max_tokens_per_request", K_U32, OFF(limits.max_tokens_per_request), .min = 1,
	  .max = 1 << 20, .def = 8192, .live = true },
	{ "limits.segment_mb", K_U32, OFF(limits.segment_mb), .min = 1, .max = 65536, .def = 64 },
	{ "limits.max_clients_per_uid", K_U32, OFF(limits.max_clients_per_uid), .max = 1024, .live = true },
	{ "limits.max_pending_per_uid", K_U32, OFF(limits.max_pending_per_uid), .min = 1, .max = 1024, .def = 8,
	  .live = true },
	{ "limits.hello_timeout_ms", K_U32, OFF(limits.hello_timeout_ms), .min = 100, .max = 60000, .def = 2000,
	  .live = true },
	{ "log.level", K_LEVEL, OFF(log.level), .max = 7, .def = 6, .live = true },
	{ "log.ratelimit_burst", K_U32, OFF(log.ratelimit_burst), .max = 1000000, .def = 10, .live = true },
	{ "log.ratelimit_interval_ms", K_U32, OFF(log.ratelimit_interval_ms), .max = 3600000, .def = 5000,
	  .live = true },
};

_Static_assert(sizeof(conf_settings) / sizeof(conf_settings[0]) == CONF_N_SETTINGS,
	       "CONF_N_SETTINGS in conf_impl.h counts the rows of conf_settings[]");

void conf_sb_printf(struct strbuf *b, const char *fmt, ...)
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
void conf_sb_quoted(struct strbuf *b, const char *s)
{
	conf_sb_printf(b, "\"");
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			conf_sb_printf(b, "\\%c", ch);
		else if (ch == '\n')
			conf_sb_printf(b, "\\n");
		else if (ch == '\t')
			conf_sb_printf(b, "\\t");
		else if (ch < 0x20 || ch == 0x7f)
			conf_sb_printf(b, "\\x%02x", ch);
		else
			conf_sb_printf(b, "%c", ch);
	}
	conf_sb_printf(b, "\"");
}

/* --- names and messages --------------------------------------------------------- */

const struct setting *conf_find_setting(const char *name)
{
	for (size_t i = 0; i < CONF_N_SETTINGS; i++)
		if (strcmp(conf_settings[i].name, name) == 0)
			return &conf_settings[i];
	return NULL;
}

/* Whether @name is a group of settings ("cache"). */
bool conf_is_group(const char *name)
{
	size_t n = strlen(name);

	for (size_t i = 0; i < CONF_N_SETTINGS; i++)
		if (strncmp(conf_settings[i].name, name, n) == 0 && conf_settings[i].name[n] == '.')
			return true;
	return false;
}

/* The names known in @group ("" for the top level: settings and groups;
 * NULL: every full name), as "a, b, c". */
void conf_known_names(const char *group, char *buf, size_t len)
{
	size_t used = 0, prev_len = 0;
	const char *prev = NULL;

	buf[0] = '\0';
	for (size_t i = 0; i < CONF_N_SETTINGS && used < len; i++) {
		const char *n = conf_settings[i].name, *dot;
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

const char *conf_type_name(const config_setting_t *s)
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
void conf_where(char *buf, size_t len, const char *path, const config_setting_t *s)
{
	const char *file;

	buf[0] = '\0';
	if (!path || !s)
		return;
	file = config_setting_source_file(s);
	snprintf(buf, len, "%s:%u: ", file ? file : path, (unsigned)config_setting_source_line(s));
}

/* -EINVAL with "FILE:LINE: NAME: reason". */
int conf_bad(struct moe_err *err, const char *path, const config_setting_t *s, const char *name,
	       const char *fmt, ...)
{
	char at[PATH_MAX + 32], why[600];
	va_list ap;

	conf_where(at, sizeof(at), path, s);
	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return moe_err_set(err, -EINVAL, "%s%s: %s", at, name, why);
}

/* "lo-hi" of an integer setting. */
const char *conf_range(const struct setting *k, char *buf, size_t len)
{
	if (k->kind == K_MODE)
		snprintf(buf, len, "0-0%" PRIo64, k->max);   /* modes start at 0 */
	else
		snprintf(buf, len, "%" PRIu64 "-%" PRIu64, k->min, k->max);
	return buf;
}

bool conf_integer_kind(const struct setting *k)
{
	return k->kind == K_U32 || k->kind == K_U64 || k->kind == K_MODE || k->kind == K_LEVEL ||
	       k->kind == K_UIDS || k->kind == K_GIDS;
}

bool conf_string_kind(const struct setting *k)
{
	return k->kind == K_STRING || k->kind == K_CHOICE || k->kind == K_GROUP || k->kind == K_MODE ||
	       k->kind == K_LEVEL;
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

const char *conf_skip(const char *p, bool string, unsigned *line)
{
	if (p[0] == '#' || p[0] == '@' || (p[0] == '/' && p[1] == '/')) {
		while (*p && *p != '\n')
			p++;
	} else if (p[0] == '/' && p[1] == '*') {
		for (p += 2; *p && !(p[0] == '*' && p[1] == '/'); p++)
			*line += *p == '\n';
		if (*p)
			p += 2;
	} else if (string && p[0] == '"') {
		for (p++; *p && *p != '"'; p++) {
			if (*p == '\\' && p[1])
				p++;
			*line += *p == '\n';
		}
		if (*p)
			p++;
	}
	return p;
}
