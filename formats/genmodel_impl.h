/* SPDX-License-Identifier: MIT */
/*
 * gen-model's internals, shared by its three files: genmodel.c (options,
 * presets, resolving defaults, the plan of tensors), genvalues.c (the
 * counter-based values and the router skew) and genwrite.c (config.json,
 * the shards and their index).  Not for use outside formats/gen*.c.
 */
#ifndef MOE_GENMODEL_IMPL_H
#define MOE_GENMODEL_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "genmodel.h"

/* Bytes generated per write: large enough for full disk speed. */
#define GEN_CHUNK (4u << 20)

/* Everything moe_gen_model writes, defaults filled in and checked. */
struct gen_dims {
	enum moe_arch arch;
	enum moe_dtype dtype;
	uint32_t H, I, dense_I, E, k, L, V;
	uint32_t heads, kv_heads, head_dim;
	uint32_t n_group, topk_group, n_shared, shared_I, first_dense, sparse_step;
	uint32_t q_lora, kv_lora, nope, rope, v_head, mtp;
	bool norm_topk, gated, fused;
	bool deepseek;                   /* deepseek_v2/v3: MLA attention, topk_method */
	bool v3_routing;                 /* deepseek_v3, glm4_moe: sigmoid, correction bias */
	float scaling;
	const char *act, *topk_method;
	uint64_t shard_bytes;
	float wscale;
	float skew;                      /* router_skew; 0: routers as they were */
	bool fp8;                        /* quant_fp8 */
	bool fp8_shared, fp8_routed;     /* fp8, less what quant_skip keeps in dtype */
	bool qk_norm;                    /* glm4_moe use_qk_norm */
	uint32_t max_pos;                /* max_position_embeddings; 0: the arch's */
	bool mxfp4;                      /* quant_mxfp4 */
	int q4;                          /* enum moe_q4_format of quant_int4 (0: none) */
	uint32_t q4_group;               /* 0: one group per row */
	bool q4_desc_act, q4_sym;
	struct moe_layer_rule rule;
};

enum gen_fill {
	FILL_RANDOM,     /* uniform, std given */
	FILL_ONES,       /* norm weights */
	FILL_ROUTER,     /* FILL_RANDOM, row j times row_scale[j] (router_skew) */
	FILL_FP8,        /* the e4m3 codes of FILL_RANDOM's float32 values, per
			  * 128 x 128 block divided by the block's scale */
	FILL_FP8_SCALE,  /* those scales: the block's max |value| / 448 (1 for
			  * a block of zeros); src names the weight */
	FILL_MXFP4,      /* [E, N, K/32, 16] U8: the e2m1 codes of FILL_RANDOM's
			  * float32 values [E][N][K] (moe_mxfp4_quantize_block) */
	FILL_MXFP4_SCALE, /* [E, N, K/32] U8: their E8M0 scales; src names the
			  * blocks */
	FILL_Q4,         /* a tensor of an int4 matrix (genq4.c): qweight, qzeros,
			  * scales, g_idx, weight_packed, weight_scale or
			  * weight_shape, as q4_part says; wname the weight whose
			  * FILL_RANDOM values are quantized */
};

struct gen_tensor {
	char *name;
	enum moe_dtype dtype;
	uint32_t ndim;
	uint64_t shape[4];
	enum gen_fill fill;
	float amp;       /* half-width of the uniform distribution */
	uint64_t nbytes;
	uint32_t shard;
	float *row_scale; /* FILL_ROUTER: [shape[0]], set by plan_skew; owned */
	uint64_t qrows, qcols; /* FILL_FP8_SCALE: the weight's shape */
	size_t src;       /* FILL_FP8_SCALE: index of the weight in the plan */
	char *wname;      /* FILL_Q4: the weight's name ("X.weight"), owned */
	int q4_part;      /* FILL_Q4: enum gen_q4_part */
};

enum gen_q4_part {
	Q4_QWEIGHT, Q4_QZEROS, Q4_SCALES, Q4_G_IDX,           /* GPTQ, AWQ */
	Q4_PACKED, Q4_SCALE, Q4_SHAPE,                        /* compressed-tensors */
};

