/* SPDX-License-Identifier: MIT */
/*
 * moed's configuration: the libconfig file of moed.conf(5), validated, with
 * every setting's default and bounds in one table (conf.c).
 *
 * The file is named conf.h, not config.h: every source file starts with
 * #include "config.h" (autoconf's), and a quoted include looks in the
 * including file's own folder first, so a daemon/config.h would hide it.
 *
 * Loading is all or nothing: a file with one bad setting gives an error
 * that names the file, the line and the setting, and no configuration, so
 * a reload with a bad file keeps the old one.  Engine code: never logs.
 */
#ifndef MOED_CONF_H
#define MOED_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"
#include "engine/err.h"

/* The file moed reads without --config: $(sysconfdir)/moed/moed.conf,
 * set by the build (Makefile.am). */
#ifndef MOED_CONFIG_FILE
#define MOED_CONFIG_FILE "/etc/moed/moed.conf"
#endif

struct moed_config {
	char *path;            /* the file it came from, or NULL for defaults */
	char *model;           /* the store; "/var/lib/moed/model.moe" */
	char *backend;         /* "auto" | "cpu" | "cuda" */
	uint32_t threads;      /* compute threads, 0: one per online CPU */
	struct {
		char *path;    /* "/run/moed/moed.sock"; fits sun_path */
		unsigned mode; /* 0660 (0..0777) */
		char *group;   /* "moed"; "": leave the group alone.  A name or
				* number, resolved when the socket is made */
	} socket;
	struct {
		/* Peers allowed (SO_PEERCRED); both empty: only the socket's
		 * permissions decide.  Names are resolved at load. */
		uint32_t *uids;
		size_t n_uids;
		uint32_t *gids;
		size_t n_gids;
	} access;
	struct {
		uint64_t gpu_mb;   /* device tier, MiB; 0: all free device memory
				    * minus a reserve (only the CUDA backend has one) */
		uint64_t host_mb;  /* host tier, MiB (routers, shared experts, slots) */
		char **pin;        /* n_pin "L:E" / "L:*" strings, NULL-terminated
				    * (checked for syntax only: the model decides
				    * which layers and experts exist) */
		size_t n_pin;
		uint32_t pin_hot;  /* also keep the N busiest experts pinned */
		char *policy;      /* "auto" | "freq" | "lru" */
	} cache;
	struct {
		uint32_t queue_depth;  /* chunks in flight, 1..256 */
		uint32_t chunk_kb;     /* 64..4096, a multiple of 4 */
		bool prefetch;         /* predict layer L+1's experts */
	} pager;
	struct {
		char *verify;          /* "off" | "open": every checksum at open and reopen */
	} store;
	struct {
		uint32_t window_us;    /* wait this long to gather tokens, 0..1000000 */
		uint32_t max_tokens;   /* tokens per batch, 1..1048576 */
	} batch;
	struct {
		uint32_t max_clients;             /* 1..1024 */
		uint32_t max_tokens_per_request;  /* 1..batch.max_tokens */
		uint32_t segment_mb;              /* client shared segment, 1..65536 */
		uint32_t max_clients_per_uid;     /* 0..1024, 0: max_clients less an eighth
						   * (moed_config_clients_per_uid) */
		uint32_t max_pending_per_uid;     /* connections waiting for HELLO, 1..1024 */
		uint32_t hello_timeout_ms;        /* for the HELLO, 100..60000 */
	} limits;
	struct {
		int level;     /* syslog priority, 0 (emerg) .. 7 (debug) */
		uint32_t ratelimit_burst;        /* lines per class and interval, 0..1000000 */
		uint32_t ratelimit_interval_ms;  /* 0 (no limit)..3600000 */
	} log;
	/* Where each setting got its value (moed_config_origin), by the
	 * table's order; NULL entries: defaults. */
	char **origin;
};

/*
 * The defaults of moed.conf(5), every field set, path NULL.  Returns 0 or
 * -ENOMEM; *ret is the caller's, for moed_config_free().
 */
