/* SPDX-License-Identifier: MIT */
/*
 * The server's life (server.h): open the engine and the listening socket
 * (or take systemd's), register the control thread's descriptors in the
 * event loop, start the data thread, tell systemd (READY, STATUS,
 * WATCHDOG, RELOADING, STOPPING), reload on SIGHUP, stop on SIGTERM and
 * SIGINT, and free it all.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "engine/clock.h"
#include "engine/engine.h"
#include "log.h"
#include "server_impl.h"

#define WAIT_SLICE_NS 1000000000u   /* the data thread sleeps at most this long (then looks again) */

static void notify(const char *msg)
{
#ifdef HAVE_SYSTEMD
	sd_notify(0, msg);
#else
	(void)msg;
#endif
}

static int listen_setup(struct moed_server *s, struct moe_err *err)
{
	const struct moed_config *c = s->cfg;
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd, r;

#ifdef HAVE_SYSTEMD
	int n = sd_listen_fds(1);

	if (n > 1)
		return moe_err_set(err, -EINVAL, "systemd passed %d sockets; moed takes one", n);
	if (n == 1) {
		if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
			return moe_err_set(err, -EINVAL, "the socket systemd passed is not a listening unix stream socket");
		s->listen_fd = SD_LISTEN_FDS_START;
		s->socket_activated = true;
		fcntl(s->listen_fd, F_SETFL, fcntl(s->listen_fd, F_GETFL) | O_NONBLOCK);
		fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
		return 0;
	}
#endif
	char why[PATH_MAX + 160];
	const char *path = s->socket_path;

	r = moed_socket_place(c, true, s->socket_path, sizeof(s->socket_path), why, sizeof(why), err);
	if (r < 0)
		return r;
	if (strlen(path) >= sizeof(a.sun_path))
		return moe_err_set(err, -ENAMETOOLONG, "socket path %s is longer than %zu bytes", path,
				   sizeof(a.sun_path) - 1);
	log_info("socket %s: %s", path, why);
	strcpy(a.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return moe_err_set(err, -errno, "socket: %s", strerror(errno));
	r = bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ? -errno : 0;
	if (r == -EADDRINUSE) {
		/* a socket file left by a moed that died: remove it only if nobody
		 * answers on it */
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		struct stat st;

		if (probe >= 0 && connect(probe, (struct sockaddr *)&a, sizeof(a)) == 0) {
			close(probe);
			close(fd);
			return moe_err_set(err, -EADDRINUSE, "%s: another moed is serving this socket", path);
		}
		if (probe >= 0)
			close(probe);
		if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
			unlink(path);
		r = bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ? -errno : 0;
	}
	if (r < 0) {
		close(fd);
		return moe_err_set(err, r, "%s: bind: %s; set socket.path (or moed --socket PATH) to a "
				   "place this user may create it", path, strerror(-r));
	}
	s->unlink_socket = true;
	if (chmod(path, c->socket.mode) < 0)
		log_warning("%s: chmod %o: %s", path, c->socket.mode, strerror(errno));
	if (c->socket.group && c->socket.group[0]) {
		struct group *g = getgrnam(c->socket.group);
		const char *o = moed_config_origin(c, "socket.group");

		/* the shipped default group applies where the package made it;
		 * only a group someone chose is worth a warning when missing */
		if (!g && moed_config_is_default(c, "socket.group"))
			log_debug("%s: no group %s (the default socket.group): the socket keeps its group",
				  path, c->socket.group);
		else if (!g)
			log_warning("%s%ssocket.group: group %s does not exist: %s keeps its group; create "
				    "it (groupadd %s) or set socket.group", o ? o : "", o ? ": " : "",
				    c->socket.group, path, c->socket.group);
		else if (chown(path, (uid_t)-1, g->gr_gid) < 0)
			log_warning("%s: chown to group %s: %s", path, c->socket.group, strerror(errno));
	}
	if (listen(fd, 128) < 0) {
		r = -errno;
		close(fd);
		return moe_err_set(err, r, "%s: listen: %s", path, strerror(-r));
	}
	s->listen_fd = fd;
	return 0;
}

/* Do @a and @b pin different experts (cache.pin, cache.pin_hot)? */
static bool pins_differ(const struct moed_config *a, const struct moed_config *b)
{
	if (a->cache.n_pin != b->cache.n_pin || a->cache.pin_hot != b->cache.pin_hot)
		return true;
	for (size_t i = 0; i < a->cache.n_pin; i++)
		if (strcmp(a->cache.pin[i], b->cache.pin[i]) != 0)
			return true;
	return false;
}

/*
 * Give the engine @n's pins.  The engine is the data thread's while it
 * runs, so the data thread applies them between passes (dataplane.c:
 * pins_update) while this thread waits, at most one pass; the wait keeps
 * @n's strings alive for it.  0, or the engine's -errno with @err naming
 * the pin; the pins in use stay then.
 */
static int pins_apply(struct moed_server *s, const struct moed_config *n, struct moe_err *err)
{
	int r;

	if (!s->data_ok)
		return moe_engine_set_pins(s->engine, (const char *const *)n->cache.pin, n->cache.pin_hot, err);
	pthread_mutex_lock(&s->lock);
	s->pins_req.pin = (const char *const *)n->cache.pin;
	s->pins_req.pin_hot = n->cache.pin_hot;
	s->pins_req.done = false;
	pthread_mutex_unlock(&s->lock);
	atomic_store(&s->pins_wanted, true);
	dataplane_wake(s);
	pthread_mutex_lock(&s->lock);
	while (!s->pins_req.done)
		pthread_cond_wait(&s->pins_cond, &s->lock);
	r = s->pins_req.result;
	if (r < 0)
		moe_err_set(err, r, "%s", s->pins_req.msg);
	s->pins_req.pin = NULL;
	pthread_mutex_unlock(&s->lock);
	return r;
}

/*
 * SIGHUP, the store's part: a store that changed or was damaged under moed
 * (engine/pager.h) is reopened if the file at its path is the same store
 * and whole again, verified (header and tables; with store.verify =
 * "open" every checksum) before the engine reads from it; one line says
 * which.  A healthy store is left alone.
 */
static void store_recover(struct moed_server *s)
{
	const char *path = moe_engine_store(s->engine)->path;
	struct moe_store_health h;
	struct moe_err err = { 0 };
	bool verify;

	moe_engine_store_health(s->engine, true, &h);
	if (h.state == MOE_STORE_OK)
		return;
	pthread_mutex_lock(&s->cfg_lock);
	verify = strcmp(s->cfg->store.verify, "open") == 0;
	pthread_mutex_unlock(&s->cfg_lock);
	if (moe_engine_reopen_store(s->engine, verify, &err) < 0) {
		log_error("reload: the store is %s and cannot be reopened: %s", moe_store_state_name(h.state),
			  err.msg);
		return;
	}
	log_notice("reload: %s is whole again (%s): reopened, every expert can be read", path,
		   verify ? "every checksum verified" : "header and tables verified");
}

/*
 * SIGHUP: read the file again with the command line over it.  All or
 * nothing: a file with an error, or pins the model refuses, change
 * nothing.  Otherwise every live setting of the table (conf.c) takes the
 * new value at once, and those that need a restart are named.
 */
static void reload_config(struct moed_server *s)
{
	struct moe_err err = { 0 };
	struct moed_config *n;

	if (!s->config_path) {
		log_notice("SIGHUP: no configuration file to reload");
		return;
	}
	notify("RELOADING=1");
	if (moed_config_load(s->config_path, &n, &err) < 0) {
		log_error("reload: %s: keeping the configuration in use", err.msg);
		notify("READY=1");
		return;
	}
	for (size_t i = 0; i < s->nov; i++)
		if (moed_config_set(n, s->ov[i].name, s->ov[i].value, &err) < 0) {
			log_error("reload: command line: %s: keeping the configuration in use", err.msg);
			moed_config_free(n);
			notify("READY=1");
			return;
		}
	/* what needs a restart stays as it is, said once */
	{
		char names[512];

		if (moed_config_diff(s->cfg, n, true, names, sizeof(names)) > 0)
			log_notice("reload: %s changed: that takes effect at the next start", names);
	}
	/* the pins first: the only live settings the model can still refuse */
	if (pins_differ(s->cfg, n) && pins_apply(s, n, &err) < 0) {
		log_error("reload: %s: keeping the configuration in use", err.msg);
		moed_config_free(n);
		notify("READY=1");
		return;
	}
	/* the data thread reads the live limits under cfg_lock */
	pthread_mutex_lock(&s->cfg_lock);
	moed_config_apply_live(s->cfg, n);
	pthread_mutex_unlock(&s->cfg_lock);
	moed_log_set_level(s->cfg->log.level);
	moed_log_set_ratelimit(s->cfg->log.ratelimit_burst, s->cfg->log.ratelimit_interval_ms);
	moed_config_free(n);
	log_info("reloaded %s", s->config_path);
	notify("READY=1");
}

static void reload(struct moed_server *s)
{
	reload_config(s);
	store_recover(s);
}

static void status_tick(struct moed_server *s)
{
	struct moe_store_health h;
	char msg[1024];

	stats_deliver(s, false);      /* no snapshot in time: the latest one */
	/* a session that never says HELLO does not keep its socket */
	session_expire_greetings(s);
	/* the summaries of rate-limited messages whose interval is over */
	moed_log_events_flush();

	uint64_t t = moe_now_ns();
	double dt = (double)(t - s->tps_t0) / 1e9;

	if (dt > 0) {
		uint64_t n = atomic_exchange_explicit(&s->tps_tokens, 0, memory_order_relaxed);

		atomic_store_explicit(&s->tps, (double)n / dt, memory_order_relaxed);
		s->tps_t0 = t;
	}
	/* a store changed under moed is found here within a second, even
	 * before a read of it fails */
	moe_engine_store_health(s->engine, true, &h);
	if (h.state == MOE_STORE_OK)
		snprintf(msg, sizeof(msg), "STATUS=Serving %s (%s), %u clients, %.0f tokens/s",
			 moe_engine_store(s->engine)->hdr.model_type, moe_engine_store(s->engine)->path,
			 atomic_load(&s->live_clients), atomic_load_explicit(&s->tps, memory_order_relaxed));
	else
		snprintf(msg, sizeof(msg), "STATUS=Serving %s (%s), %u clients, %.0f tokens/s; store %s: %s "
			 "(SIGHUP reopens it once whole)", moe_engine_store(s->engine)->hdr.model_type,
			 moe_engine_store(s->engine)->path, atomic_load(&s->live_clients),
			 atomic_load_explicit(&s->tps, memory_order_relaxed),
			 moe_store_state_name(h.state), h.why);
	notify(msg);
#ifdef HAVE_SYSTEMD
	uint64_t usec;
	/* only while the data thread shows life: a hung engine or a stuck
	 * device call must trip WatchdogSec (it wakes at least once a second
	 * when idle; a batch longer than half the watchdog time counts as hung) */
	if (sd_watchdog_enabled(0, &usec) > 0) {
		uint64_t age = moe_now_ns() - atomic_load(&s->heartbeat);

		if (age < usec * 1000 / 2)
			notify("WATCHDOG=1");
		else
			log_warning("the data thread has shown no sign of life for %.1f s: not telling the "
				    "watchdog", (double)age / 1e9);
	}
#endif
}

/* The signalfd: SIGHUP reloads, SIGTERM and SIGINT stop. */
static void signal_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	struct moed_server *s = data;
	struct signalfd_siginfo si;

	(void)l;
	(void)mask;
	if (read(fd, &si, sizeof(si)) != sizeof(si))
		return;
	if (si.ssi_signo == SIGHUP) {
		reload(s);
	} else {
		log_info("%s: stopping", strsignal((int)si.ssi_signo));
		notify("STOPPING=1");
		s->running = false;
	}
}

