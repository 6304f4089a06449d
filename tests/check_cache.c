/* SPDX-License-Identifier: MIT */
/*
 * The expert cache's bookkeeping and policies and its simulator (cache.c);
 * the routing trace files that moectl trace-sim feeds it are check_trace's.
 *
 * The rules (pins, references, LOADING, budgets, -ENOSPC) are checked by a
 * long random run against a model written here from the header alone;
 * Belady against an exhaustive search of every eviction choice on tiny
 * traces; the policies on synthetic MoE routing traces: layers visited in
 * turn, each batch sending its tokens to top-k experts drawn from a Zipf
 * law over a per-layer random order of the experts.  Every run has a fixed
 * seed.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cache.h"
#include "testutil.h"

#define NONE MOE_CACHE_NONE

/*
 * Check writes down every passing ck_assert (a write(2) each); the long
 * loops below call it only when a check fails.
 */
#define REQUIRE(cond, ...) do { if (!(cond)) ck_abort_msg(__VA_ARGS__); } while (0)

static struct moe_cache *new_cache(uint32_t n_layers, uint32_t n_experts, uint32_t slots,
				   enum moe_cache_policy p)
{
	struct moe_err err = { 0 };
	struct moe_cache *c = NULL;
	int r = moe_cache_new(n_layers, n_experts, slots, p, &c, &err);

	ck_assert_msg(r == 0, "moe_cache_new: %d %s", r, err.msg);
	return c;
}

/* A demand load as the engine does it: access, insert if absent, loaded. */
static uint32_t use(struct moe_cache *c, uint32_t key)
{
	uint32_t victim = NONE;

	if (moe_cache_access(c, key) == MOE_CACHE_ABSENT) {
		int slot = moe_cache_insert(c, key, &victim);

		REQUIRE(slot >= 0, "insert %u: %d", key, slot);
		moe_cache_loaded(c, key);
	}
	return victim;
}

static struct moe_cache_stats sim(const uint32_t *keys, size_t n, uint32_t n_layers,
				  uint32_t n_experts, uint32_t slots, enum moe_cache_policy p)
{
	struct moe_cache_stats st;
	struct moe_err err = { 0 };
	int r = moe_cache_simulate(keys, n, n_layers, n_experts, slots, p, &st, &err);

	ck_assert_msg(r == 0, "simulate %s: %d %s", moe_cache_policy_name(p), r, err.msg);
	return st;
}

static double rate(const struct moe_cache_stats *st)
{
	return (double)st->hits / (double)(st->hits + st->misses);
}

/* --- synthetic routing traces ------------------------------------------------- */

struct gen {
	uint32_t layers, experts, top_k, tokens;    /* tokens per batch */
	double zipf;                                /* exponent s */
	uint32_t passes;                            /* batches through all layers */
	bool shift;                                 /* new expert order halfway */
	double sticky;                              /* chance a token keeps its last choice */
	uint64_t seed;
};

static double uniform(uint64_t *s)
{
	return (double)(moe_test_rand(s) >> 11) * (1.0 / 9007199254740992.0);
}

static void shuffle(uint32_t *a, uint32_t n, uint64_t *s)
{
	for (uint32_t i = n - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(moe_test_rand(s) % (i + 1)), t = a[i];

		a[i] = a[j];
		a[j] = t;
	}
}

/* keys of g->passes x g->layers batches, each ending in NONE; *ret_n entries. */
static uint32_t *gen_trace(const struct gen *g, size_t *ret_n)
{
	uint32_t L = g->layers, E = g->experts, K = g->top_k, B = g->tokens;
	uint32_t *order = malloc((size_t)L * E * sizeof(*order));
	uint32_t *last = calloc((size_t)L * B * K, sizeof(*last));
	uint32_t *keys = malloc(((size_t)g->passes * L * (E + 1)) * sizeof(*keys));
	double *cdf = malloc(E * sizeof(*cdf)), sum = 0;
	uint8_t *used = malloc(E), *tok = malloc(E);
	uint64_t s = g->seed;
	size_t n = 0;

	ck_assert(order && last && keys && cdf && used && tok);
	for (uint32_t i = 0; i < E; i++)
		cdf[i] = sum += 1.0 / pow(i + 1, g->zipf);
	for (uint32_t i = 0; i < E; i++)
		cdf[i] /= sum;
	for (uint32_t l = 0; l < L; l++) {
		for (uint32_t i = 0; i < E; i++)
			order[l * E + i] = i;
		shuffle(order + l * E, E, &s);
	}
	for (uint32_t p = 0; p < g->passes; p++) {
		if (g->shift && p == g->passes / 2)
			for (uint32_t l = 0; l < L; l++)
				shuffle(order + l * E, E, &s);
		for (uint32_t l = 0; l < L; l++) {
			memset(used, 0, E);
			for (uint32_t b = 0; b < B; b++) {
				memset(tok, 0, E);
				for (uint32_t k = 0; k < K;) {
					uint32_t *prev = &last[((size_t)l * B + b) * K + k], e;

					if (p > 0 && uniform(&s) < g->sticky) {
						e = *prev;
					} else {
						double u = uniform(&s);
						uint32_t lo = 0, hi = E - 1;

						while (lo < hi) {
							uint32_t mid = (lo + hi) / 2;

							if (cdf[mid] < u)
								lo = mid + 1;
							else
								hi = mid;
						}
						e = order[l * E + lo];
					}
					if (tok[e])
						continue;   /* top-k experts are distinct */
					tok[e] = used[e] = 1;
					*prev = e;
					k++;
				}
			}
			for (uint32_t e = 0; e < E; e++)
				if (used[e])
					keys[n++] = l * E + e;
			keys[n++] = NONE;
		}
	}
	free(order);
	free(last);
	free(cdf);
	free(used);
	free(tok);
	*ret_n = n;
	return keys;
}

