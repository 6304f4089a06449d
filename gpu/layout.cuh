// SPDX-License-Identifier: MIT
// The store's layout of the 4-bit expert matrices (model.h
// moe_mxfp4_scales_offset, moe_q4_layout), written out for the host side of
// the backend (blob sizes) and for the kernels (where the parts of a
// matrix lie): the module links no engine symbol, and the kernels cannot
// call host code.  Each part starts at a multiple of 64 bytes.
#ifndef MOE_GPU_LAYOUT_CUH
#define MOE_GPU_LAYOUT_CUH

#include <stdint.h>

#include "engine/model.h"

__host__ __device__ inline uint64_t moe_gpad64(uint64_t b)
{
	return (b + 63) & ~(uint64_t)63;
}

// MXFP4: the N * K/2 bytes of codes, then the N * K/32 E8M0 scales.
__host__ __device__ inline uint64_t moe_gmx_scales(uint64_t N, uint64_t K)
{
	return moe_gpad64(N * (K / 2));
}

__host__ __device__ inline uint64_t moe_gmx_bytes(uint64_t N, uint64_t K)
{
	return moe_gmx_scales(N, K) + moe_gpad64(N * (K / 32));
}

// INT4: codes, scales [N][K/G] (16 bits), zeros [N][K/G] (MOE_Q4_ZEROS),
// perm [K] uint32 (MOE_Q4_PERM); offsets 0 for an absent part.
struct moe_gq4 {
	uint64_t G, groups;
	uint64_t scales, zeros, perm, bytes;
};

__host__ __device__ inline moe_gq4 moe_gq4_layout(uint32_t q4_group, uint32_t q4_flags, uint64_t N, uint64_t K)
{
	moe_gq4 l;
	uint64_t at = moe_gpad64(N * (K / 2));

	l.G = q4_group ? q4_group : K;
	l.groups = l.G ? K / l.G : 0;
	l.scales = at;
	at += moe_gpad64(N * l.groups * 2);
	l.zeros = 0;
	if (q4_flags & MOE_Q4_ZEROS) {
		l.zeros = at;
		at += moe_gpad64(N * l.groups);
	}
	l.perm = 0;
	if (q4_flags & MOE_Q4_PERM) {
		l.perm = at;
		at += moe_gpad64(K * sizeof(uint32_t));
	}
	l.bytes = at;
	return l;
}

#endif
