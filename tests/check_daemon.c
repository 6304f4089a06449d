/* SPDX-License-Identifier: MIT */
/*
 * moed end to end: a real daemon on a temporary socket, real clients in
 * other processes.
 *  - clients get the bits of the engine run in-process (memcmp, routing
 *    included), through moe_client_forward and through submit/wait;
 *  - a client killed at any point costs the others nothing, and moed gives
 *    back its descriptors and its segment;
 *  - a client that writes garbage (descriptors, ring indices, HELLOs) only
 *    hurts itself; absurd sizes in a HELLO are refused, not wrapped;
 *  - a session whose client hangs up is closed at once;
 *  - SIGTERM fails what waits, at once, and leaves no socket behind;
 *  - access.uids and limits.max_clients are enforced;
 *  - moectl forward through moed writes the files of forward --model.
 *
 * Each test makes its own model and its own moed (Check forks each test;
 * a moed left behind is killed with the test's process group, files are
 * removed with the run's directory).  Client processes report through
 * their exit status and a shared page, print what went wrong on stderr,
 * and leave with _exit(): an exit() would run the test's atexit handlers
 * (which kill moed and remove the model).  $MOED and $MOECTL name the
 * programs (default ../daemon/moed, ../client/moectl).
 */
#include "config.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemonutil.h"
#include "engine/dtype.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "engine/model.h"
#include "libmoeclient/moeclient.h"
#include "formats/pack.h"
#include "proto/proto.h"
#include "testutil.h"

#define READY_TIMEOUT_MS 60000   /* moed opens its store and listens (ASan is slow) */
#define STOP_TIMEOUT_MS 15000    /* moed exits after SIGTERM */
#define CLIENT_TIMEOUT_MS 60000  /* a client process finishes its work */
#define WAIT_MS 30000            /* one completion, when nothing is wrong */
#define MAX_CHILDREN 32

/* ------------------------------------------------------------------ time */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ send(2) */

/*
 * send(2) for this program and the libmoeclient it loads: a definition in
 * the executable comes first in the dynamic linker's search, so
 * libmoeclient's calls land here too.  With send_delay_us set (in a child
 * process only) each send waits that long first, as a client preempted at
 * that point would: a_uid_outside_access_uids_is_refused uses it to put
 * the HELLO after moed's refusal.
 */
static unsigned send_delay_us;

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
	if (send_delay_us)
		usleep(send_delay_us);
	return syscall(SYS_sendto, fd, buf, len, flags, NULL, 0);
}

/* ------------------------------------------------------------------ the model */

/*
 * deepseek_v3, bf16 weights, 4 layers (layer 0 dense, so there is a layer
 * number that is not an MoE layer), hidden 256, 32 experts in 4 groups,
 * top-4, one shared expert: a 10 MB store, made in a fraction of a second.
 */
static void model_make(struct moe_test_model *m, const char *tag)
{
	struct moe_gen_options opt;
	char why[512];
	int rc;

	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
	moe_test_gen_grouped(&opt);
	opt.hidden_size = 256;
	opt.moe_intermediate_size = 64;
	opt.num_experts = 32;
	opt.top_k = 4;
	opt.seed = 2024;
	opt.num_layers = 4;
	rc = moe_test_model_make(m, tag, &opt, NULL, why, sizeof(why));
	ck_assert_msg(rc == 0, "%s", why);
	ck_assert_msg(m->nl == 3 && m->layers[0] == 1, "expected MoE layers 1..3, got %u from %u", m->nl,
		      m->layers[0]);
}

static bool is_moe_layer(const struct moe_test_model *m, uint32_t layer)
{
	for (uint32_t i = 0; i < m->nl; i++)
		if (m->layers[i] == layer)
			return true;
	return false;
}

/* The reference: the engine in this process, on the CPU backend as moed's
 * config says.  Only after the last fork() of a process (threads). */
static int ref_open(const struct moe_test_model *m, struct moe_engine **ret, char *why, size_t len)
{
	struct moe_engine_options eo = { .backend = "cpu", .threads = 1 };
	struct moe_err err = { 0 };
	int rc = moe_engine_open(m->store, &eo, ret, &err);

	if (rc < 0)
		snprintf(why, len, "engine open: %d %s", rc, err.msg);
	return rc;
}

/* ------------------------------------------------------------------ children */

static pid_t owner;                       /* the test process */
static pid_t children[MAX_CHILDREN];
static int nchildren;
static pid_t moed_pid;                    /* the running moed, 0 when none */

/* Whatever happens to the test, no process of it survives it (Check also
 * kills the test's process group when the test ends). */
static void kill_everything(void)
{
	if (getpid() != owner)
		return;
	for (int i = 0; i < nchildren; i++)
		if (children[i] > 0) {
			kill(children[i], SIGKILL);
			waitpid(children[i], NULL, 0);
		}
	nchildren = 0;
	if (moed_pid > 0) {
		kill(moed_pid, SIGKILL);
		waitpid(moed_pid, NULL, 0);
		moed_pid = 0;
	}
}

static void track_init(void)
{
	if (owner != getpid()) {
		owner = getpid();
		nchildren = 0;
		moed_pid = 0;
		atexit(kill_everything);
	}
}

static void forget_child(pid_t pid)
{
	for (int i = 0; i < nchildren; i++)
		if (children[i] == pid)
			children[i] = 0;
}

/* Run @fn(@arg) in a child process; its return value is the exit status. */
static pid_t spawn(int (*fn)(void *), void *arg)
{
	pid_t parent = getpid(), pid;

	track_init();
	ck_assert_int_lt(nchildren, MAX_CHILDREN);
	fflush(NULL);
	pid = fork();
	ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(99);
		_exit(fn(arg));
	}
	children[nchildren++] = pid;
	return pid;
}

/* Wait for @pid at most @timeout_ms: its exit status, -1 if a signal ended
 * it, -2 on timeout (then it is killed). */
static int child_wait(pid_t pid, int timeout_ms, int *ret_sig)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;
	int st;

	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);

		if (r == pid)
			break;
		if (r < 0)
			return -3;
		if (moe_test_now_ms() > end) {
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			forget_child(pid);
			return -2;
		}
		moe_test_sleep_ms(5);
	}
	forget_child(pid);
	if (WIFSIGNALED(st)) {
		if (ret_sig)
			*ret_sig = WTERMSIG(st);
		return -1;
	}
	return WEXITSTATUS(st);
}

static void assert_child_ok(pid_t pid, const char *what)
{
	int sig = 0, st = child_wait(pid, CLIENT_TIMEOUT_MS, &sig);

	ck_assert_msg(st != -1, "%s (pid %d) was killed by signal %d (%s)", what, (int)pid, sig, strsignal(sig));
	ck_assert_msg(st != -2, "%s (pid %d) did not finish in %d ms", what, (int)pid, CLIENT_TIMEOUT_MS);
	ck_assert_msg(st == 0, "%s (pid %d) exited with status %d (its message is above)", what, (int)pid, st);
}

/* Shared between the test and its client processes. */
struct board {
	atomic_int stop;                 /* clients: finish the round and go idle */
	atomic_int release;              /* idle clients: disconnect and exit */
	atomic_int ready[MAX_CHILDREN];  /* connected */
	atomic_int idle[MAX_CHILDREN];   /* stopped working, still connected */
	atomic_ullong rounds[MAX_CHILDREN];
	atomic_int state[MAX_CHILDREN];  /* test-specific */
	atomic_llong t_err[MAX_CHILDREN];
	atomic_int err[MAX_CHILDREN];
};

static struct board *board_new(void)
{
	struct board *b = mmap(NULL, sizeof(*b), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	ck_assert_msg(b != MAP_FAILED, "mmap: %s", strerror(errno));
	memset(b, 0, sizeof(*b));
	return b;
}

/* ------------------------------------------------------------------ moed */

#define moed_assert(d, cond, ...)                            \
	do {                                                 \
		if (!(cond)) {                               \
			moe_test_moed_dump_log(d, 0);        \
			ck_abort_msg(__VA_ARGS__);           \
		}                                            \
	} while (0)

/* Write the config (@sock_extra inside socket = { }, @extra at the top
 * level) in @m's directory, nothing started. */
static void moed_config(struct moe_test_moed *d, const struct moe_test_model *m, const char *sock_extra, const char *extra)
{
	int rc = moe_test_moed_config(d, m->dir, "s.sock", m->store, sock_extra, extra);

	ck_assert_msg(rc == 0, "moed config in %s: %s", m->dir, strerror(-rc));
}

/* Start moed on the config and wait until its socket accepts. */
static void moed_start(struct moe_test_moed *d)
{
	int st = 0, rc;

	track_init();
	rc = moe_test_moed_start(d, READY_TIMEOUT_MS, &st);
	moed_pid = d->pid;
	moed_assert(d, rc != -ECHILD, "moed (%s --config %s) exited with %s %d before it listened on %s",
		    moe_test_moed_path(), d->conf, WIFEXITED(st) ? "status" : "signal",
		    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), d->sock);
	moed_assert(d, rc != -ETIMEDOUT, "moed did not listen on %s within %d ms", d->sock, READY_TIMEOUT_MS);
	ck_assert_msg(rc == 0, "fork: %s", strerror(-rc));
}

