/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, what its peers can cost it (issue 13):
 *  - a client that stops reading its completions costs moed no CPU, is
 *    served again as soon as it makes room, and costs the others nothing;
 *  - idle connections that never say HELLO cannot lock a new client out:
 *    a uid over limits.max_pending_per_uid loses its oldest one, and
 *    limits.hello_timeout_ms drops them soon;
 *  - limits.max_clients_per_uid refuses a session by name;
 *  - a peer that makes moed complain in a loop gets a bounded number of
 *    log lines, while `moectl stats` counts every event.
 * All tests run as one uid, so "per uid" is "for everyone" here.
 * The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "e2eutil.h"
#include "proto/proto.h"

/* CPU time (user + system) @pid has used, in seconds; -1 if unreadable. */
static double cpu_seconds(pid_t pid)
{
	char path[64], buf[2048], *p;
	unsigned long long ut, st;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	/* the command may hold spaces and parentheses: fields after the last ')' */
	p = strrchr(buf, ')');
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
		return -1;
	return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* ------------------------------------------------------------------ a full completion ring */

/*
 * Issue 13, finding 1: a client fills its completion ring and submits one
 * more.  Before the fix, moed counted that submission as work it could
 * not take and spun a core until the session ended.
 */
START_TEST(a_full_completion_ring_costs_no_cpu)
{
	enum { MEASURE_MS = 3000 };
	struct moe_sqe nop = { .opcode = MOE_OP_NOP };
	struct moe_test_raw r;
	struct moe_test_model m;
	struct moe_test_moed d;
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_cqe *cqes;
	uint64_t rng = 0x57a11ull;
	uint32_t got, wait;
	double cpu0, cpu1;
	char why[512];
	int rc;

	model_make(&m, "daemon-stall");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 8; };");
	moed_start(&d);
	ck_assert_int_eq(ref_open(&m, &e, why, sizeof(why)), 0);
	rc = moe_test_raw_open(&r, d.sock, NULL);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	cqes = calloc(r.cq_entries + 1, sizeof(*cqes));
	ck_assert_ptr_nonnull(cqes);

	/* NOPs until moed has filled the completion ring; cq_head stays put */
	for (uint32_t sent = 0; sent < r.cq_entries;) {
		uint32_t room = r.sq_entries - (r.hdr->sq_tail - __atomic_load_n(&r.hdr->sq_head, __ATOMIC_ACQUIRE));
		uint64_t end = moe_test_now_ms() + WAIT_MS;

		for (uint32_t i = 0; i < room && sent < r.cq_entries; i++, sent++) {
			nop.user_data = sent;
			moe_test_raw_push(&r, &nop, 1);
		}
		while (r.hdr->sq_tail != __atomic_load_n(&r.hdr->sq_head, __ATOMIC_ACQUIRE)) {
			moed_assert(&d, moe_test_now_ms() < end, "moed does not take NOPs from an empty ring");
			moe_test_sleep_ms(1);
		}
	}
	moed_assert(&d, __atomic_load_n(&r.hdr->cq_tail, __ATOMIC_ACQUIRE) - r.hdr->cq_head == r.cq_entries,
		    "the completion ring is not full after %u NOPs", r.cq_entries);
	/* one more: it has no room for its completion */
	nop.user_data = 0x57a11;
	moe_test_raw_push(&r, &nop, 1);

	/* moed sleeps, not spins (before the fix: about a second per second) */
	moe_test_sleep_ms(200);
	cpu0 = cpu_seconds(d.pid);
	moe_test_sleep_ms(MEASURE_MS);
	cpu1 = cpu_seconds(d.pid);
	ck_assert(cpu0 >= 0 && cpu1 >= 0);
	moed_assert(&d, cpu1 - cpu0 < 0.3, "moed used %.2f s of CPU in %.1f s with one client's completion ring "
		    "full (want < 0.3 s: it spins on the stalled submission)", cpu1 - cpu0, MEASURE_MS / 1e3);
	wait = __atomic_load_n(&r.hdr->daemon_wait, __ATOMIC_RELAXED);
	moed_assert(&d, wait & MOE_DAEMON_WAIT_CQ, "moed sleeps without asking the stalled client to kick on "
		    "room (daemon_wait %#x)", wait);

	/* another client is served meanwhile, bit for bit */
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "a second client during the stall: %s", moe_strerror(rc));
	rc = client_round(c, e, &m, &rng, 4, false, 16, why, sizeof(why));
	moed_assert(&d, rc == 0, "a second client during the stall: %s", why);
	rc = client_round(c, e, &m, &rng, 4, true, 16, why, sizeof(why));
	moed_assert(&d, rc == 0, "a second client during the stall (async): %s", why);
	moed_assert(&d, r.hdr->sq_tail != __atomic_load_n(&r.hdr->sq_head, __ATOMIC_ACQUIRE),
		    "moed took the stalled submission without room for its completion");

	/* room: the stalled NOP completes (moe_test_raw_reap kicks as libmoeclient does) */
	got = moe_test_raw_reap(&r, cqes, r.cq_entries + 1, WAIT_MS);
	moed_assert(&d, got == r.cq_entries + 1, "%u of %u completions after the client made room", got,
		    r.cq_entries + 1);
	for (uint32_t i = 0; i < r.cq_entries; i++)
		ck_assert_msg(cqes[i].user_data == i && cqes[i].res == 0, "completion %u: user_data %" PRIu64
			      " res %d", i, cqes[i].user_data, cqes[i].res);
	ck_assert_msg(cqes[r.cq_entries].user_data == 0x57a11 && cqes[r.cq_entries].res == 0,
		      "the stalled NOP: user_data %" PRIu64 " res %d", cqes[r.cq_entries].user_data,
		      cqes[r.cq_entries].res);

	free(cqes);
	moe_client_disconnect(c);
	moe_test_raw_close(&r);
	moe_engine_close(e);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ admission */

