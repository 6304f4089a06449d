/* SPDX-License-Identifier: MIT */
/*
 * The bookkeeping of one tier of the expert cache (host RAM or device
 * memory): which routed experts are resident, the slots they occupy, which
 * are pinned or in use, and which to evict next.  No I/O and no weight
 * memory here: the engine owns the slots' memory and the pager fills them;
 * this module only decides.  The same code drives the simulator that
 * compares policies on recorded routing traces (moe_cache_simulate).
 *
 * Experts are keys: key = layer_index * num_experts + expert, where
 * layer_index is the store's MoE-layer index (0..num_moe_layers-1).  Every
 * routed expert of a model has the same size, so a tier holds a fixed
 * number of equal slots (its byte budget divided by the blob size).
 *
 * Policies (details in cache.c):
 *   LRU     least recently used first.
 *   FREQ    lowest aged access counter first: every access of a key,
 *           resident or not, counts 1, and all counters halve every
 *           16 x slots accesses, so a hot expert survives a burst of cold
 *           ones and a shifted hot set takes over within a few such
 *           windows.  Two metadata-only shadow tiers (pure recency, pure
 *           frequency) score the same accesses, and the tier ranks by
 *           recency while the recency shadow is clearly ahead (sticky
 *           routing, where the experts of the last token come back).
 *   BELADY  farthest next use, and a miss needed later than every key
 *           that could make room is not kept; needs the future, so
 *           simulation only.  The most hits possible: an upper bound.
 *
 * Keys outside the key space are ignored by the void functions, ABSENT to
 * the queries and -EINVAL to the others.
 *
 * Not thread-safe: the engine serialises calls.
 */
#ifndef MOE_CACHE_H
#define MOE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

enum moe_cache_policy {
	MOE_CACHE_LRU = 0,      /* least recently used */
	MOE_CACHE_FREQ = 1,     /* frequency with aging (the default, "auto") */
	MOE_CACHE_BELADY = 2,   /* the optimum; only in moe_cache_simulate */
};

/* "lru", "freq", "belady"; NULL for a bad value. */
const char *moe_cache_policy_name(enum moe_cache_policy p);
/* "auto" (= freq), "lru", "freq": 0 and *ret set, or -EINVAL. */
int moe_cache_policy_parse(const char *s, enum moe_cache_policy *ret);

#define MOE_CACHE_NONE UINT32_MAX

/* Entry states. */
enum moe_cache_state {
	MOE_CACHE_ABSENT = 0,
	MOE_CACHE_LOADING,      /* has a slot; the pager is filling it */
	MOE_CACHE_RESIDENT,     /* has a slot; usable */
};

struct moe_cache_stats {
	uint64_t hits;          /* moe_cache_access() on a RESIDENT entry */
	uint64_t misses;        /* on an ABSENT or LOADING entry */
	uint64_t evictions;     /* entries moe_cache_insert() evicted */
	uint64_t inserts;       /* moe_cache_insert() successes */
};

struct moe_cache;

/*
 * A tier for @n_layers x @n_experts keys with @slots equal slots (0 is
 * allowed: nothing can be cached) and eviction policy @policy (LRU or
 * FREQ).  -EINVAL (with a message) for a bad policy or a key space that is
 * empty or does not fit below MOE_CACHE_NONE, -ENOMEM.  Memory is 48
 * bytes per key (FREQ: 152, for its shadows) and 8 per slot (FREQ: 24);
 * slots beyond the number of keys are never used.
 */
int moe_cache_new(uint32_t n_layers, uint32_t n_experts, uint32_t slots,
		  enum moe_cache_policy policy, struct moe_cache **ret, struct moe_err *err);
void moe_cache_free(struct moe_cache *c);

uint32_t moe_cache_slots(const struct moe_cache *c);
uint32_t moe_cache_used(const struct moe_cache *c);       /* slots held (LOADING or RESIDENT) */
/* How many moe_cache_insert() calls would succeed now: free slots plus
 * entries that may be evicted (RESIDENT, unpinned, without references). */
uint32_t moe_cache_available(const struct moe_cache *c);

enum moe_cache_state moe_cache_state(const struct moe_cache *c, uint32_t key);
/* The slot of a LOADING or RESIDENT key, else MOE_CACHE_NONE. */
uint32_t moe_cache_slot(const struct moe_cache *c, uint32_t key);

/*
 * A use of @key by a batch: counts a hit (RESIDENT) or a miss, and feeds
 * the policy (recency, frequency; aging).  Call once per key per batch.
 * Returns the state.
 */
