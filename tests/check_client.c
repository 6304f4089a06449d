/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient against a real moed, as its man pages promise:
 *  - connect: a missing socket, a path that is not a socket, a path too
 *    long, options moed refuses; $MOED_SOCKET when the path is NULL;
 *  - info: every field as the store has it;
 *  - the arena: 64-byte alignment, -ENOMEM when full, freed extents merge
 *    back into one, foreign pointers refused;
 *  - submit: every error it documents, a full ring included;
 *  - wait: its timeouts;
 *  - forward and submit/wait: the engine's bits, float32 and bfloat16, with
 *    and without routing, split by max_tokens and by the arena's size;
 *  - one handle shared by ten threads: every result right, every
 *    completion delivered exactly once, no deadlock;
 *  - stats; what the calls return once moed stops; the example program.
 *
 * Each test starts its own moed ($MOED, else ../daemon/moed) on a socket in
 * a fresh directory, serving a small store generated there, and compares
 * with the engine run in this process.  The engine is opened only after
 * moed is forked: no fork after threads.  moed dies with the test however
 * the test ends: SIGTERM at teardown, PR_SET_PDEATHSIG if the test exits
 * first, and Check kills the test's process group on a timeout.
 *
 * Why one file of some 1,500 lines: it is one component, libmoeclient(3),
 * checked call by call in the order of its man pages, one suite whose
 * sections are those calls; every test uses the same fixture (the moed of
 * setup(), frozen and thawed by some) and the same comparison with the
 * engine.  Split by call, each file would be a few tests around that
 * shared fixture, and a failure already names the call in the test's name
 * (connect_..., submit_..., wait_...).
 */
#include "config.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemonutil.h"
#include "engine/dtype.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "libmoeclient/moeclient.h"
#include "formats/pack.h"
#include "engine/store.h"
#include "testutil.h"

/* The model: deepseek_v3 with bf16 weights, layer 0 dense, layers 1 and 2
 * MoE; H = 200 is no multiple of 16 or of a cache line. */
#define HIDDEN 200u
#define EXPERTS 8u
#define TOP_K 2u
#define DENSE_LAYER 0u

/* The test's moed and its store. */
struct daemon {
	struct moe_test_model m;     /* in m.dir: the checkpoint in hf/, the store */
	struct moe_test_moed moed;   /* its config, log and socket in m.dir */
};

static struct daemon D;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void model_make(void)
{
	struct moe_gen_options opt;
	char why[512];
	int r;

	moe_test_gen_small(MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, &opt);
	opt.hidden_size = HIDDEN;
	opt.moe_intermediate_size = 64;
	opt.intermediate_size = 64;
	opt.num_experts = EXPERTS;
	opt.top_k = TOP_K;
	opt.n_group = 1;
	opt.topk_group = 1;
	opt.n_shared_experts = 1;
	opt.first_k_dense_replace = 1;
	opt.num_layers = 3;
	opt.num_nextn_predict_layers = 0;
	opt.vocab_size = 32;
	opt.seed = 77;
	r = moe_test_model_make(&D.m, "client", &opt, "hf", why, sizeof(why));
	ck_assert_msg(r == 0, "%s", why);
	ck_assert_uint_eq(D.m.nl, 2);
}

/* Start moed on D.m.store and D.moed.sock with @extra appended to its
 * configuration (NULL: none); returns when it accepts connections.  The
 * socket is open to all: its directory (0700) keeps other users out. */
static void daemon_start(const char *extra)
{
	char top[4096];
	int st = 0, r;

	snprintf(top, sizeof(top), "threads = 2;\ncache = { host_mb = 64; };\n%s", extra ? extra : "");
	r = moe_test_moed_config(&D.moed, D.m.dir, "moed.sock", D.m.store, "mode = \"0666\";", top);
	ck_assert_msg(r == 0, "moed config in %s: %s", D.m.dir, strerror(-r));
	r = moe_test_moed_start(&D.moed, 10000, &st);
	if (r == -ECHILD) {
		char *log = moe_test_slurp(D.moed.log, NULL);

		ck_abort_msg("%s exited (status 0x%x) before listening; its log:\n%s", moe_test_moed_path(), st,
			     log ? log : "(none)");
	}
	ck_assert_msg(r != -ETIMEDOUT, "moed did not listen on %s within 10 s", D.moed.sock);
	ck_assert_msg(r == 0, "fork: %s", strerror(-r));
}

/* Wait up to 5 s for moed to exit (after a signal); its wait status. */
static int daemon_reap(void)
{
	int st = 0;

	ck_assert_msg(moe_test_moed_reap(&D.moed, 5000, &st) == 0, "moed did not stop within 5 s of SIGTERM");
	return st;
}

/* SIGTERM: moed must stop cleanly, exit status 0. */
static void daemon_stop(void)
{
	int st;

	if (!D.moed.pid)
		return;
	kill(D.moed.pid, SIGTERM);
	st = daemon_reap();
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "moed ended with status 0x%x", st);
}

static void daemon_restart(const char *extra)
{
	daemon_stop();
	daemon_start(extra);
}

/* SIGSTOP moed and wait until every one of its threads has stopped, so
 * that nothing submitted from now on is taken. */
static void daemon_freeze(void)
{
	char path[64];

	kill(D.moed.pid, SIGSTOP);
	snprintf(path, sizeof(path), "/proc/%d/task", (int)D.moed.pid);
	for (int ms = 0;; ms++) {
		DIR *d = opendir(path);
		struct dirent *de;
		bool all = true;

		ck_assert_ptr_nonnull(d);
		while ((de = readdir(d)) && all) {
			char stat_path[300], line[512] = "";
			const char *p;
			FILE *f;

			if (de->d_name[0] == '.')
				continue;
			/* "tid (comm) S ...": S is T when stopped (procfs has no size: no slurp) */
			snprintf(stat_path, sizeof(stat_path), "%s/%s/stat", path, de->d_name);
			f = fopen(stat_path, "r");
			if (f) {
				if (!fgets(line, sizeof(line), f))
					line[0] = '\0';
				fclose(f);
			}
			p = strrchr(line, ')');
			all = p && p[1] == ' ' && p[2] == 'T';
		}
		closedir(d);
		if (all)
			return;
		ck_assert_msg(ms < 5000, "moed did not stop within 5 s of SIGSTOP");
		usleep(1000);
	}
}

static void daemon_thaw(void)
{
	kill(D.moed.pid, SIGCONT);
}

static void setup(void)
{
	memset(&D, 0, sizeof(D));
	model_make();
	daemon_start(NULL);
}

static void teardown(void)
{
	daemon_stop();
	moe_test_model_free(&D.m);
}

static struct moe_client *client_open(const struct moe_client_options *opt)
{
	struct moe_client *c = NULL;
	int r = moe_client_connect(D.moed.sock, opt, &c);

	ck_assert_msg(r == 0, "connect to %s: %s", D.moed.sock, moe_strerror(r));
	ck_assert_ptr_nonnull(c);
	return c;
}

/* ------------------------------------------------------------------ data */

static size_t dtype_size(uint32_t dtype)
{
	return dtype == MOE_F32 ? sizeof(float) : sizeof(uint16_t);
}

/* @n random activations of @dtype, malloc'ed. */
static void *random_input(uint32_t dtype, size_t n, uint64_t seed)
{
	void *p = malloc(n * dtype_size(dtype));

	ck_assert_ptr_nonnull(p);
	for (size_t i = 0; i < n; i++) {
		float v = (float)moe_test_randf(&seed);

		if (dtype == MOE_F32)
			((float *)p)[i] = v;
		else
			((uint16_t *)p)[i] = moe_f32_to_bf16(v);
	}
	return p;
}

