/* SPDX-License-Identifier: MIT */
/*
 * The float64 reference (see ref.h).  Written from ARCHITECTURE.md 4.1 and
 * the upstream model code, not from the engine: keep it that way, or the
 * suites stop being a second opinion.
 */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "ref.h"
#include "formats/safetensors.h"

/* ---- scalar helpers ---------------------------------------------------- */

double ref_bf16_to_double(uint16_t h)
{
	/* bfloat16 is the top half of a binary32: sign, 8-bit exponent, 7-bit
	 * fraction.  Decode the fields rather than reinterpret the bits. */
	int sign = (h >> 15) & 1;
	int exp = (h >> 7) & 0xff;
	int frac = h & 0x7f;
	double v;

	if (exp == 0xff)
		v = frac ? NAN : INFINITY;
	else if (exp == 0)
		v = ldexp((double)frac, -126 - 7);
	else
		v = ldexp((double)(frac | 0x80), exp - 127 - 7);
	return sign ? -v : v;
}

double ref_f16_to_double(uint16_t h)
{
	int sign = (h >> 15) & 1;
	int exp = (h >> 10) & 0x1f;
	int frac = h & 0x3ff;
	double v;

	if (exp == 0x1f)
		v = frac ? NAN : INFINITY;
	else if (exp == 0)
		v = ldexp((double)frac, -14 - 10);
	else
		v = ldexp((double)(frac | 0x400), exp - 15 - 10);
	return sign ? -v : v;
}

float ref_round_bf16(float f)
{
	/* Round the significand to 8 bits (nearest, ties to even) with frexp
	 * arithmetic in double, which is exact for these magnitudes. */
	double m, r;
	int e;

	if (isnan(f) || isinf(f) || f == 0.0f)
		return f;
	m = frexp((double)f, &e);          /* |m| in [0.5, 1) */
	if (e < -125) {
		/* bf16 subnormals: a fixed quantum of 2^-133 */
		r = nearbyint(ldexp((double)f, 133));
		return (float)ldexp(r, -133);
	}
	r = nearbyint(ldexp(m, 8));        /* default rounding mode: ties to even */
	return (float)ldexp(r, e - 8);     /* overflow rounds to inf as bf16 does */
}

double ref_act(enum moe_act act, double v)
{
	switch (act) {
	case MOE_ACT_SILU:
		return v / (1.0 + exp(-v));
	case MOE_ACT_GELU:
		return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
	case MOE_ACT_GELU_TANH:
		return 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
	case MOE_ACT_RELU:
		return v > 0.0 ? v : 0.0;
	case MOE_ACT_SWIGLU_OAI:
		break;          /* takes gate and up: ref_expert */
	}
	return NAN;
}

static double sigmoid(double v)
{
	return 1.0 / (1.0 + exp(-v));
}

