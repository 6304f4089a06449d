/* SPDX-License-Identifier: MIT */
/*
 * moed: serve the MoE layers of a model store to local processes.  The
 * command line; everything else is in the server (server.h) and the engine.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "engine/store.h"
#include "engine/suggest.h"
#include "log.h"
#include "server.h"

static void usage(FILE *f)
{
	fputs("usage: moed [options]\n"
	      "\n"
	      "Serve the Mixture-of-Experts layers of a model store to local processes\n"
	      "through libmoeclient.  Runs in the foreground; stop it with SIGTERM,\n"
	      "reload its configuration with SIGHUP.\n"
	      "\n"
	      "  -c, --config FILE     the configuration (default " MOED_CONFIG_FILE ";\n"
	      "                        a missing default file means the built-in defaults)\n"
	      "  -m, --model STORE     the .moe store to serve (config: model)\n"
	      "  -s, --socket PATH     the unix socket (config: socket.path)\n"
	      "  -b, --backend B       auto, cpu or cuda (config: backend)\n"
	      "  -l, --log-level L     emerg .. debug (config: log.level)\n"
	      "  -o, --set NAME=VALUE  any other setting of moed.conf(5), e.g. cache.host_mb=8192\n"
	      "      --check-config    check the configuration, print it, exit\n"
	      "  -h, --help            this text\n"
	      "  -V, --version         the version\n", f);
}

enum { OPT_CHECK = 256 };

static const struct option long_opts[] = {
	{ "config", required_argument, NULL, 'c' },
	{ "model", required_argument, NULL, 'm' },
	{ "socket", required_argument, NULL, 's' },
	{ "backend", required_argument, NULL, 'b' },
	{ "log-level", required_argument, NULL, 'l' },
	{ "set", required_argument, NULL, 'o' },
	{ "check-config", no_argument, NULL, OPT_CHECK },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

/* getopt_long's '?': the option, and the nearest of ours when one is close. */
static int unknown_option(int argc, char **argv)
{
	const char *names[sizeof(long_opts) / sizeof(long_opts[0])], *arg, *word, *near;
	char shortopt[3] = { '-', (char)optopt, 0 }, buf[64];
	size_t n = 0;

	arg = optind > 0 && optind <= argc ? argv[optind - 1] : "?";
	if (optopt && strncmp(arg, "--", 2))
		arg = shortopt;
	for (; long_opts[n].name; n++)
		names[n] = long_opts[n].name;
	snprintf(buf, sizeof(buf), "%s", arg + strspn(arg, "-"));
	buf[strcspn(buf, "=")] = '\0';
	word = buf;
	near = strlen(word) > 1 ? moe_suggest(word, names, n) : NULL;
	if (near)
		fprintf(stderr, "moed: unknown option '%s'; did you mean '--%s'? (see moed --help)\n", arg, near);
	else
		fprintf(stderr, "moed: unknown option '%s' (see moed --help)\n", arg);
	return MOED_EXIT_USAGE;
}

/* "moed: FILE:LINE: NAME: " (or without the place for a default) and @msg. */
static void check_failed(const struct moed_config *c, const char *name, const char *msg)
{
	const char *o = moed_config_origin(c, name);

	fprintf(stderr, "moed: %s%s%s%s: %s\n", o ? o : "", o ? ": " : "", name,
		o ? "" : " (the default)", msg);
}

/*
 * What --check-config checks beyond the file's syntax and values, that the
 * start would otherwise find one at a time: the store opens and is one,
 * the socket has a place, a configured group exists (users and groups of
 * access.* were resolved by the load).  Each failure names the setting and
 * where it was set.  Returns how many failed.
 */
static int check_runtime(const struct moed_config *c)
{
	char place[PATH_MAX], why[PATH_MAX + 160], msg[1024];
	struct moe_err err = { 0 };
	struct moe_store *st;
	int failed = 0;

	if (moe_store_open(c->model, &st, &err) < 0) {
		check_failed(c, "model", err.msg);
		failed++;
	} else {
		moe_store_close(st);
	}
	if (moed_socket_place(c, false, place, sizeof(place), why, sizeof(why), &err) < 0) {
		check_failed(c, "socket.path", err.msg);
		failed++;
	} else {
		printf("# socket (unless systemd passes one): %s: %s\n", place, why);
	}
	if (c->socket.group[0] && !getgrnam(c->socket.group)) {
		if (moed_config_is_default(c, "socket.group")) {
			printf("# socket.group: no group %s here: the socket keeps its group\n", c->socket.group);
		} else {
			snprintf(msg, sizeof(msg), "group %s does not exist: create it (groupadd %s) or set "
				 "socket.group", c->socket.group, c->socket.group);
			check_failed(c, "socket.group", msg);
			failed++;
		}
	}
	return failed;
}

