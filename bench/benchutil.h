/* SPDX-License-Identifier: MIT */
/* What the benchmarks share: a clock in seconds and a seeded generator. */
#ifndef MOE_BENCHUTIL_H
#define MOE_BENCHUTIL_H

#include <stdint.h>

#include "engine/clock.h"
#include "engine/rng.h"

static inline double bench_now(void)
{
	return (double)moe_now_ns() * 1e-9;
}

/* splitmix64: the next value of the sequence seeded by *s */
static inline uint64_t bench_rng(uint64_t *s)
{
	return moe_splitmix64(s);
}

#endif
