/* SPDX-License-Identifier: MIT */
/*
 * moectl trace-sim: replay a routing trace (moe-trace(5)) on simulated
 * expert caches and compare LRU, moed's freq policy and Belady's optimum.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "engine/cache.h"
#include "moectl.h"
#include "engine/trace.h"

/* Default capacities, as fractions of the distinct experts the trace uses. */
static const double default_fractions[] = { 0.05, 0.10, 0.25, 0.50 };
#define SIM_MAX_CAPACITIES (sizeof(default_fractions) / sizeof(default_fractions[0]))

static const enum moe_cache_policy sim_policies[] = {
	MOE_CACHE_LRU, MOE_CACHE_FREQ, MOE_CACHE_BELADY,
};
#define SIM_N_POLICIES (sizeof(sim_policies) / sizeof(sim_policies[0]))

static void usage(FILE *f)
{
	fputs("usage: moectl trace-sim TRACE [--slots N | --fraction F] [--json]\n"
	      "\n"
	      "Replay the routing trace TRACE (see moe-trace(5)) on a simulated expert cache\n"
	      "and print the hit rates of LRU, freq (moed's policy) and Belady's optimum.\n"
	      "By default at 5%, 10%, 25% and 50% of the distinct experts the trace uses.\n"
	      "\n"
	      "  --slots N        one cache of N expert slots\n"
	      "  --fraction F     one cache of the fraction F (0 < F <= 1) of the distinct\n"
	      "                   experts, rounded, at least 1 slot\n"
	      "  --json           print one JSON object instead of the table\n"
	      "  -h, --help       this text\n", f);
}

struct sim_row {
	uint32_t slots;
	struct moe_cache_stats st[SIM_N_POLICIES];
};

static double hit_rate(const struct moe_cache_stats *st)
{
	uint64_t all = st->hits + st->misses;

	return all ? (double)st->hits / (double)all : 0.0;
}

static int print_json(const char *path, const struct moe_trace *t, size_t batches, size_t accesses,
		      uint32_t distinct, const struct sim_row *rows, size_t n_rows)
{
	json_t *root, *results;
	char *text;

	results = json_array();
	for (size_t i = 0; results && i < n_rows; i++) {
		json_t *row = json_pack("{s:I,s:f}", "slots", (json_int_t)rows[i].slots,
					"fraction", (double)rows[i].slots / distinct);

		for (size_t p = 0; row && p < SIM_N_POLICIES; p++) {
			const struct moe_cache_stats *st = &rows[i].st[p];

			json_object_set_new(row, moe_cache_policy_name(sim_policies[p]),
					    json_pack("{s:I,s:I,s:I,s:f}",
						      "hits", (json_int_t)st->hits,
						      "misses", (json_int_t)st->misses,
						      "evictions", (json_int_t)st->evictions,
						      "hit_rate", hit_rate(st)));
		}
		json_array_append_new(results, row);
	}
	root = json_pack("{s:s,s:I,s:I,s:I,s:I,s:I,s:o}", "trace", path,
			 "num_moe_layers", (json_int_t)t->n_layers,
			 "num_experts", (json_int_t)t->n_experts,
			 "batches", (json_int_t)batches,
			 "accesses", (json_int_t)accesses,
			 "distinct", (json_int_t)distinct,
			 "results", results);
	text = root ? json_dumps(root, MOECTL_JSON_FLAGS)
		    : NULL;
	json_decref(root);
	if (!text)
		return moectl_failx(MOECTL_INTERNAL, "trace-sim: out of memory");
	puts(text);
	free(text);
	return 0;
}

static int print_table(const char *path, const struct moe_trace *t, size_t batches,
		       size_t accesses, uint32_t distinct, const struct sim_row *rows, size_t n_rows)
{
	printf("%s: %" PRIu32 " MoE layers x %" PRIu32 " experts; %zu expert uses in %zu layer "
	       "batches, %" PRIu32 " distinct experts\n",
	       path, t->n_layers, t->n_experts, accesses, batches, distinct);
	printf("%10s %8s", "slots", "of used");
	for (size_t p = 0; p < SIM_N_POLICIES; p++)
		printf(" %8s", moe_cache_policy_name(sim_policies[p]));
	putchar('\n');
	for (size_t i = 0; i < n_rows; i++) {
		printf("%10" PRIu32 " %7.1f%%", rows[i].slots, 100.0 * rows[i].slots / distinct);
		for (size_t p = 0; p < SIM_N_POLICIES; p++)
			printf(" %7.1f%%", 100.0 * hit_rate(&rows[i].st[p]));
		putchar('\n');
	}
	return 0;
}

