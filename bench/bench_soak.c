/* SPDX-License-Identifier: MIT */
/*
 * bench_soak: moed under a long mixed load, every answer checked (bench/
 * run-soak makes the store, starts moed with a small host cache, so that
 * experts are paged from the store throughout, and runs this).
 *
 * For --duration seconds, against the moed of --pid on --socket:
 *   - --clients well-behaved client processes, each with its own
 *     libmoeclient session and its own engine on --store in-process: random
 *     requests of 1..--max-tokens tokens on random layers, f32 and bf16,
 *     with and without the routing output, one at a time
 *     (moe_client_forward) or up to 8 submitted together, now and then an
 *     empty request or a new session; every answer compared bit for bit
 *     with the engine's (soak_clients.c);
 *   - one client that stalls: it works, then stops reading its completions
 *     for --stall seconds, its rings full, or SIGSTOPs itself with
 *     requests in flight (this driver SIGCONTs it), then checks them all;
 *   - one hostile client: garbage and bad HELLOs, connections dropped,
 *     bad descriptors and layers, corrupt ring indices, sessions closed
 *     with requests in flight, silent connections (soak_hostile.c).
 * Every --interval seconds it prints a row: requests checked, wrong
 * results, errors, stalls, hostile actions, expert loads from the store,
 * and moed's RSS, descriptors, threads and CPU (from /proc/PID).  At the
 * end every client stops and it measures moed's CPU over --idle seconds
 * twice: with the stalling client holding a full completion ring, and
 * with no client at all.  Then a table for notes, the errors by kind, and
 * a verdict.
 *
 * Exit 0 when every answer was right, no well-behaved or stalling client
 * saw an error, the hostile client got only the answers the protocol
 * allows, moed lived, gave back every descriptor, and idled within
 * --max-idle-cpu percent of a core (its one bound on time); 1 otherwise;
 * 2 for bad arguments.  The long run is never part of make check:
 * tests/bench_soak.sh runs two seconds of it there, without that bound.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench/benchutil.h"
#include "bench/soak.h"
#include "tests/daemonutil.h"

#define MAX_CLIENTS 256
#define TICK_MS 100              /* the driver's look at its children and moed */
#define START_MS 120000          /* every client has connected (engines open, ASan) */
#define FINISH_MS 120000         /* clients finish what they have in hand after stop */
#define FD_SETTLE_MS 10000       /* moed closes what the last sessions held: then it
				  * must hold what it held before the first */

struct opts {
	const char *sock, *store;
	pid_t pid;
	double duration, interval, idle, stall;
	int clients;
	uint32_t max_tokens;
	uint64_t seed;
	double max_idle_cpu;         /* percent of a core; < 0: not checked */
};

/* What /proc says of moed at one moment. */
struct sample {
	uint64_t t_ns;
	uint64_t cpu_ticks;          /* utime + stime, all threads */
	uint64_t rss_kb;
	int fds, threads;
	char state;
};

static int proc_sample(pid_t pid, struct sample *s)
{
	char path[64], buf[2048], *p;
	unsigned long long ut, st, threads;
	long long rss_pages;
	FILE *f;
	size_t n;

	memset(s, 0, sizeof(*s));
	s->t_ns = moe_now_ns();
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -errno;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');       /* the command may hold spaces and parentheses */
	/* fields 3 (state) ... 14 utime 15 stime ... 20 num_threads ... 24 rss */
	if (!p || sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %llu %*d %*u "
			 "%*u %lld", &s->state, &ut, &st, &threads, &rss_pages) != 5)
		return -EPROTO;
	s->cpu_ticks = ut + st;
	s->threads = (int)threads;
	s->rss_kb = (uint64_t)rss_pages * (uint64_t)sysconf(_SC_PAGESIZE) / 1024;
	s->fds = moe_test_count_fds(pid, NULL, 0);
	return 0;
}

/* moed's CPU between two samples, in percent of one core. */
static double cpu_pct(const struct sample *a, const struct sample *b)
{
	double dt = (double)(b->t_ns - a->t_ns) * 1e-9;

	return dt > 0 ? 100.0 * (double)(b->cpu_ticks - a->cpu_ticks) / (double)sysconf(_SC_CLK_TCK) / dt : 0;
}

