/* SPDX-License-Identifier: MIT */
/*
 * The expert cache's bookkeeping (cache.h).
 *
 * Every key has an entry (the key space is small: layers x experts, some
 * thousands), so the policy remembers keys that are not resident: a key
 * that comes back is ranked by its history, not as a stranger.
 *
 * The entries that may be evicted right now (RESIDENT, no references, not
 * pinned) sit in a binary heap ordered by the policy, the next victim on
 * top, so an eviction, an access, a reference or a pin costs O(log slots).
 * An entry leaves the heap while it is referenced, pinned or LOADING and
 * comes back with its current rank.
 *
 * LRU ranks by the last access (or insert), oldest out.
 *
 * FREQ ranks by an aged access counter.  Every access adds 1 to its key's
 * counter, resident or not; every window of FREQ_WINDOW_PER_SLOT x slots
 * accesses halves all counters, as TinyLFU's reset does, so a counter
 * estimates recent popularity and a shifted hot set takes over within a
 * couple of windows.  A cold newcomer starts low and is the next victim:
 * it does not push a hotter key out on its way through (admission by rank;
 * the insert itself always succeeds, the engine needs the key now).  Equal
 * counters go most recently used first: layers are visited in turn, so the
 * key used last is the one whose layer comes round again last.
 *
 * Counting alone loses to LRU when routing is sticky (a sequence keeps
 * choosing the experts it chose for the previous token): a key that was
 * just used is then likely to be used again whatever its count.  So a FREQ
 * tier also runs two shadow tiers, metadata only, over the same accesses:
 * one ranked by recency (LRU), one by the counters alone.  Every @slots
 * accesses (at least SHADOW_PERIOD_MIN) it compares their recent hits (halved each period) and ranks its
 * own entries the way of the shadow that is ahead, switching only on a lead
 * of more than 1/SHADOW_MARGIN to avoid flapping.  The shadows know nothing
 * of batches, so they infer them: a batch is a run of accesses in one layer
 * with no key repeated, and its keys are protected from each other's
 * evictions as moe_cache_simulate protects them.
 *
 * BELADY (moe_cache_simulate only) ranks by how soon the key is needed
 * again, farthest out, and does not keep a miss needed later than any key
 * that could make room: the optimum (see belady_ranks).
 *
 * Aging is lazy: each entry records the window its counter was last brought
 * up to date in and is shifted when next looked at; when a window ends only
 * the heap's members are brought up to date and the heap rebuilt, O(slots)
 * per window of at least 16 x slots accesses.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"

#define PIN_EXPLICIT 0x1u       /* moe_cache_pin */
#define PIN_AUTO 0x2u           /* moe_cache_pin_hottest */

#define NONE32 UINT32_MAX       /* no slot; not in the heap */
#define NEVER UINT64_MAX        /* BELADY: no next use */

/*
 * FREQ's aging window in accesses per slot.  Measured on Zipf traces of 8
 * to 26 layers with caches of 5-50% of the keys: with 4 x slots a steady
 * trace hits 5-15% less often than with 16 x slots (half as often at the
 * hardest point); 32 x slots hits under 1% more than 16 x slots but takes
 * 80-160 passes over the layers to recover from a shifted hot set where
 * 16 x slots takes about 40.
 */
#define FREQ_WINDOW_PER_SLOT 16u
#define FREQ_WINDOW_MIN 32u     /* tiny tiers still age over a few batches */

/* A shadow must lead by more than 1/16 of the other's hits to take over. */
#define SHADOW_MARGIN 16u
/* Shadow hits are compared every slots accesses, at least this many. */
#define SHADOW_PERIOD_MIN 32u

enum { SHADOW_RECENCY = 0, SHADOW_FREQ = 1, N_SHADOWS };