/* SIGTERM; moed must exit 0 within STOP_TIMEOUT_MS. */
static void moed_stop(struct moe_test_moed *d)
{
	int st = 0, rc;

	ck_assert_int_gt(d->pid, 0);
	rc = moe_test_moed_stop(d, STOP_TIMEOUT_MS, &st);
	moed_pid = 0;
	moed_assert(d, rc == 0, "moed did not exit within %d ms of SIGTERM", STOP_TIMEOUT_MS);
	moed_assert(d, WIFEXITED(st) && WEXITSTATUS(st) == 0, "moed ended with %s %d after SIGTERM, not exit 0",
		    WIFEXITED(st) ? "status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

/* ------------------------------------------------------------------ requests */

/* A request's tensors and the in-process answers. */
struct job {
	uint32_t layer, dtype;
	uint64_t T;
	bool routing, async;
	size_t bytes;                /* T * H * element size */
	void *in, *out;              /* malloc'ed, or in the arena */
	int32_t *ids;
	float *w;
	void *want;
	int32_t *want_ids;
	float *want_w;
};

static size_t elem_size(uint32_t dtype)
{
	return dtype == MOE_F32 ? 4 : 2;
}

static void fill_input(void *in, uint32_t dtype, size_t n, uint64_t *rng)
{
	for (size_t i = 0; i < n; i++) {
		float v = (float)(2.0 * moe_test_randf(rng));

		if (dtype == MOE_F32)
			((float *)in)[i] = v;
		else
			((uint16_t *)in)[i] = moe_f32_to_bf16(v);
	}
}

/* What moed must answer for @j: bf16 goes through float32 both ways, as
 * moed's gather and scatter do. */
static int ref_forward(struct moe_engine *e, const struct moe_test_model *m, struct job *j, char *why, size_t len)
{
	size_t n = j->T * m->H;
	float *x = calloc(n, sizeof(float)), *y = malloc(n * sizeof(float));   /* calloc: gcc 12 -Wmaybe-uninitialized */
	struct moe_err err = { 0 };
	int rc = -ENOMEM;

	j->want = malloc(j->bytes);
	j->want_ids = malloc(j->T * m->k * sizeof(int32_t));
	j->want_w = malloc(j->T * m->k * sizeof(float));
	if (!x || !y || !j->want || !j->want_ids || !j->want_w) {
		snprintf(why, len, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		x[i] = j->dtype == MOE_F32 ? ((const float *)j->in)[i] : moe_bf16_to_f32(((const uint16_t *)j->in)[i]);
	rc = moe_engine_forward(e, j->layer, x, j->T, y, j->want_ids, j->want_w, 0, &err);
	if (rc < 0) {
		snprintf(why, len, "in-process forward of layer %u, %" PRIu64 " tokens: %d %s", j->layer, j->T, rc,
			 err.msg);
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		if (j->dtype == MOE_F32)
			((float *)j->want)[i] = y[i];
		else
			((uint16_t *)j->want)[i] = moe_f32_to_bf16(y[i]);
out:
	free(x);
	free(y);
	return rc;
}

static void job_free(struct job *j)
{
	free(j->want);
	free(j->want_ids);
	free(j->want_w);
	j->want = NULL;
	j->want_ids = NULL;
	j->want_w = NULL;
}

static const char *job_name(const struct job *j, char *buf, size_t len)
{
	snprintf(buf, len, "layer %u, %" PRIu64 " tokens, %s%s, %s", j->layer, j->T,
		 j->dtype == MOE_F32 ? "f32" : "bf16", j->routing ? ", routing" : "",
		 j->async ? "submit/wait" : "moe_client_forward");
	return buf;
}

/* The daemon's output for @j must be the in-process one, bit for bit. */
static int job_check(const struct moe_test_model *m, const struct job *j, char *why, size_t len)
{
	char name[128];

	job_name(j, name, sizeof(name));
	if (memcmp(j->out, j->want, j->bytes)) {
		size_t es = elem_size(j->dtype), i = 0;

		while (!memcmp((const uint8_t *)j->out + i * es, (const uint8_t *)j->want + i * es, es))
			i++;
		if (j->dtype == MOE_F32)
			snprintf(why, len, "%s: output[%zu][%zu] = %.9g (0x%08x) but in-process %.9g (0x%08x)", name,
				 i / m->H, i % m->H, (double)((const float *)j->out)[i],
				 ((const uint32_t *)j->out)[i], (double)((const float *)j->want)[i],
				 ((const uint32_t *)j->want)[i]);
		else
			snprintf(why, len, "%s: output[%zu][%zu] = bf16 0x%04x but in-process 0x%04x", name, i / m->H,
				 i % m->H, ((const uint16_t *)j->out)[i], ((const uint16_t *)j->want)[i]);
		return -1;
	}
	if (!j->routing)
		return 0;
	for (size_t i = 0; i < j->T * m->k; i++) {
		if (j->ids[i] != j->want_ids[i]) {
			snprintf(why, len, "%s: routing ids[%zu][%zu] = %d but in-process %d", name, i / m->k,
				 i % m->k, j->ids[i], j->want_ids[i]);
			return -1;
		}
		if (memcmp(&j->w[i], &j->want_w[i], sizeof(float))) {
			snprintf(why, len, "%s: routing weights[%zu][%zu] = %.9g but in-process %.9g", name, i / m->k,
				 i % m->k, (double)j->w[i], (double)j->want_w[i]);
			return -1;
		}
	}
	return 0;
}

static uint32_t rand_below(uint64_t *rng, uint64_t n)
{
	return (uint32_t)(moe_test_rand(rng) % n);
}

static void job_pick(struct job *j, const struct moe_test_model *m, uint64_t *rng, uint32_t max_tokens, bool async)
{
	memset(j, 0, sizeof(*j));
	j->layer = m->layers[rand_below(rng, m->nl)];
	j->dtype = rand_below(rng, 2) ? MOE_BF16 : MOE_F32;
	j->T = 1 + rand_below(rng, max_tokens);
	j->routing = rand_below(rng, 2);
	j->async = async;
	j->bytes = j->T * m->H * elem_size(j->dtype);
}

/*
 * One round of @n requests of 1..@max_tokens tokens on random layers and
 * dtypes, some with routing out: with @async, all in the arena, submitted
 * together and reaped in any order; else one moe_client_forward() each.
 * 0, or -1 with @why.
 */
static int client_round(struct moe_client *c, struct moe_engine *e, const struct moe_test_model *m, uint64_t *rng, int n,
			bool async, uint32_t max_tokens, char *why, size_t len)
{
	struct job jobs[16];
	bool seen[16] = { false };
	char name[128];
	int rc = -1, i;

	if (n > 16) {
		snprintf(why, len, "a round of %d requests: at most 16", n);
		return -1;
	}
	memset(jobs, 0, sizeof(jobs));
	for (i = 0; i < n; i++) {
		struct job *j = &jobs[i];
		size_t rb;

		job_pick(j, m, rng, max_tokens, async);
		rb = j->T * m->k * 4;
		if (async) {
			int r = moe_client_alloc(c, j->bytes, &j->in);

			if (r == 0)
				r = moe_client_alloc(c, j->bytes, &j->out);
			if (r == 0 && j->routing)
				r = moe_client_alloc(c, rb, (void **)&j->ids);
			if (r == 0 && j->routing)
				r = moe_client_alloc(c, rb, (void **)&j->w);
			if (r < 0) {
				snprintf(why, len, "moe_client_alloc: %s", moe_strerror(r));
				goto out;
			}
		} else {
			j->in = malloc(j->bytes);
			j->out = malloc(j->bytes);
			j->ids = j->routing ? malloc(rb) : NULL;
			j->w = j->routing ? malloc(rb) : NULL;
			if (!j->in || !j->out || (j->routing && (!j->ids || !j->w))) {
				snprintf(why, len, "out of memory");
				goto out;
			}
		}
		fill_input(j->in, j->dtype, j->T * m->H, rng);
		memset(j->out, 0xa5, j->bytes);          /* stale bits must not pass */
		if (j->routing) {
			memset(j->ids, 0xa5, rb);
			memset(j->w, 0xa5, rb);
		}
		if (ref_forward(e, m, j, why, len) < 0)
			goto out;
	}
	if (async) {
		for (i = 0; i < n; i++) {
			struct job *j = &jobs[i];
			struct moe_request q = { .layer = j->layer, .dtype = j->dtype, .tokens = j->T, .input = j->in,
						 .output = j->out, .ids = j->ids, .weights = j->w,
						 .user_data = 1000 + (uint64_t)i };
			int r = moe_client_submit(c, &q);

			if (r < 0) {
				snprintf(why, len, "%s: moe_client_submit: %s", job_name(j, name, sizeof(name)),
					 moe_strerror(r));
				goto out;
			}
		}
		for (i = 0; i < n; i++) {
			struct moe_completion cq;
			int r = moe_client_wait(c, &cq, WAIT_MS), x;

			if (r < 0) {
				snprintf(why, len, "moe_client_wait for the %d-th of %d completions: %s", i + 1, n,
					 moe_strerror(r));
				goto out;
			}
			x = (int)(cq.user_data - 1000);
			if (cq.user_data < 1000 || x >= n || seen[x]) {
				snprintf(why, len, "a completion with user_data %" PRIu64 " that is not due", cq.user_data);
				goto out;
			}
			seen[x] = true;
			if (cq.res != 0) {
				snprintf(why, len, "%s: the request failed: %s", job_name(&jobs[x], name, sizeof(name)),
					 moe_strerror(cq.res));
				goto out;
			}
			if (job_check(m, &jobs[x], why, len) < 0)
				goto out;
		}
	} else {
		for (i = 0; i < n; i++) {
			struct job *j = &jobs[i];
			int r = moe_client_forward(c, j->layer, j->dtype, j->in, j->out, j->T, j->ids, j->w);

			if (r < 0) {
				snprintf(why, len, "%s: %s", job_name(j, name, sizeof(name)), moe_strerror(r));
				goto out;
			}
			if (job_check(m, j, why, len) < 0)
				goto out;
		}
	}
	rc = 0;
out:
	for (i = 0; i < n; i++) {
		struct job *j = &jobs[i];

		if (async) {
			moe_client_free(c, j->in);
			moe_client_free(c, j->out);
			moe_client_free(c, j->ids);
			moe_client_free(c, j->w);
		} else {
			free(j->in);
			free(j->out);
			free(j->ids);
			free(j->w);
		}
		job_free(j);
	}
	return rc;
}

/* A client process's session: engine, connection, the model it reports. */
struct session {
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_model_info info;
};

static int session_open(struct session *s, const struct moe_test_model *m, const char *sock, char *why, size_t len)
{
	int r;

	memset(s, 0, sizeof(*s));
	if (ref_open(m, &s->e, why, len) < 0)
		return -1;
	r = moe_client_connect(sock, NULL, &s->c);
	if (r < 0) {
		snprintf(why, len, "moe_client_connect(%s): %s", sock, moe_strerror(r));
		return -1;
	}
	moe_client_info(s->c, &s->info);
	if (s->info.hidden_size != m->H || s->info.top_k != m->k || s->info.num_experts != m->E ||
	    s->info.num_moe_layers != m->nl || memcmp(s->info.moe_layers, m->layers, m->nl * sizeof(uint32_t))) {
		snprintf(why, len, "moe_client_info: hidden %u, top-%u, %u experts, %u MoE layers; the store has "
			 "%u, %u, %u, %u", s->info.hidden_size, s->info.top_k, s->info.num_experts,
			 s->info.num_moe_layers, m->H, m->k, m->E, m->nl);
		return -1;
	}
	return 0;
}

static void session_close(struct session *s)
{
	moe_client_disconnect(s->c);
	moe_engine_close(s->e);
}

/* What a client process gets. */
struct client_arg {
	const struct moe_test_model *m;
	const char *sock;
	struct board *b;
	int id;
	int nreq;                    /* requests (test 1) */
	uint32_t max_tokens;
};

static int client_fail(const struct client_arg *a, const char *why)
{
	fprintf(stderr, "client %d (pid %d): %s\n", a->id, (int)getpid(), why);
	return 1;
}

/* ------------------------------------------------------------------ 1: bits */

/* Requests in rounds, alternating moe_client_forward and batches of 2..6
 * in flight through submit/wait. */
static int bits_client(void *p)
{
	const struct client_arg *a = p;
	uint64_t rng = 0xb175ull * (uint64_t)(a->id + 1);
	struct session s;
	char why[512];
	int done = 0, r;

	if (session_open(&s, a->m, a->sock, why, sizeof(why)) < 0)
		return client_fail(a, why);
	while (done < a->nreq) {
		bool async = rand_below(&rng, 3) != 0;
		int n = async ? 2 + (int)rand_below(&rng, 5) : 1;

		if (n > a->nreq - done)
			n = a->nreq - done;
		r = client_round(s.c, s.e, a->m, &rng, n, async, a->max_tokens, why, sizeof(why));
		if (r < 0) {
			client_fail(a, why);
			session_close(&s);
			return 1;
		}
		done += n;
	}
	session_close(&s);
	return 0;
}

START_TEST(eight_clients_get_the_bits_of_forward_in_process)
{
	struct client_arg args[8];
	pid_t pids[8];
	struct moe_test_model m;
	struct moe_test_moed d;
	char what[64];

	model_make(&m, "daemon-bits");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	for (int i = 0; i < 8; i++) {
		args[i] = (struct client_arg){ .m = &m, .sock = d.sock, .id = i, .nreq = 50, .max_tokens = 64 };
		pids[i] = spawn(bits_client, &args[i]);
	}
	for (int i = 0; i < 8; i++) {
		snprintf(what, sizeof(what), "client %d", i);
		if (child_wait(pids[i], CLIENT_TIMEOUT_MS, NULL) != 0) {
			moe_test_moed_dump_log(&d, 0);
			ck_abort_msg("%s (pid %d) failed: its message is above", what, (int)pids[i]);
		}
	}
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ 2: killed clients */

/*
 * Open a session, say so, and run rounds (random sizes, synchronous or up
 * to @nasync requests at once, checked bit for bit) until told to stop.
 * 0 with the session still open, or 1 after a failure was reported.
 */
static int rounds_until_stop(const struct client_arg *a, struct session *s, uint64_t seed, uint32_t nasync)
{
	uint64_t rng = seed * (uint64_t)(a->id + 1);
	char why[512];

	if (session_open(s, a->m, a->sock, why, sizeof(why)) < 0)
		return client_fail(a, why);
	atomic_store(&a->b->ready[a->id], 1);
	while (!atomic_load(&a->b->stop)) {
		bool async = rand_below(&rng, 2);

		if (client_round(s->c, s->e, a->m, &rng, async ? nasync : 1, async, a->max_tokens, why,
				 sizeof(why)) < 0) {
			client_fail(a, why);
			session_close(s);
			return 1;
		}
		atomic_fetch_add(&a->b->rounds[a->id], 1);
	}
	return 0;
}

/* Rounds until told to stop, then idle (still connected) until released. */
static int steady_client(void *p)
{
	const struct client_arg *a = p;
	struct session s;

	if (rounds_until_stop(a, &s, 0x57eadull, 4))
		return 1;
	atomic_store(&a->b->idle[a->id], 1);
	while (!atomic_load(&a->b->release))
		moe_test_sleep_ms(5);
	session_close(&s);
	return 0;
}

enum { VICTIM_CONNECTED = 1, VICTIM_SUBMITTED = 2, VICTIM_WAITING = 3 };

/* Connects, maybe submits, then dies from SIGKILL (its own or the test's). */
static int victim_client(void *p)
{
	const struct client_arg *a = p;
	struct moe_client *c;
	uint64_t rng = 0xdeadull + (uint64_t)a->id;
	uint64_t H = a->m->H, T = 2048;
	int r = moe_client_connect(a->sock, NULL, &c);

	if (r < 0) {
		char why[128];

		snprintf(why, sizeof(why), "moe_client_connect: %s", moe_strerror(r));
		return client_fail(a, why);
	}
	if (a->nreq == VICTIM_CONNECTED) {
		atomic_store(&a->b->state[a->id], VICTIM_CONNECTED);
		for (;;)
			pause();
	}
	/* four big requests */
	for (int i = 0; i < 4; i++) {
		void *in, *out;
		int32_t *ids;
		float *w;
		struct moe_request q = { .layer = a->m->layers[i % a->m->nl], .dtype = MOE_F32, .tokens = T,
					 .user_data = (uint64_t)i };

		if (moe_client_alloc(c, T * H * 4, &in) < 0 || moe_client_alloc(c, T * H * 4, &out) < 0 ||
		    moe_client_alloc(c, T * a->m->k * 4, (void **)&ids) < 0 ||
		    moe_client_alloc(c, T * a->m->k * 4, (void **)&w) < 0)
			return client_fail(a, "moe_client_alloc failed");
		fill_input(in, MOE_F32, T * H, &rng);
		q.input = in;
		q.output = out;
		q.ids = ids;
		q.weights = w;
		r = moe_client_submit(c, &q);
		if (r < 0) {
			char why[128];

			snprintf(why, sizeof(why), "moe_client_submit: %s", moe_strerror(r));
			return client_fail(a, why);
		}
	}
	if (a->nreq == VICTIM_SUBMITTED)
		kill(getpid(), SIGKILL);
	atomic_store(&a->b->state[a->id], VICTIM_WAITING);
	for (;;) {
		struct moe_completion cq;

		moe_client_wait(c, &cq, -1);
	}
}

START_TEST(a_killed_client_costs_the_others_nothing)
{
	static const char *const how[] = { "", "just connected", "right after submitting", "while it waits" };
	enum { NSTEADY = 3 };
	struct client_arg args[NSTEADY + 3];
	struct board *b = board_new();
	pid_t steady[NSTEADY];
	uint64_t before[NSTEADY];
	int fds0 = -1, segs0 = -1, fds = -1, segs = -1;
	char list0[4096] = "", list[4096] = "";
	struct moe_test_model m;
	struct moe_test_moed d;

	model_make(&m, "daemon-kill");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 32; };");
	moed_start(&d);
	for (int i = 0; i < NSTEADY; i++) {
		args[i] = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = i, .max_tokens = 48 };
		steady[i] = spawn(steady_client, &args[i]);
	}
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS;;) {
		int n = 0;

		for (int i = 0; i < NSTEADY; i++)
			n += atomic_load(&b->ready[i]) && atomic_load(&b->rounds[i]) > 0;
		if (n == NSTEADY)
			break;
		for (int i = 0; i < NSTEADY; i++)
			ck_assert_msg(waitpid(steady[i], NULL, WNOHANG) == 0, "steady client %d ended early (above)", i);
		moed_assert(&d, moe_test_now_ms() < end, "the steady clients did not start working");
		moe_test_sleep_ms(5);
	}
	/* the baseline: the steady sessions only (the probe of moed_start gone) */
	for (uint64_t end = moe_test_now_ms() + 2000;;) {
		int f1 = moe_test_count_fds(d.pid, NULL, 0), s1 = moe_test_count_segments(d.pid);

		moe_test_sleep_ms(50);
		fds0 = moe_test_count_fds(d.pid, list0, sizeof(list0));
		segs0 = moe_test_count_segments(d.pid);
		if ((f1 == fds0 && s1 == segs0) || moe_test_now_ms() > end)
			break;
	}
	for (int i = 0; i < NSTEADY; i++)
		moed_assert(&d, waitpid(steady[i], NULL, WNOHANG) == 0, "steady client %d failed (its message is above)", i);
	ck_assert_msg(fds0 > 0 && segs0 == NSTEADY, "baseline: %d descriptors, %d segment mappings (want %d)", fds0,
		      segs0, NSTEADY);

	for (int v = VICTIM_CONNECTED; v <= VICTIM_WAITING; v++) {
		struct client_arg *a = &args[NSTEADY + v - 1];
		uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS;
		pid_t pid;
		int sig = 0, st;

		*a = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = NSTEADY + v - 1, .nreq = v };
		pid = spawn(victim_client, a);
		if (v != VICTIM_SUBMITTED) {
			while (atomic_load(&b->state[a->id]) != v) {
				ck_assert_msg(waitpid(pid, NULL, WNOHANG) == 0, "victim (%s) ended early (above)", how[v]);
				ck_assert_msg(moe_test_now_ms() < end, "victim (%s) did not get there", how[v]);
				moe_test_sleep_ms(1);
			}
			if (v == VICTIM_WAITING)
				moe_test_sleep_ms(30);
			kill(pid, SIGKILL);
		}
		st = child_wait(pid, CLIENT_TIMEOUT_MS, &sig);
		ck_assert_msg(st == -1 && sig == SIGKILL, "victim (%s): expected death by SIGKILL, got %d (signal %d)",
			      how[v], st, sig);
	}
	/* the others keep being served, correctly */
	for (int i = 0; i < NSTEADY; i++)
		before[i] = atomic_load(&b->rounds[i]);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS;;) {
		int n = 0;

		for (int i = 0; i < NSTEADY; i++) {
			n += atomic_load(&b->rounds[i]) >= before[i] + 3;
			moed_assert(&d, waitpid(steady[i], NULL, WNOHANG) == 0,
				    "steady client %d failed after the kills (its message is above)", i);
		}
		if (n == NSTEADY)
			break;
		moed_assert(&d, moe_test_now_ms() < end, "the steady clients stalled after the kills");
		moe_test_sleep_ms(5);
	}
	atomic_store(&b->stop, 1);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS;;) {
		int n = 0;

		for (int i = 0; i < NSTEADY; i++) {
			n += atomic_load(&b->idle[i]);
			moed_assert(&d, waitpid(steady[i], NULL, WNOHANG) == 0, "steady client %d failed (above)", i);
		}
		if (n == NSTEADY)
			break;
		ck_assert_msg(moe_test_now_ms() < end, "the steady clients did not go idle");
		moe_test_sleep_ms(5);
	}
	/* moed frees sessions asynchronously: up to 2 s to get back to the baseline */
	for (uint64_t end = moe_test_now_ms() + 2000;;) {
		fds = moe_test_count_fds(d.pid, NULL, 0);
		segs = moe_test_count_segments(d.pid);
		if ((fds == fds0 && segs == segs0) || moe_test_now_ms() > end)
			break;
		moe_test_sleep_ms(10);
	}
	if (fds != fds0 || segs != segs0) {
		fds = moe_test_count_fds(d.pid, list, sizeof(list));
		moe_test_moed_dump_log(&d, 0);
		ck_abort_msg("with only %d idle sessions left, moed holds %d descriptors and %d segment mappings; "
			     "before the killed clients came: %d and %d\n  now:   %s\n  before:%s", NSTEADY, fds, segs,
			     fds0, segs0, list, list0);
	}
	atomic_store(&b->release, 1);
	for (int i = 0; i < NSTEADY; i++)
		assert_child_ok(steady[i], "steady client");
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	munmap(b, sizeof(*b));
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ raw sessions (proto.h) */

/* Does the peer close @fd (EOF, reset, hang-up) within @timeout_ms?  What
 * it sends before is read and dropped. */
static bool peer_closes(int fd, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;

	for (;;) {
		struct pollfd pf = { fd, POLLIN | POLLRDHUP, 0 };
		int64_t left = (int64_t)(end - moe_test_now_ms());
		char buf[4096];
		ssize_t n;

		if (poll(&pf, 1, left > 0 ? (int)left : 0) <= 0)
			return false;
		n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return true;
		if (n < 0 && (pf.revents & (POLLHUP | POLLERR)))
			return true;
	}
}

/* ------------------------------------------------------------------ 3: a hostile client */

/* Rounds until told to stop; exits 1 at the first wrong bit. */
static int normal_client(void *p)
{
	const struct client_arg *a = p;
	struct session s;

	if (rounds_until_stop(a, &s, 0x6009ull, 3))
		return 1;
	session_close(&s);
	return 0;
}

/* The contract of a descriptor (proto.h, moe_client_submit()): would a
 * daemon that follows it accept @q? */
static bool sqe_acceptable(const struct moe_test_model *m, const struct moe_test_raw *r, const struct moe_sqe *q, uint32_t max_tokens)
{
	uint64_t es, bytes, rbytes;

	if (q->opcode == MOE_OP_NOP)
		return true;
	if (q->opcode != MOE_OP_FORWARD || (q->flags & ~MOE_SQE_ROUTING) || !is_moe_layer(m, q->layer) ||
	    (q->dtype != MOE_ACT_F32 && q->dtype != MOE_ACT_BF16) || q->tokens == 0 || q->tokens > max_tokens)
		return false;
	es = q->dtype == MOE_ACT_F32 ? 4 : 2;
	bytes = q->tokens * m->H * es;
	if (q->in_off % es || q->in_off > r->arena_bytes || bytes > r->arena_bytes - q->in_off)
		return false;
	if (q->out_off % es || q->out_off > r->arena_bytes || bytes > r->arena_bytes - q->out_off)
		return false;
	if (!(q->flags & MOE_SQE_ROUTING))
		return true;
	rbytes = q->tokens * m->k * 4;
	return !(q->ids_off % 4 || q->ids_off > r->arena_bytes || rbytes > r->arena_bytes - q->ids_off ||
		 q->weights_off % 4 || q->weights_off > r->arena_bytes || rbytes > r->arena_bytes - q->weights_off);
}

static void sqe_describe(const struct moe_sqe *q, char *buf, size_t len)
{
	snprintf(buf, len, "{opcode %u, flags 0x%x, layer %u, dtype %u, tokens %" PRIu64 ", in_off %" PRIu64
		 ", out_off %" PRIu64 ", ids_off %" PRIu64 ", weights_off %" PRIu64 "}", q->opcode, q->flags, q->layer,
		 q->dtype, q->tokens, q->in_off, q->out_off, q->ids_off, q->weights_off);
}

static uint64_t pick_u64(uint64_t *rng, const uint64_t *v, size_t n)
{
	return v[rand_below(rng, n)];
}

/* A valid descriptor @good spoiled in 1..3 ways (or, one time in four,
 * random bits), that the contract refuses. */
static void sqe_hostile(uint64_t *rng, const struct moe_test_model *m, const struct moe_test_raw *r, const struct moe_sqe *good,
			uint32_t max_tokens, struct moe_sqe *q)
{
	const uint64_t A = r->arena_bytes;

	do {
		*q = *good;
		if (rand_below(rng, 4) == 0) {
			uint64_t *w = (uint64_t *)q;

			for (size_t i = 0; i < sizeof(*q) / 8; i++)
				w[i] = moe_test_rand(rng);
			if (rand_below(rng, 2)) {    /* plausible header, random sizes and offsets */
				q->opcode = MOE_OP_FORWARD;
				q->flags &= MOE_SQE_ROUTING;
				q->layer = m->layers[rand_below(rng, m->nl)];
				q->dtype &= 1;
			}
		} else {
			for (uint32_t n = 1 + rand_below(rng, 3); n; n--) {
				uint64_t es = q->dtype == MOE_ACT_F32 ? 4 : 2;
				uint64_t bytes = q->tokens * m->H * es;

				switch (rand_below(rng, 12)) {
				case 0:
					q->opcode = 2 + rand_below(rng, 1000) + (rand_below(rng, 2) ? UINT32_MAX - 1002 : 0);
					break;
				case 1:
					q->flags |= 2u << rand_below(rng, 31);
					break;
				case 2: {
					const uint64_t v[] = { 0, 4, 99, UINT32_MAX, moe_test_rand(rng) | 0x10000 };

					q->layer = (uint32_t)pick_u64(rng, v, 5);
					break;
				}
				case 3:
					q->dtype = rand_below(rng, 2) ? 2 + rand_below(rng, 10) : UINT32_MAX;
					break;
				case 4:
					q->tokens = 0;
					break;
				case 5: {
					const uint64_t v[] = { (uint64_t)max_tokens + 1, UINT64_MAX, 1ull << 40,
							       (1ull << 32) | 1, (uint64_t)max_tokens + 1 + rand_below(rng, 1 << 20) };

					q->tokens = pick_u64(rng, v, 5);
					break;
				}
				case 6: {   /* input past or across the arena's end, or wrapping around */
					const uint64_t v[] = { A, A + 4 * (1 + rand_below(rng, 4096)), A - 4 * (uint64_t)m->H / 2,
							       UINT64_MAX - 3, (1ull << 63), UINT64_MAX - bytes + 8 };

					q->in_off = pick_u64(rng, v, 6) & ~3ull;
					break;
				}
				case 7: {
					const uint64_t v[] = { A, A + 4096, A - 64, UINT64_MAX & ~3ull, UINT64_MAX - bytes + 8 };

					q->out_off = pick_u64(rng, v, 5) & ~3ull;
					break;
				}
				case 8:   /* misaligned */
					if (rand_below(rng, 2))
						q->in_off += 1 + (es == 4 ? rand_below(rng, 3) : 0);
					else
						q->out_off += 1 + (es == 4 ? rand_below(rng, 3) : 0);
					break;
				case 9: {
					const uint64_t v[] = { A, A - 4, q->ids_off + 1, UINT64_MAX - 3, A + 1000000 };

					q->flags |= MOE_SQE_ROUTING;
					q->ids_off = pick_u64(rng, v, 5);
					break;
				}
				case 10: {
					const uint64_t v[] = { A, A - 8, q->weights_off + 2, UINT64_MAX - 7,
							       (uint64_t)INT64_MAX + 1 };

					q->flags |= MOE_SQE_ROUTING;
					q->weights_off = pick_u64(rng, v, 5);
					break;
				}
				default:  /* as many tokens as allowed, the input one element past the end */
					q->dtype = MOE_ACT_F32;
					q->tokens = A / (m->H * 4) < max_tokens ? A / (m->H * 4) : max_tokens;
					q->in_off = A - q->tokens * m->H * 4 + 4;
					break;
				}
			}
		}
	} while (q->opcode == MOE_OP_NOP || sqe_acceptable(m, r, q, max_tokens));
}

START_TEST(a_hostile_client_hurts_only_itself)
{
	enum { BATCHES = 12, PER_BATCH = 40, T = 8 };
	struct board *b = board_new();
	struct client_arg na;
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_test_raw r, r2;
	struct moe_test_model m;
	struct moe_test_moed d;
	struct job j;
	struct moe_sqe good, batch[PER_BATCH + 1];
	struct moe_cqe cqes[PER_BATCH + 1];
	uint64_t rng = 0x4057113ull, rounds0;
	uint32_t max_tokens = 8192, H;
	char why[512], desc[256];
	pid_t normal;
	int silent, fd, rc;

	model_make(&m, "daemon-hostile");
	H = m.H;
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	na = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = 0, .max_tokens = 32 };
	normal = spawn(normal_client, &na);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS; !atomic_load(&b->rounds[0]);) {
		moed_assert(&d, waitpid(normal, NULL, WNOHANG) == 0, "the normal client failed (above)");
		ck_assert_msg(moe_test_now_ms() < end, "the normal client did not start");
		moe_test_sleep_ms(5);
	}
	ck_assert_int_eq(ref_open(&m, &e, why, sizeof(why)), 0);   /* no fork() after this */

	/* ---- (a) descriptors that break every rule, with a good one in each batch */
	struct moe_msg_hello h4 = { .version = MOE_PROTO_VERSION, .arena_bytes = 4u << 20, .sq_entries = 64 };

	rc = moe_test_raw_open(&r, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	max_tokens = r.w.max_tokens;
	ck_assert_uint_ge(r.arena_bytes, 4u << 20);
	memset(&j, 0, sizeof(j));
	j = (struct job){ .layer = m.layers[1], .dtype = MOE_F32, .T = T, .routing = true, .async = true,
			  .bytes = (size_t)T * H * 4 };
	good = (struct moe_sqe){ .opcode = MOE_OP_FORWARD, .flags = MOE_SQE_ROUTING, .layer = j.layer,
				 .dtype = MOE_ACT_F32, .tokens = T, .in_off = 0, .out_off = j.bytes,
				 .ids_off = 2 * j.bytes, .weights_off = 2 * j.bytes + T * m.k * 4 };
	j.in = r.arena + good.in_off;
	j.out = r.arena + good.out_off;
	j.ids = (int32_t *)(r.arena + good.ids_off);
	j.w = (float *)(r.arena + good.weights_off);
	for (int bi = 0; bi < BATCHES; bi++) {
		bool seen[PER_BATCH + 1] = { false };
		uint32_t got, good_at = rand_below(&rng, PER_BATCH + 1);

		fill_input(j.in, MOE_F32, (size_t)T * H, &rng);
		memset(j.out, 0xa5, j.bytes);
		memset(j.ids, 0xa5, T * m.k * 4);
		memset(j.w, 0xa5, T * m.k * 4);
		ck_assert_int_eq(ref_forward(e, &m, &j, why, sizeof(why)), 0);
		for (uint32_t i = 0; i <= PER_BATCH; i++) {
			if (i == good_at)
				batch[i] = good;
			else
				sqe_hostile(&rng, &m, &r, &good, max_tokens, &batch[i]);
			batch[i].user_data = 0x1000u * (uint64_t)(bi + 1) + i;
		}
		moe_test_raw_push(&r, batch, PER_BATCH + 1);
		got = moe_test_raw_reap(&r, cqes, PER_BATCH + 1, WAIT_MS);
		moed_assert(&d, got == PER_BATCH + 1, "batch %d: %u of %d completions came (a request was dropped)",
			    bi, got, PER_BATCH + 1);
		for (uint32_t i = 0; i < got; i++) {
			uint64_t x = cqes[i].user_data - 0x1000u * (uint64_t)(bi + 1);

			ck_assert_msg(x <= PER_BATCH && !seen[x], "batch %d: a completion for user_data 0x%" PRIx64
				      " that is not due", bi, cqes[i].user_data);
			seen[x] = true;
			sqe_describe(&batch[x], desc, sizeof(desc));
			if (x == good_at) {
				ck_assert_msg(cqes[i].res == 0, "batch %d: the good descriptor %s among hostile ones "
					      "failed: %s", bi, desc, moe_strerror(cqes[i].res));
			} else {
				ck_assert_msg(cqes[i].res < 0, "batch %d: hostile descriptor %s was accepted (res %d)",
					      bi, desc, cqes[i].res);
			}
		}
		ck_assert_msg(job_check(&m, &j, why, sizeof(why)) == 0, "batch %d: the good descriptor: %s", bi, why);
		job_free(&j);
		ck_assert_msg(__atomic_load_n(&r.hdr->daemon_state, __ATOMIC_ACQUIRE) == MOE_SEG_SERVING &&
			      !peer_closes(r.fd, 0), "batch %d: moed ended the session of bad descriptors", bi);
	}

	/* ---- (b) a submission tail 10000 ahead: moed ends that session, quickly */
	rc = moe_test_raw_open(&r2, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	__atomic_store_n(&r2.hdr->sq_tail, __atomic_load_n(&r2.hdr->sq_head, __ATOMIC_ACQUIRE) + 10000,
			 __ATOMIC_RELEASE);
	moe_test_raw_kick(&r2);
	moed_assert(&d, peer_closes(r2.fd, 1000), "a client with sq_tail = sq_head + 10000 is still connected "
		    "after 1 s");
	ck_assert_uint_eq(__atomic_load_n(&r2.hdr->daemon_state, __ATOMIC_ACQUIRE), MOE_SEG_CLOSED);
	moe_test_raw_close(&r2);

	/* ---- (c) a completion head beyond the tail, then a NOP to make moed look */
	rc = moe_test_raw_open(&r2, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	__atomic_store_n(&r2.hdr->cq_head, __atomic_load_n(&r2.hdr->cq_tail, __ATOMIC_ACQUIRE) + 5000,
			 __ATOMIC_RELEASE);
	{
		struct moe_sqe nop = { .opcode = MOE_OP_NOP, .user_data = 7 };

		moe_test_raw_push(&r2, &nop, 1);
	}
	moed_assert(&d, peer_closes(r2.fd, 1000), "a client with cq_head = cq_tail + 5000 is still connected "
		    "after 1 s");
	moe_test_raw_close(&r2);
	moed_assert(&d, moe_test_moed_log_has(&d, "corrupt"), "moed's log does not say why it dropped the corrupt sessions");

	/* ---- (d) the handshake */
	/* a client that connects and says nothing (moed drops it after its HELLO timeout) */
	silent = moe_test_dial(d.sock);
	ck_assert_int_ge(silent, 0);
	/* random bytes: dropped, no answer */
	fd = moe_test_dial(d.sock);
	ck_assert_int_ge(fd, 0);
	{
		uint8_t junk[80];

		for (size_t i = 0; i < sizeof(junk); i++)
			junk[i] = (uint8_t)moe_test_rand(&rng);
		ck_assert_int_eq(moe_test_send_all(fd, junk, sizeof(junk)), 0);
		moed_assert(&d, peer_closes(fd, 1000), "random bytes as a HELLO: moed kept the connection");
		close(fd);
	}
	/* a HELLO of another protocol version: WELCOME with -MOE_E_PROTO, then closed */
	for (int v = 0; v < 3; v++) {
		const uint32_t versions[] = { 0, MOE_PROTO_VERSION + 1, UINT32_MAX };
		struct moe_msg_hello h = { .version = versions[v] };
		struct moe_msg_welcome w;
		int segfd = -1;

		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		rc = moe_test_hello_exchange(fd, &h, &w, &segfd);
		moed_assert(&d, rc == 0 && w.status == -MOE_E_PROTO && segfd < 0, "HELLO version %u: got %d, status %d "
			    "(%s), fd %d; want a WELCOME with -MOE_E_PROTO and no fd", h.version, rc, rc ? 0 : w.status,
			    rc ? "" : w.message, segfd);
		ck_assert_msg(peer_closes(fd, 1000), "HELLO version %u: still connected after the refusal", h.version);
		close(fd);
	}
	/* sizes the daemon must refuse with a status, not a crash (the
	 * arithmetic edges: hello_sizes_that_overflow_are_refused) */
	{
		const struct moe_msg_hello bad[] = {
			{ .version = MOE_PROTO_VERSION, .sq_entries = 3 },
			{ .version = MOE_PROTO_VERSION, .sq_entries = 1u << 31 },
			{ .version = MOE_PROTO_VERSION, .arena_bytes = 1ull << 40 },
		};

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			struct moe_msg_welcome w;
			int segfd = -1;

			fd = moe_test_dial(d.sock);
			ck_assert_int_ge(fd, 0);
			rc = moe_test_hello_exchange(fd, &bad[i], &w, &segfd);
			moed_assert(&d, rc == 0 && w.status < 0 && segfd < 0, "HELLO sq_entries %u arena_bytes %" PRIu64
				    ": got %d, status %d; want a refusal", bad[i].sq_entries, bad[i].arena_bytes, rc,
				    rc ? 0 : w.status);
			close(fd);
		}
	}
	/* a header that promises more than a HELLO, an unknown type, a truncated HELLO */
	{
		struct moe_msg_header hh[] = {
			{ MOE_MSG_MAGIC, MOE_MSG_HELLO, 1u << 30, 0 },
			{ MOE_MSG_MAGIC, 77, 0, 0 },
			{ MOE_MSG_MAGIC, MOE_MSG_WELCOME, sizeof(struct moe_msg_welcome), 0 },
			{ MOE_MSG_MAGIC, MOE_MSG_HELLO, 4, 0 },
		};

		for (size_t i = 0; i < sizeof(hh) / sizeof(hh[0]); i++) {
			uint8_t pad[8] = { 1, 0, 0, 0 };

			fd = moe_test_dial(d.sock);
			ck_assert_int_ge(fd, 0);
			ck_assert_int_eq(moe_test_send_all(fd, &hh[i], sizeof(hh[i])), 0);
			if (hh[i].len == 4)
				ck_assert_int_eq(moe_test_send_all(fd, pad, 4), 0);
			moed_assert(&d, peer_closes(fd, 1000), "header {type %u, len %u}: moed kept the connection",
				    hh[i].type, hh[i].len);
			close(fd);
		}
		/* truncated: half a HELLO, then close */
		struct {
			struct moe_msg_header h;
			struct moe_msg_hello b;
		} msg = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
			  { .version = MOE_PROTO_VERSION } };

		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(moe_test_send_all(fd, &msg, sizeof(msg.h) + 10), 0);
		close(fd);
		/* a good HELLO, one byte at a time, is a good HELLO */
		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		for (size_t i = 0; i < sizeof(msg); i++) {
			ck_assert_int_eq(moe_test_send_all(fd, (uint8_t *)&msg + i, 1), 0);
			if (i % 16 == 0)
				usleep(200);
		}
		{
			struct moe_msg_header rh;
			struct moe_msg_welcome w;
			int segfd = -1;

			rc = moe_test_recv_all(fd, &rh, sizeof(rh), &segfd, 5000);
			if (rc == 0)
				rc = moe_test_recv_all(fd, &w, sizeof(w), &segfd, 5000);
			moed_assert(&d, rc == 0 && rh.type == MOE_MSG_WELCOME && w.status == 0 && segfd >= 0,
				    "a HELLO sent byte by byte: got %d, status %d, fd %d", rc, rc ? 0 : w.status, segfd);
			close(segfd);
			/* a second HELLO on a welcomed session ends it */
			ck_assert_int_eq(moe_test_send_all(fd, &msg, sizeof(msg)), 0);
			moed_assert(&d, peer_closes(fd, 1000), "a second HELLO: moed kept the connection");
			close(fd);
		}
	}

	/* ---- moed is alive, the hostile session still works, the others were served */
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	{
		memset(j.out, 0xa5, j.bytes);
		ck_assert_int_eq(ref_forward(e, &m, &j, why, sizeof(why)), 0);
		good.user_data = 42;
		moe_test_raw_push(&r, &good, 1);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 1, WAIT_MS) == 1 && cqes[0].res == 0,
			    "the hostile session's last good request did not complete");
		ck_assert_msg(job_check(&m, &j, why, sizeof(why)) == 0, "the hostile session's last request: %s", why);
		job_free(&j);
	}
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "a new client after the attacks: %s", moe_strerror(rc));
	rng = 99;
	rc = client_round(c, e, &m, &rng, 3, true, 32, why, sizeof(why));
	ck_assert_msg(rc == 0, "a new client after the attacks: %s", why);
	moe_client_disconnect(c);
	rounds0 = atomic_load(&b->rounds[0]);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS; atomic_load(&b->rounds[0]) < rounds0 + 2;) {
		moed_assert(&d, waitpid(normal, NULL, WNOHANG) == 0, "the normal client failed (above)");
		ck_assert_msg(moe_test_now_ms() < end, "the normal client stalled");
		moe_test_sleep_ms(5);
	}
	atomic_store(&b->stop, 1);
	assert_child_ok(normal, "the normal client");
	close(silent);
	moe_test_raw_close(&r);
	moe_engine_close(e);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	munmap(b, sizeof(*b));
	moe_test_model_free(&m);
}
END_TEST