/* @f of the @distinct experts, rounded to the nearest slot, at least 1. */
static uint32_t slots_for(double f, uint32_t distinct)
{
	double s = f * distinct + 0.5;

	return s < 1 ? 1 : (uint32_t)s;
}

/* Parse --fraction: a number in (0, 1]. */
static int parse_fraction(const char *s, double *ret)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v > 0 && v <= 1))
		return moectl_fail("trace-sim: --fraction: expected a number above 0 and at most 1, got '%s'",
				   s);
	*ret = v;
	return 0;
}

enum { OPT_SLOTS = 256, OPT_FRACTION, OPT_JSON };

int cmd_trace_sim(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "slots", required_argument, NULL, OPT_SLOTS },
		{ "fraction", required_argument, NULL, OPT_FRACTION },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct sim_row rows[SIM_MAX_CAPACITIES];
	struct moe_err err = { 0 };
	struct moe_trace *t = NULL;
	const char *path;
	uint64_t slots = 0;
	double fraction = 0;
	bool json = false, have_slots = false;
	size_t n_rows = 0, batches = 0;
	uint32_t distinct = 0;
	uint8_t *used;
	int c, ret = 1;

	optind = 1;
	opterr = 0;
	/* GNU getopt permutes: options may come before or after TRACE */
	while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
		switch (c) {
		case OPT_SLOTS:
			if (moectl_parse_u64("--slots", optarg, 1, MOE_CACHE_NONE - 1, &slots) < 0)
				return 1;
			have_slots = true;
			break;
		case OPT_FRACTION:
			if (parse_fraction(optarg, &fraction))
				return 1;
			break;
		case OPT_JSON:
			json = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			return moectl_getopt_error("trace-sim", c, argc, argv, opts);
		}
	}
	path = optind < argc ? argv[optind++] : NULL;
	if (optind < argc)
		return moectl_usage("trace-sim", "unexpected argument '%s'",
				   argv[optind]);
	if (!path)
		return moectl_usage("trace-sim", "missing TRACE");
	if (have_slots && fraction > 0)
		return moectl_fail("trace-sim: give at most one of --slots and --fraction");

	if (moe_trace_read(path, &t, &err) < 0)
		return moectl_fail_err(&err);
	used = calloc((size_t)t->n_layers * t->n_experts, 1);
	if (!used) {
		moectl_failx(MOECTL_INTERNAL, "%s: out of memory", path);
		goto out;
	}
	for (size_t i = 0; i < t->n; i++) {
		if (t->keys[i] == MOE_CACHE_NONE) {
			batches++;
		} else if (!used[t->keys[i]]) {
			used[t->keys[i]] = 1;
			distinct++;
		}
	}
	free(used);
	if (!distinct) {
		moectl_fail("%s: the trace uses no experts: nothing to simulate", path);
		goto out;
	}

	if (have_slots) {
		rows[n_rows++].slots = (uint32_t)slots;
	} else if (fraction > 0) {
		rows[n_rows++].slots = slots_for(fraction, distinct);
	} else {
		for (size_t i = 0; i < SIM_MAX_CAPACITIES; i++) {
			uint32_t n = slots_for(default_fractions[i], distinct);

			/* a small trace rounds several fractions to one size */
			if (!n_rows || rows[n_rows - 1].slots != n)
				rows[n_rows++].slots = n;
		}
	}
	for (size_t i = 0; i < n_rows; i++) {
		for (size_t p = 0; p < SIM_N_POLICIES; p++) {
			if (moe_cache_simulate(t->keys, t->n, t->n_layers, t->n_experts, rows[i].slots,
					       sim_policies[p], &rows[i].st[p], &err) < 0) {
				moectl_fail("%s: %s", path, err.msg);
				goto out;
			}
		}
	}
	if (json)
		ret = print_json(path, t, batches, t->n - batches, distinct, rows, n_rows);
	else
		ret = print_table(path, t, batches, t->n - batches, distinct, rows, n_rows);
out:
	moe_trace_free(t);
	return ret;
}
