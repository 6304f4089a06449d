/* SPDX-License-Identifier: MIT */
/*
 * Why the calling thread's last failed call failed, in words: the socket
 * and what to do when a connect fails, moed's own reason when it refuses a
 * client, the served layers when a layer is not one of them.  The status a
 * call returns stays the contract; this text is for people, so that a
 * program (moectl, the Python package, the example) can show what moed's
 * log would have said without reading it.
 *
 * One buffer per thread: no lock, and a failure on one thread never
 * overwrites another's.  connect, submit and forward empty it first, so
 * that it never describes an older failure than theirs.
 */
#include "config.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "client_impl.h"

static __thread char last_error[768];

MOE_EXPORT const char *moe_client_last_error(void)
{
	return last_error;
}

void client_error_clear(void)
{
	last_error[0] = '\0';
}

int client_error(int r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	return r;
}

/* Who may open @path: "mode 0660, owner moed, group moed" and the group's
 * name into @group (empty when unknown). */
static void socket_owner(const struct stat *st, char *buf, size_t len, char *group, size_t glen)
{
	char pwb[1024], grb[4096];
	struct passwd pw, *pwp = NULL;
	struct group gr, *grp = NULL;
	char uname[64], gname[64];

	getpwuid_r(st->st_uid, &pw, pwb, sizeof(pwb), &pwp);
	getgrgid_r(st->st_gid, &gr, grb, sizeof(grb), &grp);
	if (pwp)
		snprintf(uname, sizeof(uname), "%s", pwp->pw_name);
	else
		snprintf(uname, sizeof(uname), "%u", (unsigned)st->st_uid);
	if (grp)
		snprintf(gname, sizeof(gname), "%s", grp->gr_name);
	else
		snprintf(gname, sizeof(gname), "%u", (unsigned)st->st_gid);
	snprintf(buf, len, "mode %04o, owner %s, group %s", (unsigned)(st->st_mode & 07777), uname, gname);
	snprintf(group, glen, "%s", grp ? grp->gr_name : "");
}

int client_error_connect(const char *path, int r, const char *refusal)
{
	char who[160], group[64];
	struct stat st;

	if (refusal && *refusal)
		return client_error(r, "moed at %s refused this client: %s", path, refusal);
	switch (-r) {
	case ENOENT:
		return client_error(r, "cannot connect to moed at %s: no such socket; moed is not running "
				    "or serves another socket: start moed (systemctl start moed.socket, "
				    "or moed --socket PATH) or name the socket it serves ($MOED_SOCKET, or "
				    "the program's socket option; without either, %s, then "
				    "$XDG_RUNTIME_DIR/moed.sock, where a moed started by hand puts it)", path,
				    MOE_DEFAULT_SOCKET);
	case ECONNREFUSED:
		if (stat(path, &st) == 0 && !S_ISSOCK(st.st_mode))
			return client_error(r, "cannot connect to moed at %s: not a socket; moed's socket is "
					    "socket.path in moed.conf (default %s)", path, MOE_DEFAULT_SOCKET);
		return client_error(r, "cannot connect to moed at %s: nothing listens there (a socket "
				    "left by a moed that stopped?); start moed (systemctl start moed.socket), "
				    "which replaces it", path);
	case EACCES:
	case EPERM:
		if (stat(path, &st) < 0)
			return client_error(r, "cannot connect to moed at %s: permission denied on a directory "
					    "above it: ask the administrator, or use a socket you may reach", path);
		socket_owner(&st, who, sizeof(who), group, sizeof(group));
		if (group[0])
			return client_error(r, "cannot connect to moed at %s: permission denied (%s); join "
					    "group %s (usermod -aG %s $USER, then log in again)", path, who,
					    group, group);
		return client_error(r, "cannot connect to moed at %s: permission denied (%s); ask the "
				    "administrator for access", path, who);
	case ENOTSOCK:
		return client_error(r, "cannot connect to moed at %s: not a socket; moed's socket is "
				    "socket.path in moed.conf (default %s)", path, MOE_DEFAULT_SOCKET);
	case ENAMETOOLONG:
		return client_error(r, "cannot connect to moed at %s: the path is longer than the %zu "
				    "bytes a unix socket takes; use a shorter one", path,
				    sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
	case ETIMEDOUT:
		return client_error(r, "moed at %s did not answer within %d s: it may be stopped "
				    "(SIGSTOP, a debugger) or stuck; see its log (journalctl -u moed)",
				    path, HELLO_TIMEOUT_MS / 1000);
	case MOE_E_PROTO:
		return client_error(r, "moed at %s speaks another protocol than this libmoeclient "
				    "(version %d): use the library of the same release as moed", path,
				    MOE_PROTO_VERSION);
	case ECONNRESET:
	case EPIPE:
		return client_error(r, "moed at %s closed the connection before it answered (it may "
				    "be stopping, or refused this client); see its log (journalctl -u moed)",
				    path);
	default:
		return client_error(r, "cannot connect to moed at %s: %s", path, moe_strerror(r));
	}
}

int client_error_layer(const struct moe_client *c, uint32_t layer)
{
	char list[256];
	size_t n = 0;
	uint32_t i;

	list[0] = '\0';
	for (i = 0; i < c->w->num_moe_layers && n < sizeof(list) - 16; i++)
		n += (size_t)snprintf(list + n, sizeof(list) - n, "%s%u", i ? ", " : "", c->layers[i]);
	if (i < c->w->num_moe_layers)
		snprintf(list + n, sizeof(list) - n, ", ...");
	return client_error(-MOE_E_LAYER, "layer %u is not an MoE layer of the model moed serves (%s); "
			    "its MoE layers are %s (the checkpoint's layer numbers)", layer,
			    c->w->model_type, c->w->num_moe_layers ? list : "none");
}