/* The timerfd: the status and watchdog tick. */
static void tick_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	uint64_t ticks;

	(void)l;
	(void)mask;
	if (read(fd, &ticks, sizeof(ticks)) == sizeof(ticks))
		status_tick(data);
}

int moed_server_run(struct moed_server *s)
{
	int r, status = MOED_EXIT_OK;

	/* before the data thread: the status tick's alone from here on */
	s->tps_t0 = moe_now_ns();
	r = pthread_create(&s->data_thread, NULL, dataplane_main, s);
	if (r) {
		log_error("cannot start the data thread: %s", strerror(r));
		return MOED_EXIT_INTERNAL;
	}
	s->data_ok = true;
	log_info("serving %s (%s, %u MoE layers, backend %s) on %s", s->cfg->model,
		 moe_engine_store(s->engine)->hdr.model_type, moe_engine_store(s->engine)->hdr.num_moe_layers,
		 moe_engine_backend(s->engine)->ops->name,
		 s->socket_activated ? "the socket systemd passed (socket activation)" : s->socket_path);
	notify("READY=1");
	status_tick(s);
	s->running = true;
	while (s->running) {
		r = moed_loop_run_once(s->loop, -1);
		if (r < 0) {
			log_error("epoll_wait: %s", strerror(-r));
			status = MOED_EXIT_INTERNAL;
			break;
		}
	}
	atomic_store(&s->stop, true);
	dataplane_wake(s);
	pthread_join(s->data_thread, NULL);
	s->data_ok = false;
	return status;
}

