/* SPDX-License-Identifier: MIT */
/* What the benchmarks share: a clock in seconds and a seeded generator. */
#ifndef MOE_BENCHUTIL_H
#define MOE_BENCHUTIL_H

#include <stdint.h>

#include "clock.h"

static inline double bench_now(void)
{
	return (double)moe_now_ns() * 1e-9;
}

/* splitmix64: the next value of the sequence seeded by *s */
static inline uint64_t bench_rng(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

#endif
