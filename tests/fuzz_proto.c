/* SPDX-License-Identifier: MIT */
/*
 * A fuzzer for what moed reads from clients it does not trust: the HELLO
 * (and whatever else comes down the control socket) and the descriptors
 * in a session's submission ring.  The daemon's parser (daemon/session.c)
 * and validate() (daemon/dataplane.c) are static, so this drives a real
 * moed through its socket and a real segment, as a hostile client would:
 *
 *  1. HELLO mutants, each on a new connection: random bytes and lengths,
 *     a good HELLO with its magic, type, length, version, sizes or
 *     reserved words changed, bit flips, garbage after it, cut short, two
 *     messages in one, sent in random pieces.  moed must answer or close
 *     every one of them within 2 s of the client's half-close.
 *  2. Descriptor batches in one session's ring: random words, and good
 *     descriptors with fields replaced by edge values; now and then the
 *     arena filled with garbage (NaN, Inf) or a ring index corrupted (moed
 *     must then end the session).  Every descriptor gets exactly one
 *     completion; those that the contract (proto.h, moe_client_submit())
 *     refuses fail, the others succeed.
 *
 * Throughout, moed must stay alive, and a well-formed client
 * (libmoeclient) gets the bits of the engine run in this process.
 *
 * In make check: a fixed seed, MOE_FUZZ_ITERS iterations of each phase
 * (default 1000) or MOE_FUZZ_SECONDS seconds in all (default 4), whichever
 * ends first; MOE_FUZZ_SEED changes the seed.  Exit 0 pass, 1 fail.
 *
 * libFuzzer: the same file with -DMOE_LIBFUZZER defines
 * LLVMFuzzerTestOneInput() instead of main(), without the engine (the
 * model is made beforehand; liveness and a NOP round trip are the checks).
 * Its input's first byte picks the target (moed is another process: the
 * fuzzer sees no coverage inside it, so half the inputs start from a good
 * message): 0, the rest is sent as a new connection's first bytes; 1, the
 * rest goes into the ring as descriptors (64 bytes each, at most a ring);
 * 2 and 3, the same with the rest XORed onto a good HELLO or good
 * descriptors (an input of zeros is a good one).  The tree builds it as
 * fuzz/fuzz_proto when configure finds clang's fuzzer runtime, and
 * fuzz/run.sh runs it in make check and make fuzz (fuzz/README.md).  Build
 * moed with --enable-asan so that a memory error in moed ends it.  By hand:
 *
 *   B=/path/to/build S=/path/to/source
 *   clang -g -O1 -fsanitize=fuzzer,address -DMOE_LIBFUZZER -I$B -I$S/libmoeclient -I$S/tests \
 *       $S/tests/fuzz_proto.c $S/tests/daemonutil.c -o fuzz_proto_lf
 *   $B/client/moectl gen-model --arch qwen3_moe --layers 2 --hidden 64 \
 *       --moe-intermediate 32 --experts 8 --top-k 2 --vocab 32 -o /tmp/fm
 *   $B/client/moectl pack /tmp/fm -o /tmp/fm.moe
 *   MOED=$B/daemon/moed MOE_FUZZ_STORE=/tmp/fm.moe ./fuzz_proto_lf -max_len=4097 corpus/
 *
 * (clang 14 on Debian 12 has the fuzzer runtime; gcc has none.)
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemonutil.h"
#include "engine/rng.h"
#include "proto/proto.h"

#ifndef MOE_LIBFUZZER
#include "engine/dtype.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "libmoeclient/moeclient.h"
#include "formats/pack.h"
#include "testutil.h"
#endif

#define READY_TIMEOUT_MS 60000   /* moed opens its store and listens (ASan is slow) */
#define CLOSE_TIMEOUT_MS 2000    /* moed answers or drops a connection after its EOF */
#define WAIT_MS 20000            /* a batch's completions */
#define ARENA_BYTES (1u << 20)   /* the fuzzed session's arena: bounds the work of a good descriptor */
#define SQ_MAX_FUZZ 64u          /* the fuzzed session's ring */

