/* SPDX-License-Identifier: MIT */
/*
 * A Hugging Face checkpoint's tensors (ARCHITECTURE.md 4.1): which tensors
 * an MoE layer has in each architecture, their shapes and dtypes, and the
 * slices of them the packer copies.  Tensor names are built in one place
 * (layer_prefix, expert names) so that the packer and the messages agree on
 * them.  config.json is formats/hfconfig.c.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "hfmodel.h"

#define MAX_NAME 256

const char *moe_hf_part_name(enum moe_hf_part part)
{
	switch (part) {
	case MOE_HF_GATE: return "gate";
	case MOE_HF_UP: return "up";
	case MOE_HF_DOWN: return "down";
	}
	return "?";
}

/* --- tensors ------------------------------------------------------------------ */

void moe_hf_model_close(struct moe_hf_model *m)
{
	if (!m)
		return;
	if (m->layers && m->hc)
		for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
			free(m->layers[i].experts);
			free(m->layers[i].scales);
			free(m->layers[i].q4);
		}
	free(m->layers);
	moe_st_checkpoint_close(m->ckpt);
	moe_hf_config_free(m->hc);
	free(m->dir);
	free(m);
}

static void shape_str(char *buf, size_t len, uint32_t ndim, const uint64_t *shape)
{
	size_t o = 0;

	o += (size_t)snprintf(buf + o, len - o, "[");
	for (uint32_t i = 0; i < ndim && o < len; i++)
		o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu64, i ? ", " : "", shape[i]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
}

static const char *tensor_file(const struct moe_hf_model *m, const struct moe_st_tensor *t)
{
	return t->file < m->ckpt->n_files ? m->ckpt->files[t->file].path : m->dir;
}

/* Where a missing tensor should have been, for the message. */
static int missing_tensor(const struct moe_hf_model *m, const char *name, struct moe_err *err)
{
	char *index;
	int sharded;

	if (asprintf(&index, "%s/model.safetensors.index.json", m->dir) < 0)
		return moe_err_set(err, -ENOENT, "tensor '%s' not found in %s", name, m->dir);
	sharded = access(index, F_OK) == 0;
	if (sharded)
		moe_err_set(err, -ENOENT, "tensor '%s' not found: %s names no shard for it", name, index);
	else if (m->ckpt->n_files == 1)
		moe_err_set(err, -ENOENT, "tensor '%s' not found in %s", name, m->ckpt->files[0].path);
	else
		moe_err_set(err, -ENOENT, "tensor '%s' not found in checkpoint %s", name, m->dir);
	free(index);
	return -ENOENT;
}

static bool is_fp8(const struct moe_st_tensor *t)
{
	return !strcmp(t->st_dtype, "F8_E4M3");
}

/* U8: only gpt_oss's MXFP4 *_blocks are let through as U8 (need_mxfp4) */
static bool is_u8(const struct moe_st_tensor *t)
{
	return !strcmp(t->st_dtype, "U8");
}

/* The dtype a checked tensor is served in: FP8 for F8_E4M3 (with scales),
 * MXFP4 for U8 blocks (with scales), INT4 for the int32 qweight /
 * weight_packed of an int4 matrix (moe_q4_find found it; no other I32
 * tensor gets past the checks). */
static enum moe_dtype served_dtype(const struct moe_st_tensor *t)
{
	if (is_u8(t))
		return MOE_DTYPE_MXFP4;
	if (!strcmp(t->st_dtype, "I32"))
		return MOE_DTYPE_INT4;
	return is_fp8(t) ? MOE_DTYPE_FP8_E4M3_B128 : (enum moe_dtype)t->dtype;
}

static bool same_shape(const struct moe_st_tensor *t, uint32_t ndim, const uint64_t *shape)
{
	bool same = t->ndim == ndim;

	for (uint32_t i = 0; same && i < ndim; i++)
		same = t->shape[i] == shape[i];
	return same;
}