/*
 * A HELLO whose arena_bytes is within a page of 2^64 must be refused like
 * any arena beyond limits.segment_mb, not rounded up past zero into a
 * session with no arena (ARCHITECTURE.md 5: overflow-safe arithmetic).
 */
START_TEST(hello_sizes_that_overflow_are_refused)
{
	const uint64_t sizes[] = { UINT64_MAX, UINT64_MAX - 4094, (1ull << 63) + 1, (uint64_t)UINT32_MAX + 1 };
	struct moe_test_model m;
	struct moe_test_moed d;

	model_make(&m, "daemon-sizes");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct moe_msg_hello h = { .version = MOE_PROTO_VERSION, .arena_bytes = sizes[i] };
		struct moe_msg_welcome w;
		int segfd = -1, fd = moe_test_dial(d.sock), rc;

		ck_assert_int_ge(fd, 0);
		rc = moe_test_hello_exchange(fd, &h, &w, &segfd);
		if (segfd >= 0)
			close(segfd);
		close(fd);
		moed_assert(&d, rc == 0 && w.status == -E2BIG,
			    "a HELLO asking for an arena of %" PRIu64 " bytes got %d, status %d (%s), a segment of %"
			    PRIu64 " bytes; want status -E2BIG (daemon/server.c segment_make: rounding the arena up to "
			    "pages must not wrap past 2^64)", sizes[i], rc, rc ? 0 : w.status,
			    rc ? "" : moe_strerror(w.status), rc ? 0 : w.segment_bytes);
	}
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/*
 * A session whose client hangs up is closed at once: moed's data thread
 * frees it (and closes its socket) when the control thread says so.  The
 * hang-up comes to an idle moed right after a HELLO and a STATS, while
 * the data thread is between its snapshot and its next sleep.
 */
