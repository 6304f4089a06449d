/* SPDX-License-Identifier: MIT */
/* splitmix64: a seeded sequence, the same everywhere (tests, benchmarks,
 * moectl's random inputs, the backend self-test).  Not for secrets. */
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stdint.h>

static inline uint64_t moe_splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

#endif
