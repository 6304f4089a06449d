/* SPDX-License-Identifier: MIT */
/* The harness of the check_daemon_* suites: e2eutil.h says what each part
 * does. */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "e2eutil.h"
#include "engine/dtype.h"
#include "engine/err.h"
#include "formats/genmodel.h"

/* ------------------------------------------------------------------ time */

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ the model */

void model_make(struct moe_test_model *m, const char *tag)
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

int ref_open(const struct moe_test_model *m, struct moe_engine **ret, char *why, size_t len)
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
pid_t moed_pid;

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

pid_t spawn(int (*fn)(void *), void *arg)
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

int child_wait(pid_t pid, int timeout_ms, int *ret_sig)
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

void assert_child_ok(pid_t pid, const char *what)
{
	int sig = 0, st = child_wait(pid, CLIENT_TIMEOUT_MS, &sig);

	ck_assert_msg(st != -1, "%s (pid %d) was killed by signal %d (%s)", what, (int)pid, sig, strsignal(sig));
	ck_assert_msg(st != -2, "%s (pid %d) did not finish in %d ms", what, (int)pid, CLIENT_TIMEOUT_MS);
	ck_assert_msg(st == 0, "%s (pid %d) exited with status %d (its message is above)", what, (int)pid, st);
}

struct board *board_new(void)
{
	struct board *b = mmap(NULL, sizeof(*b), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	ck_assert_msg(b != MAP_FAILED, "mmap: %s", strerror(errno));
	memset(b, 0, sizeof(*b));
	return b;
}

/* ------------------------------------------------------------------ moed */

void moed_config(struct moe_test_moed *d, const struct moe_test_model *m, const char *sock_extra, const char *extra)
{
	int rc = moe_test_moed_config(d, m->dir, "s.sock", m->store, sock_extra, extra);

	ck_assert_msg(rc == 0, "moed config in %s: %s", m->dir, strerror(-rc));
}

void moed_start(struct moe_test_moed *d)
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

void moed_stop(struct moe_test_moed *d)
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

static size_t elem_size(uint32_t dtype)
{
	return dtype == MOE_F32 ? 4 : 2;
}

void fill_input(void *in, uint32_t dtype, size_t n, uint64_t *rng)
{
	for (size_t i = 0; i < n; i++) {
		float v = (float)(2.0 * moe_test_randf(rng));

		if (dtype == MOE_F32)
			((float *)in)[i] = v;
		else
			((uint16_t *)in)[i] = moe_f32_to_bf16(v);
	}
}

int ref_forward(struct moe_engine *e, const struct moe_test_model *m, struct job *j, char *why, size_t len)
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

void job_free(struct job *j)
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

int job_check(const struct moe_test_model *m, const struct job *j, char *why, size_t len)
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

uint32_t rand_below(uint64_t *rng, uint64_t n)
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

int client_round(struct moe_client *c, struct moe_engine *e, const struct moe_test_model *m, uint64_t *rng, int n,
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

int session_open(struct session *s, const struct moe_test_model *m, const char *sock, char *why, size_t len)
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

void session_close(struct session *s)
{
	moe_client_disconnect(s->c);
	moe_engine_close(s->e);
}

int client_fail(const struct client_arg *a, const char *why)
{
	fprintf(stderr, "client %d (pid %d): %s\n", a->id, (int)getpid(), why);
	return 1;
}

/* ------------------------------------------------------------------ client processes */

int rounds_until_stop(const struct client_arg *a, struct session *s, uint64_t seed, uint32_t nasync)
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


/* ------------------------------------------------------------------ raw sessions (proto.h) */

bool peer_closes(int fd, int timeout_ms)
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
