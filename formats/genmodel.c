/* SPDX-License-Identifier: MIT */
/*
 * Random Hugging Face checkpoints in the real layout of each architecture.
 *
 * The point is that `moectl pack` and the tests meet the same names, shapes,
 * config fields and sharding as a downloaded checkpoint, including the
 * tensors the packer must ignore (attention, dense layers, DeepSeek-V3's MTP
 * layer), without downloading hundreds of GB.
 *
 * Values come from a counter-based generator keyed by (seed, tensor name):
 * element i of a tensor is a pure function of the key and i, so files are
 * bit-identical run to run, independent of sharding and write order, and
 * any chunk can be produced on its own.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "genmodel.h"
#include "safetensors.h"

/* HF's default max_shard_size is "5GB" (decimal). */
#define GEN_DEFAULT_SHARD (5000ull * 1000 * 1000)

/* Bytes generated per write: large enough for full disk speed. */
#define GEN_CHUNK (4u << 20)

/* Bounds on what gen-model writes beyond moe_model_config_validate's. */
#define GEN_MAX_VOCAB (1u << 22)
#define GEN_MAX_HEADS 1024u
#define GEN_MAX_ATTN_DIM 65536u

/* ------------------------------------------------------------ options */

void moe_gen_defaults(enum moe_arch arch, struct moe_gen_options *o)
{
	memset(o, 0, sizeof(*o));
	o->arch = arch;
	o->dtype = MOE_DTYPE_BF16;
	o->hidden_size = 64;
	o->moe_intermediate_size = 32;
	o->num_experts = 8;
	o->top_k = 2;
	o->num_layers = 2;
	o->n_group = 1;
	o->topk_group = 1;
	o->decoder_sparse_step = 1;
	o->vocab_size = 256;
	o->num_attention_heads = 4;
	o->num_key_value_heads = 2;
	o->norm_topk_prob = -1;
	switch (arch) {
	case MOE_ARCH_MIXTRAL:
		break;
	case MOE_ARCH_QWEN2_MOE:
		o->intermediate_size = 128;
		o->n_shared_experts = 1;
		o->shared_intermediate_size = 128;
		break;
	case MOE_ARCH_QWEN3_MOE:
		o->intermediate_size = 128;
		o->head_dim = 16;
		break;
	case MOE_ARCH_OLMOE:
		o->num_key_value_heads = 4;
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3:
		/* Three layers so that layer 0 is dense and 1, 2 are MoE. */
		o->num_layers = 3;
		o->first_k_dense_replace = 1;
		o->intermediate_size = 128;
		o->num_key_value_heads = 4;
		o->kv_lora_rank = 32;
		o->qk_nope_head_dim = 16;
		o->qk_rope_head_dim = 8;
		o->v_head_dim = 16;
		o->n_shared_experts = arch == MOE_ARCH_DEEPSEEK_V2 ? 2 : 1;
		if (arch == MOE_ARCH_DEEPSEEK_V3) {
			/* Four groups of four, two kept: the grouping matters. */
			o->num_experts = 16;
			o->top_k = 4;
			o->n_group = 4;
			o->topk_group = 2;
			o->q_lora_rank = 32;
			o->num_nextn_predict_layers = 1;
		}
		break;
	default:
		break;
	}
}

struct gen_preset {
	const char *name;
	int arch;                 /* -1: keep opt->arch */
	uint32_t hidden, moe_i, dense_i, experts, top_k, layers, vocab;
	uint32_t heads, kv_heads, head_dim;
	uint32_t n_group, topk_group, n_shared, shared_i, first_dense;
	int norm;                 /* -1: default */
	float scaling;
	uint32_t q_lora, kv_lora, nope, rope, v_head, mtp;
};