/* ------------------------------------------------------------------ basics */

/* splitmix64: the same sequence everywhere for a seed */
static uint64_t rnd(uint64_t *s)
{
	return moe_splitmix64(s);
}

static uint32_t below(uint64_t *s, uint64_t n)
{
	return (uint32_t)(rnd(s) % n);
}

/* ------------------------------------------------------------------ moed */

static struct moe_test_moed daemon_;   /* the one moed of this process */

static void kill_moed(void)
{
	moe_test_moed_kill(&daemon_);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FAIL: fuzz_proto: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	moe_test_moed_dump_log(&daemon_, 6144);
	kill_moed();
#ifdef MOE_LIBFUZZER
	abort();                /* libFuzzer keeps the input */
#else
	exit(1);
#endif
}

static bool moed_alive(void)
{
	int st;

	if (daemon_.pid <= 0)
		return false;
	if (waitpid(daemon_.pid, &st, WNOHANG) == 0)
		return true;
	fprintf(stderr, "moed ended with %s %d\n", WIFEXITED(st) ? "status" : "signal",
		WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
	daemon_.pid = 0;
	return false;
}

static void moed_start(const char *dir, const char *store)
{
	int st = 0, rc;

	/* warnings: one line per dropped client, not two per session */
	rc = moe_test_moed_config(&daemon_, dir, "s.sock", store, NULL,
				  "limits = { segment_mb = 8; };\nlog = { level = \"warning\"; };");
	if (rc == -ENAMETOOLONG)
		fail("socket path under %s is too long", dir);
	if (rc < 0)
		fail("%s: %s", daemon_.conf, strerror(-rc));
	rc = moe_test_moed_start(&daemon_, READY_TIMEOUT_MS, &st);
	atexit(kill_moed);
	if (rc == -ECHILD)
		fail("moed (%s) ended with %s %d before it listened on %s", moe_test_moed_path(),
		     WIFEXITED(st) ? "status" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), daemon_.sock);
	if (rc == -ETIMEDOUT)
		fail("moed did not listen on %s within %d ms", daemon_.sock, READY_TIMEOUT_MS);
	if (rc < 0)
		fail("fork: %s", strerror(-rc));
}