static int shape_error(const struct moe_hf_model *m, const struct moe_st_tensor *t, uint32_t ndim,
		       const uint64_t *shape, const char *from, struct moe_err *err)
{
	char want[128], got[128];

	shape_str(want, sizeof(want), ndim, shape);
	shape_str(got, sizeof(got), t->ndim, t->shape);
	return moe_err_set(err, -EINVAL, "tensor '%s' in %s has shape %s, expected %s from %s",
			   t->name, tensor_file(m, t), got, want, from);
}

/*
 * The scales of the FP8 matrix @t ([rows, cols]): "X.weight_scale_inv" for
 * "X.weight", float32 (bf16 and f16 widen exactly) of shape
 * [ceil(rows/128), ceil(cols/128)] (ARCHITECTURE.md 4.1a).  Errors name
 * the tensor.
 */
static int need_scale(const struct moe_hf_model *m, const struct moe_st_tensor *t,
		      const struct moe_st_tensor **ret, struct moe_err *err)
{
	const char *dot = strrchr(t->name, '.');
	const struct moe_st_tensor *s;
	char name[MAX_NAME + 16];
	uint64_t shape[2];

	if (!dot || strcmp(dot, ".weight"))
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3: FP8 is served for "
				   "per-expert X.weight tensors with X.weight_scale_inv, not for fused experts",
				   t->name, tensor_file(m, t));
	snprintf(name, sizeof(name), "%s_scale_inv", t->name);
	s = moe_st_find(m->ckpt, name);
	if (!s)
		return moe_err_set(err, -ENOENT, "tensor '%s' in %s is F8_E4M3 but its scales '%s' are "
				   "missing from the checkpoint", t->name, tensor_file(m, t), name);
	if (s->dtype < 0 || moe_dtype_is_blocked((enum moe_dtype)s->dtype) ||
	    moe_dtype_size((enum moe_dtype)s->dtype) == 0)
		return moe_err_set(err, -ENOTSUP, "scales '%s' in %s have dtype %s; moed reads F32, BF16 "
				   "and F16 scales", name, tensor_file(m, s), s->st_dtype);
	shape[0] = (t->shape[0] + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	shape[1] = (t->shape[1] + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	if (!same_shape(s, 2, shape))
		return shape_error(m, s, 2, shape, "its weight's shape and 128 x 128 blocks", err);
	*ret = s;
	return 0;
}

/* Find @name, check dtype and that its shape is exactly @shape.  With
 * @ret_scale, an F8_E4M3 matrix is accepted when config.json says fp8, and
 * its scales are found and checked (*ret_scale NULL for other dtypes). */
static int need_q(const struct moe_hf_model *m, const char *name, uint32_t ndim,
		  const uint64_t *shape, const struct moe_st_tensor **ret,
		  const struct moe_st_tensor **ret_scale, struct moe_err *err)
{
	const struct moe_st_tensor *t = moe_st_find(m->ckpt, name), *scale = NULL;
	int r;

	if (!t)
		return missing_tensor(m, name, err);
	if (is_fp8(t) && !ret_scale)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3; moed reads routers, "
				   "biases and gates in F32, BF16 or F16", name, tensor_file(m, t));
	if (is_fp8(t) && !m->hc->fp8)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is F8_E4M3 but config.json has no "
				   "quantization_config with quant_method fp8 and weight_block_size "
				   "[128, 128]", name, tensor_file(m, t));
	if (!is_fp8(t) && (t->dtype < 0 || moe_dtype_size((enum moe_dtype)t->dtype) == 0))
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s has dtype %s; moed reads F32, BF16 "
				   "and F16, and F8_E4M3 with 128 x 128 block scales", name,
				   tensor_file(m, t), t->st_dtype);
	if (!same_shape(t, ndim, shape))
		return shape_error(m, t, ndim, shape, "config.json", err);
	if (is_fp8(t)) {
		r = need_scale(m, t, &scale, err);
		if (r < 0)
			return r;
	}
	*ret = t;
	if (ret_scale)
		*ret_scale = scale;
	return 0;
}

static int need(const struct moe_hf_model *m, const char *name, uint32_t ndim,
		const uint64_t *shape, const struct moe_st_tensor **ret, struct moe_err *err)
{
	return need_q(m, name, ndim, shape, ret, NULL, err);
}

