/* SPDX-License-Identifier: MIT */
/*
 * The moed server: the control thread (socket, sessions, signals, systemd
 * notifications) and the data-plane thread (rings, batching across
 * clients, the engine).  main.c parses the command line and runs it.
 */
#ifndef MOED_SERVER_H
#define MOED_SERVER_H

#include <errno.h>
#include "conf.h"
#include "engine/err.h"

struct moed_server;

/* A command-line setting (moed --set NAME=VALUE and the like), applied
 * over the file at start and again at every reload. */
struct moed_override {
	const char *name;
	const char *value;
};

/*
 * Open the model (the engine), then the socket: the one systemd passed
 * (socket activation, sd_listen_fds) or cfg->socket.path bound here.
 * @config_path is re-read on SIGHUP (NULL: nothing to reload), with the
 * @nov overrides @ov (copied) applied over it.  Takes ownership of @cfg.
 * Errors name the file or socket.
 */
int moed_server_new(struct moed_config *cfg, const char *config_path, const struct moed_override *ov,
		    size_t nov, struct moed_server **ret, struct moe_err *err);

/*
 * Where the socket goes when moed binds it itself (not socket-activated):
 * socket.path when it is set to other than the default; else
 * $RUNTIME_DIRECTORY/moed.sock (systemd's RuntimeDirectory=); else, as
 * root, /run/moed/moed.sock with /run/moed created (0755); else the default
 * when /run/moed is writable; else $XDG_RUNTIME_DIR/moed.sock.  Without
 * @create (a check) /run/moed is not made, only looked at.  The path
 * into @buf (@len bytes), the reason, for the log, into @why.  Errors:
 * -ENAMETOOLONG, -EACCES (nowhere), or mkdir's, with a message that says
 * to set socket.path.
 */
int moed_socket_place(const struct moed_config *c, bool create, char *buf, size_t len, char *why,
		      size_t wlen, struct moe_err *err);

/*
 * moed's exit statuses (moed(8), EXIT STATUS): the numbers moectl uses for
 * the same kinds of failure.
 */
enum moed_exit {
	MOED_EXIT_OK = 0,
	MOED_EXIT_CONFIG = 1,      /* the configuration or the store is wrong */
	MOED_EXIT_USAGE = 2,       /* the command line is wrong */
	MOED_EXIT_IO = 5,          /* the store cannot be read, or fails its checksums */
	MOED_EXIT_INTERNAL = 6,    /* out of memory, a thread or the event loop failed */
};

/* The status for a failure with @code (a negative errno) while starting. */
static inline int moed_exit_status(int code)
{
	return code == -EIO || code == -EBADMSG ? MOED_EXIT_IO : code == -ENOMEM ? MOED_EXIT_INTERNAL : MOED_EXIT_CONFIG;
}

/* Serve until SIGTERM or SIGINT; returns the exit status (0 after a clean
 * stop). */
int moed_server_run(struct moed_server *s);

/* NULL is fine. */
void moed_server_free(struct moed_server *s);

#endif