/* The shapes of the released models' config.json files. */
static const struct gen_preset presets[] = {
	{ .name = "tiny", .arch = -1 },
	{ .name = "small", .arch = -1 },
	{ "deepseek-v3", MOE_ARCH_DEEPSEEK_V3, 7168, 2048, 18432, 256, 8, 61, 129280, 128, 128, 0,
	  8, 4, 1, 0, 3, 1, 2.5f, 1536, 512, 128, 64, 128, 1 },
	{ "deepseek-v2-lite", MOE_ARCH_DEEPSEEK_V2, 2048, 1408, 10944, 64, 6, 27, 102400, 16, 16, 0,
	  1, 1, 2, 0, 1, 0, 1.0f, 0, 512, 128, 64, 128, 0 },
	{ "qwen3-30b-a3b", MOE_ARCH_QWEN3_MOE, 2048, 768, 6144, 128, 8, 48, 151936, 32, 4, 128,
	  1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0 },
	{ "qwen2-57b-a14b", MOE_ARCH_QWEN2_MOE, 3584, 2560, 18944, 64, 8, 28, 151936, 28, 4, 0,
	  1, 1, 1, 20480, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
	{ "mixtral-8x7b", MOE_ARCH_MIXTRAL, 4096, 14336, 0, 8, 2, 32, 32000, 32, 8, 0,
	  1, 1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0 },
	{ "olmoe-1b-7b", MOE_ARCH_OLMOE, 2048, 1024, 0, 64, 8, 16, 50304, 16, 16, 0,
	  1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* "small": big enough for benchmarks to measure something (~100 MB in bf16),
 * small enough to write in a second. */
static void gen_small(struct moe_gen_options *o)
{
	o->hidden_size = 512;
	o->moe_intermediate_size = 256;
	o->num_layers = o->arch >= MOE_ARCH_DEEPSEEK_V2 ? 5 : 4;
	o->vocab_size = 1024;
	o->num_attention_heads = 8;
	if (o->intermediate_size)
		o->intermediate_size = 1024;
	if (o->arch == MOE_ARCH_QWEN2_MOE)
		o->shared_intermediate_size = 1024;
	if (o->arch == MOE_ARCH_QWEN3_MOE)
		o->head_dim = 64;
	if (o->arch == MOE_ARCH_OLMOE || o->arch >= MOE_ARCH_DEEPSEEK_V2)
		o->num_key_value_heads = 8;
	if (o->arch == MOE_ARCH_MIXTRAL)
		return;    /* Mixtral: 8 experts, top-2 */
	o->num_experts = 32;
	o->top_k = 4;
	if (o->arch == MOE_ARCH_DEEPSEEK_V3) {
		o->top_k = 8;
		o->n_group = 8;
		o->topk_group = 4;
		o->q_lora_rank = 128;
	}
	if (o->arch >= MOE_ARCH_DEEPSEEK_V2) {
		o->kv_lora_rank = 64;
		o->qk_nope_head_dim = 32;
		o->qk_rope_head_dim = 16;
		o->v_head_dim = 32;
	}
}

int moe_gen_preset(const char *name, struct moe_gen_options *opt, struct moe_err *err)
{
	const struct gen_preset *p = NULL;
	enum moe_arch arch;

	for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
		if (!strcmp(name, presets[i].name))
			p = &presets[i];
	if (!p)
		return moe_err_set(err, -EINVAL,
				   "unknown preset '%s' (presets: tiny, small, deepseek-v3, deepseek-v2-lite, "
				   "qwen3-30b-a3b, qwen2-57b-a14b, mixtral-8x7b, olmoe-1b-7b)", name);
	arch = p->arch < 0 ? opt->arch : (enum moe_arch)p->arch;
	if ((unsigned)arch >= MOE_ARCH_COUNT)
		return moe_err_set(err, -EINVAL, "preset '%s' needs an architecture", name);
	moe_gen_defaults(arch, opt);
	if (p->arch < 0) {
		if (!strcmp(name, "small"))
			gen_small(opt);
		return 0;
	}
	opt->hidden_size = p->hidden;
	opt->moe_intermediate_size = p->moe_i;
	opt->intermediate_size = p->dense_i;
	opt->num_experts = p->experts;
	opt->top_k = p->top_k;
	opt->num_layers = p->layers;
	opt->vocab_size = p->vocab;
	opt->num_attention_heads = p->heads;
	opt->num_key_value_heads = p->kv_heads;
	opt->head_dim = p->head_dim;
	opt->n_group = p->n_group;
	opt->topk_group = p->topk_group;
	opt->n_shared_experts = p->n_shared;
	opt->shared_intermediate_size = p->shared_i;
	opt->first_k_dense_replace = p->first_dense;
	opt->norm_topk_prob = p->norm;
	opt->routed_scaling_factor = p->scaling;
	opt->q_lora_rank = p->q_lora;
	opt->kv_lora_rank = p->kv_lora;
	opt->qk_nope_head_dim = p->nope;
	opt->qk_rope_head_dim = p->rope;
	opt->v_head_dim = p->v_head;
	opt->num_nextn_predict_layers = p->mtp;
	return 0;
}

/* --------------------------------------------------------- resolution */

/* Everything moe_gen_model writes, defaults filled in and checked. */
struct gen_dims {
	enum moe_arch arch;
	enum moe_dtype dtype;
	uint32_t H, I, dense_I, E, k, L, V;
	uint32_t heads, kv_heads, head_dim;
	uint32_t n_group, topk_group, n_shared, shared_I, first_dense, sparse_step;
	uint32_t q_lora, kv_lora, nope, rope, v_head, mtp;
	bool norm_topk, gated, fused, deepseek;
	float scaling;
	const char *act, *topk_method;
	uint64_t shard_bytes;
	float wscale;
	float skew;                      /* router_skew; 0: routers as they were */
	struct moe_layer_rule rule;
};

static uint32_t gcd_u32(uint32_t a, uint32_t b)
{
	while (b) {
		uint32_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

static uint32_t or_default(uint32_t v, uint32_t d)
{
	return v ? v : d;
}

static int gen_resolve(const struct moe_gen_options *o, struct gen_dims *d, struct moe_err *err)
{
	struct moe_gen_options def;
	struct moe_model_config cfg;
	const char *an = moe_arch_name(o->arch);
	enum moe_act act;
	int r;

	if (!an)
		return moe_err_set(err, -EINVAL, "invalid architecture %d", (int)o->arch);
	if (moe_dtype_size(o->dtype) == 0)
		return moe_err_set(err, -EINVAL, "invalid dtype %d", (int)o->dtype);
	moe_gen_defaults(o->arch, &def);
	memset(d, 0, sizeof(*d));
	d->arch = o->arch;
	d->dtype = o->dtype;
	d->deepseek = o->arch == MOE_ARCH_DEEPSEEK_V2 || o->arch == MOE_ARCH_DEEPSEEK_V3;
	d->H = or_default(o->hidden_size, def.hidden_size);
	d->I = or_default(o->moe_intermediate_size, def.moe_intermediate_size);
	d->E = or_default(o->num_experts, def.num_experts);
	d->k = or_default(o->top_k, def.top_k);
	d->L = or_default(o->num_layers, def.num_layers);
	d->V = or_default(o->vocab_size, def.vocab_size);
	d->heads = or_default(o->num_attention_heads, def.num_attention_heads);
	d->kv_heads = or_default(o->num_key_value_heads, def.num_key_value_heads);
	d->n_group = or_default(o->n_group, 1);
	d->topk_group = or_default(o->topk_group, 1);
	d->n_shared = o->n_shared_experts;
	d->first_dense = o->first_k_dense_replace;
	d->sparse_step = or_default(o->decoder_sparse_step, 1);
	d->gated = !o->plain_experts;
	d->fused = o->fused_experts;
	d->act = o->hidden_act ? o->hidden_act : "silu";
	d->shard_bytes = o->shard_bytes ? o->shard_bytes : GEN_DEFAULT_SHARD;
	d->wscale = o->weight_scale;
	d->mtp = o->num_nextn_predict_layers;
	d->skew = o->router_skew;
	/* Written so that NaN fails too. */
	if (!(d->skew >= 0.0f && d->skew <= MOE_GEN_MAX_ROUTER_SKEW))
		return moe_err_set(err, -EINVAL, "router_skew %g: expected a number from 0 to %g",
				   (double)d->skew, (double)MOE_GEN_MAX_ROUTER_SKEW);

	/* Options the architecture has no config field for are refused rather
	 * than silently dropped. */
	if (!d->deepseek) {
		if (d->n_group != 1 || d->topk_group != 1)
			return moe_err_set(err, -EINVAL, "expert groups (n_group %u, topk_group %u) exist only "
					   "in deepseek_v2/deepseek_v3, not %s", d->n_group, d->topk_group, an);
		if (d->first_dense)
			return moe_err_set(err, -EINVAL, "first_k_dense_replace exists only in deepseek_v2/"
					   "deepseek_v3, not %s", an);
		if (o->routed_scaling_factor != 0.0f && o->routed_scaling_factor != 1.0f)
			return moe_err_set(err, -EINVAL, "routed_scaling_factor exists only in deepseek_v2/"
					   "deepseek_v3, not %s", an);
		if (o->topk_method)
			return moe_err_set(err, -EINVAL, "topk_method exists only in deepseek_v2/deepseek_v3, "
					   "not %s", an);
	}
	if (d->mtp && o->arch != MOE_ARCH_DEEPSEEK_V3)
		return moe_err_set(err, -EINVAL, "num_nextn_predict_layers (MTP) exists only in deepseek_v3");
	if (d->mtp > 1)
		return moe_err_set(err, -EINVAL, "num_nextn_predict_layers %u: only 0 or 1 is supported", d->mtp);
	if ((o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_QWEN3_MOE ||
	     o->arch == MOE_ARCH_OLMOE) && d->n_shared)
		return moe_err_set(err, -EINVAL, "%s has no shared experts", an);
	if (o->arch == MOE_ARCH_MIXTRAL && o->norm_topk_prob >= 0)
		return moe_err_set(err, -EINVAL, "mixtral has no norm_topk_prob: it always renormalises");
	if ((o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_OLMOE) && o->intermediate_size)
		return moe_err_set(err, -EINVAL, "%s has no dense layers: its intermediate_size is the "
				   "expert size (moe_intermediate_size)", an);
	if (o->arch != MOE_ARCH_QWEN2_MOE && o->arch != MOE_ARCH_QWEN3_MOE && d->sparse_step != 1)
		return moe_err_set(err, -EINVAL, "decoder_sparse_step exists only in qwen2_moe/qwen3_moe");
	if (o->arch != MOE_ARCH_QWEN2_MOE && o->shared_intermediate_size)
		return moe_err_set(err, -EINVAL, "shared_expert_intermediate_size exists only in qwen2_moe%s",
				   d->deepseek ? " (deepseek's is n_shared_experts x moe_intermediate_size)" : "");
	if (moe_act_parse(d->act, &act) < 0)
		return moe_err_set(err, -EINVAL, "unknown activation '%s' (silu, gelu, gelu_pytorch_tanh, relu)",
				   d->act);

	d->dense_I = o->intermediate_size;
	if (o->arch == MOE_ARCH_MIXTRAL || o->arch == MOE_ARCH_OLMOE)
		d->dense_I = 0;
	else if (!d->dense_I)
		d->dense_I = def.intermediate_size ? def.intermediate_size : 4 * d->I;
	if (o->arch == MOE_ARCH_QWEN2_MOE)
		d->shared_I = d->n_shared ? or_default(o->shared_intermediate_size, 4 * d->I) : 0;
	else if (d->deepseek)
		d->shared_I = d->n_shared * d->I;

	switch (o->arch) {
	case MOE_ARCH_DEEPSEEK_V2:
		d->norm_topk = o->norm_topk_prob > 0;
		d->scaling = o->routed_scaling_factor != 0.0f ? o->routed_scaling_factor : 1.0f;
		d->topk_method = o->topk_method ? o->topk_method : "greedy";
		if (strcmp(d->topk_method, "greedy") && strcmp(d->topk_method, "group_limited_greedy"))
			return moe_err_set(err, -EINVAL, "deepseek_v2 topk_method '%s': expected greedy or "
					   "group_limited_greedy", d->topk_method);
		break;
	case MOE_ARCH_DEEPSEEK_V3:
		d->norm_topk = o->norm_topk_prob != 0;
		d->scaling = o->routed_scaling_factor != 0.0f ? o->routed_scaling_factor : 2.5f;
		d->topk_method = o->topk_method ? o->topk_method : "noaux_tc";
		if (strcmp(d->topk_method, "noaux_tc"))
			return moe_err_set(err, -EINVAL, "deepseek_v3 topk_method '%s': only noaux_tc",
					   d->topk_method);
		break;
	case MOE_ARCH_MIXTRAL:
		d->norm_topk = true;
		d->scaling = 1.0f;
		break;
	case MOE_ARCH_QWEN3_MOE:
		d->norm_topk = o->norm_topk_prob != 0;   /* the released Qwen3 MoE models: true */
		d->scaling = 1.0f;
		break;
	default:
		d->norm_topk = o->norm_topk_prob > 0;
		d->scaling = 1.0f;
		break;
	}
	if (!isfinite(d->scaling) || d->scaling <= 0.0f)
		return moe_err_set(err, -EINVAL, "routed_scaling_factor %g must be positive", (double)d->scaling);

	/* Attention shapes only have to be self-consistent. */
	if (d->heads > GEN_MAX_HEADS || d->kv_heads > GEN_MAX_HEADS)
		return moe_err_set(err, -EINVAL, "num_attention_heads %u / num_key_value_heads %u: at most %u",
				   d->heads, d->kv_heads, GEN_MAX_HEADS);
	if (d->deepseek) {
		d->kv_heads = d->heads;          /* MLA: the config repeats num_attention_heads */
		d->q_lora = o->q_lora_rank;
		d->kv_lora = or_default(o->kv_lora_rank, def.kv_lora_rank);
		d->nope = or_default(o->qk_nope_head_dim, def.qk_nope_head_dim);
		d->rope = or_default(o->qk_rope_head_dim, def.qk_rope_head_dim);
		d->v_head = or_default(o->v_head_dim, def.v_head_dim);
		if (d->q_lora > GEN_MAX_ATTN_DIM || d->kv_lora > GEN_MAX_ATTN_DIM ||
		    d->nope > GEN_MAX_ATTN_DIM || d->rope > GEN_MAX_ATTN_DIM || d->v_head > GEN_MAX_ATTN_DIM)
			return moe_err_set(err, -EINVAL, "MLA dimensions are at most %u", GEN_MAX_ATTN_DIM);
	} else if (o->arch == MOE_ARCH_QWEN3_MOE) {
		d->head_dim = or_default(o->head_dim, def.head_dim);
		if (d->head_dim > GEN_MAX_ATTN_DIM)
			return moe_err_set(err, -EINVAL, "head_dim %u is above %u", d->head_dim, GEN_MAX_ATTN_DIM);
		d->kv_heads = gcd_u32(d->heads, d->kv_heads);
	} else {
		/* head_dim = H / heads: pick the largest head count that divides
		 * H so that any --hidden works. */
		while (d->heads > 1 && d->H % d->heads)
			d->heads--;
		d->kv_heads = gcd_u32(d->heads, d->kv_heads);
		d->head_dim = d->H / (d->heads ? d->heads : 1);
	}
	if (d->V > GEN_MAX_VOCAB)
		return moe_err_set(err, -EINVAL, "vocab_size %u is above %u", d->V, GEN_MAX_VOCAB);

	/* The routing and shape rules moed itself enforces. */
	memset(&cfg, 0, sizeof(cfg));
	cfg.arch = o->arch;
	cfg.hidden_size = d->H;
	cfg.moe_intermediate_size = d->I;
	cfg.num_experts = d->E;
	cfg.top_k = d->k;
	cfg.num_hidden_layers = d->L;
	cfg.n_group = d->n_group;
	cfg.topk_group = d->topk_group;
	cfg.n_shared_experts = d->n_shared;
	cfg.shared_intermediate_size = d->shared_I;
	cfg.scoring = o->arch == MOE_ARCH_DEEPSEEK_V3 ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX;
	cfg.topk_method = o->arch == MOE_ARCH_DEEPSEEK_V3 ? MOE_TOPK_NOAUX_TC :
			  (d->topk_method && !strcmp(d->topk_method, "group_limited_greedy")) ?
			  MOE_TOPK_GROUP_LIMITED : MOE_TOPK_GREEDY;
	cfg.norm_topk_prob = d->norm_topk;
	cfg.gated = d->gated;
	cfg.act = act;
	cfg.routed_scaling_factor = d->scaling;
	cfg.weight_dtype = d->dtype;
	r = moe_model_config_validate(&cfg, err);
	if (r < 0)
		return r;
	if (d->dense_I > (1u << 20))
		return moe_err_set(err, -EINVAL, "intermediate_size %u is above %u", d->dense_I, 1u << 20);

	d->rule.arch = o->arch;
	d->rule.num_hidden_layers = d->L;
	d->rule.decoder_sparse_step = d->sparse_step;
	d->rule.first_k_dense_replace = d->first_dense;
	d->rule.moe_layer_freq = 1;
	for (uint32_t l = 0; l < d->L; l++)
		if (moe_layer_rule_is_moe(&d->rule, l))
			return 0;
	return moe_err_set(err, -EINVAL, "no MoE layer among the %u layers (first_k_dense_replace %u, "
			   "decoder_sparse_step %u)", d->L, d->first_dense, d->sparse_step);
}

/* ------------------------------------------------------------ the plan */

enum gen_fill {
	FILL_RANDOM,     /* uniform, std given */
	FILL_ONES,       /* norm weights */
	FILL_ROUTER,     /* FILL_RANDOM, row j times row_scale[j] (router_skew) */
};

struct gen_tensor {
	char *name;
	enum moe_dtype dtype;
	uint32_t ndim;
	uint64_t shape[3];
	enum gen_fill fill;
	float amp;       /* half-width of the uniform distribution */
	uint64_t nbytes;
	uint32_t shard;
	float *row_scale; /* FILL_ROUTER: [shape[0]], set by plan_skew; owned */
};

struct gen_plan {
	struct gen_tensor *t;
	size_t n, cap;
	uint64_t total;
	uint32_t n_shards;
	int oom;         /* sticky: checked once after building */
};

static void plan_add(struct gen_plan *p, enum moe_dtype dt, enum gen_fill fill, float std,
		     uint32_t ndim, const uint64_t *shape, const char *fmt, ...)
	__attribute__((format(printf, 7, 8)));

static void plan_add(struct gen_plan *p, enum moe_dtype dt, enum gen_fill fill, float std,
		     uint32_t ndim, const uint64_t *shape, const char *fmt, ...)
{
	struct gen_tensor *t;
	va_list ap;

	if (p->oom)
		return;
	if (p->n == p->cap) {
		size_t cap = p->cap ? p->cap * 2 : 256;
		struct gen_tensor *nt = realloc(p->t, cap * sizeof(*nt));

		if (!nt) {
			p->oom = 1;
			return;
		}
		p->t = nt;
		p->cap = cap;
	}
	t = &p->t[p->n];
	memset(t, 0, sizeof(*t));
	va_start(ap, fmt);
	if (vasprintf(&t->name, fmt, ap) < 0) {
		va_end(ap);
		p->oom = 1;
		return;
	}
	va_end(ap);
	t->dtype = dt;
	t->fill = fill;
	t->amp = std * 1.7320508f;   /* uniform on [-a, a] has std a / sqrt(3) */
	t->ndim = ndim;
	t->nbytes = moe_dtype_size(dt);
	for (uint32_t i = 0; i < ndim; i++) {
		t->shape[i] = shape[i];
		t->nbytes *= shape[i];   /* bounded by gen_resolve: far from overflow */
	}
	p->total += t->nbytes;
	p->n++;
}

static void plan_free(struct gen_plan *p)
{
	for (size_t i = 0; i < p->n; i++) {
		free(p->t[i].name);
		free(p->t[i].row_scale);
	}
	free(p->t);
}

#define SHAPE(...) ((const uint64_t[]){ __VA_ARGS__ })

/* A matrix [rows, cols] of the model dtype. */
#define MAT(p, d, std, rows, cols, ...) \
	plan_add(p, (d)->dtype, FILL_RANDOM, std, 2, SHAPE(rows, cols), __VA_ARGS__)
/* A norm weight [n] of ones. */
#define NORM(p, d, n, ...) plan_add(p, (d)->dtype, FILL_ONES, 0, 1, SHAPE(n), __VA_ARGS__)

/* Std of the "other" tensors (HF's initializer_range) and of the router and
 * experts, which follow 1/sqrt(fan_in) so activations keep their scale and
 * the router (twice that) picks experts decisively. */
static float std_other(const struct gen_dims *d)
{
	return d->wscale > 0 ? d->wscale : 0.02f;
}

static float std_fanin(const struct gen_dims *d, uint64_t fan_in, float mult)
{
	return d->wscale > 0 ? d->wscale : mult / sqrtf((float)fan_in);
}

static void plan_attention(struct gen_plan *p, const struct gen_dims *d, uint32_t l)
{
	float s = std_other(d);
	uint64_t H = d->H;

	if (d->deepseek) {
		uint64_t qh = (uint64_t)d->heads * (d->nope + d->rope);

		if (d->q_lora) {
			MAT(p, d, s, d->q_lora, H, "model.layers.%u.self_attn.q_a_proj.weight", l);
			NORM(p, d, d->q_lora, "model.layers.%u.self_attn.q_a_layernorm.weight", l);
			MAT(p, d, s, qh, d->q_lora, "model.layers.%u.self_attn.q_b_proj.weight", l);
		} else {
			MAT(p, d, s, qh, H, "model.layers.%u.self_attn.q_proj.weight", l);
		}
		MAT(p, d, s, (uint64_t)d->kv_lora + d->rope, H,
		    "model.layers.%u.self_attn.kv_a_proj_with_mqa.weight", l);
		NORM(p, d, d->kv_lora, "model.layers.%u.self_attn.kv_a_layernorm.weight", l);
		MAT(p, d, s, (uint64_t)d->heads * (d->nope + d->v_head), d->kv_lora,
		    "model.layers.%u.self_attn.kv_b_proj.weight", l);
		MAT(p, d, s, H, (uint64_t)d->heads * d->v_head, "model.layers.%u.self_attn.o_proj.weight", l);
		return;
	}
	uint64_t q = (uint64_t)d->heads * d->head_dim, kv = (uint64_t)d->kv_heads * d->head_dim;

	MAT(p, d, s, q, H, "model.layers.%u.self_attn.q_proj.weight", l);
	MAT(p, d, s, kv, H, "model.layers.%u.self_attn.k_proj.weight", l);
	MAT(p, d, s, kv, H, "model.layers.%u.self_attn.v_proj.weight", l);
	MAT(p, d, s, H, q, "model.layers.%u.self_attn.o_proj.weight", l);
	if (d->arch == MOE_ARCH_QWEN2_MOE) {
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(q), "model.layers.%u.self_attn.q_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.k_proj.bias", l);
		plan_add(p, d->dtype, FILL_RANDOM, s, 1, SHAPE(kv), "model.layers.%u.self_attn.v_proj.bias", l);
	} else if (d->arch == MOE_ARCH_QWEN3_MOE) {
		/* Qwen3: RMSNorm over each head. */
		NORM(p, d, d->head_dim, "model.layers.%u.self_attn.q_norm.weight", l);
		NORM(p, d, d->head_dim, "model.layers.%u.self_attn.k_norm.weight", l);
	} else if (d->arch == MOE_ARCH_OLMOE) {
		/* OLMoE: RMSNorm over the whole projection. */
		NORM(p, d, q, "model.layers.%u.self_attn.q_norm.weight", l);
		NORM(p, d, kv, "model.layers.%u.self_attn.k_norm.weight", l);
	}
}

/* gate/up [I,H] and down [H,I] under @prefix (the plain MLP layout). */
static void plan_mlp(struct gen_plan *p, const struct gen_dims *d, uint64_t I, bool gated, float in_std,
		     float out_std, const char *prefix)
{
	if (gated)
		MAT(p, d, in_std, I, d->H, "%s.gate_proj.weight", prefix);
	MAT(p, d, in_std, I, d->H, "%s.up_proj.weight", prefix);
	MAT(p, d, out_std, d->H, I, "%s.down_proj.weight", prefix);
}

static void plan_moe(struct gen_plan *p, const struct gen_dims *d, uint32_t l)
{
	bool mixtral = d->arch == MOE_ARCH_MIXTRAL;
	/* transformers v5 renames Mixtral's block_sparse_moe to mlp, and its
	 * fused layout is the same for every architecture. */
	const char *blk = mixtral && !d->fused ? "block_sparse_moe" : "mlp";
	float s_in = std_fanin(d, d->H, 1.0f), s_out = std_fanin(d, d->I, 1.0f);
	char prefix[96];

	/* Without skew, FILL_RANDOM: the bytes the generator wrote before the option. */
	plan_add(p, d->dtype, d->skew > 0.0f ? FILL_ROUTER : FILL_RANDOM, std_fanin(d, d->H, 2.0f), 2,
		 SHAPE(d->E, d->H), "model.layers.%u.%s.gate.weight", l, blk);
	if (d->arch == MOE_ARCH_DEEPSEEK_V3)
		/* F32 in the released checkpoint too, whatever the weights are. */
		plan_add(p, MOE_DTYPE_F32, FILL_RANDOM, 0.05f / 1.7320508f, 1, SHAPE(d->E),
			 "model.layers.%u.mlp.gate.e_score_correction_bias", l);
	if (d->fused) {
		/* Gate rows first, then up; plain experts have only up_proj [E,I,H]. */
		if (d->gated)
			plan_add(p, d->dtype, FILL_RANDOM, s_in, 3, SHAPE(d->E, 2 * (uint64_t)d->I, d->H),
				 "model.layers.%u.mlp.experts.gate_up_proj", l);
		else
			plan_add(p, d->dtype, FILL_RANDOM, s_in, 3, SHAPE(d->E, d->I, d->H),
				 "model.layers.%u.mlp.experts.up_proj", l);
		plan_add(p, d->dtype, FILL_RANDOM, s_out, 3, SHAPE(d->E, d->H, d->I),
			 "model.layers.%u.mlp.experts.down_proj", l);
	} else {
		for (uint32_t j = 0; j < d->E; j++) {
			if (mixtral) {
				if (d->gated)
					MAT(p, d, s_in, d->I, d->H,
					    "model.layers.%u.block_sparse_moe.experts.%u.w1.weight", l, j);
				MAT(p, d, s_out, d->H, d->I, "model.layers.%u.block_sparse_moe.experts.%u.w2.weight",
				    l, j);
				MAT(p, d, s_in, d->I, d->H, "model.layers.%u.block_sparse_moe.experts.%u.w3.weight",
				    l, j);
			} else {
				snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp.experts.%u", l, j);
				plan_mlp(p, d, d->I, d->gated, s_in, s_out, prefix);
			}
		}
	}
	if (d->shared_I) {
		bool qwen = d->arch == MOE_ARCH_QWEN2_MOE;

		snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp.%s", l,
			 qwen ? "shared_expert" : "shared_experts");
		plan_mlp(p, d, d->shared_I, d->gated, s_in, std_fanin(d, d->shared_I, 1.0f), prefix);
		if (qwen)
			MAT(p, d, s_in, 1, d->H, "model.layers.%u.mlp.shared_expert_gate.weight", l);
	}
}

static void plan_layer(struct gen_plan *p, const struct gen_dims *d, uint32_t l, bool moe)
{
	char prefix[64];

	NORM(p, d, d->H, "model.layers.%u.input_layernorm.weight", l);
	plan_attention(p, d, l);
	NORM(p, d, d->H, "model.layers.%u.post_attention_layernorm.weight", l);
	if (moe) {
		plan_moe(p, d, l);
	} else {
		snprintf(prefix, sizeof(prefix), "model.layers.%u.mlp", l);
		plan_mlp(p, d, d->dense_I, true, std_other(d), std_other(d), prefix);
	}
}

static int plan_build(struct gen_plan *p, const struct gen_dims *d, struct moe_err *err)
{
	float s = std_other(d);
	uint64_t used = 0;

	memset(p, 0, sizeof(*p));
	MAT(p, d, s, d->V, d->H, "model.embed_tokens.weight");
	for (uint32_t l = 0; l < d->L; l++)
		plan_layer(p, d, l, moe_layer_rule_is_moe(&d->rule, l));
	NORM(p, d, d->H, "model.norm.weight");
	MAT(p, d, s, d->V, d->H, "lm_head.weight");
	for (uint32_t m = 0; m < d->mtp; m++) {
		/* DeepSeek-V3's multi-token-prediction module, saved as one more
		 * decoder layer with its own embedding and head. */
		uint32_t l = d->L + m;

		MAT(p, d, s, d->V, d->H, "model.layers.%u.embed_tokens.weight", l);
		NORM(p, d, d->H, "model.layers.%u.enorm.weight", l);
		NORM(p, d, d->H, "model.layers.%u.hnorm.weight", l);
		MAT(p, d, s, d->H, 2 * (uint64_t)d->H, "model.layers.%u.eh_proj.weight", l);
		plan_layer(p, d, l, true);
		NORM(p, d, d->H, "model.layers.%u.shared_head.norm.weight", l);
		MAT(p, d, s, d->V, d->H, "model.layers.%u.shared_head.head.weight", l);
	}
	if (p->oom) {
		plan_free(p);
		return moe_err_set(err, -ENOMEM, "out of memory planning %zu tensors", p->n);
	}
	/* Fill shards in order, as save_pretrained does: a new shard when the
	 * next tensor would push the current one past the limit. */
	for (size_t i = 0; i < p->n; i++) {
		if (used && used + p->t[i].nbytes > d->shard_bytes) {
			p->n_shards++;
			used = 0;
		}
		p->t[i].shard = p->n_shards;
		used += p->t[i].nbytes;
	}
	p->n_shards++;
	return 0;
}

/* ------------------------------------------------------------- values */

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Chris Wellons' lowbias32: a 32-bit bijection with good avalanche, cheap
 * enough (two 32-bit multiplies) for the compiler to vectorise. */
static inline uint32_t hash32(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return x;
}

static uint64_t tensor_key(uint64_t seed, const char *name)
{
	uint64_t h = 0xcbf29ce484222325ull;   /* FNV-1a */

	for (const unsigned char *c = (const unsigned char *)name; *c; c++)
		h = (h ^ *c) * 0x100000001b3ull;
	return mix64(seed ^ h);
}

/* Four lanes with GCC/clang vector extensions: portable C that compiles to
 * SSE2/NEON at -O2, where the plain loop does not vectorise.  16 bytes so
 * that no vector crosses a function boundary in a wider register (-Wpsabi). */
typedef uint32_t gen_u32x4 __attribute__((vector_size(16)));
typedef int32_t gen_i32x4 __attribute__((vector_size(16)));
typedef float gen_f32x4 __attribute__((vector_size(16)));
typedef uint16_t gen_u16x4 __attribute__((vector_size(8)));

/* The value of the element whose hash input is @x: top 24 bits of the
 * hash, centred, times @scale: uniform in (-amp, amp). */
static inline float gen1(uint32_t x, float scale)
{
	return ((float)(int32_t)(hash32(x) >> 8) - 8388607.5f) * scale;
}

static inline gen_f32x4 gen4(uint32_t x0, float scale)
{
	gen_u32x4 x = x0 + (gen_u32x4){ 0, 1, 2, 3 };

	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return (__builtin_convertvector((gen_i32x4)(x >> 8), gen_f32x4) - 8388607.5f) * scale;
}

/* bfloat16 round to nearest even; the values are finite, no NaN case. */
static inline uint16_t bf16_rne(float v)
{
	uint32_t u;

	memcpy(&u, &v, sizeof(u));
	return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Element @i of @out in @dt, rounded as the vector paths round. */
static inline void gen_store(enum moe_dtype dt, void *out, size_t i, float v)
{
	switch (dt) {
	case MOE_DTYPE_BF16:
		((uint16_t *)out)[i] = bf16_rne(v);
		break;
	case MOE_DTYPE_F16:
		((uint16_t *)out)[i] = moe_f32_to_f16(v);
		break;
	default:
		((float *)out)[i] = v;
		break;
	}
}

/*
 * Elements [first, first + count) of tensor @t into @out; the range must not
 * cross a multiple of 2^32 elements.  Element i is
 *     gen1(lo32(i) + base),  base = lo32(mix64(key + hi32(i)))
 * a pure function of the key and i, so any chunk can be generated alone and
 * the vector and scalar paths agree bit for bit.
 */
static void gen_values(const struct gen_tensor *t, uint64_t key, uint64_t first, size_t count, void *out)
{
	float scale = t->amp / 8388608.0f;
	uint32_t x0 = (uint32_t)first + (uint32_t)mix64(key + (first >> 32));
	size_t i = 0;

	if (t->fill == FILL_ONES) {
		for (i = 0; i < count; i++) {
			if (t->dtype == MOE_DTYPE_F32)
				((float *)out)[i] = 1.0f;
			else
				((uint16_t *)out)[i] = t->dtype == MOE_DTYPE_BF16 ? 0x3f80 : 0x3c00;
		}
		return;
	}
	if (t->fill == FILL_ROUTER) {
		/* gen1 is what gen4 computes, so row j is the unskewed row
		 * times its factor, rounded once.  Routers are small: scalar. */
		uint64_t cols = t->shape[1];

		for (i = 0; i < count; i++) {
			float f = t->row_scale[(first + i) / cols];

			gen_store(t->dtype, out, i, gen1(x0 + (uint32_t)i, scale) * f);
		}
		return;
	}
	switch (t->dtype) {
	case MOE_DTYPE_BF16: {
		uint16_t *o = out;

		for (; i + 4 <= count; i += 4) {
			gen_f32x4 f = gen4(x0 + (uint32_t)i, scale);
			gen_u32x4 u;
			gen_u16x4 h;

			memcpy(&u, &f, sizeof(u));
			h = __builtin_convertvector((u + 0x7fffu + ((u >> 16) & 1u)) >> 16, gen_u16x4);
			memcpy(o + i, &h, sizeof(h));
		}
		for (; i < count; i++)
			o[i] = bf16_rne(gen1(x0 + (uint32_t)i, scale));
		break;
	}
	case MOE_DTYPE_F16: {
		uint16_t *o = out;

		for (; i < count; i++)
			o[i] = moe_f32_to_f16(gen1(x0 + (uint32_t)i, scale));
		break;
	}
	default: {
		float *o = out;

		for (; i + 4 <= count; i += 4) {
			gen_f32x4 f = gen4(x0 + (uint32_t)i, scale);

			memcpy(o + i, &f, sizeof(f));
		}
		for (; i < count; i++)
			o[i] = gen1(x0 + (uint32_t)i, scale);
		break;
	}
	}
}

/* -------------------------------------------------------- router skew */

/*
 * Why row scales: the router is a linear map without a bias, and test
 * inputs (forward --random-input, a layer's input plus a small change) are
 * roughly symmetric around zero, so no weight can make an expert popular
 * for every token: top-k(-x) is the bottom-k of x.  What a row's norm does
 * set is how often its logit clears the top-k threshold.  With logits
 * f_j * g_j, g_j ~ N(0, s^2), and the k-th largest logit taken as a
 * constant T, expert j is chosen with probability Q(T / (f_j s)), Q the
 * normal tail; so f_j = 1 / Qinv(p_j) (up to a common factor) asks for
 * probability p_j.  The targets p_j follow a Zipf-Mandelbrot curve over
 * the popularity rank, (r + E/16)^-S: the offset keeps the head from being
 * a handful of experts, so S = 1 gives a max/mean load of about 5 at 128
 * or 256 experts, top-8, and a long smooth tail.  deepseek_v3's
 * e_score_correction_bias, which could favour experts for every token, is
 * left as it is: the real one is trained to even the load out.
 */

/* The offset of the Zipf-Mandelbrot curve, as a fraction of the experts. */
#define GEN_SKEW_OFFSET_DIV 16.0
/* The most tokens one expert is asked for: symmetric inputs allow under
 * 1/2, and the row scale for 1/2 is infinite. */
#define GEN_SKEW_PMAX 0.45
/* Qinv is searched in [0, 8]: Q(8) = 6e-16, below any target p. */
#define GEN_SKEW_ZMAX 8.0
/* Tells the key of the popularity order from the key of the values. */
#define GEN_SKEW_SALT 0x5a1f0c0ffee5eedull

/* The z with P(N(0,1) > z) = @p, 0 < p <= 1/2; bisection to double
 * precision (60 halvings of [0, 8]). */
static double gauss_tail_inv(double p)
{
	double lo = 0.0, hi = GEN_SKEW_ZMAX;

	for (int i = 0; i < 60; i++) {
		double mid = 0.5 * (lo + hi);

		if (0.5 * erfc(mid * 0.70710678118654752440) > p)
			lo = mid;
		else
			hi = mid;
	}
	return 0.5 * (lo + hi);
}

/* Unnormalised scale of the expert of popularity rank @r (0: hottest). */
static double skew_raw(uint32_t r, uint32_t E, uint32_t k, double S, double zipf_sum)
{
	double p = k * pow(r + 1 + E / GEN_SKEW_OFFSET_DIV, -S) / zipf_sum;

	return 1.0 / gauss_tail_inv(p < GEN_SKEW_PMAX ? p : GEN_SKEW_PMAX);
}

/*
 * The row factors of one router [E, H] into @f[E]: a popularity order from
 * @key (Fisher-Yates), scales from skew_raw, normalised to an RMS of 1 so
 * that the router's overall scale stays what it is without skew.
 */
static int skew_factors(uint32_t E, uint32_t k, double S, uint64_t key, float *f)
{
	uint32_t *order = malloc(E * sizeof(*order));   /* order[r]: expert of rank r */
	double zipf_sum = 0, sq = 0, rms;

	if (!order)
		return -ENOMEM;
	for (uint32_t j = 0; j < E; j++)
		order[j] = j;
	for (uint32_t j = E - 1; j > 0; j--) {
		uint32_t i = (uint32_t)(mix64(key + j) % (j + 1));
		uint32_t t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (uint32_t r = 0; r < E; r++)
		zipf_sum += pow(r + 1 + E / GEN_SKEW_OFFSET_DIV, -S);
	for (uint32_t r = 0; r < E; r++) {
		double v = skew_raw(r, E, k, S, zipf_sum);

		sq += v * v;
	}
	rms = sqrt(sq / E);
	for (uint32_t r = 0; r < E; r++)
		f[order[r]] = (float)(skew_raw(r, E, k, S, zipf_sum) / rms);
	free(order);
	return 0;
}

/* The row factors of every FILL_ROUTER tensor of @p; each layer has its
 * own popularity order, keyed by the seed and the tensor name. */
static int plan_skew(struct gen_plan *p, const struct gen_dims *d, uint64_t seed, struct moe_err *err)
{
	for (size_t i = 0; i < p->n; i++) {
		struct gen_tensor *t = &p->t[i];
		uint32_t E = (uint32_t)t->shape[0];

		if (t->fill != FILL_ROUTER)
			continue;
		t->row_scale = malloc(E * sizeof(*t->row_scale));
		if (!t->row_scale ||
		    skew_factors(E, d->k, d->skew, mix64(tensor_key(seed, t->name) ^ GEN_SKEW_SALT),
				 t->row_scale) < 0)
			return moe_err_set(err, -ENOMEM, "%s: out of memory", t->name);
	}
	return 0;
}

/* ------------------------------------------------------------ writing */

static void json_set(json_t *o, const char *k, json_t *v)
{
	json_object_set_new(o, k, v);
}

static json_t *config_json(const struct gen_dims *d)
{
	static const char *const archs[MOE_ARCH_COUNT] = {
		[MOE_ARCH_MIXTRAL] = "MixtralForCausalLM",
		[MOE_ARCH_QWEN2_MOE] = "Qwen2MoeForCausalLM",
		[MOE_ARCH_QWEN3_MOE] = "Qwen3MoeForCausalLM",
		[MOE_ARCH_OLMOE] = "OlmoeForCausalLM",
		[MOE_ARCH_DEEPSEEK_V2] = "DeepseekV2ForCausalLM",
		[MOE_ARCH_DEEPSEEK_V3] = "DeepseekV3ForCausalLM",
	};
	static const char *const torch_dtypes[MOE_DTYPE_COUNT] = {
		[MOE_DTYPE_F32] = "float32", [MOE_DTYPE_BF16] = "bfloat16", [MOE_DTYPE_F16] = "float16",
	};
	json_t *c = json_object();

	if (!c)
		return NULL;
	/* Fields every one of these configs has. */
	json_set(c, "architectures", json_pack("[s]", archs[d->arch]));
	json_set(c, "model_type", json_string(moe_arch_name(d->arch)));
	json_set(c, "attention_dropout", json_real(0.0));
	json_set(c, "hidden_act", json_string(d->act));
	json_set(c, "hidden_size", json_integer(d->H));
	json_set(c, "initializer_range", json_real(0.02));
	json_set(c, "num_attention_heads", json_integer(d->heads));
	json_set(c, "num_key_value_heads", json_integer(d->kv_heads));
	json_set(c, "num_hidden_layers", json_integer(d->L));
	json_set(c, "num_experts_per_tok", json_integer(d->k));
	json_set(c, "vocab_size", json_integer(d->V));
	json_set(c, "tie_word_embeddings", json_false());
	json_set(c, "torch_dtype", json_string(torch_dtypes[d->dtype]));
	json_set(c, "use_cache", json_true());
	json_set(c, "transformers_version", json_string("4.51.0"));

	switch (d->arch) {
	case MOE_ARCH_MIXTRAL:
		json_set(c, "intermediate_size", json_integer(d->I));
		json_set(c, "num_local_experts", json_integer(d->E));
		json_set(c, "bos_token_id", json_integer(1));
		json_set(c, "eos_token_id", json_integer(2));
		json_set(c, "max_position_embeddings", json_integer(32768));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "rope_theta", json_real(1e6));
		json_set(c, "router_aux_loss_coef", json_real(0.02));
		json_set(c, "router_jitter_noise", json_real(0.0));
		json_set(c, "sliding_window", json_null());
		break;
	case MOE_ARCH_QWEN2_MOE:
	case MOE_ARCH_QWEN3_MOE:
		json_set(c, "intermediate_size", json_integer(d->dense_I));
		json_set(c, "moe_intermediate_size", json_integer(d->I));
		json_set(c, "num_experts", json_integer(d->E));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "decoder_sparse_step", json_integer(d->sparse_step));
		json_set(c, "mlp_only_layers", json_array());
		json_set(c, "bos_token_id", json_integer(151643));
		json_set(c, "eos_token_id", json_integer(d->arch == MOE_ARCH_QWEN3_MOE ? 151645 : 151643));
		json_set(c, "max_position_embeddings", json_integer(d->arch == MOE_ARCH_QWEN3_MOE ? 40960 : 32768));
		json_set(c, "max_window_layers", json_integer(d->L));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-6));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_real(1e6));
		json_set(c, "router_aux_loss_coef", json_real(0.001));
		json_set(c, "use_sliding_window", json_false());
		if (d->arch == MOE_ARCH_QWEN2_MOE) {
			json_set(c, "shared_expert_intermediate_size", json_integer(d->shared_I));
			json_set(c, "sliding_window", json_integer(32768));
		} else {
			json_set(c, "head_dim", json_integer(d->head_dim));
			json_set(c, "attention_bias", json_false());
			json_set(c, "sliding_window", json_null());
		}
		break;
	case MOE_ARCH_OLMOE:
		json_set(c, "intermediate_size", json_integer(d->I));
		json_set(c, "num_experts", json_integer(d->E));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "attention_bias", json_false());
		json_set(c, "clip_qkv", json_null());
		json_set(c, "eos_token_id", json_integer(50279));
		json_set(c, "pad_token_id", json_integer(1));
		json_set(c, "max_position_embeddings", json_integer(4096));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_real(10000.0));
		json_set(c, "router_aux_loss_coef", json_real(0.01));
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3: {
		bool v3 = d->arch == MOE_ARCH_DEEPSEEK_V3;

		json_set(c, "intermediate_size", json_integer(d->dense_I));
		json_set(c, "moe_intermediate_size", json_integer(d->I));
		json_set(c, "n_routed_experts", json_integer(d->E));
		json_set(c, "n_shared_experts", d->n_shared ? json_integer(d->n_shared) : json_null());
		json_set(c, "n_group", json_integer(d->n_group));
		json_set(c, "topk_group", json_integer(d->topk_group));
		json_set(c, "topk_method", json_string(d->topk_method));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "routed_scaling_factor", json_real(d->scaling));
		json_set(c, "scoring_func", json_string(v3 ? "sigmoid" : "softmax"));
		json_set(c, "first_k_dense_replace", json_integer(d->first_dense));
		json_set(c, "moe_layer_freq", json_integer(1));
		json_set(c, "aux_loss_alpha", json_real(0.001));
		json_set(c, "seq_aux", json_true());
		json_set(c, "ep_size", json_integer(1));
		json_set(c, "kv_lora_rank", json_integer(d->kv_lora));
		json_set(c, "q_lora_rank", d->q_lora ? json_integer(d->q_lora) : json_null());
		json_set(c, "qk_nope_head_dim", json_integer(d->nope));
		json_set(c, "qk_rope_head_dim", json_integer(d->rope));
		json_set(c, "v_head_dim", json_integer(d->v_head));
		json_set(c, "attention_bias", json_false());
		json_set(c, "pretraining_tp", json_integer(1));
		json_set(c, "bos_token_id", json_integer(v3 ? 0 : 100000));
		json_set(c, "eos_token_id", json_integer(v3 ? 1 : 100001));
		json_set(c, "max_position_embeddings", json_integer(163840));
		json_set(c, "rms_norm_eps", json_real(1e-6));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_integer(10000));
		if (v3)
			json_set(c, "num_nextn_predict_layers", json_integer(d->mtp));
		break;
	}
	default:
		break;
	}
	return c;
}