enum moe_cache_state moe_cache_access(struct moe_cache *c, uint32_t key);

/*
 * Give @key (ABSENT) a slot, as LOADING, evicting one unpinned, unused,
 * RESIDENT entry chosen by the policy if no slot is free; the evicted key
 * is returned in *victim (MOE_CACHE_NONE if none was needed; @victim may
 * be NULL) so that the engine can drop its memory.  Returns the slot
 * (0..slots-1; a key keeps its slot until evicted or removed, and a freed
 * slot is reused, lowest first), or -ENOSPC when every slot is pinned, in
 * use or LOADING, -EEXIST when @key is not ABSENT, -EINVAL for a bad key.
 * The slot's previous contents are the victim's.
 */
int moe_cache_insert(struct moe_cache *c, uint32_t key, uint32_t *victim);

/*
 * Would a speculative insert of @key (ABSENT) be worth it: a slot is free,
 * or the entry the policy would evict is strictly colder than @key (a
 * lower aged count under FREQ, an older last use under LRU)?  Prefetches
 * ask first, so that a guess never pushes out an expert that is used more.
 */
bool moe_cache_admits(const struct moe_cache *c, uint32_t key);

/* The pager filled @key's slot: LOADING -> RESIDENT. */
void moe_cache_loaded(struct moe_cache *c, uint32_t key);

/* Forget @key (LOADING after a failed read, or RESIDENT): its slot is free.
 * Its references, pins and counts stay. */
void moe_cache_remove(struct moe_cache *c, uint32_t key);

/*
 * In-use references: a key with references is never evicted (a batch is
 * computing with it, or the pager is writing it).  Balanced pairs; a
 * reference may be taken on a key in any state.
 */
void moe_cache_ref(struct moe_cache *c, uint32_t key);
void moe_cache_unref(struct moe_cache *c, uint32_t key);

/*
 * Pinning: a pinned key is never evicted once resident.  Pins can name
 * absent keys (they stay absent until first loaded or prefetched).
 * moe_cache_pin fails with -ENOSPC if pinned keys would exceed the slots,
 * -EINVAL for a bad key.  Unpinning clears the explicit pin only: a key
 * that moe_cache_pin_hottest pinned stays pinned until its next call.
 */
int moe_cache_pin(struct moe_cache *c, uint32_t key, bool pinned);
bool moe_cache_pinned(const struct moe_cache *c, uint32_t key);

/*
 * "The N hottest by observed load": replace the automatic pins by the @n
 * keys with the highest access counts since creation (ties to the lower
 * key), leaving explicit pins (moe_cache_pin) alone; @n is capped so that
 * pins never exceed the slots.  Keys never accessed are not pinned, and a
 * key pinned both ways counts once.  Returns the number of keys pinned
 * automatically (fewer than @n when the cap or the used keys run out; 0
 * also when out of memory).  O(keys log n).
 */
uint32_t moe_cache_pin_hottest(struct moe_cache *c, uint32_t n);

/* Cumulative accesses of @key since creation (for stats and hot pins). */
uint64_t moe_cache_count(const struct moe_cache *c, uint32_t key);

void moe_cache_get_stats(const struct moe_cache *c, struct moe_cache_stats *st);

/*
 * Simulate a tier of @slots slots under @policy (LRU, FREQ or BELADY) on a
 * trace of @n accesses keys[0..n): batches of distinct keys separated by
 * MOE_CACHE_NONE entries (a batch's keys are needed together, so none of
 * them is evicted to make room for another of the same batch; a batch of
 * more keys than slots counts its extra keys as misses that are not kept).
 * Each batch is played as the engine plays it: every key accessed and the
 * resident ones referenced, then the misses inserted in order (each evicting
 * the policy's victim when no slot is free) and referenced, then all
 * released.  LRU and FREQ run the code of a tier and keep every miss while
 * a slot can be freed.  BELADY gives the slots that can be freed to the
 * misses needed again soonest, evicts the key needed farthest in the future
 * (keys next needed in the same batch by the uses after that) and does not
 * keep a miss needed later than every key that could go: the most hits any
 * policy can get under these rules (checked against an exhaustive search).
 * O(n log n) for BELADY, O(n log slots) for the others.
 * Fills *st (hits, misses, evictions, inserts).  0; -EINVAL with a message
 * for a key out of range or twice in one batch; -ENOMEM.
 */
int moe_cache_simulate(const uint32_t *keys, size_t n, uint32_t n_layers, uint32_t n_experts,
		       uint32_t slots, enum moe_cache_policy policy, struct moe_cache_stats *st,
		       struct moe_err *err);

#endif
