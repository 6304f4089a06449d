/* SPDX-License-Identifier: MIT */
/*
 * moed.conf(5): a configuration as text (moed --dump-config), the
 * settings two configurations differ in, and what a reload swaps in.
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

/* The value of @k in @c, as moed_config_set() reads it. */
static void value_text(struct strbuf *b, const struct moed_config *c, const struct setting *k)
{
	switch (k->kind) {
	case K_STRING:
	case K_CHOICE:
	case K_GROUP:
		conf_sb_quoted(b, *CFIELD(c, k, char *));
		break;
	case K_U32:
		conf_sb_printf(b, "%" PRIu32, *CFIELD(c, k, uint32_t));
		break;
	case K_U64:
		conf_sb_printf(b, "%" PRIu64, *CFIELD(c, k, uint64_t));
		break;
	case K_BOOL:
		conf_sb_printf(b, "%s", *CFIELD(c, k, bool) ? "true" : "false");
		break;
	case K_MODE:
		conf_sb_printf(b, "\"%04o\"", *CFIELD(c, k, unsigned));
		break;
	case K_LEVEL:
		conf_sb_printf(b, "\"%s\"", moed_config_log_level_name(*CFIELD(c, k, int)));
		break;
	case K_PINS: {
		char *const *pins = *CFIELD(c, k, char **);

		conf_sb_printf(b, "[");
		for (size_t i = 0; i < *CCOUNT(c, k); i++) {
			conf_sb_printf(b, i ? ", " : " ");
			conf_sb_quoted(b, pins[i]);
		}
		conf_sb_printf(b, " ]");
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
		conf_sb_printf(b, "[");
		for (size_t i = 0; i < *CCOUNT(c, k); i++)
			conf_sb_printf(b, "%s%" PRIu32 "%s", i ? ", " : " ", ids[i], l);
		conf_sb_printf(b, " ]");
		break;
	}
	}
}

char *moed_config_dump(const struct moed_config *c)
{
	struct strbuf b = { 0 };

	for (size_t i = 0; i < CONF_N_SETTINGS; i++) {
		conf_sb_printf(&b, "%s = ", conf_settings[i].name);
		value_text(&b, c, &conf_settings[i]);
		conf_sb_printf(&b, "\n");
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
	for (size_t i = 0; i < CONF_N_SETTINGS; i++) {
		const struct setting *k = &conf_settings[i];

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
	{
		/* where the value came from goes with it */
		char *o = a->origin[k - conf_settings];

		a->origin[k - conf_settings] = b->origin[k - conf_settings];
		b->origin[k - conf_settings] = o;
	}
	if (k->kind == K_PINS || k->kind == K_UIDS || k->kind == K_GIDS) {
		size_t t = *COUNT(a, k);

		*COUNT(a, k) = *COUNT(b, k);
		*COUNT(b, k) = t;
	}
}

void moed_config_apply_live(struct moed_config *running, struct moed_config *from)
{
	for (size_t i = 0; i < CONF_N_SETTINGS; i++)
		if (conf_settings[i].live)
			swap_value(running, from, &conf_settings[i]);
}

uint32_t moed_config_clients_per_uid(const struct moed_config *c)
{
	/* one user may hold all but an eighth of the sessions: most of them,
	 * and still room for another allowed user to connect */
	if (c->limits.max_clients_per_uid)
		return c->limits.max_clients_per_uid < c->limits.max_clients ? c->limits.max_clients_per_uid
										 : c->limits.max_clients;
	return c->limits.max_clients - c->limits.max_clients / 8;
}

bool moed_config_is_live(const char *name)
{
	const struct setting *k = conf_find_setting(name);

	return k && k->live;
}

const char *moed_config_origin(const struct moed_config *c, const char *name)
{
	const struct setting *k = conf_find_setting(name);

	return k ? c->origin[k - conf_settings] : NULL;
}

bool moed_config_is_default(const struct moed_config *c, const char *name)
{
	const struct setting *k = conf_find_setting(name);
	struct moed_config *d;
	bool r;

	if (!k || moed_config_defaults(&d, NULL) < 0)
		return false;
	r = same(c, d, k);
	moed_config_free(d);
	return r;
}