/* Dump @j to DIR/NAME with a trailing newline, as save_pretrained does. */
static int write_json(const char *dir, const char *name, const json_t *j, struct moe_err *err)
{
	char *path = NULL, *s;
	FILE *f;
	int r = 0;

	/* Sorted keys, two-space indent: what save_pretrained writes. */
	s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
	if (!s || asprintf(&path, "%s/%s", dir, name) < 0) {
		free(s);
		return moe_err_set(err, -ENOMEM, "%s/%s: out of memory", dir, name);
	}
	f = fopen(path, "we");
	if (!f) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	} else {
		fputs(s, f);
		fputc('\n', f);
		if (ferror(f) | fclose(f))
			r = moe_err_set(err, -EIO, "%s: write failed", path);
	}
	free(s);
	free(path);
	return r;
}

static int mkdir_p(const char *dir, struct moe_err *err)
{
	char *p = strdup(dir);
	int r = 0;

	if (!p)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	for (char *c = p + 1; ; c++) {
		if (*c != '/' && *c != '\0')
			continue;
		char saved = *c;

		*c = '\0';
		if (mkdir(p, 0777) < 0 && errno != EEXIST) {
			r = moe_err_set(err, -errno, "%s: cannot create: %s", p, strerror(errno));
			break;
		}
		*c = saved;
		if (!saved)
			break;
	}
	free(p);
	if (r == 0) {
		struct stat st;

		if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
			r = moe_err_set(err, -ENOTDIR, "%s: not a directory", dir);
	}
	return r;
}