START_TEST(a_session_that_hangs_up_is_closed_at_once)
{
	struct {
		struct moe_msg_header h;
		struct moe_msg_hello b;
		struct moe_msg_header stats;
	} msg = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
		  { .version = MOE_PROTO_VERSION, .arena_bytes = 1u << 20 },
		  { MOE_MSG_MAGIC, MOE_MSG_STATS, 0, 0 } };
	uint64_t worst = 0, slow = 0;
	struct moe_test_model m;
	struct moe_test_moed d;

	model_make(&m, "daemon-hangup");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 4; };");
	moed_start(&d);
	for (int i = 0; i < 20 && slow < 3; i++) {
		uint64_t t0, dt;
		int fd;

		moe_test_sleep_ms(30);           /* moed idle: its data thread asleep */
		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(moe_test_send_all(fd, &msg, sizeof(msg)), 0);
		shutdown(fd, SHUT_WR);
		t0 = moe_test_now_ms();
		moed_assert(&d, peer_closes(fd, 5000), "round %d: moed did not close the session in 5 s", i);
		dt = moe_test_now_ms() - t0;
		close(fd);
		worst = dt > worst ? dt : worst;
		slow += dt >= 250;
	}
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	ck_assert_msg(worst < 250, "%" PRIu64 " hung-up sessions were closed only after 250 ms or more, the slowest "
		      "after %" PRIu64 " ms: a lost wakeup of the data thread? (daemon/server.c: data_sleep() must "
		      "compare the wake word read before sessions_update(), or a wake_data() from session_end() or "
		      "hello() in between is lost and it sleeps WAIT_SLICE_NS)", slow, worst);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ 4: SIGTERM */

