/* SPDX-License-Identifier: MIT */
/* The engine's clock: CLOCK_MONOTONIC in nanoseconds, for durations. */
#ifndef MOE_CLOCK_H
#define MOE_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t moe_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#endif