static int need2(const struct moe_hf_model *m, const char *name, uint64_t a, uint64_t b,
		 const struct moe_st_tensor **ret, struct moe_err *err)
{
	uint64_t shape[2] = { a, b };

	return need(m, name, 2, shape, ret, err);
}

/* An expert matrix: may be FP8 with scales. */
static int need2_q(const struct moe_hf_model *m, const char *name, uint64_t a, uint64_t b,
		   const struct moe_st_tensor **ret, const struct moe_st_tensor **ret_scale,
		   struct moe_err *err)
{
	uint64_t shape[2] = { a, b };

	return need_q(m, name, 2, shape, ret, ret_scale, err);
}

/*
 * An expert matrix "X.weight" [a][b] of an int4 checkpoint: X's int4
 * tensors (hfq4.c) into *@q4 when X is quantized, else X.weight as
 * need2_q() takes it (a module the checkpoint left unquantized).  Every
 * int4 matrix must have scales of one float dtype (the store's
 * MOE_Q4_BF16_SCALES); the first other one is recorded.
 */
static int need2_q4(struct moe_hf_model *m, const char *name, uint64_t a, uint64_t b,
		    const struct moe_st_tensor **ret, const struct moe_st_tensor **ret_scale,
		    struct moe_hf_q4 *q4, struct moe_err *err)
{
	char module[MAX_NAME];
	size_t n = strlen(name);
	bool found = false;
	int r;

	memset(q4, 0, sizeof(*q4));
	if (m->hc->q4.format != MOE_Q4F_NONE && n > 7 && !strcmp(name + n - 7, ".weight")) {
		snprintf(module, sizeof(module), "%.*s", (int)(n - 7), name);
		r = moe_q4_find(m->ckpt, &m->hc->q4, module, a, b, q4, &found, err);
		if (r < 0)
			return r;
	}
	if (!found)
		return need2_q(m, name, a, b, ret, ret_scale, err);
	*ret = q4->qweight;
	if (ret_scale)
		*ret_scale = NULL;
	if (!m->q4_seen) {
		m->q4_seen = true;
		m->q4_bf16 = moe_q4_bf16_scales(q4);
	} else if (m->q4_bf16 != moe_q4_bf16_scales(q4) && !m->q4_scales_tensor[0]) {
		snprintf(m->q4_scales_tensor, sizeof(m->q4_scales_tensor), "%s", q4->scales->name);
	}
	return 0;
}

/* Name of part @part of routed expert @j under @prefix (per-expert layout). */
static void expert_name(const struct moe_hf_model *m, const char *prefix, uint32_t j,
			enum moe_hf_part part, char *buf, size_t len)
{
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };
	static const char *const mixtral[3] = { "w1", "w3", "w2" };

	snprintf(buf, len, "%sexperts.%" PRIu32 ".%s.weight", prefix, j,
		 m->cfg.arch == MOE_ARCH_MIXTRAL ? mixtral[part] : hf[part]);
}

static void shared_name(const struct moe_hf_model *m, const char *prefix, enum moe_hf_part part,
			char *buf, size_t len)
{
	static const char *const hf[3] = { "gate_proj", "up_proj", "down_proj" };

	snprintf(buf, len, "%s%s.%s.weight", prefix,
		 m->cfg.arch == MOE_ARCH_QWEN2_MOE ? "shared_expert" : "shared_experts", hf[part]);
}

/* Pick the prefix of layer @L: "model.layers.L.mlp." or, for mixtral,
 * "model.layers.L.block_sparse_moe." when that is where its router is. */
static void layer_prefix(const struct moe_hf_model *m, uint32_t L, char *buf, size_t len)
{
	char name[MAX_NAME];

	if (m->cfg.arch == MOE_ARCH_MIXTRAL) {
		snprintf(buf, len, "model.layers.%" PRIu32 ".block_sparse_moe.", L);
		snprintf(name, sizeof(name), "%sgate.weight", buf);
		if (moe_st_find(m->ckpt, name))
			return;
		snprintf(name, sizeof(name), "model.layers.%" PRIu32 ".mlp.gate.weight", L);
		if (!moe_st_find(m->ckpt, name))
			return;          /* the message will name block_sparse_moe */
	}
	snprintf(buf, len, "model.layers.%" PRIu32 ".mlp.", L);
}