/*
 * Rounds of 4 requests of 1024 tokens until an error comes: the time it
 * came (CLOCK_MONOTONIC is the same clock in every process) and the error
 * go on the board.
 */
static int term_client(void *p)
{
	const struct client_arg *a = p;
	uint64_t rng = 0x7e53ull + (uint64_t)a->id, T = 1024, H = a->m->H;
	struct moe_client *c;
	void *in[4], *out[4];
	int r = moe_client_connect(a->sock, NULL, &c);

	if (r < 0) {
		char why[128];

		snprintf(why, sizeof(why), "moe_client_connect: %s", moe_strerror(r));
		return client_fail(a, why);
	}
	for (int i = 0; i < 4; i++) {
		if (moe_client_alloc(c, T * H * 4, &in[i]) < 0 || moe_client_alloc(c, T * H * 4, &out[i]) < 0)
			return client_fail(a, "moe_client_alloc failed");
		fill_input(in[i], MOE_F32, T * H, &rng);
	}
	for (;;) {
		int err = 0, pending = 0;

		for (int i = 0; i < 4 && !err; i++) {
			struct moe_request q = { .layer = a->m->layers[(uint32_t)i % a->m->nl], .dtype = MOE_F32,
						 .tokens = T, .input = in[i], .output = out[i], .user_data = (uint64_t)i };

			err = moe_client_submit(c, &q);
			pending += err == 0;
		}
		atomic_store(&a->b->state[a->id], 1);     /* waiting */
		while (!err && pending) {
			struct moe_completion cq;

			err = moe_client_wait(c, &cq, 10000);
			if (err == 0) {
				pending--;
				err = cq.res;
			}
		}
		if (err) {
			atomic_store(&a->b->t_err[a->id], (long long)now_ns());
			atomic_store(&a->b->err[a->id], err);
			break;
		}
		atomic_fetch_add(&a->b->rounds[a->id], 1);
	}
	moe_client_disconnect(c);
	return 0;
}

