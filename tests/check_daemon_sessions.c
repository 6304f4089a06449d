/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, sessions: who gets one and what ends it.
 *  - a client killed at any point costs the others nothing, and moed gives
 *    back its descriptors and its segment;
 *  - absurd sizes in a HELLO are refused, not wrapped;
 *  - a session whose client hangs up is closed at once;
 *  - a HELLO whose WELCOME cannot be sent leaves no segment behind;
 *  - access.uids and limits.max_clients are enforced.
 * The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "e2eutil.h"
#include "engine/dtype.h"
#include "proto/proto.h"

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

/* ------------------------------------------------------------------ killed clients */

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

/* ------------------------------------------------------------------ the HELLO */

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
			    PRIu64 " bytes; want status -E2BIG (daemon/session.c segment_make: rounding the arena up to "
			    "pages must not wrap past 2^64)", sizes[i], rc, rc ? 0 : w.status,
			    rc ? "" : moe_strerror(w.status), rc ? 0 : w.segment_bytes);
	}
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

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

/* ------------------------------------------------------------------ hang-ups */

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
		      "after %" PRIu64 " ms: a lost wakeup of the data thread? (daemon/dataplane.c: data_sleep() must "
		      "compare the wake word read before sessions_update(), or a wake_data() from session_end() or "
		      "hello() in between is lost and it sleeps WAIT_SLICE_NS)", slow, worst);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ access.uids */

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

/* ------------------------------------------------------------------ max_clients */

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

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-sessions");
	TCase *tc = tcase_create("daemon-sessions");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, a_killed_client_costs_the_others_nothing);
	tcase_add_test(tc, hello_sizes_that_overflow_are_refused);
	tcase_add_test(tc, a_welcome_that_cannot_be_sent_leaves_no_segment);
	tcase_add_test(tc, a_session_that_hangs_up_is_closed_at_once);
	tcase_add_test(tc, a_uid_outside_access_uids_is_refused);
	tcase_add_test(tc, max_clients_is_enforced);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-sessions");
}