/* Whether "X.weight" @name is in the checkpoint as int4 tensors. */
static bool q4_present(const struct moe_hf_model *m, const char *name)
{
	static const char *const q[] = { ".qweight", ".weight_packed" };
	size_t n = strlen(name);
	char alt[MAX_NAME + 16];

	if (m->hc->q4.format == MOE_Q4F_NONE || n < 7)
		return false;
	for (int i = 0; i < 2; i++) {
		snprintf(alt, sizeof(alt), "%.*s%s", (int)(n - 7), name, q[i]);
		if (moe_st_find(m->ckpt, alt))
			return true;
	}
	return false;
}

/* First pass: the layout of each layer and whether any expert has a gate. */
static void find_layout(struct moe_hf_model *m, uint64_t *ret_gates)
{
	char name[MAX_NAME];
	uint64_t gates = 0;

	for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
		struct moe_hf_layer *hl = &m->layers[i];
		const struct moe_st_tensor *t;

		hl->layer = m->hc->moe_layers[i];
		layer_prefix(m, hl->layer, hl->prefix, sizeof(hl->prefix));
		if (m->cfg.arch == MOE_ARCH_GPT_OSS) {
			/* always fused, input-major (x @ W), gate and up interleaved */
			hl->fused = true;
			gates += m->cfg.num_experts;
			continue;
		}
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj", hl->prefix);
		if (moe_st_find(m->ckpt, name)) {
			hl->fused = true;
			gates += m->cfg.num_experts;
			continue;
		}
		snprintf(name, sizeof(name), "%sexperts.up_proj", hl->prefix);
		t = moe_st_find(m->ckpt, name);
		if (t && t->ndim == 3) {
			hl->fused = true;       /* fused plain experts: up [E, I, H] */
			continue;
		}
		for (uint32_t j = 0; j < m->cfg.num_experts; j++) {
			expert_name(m, hl->prefix, j, MOE_HF_GATE, name, sizeof(name));
			if (moe_st_find(m->ckpt, name) || q4_present(m, name))
				gates++;
		}
	}
	*ret_gates = gates;
}

/* Track the routed experts' dtype: the first tensor sets it, others may
 * differ (recorded for pack to refuse or convert). */
static void note_dtype(struct moe_hf_model *m, const struct moe_st_tensor *t, bool *seen)
{
	if (!*seen) {
		m->expert_dtype = served_dtype(t);
		*seen = true;
	} else if (served_dtype(t) != m->expert_dtype && !m->mixed_tensor[0]) {
		snprintf(m->mixed_tensor, sizeof(m->mixed_tensor), "%s", t->name);
		m->mixed_dtype = served_dtype(t);
	}
}

/* The same for the shared expert, whose dtype is its own (DeepSeek-V3
 * quantizes it with the routed ones; another release may not). */
static void note_shared_dtype(struct moe_hf_model *m, const struct moe_st_tensor *t, bool *seen)
{
	if (!*seen) {
		m->shared_dtype = served_dtype(t);
		*seen = true;
	} else if (served_dtype(t) != m->shared_dtype && !m->shared_mixed_tensor[0]) {
		snprintf(m->shared_mixed_tensor, sizeof(m->shared_mixed_tensor), "%s", t->name);
		m->shared_mixed_dtype = served_dtype(t);
	}
}

/* A U8 tensor of exactly @shape (MXFP4 codes or scales). */
static int need_u8(const struct moe_hf_model *m, const char *name, uint32_t ndim, const uint64_t *shape,
		   const struct moe_st_tensor **ret, struct moe_err *err)
{
	const struct moe_st_tensor *t = moe_st_find(m->ckpt, name);

	if (!t)
		return missing_tensor(m, name, err);
	if (!is_u8(t))
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s has dtype %s; MXFP4 blocks and scales "
				   "are U8", name, tensor_file(m, t), t->st_dtype);
	if (!same_shape(t, ndim, shape))
		return shape_error(m, t, ndim, shape, "config.json and MXFP4's 32-value blocks", err);
	*ret = t;
	return 0;
}