START_TEST(sigterm_while_clients_wait_gives_them_an_error_quickly)
{
	enum { N = 3 };
	struct board *b = board_new();
	struct client_arg args[N];
	pid_t pids[N];
	struct moe_engine *e;
	struct moe_client *c;
	struct stat st;
	struct moe_test_model m;
	struct moe_test_moed d;
	uint64_t t_term, rng = 5;
	char why[512];
	int rc;

	model_make(&m, "daemon-term");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	for (int i = 0; i < N; i++) {
		args[i] = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = i };
		pids[i] = spawn(term_client, &args[i]);
	}
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS;;) {
		int n = 0;

		for (int i = 0; i < N; i++) {
			n += atomic_load(&b->rounds[i]) >= 1;
			ck_assert_msg(waitpid(pids[i], NULL, WNOHANG) == 0, "client %d ended early (above)", i);
		}
		if (n == N)
			break;
		moed_assert(&d, moe_test_now_ms() < end, "the clients did not get going");
		moe_test_sleep_ms(2);
	}
	moe_test_sleep_ms(20);
	t_term = now_ns();
	kill(d.pid, SIGTERM);
	for (int i = 0; i < N; i++)
		assert_child_ok(pids[i], "a waiting client");
	for (int i = 0; i < N; i++) {
		int err = atomic_load(&b->err[i]);
		long long dt = atomic_load(&b->t_err[i]) - (long long)t_term;

		moed_assert(&d, err == -ESHUTDOWN || err == -ECONNRESET, "client %d: got %d (%s) after SIGTERM, "
			    "not -ESHUTDOWN or -ECONNRESET", i, err, moe_strerror(err));
		moed_assert(&d, dt < 1000000000ll, "client %d: its error came %.3f s after SIGTERM (at most 1 s)", i,
			    (double)dt / 1e9);
		fprintf(stderr, "sigterm: client %d got %s %.1f ms after SIGTERM, %llu rounds before\n", i,
			moe_strerror(err), (double)dt / 1e6, (unsigned long long)atomic_load(&b->rounds[i]));
	}
	{
		uint64_t end = moe_test_now_ms() + STOP_TIMEOUT_MS;
		int ws;

		while (waitpid(d.pid, &ws, WNOHANG) == 0) {
			if (moe_test_now_ms() > end) {
				moe_test_moed_dump_log(&d, 0);
				ck_abort_msg("moed did not exit within %d ms of SIGTERM", STOP_TIMEOUT_MS);
			}
			moe_test_sleep_ms(5);
		}
		moed_pid = d.pid = 0;
		moed_assert(&d, WIFEXITED(ws) && WEXITSTATUS(ws) == 0, "moed ended with %s %d after SIGTERM, not exit 0",
			    WIFEXITED(ws) ? "status" : "signal", WIFEXITED(ws) ? WEXITSTATUS(ws) : WTERMSIG(ws));
	}
	moed_assert(&d, lstat(d.sock, &st) < 0 && errno == ENOENT, "moed left its socket %s behind", d.sock);

	/* the same socket again */
	moed_start(&d);
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "connect after the restart: %s", moe_strerror(rc));
	ck_assert_int_eq(ref_open(&m, &e, why, sizeof(why)), 0);
	rc = client_round(c, e, &m, &rng, 2, false, 64, why, sizeof(why));
	moed_assert(&d, rc == 0, "forward after the restart: %s", why);
	rc = client_round(c, e, &m, &rng, 3, true, 64, why, sizeof(why));
	moed_assert(&d, rc == 0, "submit/wait after the restart: %s", why);
	moe_client_disconnect(c);
	moe_engine_close(e);
	moed_stop(&d);
	munmap(b, sizeof(*b));
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ 5: access.uids */

struct uid_arg {
	const char *sock;
	uid_t uid;
	int want;                    /* what moe_client_connect() must return */
	int tries;
	unsigned delay_us;           /* before each send(2) of libmoeclient's */
};


enum { UID_RACE = 3 };          /* exit status: only -EPIPE / -ECONNRESET instead of -EACCES */

static int uid_client(void *p)
{
	const struct uid_arg *a = p;
	struct moe_client *c = NULL;
	int r = 0, wrong = 0, racy = 0;

	if (setgroups(0, NULL) < 0 || setgid(a->uid) < 0 || setuid(a->uid) < 0) {
		fprintf(stderr, "uid %u: setuid: %s\n", (unsigned)a->uid, strerror(errno));
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGKILL);          /* cleared by setuid */
	send_delay_us = a->delay_us;
	for (int i = 0; i < a->tries; i++) {
		r = moe_client_connect(a->sock, NULL, &c);
		if (r != a->want) {
			if (!wrong)
				fprintf(stderr, "uid %u: moe_client_connect, try %d of %d: %d (%s), want %d (%s)\n",
					(unsigned)a->uid, i + 1, a->tries, r, moe_strerror(r), a->want,
					moe_strerror(a->want));
			wrong++;
			racy += r == -EPIPE || r == -ECONNRESET;
		}
		if (r == 0 && i + 1 < a->tries)
			moe_client_disconnect(c);
	}
	if (wrong) {
		fprintf(stderr, "uid %u: %d of %d tries wrong, %d of them -EPIPE or -ECONNRESET\n", (unsigned)a->uid,
			wrong, a->tries, racy);
		return wrong == racy ? UID_RACE : 1;
	}
	if (r == 0) {
		float x[4 * 256] = { 0.5f }, y[4 * 256];
		struct moe_model_info in;

		moe_client_info(c, &in);
		r = moe_client_forward(c, in.moe_layers[0], MOE_F32, x, y, 4, NULL, NULL);
		moe_client_disconnect(c);
		if (r < 0 || in.hidden_size != 256) {
			fprintf(stderr, "uid %u: forward: %s\n", (unsigned)a->uid, moe_strerror(r));
			return 1;
		}
	}
	return 0;
}