static struct moe_engine *engine_open(void)
{
	struct moe_engine_options o = { .backend = "cpu", .threads = 1 };
	struct moe_engine *e = NULL;
	struct moe_err err = { 0 };
	int r = moe_engine_open(D.m.store, &o, &e, &err);

	ck_assert_msg(r == 0, "engine open: %d %s", r, err.msg);
	return e;
}

/* What moed must give: the engine's forward, with moed's dtype conversions
 * around it for bfloat16.  @ids and @w may be NULL. */
static void engine_forward(struct moe_engine *e, uint32_t layer, uint32_t dtype, const void *in,
			   uint64_t tokens, void *out, int32_t *ids, float *w)
{
	size_t n = tokens * HIDDEN;
	float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
	struct moe_err err = { 0 };
	int r;

	ck_assert(x && y);
	for (size_t i = 0; i < n; i++)
		x[i] = dtype == MOE_F32 ? ((const float *)in)[i] : moe_bf16_to_f32(((const uint16_t *)in)[i]);
	r = moe_engine_forward(e, layer, x, tokens, y, ids, w, 0, &err);
	ck_assert_msg(r == 0, "engine forward: %d %s", r, err.msg);
	for (size_t i = 0; i < n; i++)
		if (dtype == MOE_F32)
			((float *)out)[i] = y[i];
		else
			((uint16_t *)out)[i] = moe_f32_to_bf16(y[i]);
	free(x);
	free(y);
}

/* Index of the first of @n elements of @size bytes where @a and @b differ,
 * or -1. */
static long first_diff(const void *a, const void *b, size_t n, size_t size)
{
	if (memcmp(a, b, n * size) == 0)
		return -1;
	for (size_t i = 0; i < n; i++)
		if (memcmp((const uint8_t *)a + i * size, (const uint8_t *)b + i * size, size))
			return (long)i;
	return -1;
}

static uint32_t bits_at(const void *p, long i, size_t size)
{
	uint32_t v = 0;

	memcpy(&v, (const uint8_t *)p + (size_t)i * size, size);
	return v;
}

/* @got must be @want, bit for bit. */
#define assert_same(what, got, want, n, size)                                                              \
	do {                                                                                               \
		long d_ = first_diff(got, want, n, size);                                                 \
		ck_assert_msg(d_ < 0, "%s: element %ld of %zu is 0x%x, the engine's 0x%x", what, d_,       \
			      (size_t)(n), bits_at(got, d_, size), bits_at(want, d_, size));              \
	} while (0)

/* ------------------------------------------------------------------ connect */

START_TEST(connect_to_a_missing_socket_is_enoent)
{
	static char sentinel;
	struct moe_client *c = (struct moe_client *)&sentinel;     /* *ret is set only on success */
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/nobody.sock", D.m.dir);
	ck_assert_int_eq(moe_client_connect(path, NULL, &c), -ENOENT);
	ck_assert_ptr_eq(c, (struct moe_client *)&sentinel);
}
END_TEST

START_TEST(connect_to_a_path_that_is_not_a_socket_is_refused)
{
	struct moe_client *c = NULL;
	int r;

	r = moe_client_connect(D.m.store, NULL, &c);
	ck_assert_msg(r == -ECONNREFUSED, "connect to a file: %d %s", r, moe_strerror(r));
	r = moe_client_connect(D.m.dir, NULL, &c);
	ck_assert_msg(r == -ECONNREFUSED, "connect to a directory: %d %s", r, moe_strerror(r));
	ck_assert_ptr_null(c);
}
END_TEST

START_TEST(connect_with_a_null_path_uses_moed_socket)
{
	struct moe_client *c = NULL;
	char path[PATH_MAX];

	ck_assert_int_eq(setenv("MOED_SOCKET", D.moed.sock, 1), 0);
	ck_assert_int_eq(moe_client_connect(NULL, NULL, &c), 0);
	moe_client_disconnect(c);
	snprintf(path, sizeof(path), "%s/nobody.sock", D.m.dir);
	ck_assert_int_eq(setenv("MOED_SOCKET", path, 1), 0);
	ck_assert_int_eq(moe_client_connect(NULL, NULL, &c), -ENOENT);
	unsetenv("MOED_SOCKET");
}
END_TEST

START_TEST(connect_with_a_path_too_long_is_enametoolong)
{
	struct sockaddr_un a;
	char path[sizeof(a.sun_path) + 1];
	struct moe_client *c = NULL;

	/* the longest that fits sun_path with its NUL is tried (and missing) */
	memset(path, 'x', sizeof(path) - 1);
	path[0] = '/';
	path[sizeof(a.sun_path) - 1] = '\0';
	ck_assert_int_eq(moe_client_connect(path, NULL, &c), -ENOENT);
	path[sizeof(a.sun_path) - 1] = 'x';
	path[sizeof(a.sun_path)] = '\0';
	ck_assert_int_eq(moe_client_connect(path, NULL, &c), -ENAMETOOLONG);
	ck_assert_ptr_null(c);
}
END_TEST

START_TEST(connect_with_options_moed_refuses_fails)
{
	struct moe_client_options not_pow2 = { .sq_entries = 3 };
	struct moe_client_options too_many = { .sq_entries = 8192 };
	struct moe_client_options too_big = { .arena_bytes = 1ull << 40 };
	struct moe_client *c = NULL;

	ck_assert_int_eq(moe_client_connect(D.moed.sock, &not_pow2, &c), -EINVAL);
	ck_assert_int_eq(moe_client_connect(D.moed.sock, &too_many, &c), -EINVAL);
	ck_assert_int_eq(moe_client_connect(D.moed.sock, &too_big, &c), -E2BIG);
	ck_assert_int_eq(moe_client_connect(D.moed.sock, NULL, NULL), -EINVAL);
	ck_assert_ptr_null(c);
	moe_client_disconnect(NULL);
}
END_TEST

/* ------------------------------------------------------------------ info */

START_TEST(info_matches_the_store)
{
	struct moe_client_options opt = { .arena_bytes = 1000000 };
	struct moe_client *c = client_open(&opt);
	struct moe_model_info in;
	struct moe_store *s;
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_store_open(D.m.store, &s, &err), 0);
	memset(&in, 0xa5, sizeof(in));
	ck_assert_int_eq(moe_client_info(c, &in), 0);
	ck_assert_str_eq(in.model_type, s->hdr.model_type);
	ck_assert_str_eq(in.model_type, "deepseek_v3");
	ck_assert_str_eq(in.backend, "cpu");
	ck_assert_uint_eq(in.hidden_size, s->hdr.hidden_size);
	ck_assert_uint_eq(in.hidden_size, HIDDEN);
	ck_assert_uint_eq(in.moe_intermediate_size, s->hdr.moe_intermediate_size);
	ck_assert_uint_eq(in.num_experts, s->hdr.num_experts);
	ck_assert_uint_eq(in.top_k, s->hdr.top_k);
	ck_assert_uint_eq(in.num_hidden_layers, s->hdr.num_hidden_layers);
	ck_assert_uint_eq(in.num_moe_layers, s->hdr.num_moe_layers);
	for (uint32_t i = 0; i < in.num_moe_layers; i++)
		ck_assert_uint_eq(in.moe_layers[i], s->layers[i].layer);
	/* moe_dtype's numbering, as moe-store(5): 0 f32, 1 bf16, 2 f16 */
	ck_assert_uint_eq(in.weight_dtype, s->hdr.weight_dtype);
	ck_assert_uint_eq(in.weight_dtype, 1);
	ck_assert_uint_eq(in.n_shared_experts, s->hdr.n_shared_experts);
	/* limits.max_tokens_per_request, or what the arena holds of float32 input,
	 * output and routing if that is less */
	ck_assert_uint_eq(in.arena_bytes, (1000000 + 4095) / 4096 * 4096);
	ck_assert_uint_eq(in.max_tokens, in.arena_bytes / (8 * HIDDEN + 8 * TOP_K));
	moe_client_disconnect(c);
	c = client_open(NULL);
	ck_assert_int_eq(moe_client_info(c, &in), 0);
	ck_assert_uint_eq(in.max_tokens, 8192);
	ck_assert_uint_ge(in.arena_bytes, 8192 * (8 * HIDDEN + 8 * TOP_K));
	ck_assert_int_eq(moe_client_info(NULL, &in), -EINVAL);
	ck_assert_int_eq(moe_client_info(c, NULL), -EINVAL);
	moe_store_close(s);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ the arena */