#ifndef MOE_LIBFUZZER
/* SIGTERM: moed must exit 0. */
static void moed_stop(void)
{
	int st = 0;

	if (moe_test_moed_stop(&daemon_, 15000, &st) < 0)
		fail("moed did not exit within 15 s of SIGTERM");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		fail("moed ended with %s %d after SIGTERM, not exit 0", WIFEXITED(st) ? "status" : "signal",
		     WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}
#endif

/* ------------------------------------------------------------------ the socket */

/* Read until EOF within @timeout_ms, closing any passed descriptor:
 * true if the peer closed. */
static bool drain_until_eof(int fd, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;

	for (;;) {
		union {
			char b[CMSG_SPACE(4 * sizeof(int))];
			struct cmsghdr align;
		} u;
		char buf[8192];
		struct iovec iov = { buf, sizeof(buf) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
		struct pollfd pf = { fd, POLLIN, 0 };
		int64_t left = (int64_t)(end - moe_test_now_ms());
		ssize_t n;

		if (poll(&pf, 1, left > 0 ? (int)left : 0) <= 0)
			return false;
		n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		for (struct cmsghdr *cm = n >= 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm; cm = CMSG_NXTHDR(&mh, cm))
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				int fds[4];

				memcpy(fds, CMSG_DATA(cm), (k < 4 ? k : 4) * sizeof(int));
				for (size_t i = 0; i < k && i < 4; i++)
					close(fds[i]);
			}
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return true;
	}
}

/*
 * @len bytes as a new connection's first words, in pieces cut by @rng (or
 * whole without one), then the client's half-close: moed must answer and
 * close, or just close, within CLOSE_TIMEOUT_MS.
 */
static void hello_probe(const uint8_t *bytes, size_t len, uint64_t *rng, const char *what)
{
	int fd = moe_test_dial(daemon_.sock);

	if (fd < 0)
		fail("%s: connect: %s", what, strerror(-fd));
	for (size_t off = 0; off < len;) {
		size_t n = rng && below(rng, 3) == 0 ? 1 + below(rng, len - off) : len - off;

		if (moe_test_send_all(fd, bytes + off, n) < 0)
			break;          /* moed closed already: fine */
		off += n;
	}
	shutdown(fd, SHUT_WR);
	if (!drain_until_eof(fd, CLOSE_TIMEOUT_MS)) {
		char hex[3 * 96 + 1] = "";

		for (size_t i = 0; i < len && i < 96; i++)
			snprintf(hex + 3 * i, 4, "%02x ", bytes[i]);
		fail("%s: %zu bytes (%s...), then EOF: moed neither answered nor closed in %d ms", what, len, hex,
		     CLOSE_TIMEOUT_MS);
	}
	close(fd);
}

/* ------------------------------------------------------------------ sessions */

/* A session as libmoeclient makes one, with these sizes: 0, the WELCOME's
 * status, or -errno. */
static int raw_open(struct moe_test_raw *r, uint64_t arena_bytes, uint32_t sq_entries)
{
	struct moe_msg_hello h = { .version = MOE_PROTO_VERSION, .arena_bytes = arena_bytes, .sq_entries = sq_entries };

	return moe_test_raw_open(r, daemon_.sock, &h);
}

static bool is_moe_layer(const struct moe_msg_welcome *w, uint32_t layer)
{
	for (uint32_t i = 0; i < w->num_moe_layers && i < MOE_INFO_MAX_LAYERS; i++)
		if (w->moe_layers[i] == layer)
			return true;
	return false;
}

/* The contract of a descriptor (proto.h, moe_client_submit()): would a
 * daemon that follows it accept @q in session @r? */
static bool sqe_acceptable(const struct moe_test_raw *r, const struct moe_sqe *q)
{
	uint64_t A = r->arena_bytes, es, bytes, rbytes;

	if (q->opcode == MOE_OP_NOP)
		return true;
	if (q->opcode != MOE_OP_FORWARD || (q->flags & ~MOE_SQE_ROUTING) || !is_moe_layer(&r->w, q->layer) ||
	    (q->dtype != MOE_F32 && q->dtype != MOE_BF16) || q->tokens == 0 || q->tokens > r->w.max_tokens)
		return false;
	es = q->dtype == MOE_F32 ? 4 : 2;
	bytes = q->tokens * r->w.hidden_size * es;
	if (q->in_off % es || q->in_off > A || bytes > A - q->in_off || q->out_off % es || q->out_off > A ||
	    bytes > A - q->out_off)
		return false;
	if (!(q->flags & MOE_SQE_ROUTING))
		return true;
	rbytes = q->tokens * r->w.top_k * 4;
	return !(q->ids_off % 4 || q->ids_off > A || rbytes > A - q->ids_off || q->weights_off % 4 ||
		 q->weights_off > A || rbytes > A - q->weights_off);
}

static void sqe_describe(const struct moe_sqe *q, char *buf, size_t len)
{
	snprintf(buf, len, "{opcode %u, flags 0x%x, layer %u, dtype %u, tokens %" PRIu64 ", in_off %" PRIu64
		 ", out_off %" PRIu64 ", ids_off %" PRIu64 ", weights_off %" PRIu64 "}", q->opcode, q->flags, q->layer,
		 q->dtype, q->tokens, q->in_off, q->out_off, q->ids_off, q->weights_off);
}

/* Push @n descriptors (user_data overwritten with @tag + i), reap them all:
 * each exactly once, failing exactly when the contract says so.  Returns
 * how many failed. */
static uint32_t ring_round(struct moe_test_raw *r, struct moe_sqe *q, uint32_t n, uint64_t tag, const char *what)
{
	struct moe_cqe cqes[SQ_MAX_FUZZ];
	bool seen[SQ_MAX_FUZZ] = { false };
	uint32_t got, failed = 0;
	char desc[256];

	for (uint32_t i = 0; i < n; i++)
		q[i].user_data = tag + i;
	moe_test_raw_push(r, q, n);
	got = moe_test_raw_reap(r, cqes, n, WAIT_MS);
	if (got != n)
		fail("%s: %u of %u completions came within %d ms (a request was dropped, or moed is stuck)", what, got,
		     n, WAIT_MS);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t x = cqes[i].user_data - tag;

		if (x >= n || seen[x])
			fail("%s: a completion for user_data 0x%" PRIx64 " that is not due", what, cqes[i].user_data);
		seen[x] = true;
		sqe_describe(&q[x], desc, sizeof(desc));
		if (sqe_acceptable(r, &q[x]) ? cqes[i].res != 0 : cqes[i].res >= 0)
			fail("%s: descriptor %s: res %d, but the contract %s it", what, desc, cqes[i].res,
			     sqe_acceptable(r, &q[x]) ? "accepts" : "refuses");
		failed += cqes[i].res < 0;
	}
	return failed;
}

