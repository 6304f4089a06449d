/* SPDX-License-Identifier: MIT */
/*
 * Expert selection from one token's router logits (ARCHITECTURE.md 4.1),
 * written once for the host and the device: router.c compiles it for the
 * CPU backend, gpu/launch.cu for a CUDA thread per token, so both backends
 * follow the same rules to the bit (scores in double, ties to the lower
 * index, NaN lowest).  Include it only from those two files.
 *
 * Scratch: MOE_ROUTER_SCRATCH(E) doubles per token.
 */
#ifndef MOE_ROUTER_SEL_H
#define MOE_ROUTER_SEL_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#include "hd.h"
#include "model.h"

#define MOE_ROUTER_SCRATCH(E) (4 * (size_t)(E))

/* a ranks before b: higher score, ties to the lower index; NaN lowest. */
static MOE_HD inline bool moe_rs_before(double a, uint32_t ia, double b, uint32_t ib)
{
	bool na = isnan(a), nb = isnan(b);

	if (na || nb) {
		if (na != nb)
			return nb;
		return ia < ib;
	}
	if (a != b)
		return a > b;
	return ia < ib;
}

/*
 * Top-n of v[0..len), best first, into out[0..n); with @gkept, only the
 * indices i whose group i / @per has gkept[] set take part.  Insertion into
 * a sorted list of n: n is at most a few dozen, len a few thousand.
 */
static MOE_HD inline void moe_rs_top_n(const double *v, uint32_t len, const int32_t *gkept,
				       uint32_t per, uint32_t n, int32_t *out)
{
	uint32_t have = 0;

	for (uint32_t i = 0; i < len; i++) {
		uint32_t pos;

		if (gkept && !gkept[i / per])
			continue;
		if (have == n && !moe_rs_before(v[i], i, v[out[n - 1]], (uint32_t)out[n - 1]))
			continue;
		pos = have < n ? have++ : n - 1;
		while (pos > 0 && moe_rs_before(v[i], i, v[out[pos - 1]], (uint32_t)out[pos - 1])) {
			out[pos] = out[pos - 1];
			pos--;
		}
		out[pos] = (int32_t)i;
	}
}

static MOE_HD inline void moe_rs_softmax(const float *logits, uint32_t n, double *p)
{
	double max = -INFINITY, sum = 0;

	for (uint32_t i = 0; i < n; i++)
		if (logits[i] > max)
			max = logits[i];
	if (isinf(max) && max > 0) {
		/* +inf logits share the mass; everything else is 0 */
		uint32_t ninf = 0;
		for (uint32_t i = 0; i < n; i++)
			ninf += isinf(logits[i]) && logits[i] > 0;
		for (uint32_t i = 0; i < n; i++)
			p[i] = isinf(logits[i]) && logits[i] > 0 ? 1.0 / ninf : 0.0;
		return;
	}
	if (!isfinite(max))
		max = 0;       /* all -inf or NaN: exp gives 0 or NaN, ranked last */
	for (uint32_t i = 0; i < n; i++) {
		p[i] = exp((double)logits[i] - max);
		sum += p[i];
	}
	for (uint32_t i = 0; i < n; i++)
		p[i] /= sum;
}

/*
 * gpt_oss (transformers' GptOssTopKRouter): s = logits + bias, the top-k
 * of s (ties to the lower index, NaN lowest), their weights the softmax of
 * those k values only.  The whole-E softmax of the other rules is not
 * taken: it would change nothing but the cost.
 */
static MOE_HD inline void moe_rs_select_topk_softmax(const struct moe_model_config *cfg,
						     const float *logits, const float *bias,
						     double *scratch, int32_t *ids, float *w)
{
	uint32_t E = cfg->num_experts, k = cfg->top_k;
	double *sel = scratch;            /* [E] biased logits */
	double max = -INFINITY, sum = 0, *e = scratch + E;  /* [k] exponentials */
	uint32_t ninf = 0;

	for (uint32_t i = 0; i < E; i++)
		sel[i] = (double)logits[i] + (bias ? (double)bias[i] : 0.0);
	moe_rs_top_n(sel, E, NULL, 1, k, ids);
	for (uint32_t s = 0; s < k; s++)
		if (sel[ids[s]] > max)    /* false for NaN */
			max = sel[ids[s]];
	if (isinf(max) && max > 0) {
		/* +inf values share the weight, as in moe_rs_softmax */
		for (uint32_t s = 0; s < k; s++)
			ninf += isinf(sel[ids[s]]) && sel[ids[s]] > 0;
		for (uint32_t s = 0; s < k; s++)
			w[s] = isinf(sel[ids[s]]) && sel[ids[s]] > 0 ? (float)(1.0 / ninf) : 0.0f;
		return;
	}
	if (!isfinite(max))
		max = 0;
	for (uint32_t s = 0; s < k; s++) {
		e[s] = exp(sel[ids[s]] - max);
		sum += e[s];
	}
	for (uint32_t s = 0; s < k; s++)
		w[s] = (float)(e[s] / sum);
}