/* A checkpoint left in @dir by an earlier run must not mix with this one:
 * a stale index would win over a new model.safetensors. */
static int remove_old(const char *dir, struct moe_err *err)
{
	DIR *dh = opendir(dir);
	struct dirent *de;
	int r = 0;

	if (!dh)
		return moe_err_set(err, -errno, "%s: %s", dir, strerror(errno));
	while ((de = readdir(dh))) {
		unsigned a, b;
		int n = 0;

		if (strcmp(de->d_name, "model.safetensors") &&
		    strcmp(de->d_name, "model.safetensors.index.json") &&
		    !(sscanf(de->d_name, "model-%5u-of-%5u.safetensors%n", &a, &b, &n) == 2 &&
		      n > 0 && de->d_name[n] == '\0'))
			continue;
		if (unlinkat(dirfd(dh), de->d_name, 0) < 0) {
			r = moe_err_set(err, -errno, "%s/%s: cannot remove: %s", dir, de->d_name, strerror(errno));
			break;
		}
	}
	closedir(dh);
	return r;
}

static void shard_name(char *buf, size_t len, uint32_t shard, uint32_t n_shards)
{
	if (n_shards == 1)
		snprintf(buf, len, "model.safetensors");
	else
		snprintf(buf, len, "model-%05u-of-%05u.safetensors", shard + 1, n_shards);
}

