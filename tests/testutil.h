/* SPDX-License-Identifier: MIT */
/*
 * Helpers shared by the Check suites.
 */
#ifndef MOE_TESTUTIL_H
#define MOE_TESTUTIL_H

#include <stdint.h>

/* A fresh directory under $TMPDIR (or /tmp), removed by moe_test_cleanup()
 * or at exit.  Returns a malloc'ed path; aborts the test on failure. */
char *moe_test_tmpdir(const char *tag);

/* Remove a directory tree. */
void moe_test_rm_rf(const char *path);

/* Run a shell command built from a printf format; returns its exit status
 * (or -1 if it died from a signal: a crash is never a pass).  stdout and
 * stderr go to @out_path when it is not NULL. */
int moe_test_sh(const char *out_path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Read a whole file into a NUL-terminated malloc'ed buffer (NULL on error). */
char *moe_test_slurp(const char *path, uint64_t *ret_len);

/* The moectl binary under test ($MOECTL, else ../client/moectl). */
const char *moe_test_moectl(void);

/* Deterministic pseudo-random numbers (splitmix64) for test data. */
uint64_t moe_test_rand(uint64_t *state);
/* Uniform in [-1, 1). */
double moe_test_randf(uint64_t *state);

#endif