/* --- policy order ------------------------------------------------------------------ */

START_TEST(lru_evicts_least_recently_used_in_order)
{
	struct moe_cache *c = new_cache(2, 4, 3, MOE_CACHE_LRU);
	uint32_t slot_of_1;

	ck_assert_uint_eq(use(c, 0), NONE);
	ck_assert_uint_eq(use(c, 1), NONE);
	ck_assert_uint_eq(use(c, 2), NONE);
	ck_assert_uint_eq(moe_cache_used(c), 3);
	slot_of_1 = moe_cache_slot(c, 1);
	ck_assert_uint_eq(use(c, 0), NONE);     /* hit: 0 is now the most recent */
	ck_assert_uint_eq(use(c, 5), 1);        /* 1 is the oldest */
	ck_assert_uint_eq(moe_cache_slot(c, 5), slot_of_1);
	ck_assert_uint_eq(use(c, 6), 2);
	ck_assert_uint_eq(use(c, 5), NONE);     /* hit */
	ck_assert_uint_eq(use(c, 7), 0);
	ck_assert_uint_eq(use(c, 2), 6);
	ck_assert_uint_eq(use(c, 1), 5);
	ck_assert_uint_eq(moe_cache_state(c, 6), MOE_CACHE_ABSENT);
	ck_assert_uint_eq(moe_cache_state(c, 7), MOE_CACHE_RESIDENT);
	moe_cache_free(c);
}
END_TEST

START_TEST(simulated_lru_and_freq_count_a_hand_made_trace)
{
	/* two slots; batches {0} {1} {0} {2} {1} {0} */
	static const uint32_t t[] = { 0, NONE, 1, NONE, 0, NONE, 2, NONE, 1, NONE, 0, NONE };
	struct moe_cache_stats st;

	/* LRU: 0 and 1 miss, 0 hits, 2 evicts 1, 1 evicts 0, 0 evicts 2 */
	st = sim(t, 12, 1, 4, 2, MOE_CACHE_LRU);
	ck_assert_uint_eq(st.hits, 1);
	ck_assert_uint_eq(st.misses, 5);
	ck_assert_uint_eq(st.evictions, 3);
	ck_assert_uint_eq(st.inserts, 5);
	/* freq: 2 evicts 1 (count 1 < 2), 1 evicts 2 (count 1 < 2), 0 hits */
	st = sim(t, 12, 1, 4, 2, MOE_CACHE_FREQ);
	ck_assert_uint_eq(st.hits, 2);
	ck_assert_uint_eq(st.misses, 4);
	ck_assert_uint_eq(st.evictions, 2);
	/* Belady: 2 is never used again, so it is not kept: 1 and 0 hit */
	st = sim(t, 12, 1, 4, 2, MOE_CACHE_BELADY);
	ck_assert_uint_eq(st.hits, 3);
	ck_assert_uint_eq(st.evictions, 0);
}
END_TEST

START_TEST(freq_keeps_a_hot_key_through_a_scan_that_lru_loses_it_to)
{
	enum moe_cache_policy pol[] = { MOE_CACHE_LRU, MOE_CACHE_FREQ };

	for (int p = 0; p < 2; p++) {
		struct moe_cache *c = new_cache(4, 16, 4, pol[p]);

		for (int i = 0; i < 8; i++)
			use(c, 0);
		/* a scan of 12 keys used once each, in other layers */
		for (uint32_t k = 16; k < 28; k++)
			use(c, k);
		if (pol[p] == MOE_CACHE_LRU)
			ck_assert_uint_eq(moe_cache_state(c, 0), MOE_CACHE_ABSENT);
		else
			ck_assert_msg(moe_cache_state(c, 0) == MOE_CACHE_RESIDENT,
				      "freq lost the hot key to a scan");
		moe_cache_free(c);
	}
}
END_TEST

START_TEST(freq_counters_age_so_a_new_hot_set_takes_over)
{
	/* 8 slots: keys 0..7 hot for a long time, then keys 8..15 */
	struct moe_cache *c = new_cache(1, 64, 8, MOE_CACHE_FREQ);
	uint32_t resident = 0;

	for (int r = 0; r < 200; r++)
		for (uint32_t k = 0; k < 8; k++)
			use(c, k);
	for (int r = 0; r < 200; r++)
		for (uint32_t k = 8; k < 16; k++)
			use(c, k);
	for (uint32_t k = 8; k < 16; k++)
		resident += moe_cache_state(c, k) == MOE_CACHE_RESIDENT;
	ck_assert_msg(resident == 8, "only %u of the new hot keys are resident", resident);
	moe_cache_free(c);
}
END_TEST

/* --- pins, references, LOADING -------------------------------------------------------- */