START_TEST(alloc_is_64_byte_aligned_and_never_overlaps)
{
	static const size_t sizes[] = { 1, 63, 64, 65, 100, 4096, 4097, 12345 };
	struct moe_client *c = client_open(NULL);
	void *p[sizeof(sizes) / sizeof(sizes[0])];
	size_t n = sizeof(sizes) / sizeof(sizes[0]);

	for (size_t i = 0; i < n; i++) {
		ck_assert_int_eq(moe_client_alloc(c, sizes[i], &p[i]), 0);
		ck_assert_msg((uintptr_t)p[i] % 64 == 0, "%zu bytes at %p: not 64-byte aligned", sizes[i], p[i]);
		memset(p[i], (int)i, sizes[i]);
	}
	for (size_t i = 0; i < n; i++)
		for (size_t j = 0; j < sizes[i]; j++)
			ck_assert_msg(((uint8_t *)p[i])[j] == (uint8_t)i, "allocation %zu was overwritten", i);
	for (size_t i = 0; i < n; i++)
		ck_assert_int_eq(moe_client_free(c, p[i]), 0);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(alloc_fills_the_arena_and_free_merges_it_back)
{
	struct moe_client_options opt = { .arena_bytes = 1 << 20 };
	struct moe_client *c = client_open(&opt);
	struct moe_model_info in;
	size_t n = 0, cap = (1 << 20) / 4096;
	void **p = calloc(cap + 1, sizeof(void *)), *all, *q;
	int r;

	ck_assert_ptr_nonnull(p);
	ck_assert_int_eq(moe_client_info(c, &in), 0);
	ck_assert_uint_eq(in.arena_bytes, 1 << 20);
	/* 4096 bytes is a multiple of 64: no room is lost to alignment */
	while ((r = moe_client_alloc(c, 4096, &p[n])) == 0) {
		ck_assert_uint_lt(n, cap);
		n++;
	}
	ck_assert_int_eq(r, -ENOMEM);
	ck_assert_uint_eq(n, cap);
	/* free every other one (holes of 4096 bytes, nothing to merge), then the
	 * rest: each of those merges with the holes on both sides */
	for (size_t i = 0; i < n; i += 2)
		ck_assert_int_eq(moe_client_free(c, p[i]), 0);
	ck_assert_int_eq(moe_client_alloc(c, 8192, &q), -ENOMEM);       /* only holes of 4096 */
	for (size_t i = 1; i < n; i += 2)
		ck_assert_int_eq(moe_client_free(c, p[i]), 0);
	ck_assert_int_eq(moe_client_alloc(c, in.arena_bytes, &all), 0);
	ck_assert_int_eq(moe_client_alloc(c, 1, &q), -ENOMEM);
	ck_assert_int_eq(moe_client_free(c, all), 0);
	ck_assert_int_eq(moe_client_alloc(c, in.arena_bytes + 1, &q), -ENOMEM);
	ck_assert_int_eq(moe_client_alloc(c, 0, &q), -EINVAL);
	free(p);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(free_refuses_a_pointer_it_did_not_give)
{
	struct moe_client *c = client_open(NULL);
	void *p, *heap = malloc(64);
	int on_stack;

	ck_assert_int_eq(moe_client_alloc(c, 256, &p), 0);
	ck_assert_int_eq(moe_client_free(c, heap), -EINVAL);
	ck_assert_int_eq(moe_client_free(c, &on_stack), -EINVAL);
	ck_assert_int_eq(moe_client_free(c, (uint8_t *)p + 64), -EINVAL);     /* inside, not the start */
	ck_assert_int_eq(moe_client_free(c, NULL), 0);
	ck_assert_int_eq(moe_client_free(c, p), 0);
	ck_assert_int_eq(moe_client_free(c, p), -EINVAL);                     /* twice */
	free(heap);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ submit */

/* A valid one-token request on the first MoE layer, its tensors in the arena. */
struct valid_req {
	struct moe_request q;
	void *in, *out;
	int32_t *ids;
	float *w;
};

static void valid_req_make(struct moe_client *c, struct valid_req *v, uint64_t tokens)
{
	memset(v, 0, sizeof(*v));
	ck_assert_int_eq(moe_client_alloc(c, tokens * HIDDEN * 4, &v->in), 0);
	ck_assert_int_eq(moe_client_alloc(c, tokens * HIDDEN * 4, &v->out), 0);
	ck_assert_int_eq(moe_client_alloc(c, tokens * TOP_K * 4, (void **)&v->ids), 0);
	ck_assert_int_eq(moe_client_alloc(c, tokens * TOP_K * 4, (void **)&v->w), 0);
	memset(v->in, 0, tokens * HIDDEN * 4);
	v->q = (struct moe_request){ .layer = D.m.layers[0], .dtype = MOE_F32, .tokens = tokens,
				     .input = v->in, .output = v->out, .ids = v->ids, .weights = v->w,
				     .user_data = 1 };
}

START_TEST(submit_refuses_a_tensor_outside_the_arena)
{
	struct moe_client_options opt = { .arena_bytes = 64 << 10 };
	struct moe_client *c = client_open(&opt);
	float *heap = calloc(HIDDEN, sizeof(float));
	uint8_t *arena;
	struct moe_request ok, q;

	/* the whole arena in one piece: its first byte and its end are known */
	ck_assert_int_eq(moe_client_alloc(c, 64 << 10, (void **)&arena), 0);
	memset(arena, 0, 64 << 10);
	ok = (struct moe_request){ .layer = D.m.layers[0], .dtype = MOE_F32, .tokens = 1, .input = arena,
				   .output = arena + 1024, .ids = (int32_t *)(arena + 2048),
				   .weights = (float *)(arena + 2112), .user_data = 1 };
	q = ok;
	q.input = heap;
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.input = NULL;
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.output = heap;
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.output = arena + (64 << 10) - 64;          /* starts inside, ends past the arena */
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.output = arena + (64 << 10);               /* just past it */
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.ids = (int32_t *)heap;
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	q = ok;
	q.weights = heap;
	ck_assert_int_eq(moe_client_submit(c, &q), -EFAULT);
	free(heap);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(submit_refuses_0_tokens_or_more_than_max_tokens)
{
	struct moe_client *c = client_open(NULL);
	struct moe_model_info in;
	struct valid_req v;

	ck_assert_int_eq(moe_client_info(c, &in), 0);
	valid_req_make(c, &v, 1);
	v.q.tokens = 0;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -E2BIG);
	v.q.tokens = (uint64_t)in.max_tokens + 1;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -E2BIG);
	v.q.tokens = UINT64_MAX;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -E2BIG);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(submit_refuses_a_layer_that_is_not_moe)
{
	struct moe_client *c = client_open(NULL);
	struct valid_req v;

	valid_req_make(c, &v, 1);
	v.q.layer = DENSE_LAYER;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -MOE_E_LAYER);
	ck_assert_str_eq(moe_strerror(-MOE_E_LAYER), "Not an MoE layer of the served model");
	v.q.layer = 1000;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -MOE_E_LAYER);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(submit_refuses_a_bad_dtype_weights_without_ids_and_the_top_bit)
{
	struct moe_client *c = client_open(NULL);
	struct valid_req v;
	struct moe_request q;

	valid_req_make(c, &v, 1);
	q = v.q;
	q.dtype = 2;
	ck_assert_int_eq(moe_client_submit(c, &q), -EINVAL);
	q = v.q;
	q.ids = NULL;
	ck_assert_int_eq(moe_client_submit(c, &q), -EINVAL);       /* weights without ids */
	q = v.q;
	q.weights = NULL;
	ck_assert_int_eq(moe_client_submit(c, &q), -EINVAL);       /* ids without weights */
	q = v.q;
	q.user_data = 1ull << 63;
	ck_assert_int_eq(moe_client_submit(c, &q), -EINVAL);       /* moe_client_forward's */
	ck_assert_int_eq(moe_client_submit(c, NULL), -EINVAL);
	ck_assert_int_eq(moe_client_submit(NULL, &q), -EINVAL);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(submit_returns_eagain_when_the_ring_is_full)
{
	struct moe_client_options opt = { .sq_entries = 4 };
	struct moe_client *c = client_open(&opt);
	struct moe_completion cqe;
	struct valid_req v;
	uint32_t seen = 0;

	valid_req_make(c, &v, 1);
	daemon_freeze();                 /* nothing is taken from the ring now */
	for (uint64_t i = 0; i < 4; i++) {
		v.q.user_data = 100 + i;
		ck_assert_int_eq(moe_client_submit(c, &v.q), 0);
	}
	v.q.user_data = 104;
	ck_assert_int_eq(moe_client_submit(c, &v.q), -EAGAIN);
	ck_assert_int_eq(moe_client_submit(c, &v.q), -EAGAIN);
	daemon_thaw();
	/* the four, each once (all write the same output: same input, same bits) */
	for (int i = 0; i < 4; i++) {
		ck_assert_int_eq(moe_client_wait(c, &cqe, 5000), 0);
		ck_assert_msg(cqe.user_data >= 100 && cqe.user_data < 104, "user_data %" PRIu64, cqe.user_data);
		ck_assert_msg(!(seen & (1u << (cqe.user_data - 100))), "user_data %" PRIu64 " twice", cqe.user_data);
		seen |= 1u << (cqe.user_data - 100);
		ck_assert_int_eq(cqe.res, 0);
	}
	ck_assert_int_eq(moe_client_wait(c, &cqe, 0), -EAGAIN);
	ck_assert_int_eq(moe_client_submit(c, &v.q), 0);           /* room again */
	ck_assert_int_eq(moe_client_wait(c, &cqe, 5000), 0);
	ck_assert_uint_eq(cqe.user_data, 104);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ wait */

START_TEST(wait_with_timeout_0_is_eagain)
{
	struct moe_client *c = client_open(NULL);
	struct moe_completion cqe;
	uint64_t t0 = now_ns();

	ck_assert_int_eq(moe_client_wait(c, &cqe, 0), -EAGAIN);
	ck_assert_uint_lt(now_ns() - t0, 50000000u);
	ck_assert_int_eq(moe_client_wait(c, NULL, 0), -EINVAL);
	ck_assert_int_eq(moe_client_wait(NULL, &cqe, 0), -EINVAL);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(wait_with_a_timeout_is_etimedout_after_it)
{
	struct moe_client *c = client_open(NULL);
	struct moe_completion cqe;
	uint64_t t0 = now_ns(), ms;

	ck_assert_int_eq(moe_client_wait(c, &cqe, 50), -ETIMEDOUT);
	ms = (now_ns() - t0) / 1000000u;
	ck_assert_msg(ms >= 50 && ms < 300, "a 50 ms wait took %" PRIu64 " ms", ms);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ results */

/* _i: bit 0 bfloat16, bit 1 routing. */
START_TEST(forward_gives_the_engines_bits)
{
	const uint32_t dtype = _i & 1 ? MOE_BF16 : MOE_F32;
	const bool routing = _i & 2;
	enum { T = 37 };
	const size_t es = dtype_size(dtype), n = T * HIDDEN;
	struct moe_client *c = client_open(NULL);
	struct moe_engine *e = engine_open();
	void *x = random_input(dtype, n, 1000 + (uint64_t)_i);
	void *got = malloc(n * es), *want = malloc(n * es);
	int32_t gids[T * TOP_K], wids[T * TOP_K];
	float gw[T * TOP_K], ww[T * TOP_K];

	ck_assert(got && want);
	for (uint32_t l = 0; l < D.m.nl; l++) {
		int r = moe_client_forward(c, D.m.layers[l], dtype, x, got, T, routing ? gids : NULL,
					   routing ? gw : NULL);

		ck_assert_msg(r == 0, "forward: %s", moe_strerror(r));
		engine_forward(e, D.m.layers[l], dtype, x, T, want, wids, ww);
		assert_same("output", got, want, n, es);
		if (routing) {
			assert_same("ids", gids, wids, T * TOP_K, sizeof(int32_t));
			assert_same("weights", gw, ww, T * TOP_K, sizeof(float));
		}
	}
	/* ids alone, without weights */
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], dtype, x, got, T, gids, NULL), 0);
	engine_forward(e, D.m.layers[0], dtype, x, T, want, wids, ww);
	assert_same("ids", gids, wids, T * TOP_K, sizeof(int32_t));
	moe_engine_close(e);
	free(x);
	free(got);
	free(want);
	moe_client_disconnect(c);
}
END_TEST

/* _i: bit 0 bfloat16, bit 1 routing. */
START_TEST(submit_and_wait_give_the_engines_bits)
{
	const uint32_t dtype = _i & 1 ? MOE_BF16 : MOE_F32;
	const bool routing = _i & 2;
	enum { T = 29 };
	const size_t es = dtype_size(dtype), n = T * HIDDEN;
	struct moe_client *c = client_open(NULL);
	struct moe_engine *e = engine_open();
	void *x = random_input(dtype, n, 2000 + (uint64_t)_i), *want = malloc(n * es);
	int32_t wids[T * TOP_K];
	float ww[T * TOP_K];
	struct moe_completion cqe;
	struct moe_request q = { .layer = D.m.layers[1], .dtype = dtype, .tokens = T, .user_data = 42 };
	void *in, *out;

	ck_assert_ptr_nonnull(want);
	ck_assert_int_eq(moe_client_alloc(c, n * es, &in), 0);
	ck_assert_int_eq(moe_client_alloc(c, n * es, &out), 0);
	memcpy(in, x, n * es);
	q.input = in;
	q.output = out;
	if (routing) {
		ck_assert_int_eq(moe_client_alloc(c, T * TOP_K * 4, (void **)&q.ids), 0);
		ck_assert_int_eq(moe_client_alloc(c, T * TOP_K * 4, (void **)&q.weights), 0);
	}
	ck_assert_int_eq(moe_client_submit(c, &q), 0);
	ck_assert_int_eq(moe_client_wait(c, &cqe, 5000), 0);
	ck_assert_uint_eq(cqe.user_data, 42);
	ck_assert_msg(cqe.res == 0, "request failed: %s", moe_strerror(cqe.res));
	engine_forward(e, D.m.layers[1], dtype, x, T, want, wids, ww);
	assert_same("output", out, want, n, es);
	if (routing) {
		assert_same("ids", q.ids, wids, T * TOP_K, sizeof(int32_t));
		assert_same("weights", q.weights, ww, T * TOP_K, sizeof(float));
	}
	ck_assert_int_eq(moe_client_wait(c, &cqe, 0), -EAGAIN);   /* delivered once */
	/* in place: the output over the input */
	memcpy(in, x, n * es);
	q.output = in;
	q.user_data = 43;
	ck_assert_int_eq(moe_client_submit(c, &q), 0);
	ck_assert_int_eq(moe_client_wait(c, &cqe, 5000), 0);
	ck_assert_uint_eq(cqe.user_data, 43);
	ck_assert_int_eq(cqe.res, 0);
	assert_same("output in place", in, want, n, es);
	moe_engine_close(e);
	free(x);
	free(want);
	moe_client_disconnect(c);
}
END_TEST

/* moe_client_forward of @T tokens (f32 and bf16, with routing) gives the
 * engine's bits on @c. */
static void forward_matches(struct moe_client *c, uint64_t T, uint64_t seed)
{
	struct moe_engine *e = engine_open();

	for (uint32_t dtype = MOE_F32; dtype <= MOE_BF16; dtype++) {
		const size_t es = dtype_size(dtype), n = T * HIDDEN;
		void *x = random_input(dtype, n, seed + dtype), *got = malloc(n * es), *want = malloc(n * es);
		int32_t *gids = malloc(T * TOP_K * 4), *wids = malloc(T * TOP_K * 4);
		float *gw = malloc(T * TOP_K * 4), *ww = malloc(T * TOP_K * 4);
		int r;

		ck_assert(got && want && gids && wids && gw && ww);
		r = moe_client_forward(c, D.m.layers[0], dtype, x, got, T, gids, gw);
		ck_assert_msg(r == 0, "forward of %" PRIu64 " tokens: %s", T, moe_strerror(r));
		engine_forward(e, D.m.layers[0], dtype, x, T, want, wids, ww);
		assert_same("output", got, want, n, es);
		assert_same("ids", gids, wids, T * TOP_K, sizeof(int32_t));
		assert_same("weights", gw, ww, T * TOP_K, sizeof(float));
		free(x);
		free(got);
		free(want);
		free(gids);
		free(wids);
		free(gw);
		free(ww);
	}
	moe_engine_close(e);
}

START_TEST(forward_splits_a_batch_above_max_tokens)
{
	struct moe_client *c;
	struct moe_model_info in;
	struct valid_req v;

	daemon_restart("limits = { max_tokens_per_request = 16; };\nbatch = { max_tokens = 16; };");
	c = client_open(NULL);
	ck_assert_int_eq(moe_client_info(c, &in), 0);
	ck_assert_uint_eq(in.max_tokens, 16);
	valid_req_make(c, &v, 17);
	ck_assert_int_eq(moe_client_submit(c, &v.q), -E2BIG);
	forward_matches(c, 100, 3000);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(forward_splits_a_batch_above_half_the_arena)
{
	struct moe_client_options opt = { .arena_bytes = 64 << 10 };
	struct moe_client *c = client_open(&opt);
	struct moe_model_info in;

	ck_assert_int_eq(moe_client_info(c, &in), 0);
	ck_assert_uint_eq(in.arena_bytes, 64 << 10);
	/* 100 tokens of 800 bytes in and out: more than the whole arena */
	forward_matches(c, 100, 4000);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(forward_refuses_what_submit_refuses)
{
	struct moe_client *c = client_open(NULL);
	float x[HIDDEN] = { 0 }, y[HIDDEN];
	int32_t ids[TOP_K];
	float w[TOP_K];

	ck_assert_int_eq(moe_client_forward(c, DENSE_LAYER, MOE_F32, x, y, 1, NULL, NULL), -MOE_E_LAYER);
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], 2, x, y, 1, NULL, NULL), -EINVAL);
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], MOE_F32, x, y, 1, NULL, w), -EINVAL);
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], MOE_F32, NULL, y, 1, NULL, NULL), -EINVAL);
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], MOE_F32, x, NULL, 1, NULL, NULL), -EINVAL);
	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], MOE_F32, x, y, 0, NULL, NULL), -EINVAL);
	ck_assert_int_eq(moe_client_forward(NULL, D.m.layers[0], MOE_F32, x, y, 1, ids, w), -EINVAL);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ threads */