/*
 * Generation and writing overlap: the caller fills one buffer while a thread
 * writes the other, so a checkpoint is written at the speed of the slower
 * of the two instead of their sum.  Buffers alternate strictly, so the
 * bytes land in the order they were generated.
 */
struct gen_pipe {
	pthread_mutex_t mu;
	pthread_cond_t cv;               /* any change of len[], r or closing */
	pthread_t thread;
	struct moe_st_writer *w;         /* used only by the thread until joined */
	void *buf[2];
	size_t len[2];                   /* bytes waiting in buf[i]; 0: free */
	bool closing;                    /* the caller has no more buffers */
	int r;                           /* first write error (set by the thread) */
	struct moe_err err;              /* its message */
};

static void *pipe_writer(void *arg)
{
	struct gen_pipe *pp = arg;
	unsigned s = 0;
	int r = 0;

	pthread_mutex_lock(&pp->mu);
	for (;;) {
		while (!pp->len[s] && !pp->closing)
			pthread_cond_wait(&pp->cv, &pp->mu);
		if (!pp->len[s])
			break;                   /* closing, and nothing left */
		pthread_mutex_unlock(&pp->mu);
		/* After an error, buffers are dropped so the caller never waits. */
		if (r == 0)
			r = moe_st_writer_write(pp->w, pp->buf[s], pp->len[s], &pp->err);
		pthread_mutex_lock(&pp->mu);
		pp->r = r;
		pp->len[s] = 0;
		pthread_cond_broadcast(&pp->cv);
		s ^= 1;
	}
	pthread_mutex_unlock(&pp->mu);
	return NULL;
}