START_TEST(pinned_keys_are_never_evicted)
{
	struct moe_cache *c = new_cache(2, 8, 4, MOE_CACHE_LRU);

	ck_assert_int_eq(moe_cache_pin(c, 3, true), 0);
	ck_assert_int_eq(moe_cache_pin(c, 9, true), 0);     /* absent: stays absent */
	ck_assert(moe_cache_pinned(c, 9));
	ck_assert_uint_eq(moe_cache_state(c, 9), MOE_CACHE_ABSENT);
	use(c, 3);
	for (uint32_t r = 0; r < 5; r++)
		for (uint32_t k = 0; k < 16; k++)
			if (k != 3 && k != 9)
				ck_assert_uint_ne(use(c, k), 3);
	ck_assert_uint_eq(moe_cache_state(c, 3), MOE_CACHE_RESIDENT);
	use(c, 9);
	for (uint32_t k = 10; k < 16; k++) {
		uint32_t v = use(c, k);

		ck_assert_msg(v != 3 && v != 9, "evicted pinned key %u", v);
	}
	/* pins never exceed the slots */
	ck_assert_int_eq(moe_cache_pin(c, 1, true), 0);
	ck_assert_int_eq(moe_cache_pin(c, 2, true), 0);
	ck_assert_int_eq(moe_cache_pin(c, 4, true), -ENOSPC);
	ck_assert_int_eq(moe_cache_pin(c, 3, true), 0);     /* already pinned */
	ck_assert_int_eq(moe_cache_pin(c, 99, true), -EINVAL);
	/* unpinned, it goes like any other */
	ck_assert_int_eq(moe_cache_pin(c, 3, false), 0);
	ck_assert(!moe_cache_pinned(c, 3));
	moe_cache_free(c);
}
END_TEST

START_TEST(pin_hottest_pins_the_most_used_and_leaves_explicit_pins)
{
	struct moe_cache *c = new_cache(1, 16, 4, MOE_CACHE_FREQ);

	/* counts: key k used 10 - k times for k < 8; keys 5 and 6 tie below 4 */
	for (uint32_t k = 0; k < 8; k++)
		for (uint32_t i = 0; i < 10 - k; i++)
			moe_cache_access(c, k);
	moe_cache_access(c, 6);     /* 6 now ties with 5 (5 uses each) */
	ck_assert_uint_eq(moe_cache_count(c, 0), 10);
	ck_assert_uint_eq(moe_cache_count(c, 6), 5);
	ck_assert_int_eq(moe_cache_pin(c, 12, true), 0);
	/* 3 of 4 slots are left for automatic pins */
	ck_assert_uint_eq(moe_cache_pin_hottest(c, 10), 3);
	for (uint32_t k = 0; k < 16; k++)
		ck_assert_msg(moe_cache_pinned(c, k) == (k < 3 || k == 12), "key %u pinned: %d", k,
			      moe_cache_pinned(c, k));
	/* a later call replaces the automatic pins, ties to the lower key */
	for (int i = 0; i < 20; i++)
		moe_cache_access(c, 6);
	for (int i = 0; i < 20; i++)
		moe_cache_access(c, 5);
	ck_assert_uint_eq(moe_cache_pin_hottest(c, 2), 2);
	for (uint32_t k = 0; k < 16; k++)
		ck_assert_msg(moe_cache_pinned(c, k) == (k == 5 || k == 6 || k == 12),
			      "key %u pinned: %d", k, moe_cache_pinned(c, k));
	/* unpinning explicitly keeps an automatic pin */
	moe_cache_access(c, 6);                                 /* 5: 25 uses, 6: 26 */
	ck_assert_uint_eq(moe_cache_pin_hottest(c, 1), 1);
	ck_assert(moe_cache_pinned(c, 6));
	ck_assert_int_eq(moe_cache_pin(c, 6, true), 0);
	ck_assert_int_eq(moe_cache_pin(c, 6, false), 0);
	ck_assert(moe_cache_pinned(c, 6));
	/* hot pins survive a flood of other keys */
	use(c, 6);
	use(c, 12);
	for (uint32_t k = 0; k < 16; k++) {
		uint32_t v = use(c, k);

		ck_assert_msg(v != 6 && v != 12, "evicted pinned key %u", v);
	}
	ck_assert_uint_eq(moe_cache_pin_hottest(c, 0), 0);
	ck_assert(!moe_cache_pinned(c, 6));
	ck_assert(moe_cache_pinned(c, 12));
	/* keys never used are not pinned */
	moe_cache_free(c);
	c = new_cache(1, 16, 4, MOE_CACHE_LRU);
	moe_cache_access(c, 7);
	ck_assert_uint_eq(moe_cache_pin_hottest(c, 4), 1);
	moe_cache_free(c);
}
END_TEST