struct entry {
	uint64_t count;         /* accesses since creation */
	uint64_t stamp;         /* recency: c->clock at the last access or insert */
	uint64_t next;          /* BELADY: rank of the next use (belady_ranks) */
	uint32_t freq;          /* FREQ: aged access counter, as of epoch */
	uint32_t epoch;         /* FREQ: the window freq was last brought up to date in */
	uint32_t slot;          /* LOADING or RESIDENT: its slot; else NONE32 */
	uint32_t refs;          /* in-use references */
	uint32_t heap;          /* index in c->heap; NONE32 when not evictable */
	uint8_t state;          /* enum moe_cache_state */
	uint8_t pin;            /* PIN_* bits */
};

struct moe_cache {
	enum moe_cache_policy policy;
	bool recency;           /* FREQ: ranking by recency while that shadow leads */
	uint32_t n_experts;
	uint32_t n_keys;
	uint32_t slots;         /* as asked */
	uint32_t cap;           /* slots that can ever be held: min(slots, n_keys) */
	uint32_t n_free;
	uint32_t heap_n;
	uint32_t n_pinned;      /* keys with any pin bit, resident or not */
	uint32_t epoch;         /* FREQ: the current window */
	uint32_t window;        /* FREQ: accesses per window */
	uint32_t window_left;   /* FREQ: accesses until the counters halve */
	uint64_t clock;         /* bumped by every access and insert */
	struct entry *e;        /* [n_keys] */
	uint32_t *free_slots;   /* [cap] stack of free slots; slot 0 on top at first */
	uint32_t *heap;         /* [cap] evictable keys, the next victim at [0] */
	struct moe_cache_stats st;

	/* FREQ only (NULL in shadows and other policies): the shadow tiers */
	struct moe_cache *shadow[N_SHADOWS];
	uint64_t shadow_score[N_SHADOWS];   /* hits, halved every period */
	uint64_t shadow_hits[N_SHADOWS];    /* their hits at the last comparison */
	uint32_t period, period_left;       /* accesses between comparisons */
	uint64_t *mark;                     /* [n_keys] batch of the key's last access */
	uint64_t batch;                     /* the current inferred batch, from 1 */
	uint32_t batch_layer;
	uint32_t *batch_keys;               /* [n_experts] its keys, refs held in the shadows */
	uint32_t batch_n;
};

const char *moe_cache_policy_name(enum moe_cache_policy p)
{
	switch (p) {
	case MOE_CACHE_LRU: return "lru";
	case MOE_CACHE_FREQ: return "freq";
	case MOE_CACHE_BELADY: return "belady";
	}
	return NULL;
}

int moe_cache_policy_parse(const char *s, enum moe_cache_policy *ret)
{
	if (!s)
		return -EINVAL;
	if (!strcmp(s, "auto") || !strcmp(s, "freq"))
		*ret = MOE_CACHE_FREQ;
	else if (!strcmp(s, "lru"))
		*ret = MOE_CACHE_LRU;
	else
		return -EINVAL;
	return 0;
}

/* --- the eviction heap ------------------------------------------------------- */

/* Bring a FREQ counter up to the current window: halve once per window missed. */
static void age(const struct moe_cache *c, struct entry *e)
{
	uint32_t windows = c->epoch - e->epoch;

	if (!windows)
		return;
	e->freq = windows >= 32 ? 0 : e->freq >> windows;
	e->epoch = c->epoch;
}

/* Should @a be evicted before @b?  Heap members' counters are always current. */
static bool before(const struct moe_cache *c, const struct entry *a, const struct entry *b)
{
	switch (c->policy) {
	case MOE_CACHE_FREQ:
		if (c->recency)
			break;
		if (a->freq != b->freq)
			return a->freq < b->freq;
		return a->stamp > b->stamp;
	case MOE_CACHE_BELADY:
		if (a->next != b->next)
			return a->next > b->next;
		break;
	case MOE_CACHE_LRU:
		break;
	}
	return a->stamp < b->stamp;
}

static void heap_set(struct moe_cache *c, uint32_t i, uint32_t key)
{
	c->heap[i] = key;
	c->e[key].heap = i;
}