/* ------------------------------------------------------------------ moed's figures */

/* What moe_client_stats() tells, of interest here. */
struct figures {
	uint64_t requests, errors, loads, hits, misses, slots;
	bool ok;
};

static uint64_t json_u64(json_t *root, const char *a, const char *b, const char *c, const char *d)
{
	json_t *v = json_object_get(root, a);

	if (b)
		v = json_object_get(v, b);
	if (c)
		v = json_object_get(v, c);
	if (d)
		v = json_object_get(v, d);
	return json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0;
}

static struct figures figures_get(struct moe_client *c)
{
	struct figures f = { 0 };
	char *text = NULL;
	json_t *root;

	if (!c || moe_client_stats(c, &text) < 0)
		return f;
	root = json_loads(text, 0, NULL);
	free(text);
	if (!root)
		return f;
	f.requests = json_u64(root, "requests", NULL, NULL, NULL);
	f.errors = json_u64(root, "errors", NULL, NULL, NULL);
	f.loads = json_u64(root, "engine", "pager", "loads", NULL);
	f.hits = json_u64(root, "engine", "total", "host", "hits");
	f.misses = json_u64(root, "engine", "total", "host", "misses");
	f.slots = json_u64(root, "engine", "host_cache", "slots", NULL);
	f.ok = json_object_get(root, "engine") != NULL;
	json_decref(root);
	return f;
}

/* ------------------------------------------------------------------ children */

struct run {
	struct opts o;
	struct soak_board *b;
	pid_t kids[MAX_CLIENTS + 2];
	int nkids;
	pid_t stall_pid;
	uint64_t stopped_at;         /* when the stalling client stopped itself; 0: it did not */
	int child_failures;
	bool moed_died;
};

static pid_t spawn(struct run *R, int (*fn)(const struct soak_client *), int id)
{
	struct soak_client a = { .b = R->b, .sock = R->o.sock, .store = R->o.store, .id = id,
				 .seed = R->o.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(id + 1)),
				 .max_tokens = R->o.max_tokens, .stall_ms = (unsigned)(R->o.stall * 1000),
				 .work_ms = (unsigned)(R->o.stall * 1000) };
	pid_t parent = getpid(), pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		perror("bench_soak: fork");
		exit(1);
	}
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(99);
		signal(SIGPIPE, SIG_IGN);
		_exit(fn(&a));
	}
	R->kids[R->nkids++] = pid;
	return pid;
}

static const char *kid_name(const struct run *R, pid_t pid, char *buf, size_t len)
{
	for (int i = 0; i < R->nkids; i++)
		if (R->kids[i] == pid) {
			if (i < R->o.clients)
				snprintf(buf, len, "client %d", i);
			else
				snprintf(buf, len, "%s", pid == R->stall_pid ? "stalling client" : "hostile client");
			return buf;
		}
	snprintf(buf, len, "pid %d", (int)pid);
	return buf;
}

static void forget(struct run *R, pid_t pid)
{
	for (int i = 0; i < R->nkids; i++)
		if (R->kids[i] == pid)
			R->kids[i] = 0;
}

static int live_kids(const struct run *R)
{
	int n = 0;

	for (int i = 0; i < R->nkids; i++)
		n += R->kids[i] > 0;
	return n;
}

/* Reap children that ended (a failure unless @stopping and it exited 0),
 * note when the stalling one stopped itself, and SIGCONT it after its
 * stall. */
