/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, what its peers can cost it (issue 13):
 *  - a client that stops reading its completions costs moed no CPU, is
 *    served again as soon as it makes room, and costs the others nothing;
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

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-peers");
	TCase *tc = tcase_create("daemon-peers");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, a_full_completion_ring_costs_no_cpu);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-peers");
}