static void sift_up(struct moe_cache *c, uint32_t i)
{
	uint32_t key = c->heap[i];

	while (i > 0) {
		uint32_t parent = (i - 1) / 2;

		if (!before(c, &c->e[key], &c->e[c->heap[parent]]))
			break;
		heap_set(c, i, c->heap[parent]);
		i = parent;
	}
	heap_set(c, i, key);
}

static void sift_down(struct moe_cache *c, uint32_t i)
{
	uint32_t key = c->heap[i];

	for (;;) {
		uint32_t l = 2 * i + 1, best = l;

		if (l >= c->heap_n)
			break;
		if (l + 1 < c->heap_n && before(c, &c->e[c->heap[l + 1]], &c->e[c->heap[l]]))
			best = l + 1;
		if (!before(c, &c->e[c->heap[best]], &c->e[key]))
			break;
		heap_set(c, i, c->heap[best]);
		i = best;
	}
	heap_set(c, i, key);
}

/* Restore the order after the rank of heap[i] moved either way. */
static void heap_fix(struct moe_cache *c, uint32_t i)
{
	if (i > 0 && before(c, &c->e[c->heap[i]], &c->e[c->heap[(i - 1) / 2]]))
		sift_up(c, i);
	else
		sift_down(c, i);
}

static void heap_del(struct moe_cache *c, uint32_t key)
{
	uint32_t i = c->e[key].heap, last = c->heap[--c->heap_n];

	c->e[key].heap = NONE32;
	if (i == c->heap_n)
		return;
	heap_set(c, i, last);
	heap_fix(c, i);
}

static void heapify(struct moe_cache *c)
{
	for (uint32_t i = c->heap_n / 2; i-- > 0;)
		sift_down(c, i);
}

static bool evictable(const struct entry *e)
{
	return e->state == MOE_CACHE_RESIDENT && e->refs == 0 && e->pin == 0;
}

/* Put @key in or out of the heap after its state, references or pins changed. */
static void sync(struct moe_cache *c, uint32_t key)
{
	struct entry *e = &c->e[key];

	if (!evictable(e)) {
		if (e->heap != NONE32)
			heap_del(c, key);
		return;
	}
	age(c, e);
	if (e->heap == NONE32) {
		e->heap = c->heap_n++;
		c->heap[e->heap] = key;
		sift_up(c, e->heap);
	} else {
		heap_fix(c, e->heap);
	}
}

/* FREQ: a window ended; halve every counter (lazily) and re-rank the heap. */
static void next_window(struct moe_cache *c)
{
	c->epoch++;
	c->window_left = c->window;
	for (uint32_t i = 0; i < c->heap_n; i++)
		age(c, &c->e[c->heap[i]]);
	heapify(c);
}

/* --- the shadows (FREQ) ------------------------------------------------------ */

/* Every period: rank like the shadow that has had clearly more hits lately. */
static void shadow_compare(struct moe_cache *c)
{
	int cur = c->recency ? SHADOW_RECENCY : SHADOW_FREQ, other = !cur;

	for (int g = 0; g < N_SHADOWS; g++) {
		uint64_t h = c->shadow[g]->st.hits;

		c->shadow_score[g] = c->shadow_score[g] / 2 + (h - c->shadow_hits[g]);
		c->shadow_hits[g] = h;
	}
	if (c->shadow_score[other] > c->shadow_score[cur] + c->shadow_score[cur] / SHADOW_MARGIN + 1) {
		c->recency = !c->recency;
		heapify(c);
	}
}

