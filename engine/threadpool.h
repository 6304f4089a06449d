/* SPDX-License-Identifier: MIT */
/*
 * A fixed pool of worker threads running one parallel loop at a time.
 * Tasks are handed out dynamically; determinism comes from each task
 * writing its own outputs, never from which thread runs it.
 */
#ifndef MOE_THREADPOOL_H
#define MOE_THREADPOOL_H

#include <stddef.h>
#include <stdint.h>

struct moe_threadpool;

/* fn(ctx, task, worker): worker is 0..threads-1, for per-thread scratch. */
typedef void (*moe_task_fn)(void *ctx, size_t task, uint32_t worker);

/* @threads workers including the caller; 0: one per online CPU. */
int moe_threadpool_new(uint32_t threads, struct moe_threadpool **ret);
void moe_threadpool_free(struct moe_threadpool *p);
uint32_t moe_threadpool_size(const struct moe_threadpool *p);

/* Run fn for task = 0..n_tasks-1 on all workers; returns when all are done. */
void moe_threadpool_run(struct moe_threadpool *p, size_t n_tasks, moe_task_fn fn, void *ctx);

#endif
