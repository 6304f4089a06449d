/* SPDX-License-Identifier: MIT */
/*
 * Overflow-checked size arithmetic for code that computes offsets from
 * numbers it read from a file: each returns false (or true for the
 * *_overflows ones) instead of wrapping.
 */
#ifndef MOE_CHECKED_H
#define MOE_CHECKED_H

#include <stdbool.h>
#include <stdint.h>

/* *ret = a + b; true when that overflows. */
static inline bool moe_add_overflows(uint64_t a, uint64_t b, uint64_t *ret)
{
	return __builtin_add_overflow(a, b, ret);
}

/* *ret = a * b; true when that overflows. */
static inline bool moe_mul_overflows(uint64_t a, uint64_t b, uint64_t *ret)
{
	return __builtin_mul_overflow(a, b, ret);
}

/* Round @v up to @align (a power of two); false on overflow. */
static inline bool moe_align_up(uint64_t v, uint64_t align, uint64_t *ret)
{
	uint64_t t;

	if (moe_add_overflows(v, align - 1, &t))
		return false;
	*ret = t & ~(align - 1);
	return true;
}

#endif