int moed_server_new(struct moed_config *cfg, const char *config_path, const struct moed_override *ov,
		    size_t nov, struct moed_server **ret, struct moe_err *err)
{
	struct moe_engine_options eo = { 0 };
	struct itimerspec its = { { 1, 0 }, { 1, 0 } };
	struct moed_server *s = calloc(1, sizeof(*s));
	sigset_t mask;
	int r;

	if (!s) {
		moed_config_free(cfg);
		return moe_err_set(err, -ENOMEM, "out of memory");
	}
	s->cfg = cfg;
	s->listen_fd = s->sigfd = s->timerfd = s->stats_efd = -1;
	s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	pthread_mutex_init(&s->lock, NULL);
	pthread_mutex_init(&s->cfg_lock, NULL);
	pthread_cond_init(&s->pins_cond, NULL);
	if (config_path && !(s->config_path = strdup(config_path))) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	s->ov = calloc(nov ? nov : 1, sizeof(*s->ov));
	if (!s->ov) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (size_t i = 0; i < nov; i++) {
		s->ov[i].name = strdup(ov[i].name);
		s->ov[i].value = strdup(ov[i].value);
		s->nov++;
		if (!s->ov[i].name || !s->ov[i].value) {
			r = moe_err_set(err, -ENOMEM, "out of memory");
			goto fail;
		}
	}
	/* the signals come through a signalfd; every thread blocks them */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);

	moed_config_engine_options(cfg, &eo);
	eo.log = moed_log_engine;
	notify("EXTEND_TIMEOUT_USEC=60000000");
	r = moe_engine_open(cfg->model, &eo, &s->engine, err);
	if (r < 0) {
		/* name the setting (and its line) that chose the store */
		const char *o = moed_config_origin(cfg, "model");

		if (o)
			moe_err_prefix(err, r, "%s: model", o);
		else
			moe_err_prefix(err, r, "model (the default; set it in moed.conf or with moed -m STORE)");
		goto fail;
	}
	s->mc = moe_engine_config(s->engine);
	{
		const struct moe_backend *be = moe_engine_backend(s->engine);
		if (be->reason[0])
			log_notice("backend: %s (%s)", be->ops->name, be->reason);
	}
	r = listen_setup(s, err);
	if (r < 0)
		goto fail;
	r = moed_loop_new(&s->loop);
	if (r < 0) {
		r = moe_err_set(err, r, "epoll: %s", strerror(-r));
		goto fail;
	}
	s->sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	s->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	s->stats_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (s->sigfd < 0 || s->timerfd < 0 || s->stats_efd < 0) {
		r = moe_err_set(err, -errno, "signalfd/timerfd/eventfd: %s", strerror(errno));
		goto fail;
	}
	/* the status and watchdog tick: every second, or twice per WatchdogSec;
	 * the data thread wakes four times per WatchdogSec to show it lives */
	s->slice_ns = WAIT_SLICE_NS;
