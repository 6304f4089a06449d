/* SPDX-License-Identifier: MIT */
/*
 * The float64 reference the numerics, router and invariance suites compare
 * moed against: ARCHITECTURE.md 4.1 written a second time, independently.
 *
 * Nothing here calls the engine's router, kernels, dtype conversions or
 * backends.  The only engine code used is the safetensors reader, to find
 * and read raw tensor bytes; the bytes are decoded here, config.json is read
 * here (jansson) with Hugging Face's defaults, and every formula is
 * evaluated in double precision.  The shared enums of model.h name the
 * architecture and activation, nothing more.
 */
#ifndef MOE_REF_H
#define MOE_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

/* The routing rule of one model, as ARCHITECTURE.md 4.1 states it. */
struct ref_routing {
	enum moe_arch arch;
	uint32_t num_experts;          /* E */
	uint32_t top_k;                /* k */
	uint32_t n_group;              /* 1: no grouping */
	uint32_t topk_group;
	bool group_limited;            /* deepseek_v2 topk_method group_limited_greedy */
	bool norm_topk_prob;           /* ignored for mixtral (always renormalised) */
	double routed_scaling_factor;  /* deepseek only */
};

/* Largest k the reference handles (DeepSeek-V3 picks 8; tests go to E). */
#define REF_MAX_EXPERTS 1024

/*
 * Route one token from its router logits @logits[E] (and, for deepseek_v3
 * and glm4_moe, the correction bias @bias[E]; for gpt_oss the router's
 * bias, added to the logits before the top-k, whose softmax over the k
 * alone gives the weights; NULL elsewhere).  Writes @ids[k] in
 * selection order (best first, ties to the lower index), @w[k] the final
 * combine weights, and *@margin: the smallest gap that decided the
 * selection, i.e. min(k-th minus (k+1)-th selection score among the
 * candidates, last kept minus first dropped group score); +inf when nothing
 * was left out.  A token whose margin is < 1e-6 is exempt from the
 * numerical contract.
 */
void ref_route_logits(const struct ref_routing *r, const double *logits, const double *bias,
		      int32_t *ids, double *w, double *margin);

/*
 * Route one token x[H] with float32 router rows router[E][H] and optional
 * float32 bias[E]: logits as float64 dot products, then ref_route_logits.
 */
void ref_route_f32(const struct ref_routing *r, const float *router, const float *bias,
		   uint32_t hidden, const float *x, int32_t *ids, double *w, double *margin);

/* Activations in float64. */
double ref_act(enum moe_act act, double v);

/* Round a float to the nearest bfloat16 (even on ties) and back. */
float ref_round_bf16(float f);

/* Decode 16-bit floats to double, written here rather than taken from dtype.h. */
double ref_bf16_to_double(uint16_t h);
double ref_f16_to_double(uint16_t h);
double ref_e4m3_to_double(uint8_t c);

/* One MoE layer of a Hugging Face checkpoint, every weight as double. */
struct ref_layer {
	struct ref_routing routing;
	enum moe_act act;
	uint32_t layer;                /* the checkpoint's layer number */
	uint32_t hidden;               /* H */
	uint32_t inter;                /* I of one routed expert */
	bool gated;                    /* routed experts have a gate projection */
	char weight_dtype[16];         /* safetensors dtype of the expert weights */
	double *router;                /* [E][H] */
	double *bias;                  /* [E] or NULL */
	double *gate;                  /* [E][I][H] or NULL (plain experts) */
	double *up;                    /* [E][I][H] */
	double *down;                  /* [E][H][I] */
	uint32_t shared_inter;         /* 0: no shared expert */
	bool shared_gated;
	double *sh_gate;               /* [Is][H] or NULL */
	double *sh_up;                 /* [Is][H] */
	double *sh_down;               /* [H][Is] */
	double *sh_gate_vec;           /* [H] qwen2_moe shared_expert_gate, or NULL */
	/* gpt_oss (act MOE_ACT_SWIGLU_OAI) */
	double swiglu_alpha, swiglu_limit;
	double *gate_bias;             /* [E][I] or NULL */
	double *up_bias;               /* [E][I] */
	double *down_bias;             /* [E][H] */
};

/*
 * Read config.json (jansson, Hugging Face defaults) and the MoE tensors of
 * layer @layer from the checkpoint directory @hf_dir: routed experts by
 * index (mixtral w1/w3/w2, the others gate/up/down_proj) or fused
 * (experts.gate_up_proj [E,2I,H] gate rows first, experts.down_proj
 * [E,H,I]), router, deepseek_v3 bias, shared expert(s) and qwen2_moe's
 * shared gate.  F32, BF16 and F16 tensors are decoded to double; F8_E4M3
 * expert matrices are dequantized with their X.weight_scale_inv (128 x 128
 * blocks, ARCHITECTURE.md 4.1a).  Returns 0
 * and *ret, or a negative errno with a message in @msg.
 */
int ref_layer_load(const char *hf_dir, uint32_t layer, struct ref_layer **ret,
		   char *msg, size_t msglen);

void ref_layer_free(struct ref_layer *l);

/*
 * The layer output for one token x[H] (float32 input, evaluated in float64):
 * sum over the chosen experts in selection order of w * expert(x), plus the
 * shared expert(s) (qwen2_moe: times sigmoid(shared_expert_gate . x)).
 * Writes out[H], and the routing as ref_route_logits does.
 */
void ref_layer_forward(const struct ref_layer *l, const float *x, double *out,
		       int32_t *ids, double *w, double *margin);

/* The dense comparison (MOE_FWD_ALL_EXPERTS): every routed expert with
 * weight 1/E, plus the shared expert(s) as in ref_layer_forward. */
void ref_layer_forward_dense(const struct ref_layer *l, const float *x, double *out);

/* How many gate or up values ref_expert_oai has clamped so far (tests use
 * it to show that a case reaches the clamp). */
extern unsigned long ref_swiglu_clamps;

/*
 * gpt_oss's expert in float64, as GptOssExperts writes it: g = gate x + gb,
 * u = up x + ub, g = min(g, limit), u = clamp(u, -limit, limit),
 * h = (u + 1) * g * sigmoid(alpha * g), out = down h + db.
 */
void ref_expert_oai(double alpha, double limit, uint32_t hidden, uint32_t inter, const double *gate,
		    const double *up, const double *down, const double *gb, const double *ub,
		    const double *db, const double *x, double *tmp, double *out);

/* One expert FFN in float64: down(act(gate x) * (up x)), or down(act(up x))
 * when @gate is NULL.  gate/up [I][H], down [H][I]; @tmp holds I doubles. */
void ref_expert(enum moe_act act, uint32_t hidden, uint32_t inter, const double *gate,
		const double *up, const double *down, const double *x, double *tmp, double *out);

/*
 * Compare one token's routing (k slots) with the reference's: the same
 * experts as a set, each weight within @rtol relative.  Returns 0, or -1
 * with what differs in @msg.
 */
int ref_routing_diff(uint32_t k, const int32_t *ids, const float *w, const int32_t *ref_ids,
		     const double *ref_w, double rtol, char *msg, size_t msglen);

/* Relative L2 error ||got - want|| / ||want|| (||got - want|| when want is 0). */
double ref_rel_l2(const float *got, const double *want, size_t n);

#endif