double ref_rel_l2(const float *got, const double *want, size_t n)
{
	double num = 0.0, den = 0.0;

	for (size_t i = 0; i < n; i++) {
		double d = (double)got[i] - want[i];

		num += d * d;
		den += want[i] * want[i];
	}
	if (isnan(num))
		return INFINITY;
	return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

int ref_routing_diff(uint32_t k, const int32_t *ids, const float *w, const int32_t *ref_ids,
		     const double *ref_w, double rtol, char *msg, size_t msglen)
{
	for (uint32_t s = 0; s < k; s++) {
		uint32_t g;

		for (g = 0; g < k; g++)
			if (ids[g] == ref_ids[s])
				break;
		if (g == k) {
			size_t off = (size_t)snprintf(msg, msglen, "reference chose expert %d (slot %u), "
						      "not among the experts chosen:", ref_ids[s], s);

			for (g = 0; g < k && off < msglen; g++)
				off += (size_t)snprintf(msg + off, msglen - off, " %d", ids[g]);
			return -1;
		}
		if (!(fabs((double)w[g] - ref_w[s]) <= rtol * fabs(ref_w[s]) + 1e-30)) {
			snprintf(msg, msglen, "expert %d weight %.9g, reference %.9g (rtol %g)",
				 ref_ids[s], (double)w[g], ref_w[s], rtol);
			return -1;
		}
	}
	return 0;
}

/* ---- routing ----------------------------------------------------------- */

/* Index of the largest of v[0..n) with used[i] false and v[i] not -inf;
 * ties to the lower index; -1 when none is left. */
static int argmax_unused(const double *v, const bool *used, int n)
{
	int best = -1;

	for (int i = 0; i < n; i++) {
		if (used[i] || v[i] == -INFINITY)
			continue;
		if (best < 0 || v[i] > v[best])
			best = i;
	}
	return best;
}

void ref_route_logits(const struct ref_routing *r, const double *logits, const double *bias,
		      int32_t *ids, double *w, double *margin)
{
	int E = (int)r->num_experts, k = (int)r->top_k;
	double *p = malloc(sizeof(double) * (size_t)E);     /* weight source */
	double *sel = malloc(sizeof(double) * (size_t)E);   /* selection score */
	bool *used = calloc((size_t)E, sizeof(bool));
	double gmargin = INFINITY, kmargin = INFINITY, sum = 0.0;

	if (!p || !sel || !used)
		abort();

	if (r->arch == MOE_ARCH_GPT_OSS) {
		/* GptOssTopKRouter: F.linear with the bias, topk of the logits,
		 * softmax over the k top values */
		double mx = -INFINITY, z = 0.0;

		for (int i = 0; i < E; i++)
			sel[i] = logits[i] + (bias ? bias[i] : 0.0);
		for (int s = 0; s < k; s++) {
			int best = argmax_unused(sel, used, E);

			used[best] = true;
			ids[s] = best;
			if (sel[best] > mx)
				mx = sel[best];
		}
		for (int s = 0; s < k; s++) {
			w[s] = exp(sel[ids[s]] - mx);
			z += w[s];
		}
		for (int s = 0; s < k; s++)
			w[s] /= z;
		{
			int next = argmax_unused(sel, used, E);

			*margin = next >= 0 ? sel[ids[k - 1]] - sel[next] : INFINITY;
		}
		free(p);
		free(sel);
		free(used);
		return;
	}

	/* glm4_moe routes as DeepSeek-V3 (transformers' Glm4MoeMoE). */
	bool v3_rule = r->arch == MOE_ARCH_DEEPSEEK_V3 || r->arch == MOE_ARCH_GLM4_MOE;

	if (v3_rule) {
		for (int i = 0; i < E; i++) {
			p[i] = sigmoid(logits[i]);
			sel[i] = p[i] + (bias ? bias[i] : 0.0);
		}
	} else {
		double mx = -INFINITY, z = 0.0;

		for (int i = 0; i < E; i++)
			if (logits[i] > mx)
				mx = logits[i];
		for (int i = 0; i < E; i++) {
			p[i] = exp(logits[i] - mx);
			z += p[i];
		}
		for (int i = 0; i < E; i++) {
			p[i] /= z;
			sel[i] = p[i];
		}
	}

	/* Group-limited selection: deepseek_v2 group_limited_greedy (group
	 * score = max) and deepseek_v3 noaux_tc (sum of the two highest). */
	bool grouped = (r->arch == MOE_ARCH_DEEPSEEK_V2 && r->group_limited) || v3_rule;
	if (grouped && r->n_group > 1 && r->topk_group < r->n_group) {
		int G = (int)r->n_group, gs = E / G;
		double *gscore = malloc(sizeof(double) * (size_t)G);
		bool *kept = calloc((size_t)G, sizeof(bool));
		double last_kept = INFINITY, first_dropped = -INFINITY;

		if (!gscore || !kept)
			abort();
		for (int g = 0; g < G; g++) {
			const double *s = sel + (size_t)g * gs;

			if (v3_rule) {
				double a = -INFINITY, b = -INFINITY;   /* a >= b */

				for (int j = 0; j < gs; j++) {
					if (s[j] > a) {
						b = a;
						a = s[j];
					} else if (s[j] > b) {
						b = s[j];
					}
				}
				gscore[g] = a + b;
			} else {
				double a = -INFINITY;

				for (int j = 0; j < gs; j++)
					if (s[j] > a)
						a = s[j];
				gscore[g] = a;
			}
		}
		for (uint32_t t = 0; t < r->topk_group; t++) {
			int best = argmax_unused(gscore, kept, G);

			kept[best] = true;
			last_kept = gscore[best];
		}
		for (int g = 0; g < G; g++)
			if (!kept[g] && gscore[g] > first_dropped)
				first_dropped = gscore[g];
		gmargin = last_kept - first_dropped;
		/* The experts of dropped groups cannot be chosen (-inf, as in
		 * DeepSeek's inference/model.py). */
		for (int g = 0; g < G; g++)
			if (!kept[g])
				for (int j = 0; j < gs; j++)
					sel[(size_t)g * gs + j] = -INFINITY;
		free(gscore);
		free(kept);
	}

	for (int s = 0; s < k; s++) {
		int best = argmax_unused(sel, used, E);

		if (best < 0)
			abort();    /* fewer candidates than k: the config is invalid */
		used[best] = true;
		ids[s] = best;
		w[s] = p[best];
		sum += p[best];
	}
	{
		int next = argmax_unused(sel, used, E);

		if (next >= 0)
			kmargin = sel[ids[k - 1]] - sel[next];
	}

	switch (r->arch) {
	case MOE_ARCH_MIXTRAL:
		for (int s = 0; s < k; s++)
			w[s] /= sum;
		break;
	case MOE_ARCH_QWEN2_MOE:
	case MOE_ARCH_QWEN3_MOE:
	case MOE_ARCH_OLMOE:
		if (r->norm_topk_prob)
			for (int s = 0; s < k; s++)
				w[s] /= sum;
		break;
	case MOE_ARCH_DEEPSEEK_V2:
		if (k > 1 && r->norm_topk_prob)
			for (int s = 0; s < k; s++)
				w[s] /= sum + 1e-20;
		else
			for (int s = 0; s < k; s++)
				w[s] *= r->routed_scaling_factor;
		break;
	case MOE_ARCH_DEEPSEEK_V3:
		if (k > 1 && r->norm_topk_prob)
			for (int s = 0; s < k; s++)
				w[s] /= sum + 1e-20;
		for (int s = 0; s < k; s++)
			w[s] *= r->routed_scaling_factor;
		break;
	case MOE_ARCH_GLM4_MOE:
		/* Glm4MoeMoE.route_tokens_to_experts: "if self.norm_topk_prob",
		 * whatever k is. */
		if (r->norm_topk_prob)
			for (int s = 0; s < k; s++)
				w[s] /= sum + 1e-20;
		for (int s = 0; s < k; s++)
			w[s] *= r->routed_scaling_factor;
		break;
	default:
		abort();
	}
	*margin = gmargin < kmargin ? gmargin : kmargin;
	free(p);
	free(sel);
	free(used);
}

void ref_route_f32(const struct ref_routing *r, const float *router, const float *bias,
		   uint32_t hidden, const float *x, int32_t *ids, double *w, double *margin)
{
	uint32_t E = r->num_experts;
	double *logits = malloc(sizeof(double) * E);
	double *b = bias ? malloc(sizeof(double) * E) : NULL;

	if (!logits || (bias && !b))
		abort();
	for (uint32_t e = 0; e < E; e++) {
		double s = 0.0;

		for (uint32_t h = 0; h < hidden; h++)
			s += (double)router[(size_t)e * hidden + h] * (double)x[h];
		logits[e] = s;
		if (b)
			b[e] = bias[e];
	}
	ref_route_logits(r, logits, b, ids, w, margin);
	free(logits);
	free(b);
}

/* ---- the expert FFN and the layer -------------------------------------- */

void ref_expert(enum moe_act act, uint32_t hidden, uint32_t inter, const double *gate,
		const double *up, const double *down, const double *x, double *tmp, double *out)
{
	for (uint32_t i = 0; i < inter; i++) {
		double u = 0.0, g = 0.0;

		for (uint32_t h = 0; h < hidden; h++)
			u += up[(size_t)i * hidden + h] * x[h];
		if (gate) {
			for (uint32_t h = 0; h < hidden; h++)
				g += gate[(size_t)i * hidden + h] * x[h];
			tmp[i] = ref_act(act, g) * u;
		} else {
			tmp[i] = ref_act(act, u);
		}
	}
	for (uint32_t h = 0; h < hidden; h++) {
		double s = 0.0;

		for (uint32_t i = 0; i < inter; i++)
			s += down[(size_t)h * inter + i] * tmp[i];
		out[h] = s;
	}
}

unsigned long ref_swiglu_clamps;

void ref_expert_oai(double alpha, double limit, uint32_t hidden, uint32_t inter, const double *gate,
		    const double *up, const double *down, const double *gb, const double *ub,
		    const double *db, const double *x, double *tmp, double *out)
{
	for (uint32_t i = 0; i < inter; i++) {
		double g = gb[i], u = ub[i];

		for (uint32_t h = 0; h < hidden; h++) {
			g += gate[(size_t)i * hidden + h] * x[h];
			u += up[(size_t)i * hidden + h] * x[h];
		}
		ref_swiglu_clamps += (g > limit) + (u > limit || u < -limit);
		if (g > limit)
			g = limit;
		if (u > limit)
			u = limit;
		if (u < -limit)
			u = -limit;
		tmp[i] = (u + 1.0) * g * sigmoid(alpha * g);
	}
	for (uint32_t h = 0; h < hidden; h++) {
		double s = db[h];

		for (uint32_t i = 0; i < inter; i++)
			s += down[(size_t)h * inter + i] * tmp[i];
		out[h] = s;
	}
}

/* Routed expert @j of @l on @xd into @y. */
static void layer_expert(const struct ref_layer *l, size_t j, const double *xd, double *tmp, double *y)
{
	uint32_t H = l->hidden, I = l->inter;
	size_t esz = (size_t)I * H;

	if (l->act == MOE_ACT_SWIGLU_OAI)
		ref_expert_oai(l->swiglu_alpha, l->swiglu_limit, H, I, l->gate + j * esz, l->up + j * esz,
			       l->down + j * esz, l->gate_bias + j * I, l->up_bias + j * I,
			       l->down_bias + j * H, xd, tmp, y);
	else
		ref_expert(l->act, H, I, l->gate ? l->gate + j * esz : NULL, l->up + j * esz,
			   l->down + j * esz, xd, tmp, y);
}

/* out[H] += sigmoid-gated (qwen2_moe) or plain shared expert(s) of x. */
static void add_shared(const struct ref_layer *l, const double *xd, double *tmp, double *y,
		       double *out)
{
	uint32_t H = l->hidden;
	double g = 1.0;

	if (!l->shared_inter)
		return;
	ref_expert(l->act, H, l->shared_inter, l->sh_gate, l->sh_up, l->sh_down, xd, tmp, y);
	if (l->sh_gate_vec) {
		double s = 0.0;

		for (uint32_t h = 0; h < H; h++)
			s += l->sh_gate_vec[h] * xd[h];
		g = sigmoid(s);
	}
	for (uint32_t h = 0; h < H; h++)
		out[h] += g * y[h];
}

void ref_layer_forward_dense(const struct ref_layer *l, const float *x, double *out)
{
	uint32_t H = l->hidden, I = l->inter, E = l->routing.num_experts;
	uint32_t tmpn = I > l->shared_inter ? I : l->shared_inter;
	double *xd = malloc(sizeof(double) * H);
	double *y = malloc(sizeof(double) * H);
	double *tmp = malloc(sizeof(double) * tmpn);

	if (!xd || !y || !tmp)
		abort();
	for (uint32_t h = 0; h < H; h++) {
		xd[h] = x[h];
		out[h] = 0.0;
	}
	for (uint32_t j = 0; j < E; j++) {
		layer_expert(l, j, xd, tmp, y);
		for (uint32_t h = 0; h < H; h++)
			out[h] += y[h] / E;
	}
	add_shared(l, xd, tmp, y, out);
	free(xd);
	free(y);
	free(tmp);
}

void ref_layer_forward(const struct ref_layer *l, const float *x, double *out,
		       int32_t *ids, double *w, double *margin)
{
	uint32_t H = l->hidden, I = l->inter, k = l->routing.top_k, E = l->routing.num_experts;
	uint32_t tmpn = I > l->shared_inter ? I : l->shared_inter;
	double *xd = malloc(sizeof(double) * H);
	double *y = malloc(sizeof(double) * H);
	double *tmp = malloc(sizeof(double) * tmpn);
	double *logits = malloc(sizeof(double) * E);

	if (!xd || !y || !tmp || !logits)
		abort();
	for (uint32_t h = 0; h < H; h++) {
		xd[h] = x[h];
		out[h] = 0.0;
	}
	for (uint32_t e = 0; e < E; e++) {
		double s = 0.0;

		for (uint32_t h = 0; h < H; h++)
			s += l->router[(size_t)e * H + h] * xd[h];
		logits[e] = s;
	}
	ref_route_logits(&l->routing, logits, l->bias, ids, w, margin);

	for (uint32_t s = 0; s < k; s++) {
		size_t j = (size_t)ids[s];

		layer_expert(l, j, xd, tmp, y);
		for (uint32_t h = 0; h < H; h++)
			out[h] += w[s] * y[h];
	}
	add_shared(l, xd, tmp, y, out);
	free(xd);
	free(y);
	free(tmp);
	free(logits);
}

void ref_layer_free(struct ref_layer *l)
{
	if (!l)
		return;
	free(l->router);
	free(l->bias);
	free(l->gate);
	free(l->up);
	free(l->down);
	free(l->sh_gate);
	free(l->sh_up);
	free(l->sh_down);
	free(l->sh_gate_vec);
	free(l->gate_bias);
	free(l->up_bias);
	free(l->down_bias);
	free(l);
}