#define REF_TOKENS 256u          /* the pool requests take slices of */
#define FWD_THREADS 8
#define FWD_CALLS 24
#define FWD_MAX_TOKENS 48u
#define ASYNC_THREADS 2
#define ASYNC_REQS 40
#define ASYNC_DEPTH 4
#define THREAD_DEADLINE_NS 20000000000ull

/* One request of an async thread; whoever receives its completion checks
 * and frees it (under shared.lock). */
struct areq {
	uint32_t li;
	uint64_t off, tokens;
	void *in, *out;
	int32_t *ids;
	float *w;
	int seen;                    /* completions received */
};

struct shared {
	struct moe_client *c;
	const float *x;                              /* [REF_TOKENS][H] */
	const float *y[2];                           /* the engine's, per MoE layer */
	const int32_t *ids[2];
	const float *w[2];
	pthread_mutex_t lock;
	struct areq areq[ASYNC_THREADS][ASYNC_REQS];
	atomic_int done[ASYNC_THREADS];              /* completions received, per owner */
};

struct worker {
	struct shared *sh;
	int id;
	char error[256];             /* the first thing that went wrong */
};

/* Compare tokens [off, off + n) of layer @li with the reference. */
static bool result_right(const struct shared *sh, uint32_t li, uint64_t off, uint64_t n, const float *out,
			 const int32_t *ids, const float *w)
{
	return !memcmp(out, sh->y[li] + off * HIDDEN, n * HIDDEN * sizeof(float)) &&
	       (!ids || !memcmp(ids, sh->ids[li] + off * TOP_K, n * TOP_K * sizeof(int32_t))) &&
	       (!w || !memcmp(w, sh->w[li] + off * TOP_K, n * TOP_K * sizeof(float)));
}