static int pipe_start(struct gen_pipe *pp, struct moe_st_writer *w, void *const buf[2], struct moe_err *err)
{
	int r;

	memset(pp, 0, sizeof(*pp));
	pp->w = w;
	pp->buf[0] = buf[0];
	pp->buf[1] = buf[1];
	pthread_mutex_init(&pp->mu, NULL);
	pthread_cond_init(&pp->cv, NULL);
	r = pthread_create(&pp->thread, NULL, pipe_writer, pp);
	if (r) {
		pthread_cond_destroy(&pp->cv);
		pthread_mutex_destroy(&pp->mu);
		return moe_err_set(err, -r, "cannot start the writer thread: %s", strerror(r));
	}
	return 0;
}

/* Wait until buffer @s is free; NULL once the thread has failed. */
static void *pipe_get(struct gen_pipe *pp, unsigned s)
{
	bool ok;

	pthread_mutex_lock(&pp->mu);
	while (pp->len[s] && pp->r == 0)
		pthread_cond_wait(&pp->cv, &pp->mu);
	ok = pp->r == 0;
	pthread_mutex_unlock(&pp->mu);
	return ok ? pp->buf[s] : NULL;
}

static void pipe_put(struct gen_pipe *pp, unsigned s, size_t len)
{
	pthread_mutex_lock(&pp->mu);
	pp->len[s] = len;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
}