START_TEST(insert_fails_with_enospc_when_all_are_pinned_in_use_or_loading)
{
	struct moe_cache *c = new_cache(1, 8, 3, MOE_CACHE_FREQ);
	uint32_t victim = 42;

	use(c, 0);
	ck_assert_int_eq(moe_cache_pin(c, 0, true), 0);
	use(c, 1);
	moe_cache_ref(c, 1);
	moe_cache_access(c, 2);
	ck_assert_int_ge(moe_cache_insert(c, 2, NULL), 0);     /* stays LOADING */
	ck_assert_uint_eq(moe_cache_state(c, 2), MOE_CACHE_LOADING);
	ck_assert_uint_eq(moe_cache_available(c), 0);
	ck_assert_int_eq(moe_cache_insert(c, 3, &victim), -ENOSPC);
	ck_assert_uint_eq(victim, 42);                          /* untouched on failure */
	ck_assert_int_eq(moe_cache_insert(c, 2, NULL), -EEXIST);
	ck_assert_int_eq(moe_cache_insert(c, 8, NULL), -EINVAL);
	/* a second reference: one unref is not enough */
	moe_cache_ref(c, 1);
	moe_cache_unref(c, 1);
	ck_assert_int_eq(moe_cache_insert(c, 3, NULL), -ENOSPC);
	moe_cache_unref(c, 1);
	ck_assert_uint_eq(moe_cache_available(c), 1);
	ck_assert_int_ge(moe_cache_insert(c, 3, &victim), 0);
	ck_assert_uint_eq(victim, 1);
	/* a failed read gives the slot back */
	moe_cache_remove(c, 2);
	ck_assert_uint_eq(moe_cache_state(c, 2), MOE_CACHE_ABSENT);
	ck_assert_uint_eq(moe_cache_slot(c, 2), NONE);
	ck_assert_uint_eq(moe_cache_used(c), 2);
	ck_assert_int_ge(moe_cache_insert(c, 4, &victim), 0);
	ck_assert_uint_eq(victim, NONE);
	moe_cache_free(c);

	/* no slots at all */
	c = new_cache(1, 8, 0, MOE_CACHE_LRU);
	ck_assert_uint_eq(moe_cache_access(c, 1), MOE_CACHE_ABSENT);
	ck_assert_int_eq(moe_cache_insert(c, 1, NULL), -ENOSPC);
	ck_assert_int_eq(moe_cache_pin(c, 1, true), -ENOSPC);
	moe_cache_free(c);
}
END_TEST

START_TEST(new_refuses_bad_arguments)
{
	struct moe_err err = { 0 };
	struct moe_cache *c = NULL;
	enum moe_cache_policy p;

	ck_assert_int_eq(moe_cache_new(0, 8, 4, MOE_CACHE_LRU, &c, &err), -EINVAL);
	ck_assert_int_eq(moe_cache_new(65536, 65536, 4, MOE_CACHE_LRU, &c, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "65536 layers x 65536 experts"), "%s", err.msg);
	ck_assert_int_eq(moe_cache_new(2, 8, 4, MOE_CACHE_BELADY, &c, &err), -EINVAL);
	ck_assert_int_eq(moe_cache_new(2, 8, 4, (enum moe_cache_policy)7, &c, &err), -EINVAL);
	ck_assert_ptr_null(c);
	ck_assert_int_eq(moe_cache_policy_parse("auto", &p), 0);
	ck_assert_int_eq(p, MOE_CACHE_FREQ);
	ck_assert_int_eq(moe_cache_policy_parse("lru", &p), 0);
	ck_assert_int_eq(p, MOE_CACHE_LRU);
	ck_assert_int_eq(moe_cache_policy_parse("belady", &p), -EINVAL);
	ck_assert_str_eq(moe_cache_policy_name(MOE_CACHE_BELADY), "belady");
	ck_assert_ptr_null(moe_cache_policy_name((enum moe_cache_policy)7));
}
END_TEST

/* --- the rules against a model ------------------------------------------------------------ */

struct model_key {
	enum moe_cache_state state;
	uint32_t slot, refs;
	bool pin_x, pin_a;
	uint64_t count, stamp;
};

struct model {
	uint32_t n_keys, slots;
	uint64_t clock;
	struct model_key *k;
};

static bool model_evictable(const struct model_key *k)
{
	return k->state == MOE_CACHE_RESIDENT && !k->refs && !k->pin_x && !k->pin_a;
}

static uint32_t model_pins(const struct model *m)
{
	uint32_t n = 0;

	for (uint32_t i = 0; i < m->n_keys; i++)
		n += m->k[i].pin_x || m->k[i].pin_a;
	return n;
}

static void model_check(const struct model *m, const struct moe_cache *c, int step)
{
	uint32_t held = 0, evictable = 0, slots_cap = m->slots < m->n_keys ? m->slots : m->n_keys;
	uint8_t *taken = calloc(slots_cap + 1, 1);

	for (uint32_t i = 0; i < m->n_keys; i++) {
		const struct model_key *k = &m->k[i];

		REQUIRE(moe_cache_state(c, i) == k->state, "step %d key %u: state %d, model %d",
			      step, i, moe_cache_state(c, i), k->state);
		REQUIRE(moe_cache_pinned(c, i) == (k->pin_x || k->pin_a),
			      "step %d key %u: pinned %d", step, i, moe_cache_pinned(c, i));
		REQUIRE(moe_cache_count(c, i) == k->count, "step %d key %u: count %" PRIu64 ", model %"
			PRIu64, step, i, moe_cache_count(c, i), k->count);
		if (k->state == MOE_CACHE_ABSENT) {
			REQUIRE(moe_cache_slot(c, i) == NONE, "step %d key %u: absent with a slot", step, i);
			continue;
		}
		held++;
		evictable += model_evictable(k);
		REQUIRE(moe_cache_slot(c, i) == k->slot, "step %d key %u: slot %u, model %u", step, i,
			moe_cache_slot(c, i), k->slot);
		REQUIRE(k->slot < slots_cap && !taken[k->slot], "step %d: slot %u twice or out "
			      "of range", step, k->slot);
		taken[k->slot] = 1;
	}
	free(taken);
	REQUIRE(moe_cache_used(c) == held && held <= m->slots, "step %d: used %u, model %u of %u",
		      step, moe_cache_used(c), held, m->slots);
	REQUIRE(moe_cache_available(c) == slots_cap - held + evictable, "step %d: available %u, "
		"model %u", step, moe_cache_available(c), slots_cap - held + evictable);
}