int moed_config_defaults(struct moed_config **ret, struct moe_err *err);

/*
 * Read and validate the libconfig file @path; settings it leaves out keep
 * their defaults.  Errors: -ENOENT, -EACCES, -EISDIR (the file cannot be
 * read; the message names it), -EINVAL for anything wrong inside, with
 * err->msg "FILE:LINE: SETTING: reason" (syntax errors, unknown settings,
 * wrong types, values out of their bounds, unknown user or group names),
 * -ENOMEM; a failing user or group lookup returns its errno.  *ret is set
 * only on success.
 */
int moed_config_load(const char *path, struct moed_config **ret, struct moe_err *err);

/* Free @c and everything in it.  NULL is fine. */
void moed_config_free(struct moed_config *c);

/*
 * Set one setting by its name in moed.conf(5) ("backend", "cache.host_mb")
 * from text, as the command line overrides the file: @value is written as
 * in the file ("4096", "true", "[ \"3:*\" ]"); for a setting that takes a
 * string the quotes may be left out ("cuda", "0660", "debug").  The same
 * checks as a file's; on error (-EINVAL, "SETTING: reason", or -ENOMEM)
 * @c is unchanged.
 */
int moed_config_set(struct moed_config *c, const char *name, const char *value,
		    struct moe_err *err);

/*
 * Zero @eo and fill it from @c (backend, threads, host budget, policy,
 * pins, pin_hot, prefetch, pager); the strings stay owned by @c, which
 * must outlive the engine's open.  The caller adds the log callback.
 */
void moed_config_engine_options(const struct moed_config *c, struct moe_engine_options *eo);

/*
 * Every setting, one "name = value" line each in the order of
 * moed.conf(5), values written as moed_config_set() reads them
 * ("cache.host_mb = 4096", "socket.mode = \"0660\"", names of users
 * already resolved to ids).  A malloc'ed string, or NULL without memory.
 */
char *moed_config_dump(const struct moed_config *c);

/*
 * The settings whose values differ between @a and @b, as "name, name"
 * into @buf (@len bytes, may be 0), counting only those that a reload
 * (SIGHUP) cannot apply when @restart_only.  Returns how many differ.
 */
int moed_config_diff(const struct moed_config *a, const struct moed_config *b, bool restart_only,
		     char *buf, size_t len);

/*
 * A reload: every setting the table marks live (moed.conf(5), RELOAD) takes
 * @from's value in @running; the others, which need a restart, keep
 * @running's.  The values are exchanged, not copied: what @running held
 * goes to @from, to be freed with it, so this cannot fail and allocates
 * nothing.  The caller keeps @running's readers out meanwhile.
 */
void moed_config_apply_live(struct moed_config *running, struct moed_config *from);

/*
 * Where setting @name got its value in @c: "FILE:LINE" (of the file or of
 * an @include'd one), "the command line" (moed_config_set), or NULL when
 * it has its default (or @name is unknown): for errors found after the
 * load (moed --check-config, the start) that must name the line.
 */
const char *moed_config_origin(const struct moed_config *c, const char *name);

/* Whether setting @name of @c has its built-in default value (whether or
 * not a file restates it); false for unknown names. */
bool moed_config_is_default(const struct moed_config *c, const char *name);

/* The sessions one uid may hold: limits.max_clients_per_uid, or when that
 * is 0, limits.max_clients less an eighth (rounded down); never more than
 * limits.max_clients. */
uint32_t moed_config_clients_per_uid(const struct moed_config *c);

/* A reload applies this setting to the running daemon (moed.conf(5), RELOAD);
 * false for settings that need a restart and for unknown names. */
bool moed_config_is_live(const char *name);

/*
 * Log levels: "emerg" .. "debug" (also "err"/"error", "warn"/"warning"),
 * or a number "0" .. "7", to a syslog priority; -EINVAL otherwise.
 */
int moed_config_parse_log_level(const char *s);

/* The name of syslog priority @level ("info"), "?" outside 0..7. */
const char *moed_config_log_level_name(int level);

#endif
