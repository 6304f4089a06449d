/* SPDX-License-Identifier: MIT */
/*
 * bench_daemon: the costs moed adds to a request, each against an anchor
 * measured in the same run (bench/run-daemon starts moed and runs this).
 *
 *   ring round trip   an empty request (moe_client_nop) submitted and its
 *                     completion reaped, back to back (moed busy-polling its
 *                     rings) and with a pause between requests long enough
 *                     for moed to go to sleep on its futexes; anchor: a
 *                     64-byte ping-pong over a unix stream socket between
 *                     two processes, measured the same way (back to back);
 *   added latency     a 1-token forward of a layer through moed
 *                     (moe_client_forward, copies included) minus the same
 *                     forward in this process on the engine, the two
 *                     alternated in blocks so that both see the same
 *                     machine; median and p99 of each.
 *
 * bench_daemon SOCKET STORE LAYER [-n N]
 * Timing only: never part of make check.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "libmoeclient/moeclient.h"

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

struct pct {
	double p50, p99;
};

static struct pct percentiles(double *v, size_t n)
{
	qsort(v, n, sizeof(*v), cmp_d);
	return (struct pct){ v[n / 2], v[n * 99 / 100] };
}

/* A 64-byte ping-pong over a unix stream socket pair, between two processes. */
static struct pct unix_rtt(size_t n, double *v)
{
	int sv[2];
	char buf[64] = { 0 };
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		perror("socketpair");
		exit(1);
	}
	pid = fork();
	if (pid == 0) {
		close(sv[0]);
		for (size_t i = 0; i < n + 100; i++) {
			if (read(sv[1], buf, sizeof(buf)) != sizeof(buf) || write(sv[1], buf, sizeof(buf)) != sizeof(buf))
				_exit(1);
		}
		_exit(0);
	}
	close(sv[1]);
	for (size_t i = 0; i < n + 100; i++) {
		double t0 = now_us();

		if (write(sv[0], buf, sizeof(buf)) != sizeof(buf) || read(sv[0], buf, sizeof(buf)) != sizeof(buf)) {
			perror("ping-pong");
			exit(1);
		}
		if (i >= 100)
			v[i - 100] = now_us() - t0;
	}
	close(sv[0]);
	waitpid(pid, NULL, 0);
	return percentiles(v, n);
}

static struct pct nop_rtt(struct moe_client *c, size_t n, double *v, unsigned pause_us)
{
	struct moe_completion cq;

	for (size_t i = 0; i < n + 100; i++) {
		double t0;
		int r;

		if (pause_us)
			usleep(pause_us);
		t0 = now_us();
		r = moe_client_nop(c, i);
		if (r == 0)
			r = moe_client_wait(c, &cq, 1000);
		if (r < 0 || cq.res < 0 || cq.user_data != i) {
			fprintf(stderr, "bench_daemon: nop: %s\n", moe_strerror(r < 0 ? r : cq.res));
			exit(1);
		}
		if (i >= 100)
			v[i - 100] = now_us() - t0;
	}
	return percentiles(v, n);
}

int main(int argc, char **argv)
{
	const char *sock, *store;
	size_t n = 20000;
	uint32_t layer;
	struct moe_client *c;
	struct moe_model_info info;
	struct moe_engine *e;
	struct moe_engine_options eo = { .backend = "cpu" };
	struct moe_err err = { 0 };
	double *v, *va, *vb;
	int r;

	if (argc < 4) {
		fprintf(stderr, "usage: bench_daemon SOCKET STORE LAYER [N]\n");
		return 2;
	}
	sock = argv[1];
	store = argv[2];
	layer = (uint32_t)strtoul(argv[3], NULL, 10);
	if (argc > 4)
		n = strtoul(argv[4], NULL, 10);
	v = malloc(n * sizeof(double));
	va = malloc(n * sizeof(double));
	vb = malloc(n * sizeof(double));
	if (!v || !va || !vb)
		return 1;

	/* the anchor first, so that no moed thread of ours is around */
	struct pct ux = unix_rtt(n, v);

	r = moe_client_connect(sock, NULL, &c);
	if (r < 0) {
		fprintf(stderr, "bench_daemon: connect %s: %s\n", sock, moe_strerror(r));
		return 1;
	}
	moe_client_info(c, &info);
	struct pct busy = nop_rtt(c, n, v, 0);
	struct pct asleep = nop_rtt(c, n / 10, v, 2000);   /* moed sleeps after ~50 us idle */

	/* added latency: the engine here (one thread pool of its own), alternated */
	r = moe_engine_open(store, &eo, &e, &err);
	if (r < 0) {
		fprintf(stderr, "bench_daemon: %s\n", err.msg);
		return 1;
	}
	float *x = malloc(info.hidden_size * sizeof(float)), *y = malloc(info.hidden_size * sizeof(float));
	uint64_t s = 1;
	for (uint32_t i = 0; i < info.hidden_size; i++) {
		s = s * 6364136223846793005ull + 1442695040888963407ull;
		x[i] = (float)((double)(s >> 40) / (double)(1u << 23) - 1.0);
	}
	/* alternated in blocks, not request by request: on a small machine the
	 * engine's worker threads of one side, spinning after their work, would
	 * otherwise take the cores the other side needs */
	size_t m = n / 4, block = 250, na = 0, nb = 0;
	for (size_t i = 0; na < m || nb < m; i++) {
		bool daemon_side = (i / block) % 2 == 0;
		double t0 = now_us();

		if (daemon_side) {
			if (moe_client_forward(c, layer, MOE_F32, x, y, 1, NULL, NULL) < 0)
				return 1;
		} else if (moe_engine_forward(e, layer, x, 1, y, NULL, NULL, 0, &err) < 0) {
			fprintf(stderr, "bench_daemon: %s\n", err.msg);
			return 1;
		}
		double dt = now_us() - t0;
		if (i % block < 50)
			continue;           /* the first of a block warms that side up */
		if (daemon_side && na < m)
			va[na++] = dt;
		else if (!daemon_side && nb < m)
			vb[nb++] = dt;
	}
	struct pct fd = percentiles(va, m), fi = percentiles(vb, m);

	printf("ring round trip (empty request, %zu each), anchor: unix socket ping-pong of 64 bytes\n", n);
	printf("  %-34s %9s %9s %12s\n", "", "p50 us", "p99 us", "p50 / anchor");
	printf("  %-34s %9.2f %9.2f %12s\n", "unix socket (anchor)", ux.p50, ux.p99, "1.00");
	printf("  %-34s %9.2f %9.2f %12.2f   target <= 0.2\n", "rings, moed busy-polling", busy.p50, busy.p99,
	       busy.p50 / ux.p50);
	printf("  %-34s %9.2f %9.2f %12.2f\n", "rings, moed asleep (futex wake)", asleep.p50, asleep.p99,
	       asleep.p50 / ux.p50);
	printf("added latency, 1 token, layer %u of %s (hidden %u, %u experts, top-%u), %zu of each, alternated in blocks\n",
	       layer, info.model_type, info.hidden_size, info.num_experts, info.top_k, m);
	printf("  %-34s %9.2f %9.2f\n", "through moed", fd.p50, fd.p99);
	printf("  %-34s %9.2f %9.2f\n", "in process (anchor)", fi.p50, fi.p99);
	printf("  %-34s %9.2f %9.2f   target median <= 20 us\n", "added by moed", fd.p50 - fi.p50, fd.p99 - fi.p99);
	moe_engine_close(e);
	moe_client_disconnect(c);
	free(x);
	free(y);
	free(v);
	free(va);
	free(vb);
	return 0;
}