static void tend(struct run *R, bool stopping)
{
	char name[64];
	pid_t pid;
	int st;

	while ((pid = waitpid(-1, &st, WNOHANG | WUNTRACED)) > 0) {
		if (WIFSTOPPED(st)) {
			if (pid == R->stall_pid)
				R->stopped_at = moe_now_ns();
			continue;
		}
		kid_name(R, pid, name, sizeof(name));
		forget(R, pid);
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0 && stopping)
			continue;
		R->child_failures++;
		if (WIFSIGNALED(st))
			soak_fail(R->b, "driver", "%s ended by signal %d (%s)", name, WTERMSIG(st),
				  strsignal(WTERMSIG(st)));
		else
			soak_fail(R->b, "driver", "%s exited with status %d%s", name, WEXITSTATUS(st),
				  stopping ? "" : " before the end of the run");
	}
	if (R->stopped_at && (stopping || moe_now_ns() - R->stopped_at >= (uint64_t)(R->o.stall * 1e9))) {
		kill(R->stall_pid, SIGCONT);
		R->stopped_at = 0;
	}
}

static bool moed_alive(struct run *R)
{
	struct sample s;

	if (R->moed_died)
		return false;
	if (kill(R->o.pid, 0) < 0 || proc_sample(R->o.pid, &s) < 0 || s.state == 'Z' || s.state == 'X') {
		R->moed_died = true;
		soak_fail(R->b, "driver", "moed (pid %d) is gone", (int)R->o.pid);
	}
	return !R->moed_died;
}

/* Tend the children (and watch moed) for @ms, or until @done(R) holds:
 * whether it did. */
static bool tend_until(struct run *R, bool stopping, int ms, bool (*done)(const struct run *))
{
	uint64_t end = moe_now_ns() + (uint64_t)ms * 1000000u;

	while (moe_now_ns() < end) {
		tend(R, stopping);
		if (done && done(R))
			return true;
		moed_alive(R);
		moe_test_sleep_ms(TICK_MS);
	}
	return done == NULL;
}

/* SIGKILL and reap the children still there (after a failure). */
static void kill_kids(struct run *R)
{
	for (int i = 0; i < R->nkids; i++)
		if (R->kids[i] > 0) {
			kill(R->kids[i], SIGKILL);
			waitpid(R->kids[i], NULL, 0);
			R->kids[i] = 0;
		}
}

static bool all_ready(const struct run *R)
{
	return atomic_load(&R->b->ready) >= R->o.clients + 2;
}

/* Only the stalling client is left. */
static bool others_gone(const struct run *R)
{
	return live_kids(R) <= (R->stall_pid > 0 && R->kids[R->o.clients] > 0);
}

static bool holding(const struct run *R)
{
	return atomic_load(&R->b->stall_state) == STALL_HOLDING || R->kids[R->o.clients] == 0;
}

static bool none_left(const struct run *R)
{
	return live_kids(R) == 0;
}

/* ------------------------------------------------------------------ report */

static uint64_t ld(atomic_ullong *v)
{
	return atomic_load(v);
}

static uint64_t acts_total(struct soak_board *b)
{
	uint64_t n = 0;

	for (int i = 0; i < NACTS; i++)
		n += ld(&b->acts[i]);
	return n;
}

/* A short name of error kind @i: "EINVAL", "MOE_E_LAYER", or the number. */
static const char *kind_name(int i, char *buf, size_t len)
{
	static const char *const moe[] = { "MOE_E_PROTO", "MOE_E_LAYER", "MOE_E_CHECKSUM" };
	const char *n = NULL;

	if (i >= SOAK_ERRNO_KINDS && (size_t)(i - SOAK_ERRNO_KINDS) < sizeof(moe) / sizeof(moe[0]))
		return moe[i - SOAK_ERRNO_KINDS];
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
	if (i > 0 && i < SOAK_ERRNO_KINDS)
		n = strerrorname_np(i);
#endif
	if (n)
		return n;
	snprintf(buf, len, "%d", soak_code(i));
	return buf;
}

/* "EFAULT 12, EINVAL 3" or "none" (to the end of a row). */
static void print_kinds_short(struct soak_counters *k)
{
	char buf[16];
	bool any = false;

	for (int i = 0; i < SOAK_KINDS; i++) {
		uint64_t n = ld(&k->err[i]);

		if (n) {
			printf("%s%s %" PRIu64, any ? ", " : " ", kind_name(i, buf, sizeof(buf)), n);
			any = true;
		}
	}
	if (!any)
		printf(" none");
}