static void *forward_worker(void *arg)
{
	struct worker *wk = arg;
	const struct shared *sh = wk->sh;
	uint64_t seed = 0x5eed0000u + (uint64_t)wk->id;
	float *out = malloc(FWD_MAX_TOKENS * HIDDEN * sizeof(float));
	int32_t ids[FWD_MAX_TOKENS * TOP_K];
	float w[FWD_MAX_TOKENS * TOP_K];

	for (int i = 0; i < FWD_CALLS && out && !wk->error[0]; i++) {
		uint64_t n = 1 + moe_test_rand(&seed) % FWD_MAX_TOKENS;
		uint64_t off = moe_test_rand(&seed) % (REF_TOKENS - n + 1);
		uint32_t li = (uint32_t)(moe_test_rand(&seed) % D.m.nl);
		bool routing = moe_test_rand(&seed) & 1;
		int r = moe_client_forward(sh->c, D.m.layers[li], MOE_F32, sh->x + off * HIDDEN, out, n,
					   routing ? ids : NULL, routing ? w : NULL);

		if (r < 0)
			snprintf(wk->error, sizeof(wk->error), "forward thread %d, call %d: %s", wk->id, i,
				 moe_strerror(r));
		else if (!result_right(sh, li, off, n, out, routing ? ids : NULL, routing ? w : NULL))
			snprintf(wk->error, sizeof(wk->error),
				 "forward thread %d, call %d: %" PRIu64 " tokens at %" PRIu64 " of layer %u differ",
				 wk->id, i, n, off, D.m.layers[li]);
	}
	if (!out)
		snprintf(wk->error, sizeof(wk->error), "out of memory");
	free(out);
	return NULL;
}

