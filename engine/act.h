/* SPDX-License-Identifier: MIT */
/*
 * Expert activations (ARCHITECTURE.md 4.1), in float32, written once for
 * the CPU backend and the CUDA kernels.
 */
#ifndef MOE_ACT_H
#define MOE_ACT_H

#include <math.h>

#include "hd.h"
#include "model.h"

static MOE_HD inline float moe_act_apply(enum moe_act a, float v)
{
	switch (a) {
	case MOE_ACT_SILU:
		return v / (1.0f + expf(-v));
	case MOE_ACT_GELU:
		return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
	case MOE_ACT_GELU_TANH:
		return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
	case MOE_ACT_RELU:
		return v > 0.0f ? v : 0.0f;
	}
	return v;
}

#endif