/*
 * Select the experts of one token.
 *   logits  [E] float32 router logits
 *   bias    [E] deepseek_v3/glm4_moe correction bias, gpt_oss router bias,
 *           or NULL
 *   scratch MOE_ROUTER_SCRATCH(E) doubles (8-byte aligned)
 * Writes ids[k] (best first, ties to the lower index) and w[k].
 */
static MOE_HD inline void moe_rs_select(const struct moe_model_config *cfg, const float *logits,
					const float *bias, double *scratch, int32_t *ids, float *w)
{
	uint32_t E = cfg->num_experts, k = cfg->top_k, G = cfg->n_group;
	uint32_t per = E / G;
	double *p = scratch;              /* [E] probabilities (unbiased) */
	double *sel = scratch + E;        /* [E] selection scores */
	double *gscore = scratch + 2 * E; /* [G] group scores, G <= E */
	int32_t *keep = (int32_t *)(scratch + 3 * E);  /* [G] kept groups, best first */
	int32_t *gkept = keep + G;        /* [G] 1: group kept */
	bool grouped = cfg->topk_method != MOE_TOPK_GREEDY && G > 1 && cfg->topk_group < G;
	double sum = 0;

	if (cfg->arch == MOE_ARCH_GPT_OSS) {
		moe_rs_select_topk_softmax(cfg, logits, bias, scratch, ids, w);
		return;
	}

	if (cfg->scoring == MOE_SCORING_SIGMOID)
		for (uint32_t i = 0; i < E; i++)
			p[i] = 1.0 / (1.0 + exp(-(double)logits[i]));
	else
		moe_rs_softmax(logits, E, p);

	for (uint32_t i = 0; i < E; i++)
		sel[i] = p[i] + (cfg->topk_method == MOE_TOPK_NOAUX_TC && bias ? (double)bias[i] : 0.0);

	if (grouped) {
		for (uint32_t g = 0; g < G; g++) {
			const double *s = sel + (size_t)g * per;
			if (cfg->topk_method == MOE_TOPK_NOAUX_TC) {
				/* sum of the group's two highest biased scores */
				int32_t two[2];
				moe_rs_top_n(s, per, NULL, 1, 2, two);
				gscore[g] = s[two[0]] + s[two[1]];
			} else {
				double m = -INFINITY;
				for (uint32_t j = 0; j < per; j++)
					if (s[j] > m)   /* false for NaN */
						m = s[j];
				gscore[g] = m;
			}
		}
		moe_rs_top_n(gscore, G, NULL, 1, cfg->topk_group, keep);
		for (uint32_t g = 0; g < G; g++)
			gkept[g] = 0;
		for (uint32_t g = 0; g < cfg->topk_group; g++)
			gkept[keep[g]] = 1;
		/* experts of dropped groups are -inf (DeepSeek's inference code):
		 * selection happens only inside the kept groups */
		moe_rs_top_n(sel, E, gkept, per, k, ids);
	} else {
		moe_rs_top_n(sel, E, NULL, 1, k, ids);
	}

	for (uint32_t s = 0; s < k; s++)
		sum += p[ids[s]];

	switch (cfg->arch) {
	case MOE_ARCH_DEEPSEEK_V2:
		if (k > 1 && cfg->norm_topk_prob)
			for (uint32_t s = 0; s < k; s++)
				w[s] = (float)(p[ids[s]] / (sum + 1e-20));
		else
			for (uint32_t s = 0; s < k; s++)
				w[s] = (float)(p[ids[s]] * cfg->routed_scaling_factor);
		break;
	case MOE_ARCH_DEEPSEEK_V3:
		for (uint32_t s = 0; s < k; s++) {
			double v = p[ids[s]];
			if (k > 1 && cfg->norm_topk_prob)
				v /= sum + 1e-20;
			w[s] = (float)(v * cfg->routed_scaling_factor);
		}
		break;
	case MOE_ARCH_GLM4_MOE:
		/* transformers' Glm4MoeMoE: no top_k > 1 condition */
		for (uint32_t s = 0; s < k; s++) {
			double v = p[ids[s]];
			if (cfg->norm_topk_prob)
				v /= sum + 1e-20;
			w[s] = (float)(v * cfg->routed_scaling_factor);
		}
		break;
	case MOE_ARCH_MIXTRAL:
		/* mixtral always renormalises, whatever the flag says */
		for (uint32_t s = 0; s < k; s++)
			w[s] = (float)(p[ids[s]] / sum);
		break;
	default:
		/* qwen and olmoe renormalise when the config says so */
		for (uint32_t s = 0; s < k; s++)
			w[s] = (float)(cfg->norm_topk_prob ? p[ids[s]] / sum : p[ids[s]]);
		break;
	}
}

#endif