static void print_kinds(const char *title, struct soak_counters *k)
{
	bool any = false;

	printf("%s:", title);
	for (int i = 0; i < SOAK_KINDS; i++) {
		uint64_t n = ld(&k->err[i]);

		if (!n)
			continue;
		if (i == 0) {
			printf("\n  %10" PRIu64 "  (a code that is not an error number)", n);
		} else {
			char buf[16];

			printf("\n  %10" PRIu64 "  %-14s %5d  %s", n, kind_name(i, buf, sizeof(buf)), soak_code(i),
			       moe_strerror(soak_code(i)));
		}
		any = true;
	}
	printf("%s\n", any ? "" : " none");
}

static void header(void)
{
	printf("%7s %10s %8s %9s %6s %6s %6s %8s %8s %8s %6s %7s %5s %4s %6s\n", "t s", "requests", "req/s",
	       "tokens/s", "wrong", "errors", "stalls", "hostile", "refused", "loads/s", "hit%", "RSS MB", "fds",
	       "thr", "CPU%");
}

struct row_state {
	struct sample s;
	uint64_t requests, tokens;
	struct figures f;
};

static void row(struct run *R, double t, struct row_state *prev, struct moe_client *stats)
{
	struct soak_board *b = R->b;
	struct row_state now = { 0 };
	double dt;
	uint64_t dh, dm;

	proc_sample(R->o.pid, &now.s);
	now.requests = ld(&b->good.requests) + ld(&b->stall.requests);
	now.tokens = ld(&b->good.tokens) + ld(&b->stall.tokens);
	now.f = figures_get(stats);
	if (!now.f.ok)
		now.f = prev->f;     /* no figures this time: a row of zeros, not of garbage */
	dt = (double)(now.s.t_ns - prev->s.t_ns) * 1e-9;
	dh = now.f.hits - prev->f.hits;
	dm = now.f.misses - prev->f.misses;
	printf("%7.0f %10" PRIu64 " %8.0f %9.0f %6" PRIu64 " %6" PRIu64 " %6" PRIu64 " %8" PRIu64 " %8" PRIu64
	       " %8.0f %6.1f %7.1f %5d %4d %6.1f\n", t, now.requests, (double)(now.requests - prev->requests) / dt,
	       (double)(now.tokens - prev->tokens) / dt, ld(&b->good.wrong) + ld(&b->stall.wrong),
	       ld(&b->good.errors) + ld(&b->stall.errors), ld(&b->stalls_full) + ld(&b->stalls_stopped),
	       acts_total(b), ld(&b->refused), (double)(now.f.loads - prev->f.loads) / dt,
	       dh + dm ? 100.0 * (double)dh / (double)(dh + dm) : 0.0, (double)now.s.rss_kb / 1024.0, now.s.fds,
	       now.s.threads, cpu_pct(&prev->s, &now.s));
	printf("%7s errors by kind: clients", "");
	print_kinds_short(&b->good);
	printf("; stalling client");
	print_kinds_short(&b->stall);
	printf("; hostile client (expected)");
	print_kinds_short(&b->hostile);
	printf("\n");
	fflush(stdout);
	*prev = now;
}

/* moed's CPU over @secs from now, in percent of a core (-1: unreadable). */
static double idle_cpu(struct run *R, double secs, bool stopping)
{
	struct sample a, z;

	if (proc_sample(R->o.pid, &a) < 0)
		return -1;
	tend_until(R, stopping, (int)(secs * 1000), NULL);
	if (proc_sample(R->o.pid, &z) < 0)
		return -1;
	return cpu_pct(&a, &z);
}

/* ------------------------------------------------------------------ main */

static void usage(void)
{
	fprintf(stderr, "usage: bench_soak --socket PATH --store STORE --pid MOED_PID [--duration S] [--clients N]\n"
		"                  [--interval S] [--max-tokens T] [--stall S] [--idle S] [--seed N]\n"
		"                  [--max-idle-cpu PCT | --max-idle-cpu off]\n");
	exit(2);
}