/* Play an access on the shadows, as moe_cache_simulate plays a batch. */
static void shadow_access(struct moe_cache *c, uint32_t key)
{
	uint32_t layer = key / c->n_experts;

	if (layer != c->batch_layer || c->mark[key] == c->batch) {
		/* a new batch: the last one's keys may go */
		for (uint32_t i = 0; i < c->batch_n; i++)
			for (int g = 0; g < N_SHADOWS; g++)
				moe_cache_unref(c->shadow[g], c->batch_keys[i]);
		c->batch_n = 0;
		c->batch++;
		c->batch_layer = layer;
	}
	c->mark[key] = c->batch;
	c->batch_keys[c->batch_n++] = key;
	for (int g = 0; g < N_SHADOWS; g++) {
		struct moe_cache *s = c->shadow[g];

		if (moe_cache_access(s, key) == MOE_CACHE_ABSENT && moe_cache_insert(s, key, NULL) >= 0)
			moe_cache_loaded(s, key);
		moe_cache_ref(s, key);
	}
	if (--c->period_left == 0) {
		c->period_left = c->period;
		shadow_compare(c);
	}
}

/* --- the tier ---------------------------------------------------------------- */

static int cache_new(uint32_t n_layers, uint32_t n_experts, uint32_t slots,
		     enum moe_cache_policy policy, bool shadows, struct moe_cache **ret,
		     struct moe_err *err)
{
	uint64_t n_keys = (uint64_t)n_layers * n_experts;
	struct moe_cache *c;
	int r = -ENOMEM;

	if (!moe_cache_policy_name(policy))
		return moe_err_set(err, -EINVAL, "cache: unknown policy %d", (int)policy);
	/* MOE_CACHE_NONE is not a key */
	if (n_keys == 0 || n_keys >= MOE_CACHE_NONE)
		return moe_err_set(err, -EINVAL, "cache: %" PRIu32 " layers x %" PRIu32
				   " experts is not a key space of 1 to %" PRIu32 " keys",
				   n_layers, n_experts, MOE_CACHE_NONE - 1);
	c = calloc(1, sizeof(*c));
	if (!c)
		return moe_err_set(err, -ENOMEM, "cache: out of memory");
	c->policy = policy;
	c->n_experts = n_experts;
	c->n_keys = (uint32_t)n_keys;
	c->slots = slots;
	c->cap = slots < c->n_keys ? slots : c->n_keys;
	if (c->cap > INT_MAX)   /* moe_cache_insert returns the slot as an int */
		c->cap = INT_MAX;
	c->e = malloc(n_keys * sizeof(*c->e));
	c->free_slots = malloc(((size_t)c->cap + 1) * sizeof(*c->free_slots));
	c->heap = malloc(((size_t)c->cap + 1) * sizeof(*c->heap));
	if (!c->e || !c->free_slots || !c->heap)
		goto fail;
	for (uint32_t k = 0; k < c->n_keys; k++)
		c->e[k] = (struct entry){ .slot = NONE32, .heap = NONE32 };
	for (uint32_t s = 0; s < c->cap; s++)
		c->free_slots[s] = c->cap - 1 - s;
	c->n_free = c->cap;
	c->window = (uint32_t)(c->cap > UINT32_MAX / FREQ_WINDOW_PER_SLOT ? UINT32_MAX :
			       FREQ_WINDOW_PER_SLOT * c->cap);
	if (c->window < FREQ_WINDOW_MIN)
		c->window = FREQ_WINDOW_MIN;
	c->window_left = c->window;

	if (shadows && policy == MOE_CACHE_FREQ) {
		r = cache_new(n_layers, n_experts, slots, MOE_CACHE_LRU, false,
			      &c->shadow[SHADOW_RECENCY], err);
		if (r == 0)
			r = cache_new(n_layers, n_experts, slots, MOE_CACHE_FREQ, false,
				      &c->shadow[SHADOW_FREQ], err);
		if (r < 0)
			goto fail;
		r = -ENOMEM;
		c->mark = calloc(n_keys, sizeof(*c->mark));
		c->batch_keys = malloc((size_t)n_experts * sizeof(*c->batch_keys));
		if (!c->mark || !c->batch_keys)
			goto fail;
		c->period = c->cap > SHADOW_PERIOD_MIN ? c->cap : SHADOW_PERIOD_MIN;
		c->period_left = c->period;
		c->batch = 1;
		c->batch_layer = NONE32;
	}
	*ret = c;
	return 0;

fail:
	moe_cache_free(c);
	return moe_err_set(err, r, "cache: out of memory for %" PRIu64 " keys and %" PRIu32 " slots",
			   n_keys, slots);
}