struct hello_msg {
	struct moe_msg_header h;
	struct moe_msg_hello b;
};

#ifndef MOE_LIBFUZZER

/* ------------------------------------------------------------------ mutants */

static uint64_t edge_value(uint64_t *s, uint64_t arena)
{
	const uint64_t v[] = { 0, 1, 2, 3, 4, 63, 64, 4095, 4096, arena - 4, arena - 1, arena, arena + 4,
			       1u << 20, UINT32_MAX, (uint64_t)UINT32_MAX + 1, INT64_MAX, (uint64_t)INT64_MAX + 1,
			       UINT64_MAX - 4094, UINT64_MAX - 3, UINT64_MAX, 1ull << 40 };

	switch (below(s, 4)) {
	case 0:
		return rnd(s);
	case 1:
		return rnd(s) % (arena + 1);
	default:
		return v[below(s, sizeof(v) / sizeof(v[0]))];
	}
}

/* A HELLO gone wrong in one of ten ways, into @buf (512 bytes); its length. */
static size_t hello_mutant(uint64_t *s, uint8_t *buf, const char **what)
{
	struct hello_msg m = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
			       { .version = MOE_PROTO_VERSION, .arena_bytes = 1u << 20, .sq_entries = 16 } };
	size_t len = sizeof(m);

	switch (below(s, 10)) {
	case 0:
		*what = "random bytes";
		len = below(s, 200);
		for (size_t i = 0; i < len; i++)
			buf[i] = (uint8_t)rnd(s);
		return len;
	case 1:
		*what = "a HELLO of another type";
		m.h.type = below(s, 2) ? below(s, 8) : (uint32_t)rnd(s);
		break;
	case 2:
		*what = "a HELLO with a wrong magic";
		m.h.magic ^= 1u << below(s, 32);
		break;
	case 3:
		*what = "a HELLO of another version";
		m.b.version = (uint32_t)edge_value(s, 4096);
		break;
	case 4:
		*what = "a HELLO with a wrong length";
		m.h.len = (uint32_t)edge_value(s, sizeof(m.b));
		break;
	case 5:
		*what = "a HELLO with odd sizes";
		m.b.arena_bytes = edge_value(s, 1u << 20);
		m.b.sq_entries = (uint32_t)(below(s, 2) ? 1u << below(s, 32) : edge_value(s, 4096));
		m.b.flags = below(s, 4) ? 0 : (uint32_t)rnd(s);
		if (below(s, 4) == 0)
			m.b.reserved[below(s, 9)] = (uint32_t)rnd(s);
		break;
	case 6:
		*what = "a HELLO with flipped bits";
		for (uint32_t n = 1 + below(s, 8); n; n--)
			((uint8_t *)&m)[below(s, sizeof(m))] ^= (uint8_t)(1u << below(s, 8));
		break;
	case 7:
		*what = "a HELLO and garbage";
		memcpy(buf, &m, sizeof(m));
		for (uint32_t n = 1 + below(s, 100); n; n--)
			buf[len++] = (uint8_t)rnd(s);
		return len;
	case 8:
		*what = "a HELLO cut short";
		memcpy(buf, &m, sizeof(m));
		return below(s, sizeof(m));
	default: {
		struct moe_msg_header h2 = { MOE_MSG_MAGIC, 1 + below(s, 4), below(s, 4) ? 0 : below(s, 64), 0 };

		*what = "a HELLO and another message";
		memcpy(buf, &m, sizeof(m));
		memcpy(buf + len, &h2, sizeof(h2));
		len += sizeof(h2);
		for (uint32_t n = below(s, 64); n; n--)
			buf[len++] = (uint8_t)rnd(s);
		return len;
	}
	}
	memcpy(buf, &m, sizeof(m));
	return len;
}

