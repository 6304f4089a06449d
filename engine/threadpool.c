/* SPDX-License-Identifier: MIT */
/*
 * A fixed pool of workers for one parallel loop at a time.
 *
 * The caller publishes a job by bumping `generation` (release) and joins in
 * itself; workers spin briefly on the generation before sleeping on a
 * condition variable, because the engine runs several short loops back to
 * back (router, gate/up, down, combine) and a sleep/wake per loop would
 * cost more than a decode-sized loop takes.  Tasks are claimed with an
 * atomic counter; completion is counted per task.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "threadpool.h"

/* Spins before a worker sleeps: ~50-100 us on current cores, longer than the
 * gap between two loops of one forward, far shorter than a client's think
 * time. */
#define POOL_SPIN 4000

struct moe_threadpool {
	uint32_t n;                   /* workers including the caller */
	pthread_t *threads;           /* n - 1 */
	pthread_mutex_t lock;
	pthread_cond_t wake;          /* workers sleep here */
	pthread_cond_t done_cv;       /* the caller sleeps here */
	atomic_uint_fast64_t generation; /* bumped per job (release) */
	atomic_bool stop;                /* a worker that woke for a job reads it unlocked */

	/*
	 * Jobs alternate between two slots (generation & 1).  A task is claimed
	 * by a CAS on `ticket` = generation << 32 | next task index, so a worker
	 * that wakes late for an old generation can never claim a task of the
	 * current one, nor read a slot that is being rewritten: a successful
	 * CAS proves its job is still the current one.  Only n_tasks is read
	 * before that proof (by a worker that has claimed nothing yet, so the
	 * caller may already be rewriting the slot two jobs on): it is atomic,
	 * and a stale value is harmless, as the CAS then fails.
	 */
	struct pool_job {
		moe_task_fn fn;
		void *ctx;
		atomic_size_t n_tasks;
	} jobs[2];
	atomic_uint_fast64_t ticket;
	atomic_size_t done;           /* tasks of the current job finished */
	atomic_uint sleepers;         /* workers asleep on `wake` */
};

struct worker_arg {
	struct moe_threadpool *p;
	uint32_t id;
};

static void run_tasks(struct moe_threadpool *p, uint64_t gen, uint32_t worker)
{
	struct pool_job *job = &p->jobs[gen & 1];
	size_t finished = 0, n_tasks = 0;
	uint64_t t;

	for (;;) {
		t = atomic_load_explicit(&p->ticket, memory_order_acquire);
		if ((uint32_t)(t >> 32) != (uint32_t)gen)
			break;
		n_tasks = atomic_load_explicit(&job->n_tasks, memory_order_relaxed);
		if ((t & 0xffffffffu) >= n_tasks)
			break;
		if (!atomic_compare_exchange_weak_explicit(&p->ticket, &t, t + 1,
							   memory_order_acq_rel, memory_order_acquire))
			continue;
		job->fn(job->ctx, (size_t)(t & 0xffffffffu), worker);
		finished++;
	}
	/* acq_rel: our task outputs happen-before the caller sees the count */
	if (finished &&
	    atomic_fetch_add_explicit(&p->done, finished, memory_order_acq_rel) + finished == n_tasks) {
		pthread_mutex_lock(&p->lock);
		pthread_cond_signal(&p->done_cv);
		pthread_mutex_unlock(&p->lock);
	}
}

static void *worker_main(void *arg)
{
	struct worker_arg *wa = arg;
	struct moe_threadpool *p = wa->p;
	uint32_t id = wa->id;
	uint64_t seen = 0;

	free(wa);
	for (;;) {
		uint64_t g;
		int spins = 0;

		while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
		       spins < POOL_SPIN) {
			__builtin_ia32_pause();
			spins++;
		}
		if (g == seen) {
			pthread_mutex_lock(&p->lock);
			atomic_fetch_add(&p->sleepers, 1);
			/* seq_cst pairs with the caller's bump-then-read-sleepers */
			while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
				pthread_cond_wait(&p->wake, &p->lock);
			atomic_fetch_sub(&p->sleepers, 1);
			pthread_mutex_unlock(&p->lock);
		}
		if (atomic_load(&p->stop))
			return NULL;
		seen = g;
		run_tasks(p, g, id);
	}
}

int moe_threadpool_new(uint32_t threads, struct moe_threadpool **ret)
{
	struct moe_threadpool *p;

	if (threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		threads = n > 0 ? (uint32_t)n : 1;
	}
	if (threads > 1024)
		threads = 1024;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->n = threads;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->wake, NULL);
	pthread_cond_init(&p->done_cv, NULL);
	p->threads = calloc(threads, sizeof(pthread_t));
	if (!p->threads) {
		moe_threadpool_free(p);
		return -ENOMEM;
	}
	for (uint32_t i = 1; i < threads; i++) {
		struct worker_arg *wa = malloc(sizeof(*wa));
		int r;

		if (!wa) {
			p->n = i;
			moe_threadpool_free(p);
			return -ENOMEM;
		}
		wa->p = p;
		wa->id = i;
		r = pthread_create(&p->threads[i], NULL, worker_main, wa);
		if (r) {
			free(wa);
			p->n = i;
			moe_threadpool_free(p);
			return -r;
		}
	}
	*ret = p;
	return 0;
}

void moe_threadpool_free(struct moe_threadpool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->stop, true);
	atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
	pthread_cond_broadcast(&p->wake);
	pthread_mutex_unlock(&p->lock);
	for (uint32_t i = 1; i < p->n && p->threads; i++)
		pthread_join(p->threads[i], NULL);
	pthread_cond_destroy(&p->wake);
	pthread_cond_destroy(&p->done_cv);
	pthread_mutex_destroy(&p->lock);
	free(p->threads);
	free(p);
}

uint32_t moe_threadpool_size(const struct moe_threadpool *p)
{
	return p->n;
}

void moe_threadpool_run(struct moe_threadpool *p, size_t n_tasks, moe_task_fn fn, void *ctx)
{
	if (n_tasks == 0)
		return;
	if (p->n == 1 || n_tasks == 1) {
		for (size_t t = 0; t < n_tasks; t++)
			fn(ctx, t, 0);
		return;
	}
	uint64_t gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
	struct pool_job *job = &p->jobs[gen & 1];

	job->fn = fn;
	job->ctx = ctx;
	atomic_store_explicit(&job->n_tasks, n_tasks, memory_order_relaxed);
	atomic_store_explicit(&p->done, 0, memory_order_relaxed);
	atomic_store_explicit(&p->ticket, gen << 32, memory_order_release);
	/* seq_cst: either a worker going to sleep sees the new generation, or
	 * we see it counted in sleepers and wake it */
	atomic_store(&p->generation, gen);
	if (atomic_load(&p->sleepers)) {
		pthread_mutex_lock(&p->lock);
		pthread_cond_broadcast(&p->wake);
		pthread_mutex_unlock(&p->lock);
	}
	run_tasks(p, gen, 0);
	/* wait for the others: spin a little, then sleep */
	for (int spins = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n_tasks; spins++) {
		if (spins < POOL_SPIN) {
			__builtin_ia32_pause();
			continue;
		}
		pthread_mutex_lock(&p->lock);
		while (atomic_load_explicit(&p->done, memory_order_acquire) < n_tasks)
			pthread_cond_wait(&p->done_cv, &p->lock);
		pthread_mutex_unlock(&p->lock);
	}
}
