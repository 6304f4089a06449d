/* SPDX-License-Identifier: MIT */
/*
 * moed's rate-limited message classes (daemon/log.c): the first burst of
 * each interval is written, the rest only counted, one summary line closes
 * the interval, the counts are exact, classes do not share a window, and
 * interval 0 writes everything.  moed's log goes to stderr: each test
 * points stderr at a file of its own and reads the lines back.
 */
#include "config.h"

#include <check.h>
#include <fcntl.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/log.h"
#include "testutil.h"

static char path[4096];
static int saved = -1;

/* stderr into a fresh file in the test's folder. */
static void capture(void)
{
	char *dir = moe_test_tmpdir("log");
	int fd;

	snprintf(path, sizeof(path), "%s/log", dir);
	free(dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	fflush(stderr);
	if (saved < 0)
		saved = dup(2);
	ck_assert_int_ge(dup2(fd, 2), 0);
	close(fd);
	moed_log_set_journal(0);
	moed_log_set_level(MOED_LOG_INFO);
}

static void release(void)
{
	fflush(stderr);
	dup2(saved, 2);
}

/* Lines of the captured log that contain @needle. */
static int lines_with(const char *needle)
{
	char line[4096];
	FILE *f;
	int n = 0;

	fflush(stderr);
	f = fopen(path, "r");
	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof(line), f))
		n += strstr(line, needle) != NULL;
	fclose(f);
	return n;
}

START_TEST(a_burst_then_a_summary_and_exact_counts)
{
	uint64_t p0 = moed_log_event_count(MOED_EVENT_PROTOCOL), r0 = moed_log_event_count(MOED_EVENT_REFUSED);

	capture();
	moed_log_set_ratelimit(3, 200);
	for (int i = 0; i < 50; i++)
		moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "junk number %d", i);
	/* another class has its own window */
	moed_log_event(MOED_EVENT_REFUSED, MOED_LOG_WARNING, "a refusal");
	ck_assert_int_eq(lines_with("junk number"), 3);
	ck_assert_int_eq(lines_with("junk number 0\n"), 1);
	ck_assert_int_eq(lines_with("a refusal"), 1);
	ck_assert_int_eq(lines_with("suppressed"), 0);
	/* not over yet: no summary */
	moed_log_events_flush();
	ck_assert_int_eq(lines_with("suppressed"), 0);
	usleep(250 * 1000);
	moed_log_events_flush();
	ck_assert_int_eq(lines_with("47 more protocol messages suppressed in the last"), 1);
	ck_assert_int_eq(lines_with("more refused messages"), 0);      /* none were suppressed */
	/* a new interval: a new burst */
	for (int i = 0; i < 5; i++)
		moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "junk again %d", i);
	ck_assert_int_eq(lines_with("junk again"), 3);
	/* the summary also comes with the class's next event after the interval */
	usleep(250 * 1000);
	moed_log_event(MOED_EVENT_PROTOCOL, MOED_LOG_WARNING, "junk late");
	ck_assert_int_eq(lines_with("2 more protocol messages suppressed"), 1);
	ck_assert_int_eq(lines_with("junk late"), 1);
	ck_assert_uint_eq(moed_log_event_count(MOED_EVENT_PROTOCOL) - p0, 56);
	ck_assert_uint_eq(moed_log_event_count(MOED_EVENT_REFUSED) - r0, 1);
	release();
}
END_TEST

START_TEST(interval_zero_writes_all_and_level_still_filters)
{
	uint64_t n0 = moed_log_event_count(MOED_EVENT_NO_HELLO);

	capture();
	moed_log_set_ratelimit(1, 0);
	for (int i = 0; i < 20; i++)
		moed_log_event(MOED_EVENT_NO_HELLO, MOED_LOG_WARNING, "silent %d", i);
	ck_assert_int_eq(lines_with("silent"), 20);
	/* below log.level: counted, not written, and uses up no burst */
	moed_log_set_ratelimit(2, 60000);
	moed_log_set_level(MOED_LOG_ERR);
	for (int i = 0; i < 10; i++)
		moed_log_event(MOED_EVENT_NO_HELLO, MOED_LOG_WARNING, "quiet %d", i);
	moed_log_set_level(MOED_LOG_INFO);
	ck_assert_int_eq(lines_with("quiet"), 0);
	moed_log_event(MOED_EVENT_NO_HELLO, MOED_LOG_WARNING, "loud");
	ck_assert_int_eq(lines_with("loud"), 1);
	ck_assert_uint_eq(moed_log_event_count(MOED_EVENT_NO_HELLO) - n0, 31);
	ck_assert_str_eq(moed_log_event_name(MOED_EVENT_REQUEST), "request_error");
	ck_assert_str_eq(moed_log_event_name(MOED_EVENT_SESSION), "session");
	ck_assert_str_eq(moed_log_event_name(MOED_EVENT_COUNT), "?");
	moed_log_set_ratelimit(10, 5000);
	release();
}
END_TEST

/* stderr not the journal: each line stamped in UTC; on the journal, the
 * <level> prefix alone (the journal stamps it) */
START_TEST(timestamps_unless_on_the_journal)
{
	char line[4096];
	regex_t re;
	FILE *f;
	int stamped = 0, bare = 0;

	ck_assert_int_eq(regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z "
				 "moed: warning: plain line\n$", REG_EXTENDED | REG_NOSUB), 0);
	capture();
	moed_log(MOED_LOG_WARNING, "plain line");
	moed_log_set_journal(1);
	moed_log(MOED_LOG_WARNING, "journal line");
	moed_log_set_journal(0);
	fflush(stderr);
	f = fopen(path, "r");
	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof(line), f)) {
		stamped += regexec(&re, line, 0, NULL, 0) == 0;
		bare += strcmp(line, "<4>journal line\n") == 0;
	}
	fclose(f);
	regfree(&re);
	release();
	ck_assert_int_eq(stamped, 1);
	ck_assert_int_eq(bare, 1);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("log");
	TCase *tc = tcase_create("log");

	tcase_add_test(tc, a_burst_then_a_summary_and_exact_counts);
	tcase_add_test(tc, interval_zero_writes_all_and_level_still_filters);
	tcase_add_test(tc, timestamps_unless_on_the_journal);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "log");
}
