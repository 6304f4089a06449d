/* SPDX-License-Identifier: MIT */
/*
 * Expert selection.  Scores and weights are computed in double from the
 * float32 logits: the reference the tests compare against is float64, and
 * this keeps moed within a rounding of it except at genuine ties.  The
 * rules live in router_sel.h, which the CUDA backend compiles too.
 */
#include "config.h"

#include "router.h"
#include "router_sel.h"

void moe_router_select(const struct moe_model_config *cfg, const float *logits,
		       const float *bias, double *scratch, int32_t *ids, float *w)
{
	moe_rs_select(cfg, logits, bias, scratch, ids, w);
}