int moe_cache_new(uint32_t n_layers, uint32_t n_experts, uint32_t slots,
		  enum moe_cache_policy policy, struct moe_cache **ret, struct moe_err *err)
{
	if (policy != MOE_CACHE_LRU && policy != MOE_CACHE_FREQ)
		return moe_err_set(err, -EINVAL, "cache: policy %d is not one of lru, freq "
				   "(belady exists only in simulation)", (int)policy);
	return cache_new(n_layers, n_experts, slots, policy, true, ret, err);
}

void moe_cache_free(struct moe_cache *c)
{
	if (!c)
		return;
	for (int g = 0; g < N_SHADOWS; g++)
		moe_cache_free(c->shadow[g]);
	free(c->mark);
	free(c->batch_keys);
	free(c->e);
	free(c->free_slots);
	free(c->heap);
	free(c);
}

uint32_t moe_cache_slots(const struct moe_cache *c)
{
	return c->slots;
}

uint32_t moe_cache_used(const struct moe_cache *c)
{
	return c->cap - c->n_free;
}

uint32_t moe_cache_available(const struct moe_cache *c)
{
	return c->n_free + c->heap_n;
}

enum moe_cache_state moe_cache_state(const struct moe_cache *c, uint32_t key)
{
	return key < c->n_keys ? (enum moe_cache_state)c->e[key].state : MOE_CACHE_ABSENT;
}

uint32_t moe_cache_slot(const struct moe_cache *c, uint32_t key)
{
	return key < c->n_keys ? c->e[key].slot : MOE_CACHE_NONE;
}

enum moe_cache_state moe_cache_access(struct moe_cache *c, uint32_t key)
{
	struct entry *e;

	if (key >= c->n_keys)
		return MOE_CACHE_ABSENT;
	e = &c->e[key];
	e->count++;
	e->stamp = ++c->clock;
	if (e->state == MOE_CACHE_RESIDENT)
		c->st.hits++;
	else
		c->st.misses++;
	if (c->policy == MOE_CACHE_FREQ) {
		age(c, e);
		if (e->freq < UINT32_MAX)
			e->freq++;
	}
	if (e->heap != NONE32)
		heap_fix(c, e->heap);
	if (c->policy == MOE_CACHE_FREQ && --c->window_left == 0)
		next_window(c);
	if (c->shadow[0])
		shadow_access(c, key);
	return (enum moe_cache_state)e->state;
}

int moe_cache_insert(struct moe_cache *c, uint32_t key, uint32_t *victim)
{
	uint32_t slot, v = MOE_CACHE_NONE;
	struct entry *e;

	if (key >= c->n_keys)
		return -EINVAL;
	e = &c->e[key];
	if (e->state != MOE_CACHE_ABSENT)
		return -EEXIST;
	if (c->n_free) {
		slot = c->free_slots[--c->n_free];
	} else {
		struct entry *ve;

		if (!c->heap_n)
			return -ENOSPC;
		v = c->heap[0];
		ve = &c->e[v];
		heap_del(c, v);
		slot = ve->slot;
		ve->state = MOE_CACHE_ABSENT;
		ve->slot = NONE32;
		c->st.evictions++;
	}
	e->state = MOE_CACHE_LOADING;
	e->slot = slot;
	e->stamp = ++c->clock;
	c->st.inserts++;
	if (victim)
		*victim = v;
	return (int)slot;
}

bool moe_cache_admits(const struct moe_cache *c, uint32_t key)
{
	const struct entry *v;
	struct entry k;

	if (key >= c->n_keys || c->e[key].state != MOE_CACHE_ABSENT)
		return false;
	if (c->n_free)
		return true;
	if (!c->heap_n)
		return false;
	v = &c->e[c->heap[0]];
	k = c->e[key];
	if (c->policy == MOE_CACHE_FREQ && !c->recency) {
		uint32_t windows = c->epoch - k.epoch;

		k.freq = windows >= 32 ? 0 : k.freq >> windows;
		return v->freq < k.freq;
	}
	return v->stamp < k.stamp;
}