/* A good descriptor for session @r, then maybe spoiled: random words, or
 * 1..4 fields set to edge values. */
static void sqe_mutant(uint64_t *s, const struct moe_test_raw *r, struct moe_sqe *q)
{
	uint64_t A = r->arena_bytes;

	*q = (struct moe_sqe){ .opcode = MOE_OP_FORWARD, .flags = below(s, 2) ? MOE_SQE_ROUTING : 0,
			       .layer = r->w.moe_layers[below(s, r->w.num_moe_layers)], .dtype = below(s, 2),
			       .tokens = 1 + below(s, 8), .in_off = 0, .out_off = A / 2, .ids_off = A / 4,
			       .weights_off = 3 * A / 4 };
	switch (below(s, 8)) {
	case 0:
		for (size_t i = 0; i < sizeof(*q) / 8; i++)
			((uint64_t *)q)[i] = rnd(s);
		break;
	case 1:
		if (below(s, 4) == 0)
			q->opcode = MOE_OP_NOP;
		break;
	default:
		for (uint32_t n = 1 + below(s, 4); n; n--) {
			uint64_t v = edge_value(s, A);

			switch (below(s, 9)) {
			case 0: q->opcode = (uint32_t)(below(s, 2) ? below(s, 4) : v); break;
			case 1: q->flags = (uint32_t)(below(s, 2) ? 1u << below(s, 32) : v); break;
			case 2: q->layer = (uint32_t)(below(s, 2) ? below(s, 64) : v); break;
			case 3: q->dtype = (uint32_t)(below(s, 2) ? below(s, 4) : v); break;
			case 4: q->tokens = below(s, 2) ? r->w.max_tokens + below(s, 3) - 1 : v; break;
			case 5: q->in_off = v; break;
			case 6: q->out_off = v; break;
			case 7: q->ids_off = v; break;
			default: q->weights_off = v; break;
			}
		}
		break;
	}
}

/* ------------------------------------------------------------------ make check */

static struct moe_engine *ref_engine;

static uint64_t env_u64(const char *name, uint64_t def)
{
	const char *v = getenv(name);

	return v && *v ? strtoull(v, NULL, 0) : def;
}