int main(int argc, char **argv)
{
	struct moed_override ov[64];
	size_t nov = 0;
	const char *config_path = NULL;
	bool check = false, explicit_config = false;
	struct moed_config *cfg = NULL;
	struct moed_server *srv = NULL;
	struct moe_err err = { 0 };
	int c, r, status;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":c:m:s:b:l:o:hV", long_opts, NULL)) != -1) {
		const char *name = NULL;

		switch (c) {
		case 'c':
			config_path = optarg;
			explicit_config = true;
			continue;
		case 'm': name = "model"; break;
		case 's': name = "socket.path"; break;
		case 'b': name = "backend"; break;
		case 'l': name = "log.level"; break;
		case 'o': {
			char *eq = strchr(optarg, '=');

			if (!eq || eq == optarg) {
				fprintf(stderr, "moed: --set wants NAME=VALUE, not '%s'\n", optarg);
				return MOED_EXIT_USAGE;
			}
			if (nov == sizeof(ov) / sizeof(ov[0])) {
				fprintf(stderr, "moed: too many --set options\n");
				return MOED_EXIT_USAGE;
			}
			*eq = '\0';
			ov[nov++] = (struct moed_override){ optarg, eq + 1 };
			continue;
		}
		case OPT_CHECK:
			check = true;
			continue;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("moed %s\n", PACKAGE_VERSION);
			return 0;
		case ':':
			fprintf(stderr, "moed: %s needs a value\n", argv[optind - 1]);
			return MOED_EXIT_USAGE;
		default:
			return unknown_option(argc, argv);
		}
		if (nov == sizeof(ov) / sizeof(ov[0])) {
			fprintf(stderr, "moed: too many options\n");
			return MOED_EXIT_USAGE;
		}
		ov[nov++] = (struct moed_override){ name, optarg };
	}
	if (optind < argc) {
		fprintf(stderr, "moed: unexpected argument '%s' (see moed --help)\n", argv[optind]);
		return MOED_EXIT_USAGE;
	}

	if (!config_path)
		config_path = MOED_CONFIG_FILE;
	r = moed_config_load(config_path, &cfg, &err);
	if (r == -ENOENT && !explicit_config) {
		/* no file at the default place: the built-in defaults */
		config_path = NULL;
		r = moed_config_defaults(&cfg, &err);
	}
	if (r < 0) {
		fprintf(stderr, "moed: %s\n", err.msg);
		return moed_exit_status(r);
	}
	for (size_t i = 0; i < nov; i++) {
		r = moed_config_set(cfg, ov[i].name, ov[i].value, &err);
		if (r < 0) {
			fprintf(stderr, "moed: command line: %s\n", err.msg);
			moed_config_free(cfg);
			return moed_exit_status(r);
		}
	}
	if (check) {
		int failed = check_runtime(cfg);
		char *dump = moed_config_dump(cfg);

		if (failed)
			fprintf(stderr, "moed: %s: %d problem%s\n", config_path ? config_path : "built-in defaults",
				failed, failed > 1 ? "s" : "");
		else
			printf("# %s: OK\n%s", config_path ? config_path : "built-in defaults", dump ? dump : "");
		free(dump);
		moed_config_free(cfg);
		return failed ? MOED_EXIT_CONFIG : 0;
	}
	moed_log_set_level(cfg->log.level);
	moed_log_set_ratelimit(cfg->log.ratelimit_burst, cfg->log.ratelimit_interval_ms);

	r = moed_server_new(cfg, config_path, ov, nov, &srv, &err);   /* takes cfg */
	if (r < 0) {
		log_error("%s", err.msg);
		return moed_exit_status(r);
	}
	status = moed_server_run(srv);
	moed_server_free(srv);
	log_info("stopped");
	return status;
}