#ifdef HAVE_SYSTEMD
	{
		uint64_t usec;

		if (sd_watchdog_enabled(0, &usec) > 0 && usec) {
			s->watchdog_ns = usec * 1000;
			if (s->watchdog_ns / 4 < s->slice_ns)
				s->slice_ns = s->watchdog_ns / 4;
			if (s->watchdog_ns / 2 < 1000000000u) {
				its.it_interval = (struct timespec){ 0, (long)(s->watchdog_ns / 2) };
				its.it_value = its.it_interval;
			}
		}
	}
#endif
	timerfd_settime(s->timerfd, 0, &its, NULL);
	if ((r = moed_loop_add(s->loop, s->listen_fd, MOED_LOOP_READABLE, session_accept, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->sigfd, MOED_LOOP_READABLE, signal_event, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->timerfd, MOED_LOOP_READABLE, tick_event, s)) < 0 ||
	    (r = moed_loop_add(s->loop, s->stats_efd, MOED_LOOP_READABLE, stats_ready_event, s)) < 0) {
		r = moe_err_set(err, r, "epoll_ctl: %s", strerror(-r));
		goto fail;
	}
	*ret = s;
	return 0;
fail:
	moed_server_free(s);
	return r;
}

void moed_server_free(struct moed_server *s)
{
	struct client *c;

	if (!s)
		return;
	if (s->data_ok) {
		atomic_store(&s->stop, true);
		dataplane_wake(s);
		pthread_join(s->data_thread, NULL);
	}
	while ((c = s->clients)) {
		s->clients = c->next;
		session_free(s, c);
	}
	while ((c = s->incoming)) {
		s->incoming = c->next;
		session_free(s, c);
	}
	while ((c = s->greeting)) {
		s->greeting = c->ctl_next;
		session_free(s, c);
	}
	if (s->listen_fd >= 0 && !s->socket_activated)
		close(s->listen_fd);
	if (s->unlink_socket)
		unlink(s->socket_path);
	moed_loop_free(s->loop);
	if (s->sigfd >= 0)
		close(s->sigfd);
	if (s->timerfd >= 0)
		close(s->timerfd);
	if (s->spare_fd >= 0)
		close(s->spare_fd);
	if (s->stats_efd >= 0)
		close(s->stats_efd);
	moe_engine_close(s->engine);
	moed_config_free(s->cfg);
	free(s->config_path);
	for (size_t i = 0; i < s->nov; i++) {
		free((char *)s->ov[i].name);
		free((char *)s->ov[i].value);
	}
	free(s->ov);
	free(s->stats_json);
	free(s->reqs);
	free(s->x);
	free(s->y);
	free(s->ids);
	free(s->w);
	pthread_cond_destroy(&s->pins_cond);
	pthread_mutex_destroy(&s->lock);
	pthread_mutex_destroy(&s->cfg_lock);
	free(s);
}