static double num(const char *name, const char *v, double lo, double hi)
{
	char *end;
	double x = strtod(v, &end);

	if (*v == '\0' || *end != '\0' || !(x >= lo && x <= hi)) {
		fprintf(stderr, "bench_soak: --%s %s: a number from %g to %g\n", name, v, lo, hi);
		exit(2);
	}
	return x;
}

static void parse(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "socket", required_argument, NULL, 'S' }, { "store", required_argument, NULL, 's' },
		{ "pid", required_argument, NULL, 'p' }, { "duration", required_argument, NULL, 'd' },
		{ "clients", required_argument, NULL, 'c' }, { "interval", required_argument, NULL, 'i' },
		{ "max-tokens", required_argument, NULL, 't' }, { "stall", required_argument, NULL, 'w' },
		{ "idle", required_argument, NULL, 'I' }, { "seed", required_argument, NULL, 'r' },
		{ "max-idle-cpu", required_argument, NULL, 'C' }, { NULL, 0, NULL, 0 },
	};
	int c;

	*o = (struct opts){ .duration = 60, .interval = 10, .idle = 5, .stall = 3, .clients = 8, .max_tokens = 64,
			    .seed = 1, .max_idle_cpu = 5 };
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'S': o->sock = optarg; break;
		case 's': o->store = optarg; break;
		case 'p': o->pid = (pid_t)num("pid", optarg, 1, 1 << 30); break;
		case 'd': o->duration = num("duration", optarg, 1, 1e6); break;
		case 'c': o->clients = (int)num("clients", optarg, 1, MAX_CLIENTS); break;
		case 'i': o->interval = num("interval", optarg, 0.5, 1e6); break;
		case 't': o->max_tokens = (uint32_t)num("max-tokens", optarg, 1, 1 << 20); break;
		case 'w': o->stall = num("stall", optarg, 0.1, 3600); break;
		case 'I': o->idle = num("idle", optarg, 0.1, 3600); break;
		case 'r': o->seed = (uint64_t)num("seed", optarg, 0, 1e15); break;
		case 'C':
			o->max_idle_cpu = strcmp(optarg, "off") ? num("max-idle-cpu", optarg, 0, 1e4) : -1;
			break;
		default: usage();
		}
	}
	if (optind != argc || !o->sock || !o->store || !o->pid)
		usage();
}