void moe_cache_loaded(struct moe_cache *c, uint32_t key)
{
	if (key >= c->n_keys || c->e[key].state != MOE_CACHE_LOADING)
		return;
	c->e[key].state = MOE_CACHE_RESIDENT;
	sync(c, key);
}

void moe_cache_remove(struct moe_cache *c, uint32_t key)
{
	struct entry *e;

	if (key >= c->n_keys || c->e[key].state == MOE_CACHE_ABSENT)
		return;
	e = &c->e[key];
	if (e->heap != NONE32)
		heap_del(c, key);
	c->free_slots[c->n_free++] = e->slot;
	e->slot = NONE32;
	e->state = MOE_CACHE_ABSENT;
}

void moe_cache_ref(struct moe_cache *c, uint32_t key)
{
	if (key >= c->n_keys || c->e[key].refs == UINT32_MAX)
		return;
	if (c->e[key].refs++ == 0)
		sync(c, key);
}

void moe_cache_unref(struct moe_cache *c, uint32_t key)
{
	if (key >= c->n_keys || c->e[key].refs == 0)
		return;
	if (--c->e[key].refs == 0)
		sync(c, key);
}

/* Set or clear the pin bits @bits of @key, keeping n_pinned and the heap right. */
static void set_pin(struct moe_cache *c, uint32_t key, uint8_t bits, bool on)
{
	struct entry *e = &c->e[key];
	uint8_t old = e->pin;

	e->pin = on ? (uint8_t)(old | bits) : (uint8_t)(old & ~bits);
	if (!old == !e->pin)
		return;
	if (e->pin)
		c->n_pinned++;
	else
		c->n_pinned--;
	sync(c, key);
}

int moe_cache_pin(struct moe_cache *c, uint32_t key, bool pinned)
{
	if (key >= c->n_keys)
		return -EINVAL;
	if (pinned && !c->e[key].pin && c->n_pinned >= c->slots)
		return -ENOSPC;
	set_pin(c, key, PIN_EXPLICIT, pinned);
	return 0;
}

bool moe_cache_pinned(const struct moe_cache *c, uint32_t key)
{
	return key < c->n_keys && c->e[key].pin;
}

/* Heap order for pin_hottest: higher count first, ties to the lower key. */
static bool hotter(const struct entry *e, uint32_t a, uint32_t b)
{
	if (e[a].count != e[b].count)
		return e[a].count > e[b].count;
	return a < b;
}

/*
 * Keep the n hottest keys seen so far in @top, a heap with the coldest of
 * them at [0]: O(n_keys log n), no sort of the whole key space.
 */
static void top_sift_down(const struct entry *e, uint32_t *top, uint32_t n, uint32_t i)
{
	uint32_t key = top[i];

	for (;;) {
		uint32_t l = 2 * i + 1, worst = l;

		if (l >= n)
			break;
		if (l + 1 < n && hotter(e, top[l], top[l + 1]))
			worst = l + 1;
		if (!hotter(e, key, top[worst]))
			break;
		top[i] = top[worst];
		i = worst;
	}
	top[i] = key;
}

