/* SPDX-License-Identifier: MIT */
/*
 * Where moed's socket goes when nobody said (server.h, moed_socket_place):
 * the default /run/moed/moed.sock exists only where systemd (or a package)
 * made /run/moed, so a moed started by hand would fail in bind().  Instead
 * it takes the first place it can create, in the order systemd, root, the
 * user's session; libmoeclient looks in the same places.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "server.h"

#define SUN_PATH_MAX (sizeof(((struct sockaddr_un *)0)->sun_path))
#define DEFAULT_DIR "/run/moed"

/* @dir/moed.sock into @buf; -ENAMETOOLONG naming @what when it does not fit. */
static int in_dir(const char *dir, size_t dlen, const char *what, char *buf, size_t len,
		  struct moe_err *err)
{
	int n = snprintf(buf, len, "%.*s/moed.sock", (int)dlen, dir);

	if (n < 0 || (size_t)n >= len || (size_t)n >= SUN_PATH_MAX)
		return moe_err_set(err, -ENAMETOOLONG, "%s/moed.sock (%s) is longer than the %zu bytes a "
				   "unix socket takes: set socket.path (or moed --socket PATH)",
				   dir, what, SUN_PATH_MAX - 1);
	return 0;
}

int moed_socket_place(const struct moed_config *c, bool create, char *buf, size_t len, char *why,
		      size_t wlen, struct moe_err *err)
{
	const char *rd = getenv("RUNTIME_DIRECTORY"), *xdg = getenv("XDG_RUNTIME_DIR");

	if (!moed_config_is_default(c, "socket.path")) {
		const char *o = moed_config_origin(c, "socket.path");

		snprintf(buf, len, "%s", c->socket.path);
		snprintf(why, wlen, "socket.path (%s)", o ? o : "set");
		return 0;
	}
	if (rd && rd[0] == '/') {
		/* systemd's RuntimeDirectory=: made for us, ours; a list when
		 * the unit names several, the first one then */
		snprintf(why, wlen, "$RUNTIME_DIRECTORY (systemd's RuntimeDirectory=)");
		return in_dir(rd, strcspn(rd, ":"), "$RUNTIME_DIRECTORY", buf, len, err);
	}
	if (geteuid() == 0) {
		if (!create) {
			snprintf(why, wlen, "the default; running as root, %s " DEFAULT_DIR,
				 access(DEFAULT_DIR, F_OK) == 0 ? "in" : "which the start creates");
		} else if (mkdir(DEFAULT_DIR, 0755) == 0) {
			chmod(DEFAULT_DIR, 0755);   /* whatever the umask: clients must reach it */
			snprintf(why, wlen, "the default; running as root, created " DEFAULT_DIR);
		} else if (errno == EEXIST) {
			snprintf(why, wlen, "the default; running as root");
		} else {
			return moe_err_set(err, -errno, "cannot create %s for the default socket: %s; set "
					   "socket.path (or moed --socket PATH)", DEFAULT_DIR, strerror(errno));
		}
		snprintf(buf, len, "%s", c->socket.path);
		return 0;
	}
	if (access(DEFAULT_DIR, W_OK | X_OK) == 0) {
		snprintf(buf, len, "%s", c->socket.path);
		snprintf(why, wlen, "the default; " DEFAULT_DIR " is writable by this user");
		return 0;
	}
	if (xdg && xdg[0] == '/') {
		snprintf(why, wlen, "not root and " DEFAULT_DIR " is not writable: $XDG_RUNTIME_DIR, where "
			 "libmoeclient looks next");
		return in_dir(xdg, strlen(xdg), "$XDG_RUNTIME_DIR", buf, len, err);
	}
	return moe_err_set(err, -EACCES, "nowhere to put the socket: not root, " DEFAULT_DIR " is not "
			   "writable by this user and $XDG_RUNTIME_DIR is not set: set socket.path (or "
			   "moed --socket PATH), or start moed as root or through moed.socket");
}
