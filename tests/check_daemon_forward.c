/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, the numbers: eight clients in other processes, each
 * with requests of random sizes, layers and dtypes (routing out or not)
 * through moe_client_forward and through batches in flight with
 * submit/wait, get the bits of the engine run in-process (memcmp, routing
 * included).  The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "e2eutil.h"

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

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-forward");
	TCase *tc = tcase_create("daemon-forward");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, eight_clients_get_the_bits_of_forward_in_process);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-forward");
}