/* The hottest-N rule, from the header: counts, ties to the lower key, cap. */
static void model_pin_hottest(struct model *m, uint32_t n)
{
	uint32_t done = 0;
	bool *taken = calloc(m->n_keys, sizeof(*taken));

	for (uint32_t i = 0; i < m->n_keys; i++)
		m->k[i].pin_a = false;
	if (n > m->slots)
		n = m->slots;
	while (done < n) {
		uint32_t best = NONE;

		for (uint32_t i = 0; i < m->n_keys; i++)
			if (!taken[i] && m->k[i].count &&
			    (best == NONE || m->k[i].count > m->k[best].count))
				best = i;
		if (best == NONE)
			break;
		taken[best] = true;
		if (!m->k[best].pin_x && model_pins(m) >= m->slots)
			break;
		m->k[best].pin_a = true;
		done++;
	}
	free(taken);
}

static void random_run(enum moe_cache_policy pol, uint32_t layers, uint32_t experts, uint32_t slots,
		       int steps, uint64_t seed)
{
	struct moe_cache *c = new_cache(layers, experts, slots, pol);
	struct model m = { .n_keys = layers * experts, .slots = slots };
	uint64_t s = seed;

	m.k = calloc(m.n_keys, sizeof(*m.k));
	for (uint32_t i = 0; i < m.n_keys; i++)
		m.k[i].slot = NONE;
	for (int step = 0; step < steps; step++) {
		uint32_t op = (uint32_t)(moe_test_rand(&s) % 100);
		/* half the picks from a hot quarter, so that keys come back */
		uint32_t key = (uint32_t)(moe_test_rand(&s) % (op & 1 ? m.n_keys : (m.n_keys + 3) / 4));
		struct model_key *k = &m.k[key];

		if (op < 35) {
			enum moe_cache_state st = moe_cache_access(c, key);

			REQUIRE(st == k->state, "step %d: access %u gave %d, model %d", step, key, st,
				k->state);
			k->count++;
			k->stamp = ++m.clock;
		} else if (op < 60) {
			uint32_t victim = 12345, want = NONE, free_slot = NONE;
			int r = moe_cache_insert(c, key, &victim);

			if (k->state != MOE_CACHE_ABSENT) {
				REQUIRE(r == -EEXIST, "step %d: insert %u = %d, want -EEXIST", step, key, r);
				continue;
			}
			for (uint32_t i = 0; i < m.n_keys; i++) {
				if (!model_evictable(&m.k[i]))
					continue;
				if (want == NONE || m.k[i].stamp < m.k[want].stamp)
					want = i;
			}
			{
				uint32_t held = 0, cap = slots < m.n_keys ? slots : m.n_keys;

				for (uint32_t i = 0; i < m.n_keys; i++)
					held += m.k[i].state != MOE_CACHE_ABSENT;
				if (held < cap)
					free_slot = 0;
			}
			if (free_slot == NONE && want == NONE) {
				REQUIRE(r == -ENOSPC, "step %d: insert %u = %d, want -ENOSPC", step,
					      key, r);
				REQUIRE(victim == 12345, "step %d: victim set on failure", step);
				continue;
			}
			REQUIRE(r >= 0, "step %d: insert %u = %d", step, key, r);
			if (free_slot != NONE) {
				REQUIRE(victim == NONE, "step %d: victim %u with a free slot", step, victim);
			} else {
				REQUIRE(victim < m.n_keys && model_evictable(&m.k[victim]),
					      "step %d: victim %u may not be evicted", step, victim);
				/* LRU's victim is the model's */
				if (pol == MOE_CACHE_LRU)
					REQUIRE(victim == want, "step %d: LRU victim %u, model %u",
						      step, victim, want);
				REQUIRE((uint32_t)r == m.k[victim].slot, "step %d: slot %d, victim's %u", step,
					r, m.k[victim].slot);
				m.k[victim].state = MOE_CACHE_ABSENT;
				m.k[victim].slot = NONE;
			}
			k->state = MOE_CACHE_LOADING;
			k->slot = (uint32_t)r;
			k->stamp = ++m.clock;
		} else if (op < 70) {
			moe_cache_loaded(c, key);
			if (k->state == MOE_CACHE_LOADING)
				k->state = MOE_CACHE_RESIDENT;
		} else if (op < 74) {
			moe_cache_remove(c, key);
			k->state = MOE_CACHE_ABSENT;
			k->slot = NONE;
		} else if (op < 84) {
			if (k->refs < 3) {
				moe_cache_ref(c, key);
				k->refs++;
			}
		} else if (op < 95) {
			moe_cache_unref(c, key);
			if (k->refs)
				k->refs--;
		} else if (op < 99) {
			bool on = moe_test_rand(&s) & 1;
			bool full = !k->pin_x && !k->pin_a && model_pins(&m) >= slots;
			int r = moe_cache_pin(c, key, on);

			REQUIRE(r == (on && full ? -ENOSPC : 0), "step %d: pin %u %d = %d", step, key, on, r);
			if (r == 0)
				k->pin_x = on;
		} else {
			uint32_t n = (uint32_t)(moe_test_rand(&s) % (slots + 2));
			uint32_t got = moe_cache_pin_hottest(c, n), want = 0;

			model_pin_hottest(&m, n);
			for (uint32_t i = 0; i < m.n_keys; i++)
				want += m.k[i].pin_a;
			REQUIRE(got == want, "step %d: pin_hottest %u = %u, model %u", step, n, got, want);
		}
		model_check(&m, c, step);
	}
	free(m.k);
	moe_cache_free(c);
}

