/* SPDX-License-Identifier: MIT */
/*
 * Expert selection from router logits (ARCHITECTURE.md 4.1).  The logits
 * come from a backend (float32); this file turns one token's logits into
 * its top-k experts and combine weights.  Shared by every backend that
 * selects on the host.
 */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H

#include <stdint.h>

#include "model.h"

/*
 * Select the experts of one token.
 *   logits  [E] float32 router logits
 *   bias    [E] deepseek_v3/glm4_moe correction bias, gpt_oss router bias,
 *           or NULL
 *   scratch MOE_ROUTER_SCRATCH(E) = 4 * E doubles (router_sel.h)
 * Writes ids[k] (best first, ties to the lower index) and w[k].  A NaN
 * logit ranks below every number, so malformed input still yields a
 * deterministic choice.
 */
void moe_router_select(const struct moe_model_config *cfg, const float *logits,
		       const float *bias, double *scratch, int32_t *ids, float *w);

#endif
