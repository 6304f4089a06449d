/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, what it tells: moectl info and stats through moed (text
 * and JSON, a session's own counters), moectl forward through moed writes
 * the files of forward --model, and a client that asks for STATS and never
 * reads the answers holds up nobody.  The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "e2eutil.h"
#include "engine/dtype.h"
#include "proto/proto.h"

/* ------------------------------------------------------------------ moectl */

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

/* ------------------------------------------------------------------ STATS */

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
	moed_assert(&d, dt < 800 * moe_test_slow(), "the second client waited %llu ms behind the one "
		    "that does not read", (unsigned long long)dt);
	moe_client_disconnect(c);
	close(fd);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-stats");
	TCase *tc = tcase_create("daemon-stats");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, moectl_forward_through_moed_matches_forward_model);
	tcase_add_test(tc, a_client_that_asks_for_stats_and_never_reads_holds_up_nobody);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-stats");
}