/* A well-formed client gets the bits of the engine in this process. */
static void good_client(uint64_t *s, const char *when)
{
	struct moe_model_info in;
	struct moe_client *c;
	int r = moe_client_connect(daemon_.sock, NULL, &c);

	if (r < 0)
		fail("%s: a well-formed client cannot connect: %s", when, moe_strerror(r));
	moe_client_info(c, &in);
	for (int n = 0; n < 2; n++) {
		uint32_t layer = in.moe_layers[below(s, in.num_moe_layers)], dtype = below(s, 2);
		uint64_t T = 1 + below(s, 24), N = T * in.hidden_size, K = T * in.top_k;
		size_t es = dtype == MOE_F32 ? 4 : 2;
		float *x = malloc(N * 4), *y = malloc(N * 4), *w = malloc(K * 4), *rw = malloc(K * 4);
		int32_t *ids = malloc(K * 4), *rids = malloc(K * 4);
		uint8_t *xin = malloc(N * es), *out = malloc(N * es), *want = malloc(N * es);
		struct moe_err err = { 0 };

		if (!x || !y || !w || !rw || !ids || !rids || !xin || !out || !want)
			fail("out of memory");
		for (uint64_t i = 0; i < N; i++) {
			float v = (float)((double)(rnd(s) >> 11) * (4.0 / 9007199254740992.0) - 2.0);

			if (dtype == MOE_F32)
				((float *)xin)[i] = v;
			else
				((uint16_t *)xin)[i] = moe_f32_to_bf16(v);
			x[i] = dtype == MOE_F32 ? v : moe_bf16_to_f32(((uint16_t *)xin)[i]);
		}
		r = moe_engine_forward(ref_engine, layer, x, T, y, rids, rw, 0, &err);
		if (r < 0)
			fail("in-process forward: %s", err.msg);
		for (uint64_t i = 0; i < N; i++)
			if (dtype == MOE_F32)
				((float *)want)[i] = y[i];
			else
				((uint16_t *)want)[i] = moe_f32_to_bf16(y[i]);
		r = moe_client_forward(c, layer, dtype, xin, out, T, ids, w);
		if (r < 0)
			fail("%s: a well-formed request (layer %u, %" PRIu64 " tokens, %s) failed: %s", when, layer, T,
			     dtype ? "bf16" : "f32", moe_strerror(r));
		if (memcmp(out, want, N * es) || memcmp(ids, rids, K * 4) || memcmp(w, rw, K * 4))
			fail("%s: a well-formed request (layer %u, %" PRIu64 " tokens, %s) got other bits than the "
			     "engine in-process (output %s, ids %s, weights %s)", when, layer, T, dtype ? "bf16" : "f32",
			     memcmp(out, want, N * es) ? "differ" : "same", memcmp(ids, rids, K * 4) ? "differ" : "same",
			     memcmp(w, rw, K * 4) ? "differ" : "same");
		free(x);
		free(y);
		free(w);
		free(rw);
		free(ids);
		free(rids);
		free(xin);
		free(out);
		free(want);
	}
	moe_client_disconnect(c);
	if (!moed_alive())
		fail("%s: moed died", when);
}

static void model_make(struct moe_test_model *m)
{
	struct moe_gen_options opt;
	char why[512];

	moe_test_gen_small(MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, &opt);
	opt.hidden_size = 128;
	opt.moe_intermediate_size = 32;
	opt.num_experts = 16;
	opt.top_k = 4;
	opt.num_layers = 3;
	opt.vocab_size = 32;
	opt.seed = 31337;
	if (moe_test_model_make(m, "fuzz", &opt, NULL, why, sizeof(why)) < 0)
		fail("%s", why);
}

