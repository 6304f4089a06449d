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
	case MOE_ACT_SWIGLU_OAI:
		break;          /* needs the up value too: moe_act_glu() */
	}
	return v;
}

/*
 * One element of a gated expert's intermediate vector from its gate and up
 * values.  For every activation but MOE_ACT_SWIGLU_OAI this is
 * act(gate) * up, the same float operations as before it existed.  For
 * MOE_ACT_SWIGLU_OAI (gpt_oss): gate = min(gate, limit), up = clamp(up,
 * -limit, limit), (up + 1) * gate * sigmoid(alpha * gate); a NaN stays NaN
 * as in torch's clamp (fminf would drop it).
 */
static MOE_HD inline float moe_act_glu(enum moe_act a, float alpha, float limit, float g, float u)
{
	if (a != MOE_ACT_SWIGLU_OAI)
		return moe_act_apply(a, g) * u;
	g = g > limit ? limit : g;
	u = u > limit ? limit : (u < -limit ? -limit : u);
	return (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
}

#endif