int main(int argc, char **argv)
{
	struct run R = { 0 };
	struct sample s0, speak, s_end;
	struct row_state prev = { 0 };
	struct figures f_end = { 0 };
	struct moe_client *stats = NULL;
	double t, cpu_stalled = -1, cpu_idle = -1, next;
	uint64_t t0;
	int r, fds_end;
	bool ok;

	parse(argc, argv, &R.o);
	R.b = mmap(NULL, sizeof(*R.b), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (R.b == MAP_FAILED) {
		perror("bench_soak: mmap");
		return 1;
	}
	memset(R.b, 0, sizeof(*R.b));
	signal(SIGPIPE, SIG_IGN);
	if (proc_sample(R.o.pid, &s0) < 0 || s0.fds < 0) {
		fprintf(stderr, "bench_soak: cannot read /proc/%d: is moed running there, as this user?\n",
			(int)R.o.pid);
		return 1;
	}
	speak = s0;
	printf("soak: %d well-behaved clients, 1 stalling (%.1f s stalls), 1 hostile; requests of 1..%u tokens; "
	       "%.0f s, a row every %.0f s; seed %" PRIu64 "\n", R.o.clients, R.o.stall, R.o.max_tokens, R.o.duration,
	       R.o.interval, R.o.seed);

	/* every fork before this process holds a session (and before any engine) */
	for (int i = 0; i < R.o.clients; i++)
		spawn(&R, soak_good_client, i);
	R.stall_pid = spawn(&R, soak_stall_client, R.o.clients);
	spawn(&R, soak_hostile_client, R.o.clients + 1);
	if (!tend_until(&R, false, START_MS, all_ready))
		soak_fail(R.b, "driver", "only %d of %d clients connected within %d s", atomic_load(&R.b->ready),
			  R.o.clients + 2, START_MS / 1000);
	r = moe_client_connect(R.o.sock, NULL, &stats);
	if (r < 0) {
		stats = NULL;
		soak_fail(R.b, "driver", "a session for moed's figures: %s", moe_strerror(r));
	}

	t0 = moe_now_ns();
	prev.s = s0;
	prev.f = figures_get(stats);
	header();
	for (next = R.o.interval;;) {
		tend(&R, false);
		if (!moed_alive(&R) || R.child_failures)
			break;
		t = (double)(moe_now_ns() - t0) * 1e-9;
		if (t >= next || t >= R.o.duration) {
			row(&R, t, &prev, stats);
			if (prev.s.rss_kb > speak.rss_kb)
				speak.rss_kb = prev.s.rss_kb;
			if (prev.s.fds > speak.fds)
				speak.fds = prev.s.fds;
			next += R.o.interval;
		}
		if (t >= R.o.duration)
			break;
		moe_test_sleep_ms(TICK_MS);
	}

	/* the end: the clients stop; the stalling one holds a full ring */
	atomic_store(&R.b->stop, 1);
	if (!R.moed_died && !tend_until(&R, true, FINISH_MS, others_gone) && !R.moed_died)
		soak_fail(R.b, "driver", "%d clients did not finish within %d s of the end", live_kids(&R) - 1,
			  FINISH_MS / 1000);
	if (!R.moed_died && !tend_until(&R, true, FINISH_MS, holding) && !R.moed_died)
		soak_fail(R.b, "driver", "the stalling client did not fill its rings within %d s", FINISH_MS / 1000);
	if (!R.moed_died && holding(&R) && R.kids[R.o.clients] > 0)
		cpu_stalled = idle_cpu(&R, R.o.idle, true);
	atomic_store(&R.b->quit, 1);
	if (!tend_until(&R, true, R.moed_died ? 5000 : FINISH_MS, none_left) && !R.moed_died)
		soak_fail(R.b, "driver", "the stalling client did not finish within %d s", FINISH_MS / 1000);
	kill_kids(&R);
	f_end = figures_get(stats);
	moe_client_disconnect(stats);

	/* every session is gone: moed gives their descriptors back, and idles */
	fds_end = -1;
	if (moed_alive(&R)) {
		for (uint64_t end = moe_now_ns() + FD_SETTLE_MS * 1000000ull; moe_now_ns() < end;
		     moe_test_sleep_ms(TICK_MS)) {
			fds_end = moe_test_count_fds(R.o.pid, NULL, 0);
			if (fds_end <= s0.fds)
				break;
		}
		cpu_idle = idle_cpu(&R, R.o.idle, true);
	}
	proc_sample(R.o.pid, &s_end);

	/* the table */
	{
		struct soak_board *b = R.b;
		uint64_t req = ld(&b->good.requests) + ld(&b->stall.requests);
		uint64_t wrong = ld(&b->good.wrong) + ld(&b->stall.wrong);
		uint64_t errs = ld(&b->good.errors) + ld(&b->stall.errors);
		bool cpu_bad = R.o.max_idle_cpu >= 0 && (cpu_idle > R.o.max_idle_cpu || cpu_stalled > R.o.max_idle_cpu);
		bool fd_bad = !R.moed_died && (fds_end < 0 || fds_end > s0.fds);
		char cs[64] = "not measured", ci[64] = "not measured";
		uint64_t h = f_end.hits, m = f_end.misses;
		double secs = (double)(moe_now_ns() - t0) * 1e-9;

		ok = !wrong && !errs && !ld(&b->unexpected) && !R.child_failures && !R.moed_died && !cpu_bad &&
		     !fd_bad && !b->have_why;
		printf("\n| measure | result |\n|---|---|\n");
		printf("| run | %.0f s, %d well-behaved clients + 1 stalling + 1 hostile, 1..%u tokens per request |\n",
		       R.o.duration, R.o.clients, R.o.max_tokens);
		printf("| requests checked bit for bit | %" PRIu64 " (%" PRIu64 " tokens; %" PRIu64 " by the stalling "
		       "client), %" PRIu64 " empty requests |\n", req,
		       ld(&b->good.tokens) + ld(&b->stall.tokens), ld(&b->stall.requests),
		       ld(&b->good.nops) + ld(&b->stall.nops));
		printf("| wrong results | %" PRIu64 " |\n", wrong);
		printf("| errors, well-behaved and stalling clients | %" PRIu64 " |\n", errs);
		printf("| sessions closed and opened again | %" PRIu64 " |\n", ld(&b->reconnects));
		printf("| stalls: rings full / SIGSTOP | %" PRIu64 " / %" PRIu64 " (%.1f s each; %" PRIu64
		       " requests in flight in the last) |\n", ld(&b->stalls_full), ld(&b->stalls_stopped), R.o.stall,
		       ld(&b->stall_inflight));
		printf("| hostile actions | %" PRIu64 ":", acts_total(b));
		for (int i = 0; i < NACTS; i++)
			printf("%s %s %" PRIu64, i ? "," : "", soak_act_names[i], ld(&b->acts[i]));
		printf(" |\n");
		printf("| hostile: refused / HELLOs accepted / sessions ended / unexpected | %" PRIu64 " / %" PRIu64
		       " / %" PRIu64 " / %" PRIu64 " |\n", ld(&b->refused), ld(&b->accepted_hellos), ld(&b->ended),
		       ld(&b->unexpected));
		if (f_end.ok)
			printf("| moed: requests / errors / expert loads from the store / host-cache hit rate (%" PRIu64
			       " slots) | %" PRIu64 " / %" PRIu64 " / %" PRIu64 " / %.1f%% |\n", f_end.slots,
			       f_end.requests, f_end.errors, f_end.loads,
			       h + m ? 100.0 * (double)h / (double)(h + m) : 0);
		if (!R.moed_died) {
			printf("| moed RSS: start / peak / end | %.1f / %.1f / %.1f MB |\n", (double)s0.rss_kb / 1024,
			       (double)speak.rss_kb / 1024, (double)s_end.rss_kb / 1024);
			printf("| moed descriptors: start / peak / end | %d / %d / %d%s |\n", s0.fds, speak.fds,
			       fds_end, fd_bad ? " (not given back)" : "");
			printf("| moed threads: start / end | %d / %d |\n", s0.threads, s_end.threads);
		} else {
			printf("| moed | DIED during the run (RSS peak %.1f MB, %d descriptors at most) |\n",
			       (double)speak.rss_kb / 1024, speak.fds);
		}
		if (cpu_stalled >= 0)
			snprintf(cs, sizeof(cs), "%.1f%% of a core over %.1f s", cpu_stalled, R.o.idle);
		if (cpu_idle >= 0)
			snprintf(ci, sizeof(ci), "%.1f%% of a core over %.1f s", cpu_idle, R.o.idle);
		printf("| moed CPU, idle, one client stalled on a full ring | %s |\n", cs);
		printf("| moed CPU, idle, no client | %s |\n", ci);
		printf("| verdict | %s |\n\n", ok ? "PASS" : "FAIL");
		print_kinds("errors by kind, well-behaved clients (must be none)", &b->good);
		print_kinds("errors by kind, stalling client (must be none)", &b->stall);
		print_kinds("errors by kind, hostile client (what moed answered, expected; ECONNRESET: it hung up)",
			    &b->hostile);
		if (!ok) {
			printf("FAIL:");
			if (b->have_why)
				printf(" first failure: %s;", b->why);
			if (R.moed_died)
				printf(" moed died;");
			if (R.child_failures)
				printf(" %d client processes failed;", R.child_failures);
			if (cpu_bad)
				printf(" moed idled above %.1f%% of a core (%.1f%% with a stalled client, %.1f%% with "
				       "none);", R.o.max_idle_cpu, cpu_stalled, cpu_idle);
			if (fd_bad)
				printf(" moed holds %d descriptors after every session ended, %d before the run;",
				       fds_end, s0.fds);
			printf("\n");
		}
		printf("soak: %.0f s, %s\n", secs, ok ? "PASS" : "FAIL");
	}
	return ok ? 0 : 1;
}