START_TEST(random_operations_follow_the_rules)
{
	static const uint32_t slots[] = { 8, 1, 0, 40, 3 };

	for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++) {
		random_run(MOE_CACHE_LRU, 4, 8, slots[i], 6000, 100 + i);
		random_run(MOE_CACHE_FREQ, 4, 8, slots[i], 6000, 200 + i);
	}
}
END_TEST

/* --- the simulator ----------------------------------------------------------------------- */

START_TEST(simulate_does_not_keep_a_batch_beyond_the_slots)
{
	/* two slots, the batch {0, 1, 2} twice: 0 and 1 kept, 2 never */
	static const uint32_t t[] = { 0, 1, 2, NONE, 0, 1, 2, NONE };
	enum moe_cache_policy pol[] = { MOE_CACHE_LRU, MOE_CACHE_FREQ, MOE_CACHE_BELADY };

	for (int p = 0; p < 3; p++) {
		struct moe_cache_stats st = sim(t, 8, 1, 4, 2, pol[p]);

		ck_assert_uint_eq(st.hits, 2);
		ck_assert_uint_eq(st.misses, 4);
		ck_assert_uint_eq(st.evictions, 0);
	}
}
END_TEST

START_TEST(simulate_does_not_evict_a_batch_key_for_another)
{
	/* two slots hold 0 and 1; the batch {1, 2} must evict 0, never 1 */
	static const uint32_t t[] = { 0, NONE, 1, NONE, 1, 2, NONE, 1, NONE };
	enum moe_cache_policy pol[] = { MOE_CACHE_LRU, MOE_CACHE_FREQ, MOE_CACHE_BELADY };

	for (int p = 0; p < 3; p++) {
		struct moe_cache_stats st = sim(t, 9, 1, 4, 2, pol[p]);

		ck_assert_msg(st.hits == 2, "%s: %" PRIu64 " hits", moe_cache_policy_name(pol[p]),
			      st.hits);
	}
}
END_TEST

START_TEST(simulate_refuses_bad_traces)
{
	static const uint32_t dup[] = { 1, 2, NONE, 3, 3, NONE };
	static const uint32_t far[] = { 1, NONE, 16, NONE };
	struct moe_cache_stats st;
	struct moe_err err = { 0 };

	ck_assert_int_eq(moe_cache_simulate(dup, 6, 2, 8, 2, MOE_CACHE_LRU, &st, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "key 3 (layer 0, expert 3) is in one batch twice"), "%s", err.msg);
	ck_assert_int_eq(moe_cache_simulate(far, 4, 2, 8, 2, MOE_CACHE_BELADY, &st, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "key 16 at position 2"), "%s", err.msg);
	/* an empty trace and a trailing batch without NONE are fine */
	ck_assert_int_eq(moe_cache_simulate(dup, 0, 2, 8, 2, MOE_CACHE_FREQ, &st, &err), 0);
	ck_assert_uint_eq(st.hits + st.misses, 0);
	ck_assert_int_eq(moe_cache_simulate(dup, 2, 2, 8, 2, MOE_CACHE_BELADY, &st, &err), 0);
	ck_assert_uint_eq(st.misses, 2);
}
END_TEST

/*
 * The optimum by exhaustive search under moe_cache_simulate's rules: each
 * miss may be not kept, or kept in a free slot, or kept in place of any key
 * that may go (resident, not of the current batch).  Memoised on (batch,
 * resident set), so tiny key spaces only.
 */
struct brute {
	const uint32_t *keys;
	size_t n;
	uint32_t slots;
	size_t *starts;         /* start of each batch */
	size_t n_batches;
	int64_t *memo;          /* [n_batches + 1][1 << n_keys] */
	uint32_t n_keys;
};

static int64_t brute_batch(struct brute *b, size_t bi, uint32_t resident);

static int64_t brute_miss(struct brute *b, size_t bi, const uint32_t *miss, uint32_t n_miss,
			  uint32_t resident, uint32_t batch)
{
	uint32_t bit, cand;
	int64_t best = -1;

	if (n_miss == 0)
		return brute_batch(b, bi + 1, resident);
	bit = 1u << miss[0];
	best = brute_miss(b, bi, miss + 1, n_miss - 1, resident, batch);    /* not kept */
	if ((uint32_t)__builtin_popcount(resident) < b->slots) {
		int64_t h = brute_miss(b, bi, miss + 1, n_miss - 1, resident | bit, batch);

		return h > best ? h : best;
	}
	cand = resident & ~batch;
	for (uint32_t k = 0; k < b->n_keys; k++) {
		int64_t h;

		if (!(cand & (1u << k)))
			continue;
		h = brute_miss(b, bi, miss + 1, n_miss - 1, (resident & ~(1u << k)) | bit, batch);
		if (h > best)
			best = h;
	}
	return best;
}

static int64_t brute_batch(struct brute *b, size_t bi, uint32_t resident)
{
	int64_t *memo = &b->memo[bi * ((size_t)1 << b->n_keys) + resident], hits;
	uint32_t miss[32], n_miss = 0, batch = 0;

	if (bi == b->n_batches)
		return 0;
	if (*memo >= 0)
		return *memo;
	hits = 0;
	for (size_t i = b->starts[bi]; i < b->n && b->keys[i] != NONE; i++) {
		uint32_t bit = 1u << b->keys[i];

		batch |= bit;
		if (resident & bit)
			hits++;
		else
			miss[n_miss++] = b->keys[i];
	}
	*memo = hits + brute_miss(b, bi, miss, n_miss, resident, batch);
	return *memo;
}