uint32_t moe_cache_pin_hottest(struct moe_cache *c, uint32_t n)
{
	uint32_t *top, m = 0, pinned = 0;

	for (uint32_t k = 0; k < c->n_keys; k++)
		if (c->e[k].pin & PIN_AUTO)
			set_pin(c, k, PIN_AUTO, false);
	if (n > c->slots)
		n = c->slots;
	if (n > c->n_keys)
		n = c->n_keys;
	if (n == 0)
		return 0;
	top = malloc((size_t)n * sizeof(*top));
	if (!top)
		return 0;
	/* keys never used are no candidates */
	for (uint32_t k = 0; k < c->n_keys; k++) {
		if (!c->e[k].count)
			continue;
		if (m < n) {
			top[m++] = k;
			if (m == n)
				for (uint32_t i = n / 2; i-- > 0;)
					top_sift_down(c->e, top, n, i);
		} else if (hotter(c->e, k, top[0])) {
			top[0] = k;
			top_sift_down(c->e, top, n, 0);
		}
	}
	if (m < n)
		for (uint32_t i = m / 2; i-- > 0;)
			top_sift_down(c->e, top, m, i);
	/* heap sort, hottest first, so that the cap on pins cuts the coldest */
	for (uint32_t i = m; i-- > 1;) {
		uint32_t k = top[0];

		top[0] = top[i];
		top[i] = k;
		top_sift_down(c->e, top, i, 0);
	}
	for (uint32_t i = 0; i < m; i++) {
		if (!c->e[top[i]].pin && c->n_pinned >= c->slots)
			break;
		set_pin(c, top[i], PIN_AUTO, true);
		pinned++;
	}
	free(top);
	return pinned;
}

uint64_t moe_cache_count(const struct moe_cache *c, uint32_t key)
{
	return key < c->n_keys ? c->e[key].count : 0;
}

void moe_cache_get_stats(const struct moe_cache *c, struct moe_cache_stats *st)
{
	*st = c->st;
}

/* --- the simulator ------------------------------------------------------------- */

/* BELADY: an access and the rank of its key's next use. */
struct miss {
	uint64_t next;
	uint32_t key;           /* or the offset of the access in its batch */
};

static int sooner(const void *pa, const void *pb)
{
	const struct miss *a = pa, *b = pb;

	if (a->next != b->next)
		return a->next < b->next ? -1 : 1;
	return a->key < b->key ? -1 : a->key > b->key;
}

/*
 * BELADY's ranks: for each access keys[j], how soon the key is needed again,
 * as a rank among all accesses (NEVER: not again).  Keys next needed in the
 * same batch are needed equally soon; the use after that tells them apart,
 * and so on: ranks order the sequences of future batches lexicographically
 * (farthest next use alone, with batches, loses to the exhaustive optimum;
 * see the cache tests).  Computed from the last batch back: an access ranks
 * by its batch, then by the rank of its key's next access.  @last has a
 * place per key, @scratch one per access of the longest batch.
 */
static uint64_t *belady_ranks(const uint32_t *keys, size_t n, uint32_t n_keys, uint64_t *last,
			      struct miss *scratch)
{
	uint64_t *prio = malloc((n ? n : 1) * sizeof(*prio)), *rank = malloc((n ? n : 1) * sizeof(*rank));
	uint64_t below = n;     /* every rank given so far is at least this */

	if (!prio || !rank) {
		free(prio);
		free(rank);
		return NULL;
	}
	for (uint32_t k = 0; k < n_keys; k++)
		last[k] = NEVER;
	for (size_t end = n; end > 0;) {
		size_t start = end;
		uint32_t m;

		if (keys[end - 1] == MOE_CACHE_NONE) {
			end--;
			continue;
		}
		while (start > 0 && keys[start - 1] != MOE_CACHE_NONE)
			start--;
		m = (uint32_t)(end - start);
		for (size_t j = start; j < end; j++) {
			uint64_t p = last[keys[j]];

			prio[j] = p == NEVER ? NEVER : rank[p];
			scratch[j - start] = (struct miss){ .next = prio[j], .key = (uint32_t)(j - start) };
			last[keys[j]] = j;
		}
		qsort(scratch, m, sizeof(*scratch), sooner);
		for (uint32_t i = 0; i < m; i++)
			rank[start + scratch[i].key] = below - m + i;
		below -= m;
		end = start;
	}
	free(rank);
	return prio;
}

/*
 * BELADY's misses of one batch.  They are needed at the same moment, so
 * the few slots that can be freed go to those needed again soonest, and a
 * miss needed later than every key that could make room for it is not kept
 * (Belady's MIN with bypass: an evicted key would have been worth more).
 */