/* A completion from moe_client_wait: any async thread's, never a forward's. */
static void async_receive(struct worker *wk, const struct moe_completion *cqe)
{
	struct shared *sh = wk->sh;
	uint64_t owner = (cqe->user_data >> 32) - 1, j = cqe->user_data & 0xffffffffu;
	struct areq *a;

	if (owner >= ASYNC_THREADS || j >= ASYNC_REQS) {
		snprintf(wk->error, sizeof(wk->error), "async thread %d got user_data 0x%" PRIx64 ", not ours",
			 wk->id, cqe->user_data);
		return;
	}
	pthread_mutex_lock(&sh->lock);
	a = &sh->areq[owner][j];
	if (++a->seen != 1 || !a->in)
		snprintf(wk->error, sizeof(wk->error), "user_data 0x%" PRIx64 " delivered %d times", cqe->user_data,
			 a->seen);
	else if (cqe->res != 0)
		snprintf(wk->error, sizeof(wk->error), "request 0x%" PRIx64 " failed: %s", cqe->user_data,
			 moe_strerror(cqe->res));
	else if (!result_right(sh, a->li, a->off, a->tokens, a->out, a->ids, a->w))
		snprintf(wk->error, sizeof(wk->error), "request 0x%" PRIx64 ": %" PRIu64 " tokens differ",
			 cqe->user_data, a->tokens);
	moe_client_free(sh->c, a->in);
	moe_client_free(sh->c, a->out);
	moe_client_free(sh->c, a->ids);
	moe_client_free(sh->c, a->w);
	pthread_mutex_unlock(&sh->lock);
	atomic_fetch_add(&sh->done[owner], 1);
}

static void *async_worker(void *arg)
{
	struct worker *wk = arg;
	struct shared *sh = wk->sh;
	uint64_t seed = 0xa5c0000u + (uint64_t)wk->id, t0 = now_ns();
	int submitted = 0;

	while (atomic_load(&sh->done[wk->id]) < ASYNC_REQS && !wk->error[0]) {
		struct moe_completion cqe;
		int r;

		if (now_ns() - t0 > THREAD_DEADLINE_NS) {
			snprintf(wk->error, sizeof(wk->error), "async thread %d: %d of %d completions after 20 s",
				 wk->id, atomic_load(&sh->done[wk->id]), ASYNC_REQS);
			break;
		}
		while (submitted < ASYNC_REQS && submitted - atomic_load(&sh->done[wk->id]) < ASYNC_DEPTH) {
			uint64_t n = 1 + moe_test_rand(&seed) % 24;
			struct areq *a = &sh->areq[wk->id][submitted];
			struct moe_request q = { .dtype = MOE_F32, .tokens = n,
						 .user_data = ((uint64_t)(wk->id + 1) << 32) | (uint64_t)submitted };
			bool routing = moe_test_rand(&seed) & 1;

			pthread_mutex_lock(&sh->lock);
			a->li = (uint32_t)(moe_test_rand(&seed) % D.m.nl);
			a->off = moe_test_rand(&seed) % (REF_TOKENS - n + 1);
			a->tokens = n;
			r = moe_client_alloc(sh->c, n * HIDDEN * 4, &a->in);
			if (r == 0)
				r = moe_client_alloc(sh->c, n * HIDDEN * 4, &a->out);
			if (r == 0 && routing)
				r = moe_client_alloc(sh->c, n * TOP_K * 4, (void **)&a->ids);
			if (r == 0 && routing)
				r = moe_client_alloc(sh->c, n * TOP_K * 4, (void **)&a->w);
			if (r == 0) {
				memcpy(a->in, sh->x + a->off * HIDDEN, n * HIDDEN * 4);
				q.layer = D.m.layers[a->li];
				q.input = a->in;
				q.output = a->out;
				q.ids = a->ids;
				q.weights = a->w;
			}
			pthread_mutex_unlock(&sh->lock);
			if (r < 0) {
				snprintf(wk->error, sizeof(wk->error), "alloc: %s", moe_strerror(r));
				break;
			}
			r = moe_client_submit(sh->c, &q);
			if (r == -EAGAIN) {
				/* the ring is full of the others' requests: reap, then again */
				pthread_mutex_lock(&sh->lock);
				moe_client_free(sh->c, a->in);
				moe_client_free(sh->c, a->out);
				moe_client_free(sh->c, a->ids);
				moe_client_free(sh->c, a->w);
				memset(a, 0, sizeof(*a));
				pthread_mutex_unlock(&sh->lock);
				break;
			}
			if (r < 0) {
				snprintf(wk->error, sizeof(wk->error), "submit: %s", moe_strerror(r));
				break;
			}
			submitted++;
		}
		if (wk->error[0])
			break;
		r = moe_client_wait(sh->c, &cqe, 20);
		if (r == 0)
			async_receive(wk, &cqe);
		else if (r != -ETIMEDOUT)
			snprintf(wk->error, sizeof(wk->error), "wait: %s", moe_strerror(r));
	}
	return NULL;
}