/*
 * gpt_oss's MXFP4 release (transformers' Mxfp4GptOssExperts): per layer
 * experts.gate_up_proj_blocks [E, 2I, H/32, 16] and _scales [E, 2I, H/32],
 * experts.down_proj_blocks [E, H, I/32, 16] and _scales [E, H, I/32], all
 * U8; output-major rows (so down needs no transpose), the gate in the even
 * rows of gate_up and up in the odd (transformers' convert_moe_packed_tensors
 * decodes them to [E, 2I, H] and transposes to the bf16 layout's [E, H, 2I],
 * gate in the even columns).  A row's K/32 blocks of 16 bytes are its K/2
 * code bytes in order: the store's layout as it is.
 */
static int check_gpt_oss_mxfp4(struct moe_hf_model *m, struct moe_hf_layer *hl, struct moe_err *err)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	const struct moe_st_tensor *t;
	char name[MAX_NAME];
	int r;

	for (int d = 0; d < 2; d++) {
		uint64_t N = d ? H : 2 * I, K = d ? I : H;
		uint64_t bs[4] = { E, N, K / MOE_MXFP4_BLOCK, MOE_MXFP4_BLOCK / 2 };
		const struct moe_st_tensor **tb = d ? &hl->down : &hl->gate_up;
		const struct moe_st_tensor **ts = d ? &hl->down_scales : &hl->gate_up_scales;

		snprintf(name, sizeof(name), "%sexperts.%s_blocks", hl->prefix, d ? "down_proj" : "gate_up_proj");
		if (K % MOE_MXFP4_BLOCK) {
			t = moe_st_find(m->ckpt, name);
			return moe_err_set(err, -EINVAL, "tensor '%s' in %s: MXFP4 needs its input size (%s %" PRIu64
					   ") to be a multiple of %u, one E8M0 scale per %u values",
					   name, t ? tensor_file(m, t) : m->dir,
					   d ? "intermediate_size" : "hidden_size", K, MOE_MXFP4_BLOCK, MOE_MXFP4_BLOCK);
		}
		r = need_u8(m, name, 4, bs, tb, err);
		if (r < 0)
			return r;
		snprintf(name, sizeof(name), "%sexperts.%s_scales", hl->prefix, d ? "down_proj" : "gate_up_proj");
		if (!moe_st_find(m->ckpt, name))
			return moe_err_set(err, -ENOENT, "tensor '%s' in %s is MXFP4 codes but its scales '%s' are "
					   "missing from the checkpoint", (*tb)->name, tensor_file(m, *tb), name);
		r = need_u8(m, name, 3, bs, ts, err);
		if (r < 0)
			return r;
	}
	return 0;
}

/*
 * gpt_oss in transformers' bf16 layout: mlp.router.weight [E, H] and
 * .bias [E]; mlp.experts.gate_up_proj [E, H, 2I] (applied as x @ W, gate
 * in the even columns, up in the odd), .gate_up_proj_bias [E, 2I],
 * .down_proj [E, I, H], .down_proj_bias [E, H].  Or, for the release in
 * MXFP4, the *_blocks and *_scales of check_gpt_oss_mxfp4 in place of
 * gate_up_proj and down_proj (biases and router as in bf16).
 */
