/* SPDX-License-Identifier: MIT */
/*
 * The inside of moed.conf(5)'s reader, shared by its files and by nothing
 * else: the table of settings (conf.c) that drives the checks of values
 * (conf_value.c), the reading of files and of -o overrides (conf_file.c)
 * and the dump and comparison of two configurations (conf_dump.c).  Only
 * conf.h is the interface; this header is not included outside conf*.c.
 */
#ifndef MOED_CONF_IMPL_H
#define MOED_CONF_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libconfig.h>

#include "conf.h"

/* Layer and expert numbers in cache.pin (the model checks the real ones). */
#define PIN_MAX 65535
/* Files followed through @include for the integer scan. */
#define MAX_FILES 16
/* The rows of conf_settings[] (conf.c asserts it): a constant, so that a
 * load can keep where each setting was on its stack. */
#define CONF_N_SETTINGS 28


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

extern const struct setting conf_settings[];

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

void conf_sb_printf(struct strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* @s as a libconfig string literal. */
void conf_sb_quoted(struct strbuf *b, const char *s);

const struct setting *conf_find_setting(const char *name);
/* Whether @name is a group of settings ("cache"). */
bool conf_is_group(const char *name);
/* The names known in @group ("" for the top level: settings and groups;
 * NULL: every full name), as "a, b, c". */
void conf_known_names(const char *group, char *buf, size_t len);
const char *conf_type_name(const config_setting_t *s);
/* "FILE:LINE: " of @s when reading a file (@path), "" otherwise. */
void conf_where(char *buf, size_t len, const char *path, const config_setting_t *s);
/* -EINVAL with "FILE:LINE: NAME: reason". */
int conf_bad(struct moe_err *err, const char *path, const config_setting_t *s, const char *name,
	     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* "lo-hi" of an integer setting. */
const char *conf_range(const struct setting *k, char *buf, size_t len);
bool conf_integer_kind(const struct setting *k);
bool conf_string_kind(const struct setting *k);

/*
 * The lexical pieces of libconfig's text that the scanners step over
 * (conf.c): a comment (#, // or a C block comment) or an @include line at
 * @p, and with @string a quoted string (escapes included).  Returns where
 * the piece ends, @p itself when none starts there; adds its newlines to
 * *@line.
 */
const char *conf_skip(const char *p, bool string, unsigned *line);

/* conf_value.c */
int conf_scan_integers(const char *file, const char *text, const struct setting *only,
		       struct moe_err *err);
/* The files that settings under @s came from (@include), up to MAX_FILES. */
void conf_collect_files(const config_setting_t *s, const char **files, size_t *n);
/* Check the value @s of setting @k and store it in @c (which is unchanged
 * on error).  @path: the file, for "FILE:LINE: " in messages. */
int conf_apply(struct moed_config *c, const struct setting *k, const config_setting_t *s,
	       const char *path, struct moe_err *err);
/* The checks between settings.  @seen: where each setting was in the file
 * (NULL entries: defaults), or NULL. */
int conf_check_together(const struct moed_config *c, const char *path,
			const config_setting_t *const *seen, struct moe_err *err);

/* conf_file.c */
/* The whole text file @path, NUL-terminated; refused unless a regular file. */
int conf_read_text(const char *path, char **ret, struct moe_err *err);
int conf_check_strings(const char *file, const char *text, struct moe_err *err);

#endif
