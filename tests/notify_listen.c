/* SPDX-License-Identifier: MIT */
/*
 * notify_listen SOCKET [SECONDS]: stand in for systemd's notification
 * socket in the shell tests.  Binds a unix datagram socket at SOCKET and
 * writes each datagram it receives to standard output, one assignment per
 * line as sd_notify(3) sends them, flushing after each, so that a test can
 * watch for READY=1 with grep.  Exits 0 on SIGTERM or SIGINT, or after
 * SECONDS (default 60) so that a test that dies leaves nothing behind;
 * removes SOCKET on the way out.  Exit 1 when SOCKET cannot be bound.
 *
 * A C program and not python3 or socat: neither is in a minimal Debian.
 */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DGRAM_MAX 4096   /* sd_notify messages are short; the rest is cut */

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct sigaction sa = { .sa_handler = on_signal };
	char buf[DGRAM_MAX + 1];
	long seconds = 60;
	time_t end;
	int fd;

	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: notify_listen SOCKET [SECONDS]\n");
		return 2;
	}
	if (argc == 3)
		seconds = strtol(argv[2], NULL, 10);
	if (strlen(argv[1]) >= sizeof(a.sun_path)) {
		fprintf(stderr, "notify_listen: %s: path too long\n", argv[1]);
		return 1;
	}
	strcpy(a.sun_path, argv[1]);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		fprintf(stderr, "notify_listen: %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	end = time(NULL) + seconds;
	while (!stop && time(NULL) < end) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 200) <= 0)
			continue;
		n = recv(fd, buf, DGRAM_MAX, MSG_DONTWAIT);
		if (n <= 0)
			continue;
		buf[n] = '\0';
		/* a message may hold several assignments, one per line */
		fputs(buf, stdout);
		if (buf[n - 1] != '\n')
			fputc('\n', stdout);
		fflush(stdout);
	}
	close(fd);
	unlink(argv[1]);
	return 0;
}