/* Let the thread drain and join it; its error, with its message in @err. */
static int pipe_stop(struct gen_pipe *pp, struct moe_err *err)
{
	pthread_mutex_lock(&pp->mu);
	pp->closing = true;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
	pthread_join(pp->thread, NULL);
	pthread_cond_destroy(&pp->cv);
	pthread_mutex_destroy(&pp->mu);
	if (pp->r < 0 && err)
		*err = pp->err;
	return pp->r;
}

static int write_shard(const struct gen_plan *p, uint64_t seed, const char *dir, uint32_t shard,
		       size_t *pos, void *const buf[2], uint64_t *done,
		       void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		       struct moe_err *err)
{
	struct moe_st_writer *w;
	struct gen_pipe pp;
	char name[64], *path;
	size_t first = *pos, last = first;
	unsigned slot = 0;
	int r;

	shard_name(name, sizeof(name), shard, p->n_shards);
	if (asprintf(&path, "%s/%s", dir, name) < 0)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = moe_st_writer_new(path, &w, err);
	free(path);
	if (r < 0)
		return r;
	while (last < p->n && p->t[last].shard == shard) {
		const struct gen_tensor *t = &p->t[last];

		r = moe_st_writer_declare(w, t->name, t->dtype, t->ndim, t->shape, err);
		if (r < 0)
			goto fail;
		last++;
	}
	r = moe_st_writer_begin(w, err);
	if (r < 0)
		goto fail;
	r = pipe_start(&pp, w, buf, err);
	if (r < 0)
		goto fail;
	for (size_t i = first; i < last && r == 0; i++) {
		const struct gen_tensor *t = &p->t[i];
		size_t esz = moe_dtype_size(t->dtype);
		/* A power of two per chunk: no chunk crosses 2^32 elements. */
		uint64_t per = GEN_CHUNK / esz, n_elem = t->nbytes / esz;
		uint64_t key = tensor_key(seed, t->name);

		for (uint64_t e = 0; e < n_elem; e += per) {
			size_t cnt = (size_t)(n_elem - e < per ? n_elem - e : per);
			void *b = pipe_get(&pp, slot);

			if (!b) {
				r = -EIO;        /* the real error comes from pipe_stop */
				break;
			}
			gen_values(t, key, e, cnt, b);
			pipe_put(&pp, slot, cnt * esz);
			slot ^= 1;
			*done += (uint64_t)cnt * esz;
			if (progress)
				progress(ctx, *done, p->total);
		}
	}
	r = pipe_stop(&pp, err);
	if (r < 0)
		goto fail;
	*pos = last;
	return moe_st_writer_finish(w, err);
fail:
	moe_st_writer_abort(w);
	return r;
}