static int check_gpt_oss_layer(struct moe_hf_model *m, struct moe_hf_layer *hl, bool *seen,
			       struct moe_err *err)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint64_t gu[3] = { E, H, 2 * I }, dn[3] = { E, I, H }, rb[1] = { E };
	const struct moe_st_tensor *t;
	char name[MAX_NAME];
	int r;

	char blocks[MAX_NAME], plain[MAX_NAME];
	bool mx;

	/* MXFP4 when the blocks are there, or config.json says mxfp4 and the
	 * bf16 tensor is not (then the blocks are what is missing) */
	snprintf(blocks, sizeof(blocks), "%sexperts.gate_up_proj_blocks", hl->prefix);
	snprintf(plain, sizeof(plain), "%sexperts.gate_up_proj", hl->prefix);
	t = moe_st_find(m->ckpt, blocks);
	mx = t || (m->hc->mxfp4 && !moe_st_find(m->ckpt, plain));
	if (t && !m->hc->mxfp4)
		return moe_err_set(err, -ENOTSUP, "tensor '%s' in %s is MXFP4 blocks but config.json has no "
				   "quantization_config with quant_method mxfp4", blocks, tensor_file(m, t));
	snprintf(name, sizeof(name), "%srouter.weight", hl->prefix);
	r = need2(m, name, E, H, &hl->router, err);
	if (r == 0) {
		snprintf(name, sizeof(name), "%srouter.bias", hl->prefix);
		r = need(m, name, 1, rb, &hl->bias, err);
	}
	if (r == 0 && mx) {
		r = check_gpt_oss_mxfp4(m, hl, err);
	} else if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj", hl->prefix);
		r = need(m, name, 3, gu, &hl->gate_up, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.gate_up_proj_bias", hl->prefix);
		r = need2(m, name, E, 2 * I, &hl->gate_up_bias, err);
	}
	if (r == 0 && !mx) {
		snprintf(name, sizeof(name), "%sexperts.down_proj", hl->prefix);
		r = need(m, name, 3, dn, &hl->down, err);
	}
	if (r == 0) {
		snprintf(name, sizeof(name), "%sexperts.down_proj_bias", hl->prefix);
		r = need2(m, name, E, H, &hl->down_bias, err);
	}
	if (r < 0)
		return r;
	note_dtype(m, hl->gate_up, seen);
	note_dtype(m, hl->down, seen);
	return 0;
}

static int check_layer(struct moe_hf_model *m, struct moe_hf_layer *hl, bool *seen,
		       bool *seen_shared, struct moe_err *err)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint64_t Is = c->shared_intermediate_size;
	char name[MAX_NAME];
	int r;

	if (c->arch == MOE_ARCH_GPT_OSS)
		return check_gpt_oss_layer(m, hl, seen, err);
	snprintf(name, sizeof(name), "%sgate.weight", hl->prefix);
	r = need2(m, name, E, H, &hl->router, err);
	if (r < 0)
		return r;
	if (c->has_bias) {
		uint64_t shape[1] = { E };

		snprintf(name, sizeof(name), "%sgate.e_score_correction_bias", hl->prefix);
		r = need(m, name, 1, shape, &hl->bias, err);
		if (r < 0)
			return r;
	}
	if (c->shared_gate) {
		snprintf(name, sizeof(name), "%sshared_expert_gate.weight", hl->prefix);
		r = need2(m, name, 1, H, &hl->shared_gate, err);
		if (r < 0)
			return r;
	}
	if (Is) {
		for (int p = c->gated ? MOE_HF_GATE : MOE_HF_UP; p <= MOE_HF_DOWN; p++) {
			shared_name(m, hl->prefix, (enum moe_hf_part)p, name, sizeof(name));
			r = p == MOE_HF_DOWN ? need2_q4(m, name, H, Is, &hl->shared[p], &hl->shared_scale[p],
							&hl->shared_q4[p], err)
					     : need2_q4(m, name, Is, H, &hl->shared[p], &hl->shared_scale[p],
							&hl->shared_q4[p], err);
			if (r < 0)
				return r;
			note_shared_dtype(m, hl->shared[p], seen_shared);
		}
	}
	if (hl->fused) {
		const struct moe_st_tensor *fused_scale;
		uint64_t gu[3] = { E, c->gated ? 2 * I : I, H }, dn[3] = { E, H, I };

		snprintf(name, sizeof(name), "%sexperts.%s", hl->prefix, c->gated ? "gate_up_proj" : "up_proj");
		r = need_q(m, name, 3, gu, &hl->gate_up, &fused_scale, err);  /* FP8: refused */
		if (r < 0)
			return r;
		note_dtype(m, hl->gate_up, seen);
		snprintf(name, sizeof(name), "%sexperts.down_proj", hl->prefix);
		r = need_q(m, name, 3, dn, &hl->down, &fused_scale, err);
		if (r < 0)
			return r;
		note_dtype(m, hl->down, seen);
		return 0;
	}
	hl->experts = calloc(E * 3, sizeof(*hl->experts));
	hl->scales = calloc(E * 3, sizeof(*hl->scales));
	hl->q4 = calloc(E * 3, sizeof(*hl->q4));
	if (!hl->experts || !hl->scales || !hl->q4)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (uint32_t j = 0; j < E; j++)
		for (int p = c->gated ? MOE_HF_GATE : MOE_HF_UP; p <= MOE_HF_DOWN; p++) {
			const struct moe_st_tensor **t = &hl->experts[(uint64_t)j * 3 + (uint64_t)p];
			const struct moe_st_tensor **s = &hl->scales[(uint64_t)j * 3 + (uint64_t)p];

			expert_name(m, hl->prefix, j, (enum moe_hf_part)p, name, sizeof(name));
			struct moe_hf_q4 *q = &hl->q4[(uint64_t)j * 3 + (uint64_t)p];

			r = p == MOE_HF_DOWN ? need2_q4(m, name, H, I, t, s, q, err)
					     : need2_q4(m, name, I, H, t, s, q, err);
			if (r < 0)
				return r;
			note_dtype(m, *t, seen);
		}
	return 0;
}

