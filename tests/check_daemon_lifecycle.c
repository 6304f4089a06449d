/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, its own life: SIGTERM fails what the clients wait for,
 * at once, moed exits 0 and leaves no socket behind, and a moed started
 * again on the same socket serves.  The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "e2eutil.h"
#include "engine/dtype.h"

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

			err = moe_client_wait(c, &cq, 10000 * (int)moe_test_slow());
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
	uint64_t t_term, t_spawn, rng = 5;
	long long round_ns = 0;
	char why[512];
	int rc;

	model_make(&m, "daemon-term");
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	t_spawn = now_ns();
	for (int i = 0; i < N; i++) {
		args[i] = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = i };
		pids[i] = spawn(term_client, &args[i]);
	}
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS * moe_test_slow();;) {
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
	/* moed finishes the batch it is computing before it stops: allow
	 * twice the longest a client's round has taken so far (connect
	 * included, so an overestimate), which a loaded machine stretches,
	 * on top of the second that is the point of the test */
	for (int i = 0; i < N; i++) {
		unsigned long long n = atomic_load(&b->rounds[i]);
		long long per = (long long)(t_term - t_spawn) / (long long)(n ? n : 1);

		if (2 * per > round_ns)
			round_ns = 2 * per;
	}
	for (int i = 0; i < N; i++)
		assert_child_ok(pids[i], "a waiting client");
	for (int i = 0; i < N; i++) {
		int err = atomic_load(&b->err[i]);
		long long dt = atomic_load(&b->t_err[i]) - (long long)t_term;

		moed_assert(&d, err == -ESHUTDOWN || err == -ECONNRESET, "client %d: got %d (%s) after SIGTERM, "
			    "not -ESHUTDOWN or -ECONNRESET", i, err, moe_strerror(err));
		moed_assert(&d, dt < 1000000000ll * moe_test_slow() + round_ns, "client %d: its error came %.3f s "
			    "after SIGTERM (at most %.3f s: %u s and two rounds of %.3f s)", i, (double)dt / 1e9,
			    (1e9 * moe_test_slow() + (double)round_ns) / 1e9, moe_test_slow(), (double)round_ns / 2e9);
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

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-lifecycle");
	TCase *tc = tcase_create("daemon-lifecycle");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, sigterm_while_clients_wait_gives_them_an_error_quickly);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-lifecycle");
}
