/* SPDX-License-Identifier: MIT */
/*
 * STATS: the figures of moed, its sessions and its engine as one JSON
 * text.  The engine's figures belong to the data thread, so the snapshot
 * is taken there, between passes, when the control thread asks for one
 * (stats_wanted); the data thread then says so on stats_efd.  STATS never
 * blocks the control thread: a request waits for the next snapshot (a
 * session waits at most STATS_WAIT_MS, then gets the latest one), and the
 * answer goes out with MSG_DONTWAIT, the rest when the socket is writable
 * again (session.c).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <jansson.h>

#include "engine/clock.h"
#include "engine/engine.h"
#include "proto/proto.h"
#include "log.h"
#include "server_impl.h"

#define STATS_WAIT_MS 2000          /* how long a request waits for a fresh snapshot */

/* Queue one STATS answer (@json) for @c and start sending it. */
static int stats_answer(struct moed_server *s, struct client *c, const char *json)
{
	return session_reply(s, c, MOE_MSG_STATS, json, strlen(json));
}

static void stats_waiter_remove(struct moed_server *s, struct client *c)
{
	for (struct client **pp = &s->stats_waiters; *pp; pp = &(*pp)->stats_next)
		if (*pp == c) {
			*pp = c->stats_next;
			c->stats_next = NULL;
			return;
		}
}

void stats_forget(struct moed_server *s, struct client *c)
{
	stats_waiter_remove(s, c);
	c->stats_waiting = 0;
}

/* Answer the waiting sessions: all (@all) or those waiting too long. */
void stats_deliver(struct moed_server *s, bool all)
{
	uint64_t now = moe_now_ns();
	char *json;

	pthread_mutex_lock(&s->lock);
	json = strdup(s->stats_json ? s->stats_json : "{}");
	pthread_mutex_unlock(&s->lock);
	for (struct client *c = s->stats_waiters, *next; c; c = next) {
		int r = 0;

		next = c->stats_next;
		if (!all && now - c->stats_since < (uint64_t)STATS_WAIT_MS * 1000000u)
			continue;
		stats_waiter_remove(s, c);
		for (; c->stats_waiting && r == 0; c->stats_waiting--)
			r = json ? stats_answer(s, c, json) : -ENOMEM;
		if (r < 0)
			session_end(s, c);   /* a partial answer would leave the stream out of step */
	}
	free(json);
}

void stats_request(struct moed_server *s, struct client *c)
{
	atomic_store(&c->asked_stats, true);
	if (!c->stats_waiting++) {
		c->stats_since = moe_now_ns();
		c->stats_next = s->stats_waiters;
		s->stats_waiters = c;
	}
	atomic_store(&s->stats_wanted, true);
	dataplane_wake(s);
}