int main(void)
{
	/* one stream per phase: each phase's inputs depend on the seed alone */
	uint64_t seed = env_u64("MOE_FUZZ_SEED", 0xf0220001u), s = seed, sr = seed ^ 0x5a5a5a5a5a5a5a5aull;
	uint64_t sg = ~seed;
	uint64_t iters = env_u64("MOE_FUZZ_ITERS", 1000), budget_ms = env_u64("MOE_FUZZ_SECONDS", 4) * 1000;
	uint64_t t0 = moe_test_now_ms(), tag = 0x10000;
	uint64_t hellos = 0, batches = 0, sqes = 0, refused = 0, ended = 0, garbage = 0;
	uint64_t slow_hello = 0, slow_batch = 0, t1;     /* the slowest answers, ms */
	struct moe_engine_options eo = { .backend = "cpu", .threads = 1 };
	struct moe_err err = { 0 };
	struct moe_test_raw r = { .fd = -1 };
	int silent[8], nsilent = 0;
	struct moe_test_model m;

	model_make(&m);
	moed_start(m.dir, m.store);
	if (moe_engine_open(m.store, &eo, &ref_engine, &err) < 0)   /* no fork() after this */
		fail("engine open: %s", err.msg);
	good_client(&sg, "at the start");

	/* 1: the HELLO */
	for (; hellos < iters && moe_test_now_ms() - t0 < budget_ms / 2; hellos++) {
		uint8_t buf[512];
		const char *what;
		size_t len = hello_mutant(&s, buf, &what);

		if (nsilent < 8 && below(&s, 40) == 0) {
			/* some stay connected, half-way through a message: no one else may wait for them */
			int fd = moe_test_dial(daemon_.sock);

			if (fd < 0)
				fail("connect: %s", strerror(-fd));
			moe_test_send_all(fd, buf, len / 2);
			silent[nsilent++] = fd;
			continue;
		}
		t1 = moe_test_now_ms();
		hello_probe(buf, len, &s, what);
		t1 = moe_test_now_ms() - t1;
		slow_hello = t1 > slow_hello ? t1 : slow_hello;
		if (hellos % 50 == 49)
			good_client(&sg, "among HELLO mutants");
		else if (!moed_alive())
			fail("moed died after %s", what);
	}

	/* 2: descriptors */
	for (; batches < iters && moe_test_now_ms() - t0 < budget_ms; batches++) {
		struct moe_sqe q[SQ_MAX_FUZZ];
		uint32_t n;
		char what[64];

		if (r.fd < 0) {
			int rc = raw_open(&r, ARENA_BYTES, SQ_MAX_FUZZ);

			if (rc < 0)
				fail("a session for descriptors: %d", rc);
		}
		if (below(&sr, 8) == 0) {
			/* hidden states of garbage: NaN, Inf, denormals */
			for (uint64_t i = 0; i + 8 <= r.arena_bytes; i += 8) {
				uint64_t v = rnd(&sr);

				memcpy(r.arena + i, &v, 8);
			}
			garbage++;
		}
		if (below(&sr, 40) == 0) {
			/* a ring index out of bounds: moed must end the session */
			if (below(&sr, 2)) {
				__atomic_store_n(&r.hdr->sq_tail, r.hdr->sq_head + r.sq_entries + 1 + below(&sr, 1u << 30),
						 __ATOMIC_RELEASE);
				moe_test_raw_kick(&r);
			} else {
				struct moe_sqe nop = { .opcode = MOE_OP_NOP };

				__atomic_store_n(&r.hdr->cq_head, r.hdr->cq_tail + r.cq_entries + 1 + below(&sr, 1u << 30),
						 __ATOMIC_RELEASE);
				moe_test_raw_push(&r, &nop, 1);   /* something to make moed look */
			}
			if (!drain_until_eof(r.fd, CLOSE_TIMEOUT_MS))
				fail("a session with ring indices sq %u/%u, cq %u/%u is still served after %d ms",
				     r.hdr->sq_head, r.hdr->sq_tail, r.hdr->cq_head, r.hdr->cq_tail, CLOSE_TIMEOUT_MS);
			moe_test_raw_close(&r);
			ended++;
			continue;
		}
		n = 1 + below(&sr, SQ_MAX_FUZZ);
		for (uint32_t i = 0; i < n; i++)
			sqe_mutant(&sr, &r, &q[i]);
		snprintf(what, sizeof(what), "descriptor batch %" PRIu64, batches);
		t1 = moe_test_now_ms();
		refused += ring_round(&r, q, n, tag, what);
		t1 = moe_test_now_ms() - t1;
		slow_batch = t1 > slow_batch ? t1 : slow_batch;
		tag += 0x10000;
		sqes += n;
		if (batches % 25 == 24)
			good_client(&sg, "among descriptor batches");
		else if (!moed_alive())
			fail("moed died after %s", what);
	}
	moe_test_raw_close(&r);
	for (int i = 0; i < nsilent; i++)
		close(silent[i]);
	good_client(&sg, "at the end");
	moed_stop();
	moe_engine_close(ref_engine);
	printf("fuzz_proto: seed 0x%" PRIx64 ": %" PRIu64 " HELLO mutants, %" PRIu64 " descriptor batches (%" PRIu64
	       " descriptors, %" PRIu64 " refused, %" PRIu64 " with garbage in the arena), %" PRIu64
	       " sessions ended for bad ring indices; slowest answer to a HELLO %" PRIu64 " ms, to a batch %" PRIu64
	       " ms; %.1f s\n", seed, hellos, batches, sqes, refused, garbage, ended, slow_hello, slow_batch,
	       (double)(moe_test_now_ms() - t0) / 1000.0);
	moe_test_model_free(&m);
	return 0;
}