START_TEST(ten_threads_share_one_handle)
{
	struct moe_client *c = client_open(NULL);
	struct moe_engine *e = engine_open();
	struct shared *sh = calloc(1, sizeof(*sh));
	struct worker wk[FWD_THREADS + ASYNC_THREADS];
	pthread_t th[FWD_THREADS + ASYNC_THREADS];
	float *x, *y[2], *w[2];
	int32_t *ids[2];
	struct moe_completion cqe;

	ck_assert_ptr_nonnull(sh);
	sh->c = c;
	pthread_mutex_init(&sh->lock, NULL);
	x = random_input(MOE_F32, REF_TOKENS * HIDDEN, 5000);
	sh->x = x;
	for (uint32_t l = 0; l < D.m.nl; l++) {
		y[l] = malloc(REF_TOKENS * HIDDEN * sizeof(float));
		ids[l] = malloc(REF_TOKENS * TOP_K * sizeof(int32_t));
		w[l] = malloc(REF_TOKENS * TOP_K * sizeof(float));
		ck_assert(y[l] && ids[l] && w[l]);
		engine_forward(e, D.m.layers[l], MOE_F32, x, REF_TOKENS, y[l], ids[l], w[l]);
		sh->y[l] = y[l];
		sh->ids[l] = ids[l];
		sh->w[l] = w[l];
	}
	moe_engine_close(e);

	for (int i = 0; i < FWD_THREADS + ASYNC_THREADS; i++) {
		wk[i] = (struct worker){ .sh = sh, .id = i < FWD_THREADS ? i : i - FWD_THREADS };
		ck_assert_int_eq(pthread_create(&th[i], NULL, i < FWD_THREADS ? forward_worker : async_worker,
						&wk[i]), 0);
	}
	for (int i = 0; i < FWD_THREADS + ASYNC_THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < FWD_THREADS + ASYNC_THREADS; i++)
		ck_assert_msg(!wk[i].error[0], "%s", wk[i].error);
	for (int t = 0; t < ASYNC_THREADS; t++)
		for (int j = 0; j < ASYNC_REQS; j++)
			ck_assert_msg(sh->areq[t][j].seen == 1, "request %d of async thread %d: %d completions", j, t,
				      sh->areq[t][j].seen);
	/* nothing left over, and the arena is whole again */
	ck_assert_int_eq(moe_client_wait(c, &cqe, 0), -EAGAIN);
	{
		struct moe_model_info in;
		void *all;

		ck_assert_int_eq(moe_client_info(c, &in), 0);
		ck_assert_int_eq(moe_client_alloc(c, in.arena_bytes, &all), 0);
		ck_assert_int_eq(moe_client_free(c, all), 0);
	}
	for (uint32_t l = 0; l < D.m.nl; l++) {
		free(y[l]);
		free(ids[l]);
		free(w[l]);
	}
	free(x);
	pthread_mutex_destroy(&sh->lock);
	free(sh);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ stats */

START_TEST(stats_is_json_with_clients_and_latency)
{
	struct moe_client *c = client_open(NULL);
	float x[HIDDEN] = { 0 }, y[HIDDEN];
	char *text = NULL;
	json_t *root, *clients, *me = NULL, *lat;
	size_t i;

	ck_assert_int_eq(moe_client_forward(c, D.m.layers[0], MOE_F32, x, y, 1, NULL, NULL), 0);
	ck_assert_int_eq(moe_client_stats(c, &text), 0);
	ck_assert_ptr_nonnull(strstr(text, "\"clients\""));
	ck_assert_ptr_nonnull(strstr(text, "\"latency\""));
	root = json_loads(text, 0, NULL);
	ck_assert_msg(root != NULL, "not JSON: %s", text);
	clients = json_object_get(root, "clients");
	ck_assert(json_is_array(clients));
	json_array_foreach(clients, i, me)
		if (json_integer_value(json_object_get(me, "pid")) == getpid())
			break;
	ck_assert_msg(i < json_array_size(clients), "this process is not among the clients: %s", text);
	ck_assert_int_ge(json_integer_value(json_object_get(me, "requests")), 1);
	lat = json_object_get(root, "latency");
	ck_assert(json_is_object(lat));
	ck_assert_int_ge(json_integer_value(json_object_get(lat, "samples")), 1);
	json_decref(root);
	free(text);
	ck_assert_int_eq(moe_client_stats(c, NULL), -EINVAL);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ moed stops */

static uint64_t stop_sent_ns;

static void *stop_moed_soon(void *arg)
{
	(void)arg;
	usleep(50000);                   /* the main thread is asleep in its wait by then */
	stop_sent_ns = now_ns();          /* read after pthread_join */
	kill(D.moed.pid, SIGTERM);
	return NULL;
}

START_TEST(after_moed_stops_wait_and_submit_fail)
{
	struct moe_client *c = client_open(NULL);
	struct moe_completion cqe;
	struct valid_req v;
	pthread_t th;
	char *text = NULL;
	float x[HIDDEN] = { 0 }, y[HIDDEN];
	uint64_t returned;
	int r, st;

	valid_req_make(c, &v, 1);
	ck_assert_int_eq(pthread_create(&th, NULL, stop_moed_soon, NULL), 0);
	r = moe_client_wait(c, &cqe, -1);
	returned = now_ns();
	pthread_join(th, NULL);
	ck_assert_msg(r == -ESHUTDOWN || r == -ECONNRESET, "wait: %d %s", r, moe_strerror(r));
	ck_assert_msg(returned > stop_sent_ns, "wait returned before moed was told to stop");
	ck_assert_msg(returned - stop_sent_ns < 1000000000u, "wait returned %" PRIu64 " ms after SIGTERM",
		      (returned - stop_sent_ns) / 1000000u);
	st = daemon_reap();
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "moed ended with status 0x%x", st);
	r = moe_client_submit(c, &v.q);
	ck_assert_msg(r == -ESHUTDOWN || r == -ECONNRESET, "submit: %d %s", r, moe_strerror(r));
	r = moe_client_wait(c, &cqe, 0);
	ck_assert_msg(r == -ESHUTDOWN || r == -ECONNRESET, "wait: %d %s", r, moe_strerror(r));
	r = moe_client_forward(c, D.m.layers[0], MOE_F32, x, y, 1, NULL, NULL);
	ck_assert_msg(r == -ESHUTDOWN || r == -ECONNRESET, "forward: %d %s", r, moe_strerror(r));
	/* the control socket is closed: no SIGPIPE, an error */
	r = moe_client_stats(c, &text);
	ck_assert_msg(r == -EPIPE || r == -ECONNRESET, "stats: %d %s", r, moe_strerror(r));
	ck_assert_ptr_null(text);
	moe_client_disconnect(c);
}
END_TEST

START_TEST(requests_in_flight_when_moed_stops_complete_once)
{
	struct moe_client_options opt = { .sq_entries = 4 };
	struct moe_client *c = client_open(&opt);
	struct moe_completion cqe;
	struct valid_req v;
	int seen[3] = { 0 }, r, st;

	valid_req_make(c, &v, 1);
	/* one round trip first: moed's data thread has taken the session in */
	v.q.user_data = 99;
	ck_assert_int_eq(moe_client_submit(c, &v.q), 0);
	ck_assert_int_eq(moe_client_wait(c, &cqe, 5000), 0);
	daemon_freeze();
	for (uint64_t i = 0; i < 3; i++) {
		v.q.user_data = i;
		ck_assert_int_eq(moe_client_submit(c, &v.q), 0);
	}
	kill(D.moed.pid, SIGTERM);
	daemon_thaw();
	st = daemon_reap();
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "moed ended with status 0x%x", st);
	/* run before the stop (0) or refused by it (-ESHUTDOWN): each once, then the end */
	while ((r = moe_client_wait(c, &cqe, -1)) == 0) {
		ck_assert_uint_lt(cqe.user_data, 3);
		ck_assert_msg(cqe.res == 0 || cqe.res == -ESHUTDOWN, "request %" PRIu64 ": %s", cqe.user_data,
			      moe_strerror(cqe.res));
		ck_assert_int_eq(seen[cqe.user_data]++, 0);
	}
	ck_assert_msg(r == -ESHUTDOWN || r == -ECONNRESET, "wait: %d %s", r, moe_strerror(r));
	for (int i = 0; i < 3; i++)
		ck_assert_msg(seen[i] == 1, "request %d: %d completions", i, seen[i]);
	moe_client_disconnect(c);
}
END_TEST

/* ------------------------------------------------------------------ the example */

START_TEST(the_example_program_runs_against_moed)
{
	const char *top = getenv("top_builddir");
	char prog[PATH_MAX], out[PATH_MAX];
	char *text;
	int r;

	snprintf(prog, sizeof(prog), "%s/examples/moe_forward_example", top && *top ? top : "..");
	snprintf(out, sizeof(out), "%s/example.out", D.m.dir);
	r = moe_test_sh(out, "MOED_SOCKET='%s' '%s'", D.moed.sock, prog);
	text = moe_test_slurp(out, NULL);
	ck_assert_msg(r == 0, "%s exited %d:\n%s", prog, r, text ? text : "");
	ck_assert_msg(text && strstr(text, "deepseek_v3"), "the example did not print the model:\n%s",
		      text ? text : "");
	free(text);

	/* without a daemon it names the socket it tried and what to do */
	r = moe_test_sh(out, "MOED_SOCKET='%s/none.sock' '%s' 2>&1", D.m.dir, prog);
	text = moe_test_slurp(out, NULL);
	ck_assert_msg(r != 0, "%s exited 0 without a daemon:\n%s", prog, text ? text : "");
	ck_assert_msg(text && strstr(text, "none.sock") && strstr(text, "moed.socket"),
		      "the example's connect error names neither the socket nor the fix:\n%s",
		      text ? text : "");
	free(text);
}
END_TEST

/* ------------------------------------------------------------------ regressions */

/*
 * Bugs of libmoeclient this suite found: forward spinning on a ring full of
 * unreaped completions, threads of one handle failing with -ENOMEM on a
 * shared arena, and a refused connect reported as -EPIPE.
 */

struct forward_call {
	struct moe_client *c;
	uint64_t tokens;
	const float *x;
	float *y;
	int ret;
	pthread_barrier_t *start;    /* may be NULL */
};

