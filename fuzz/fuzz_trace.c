/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: routing traces (engine/trace.c, moe-trace(5)), what
 * `moectl trace-sim` reads.  The input is the whole file, read with
 * moe_trace_read().  A refused file must come with a message naming it; an
 * accepted one must be what moe_cache_simulate() takes: every line's keys
 * strictly increasing and below n_layers * n_experts, each line ended by
 * one MOE_CACHE_NONE.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/cache.h"
#include "engine/err.h"
#include "engine/trace.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_trace *t = NULL;
	struct moe_err err = { 0 };
	uint64_t n_keys;
	char path[32];
	int fd, r;

	fd = fuzz_file(data, size, path, sizeof(path));
	r = moe_trace_read(path, &t, &err);
	close(fd);
	if (r < 0) {
		if (!strstr(err.msg, path)) {
			fprintf(stderr, "fuzz_trace: error %d with the message '%s', which does not name the file\n",
				r, err.msg);
			abort();
		}
		return 0;
	}
	n_keys = (uint64_t)t->n_layers * t->n_experts;
	for (size_t i = 0; i < t->n; i++) {
		uint32_t k = t->keys[i];
		bool line_start = i == 0 || t->keys[i - 1] == MOE_CACHE_NONE;

		if (k == MOE_CACHE_NONE)
			continue;
		/* a line is one layer's experts: keys within one layer, increasing */
		if (k >= n_keys || (!line_start && (k <= t->keys[i - 1] ||
						    k / t->n_experts != t->keys[i - 1] / t->n_experts)) ||
		    i + 1 == t->n) {
			fprintf(stderr, "fuzz_trace: key %u at %zu of %zu (n_layers %u, n_experts %u) is out of "
				"range, out of order or not followed by a separator\n", k, i, t->n,
				t->n_layers, t->n_experts);
			abort();
		}
	}
	moe_trace_free(t);
	return 0;
}