/* One int4 matrix quantized (genq4.c): codes, zero points and scales (in
 * the checkpoint's float dtype) per row and group, the group of each
 * input column. */
struct gen_q4 {
	char *wname;                      /* which weight this is; NULL: none yet */
	uint64_t N, K, G;
	uint8_t *q;                       /* [N][K] */
	uint8_t *z;                       /* [N][K/G] actual zero points */
	uint16_t *s;                      /* [N][K/G] f16 (bf16 for compressed-tensors) */
	int32_t *g_idx;                   /* [K] */
};

void gen_q4_free(struct gen_q4 *q);

/* Quantize the weight of FILL_Q4 tensor @t (key @key: the weight's) into
 * @q unless it holds it already; then @t's bytes into @out (t->nbytes). */
int gen_q4_tensor(const struct gen_dims *d, const struct gen_tensor *t, uint64_t key,
		  struct gen_q4 *q, void *out);

struct gen_plan {
	struct gen_tensor *t;
	size_t n, cap;
	uint64_t total;
	uint32_t n_shards;
	int oom;         /* sticky: checked once after building */
};

/* Fill @d from @o with every default resolved, or fail naming the option. */
int gen_resolve(const struct moe_gen_options *o, struct gen_dims *d, struct moe_err *err);

/* The tensors of the checkpoint @d describes, in file order, with shards
 * assigned.  gen_plan_free() releases it (also after a failure). */
int gen_plan_build(struct gen_plan *p, const struct gen_dims *d, struct moe_err *err);
void gen_plan_free(struct gen_plan *p);

/* Row scales of the routers for router_skew (a no-op when it is 0). */
int gen_plan_skew(struct gen_plan *p, const struct gen_dims *d, uint64_t seed, struct moe_err *err);

/* The key of a tensor's values: a pure function of the seed and its name. */
uint64_t gen_tensor_key(uint64_t seed, const char *name);

/* Elements [@first, @first + @count) of tensor @t, in its dtype, into @out
 * (not for FILL_FP8 and FILL_FP8_SCALE: gen_fp8_band, gen_fp8_scales). */
void gen_values(const struct gen_tensor *t, uint64_t key, uint64_t first, size_t count, void *out);

/* Rows a FILL_FP8 tensor is written in at a time: one block row. */
#define GEN_FP8_BAND 128

/* The codes of rows [@r0, @r0 + GEN_FP8_BAND) (fewer at the end) of the
 * FILL_FP8 tensor @t into @out; @tmp holds GEN_FP8_BAND * cols floats. */
void gen_fp8_band(const struct gen_tensor *t, uint64_t key, uint64_t r0, float *tmp, uint8_t *out);

/* Rows of values a FILL_MXFP4 tensor is written in at a time. */
#define GEN_MX_BAND 256

/* Rows [@r0, @r0 + GEN_MX_BAND) (fewer at the end) of the FILL_MXFP4 blocks
 * @w (rows: the first dimensions but the last two; K = 32 x the third),
 * codes into @codes (K/2 bytes a row) and scales into @scales (K/32 a
 * row), either NULL to skip; @tmp holds GEN_MX_BAND * K floats. */
void gen_mxfp4_band(const struct gen_tensor *w, uint64_t key, uint64_t r0, float *tmp, uint8_t *codes,
		    uint8_t *scales);

/* The scales of the FILL_FP8 weight @w (key @key) into @out, float32
 * [ceil(rows/128)][ceil(cols/128)]; @tmp as for gen_fp8_band. */
void gen_fp8_scales(const struct gen_tensor *w, uint64_t key, float *tmp, float *out);

/* The int4 options of @o (--quant gptq|awq|ct-int4, --group-size,
 * --desc-act, --sym) checked and set in @d (genq4.c). */
int gen_resolve_q4(const struct moe_gen_options *o, struct gen_dims *d, struct moe_err *err);

#endif