/*
 * Issue 13, finding 2: 40 connections that never say HELLO, with
 * limits.max_clients = 8.  Before, they filled the shared pre-HELLO limit
 * (2 x 8 + 16) and new clients were reset for 10 s.
 */
START_TEST(idle_connections_do_not_lock_a_client_out)
{
	enum { IDLE = 40, PENDING = 8 };
	float in[2 * 256] = { 0.5f }, out[2 * 256];
	struct moe_client *c;
	struct moe_test_model m;
	struct moe_test_moed d;
	uint64_t t0, dt;
	int idle[IDLE], rc;

	model_make(&m, "daemon-idle");
	moed_config(&d, &m, NULL, "limits = { max_clients = 8; segment_mb = 8; max_pending_per_uid = 8; };");
	moed_start(&d);
	for (int i = 0; i < IDLE; i++) {
		idle[i] = moe_test_dial(d.sock);
		moed_assert(&d, idle[i] >= 0, "idle connection %d: %s", i, strerror(-idle[i]));
	}
	/* let moed accept them (each accept drops an older one) */
	moe_test_sleep_ms(300);
	t0 = moe_test_now_ms();
	rc = moe_client_connect(d.sock, NULL, &c);
	dt = moe_test_now_ms() - t0;
	moed_assert(&d, rc == 0, "a client after %d idle connections: %s", IDLE, moe_strerror(rc));
	moed_assert(&d, dt < 1000, "a client after %d idle connections took %" PRIu64 " ms to connect", IDLE, dt);
	ck_assert_int_eq(moe_client_forward(c, m.layers[0], MOE_F32, in, out, 2, NULL, NULL), 0);
	/* the oldest went first: the client's connection made room by dropping
	 * the oldest of the 8 then waiting, so the newest 7 are still open */
	for (int i = 0; i < IDLE - PENDING + 1; i++)
		moed_assert(&d, peer_closes(idle[i], 2000), "idle connection %d (of the oldest) is still open", i);
	for (int i = IDLE - PENDING + 1; i < IDLE; i++)
		moed_assert(&d, !peer_closes(idle[i], 0), "idle connection %d (of the newest %d) was dropped before "
			    "older ones", i, PENDING - 1);
	moed_assert(&d, moe_test_moed_log_has(&d, "limits.max_pending_per_uid"),
		    "moed's log does not name limits.max_pending_per_uid");
	for (int i = 0; i < IDLE; i++)
		close(idle[i]);
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* A connection that says nothing is dropped after limits.hello_timeout_ms
 * (the default was 10 s, hard-coded), not before. */
START_TEST(the_hello_timeout_is_honoured)
{
	struct moe_test_model m;
	struct moe_test_moed d;
	uint64_t t0;
	int fd;

	model_make(&m, "daemon-hellotimeout");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 8; hello_timeout_ms = 500; };");
	moed_start(&d);
	fd = moe_test_dial(d.sock);
	ck_assert_int_ge(fd, 0);
	t0 = moe_test_now_ms();
	moed_assert(&d, !peer_closes(fd, 250), "a silent connection was dropped before limits.hello_timeout_ms");
	/* the check runs on the status tick (every second) and at each accept */
	moed_assert(&d, peer_closes(fd, 4000), "a silent connection is still open %" PRIu64 " ms after connecting "
		    "(limits.hello_timeout_ms = 500)", moe_test_now_ms() - t0);
	close(fd);
	moed_assert(&d, moe_test_moed_log_has(&d, "limits.hello_timeout_ms"),
		    "moed's log does not name limits.hello_timeout_ms");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* One uid holds at most limits.max_clients_per_uid sessions, and the
 * refusal says which limit. */
START_TEST(the_per_uid_session_quota_is_named)
{
	struct moe_msg_hello h = { .version = MOE_PROTO_VERSION };
	struct moe_msg_welcome w;
	struct moe_client *a, *b, *c = NULL;
	struct moe_test_model m;
	struct moe_test_moed d;
	int fd, segfd = -1, rc;

	model_make(&m, "daemon-peruid");
	moed_config(&d, &m, NULL, "limits = { max_clients = 8; max_clients_per_uid = 2; segment_mb = 8; };");
	moed_start(&d);
	ck_assert_int_eq(moe_client_connect(d.sock, NULL, &a), 0);
	ck_assert_int_eq(moe_client_connect(d.sock, NULL, &b), 0);
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == -EUSERS, "a third session of one uid with max_clients_per_uid = 2: %d (%s)", rc,
		    moe_strerror(rc));
	fd = moe_test_dial(d.sock);
	ck_assert_int_ge(fd, 0);
	rc = moe_test_hello_exchange(fd, &h, &w, &segfd);
	moed_assert(&d, rc == 0 && w.status == -EUSERS, "a raw third session: %d, status %d", rc, w.status);
	w.message[sizeof(w.message) - 1] = 0;
	ck_assert_msg(strstr(w.message, "limits.max_clients_per_uid"), "the refusal does not name the limit: '%s'",
		      w.message);
	ck_assert_int_lt(segfd, 0);
	close(fd);
	moe_client_disconnect(a);
	for (uint64_t end = moe_test_now_ms() + 2000;;) {
		rc = moe_client_connect(d.sock, NULL, &c);
		if (rc == 0 || moe_test_now_ms() > end)
			break;
		moe_test_sleep_ms(10);
	}
	moed_assert(&d, rc == 0, "a session after one of the uid's two ended: %s", moe_strerror(rc));
	moed_assert(&d, moe_test_moed_log_has(&d, "limits.max_clients_per_uid"),
		    "moed's log does not name limits.max_clients_per_uid");
	moe_client_disconnect(b);
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

/* ------------------------------------------------------------------ log flooding */

/* Lines of moed's log that contain @needle. */
static int log_count(const struct moe_test_moed *d, const char *needle)
{
	char line[4096];
	FILE *f = fopen(d->log, "r");
	int n = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		n += strstr(line, needle) != NULL;
	fclose(f);
	return n;
}

/* moed's "events" count @name reaches @want within @timeout_ms: the last
 * count seen. */
static long long wait_event_count(struct moe_client *c, const char *name, long long want, int timeout_ms)
{
	uint64_t end = moe_test_now_ms() + (uint64_t)timeout_ms;
	long long got = -1;

	for (;;) {
		char *json = NULL, key[64], *p;

		if (moe_client_stats(c, &json) == 0 && json) {
			snprintf(key, sizeof(key), "\"%s\":", name);
			p = strstr(json, "\"events\":");
			p = p ? strstr(p, key) : NULL;
			got = p ? strtoll(p + strlen(key), NULL, 10) : -1;
			free(json);
		}
		if (got == want || moe_test_now_ms() > end)
			return got;
		moe_test_sleep_ms(50);
	}
}

/* Connect as @uid @n times; the refusal is all that comes back. */
struct refused_arg {
	const char *sock;
	int n;
};

static int refused_client(void *p)
{
	const struct refused_arg *a = p;

	if (setgid(65534) < 0 || setuid(65534) < 0)
		return 2;
	for (int i = 0; i < a->n; i++) {
		int fd = moe_test_dial(a->sock);

		if (fd < 0)
			return 1;
		peer_closes(fd, 5000);
		close(fd);
	}
	return 0;
}

/*
 * Issue 13, finding 3: a peer in a loop (a refused uid, junk instead of
 * the protocol) wrote a line per attempt, 16 MB in 3 s.  Now each class
 * logs log.ratelimit_burst lines per interval and a summary, while the
 * stats count every event.
 */
START_TEST(peers_cannot_flood_the_log)
{
	enum { JUNK = 600, REFUSED = 300, SESSIONS = 100, BURST = 5 };
	static const uint8_t junk[16] = "GET / HTTP/1.0\r\n";
	struct moe_client *c;
	struct moe_test_model m;
	struct moe_test_moed d;
	uint64_t t0;
	double secs;
	long long got;
	int lines, bound;
	bool root = geteuid() == 0;

	model_make(&m, "daemon-flood");
	ck_assert_int_eq(chmod(m.dir, 0755), 0);     /* nobody reaches the socket: only moed refuses */
	moed_config(&d, &m, "mode = \"0666\";",
		    "limits = { segment_mb = 8; };\n"
		    "access = { uids = [ 12345 ]; gids = [ ]; };\n"
		    "log = { level = \"debug\"; ratelimit_burst = 5; ratelimit_interval_ms = 1000; };");
	moed_start(&d);
	t0 = moe_test_now_ms();
	for (int i = 0; i < JUNK; i++) {
		int fd = moe_test_dial(d.sock);

		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(moe_test_send_all(fd, junk, sizeof(junk)), 0);
		moed_assert(&d, peer_closes(fd, 5000), "moed kept a connection that sent junk");
		close(fd);
	}
	if (root) {
		struct refused_arg ra = { .sock = d.sock, .n = REFUSED };

		assert_child_ok(spawn(refused_client, &ra), "a refused uid connecting in a loop");
	} else {
		fprintf(stderr, "SKIP: the refused-uid part of peers_cannot_flood_the_log needs root\n");
	}
	/* whole sessions in a loop: two lines each (begun, ended) */
	for (int i = 0; i < SESSIONS; i++) {
		ck_assert_int_eq(moe_client_connect(d.sock, NULL, &c), 0);
		moe_client_disconnect(c);
	}
	/* moed logged each before it closed the connection: all are in the log */
	secs = (double)(moe_test_now_ms() - t0) / 1e3;
	bound = BURST * ((int)secs + 2);
	lines = log_count(&d, "not the moed protocol");
	moed_assert(&d, lines >= 1 && lines <= bound, "%d junk connections in %.1f s: %d log lines (want 1..%d)",
		    JUNK, secs, lines, bound);
	if (root) {
		lines = log_count(&d, "not in access.uids");
		moed_assert(&d, lines >= 1 && lines <= bound, "%d refusals in %.1f s: %d log lines (want 1..%d)",
			    REFUSED, secs, lines, bound);
	}
	ck_assert_int_eq(moe_client_connect(d.sock, NULL, &c), 0);
	got = wait_event_count(c, "protocol", JUNK, 10000);
	moed_assert(&d, got == JUNK, "stats events.protocol is %lld after %d junk connections", got, JUNK);
	/* every session begun and ended, and this one begun */
	got = wait_event_count(c, "session", 2 * SESSIONS + 1, 10000);
	moed_assert(&d, got == 2 * SESSIONS + 1, "stats events.session is %lld after %d sessions and this one", got,
		    SESSIONS);
	secs = (double)(moe_test_now_ms() - t0) / 1e3;
	bound = BURST * ((int)secs + 2);
	lines = log_count(&d, "): connected, ");
	moed_assert(&d, lines >= 1 && lines <= bound, "%d sessions in %.1f s: %d 'connected' lines (want 1..%d)",
		    SESSIONS + 1, secs, lines, bound);
	if (root) {
		got = wait_event_count(c, "refused", REFUSED, 10000);
		moed_assert(&d, got == REFUSED, "stats events.refused is %lld after %d refusals", got, REFUSED);
	}
	/* the summaries come with the status tick once an interval is over */
	moe_test_sleep_ms(2500);
	moed_assert(&d, log_count(&d, "more protocol messages suppressed") >= 1,
		    "no summary line for the suppressed protocol messages");
	if (root)
		moed_assert(&d, log_count(&d, "more refused messages suppressed") >= 1,
			    "no summary line for the suppressed refusals");
	moe_client_disconnect(c);
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-peers");
	TCase *tc = tcase_create("daemon-peers");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, a_full_completion_ring_costs_no_cpu);
	tcase_add_test(tc, idle_connections_do_not_lock_a_client_out);
	tcase_add_test(tc, the_hello_timeout_is_honoured);
	tcase_add_test(tc, the_per_uid_session_quota_is_named);
	tcase_add_test(tc, peers_cannot_flood_the_log);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-peers");
}