static int write_index(const struct gen_plan *p, const char *dir, struct moe_err *err)
{
	json_t *root, *wm;
	char name[64];
	int r;

	wm = json_object();
	root = json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)p->total, "weight_map", wm);
	if (!root)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (size_t i = 0; i < p->n; i++) {
		shard_name(name, sizeof(name), p->t[i].shard, p->n_shards);
		if (json_object_set_new(wm, p->t[i].name, json_string(name)) < 0) {
			json_decref(root);
			return moe_err_set(err, -ENOMEM, "out of memory");
		}
	}
	r = write_json(dir, "model.safetensors.index.json", root, err);
	json_decref(root);
	return r;
}

int moe_gen_model(const struct moe_gen_options *opt, const char *dir,
		  void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		  struct moe_err *err)
{
	struct gen_dims d;
	struct gen_plan plan;
	json_t *cfg;
	void *buf[2];
	uint64_t done = 0;
	size_t pos = 0;
	int r;

	r = gen_resolve(opt, &d, err);
	if (r < 0)
		return r;
	r = mkdir_p(dir, err);
	if (r < 0)
		return r;
	r = remove_old(dir, err);
	if (r < 0)
		return r;
	cfg = config_json(&d);
	if (!cfg)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = write_json(dir, "config.json", cfg, err);
	json_decref(cfg);
	if (r < 0)
		return r;
	r = plan_build(&plan, &d, err);
	if (r < 0)
		return r;
	r = plan_skew(&plan, &d, opt->seed, err);
	if (r < 0) {
		plan_free(&plan);
		return r;
	}
	buf[0] = malloc(GEN_CHUNK);
	buf[1] = malloc(GEN_CHUNK);
	if (!buf[0] || !buf[1])
		r = moe_err_set(err, -ENOMEM, "out of memory");
	for (uint32_t s = 0; s < plan.n_shards && r >= 0; s++)
		r = write_shard(&plan, opt->seed, dir, s, &pos, buf, &done, progress, ctx, err);
	if (r >= 0 && plan.n_shards > 1)
		r = write_index(&plan, dir, err);
	free(buf[0]);
	free(buf[1]);
	plan_free(&plan);
	return r < 0 ? r : 0;
}