START_TEST(a_uid_outside_access_uids_is_refused)
{
	struct uid_arg nobody, allowed;
	struct moe_client *c;
	struct moe_test_model m;
	struct moe_test_moed d;
	char needle[64];
	int rc, st, sig = 0;

	if (geteuid() != 0) {
		fprintf(stderr, "SKIP: a_uid_outside_access_uids_is_refused needs root (setuid to nobody)\n");
		return;
	}
	model_make(&m, "daemon-uids");
	ck_assert_int_eq(chmod(m.dir, 0755), 0);     /* nobody reaches the socket: only moed refuses */
	moed_config(&d, &m, "mode = \"0666\";", "access = { uids = [ 12345 ]; gids = [ ]; };");
	moed_start(&d);
	/* root always; the socket lets others in: uid 12345 is served */
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "root: %s", moe_strerror(rc));
	moe_client_disconnect(c);
	allowed = (struct uid_arg){ .sock = d.sock, .uid = 12345, .want = 0, .tries = 1 };
	assert_child_ok(spawn(uid_client, &allowed), "a client as uid 12345 (in access.uids)");
	/*
	 * nobody is refused, every time, with -EACCES: also when the HELLO
	 * goes out only after moed has refused and closed (a client preempted
	 * between connect(2) and its HELLO; moed refuses at accept).
	 */
	nobody = (struct uid_arg){ .sock = d.sock, .uid = 65534, .want = -EACCES, .tries = 5, .delay_us = 20000 };
	st = child_wait(spawn(uid_client, &nobody), CLIENT_TIMEOUT_MS, &sig);
	if (st == 0) {
		nobody.delay_us = 0;
		st = child_wait(spawn(uid_client, &nobody), CLIENT_TIMEOUT_MS, &sig);
	}
	snprintf(needle, sizeof(needle), "uid %u", 65534u);
	moed_assert(&d, moe_test_moed_log_has(&d, needle), "moed's log does not name the refused uid (no '%s')", needle);
	moed_stop(&d);
	ck_assert_msg(st != UID_RACE, "uid 65534 got -EPIPE or -ECONNRESET instead of -EACCES (see above): moed "
		      "refuses a uid at accept, before it reads the HELLO, and closes; libmoeclient's "
		      "moe_client_connect() must read the refusal WELCOME even when its HELLO could not be sent");
	ck_assert_msg(st == 0, "a client as uid 65534 (nobody): exit %d, signal %d (its message is above)", st, sig);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ 6: max_clients */

START_TEST(max_clients_is_enforced)
{
	struct moe_client *a, *b, *c = NULL, *x;
	float in[2 * 256] = { 0.25f }, out[2 * 256];
	struct moe_test_model m;
	struct moe_test_moed d;
	int rc;

	model_make(&m, "daemon-max");
	moed_config(&d, &m, NULL, "limits = { max_clients = 2; segment_mb = 8; };");
	moed_start(&d);
	ck_assert_int_eq(moe_client_connect(d.sock, NULL, &a), 0);
	ck_assert_int_eq(moe_client_connect(d.sock, NULL, &b), 0);
	for (int i = 0; i < 2; i++) {
		rc = moe_client_connect(d.sock, NULL, &x);
		moed_assert(&d, rc == -EUSERS, "connect number %d with max_clients = 2: %d (%s), want -EUSERS", 3 + i,
			    rc, moe_strerror(rc));
	}
	ck_assert_int_eq(moe_client_forward(b, m.layers[0], MOE_F32, in, out, 2, NULL, NULL), 0);
	moe_client_disconnect(a);
	/* moed notices the close asynchronously */
	for (uint64_t end = moe_test_now_ms() + 2000;;) {
		rc = moe_client_connect(d.sock, NULL, &c);
		if (rc == 0 || moe_test_now_ms() > end)
			break;
		moed_assert(&d, rc == -EUSERS, "connect after a disconnect: %d (%s)", rc, moe_strerror(rc));
		moe_test_sleep_ms(10);
	}
	moed_assert(&d, rc == 0, "2 s after one of 2 clients left, a new one is still refused: %s", moe_strerror(rc));
	ck_assert_int_eq(moe_client_forward(c, m.layers[2], MOE_F32, in, out, 2, NULL, NULL), 0);
	rc = moe_client_connect(d.sock, NULL, &x);
	moed_assert(&d, rc == -EUSERS, "a third client again: %d (%s), want -EUSERS", rc, moe_strerror(rc));
	moed_assert(&d, moe_test_moed_log_has(&d, "max_clients"), "moed's log does not name limits.max_clients");
	moe_client_disconnect(b);
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ 7: moectl */

static void assert_same_file(const char *a, const char *b)
{
	uint64_t la = 0, lb = 0;
	char *x = moe_test_slurp(a, &la), *y = moe_test_slurp(b, &lb);
	uint64_t i = 0;

	ck_assert_msg(x && y, "cannot read %s or %s", a, b);
	while (i < la && i < lb && x[i] == y[i])
		i++;
	ck_assert_msg(la == lb && i == la, "%s (%" PRIu64 " bytes) and %s (%" PRIu64 " bytes) differ at byte %" PRIu64,
		      a, la, b, lb, i);
	free(x);
	free(y);
}

static char *run_moectl(const struct moe_test_moed *d, const char *out, const char *args)
{
	int rc = moe_test_sh(out, "'%s' --socket '%s' %s", moe_test_moectl(), d->sock, args);
	char *text = moe_test_slurp(out, NULL);

	if (rc != 0)
		moe_test_moed_dump_log(d, 0);
	ck_assert_msg(rc == 0, "moectl --socket S %s: exit %d: %s", args, rc, text ? text : "");
	ck_assert_ptr_nonnull(text);
	return text;
}

START_TEST(moectl_forward_through_moed_matches_forward_model)
{
	const uint32_t L = 2;
	struct moe_test_model m;
	struct moe_test_moed d;
	struct moe_client *c;
	char a[4200], b[4200], ra[4200], rb[4200], out[4200], args[9000], line[128], *text, *info;
	float in[10 * 256], y[10 * 256];
	json_t *root, *cl, *lat, *mine = NULL;
	json_error_t jerr;
	int rc;

	model_make(&m, "daemon-moectl");
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);
	snprintf(a, sizeof(a), "%s/a.npy", m.dir);
	snprintf(b, sizeof(b), "%s/b.npy", m.dir);
	snprintf(ra, sizeof(ra), "%s/a.npz", m.dir);
	snprintf(rb, sizeof(rb), "%s/b.npz", m.dir);
	snprintf(out, sizeof(out), "%s/out.txt", m.dir);

	snprintf(args, sizeof(args), "forward --layer %u --random-input 17 --output '%s' --routing-out '%s'", L, a, ra);
	free(run_moectl(&d, out, args));
	rc = moe_test_sh(out, "'%s' forward --model '%s' --layer %u --random-input 17 --output '%s' --routing-out '%s'",
			 moe_test_moectl(), m.store, L, b, rb);
	ck_assert_msg(rc == 0, "moectl forward --model: exit %d", rc);
	assert_same_file(a, b);
	assert_same_file(ra, rb);

	/* a session of ours with known counters: 3 requests of 10 tokens */
	rc = moe_client_connect(d.sock, NULL, &c);
	ck_assert_int_eq(rc, 0);
	for (int i = 0; i < 10 * 256; i++)
		in[i] = (float)(i % 13) / 13.0f - 0.5f;
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(moe_client_forward(c, m.layers[(uint32_t)i], MOE_F32, in, y, 10, NULL, NULL), 0);

	info = run_moectl(&d, out, "info");
	ck_assert_msg(strstr(info, "deepseek_v3") && strstr(info, "backend cpu") && strstr(info, "hidden 256") &&
		      strstr(info, "32 experts") && strstr(info, "top-4") && strstr(info, "MoE: 1,2,3"),
		      "moectl info:\n%s", info);
	text = run_moectl(&d, out, "info --json");
	root = json_loads(text, 0, &jerr);
	ck_assert_msg(root, "moectl info --json: not JSON (%s):\n%s", jerr.text, text);
	ck_assert_str_eq(json_string_value(json_object_get(root, "model_type")), "deepseek_v3");
	ck_assert_int_eq(json_integer_value(json_object_get(root, "top_k")), 4);
	ck_assert_int_eq(json_array_size(json_object_get(root, "moe_layers")), 3);
	ck_assert_msg(json_is_string(json_object_get(root, "weight_dtype")) &&
		      !strcmp(json_string_value(json_object_get(root, "weight_dtype")), "bf16"),
		      "moectl info --json: weight_dtype of a bf16 store:\n%s", text);
	json_decref(root);
	free(text);

	text = run_moectl(&d, out, "stats");
	snprintf(line, sizeof(line), "pid %d, uid %u: 3 requests, 30 tokens, 0 errors", (int)getpid(), (unsigned)getuid());
	ck_assert_msg(strstr(text, "deepseek_v3") && strstr(text, "latency") && strstr(text, line),
		      "moectl stats has no model, latency or line '%s':\n%s", line, text);
	free(text);

	text = run_moectl(&d, out, "stats --json");
	root = json_loads(text, 0, &jerr);
	ck_assert_msg(root, "moectl stats --json: not JSON (%s):\n%s", jerr.text, text);
	ck_assert_str_eq(json_string_value(json_object_get(root, "model")), "deepseek_v3");
	ck_assert_msg(json_integer_value(json_object_get(root, "requests")) >= 4 &&
		      json_integer_value(json_object_get(root, "tokens")) >= 47,
		      "stats --json: requests %lld, tokens %lld; at least 4 and 47 were served:\n%s",
		      (long long)json_integer_value(json_object_get(root, "requests")),
		      (long long)json_integer_value(json_object_get(root, "tokens")), text);
	lat = json_object_get(root, "latency");
	ck_assert_msg(json_is_object(lat) && json_integer_value(json_object_get(lat, "samples")) >= 4 &&
		      json_number_value(json_object_get(lat, "p50_us")) > 0 &&
		      json_number_value(json_object_get(lat, "p99_us")) >= json_number_value(json_object_get(lat, "p50_us")),
		      "stats --json: latency is not samples >= 4 with p50 <= p99:\n%s", text);
	cl = json_object_get(root, "clients");
	for (size_t i = 0; i < json_array_size(cl); i++)
		if (json_integer_value(json_object_get(json_array_get(cl, i), "pid")) == getpid())
			mine = json_array_get(cl, i);
	ck_assert_msg(mine, "stats --json: no client with pid %d:\n%s", (int)getpid(), text);
	ck_assert_msg(json_integer_value(json_object_get(mine, "requests")) == 3 &&
		      json_integer_value(json_object_get(mine, "tokens")) == 30 &&
		      json_integer_value(json_object_get(mine, "errors")) == 0,
		      "stats --json: our session shows requests %lld, tokens %lld, errors %lld; want 3, 30, 0",
		      (long long)json_integer_value(json_object_get(mine, "requests")),
		      (long long)json_integer_value(json_object_get(mine, "tokens")),
		      (long long)json_integer_value(json_object_get(mine, "errors")));
	json_decref(root);
	free(text);
	moe_client_disconnect(c);
	moed_stop(&d);
	/* the store's weights are bf16: moed's WELCOME, proto.h and moectl agree on the numbering */
	ck_assert_msg(strstr(info, "bf16 weights"), "moectl info says of a bf16 store (does the WELCOME's "
		      "weight_dtype follow proto.h, and moectl's table too?):\n%s", info);
	free(info);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ regressions of the review */

/*
 * A client that says HELLO and hangs up at once makes moed's WELCOME fail
 * to send; the segment moed had made for it was never unmapped, 64 MiB of
 * address space per connection until mmap failed for everyone.
 */
START_TEST(a_welcome_that_cannot_be_sent_leaves_no_segment)
{
	struct moe_msg_hello h = { .version = MOE_PROTO_VERSION };
	struct moe_test_moed d;
	struct moe_test_model m;
	int base, now = -1;

	model_make(&m, "daemon-welcome-leak");
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);
	base = moe_test_count_segments(d.pid);
	for (int i = 0; i < 100; i++) {
		int fd = moe_test_dial(d.sock);
		struct {
			struct moe_msg_header hd;
			struct moe_msg_hello b;
		} msg = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(h), 0 }, h };

		moed_assert(&d, fd >= 0, "connect: %s", strerror(-fd));
		moe_test_send_all(fd, &msg, sizeof(msg));
		close(fd);
	}
	for (uint64_t end = moe_test_now_ms() + 2000; moe_test_now_ms() < end; moe_test_sleep_ms(20)) {
		now = moe_test_count_segments(d.pid);
		if (now <= base)
			break;
	}
	moed_assert(&d, now <= base, "%d segment mappings after 100 hung-up HELLOs (%d before)", now, base);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/*
 * STATS used to block the control thread until the data thread had made a
 * snapshot, and its answer was sent with a blocking wait: a client that
 * asked again and again without reading held up every other session's
 * connect.  Now answers wait asynchronously; a session whose unread
 * answers pile up is ended.
 */