#else /* MOE_LIBFUZZER */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct moe_test_raw lf_session = { .fd = -1 };

static void lf_cleanup(void)
{
	kill_moed();
	unlink(daemon_.conf);
	unlink(daemon_.log);
	unlink(daemon_.sock);
	rmdir(daemon_.dir);
}

/* A NOP and a good forward in a fresh session. */
static void lf_good_client(void)
{
	struct moe_test_raw g;
	struct moe_sqe q[2] = { { .opcode = MOE_OP_NOP } };
	int rc = raw_open(&g, ARENA_BYTES, 16);

	if (rc < 0)
		fail("a well-formed HELLO was refused: %d", rc);
	q[1] = (struct moe_sqe){ .opcode = MOE_OP_FORWARD, .layer = g.w.moe_layers[0], .dtype = MOE_F32,
				 .tokens = 2, .in_off = 0, .out_off = g.arena_bytes / 2 };
	ring_round(&g, q, 2, 1, "a well-formed client");
	moe_test_raw_close(&g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint64_t runs, tag = 0x10000;
	unsigned mode;

	if (!runs++) {
		const char *store = getenv("MOE_FUZZ_STORE");
		static char dir[] = "/tmp/moe-fuzz-XXXXXX";

		if (!store || !*store || !mkdtemp(dir)) {
			fprintf(stderr, "fuzz_proto: set MOE_FUZZ_STORE to a store (see tests/fuzz_proto.c)\n");
			abort();
		}
		moed_start(dir, store);
		atexit(lf_cleanup);     /* after a crash (abort) the directory and its log stay */
	}
	if (size < 1)
		return 0;
	mode = data[0] & 3;
	data++;
	size--;
	if (mode == 0 || mode == 2) {
		uint8_t buf[4096];
		struct hello_msg m = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
				       { .version = MOE_PROTO_VERSION, .arena_bytes = 1u << 20 } };

		if (size > sizeof(buf))
			size = sizeof(buf);
		memset(buf, 0, sizeof(buf));
		if (mode == 2)
			memcpy(buf, &m, sizeof(m));
		for (size_t i = 0; i < size; i++)
			buf[i] ^= data[i];
		hello_probe(buf, mode == 2 && size < sizeof(m) ? sizeof(m) : size, NULL, "the input");
	} else if (size > 0) {
		struct moe_sqe q[SQ_MAX_FUZZ];
		size_t n = (size + sizeof(*q) - 1) / sizeof(*q);

		if (n > SQ_MAX_FUZZ)
			n = SQ_MAX_FUZZ;
		if (lf_session.fd < 0) {
			int rc = raw_open(&lf_session, ARENA_BYTES, SQ_MAX_FUZZ);

			if (rc < 0)
				fail("a session for descriptors: %d", rc);
		}
		for (size_t i = 0; i < n; i++)
			q[i] = mode == 1 ? (struct moe_sqe){ 0 } : (struct moe_sqe){
				.opcode = MOE_OP_FORWARD, .layer = lf_session.w.moe_layers[0], .dtype = MOE_F32,
				.tokens = 1, .in_off = 0, .out_off = ARENA_BYTES / 2, .ids_off = ARENA_BYTES / 4,
				.weights_off = 3 * ARENA_BYTES / 4 };
		for (size_t i = 0; i < size && i < sizeof(q); i++)
			((uint8_t *)q)[i] ^= data[i];
		ring_round(&lf_session, q, (uint32_t)n, tag, "the input");
		tag += 0x10000;
	}
	if (!moed_alive())
		fail("moed died on this input");
	if (runs % 64 == 0)
		lf_good_client();
	return 0;
}

#endif