int moe_hf_model_open(const char *dir, struct moe_hf_model **ret, struct moe_err *err)
{
	struct moe_hf_model *m;
	uint64_t gates = 0;
	bool seen = false, seen_shared = false;
	int r;

	m = calloc(1, sizeof(*m));
	if (!m || !(m->dir = strdup(dir))) {
		free(m);
		return moe_err_set(err, -ENOMEM, "out of memory");
	}
	r = moe_hf_config_load(dir, &m->hc, err);
	if (r < 0)
		goto fail;
	m->cfg = m->hc->cfg;
	r = moe_st_checkpoint_open(dir, &m->ckpt, err);
	if (r < 0)
		goto fail;
	m->layers = calloc(m->hc->n_moe_layers, sizeof(*m->layers));
	if (!m->layers) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	find_layout(m, &gates);
	/* Gated unless no expert anywhere has a gate; if any has one, every one
	 * must, and check_layer names the first without. */
	m->cfg.gated = gates > 0;
	for (uint32_t i = 0; i < m->hc->n_moe_layers; i++) {
		r = check_layer(m, &m->layers[i], &seen, &seen_shared, err);
		if (r < 0)
			goto fail;
	}
	m->cfg.weight_dtype = m->expert_dtype;
	m->cfg.shared_dtype = seen_shared ? m->shared_dtype : m->expert_dtype;
	if (m->q4_seen) {
		if (m->q4_scales_tensor[0]) {
			r = moe_err_set(err, -ENOTSUP, "%s: int4 scales come in both F16 and BF16 (tensor "
					"'%s' differs from the first); moed keeps one scale dtype per store",
					dir, m->q4_scales_tensor);
			goto fail;
		}
		m->cfg.q4_group = m->hc->q4.group;
		m->cfg.q4_flags = moe_q4_flags(&m->hc->q4) | (m->q4_bf16 ? MOE_Q4_BF16_SCALES : 0);
	}
	*ret = m;
	return 0;
fail:
	moe_hf_model_close(m);
	return r;
}

int moe_hf_expert_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert,
			enum moe_hf_part part, struct moe_hf_slice *ret)
{
	const struct moe_model_config *c = &m->cfg;
	const struct moe_hf_layer *hl;
	struct moe_hf_slice s;
	uint64_t mat, es, inter;