static uint64_t brute_optimum(const uint32_t *keys, size_t n, uint32_t n_keys, uint32_t slots)
{
	struct brute b = { .keys = keys, .n = n, .slots = slots, .n_keys = n_keys };
	int64_t r;

	b.starts = malloc((n + 1) * sizeof(*b.starts));
	for (size_t i = 0; i < n; i++)
		if (i == 0 || keys[i - 1] == NONE)
			b.starts[b.n_batches++] = i;
	b.memo = malloc((b.n_batches + 1) * ((size_t)1 << n_keys) * sizeof(*b.memo));
	for (size_t i = 0; i < (b.n_batches + 1) * ((size_t)1 << n_keys); i++)
		b.memo[i] = -1;
	r = brute_batch(&b, 0, 0);
	free(b.starts);
	free(b.memo);
	return (uint64_t)r;
}

START_TEST(belady_equals_the_exhaustive_optimum_on_tiny_traces)
{
	uint64_t s = 7;

	for (int trial = 0; trial < 3000; trial++) {
		uint32_t n_keys = 3 + (uint32_t)(moe_test_rand(&s) % 6);   /* 3..8 */
		uint32_t slots = 1 + (uint32_t)(moe_test_rand(&s) % 4);    /* 1..4 */
		uint32_t batches = 4 + (uint32_t)(moe_test_rand(&s) % 9);  /* 4..12 */
		uint32_t t[12 * 6], n = 0;
		struct moe_cache_stats st;
		uint64_t want;

		for (uint32_t b = 0; b < batches; b++) {
			uint32_t size = 1 + (uint32_t)(moe_test_rand(&s) % 5), mask = 0;

			for (uint32_t i = 0; i < size; i++) {
				/* skewed: low keys more often */
				uint32_t k = (uint32_t)(moe_test_rand(&s) % n_keys);

				if (moe_test_rand(&s) & 1)
					k = k / 2;
				if (mask & (1u << k))
					continue;
				mask |= 1u << k;
				t[n++] = k;
			}
			t[n++] = NONE;
		}
		want = brute_optimum(t, n, n_keys, slots);
		st = sim(t, n, 1, n_keys, slots, MOE_CACHE_BELADY);
		if (st.hits != want) {
			fprintf(stderr, "trace (%u slots):", slots);
			for (uint32_t i = 0; i < n; i++)
				fprintf(stderr, t[i] == NONE ? " |" : " %u", t[i]);
			fputc('\n', stderr);
		}
		ck_assert_msg(st.hits == want, "trial %d: Belady %" PRIu64 " hits, optimum %" PRIu64,
			      trial, st.hits, want);
	}
}
END_TEST

START_TEST(belady_bounds_lru_and_freq_on_random_traces)
{
	uint64_t s = 11;

	for (int trial = 0; trial < 40; trial++) {
		struct gen g = {
			.layers = 1 + (uint32_t)(moe_test_rand(&s) % 6),
			.experts = 4 + (uint32_t)(moe_test_rand(&s) % 29),
			.tokens = 1 + (uint32_t)(moe_test_rand(&s) % 4),
			.zipf = (double)(moe_test_rand(&s) % 13) / 10.0,
			.passes = 50 + (uint32_t)(moe_test_rand(&s) % 100),
			.shift = moe_test_rand(&s) & 1,
			.sticky = (double)(moe_test_rand(&s) % 8) / 10.0,
			.seed = 1000 + (uint64_t)trial,
		};
		uint32_t slots, *t;
		struct moe_cache_stats lru, freq, bel;
		size_t n;

		g.top_k = 1 + (uint32_t)(moe_test_rand(&s) % (g.experts < 4 ? g.experts : 4));
		slots = 1 + (uint32_t)(moe_test_rand(&s) % (g.layers * g.experts));
		t = gen_trace(&g, &n);
		lru = sim(t, n, g.layers, g.experts, slots, MOE_CACHE_LRU);
		freq = sim(t, n, g.layers, g.experts, slots, MOE_CACHE_FREQ);
		bel = sim(t, n, g.layers, g.experts, slots, MOE_CACHE_BELADY);
		ck_assert_msg(bel.hits >= lru.hits && bel.hits >= freq.hits,
			      "trial %d (%u slots): belady %" PRIu64 ", lru %" PRIu64 ", freq %" PRIu64,
			      trial, slots, bel.hits, lru.hits, freq.hits);
		ck_assert_uint_eq(lru.hits + lru.misses, bel.hits + bel.misses);
		free(t);
	}
}
END_TEST

/* The hit rates the report quotes: L layers x E experts, top-4 of one token. */
START_TEST(freq_beats_lru_clearly_on_zipf_routing)
{
	struct gen g = { .layers = 8, .experts = 64, .top_k = 4, .tokens = 1, .zipf = 1.0,
			 .passes = 1000, .seed = 42 };
	static const uint32_t slots[] = { 26, 51, 128, 256 };   /* 5, 10, 25, 50% */
	size_t n;
	uint32_t *t = gen_trace(&g, &n);

	for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++) {
		struct moe_cache_stats lru = sim(t, n, 8, 64, slots[i], MOE_CACHE_LRU);
		struct moe_cache_stats freq = sim(t, n, 8, 64, slots[i], MOE_CACHE_FREQ);
		struct moe_cache_stats bel = sim(t, n, 8, 64, slots[i], MOE_CACHE_BELADY);

		fprintf(stderr, "zipf(1) 8x64 top-4, %3u slots: lru %.3f freq %.3f belady %.3f\n",
			slots[i], rate(&lru), rate(&freq), rate(&bel));
		ck_assert_msg(rate(&freq) >= rate(&lru) + 0.05, "%u slots: freq %.3f, lru %.3f",
			      slots[i], rate(&freq), rate(&lru));
		ck_assert(bel.hits >= freq.hits);
	}
	/* the margin is widest where the cycle through the layers defeats LRU */
	{
		struct moe_cache_stats lru = sim(t, n, 8, 64, 51, MOE_CACHE_LRU);
		struct moe_cache_stats freq = sim(t, n, 8, 64, 51, MOE_CACHE_FREQ);

		ck_assert_msg(rate(&freq) >= rate(&lru) + 0.15, "freq %.3f, lru %.3f", rate(&freq),
			      rate(&lru));
	}
	free(t);
}
END_TEST