/* The stats eventfd: the data thread has a fresh snapshot. */
void stats_ready_event(struct moed_loop *l, int fd, void *data, unsigned mask)
{
	uint64_t v;

	(void)l;
	(void)mask;
	if (read(fd, &v, sizeof(v)) == sizeof(v))
		stats_deliver(data, true);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* A session that asked for the figures and sent no request (data thread). */
static bool is_observer(const struct client *c)
{
	return atomic_load(&c->asked_stats) && !c->requests;
}

/* The stats snapshot, on the data thread (the engine is its alone). */
void stats_snapshot(struct moed_server *s)
{
	const struct moe_store *st = moe_engine_store(s->engine);
	uint32_t E = s->mc->num_experts;
	char *eng = moe_engine_stats_json(s->engine);
	json_t *root = json_object(), *clients = json_array(), *load = json_array(), *lat;
	uint64_t n = s->lat_n < LAT_SAMPLES ? s->lat_n : LAT_SAMPLES;
	uint64_t *sorted = malloc((n ? n : 1) * sizeof(uint64_t));
	uint64_t *counts = malloc(E * sizeof(uint64_t));
	double up = (double)(moe_now_ns() - s->started_ns) / 1e9;
	char *text;

	json_object_set_new(root, "model", json_string(st->hdr.model_type));
	json_object_set_new(root, "store", json_string(st->path));
	json_object_set_new(root, "uptime_s", json_real(up));
	{
		/* whoever asks for the figures (moectl stats) is no client of
		 * the model's: neither counted nor listed */
		int live = (int)atomic_load(&s->live_clients);

		for (struct client *c = s->clients; c; c = c->next)
			live -= is_observer(c) && !atomic_load(&c->dead);
		json_object_set_new(root, "clients_connected", json_integer(live > 0 ? live : 0));
	}
	json_object_set_new(root, "requests", json_integer((json_int_t)s->total_requests));
	json_object_set_new(root, "tokens", json_integer((json_int_t)s->total_tokens));
	json_object_set_new(root, "errors", json_integer((json_int_t)s->total_errors));
	json_object_set_new(root, "batches", json_integer((json_int_t)s->total_batches));
	json_object_set_new(root, "tokens_per_s", json_real(atomic_load_explicit(&s->tps, memory_order_relaxed)));
	lat = json_object();
	if (sorted && n) {
		memcpy(sorted, s->lat, n * sizeof(uint64_t));
		qsort(sorted, n, sizeof(uint64_t), cmp_u64);
		json_object_set_new(lat, "samples", json_integer((json_int_t)n));
		json_object_set_new(lat, "p50_us", json_real((double)sorted[n / 2] / 1e3));
		json_object_set_new(lat, "p90_us", json_real((double)sorted[n * 9 / 10] / 1e3));
		json_object_set_new(lat, "p99_us", json_real((double)sorted[n * 99 / 100] / 1e3));
		json_object_set_new(lat, "max_us", json_real((double)sorted[n - 1] / 1e3));
	}
	json_object_set_new(root, "latency", lat);
	{
		/* what peers made moed say, every one, also those the log
		 * left out (log.h, rate-limited messages) */
		json_t *ev = json_object();

		for (int i = 0; i < MOED_EVENT_COUNT; i++)
			json_object_set_new(ev, moed_log_event_name((enum moed_event)i),
					    json_integer((json_int_t)moed_log_event_count((enum moed_event)i)));
		json_object_set_new(root, "events", ev);
	}
	for (struct client *c = s->clients; c; c = c->next)
		if (!is_observer(c))
			json_array_append_new(clients, json_pack("{s:i,s:i,s:i,s:I,s:I,s:I}", "id",
								 (int)c->id,
								 "pid", (int)c->pid, "uid", (int)c->uid,
								 "requests", (json_int_t)c->requests,
								 "tokens", (json_int_t)c->tokens,
								 "errors", (json_int_t)c->errors));
	json_object_set_new(root, "clients", clients);
	for (uint32_t i = 0; counts && i < st->hdr.num_moe_layers; i++) {
		json_t *arr = json_array();

		moe_engine_expert_load(s->engine, st->layers[i].layer, counts);
		for (uint32_t e = 0; e < E; e++)
			json_array_append_new(arr, json_integer((json_int_t)counts[e]));
		json_array_append_new(load, json_pack("{s:i,s:o}", "layer", (int)st->layers[i].layer,
						      "experts", arr));
	}
	json_object_set_new(root, "expert_load", load);
	if (eng) {
		json_t *e = json_loads(eng, 0, NULL);
		if (e)
			json_object_set_new(root, "engine", e);
	}
	/* ten significant digits: no 7.9694761649999997 (jansson's default is 17) */
	text = json_dumps(root, JSON_PRESERVE_ORDER | JSON_COMPACT | JSON_REAL_PRECISION(10));
	json_decref(root);
	free(eng);
	free(sorted);
	free(counts);
	pthread_mutex_lock(&s->lock);
	if (text) {
		free(s->stats_json);
		s->stats_json = text;
	}
	s->stats_gen++;
	pthread_mutex_unlock(&s->lock);
	{
		uint64_t one = 1;
		ssize_t w = write(s->stats_efd, &one, sizeof(one));

		(void)w;      /* the counter cannot overflow in practice; the next one says it too */
	}
}