	if (li >= m->hc->n_moe_layers || (part == MOE_HF_GATE && !c->gated) || part > MOE_HF_DOWN)
		return -ENOENT;
	hl = &m->layers[li];
	memset(&s, 0, sizeof(s));
	if (expert == UINT32_MAX) {
		if (!c->shared_intermediate_size)
			return -ENOENT;
		s.t = hl->shared[part];
		s.scale = hl->shared_scale[part];
		s.q4 = hl->shared_q4[part].qweight ? &hl->shared_q4[part] : NULL;
		s.nbytes = s.t->nbytes;
		s.n_elems = (uint64_t)c->hidden_size * c->shared_intermediate_size;
	} else if (expert >= c->num_experts) {
		return -ENOENT;
	} else if (c->arch == MOE_ARCH_GPT_OSS && hl->gate_up_scales) {
		/* MXFP4: the expert's output-major rows, codes and scales; gate
		 * and up together, [2I][H] interleaved by rows */
		uint64_t N = part == MOE_HF_DOWN ? c->hidden_size : 2 * (uint64_t)c->moe_intermediate_size;
		uint64_t K = part == MOE_HF_DOWN ? c->moe_intermediate_size : c->hidden_size;

		s.t = part == MOE_HF_DOWN ? hl->down : hl->gate_up;
		s.scale = part == MOE_HF_DOWN ? hl->down_scales : hl->gate_up_scales;
		s.n_elems = N * K;
		s.nbytes = N * (K / 2);
		s.offset = expert * s.nbytes;
		s.scale_offset = expert * N * (K / MOE_MXFP4_BLOCK);
		s.layout = part == MOE_HF_DOWN ? MOE_HF_ROWS : MOE_HF_ROWS_INTERLEAVED;
	} else if (c->arch == MOE_ARCH_GPT_OSS) {
		/* the expert's whole input-major matrix: [H][2I] for gate and up
		 * (interleaved), [I][H] for down */
		s.t = part == MOE_HF_DOWN ? hl->down : hl->gate_up;
		es = moe_dtype_size((enum moe_dtype)s.t->dtype);
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size * (part == MOE_HF_DOWN ? 1 : 2);
		s.nbytes = s.n_elems * es;
		s.offset = expert * s.nbytes;
		s.layout = part == MOE_HF_DOWN ? MOE_HF_TRANSPOSED : MOE_HF_INTERLEAVED_T;
	} else if (hl->fused) {
		s.t = part == MOE_HF_DOWN ? hl->down : hl->gate_up;
		es = moe_dtype_size((enum moe_dtype)s.t->dtype);
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size;
		mat = s.n_elems * es;
		if (part == MOE_HF_DOWN || !c->gated)
			s.offset = expert * mat;
		else
			s.offset = (2 * (uint64_t)expert + (part == MOE_HF_UP)) * mat;
		s.nbytes = mat;
	} else {
		s.t = hl->experts[(uint64_t)expert * 3 + part];
		s.scale = hl->scales[(uint64_t)expert * 3 + part];
		s.q4 = hl->q4[(uint64_t)expert * 3 + part].qweight ? &hl->q4[(uint64_t)expert * 3 + part] : NULL;
		s.nbytes = s.t->nbytes;
		s.n_elems = (uint64_t)c->hidden_size * c->moe_intermediate_size;
	}
	s.dtype = served_dtype(s.t);
	inter = expert == UINT32_MAX ? c->shared_intermediate_size : c->moe_intermediate_size;
	s.rows = part == MOE_HF_DOWN ? c->hidden_size : inter;
	s.cols = part == MOE_HF_DOWN ? inter : c->hidden_size;
	*ret = s;
	return 0;
}

int moe_hf_expert_bias_slice(const struct moe_hf_model *m, uint32_t li, uint32_t expert, bool down,
			     struct moe_hf_slice *ret)
{
	const struct moe_model_config *c = &m->cfg;
	const struct moe_hf_layer *hl;
	struct moe_hf_slice s;

	if (li >= m->hc->n_moe_layers || expert >= c->num_experts || !c->has_expert_bias)
		return -ENOENT;
	hl = &m->layers[li];
	memset(&s, 0, sizeof(s));
	s.t = down ? hl->down_bias : hl->gate_up_bias;
	s.n_elems = down ? c->hidden_size : 2 * (uint64_t)c->moe_intermediate_size;
	s.nbytes = s.n_elems * moe_dtype_size((enum moe_dtype)s.t->dtype);
	s.offset = expert * s.nbytes;
	s.dtype = (enum moe_dtype)s.t->dtype;
	s.layout = down ? MOE_HF_ROWS : MOE_HF_INTERLEAVED_T;
	*ret = s;
	return 0;
}