START_TEST(freq_follows_a_shifted_hot_set)
{
	struct gen g = { .layers = 8, .experts = 64, .top_k = 4, .tokens = 1, .zipf = 1.0,
			 .passes = 1000, .shift = true, .seed = 43 };
	size_t n, half = 0, batches = 0;
	uint32_t *t = gen_trace(&g, &n);
	struct moe_cache_stats a, b, lru_a, lru_b;
	double first, second, lru_second;

	/* the end of pass 500, where the expert order changes */
	while (batches < 500 * 8)
		batches += t[half++] == NONE;
	a = sim(t, half, 8, 64, 51, MOE_CACHE_FREQ);
	b = sim(t, n, 8, 64, 51, MOE_CACHE_FREQ);
	lru_a = sim(t, half, 8, 64, 51, MOE_CACHE_LRU);
	lru_b = sim(t, n, 8, 64, 51, MOE_CACHE_LRU);
	first = rate(&a);
	second = (double)(b.hits - a.hits) / (double)(b.hits + b.misses - a.hits - a.misses);
	lru_second = (double)(lru_b.hits - lru_a.hits) /
		     (double)(lru_b.hits + lru_b.misses - lru_a.hits - lru_a.misses);
	fprintf(stderr, "shifted hot set, 51 slots: freq %.3f before, %.3f after; lru %.3f after\n",
		first, second, lru_second);
	ck_assert_msg(second >= first - 0.03, "freq %.3f before the shift, %.3f after", first, second);
	ck_assert_msg(second >= lru_second + 0.1, "after the shift freq %.3f, lru %.3f", second,
		      lru_second);
	free(t);
}
END_TEST

START_TEST(freq_is_not_worse_than_lru_on_sticky_routing)
{
	/* tokens keep 70% of their experts from one step to the next */
	struct gen g = { .layers = 8, .experts = 64, .top_k = 4, .tokens = 1, .zipf = 1.0,
			 .passes = 1000, .sticky = 0.7, .seed = 44 };
	static const uint32_t slots[] = { 51, 128 };
	size_t n;
	uint32_t *t = gen_trace(&g, &n);

	for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++) {
		struct moe_cache_stats lru = sim(t, n, 8, 64, slots[i], MOE_CACHE_LRU);
		struct moe_cache_stats freq = sim(t, n, 8, 64, slots[i], MOE_CACHE_FREQ);
		struct moe_cache_stats bel = sim(t, n, 8, 64, slots[i], MOE_CACHE_BELADY);

		fprintf(stderr, "sticky 0.7, %3u slots: lru %.3f freq %.3f belady %.3f\n", slots[i],
			rate(&lru), rate(&freq), rate(&bel));
		ck_assert_msg(rate(&freq) >= rate(&lru) - 0.02, "%u slots: freq %.3f, lru %.3f",
			      slots[i], rate(&freq), rate(&lru));
	}
	free(t);
}
END_TEST

static Suite *cache_suite(void)
{
	Suite *s = suite_create("cache");
	TCase *tc = tcase_create("rules");

	tcase_add_test(tc, lru_evicts_least_recently_used_in_order);
	tcase_add_test(tc, simulated_lru_and_freq_count_a_hand_made_trace);
	tcase_add_test(tc, freq_keeps_a_hot_key_through_a_scan_that_lru_loses_it_to);
	tcase_add_test(tc, freq_counters_age_so_a_new_hot_set_takes_over);
	tcase_add_test(tc, pinned_keys_are_never_evicted);
	tcase_add_test(tc, pin_hottest_pins_the_most_used_and_leaves_explicit_pins);
	tcase_add_test(tc, insert_fails_with_enospc_when_all_are_pinned_in_use_or_loading);
	tcase_add_test(tc, new_refuses_bad_arguments);
	tcase_add_test(tc, random_operations_follow_the_rules);
	suite_add_tcase(s, tc);

	tc = tcase_create("simulate");
	tcase_add_test(tc, simulate_does_not_keep_a_batch_beyond_the_slots);
	tcase_add_test(tc, simulate_does_not_evict_a_batch_key_for_another);
	tcase_add_test(tc, simulate_refuses_bad_traces);
	tcase_add_test(tc, belady_equals_the_exhaustive_optimum_on_tiny_traces);
	tcase_add_test(tc, belady_bounds_lru_and_freq_on_random_traces);
	tcase_add_test(tc, freq_beats_lru_clearly_on_zipf_routing);
	tcase_add_test(tc, freq_follows_a_shifted_hot_set);
	tcase_add_test(tc, freq_is_not_worse_than_lru_on_sticky_routing);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(cache_suite(), "cache");
}