static void belady_misses(struct moe_cache *c, struct miss *m, uint32_t n)
{
	qsort(m, n, sizeof(*m), sooner);
	for (uint32_t i = 0; i < n; i++) {
		if (!c->n_free && (!c->heap_n || c->e[c->heap[0]].next <= m[i].next))
			break;  /* this one and the rest are needed later still */
		if (moe_cache_insert(c, m[i].key, NULL) >= 0) {
			moe_cache_loaded(c, m[i].key);
			moe_cache_ref(c, m[i].key);
		}
	}
}

int moe_cache_simulate(const uint32_t *keys, size_t n, uint32_t n_layers, uint32_t n_experts,
		       uint32_t slots, enum moe_cache_policy policy, struct moe_cache_stats *st,
		       struct moe_err *err)
{
	uint64_t *next = NULL, *seen = NULL, batch = 1;
	struct miss *miss = NULL;
	struct moe_cache *c;
	size_t longest = 0, len = 0;
	int r;

	r = cache_new(n_layers, n_experts, slots, policy, true, &c, err);
	if (r < 0)
		return r;

	/* The trace: keys in range, distinct within a batch. */
	seen = calloc(c->n_keys, sizeof(*seen));
	if (!seen) {
		r = moe_err_set(err, -ENOMEM, "cache simulation: out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		if (keys[i] == MOE_CACHE_NONE) {
			batch++;
			len = 0;
			continue;
		}
		if (++len > longest)
			longest = len;
		if (keys[i] >= c->n_keys) {
			r = moe_err_set(err, -EINVAL, "cache simulation: key %" PRIu32 " at position %zu "
					"is outside %" PRIu32 " layers x %" PRIu32 " experts",
					keys[i], i, n_layers, n_experts);
			goto out;
		}
		if (seen[keys[i]] == batch) {
			r = moe_err_set(err, -EINVAL, "cache simulation: key %" PRIu32 " (layer %" PRIu32
					", expert %" PRIu32 ") is in one batch twice, the second time "
					"at position %zu", keys[i], keys[i] / n_experts,
					keys[i] % n_experts, i);
			goto out;
		}
		seen[keys[i]] = batch;
	}

	if (policy == MOE_CACHE_BELADY) {
		miss = malloc((longest ? longest : 1) * sizeof(*miss));
		next = miss ? belady_ranks(keys, n, c->n_keys, seen, miss) : NULL;
		if (!next) {
			r = moe_err_set(err, -ENOMEM, "cache simulation: out of memory for %zu accesses", n);
			goto out;
		}
	}

	for (size_t i = 0; i < n;) {
		size_t end = i;

		while (end < n && keys[end] != MOE_CACHE_NONE)
			end++;
		/* The batch's resident keys are taken before its misses look for victims. */
		for (size_t j = i; j < end; j++) {
			if (next)
				c->e[keys[j]].next = next[j];
			if (moe_cache_access(c, keys[j]) == MOE_CACHE_RESIDENT)
				moe_cache_ref(c, keys[j]);
		}
		if (miss) {
			uint32_t n_miss = 0;

			for (size_t j = i; j < end; j++)
				if (c->e[keys[j]].state == MOE_CACHE_ABSENT)
					miss[n_miss++] = (struct miss){ .next = next[j], .key = keys[j] };
			belady_misses(c, miss, n_miss);
		} else {
			for (size_t j = i; j < end; j++) {
				if (c->e[keys[j]].state != MOE_CACHE_ABSENT)
					continue;
				/* -ENOSPC: the batch holds every slot; a miss that is not kept */
				if (moe_cache_insert(c, keys[j], NULL) >= 0) {
					moe_cache_loaded(c, keys[j]);
					moe_cache_ref(c, keys[j]);
				}
			}
		}
		for (size_t j = i; j < end; j++)
			moe_cache_unref(c, keys[j]);
		i = end + 1;
	}
	*st = c->st;
	r = 0;
out:
	free(miss);
	free(next);
	free(seen);
	moe_cache_free(c);
	return r;
}