static void *forward_call_run(void *arg)
{
	struct forward_call *f = arg;

	if (f->start)
		pthread_barrier_wait(f->start);
	f->ret = moe_client_forward(f->c, D.m.layers[0], MOE_F32, f->x, f->y, f->tokens, NULL, NULL);
	return NULL;
}

/* moe_client_forward() retries a full submission ring without reaping the
 * completion ring: with both full of unreaped completions it spins forever. */
START_TEST(forward_makes_room_in_rings_full_of_unreaped_completions)
{
	struct moe_client_options opt = { .sq_entries = 2 };
	struct moe_client *c = client_open(&opt);
	float x[HIDDEN] = { 0 }, y[HIDDEN];
	struct forward_call f = { .c = c, .tokens = 1, .x = x, .y = y, .ret = 1 };
	struct valid_req v;
	struct timespec deadline;
	pthread_t th;
	int queued = 0, r;

	valid_req_make(c, &v, 1);
	/* moed takes requests while their completions have room (2 x 2), then
	 * the submission ring fills (2): 6 in all, none reaped */
	for (int ms = 0; queued < 6 && ms < 5000;) {
		r = moe_client_submit(c, &v.q);
		if (r == 0) {
			queued++;
		} else {
			ck_assert_int_eq(r, -EAGAIN);
			usleep(1000);
			ms++;
		}
	}
	ck_assert_int_eq(queued, 6);
	ck_assert_int_eq(pthread_create(&th, NULL, forward_call_run, &f), 0);
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 5;
	ck_assert_msg(pthread_timedjoin_np(th, NULL, &deadline) == 0,
		      "moe_client_forward still spins on a full ring after 5 s");
	ck_assert_int_eq(f.ret, 0);
	moe_client_disconnect(c);
}
END_TEST

/* Concurrent moe_client_forward() calls on one handle each take half the
 * arena for a piece; the third gets -ENOMEM instead of a smaller piece or
 * a wait. */
START_TEST(concurrent_forwards_share_a_small_arena)
{
	struct moe_client_options opt = { .arena_bytes = 1 << 20 };
	struct moe_client *c = client_open(&opt);
	struct moe_engine *e = engine_open();
	enum { THREADS = 4, TOKENS = 1000 };
	float *x = random_input(MOE_F32, TOKENS * HIDDEN, 6000);
	float *want = malloc(TOKENS * HIDDEN * sizeof(float));
	struct forward_call f[THREADS];
	pthread_t th[THREADS];
	pthread_barrier_t start;

	ck_assert_ptr_nonnull(want);
	engine_forward(e, D.m.layers[0], MOE_F32, x, TOKENS, want, NULL, NULL);
	moe_engine_close(e);
	pthread_barrier_init(&start, NULL, THREADS);
	for (int i = 0; i < THREADS; i++) {
		f[i] = (struct forward_call){ .c = c, .tokens = TOKENS, .x = x, .start = &start,
					      .y = malloc(TOKENS * HIDDEN * sizeof(float)) };
		ck_assert_ptr_nonnull(f[i].y);
		ck_assert_int_eq(pthread_create(&th[i], NULL, forward_call_run, &f[i]), 0);
	}
	for (int i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < THREADS; i++) {
		ck_assert_msg(f[i].ret == 0, "thread %d: %s", i, moe_strerror(f[i].ret));
		assert_same("output", f[i].y, want, (size_t)TOKENS * HIDDEN, sizeof(float));
		free(f[i].y);
	}
	pthread_barrier_destroy(&start);
	free(x);
	free(want);
	moe_client_disconnect(c);
}
END_TEST

/* moed refuses a user that access.uids/access.gids leave out by sending its
 * WELCOME and closing the socket at once, before it reads the HELLO; the
 * library's send of the HELLO then fails with -EPIPE and it returns that,
 * never reading the -EACCES waiting in its socket. */
START_TEST(connect_refused_by_the_access_lists_is_eacces)
{
	pid_t pid;
	int st;

	daemon_restart("access = { uids = [ 4242 ]; gids = [ 4242 ]; };");
	ck_assert_int_eq(chmod(D.m.dir, 0755), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		int wrong = 0;

		/* root is always let in: be somebody else */
		if (getuid() == 0 && (setgroups(0, NULL) < 0 || setgid(65534) < 0 || setuid(65534) < 0))
			_exit(100);
		for (int i = 0; i < 20; i++) {
			struct moe_client *c = NULL;
			int r = moe_client_connect(D.moed.sock, NULL, &c);

			wrong += r != -EACCES;
			if (r == 0)
				moe_client_disconnect(c);
		}
		_exit(wrong);
	}
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) != 100, "cannot change to uid 65534");
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%d of 20 refused connections were not -EACCES",
		      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("client");
	TCase *tc;

	tc = tcase_create("connect");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_test(tc, connect_to_a_missing_socket_is_enoent);
	tcase_add_test(tc, connect_to_a_path_that_is_not_a_socket_is_refused);
	tcase_add_test(tc, connect_with_a_null_path_uses_moed_socket);
	tcase_add_test(tc, connect_with_a_path_too_long_is_enametoolong);
	tcase_add_test(tc, connect_with_options_moed_refuses_fails);
	tcase_add_test(tc, info_matches_the_store);
	suite_add_tcase(s, tc);

	tc = tcase_create("arena");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_test(tc, alloc_is_64_byte_aligned_and_never_overlaps);
	tcase_add_test(tc, alloc_fills_the_arena_and_free_merges_it_back);
	tcase_add_test(tc, free_refuses_a_pointer_it_did_not_give);
	suite_add_tcase(s, tc);

	tc = tcase_create("submit");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_test(tc, submit_refuses_a_tensor_outside_the_arena);
	tcase_add_test(tc, submit_refuses_0_tokens_or_more_than_max_tokens);
	tcase_add_test(tc, submit_refuses_a_layer_that_is_not_moe);
	tcase_add_test(tc, submit_refuses_a_bad_dtype_weights_without_ids_and_the_top_bit);
	tcase_add_test(tc, submit_returns_eagain_when_the_ring_is_full);
	tcase_add_test(tc, wait_with_timeout_0_is_eagain);
	tcase_add_test(tc, wait_with_a_timeout_is_etimedout_after_it);
	suite_add_tcase(s, tc);

	tc = tcase_create("results");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_loop_test(tc, forward_gives_the_engines_bits, 0, 4);
	tcase_add_loop_test(tc, submit_and_wait_give_the_engines_bits, 0, 4);
	tcase_add_test(tc, forward_splits_a_batch_above_max_tokens);
	tcase_add_test(tc, forward_splits_a_batch_above_half_the_arena);
	tcase_add_test(tc, forward_refuses_what_submit_refuses);
	suite_add_tcase(s, tc);

	/* a deadlock shows as this timeout */
	tc = tcase_create("threads");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, ten_threads_share_one_handle);
	suite_add_tcase(s, tc);

	tc = tcase_create("daemon");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_test(tc, stats_is_json_with_clients_and_latency);
	tcase_add_test(tc, after_moed_stops_wait_and_submit_fail);
	tcase_add_test(tc, requests_in_flight_when_moed_stops_complete_once);
	tcase_add_test(tc, the_example_program_runs_against_moed);
	suite_add_tcase(s, tc);

	/* the bugs this suite found in the library, fixed since */
	tc = tcase_create("regressions");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 20);
	tcase_add_test(tc, forward_makes_room_in_rings_full_of_unreaped_completions);
	tcase_add_test(tc, concurrent_forwards_share_a_small_arena);
	tcase_add_test(tc, connect_refused_by_the_access_lists_is_eacces);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "client");
}