START_TEST(a_client_that_asks_for_stats_and_never_reads_holds_up_nobody)
{
	struct moe_msg_header q = { .magic = MOE_MSG_MAGIC, .type = MOE_MSG_STATS, .len = 0 };
	struct moe_model_info info;
	struct moe_test_moed d;
	struct moe_client *c;
	struct moe_test_model m;
	int fd, rc;

	model_make(&m, "daemon-stats-flood");
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);
	fd = moe_test_dial(d.sock);
	moed_assert(&d, fd >= 0, "connect: %s", strerror(-fd));
	{
		struct moe_msg_hello h = { .version = MOE_PROTO_VERSION };
		struct moe_msg_welcome w;
		int segfd = -1;

		rc = moe_test_hello_exchange(fd, &h, &w, &segfd);
		moed_assert(&d, rc == 0 && w.status == 0, "HELLO: %d", rc);
		if (segfd >= 0)
			close(segfd);
	}
	for (int i = 0; i < 2000; i++)
		if (send(fd, &q, sizeof(q), MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof(q))
			break;
	/* meanwhile another session connects and asks at once */
	uint64_t t0 = moe_test_now_ms();
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "a second client: %s", moe_strerror(rc));
	ck_assert_int_eq(moe_client_info(c, &info), 0);
	char *json = NULL;
	rc = moe_client_stats(c, &json);
	moed_assert(&d, rc == 0, "stats of the second client: %s", moe_strerror(rc));
	free(json);
	uint64_t dt = moe_test_now_ms() - t0;
	moed_assert(&d, dt < 800, "the second client waited %llu ms behind the one that does not read",
		    (unsigned long long)dt);
	moe_client_disconnect(c);
	close(fd);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/*
 * Device memory on moed's CPU backend: libmoeclient refuses what is not
 * CUDA memory (or has no driver to ask), moed answers a CUDA_MAP with a
 * clear refusal, and descriptors that name device regions it never mapped
 * fail alone; the session keeps working.
 */
START_TEST(device_memory_on_the_cpu_backend_is_refused_cleanly)
{
	struct moe_test_moed d;
	struct moe_test_raw r;
	struct moe_cqe cqes[4];
	struct moe_client *c;
	struct moe_test_model m;
	uint32_t region = 99;
	float host[64];
	int rc;

	model_make(&m, "daemon-device");
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);

	/* the library: moed's WELCOME says its backend takes no device memory */
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "connect: %s", moe_strerror(rc));
	rc = moe_client_cuda_register(c, host, sizeof(host), &region);
	ck_assert_msg(rc == -EOPNOTSUPP, "registering memory with a CPU moed gave %d (%s)", rc, moe_strerror(rc));
	ck_assert_uint_eq(region, 99);
	ck_assert_int_eq(moe_client_forward_cuda(c, m.layers[0], host, host, 1, NULL, NULL), -EFAULT);
	ck_assert_int_eq(moe_client_cuda_unregister(c, 0), -EINVAL);
	ck_assert_int_eq(moe_client_cuda_unregister(c, 1000), -EINVAL);
	moe_client_disconnect(c);

	/* the protocol: a CUDA_MAP with a made-up handle */
	rc = moe_test_raw_open(&r, d.sock, NULL);
	moed_assert(&d, rc == 0, "raw session: %d", rc);
	{
		struct {
			struct moe_msg_header h;
			struct moe_msg_cuda_map m;
		} msg = { { .magic = MOE_MSG_MAGIC, .type = MOE_MSG_CUDA_MAP, .len = sizeof(struct moe_msg_cuda_map) },
			  { .offset = 0, .bytes = 4096 } };
		struct moe_msg_header rh;
		struct moe_msg_cuda_reply rep;

		memset(msg.m.handle, 0x5a, sizeof(msg.m.handle));
		ck_assert_int_eq(moe_test_send_all(r.fd, &msg, sizeof(msg)), 0);
		rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
		if (rc == 0)
			rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
		moed_assert(&d, rc == 0 && rh.type == MOE_MSG_CUDA_MAP && rh.len == sizeof(rep),
			    "no CUDA_MAP answer: %d", rc);
		ck_assert_int_eq(rep.status, -EOPNOTSUPP);
		ck_assert_msg(strstr(rep.message, "CUDA backend") != NULL, "the refusal says: %s", rep.message);
		moed_assert(&d, moe_test_moed_log_has(&d, "device memory refused"), "moed did not log the refusal");
		/* a region that is not in its allocation, and an unmap of nothing */
		msg.m.offset = UINT64_MAX - 10;
		ck_assert_int_eq(moe_test_send_all(r.fd, &msg, sizeof(msg)), 0);
		rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
		if (rc == 0)
			rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
		moed_assert(&d, rc == 0 && rep.status == -EINVAL, "an impossible region: %d, status %d", rc,
			    rep.status);
		{
			struct {
				struct moe_msg_header h;
				struct moe_msg_cuda_unmap m;
			} um = { { .magic = MOE_MSG_MAGIC, .type = MOE_MSG_CUDA_UNMAP,
				   .len = sizeof(struct moe_msg_cuda_unmap) }, { .region = 3 } };

			ck_assert_int_eq(moe_test_send_all(r.fd, &um, sizeof(um)), 0);
			rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
			if (rc == 0)
				rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
			moed_assert(&d, rc == 0 && rh.type == MOE_MSG_CUDA_UNMAP && rep.status == -EINVAL,
				    "unmapping region 3 that was never mapped: %d, status %d", rc, rep.status);
		}
	}
	/* descriptors naming regions that do not exist, or region bits without
	 * the device flag, or bf16 on a device region */
	{
		uint64_t bytes = (uint64_t)m.H * 4;
		struct moe_sqe q[4] = {
			{ .user_data = 1, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_ACT_F32, .tokens = 1,
			  .flags = MOE_SQE_DEVICE | MOE_SQE_REGIONS(0, 0) },
			{ .user_data = 2, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_ACT_F32, .tokens = 1,
			  .flags = MOE_SQE_DEVICE | MOE_SQE_REGIONS(200, 3) },
			{ .user_data = 3, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_ACT_F32, .tokens = 1,
			  .flags = MOE_SQE_REGIONS(1, 1), .out_off = bytes },
			{ .user_data = 4, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_ACT_BF16, .tokens = 1,
			  .flags = MOE_SQE_DEVICE },
		};
		int want[4] = { -EFAULT, -EFAULT, -EINVAL, -EINVAL };

		moe_test_raw_push(&r, q, 4);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 4, WAIT_MS) == 4, "the bad descriptors did not complete");
		for (int i = 0; i < 4; i++)
			ck_assert_msg(cqes[i].user_data == (uint64_t)i + 1 && cqes[i].res == want[i],
				      "descriptor %d completed with %d, not %d", i + 1, cqes[i].res, want[i]);
	}
	/* and a good request still works on that session */
	{
		struct moe_sqe ok = { .user_data = 5, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_ACT_F32,
				      .tokens = 1, .in_off = 0, .out_off = (uint64_t)m.H * 4 };

		memset(r.arena, 0, (size_t)m.H * 4);
		moe_test_raw_push(&r, &ok, 1);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 1, WAIT_MS) == 1 && cqes[0].res == 0,
			    "a good request after them failed: %d", cqes[0].res);
	}
	moe_test_raw_close(&r);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("daemon");
	TCase *tc = tcase_create("daemon");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, eight_clients_get_the_bits_of_forward_in_process);
	tcase_add_test(tc, a_killed_client_costs_the_others_nothing);
	tcase_add_test(tc, a_hostile_client_hurts_only_itself);
	tcase_add_test(tc, hello_sizes_that_overflow_are_refused);
	tcase_add_test(tc, a_session_that_hangs_up_is_closed_at_once);
	tcase_add_test(tc, sigterm_while_clients_wait_gives_them_an_error_quickly);
	tcase_add_test(tc, a_uid_outside_access_uids_is_refused);
	tcase_add_test(tc, max_clients_is_enforced);
	tcase_add_test(tc, moectl_forward_through_moed_matches_forward_model);
	tcase_add_test(tc, a_welcome_that_cannot_be_sent_leaves_no_segment);
	tcase_add_test(tc, a_client_that_asks_for_stats_and_never_reads_holds_up_nobody);
	tcase_add_test(tc, device_memory_on_the_cpu_backend_is_refused_cleanly);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon");
}
