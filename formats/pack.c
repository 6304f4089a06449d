/* SPDX-License-Identifier: MIT */
/*
 * Hugging Face checkpoint -> .moe store.
 *
 * hfmodel.c has already found and checked every tensor; here each MoE
 * layer's router becomes float32, and each expert's gate, up and down
 * matrices are streamed (in bounded chunks, converted when the dtype
 * changes) into one contiguous blob that the store writer places and
 * checksums.  FP8 matrices are copied as they are, codes then scales
 * (moe_matrix_bytes()), never widened: serving their own bytes is the point;
 * only --dtype dequantizes them (for a backend without FP8 kernels).
 * gpt_oss's MXFP4 experts likewise: their rows of codes and scales are
 * moved (gate and up de-interleaved), never decoded unless --dtype asks.
 * --quantize fp8 goes the other way, from float weights, with the
 * quantizer gen-model --quant fp8 uses (moe_fp8_quantize_band()).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hfmodel.h"
#include "pack.h"
#include "engine/store.h"

/* Elements converted per step: bounds the staging buffers (16 MiB of
 * float32) whatever the tensor size. */
#define CHUNK_ELEMS ((uint64_t)4 << 20)

struct packer {
	const struct moe_pack_options *opt;
	struct moe_hf_model *m;
	uint8_t *stage;                  /* source bytes awaiting conversion */
	float *fbuf;                     /* float32 between source and target */
	uint8_t *block;                  /* gpt_oss: one expert's input-major block */
	uint64_t block_bytes;
	uint64_t done, total;            /* source bytes, for progress */
	char what[64];
};

/* Copy @s (n_elems of its dtype) to @dst as @to, converting in chunks. */
static int copy_slice(struct packer *pk, const struct moe_hf_slice *s, void *dst,
		      enum moe_dtype to, struct moe_err *err)
{
	size_t es_src = moe_dtype_size(s->dtype), es_dst = moe_dtype_size(to);
	uint8_t *out = dst;
	int r;

	for (uint64_t i = 0; i < s->n_elems;) {
		uint64_t k = s->n_elems - i < CHUNK_ELEMS ? s->n_elems - i : CHUNK_ELEMS;
		uint64_t off = s->offset + i * es_src;
		uint8_t *d = out + i * es_dst;

		if (s->dtype == to) {
			r = moe_st_read(pk->m->ckpt, s->t, off, d, k * es_src, err);
		} else {
			r = moe_st_read(pk->m->ckpt, s->t, off, pk->stage, k * es_src, err);
			if (r == 0 && to == MOE_DTYPE_F32) {
				moe_dtype_to_f32(s->dtype, pk->stage, (float *)(void *)d, (size_t)k);
			} else if (r == 0) {
				moe_dtype_to_f32(s->dtype, pk->stage, pk->fbuf, (size_t)k);
				moe_dtype_from_f32(to, pk->fbuf, d, (size_t)k);
			}
		}
		if (r < 0)
			return r;
		i += k;
		pk->done += k * es_src;
		if (pk->opt && pk->opt->progress)
			pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
	}
	return 0;
}

static int copy_tensor_f32(struct packer *pk, const struct moe_st_tensor *t, float *dst,
			   uint64_t n_elems, struct moe_err *err)
{
	struct moe_hf_slice s = {
		.t = t, .offset = 0, .nbytes = t->nbytes, .n_elems = n_elems,
		.dtype = (enum moe_dtype)t->dtype,
	};

	return copy_slice(pk, &s, dst, MOE_DTYPE_F32, err);
}

/* An FP8 matrix into @dst as moe_matrix_bytes() lays it out: the codes as
 * they are, then the scales as float32 (a bf16 or f16 scale widens
 * exactly).  The padding of @dst is left as it is (zeros). */
static int copy_fp8(struct packer *pk, const struct moe_hf_slice *s, uint8_t *dst,
		    struct moe_err *err)
{
	struct moe_hf_slice sc = {
		.t = s->scale, .offset = 0, .nbytes = s->scale->nbytes,
		.n_elems = s->scale->shape[0] * s->scale->shape[1],
		.dtype = (enum moe_dtype)s->scale->dtype,
	};
	struct moe_hf_slice codes = *s;
	int r;

	codes.dtype = MOE_DTYPE_FP8_E4M3_B128;    /* one byte each: copy_slice copies */
	r = copy_slice(pk, &codes, dst, MOE_DTYPE_FP8_E4M3_B128, err);
	if (r == 0)
		r = copy_slice(pk, &sc, dst + moe_matrix_scales_offset(s->rows, s->cols), MOE_DTYPE_F32,
			       err);
	return r;
}

/*
 * An FP8 matrix dequantized into @dst as @to (--dtype): w = e4m3(code) *
 * scale in float32, then rounded to @to, as DeepSeek's fp8_cast_bf16.py
 * (weight_dequant) does.  A block row (128 rows) of codes at a time.
 */
static int dequant_fp8(struct packer *pk, const struct moe_hf_slice *s, uint8_t *dst,
		       enum moe_dtype to, struct moe_err *err)
{
	uint64_t R = s->rows, C = s->cols, kb = (C + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	uint64_t nsc = s->scale->shape[0] * s->scale->shape[1];
	size_t es = moe_dtype_size(to);
	struct moe_hf_slice sc = {
		.t = s->scale, .offset = 0, .nbytes = s->scale->nbytes, .n_elems = nsc,
		.dtype = (enum moe_dtype)s->scale->dtype,
	};
	float *scales = malloc(nsc * sizeof(float)), *row = malloc(C * sizeof(float));
	uint8_t *codes = malloc(MOE_FP8_BLOCK * C);
	int r;

	if (!scales || !row || !codes) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	r = copy_slice(pk, &sc, scales, MOE_DTYPE_F32, err);
	for (uint64_t r0 = 0; r == 0 && r0 < R; r0 += MOE_FP8_BLOCK) {
		uint64_t n = R - r0 < MOE_FP8_BLOCK ? R - r0 : MOE_FP8_BLOCK;

		r = moe_st_read(pk->m->ckpt, s->t, s->offset + r0 * C, codes, n * C, err);
		for (uint64_t i = 0; r == 0 && i < n; i++) {
			const float *srow = scales + (r0 / MOE_FP8_BLOCK) * kb;

			for (uint64_t j = 0; j < C; j++)
				row[j] = moe_e4m3_to_f32(codes[i * C + j]) * srow[j / MOE_FP8_BLOCK];
			moe_dtype_from_f32(to, row, dst + (r0 + i) * C * es, (size_t)C);
		}
		pk->done += n * C;
		if (r == 0 && pk->opt && pk->opt->progress)
			pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
	}
out:
	free(scales);
	free(row);
	free(codes);
	return r;
}

/*
 * A float matrix quantized into @dst as moe_matrix_bytes() lays out FP8:
 * a block row (128 rows) at a time, widened to float32 exactly and handed
 * to moe_fp8_quantize_band(), so the codes and scales are those of
 * gen-model --quant fp8 for the same float32 values.
 */
static int quant_fp8(struct packer *pk, const struct moe_hf_slice *s, uint8_t *dst,
		     struct moe_err *err)
{
	uint64_t R = s->rows, C = s->cols, kb = (C + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
	size_t es = moe_dtype_size(s->dtype);
	uint8_t *src = malloc(MOE_FP8_BLOCK * C * es);
	float *w = malloc(MOE_FP8_BLOCK * C * sizeof(float)), *sc = malloc(kb * sizeof(float));
	uint8_t *scales = dst + moe_matrix_scales_offset(R, C);
	int r = 0;

	if (!src || !w || !sc) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (uint64_t r0 = 0; r0 < R; r0 += MOE_FP8_BLOCK) {
		uint64_t n = R - r0 < MOE_FP8_BLOCK ? R - r0 : MOE_FP8_BLOCK;

		r = moe_st_read(pk->m->ckpt, s->t, s->offset + r0 * C * es, src, n * C * es, err);
		if (r < 0)
			break;
		moe_dtype_to_f32(s->dtype, src, w, (size_t)(n * C));
		moe_fp8_quantize_band(w, n, C, dst + r0 * C, sc);
		memcpy(scales + (r0 / MOE_FP8_BLOCK) * kb * sizeof(float), sc, kb * sizeof(float));
		pk->done += n * C * es;
		if (pk->opt && pk->opt->progress)
			pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
	}
out:
	free(src);
	free(w);
	free(sc);
	return r;
}

/*
 * MXFP4 (gpt_oss): the expert's codes and scales of @s read into pk->block
 * (codes, then scales at *ret_scales), N rows of K values.
 */
static int read_mxfp4(struct packer *pk, const struct moe_hf_slice *s, uint64_t N, uint64_t K,
		      uint8_t **ret_scales, struct moe_err *err)
{
	uint64_t need = s->nbytes + N * (K / MOE_MXFP4_BLOCK);
	int r;

	if (need > pk->block_bytes) {
		uint8_t *b = realloc(pk->block, need);

		if (!b)
			return moe_err_set(err, -ENOMEM, "out of memory");
		pk->block = b;
		pk->block_bytes = need;
	}
	r = moe_st_read(pk->m->ckpt, s->t, s->offset, pk->block, s->nbytes, err);
	if (r == 0)
		r = moe_st_read(pk->m->ckpt, s->scale, s->scale_offset, pk->block + s->nbytes,
				N * (K / MOE_MXFP4_BLOCK), err);
	*ret_scales = pk->block + s->nbytes;
	pk->done += need;
	if (r == 0 && pk->opt && pk->opt->progress)
		pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
	return r;
}

/* Row @src_row of the MXFP4 rows (@codes, @scales; K values each) to row
 * @dst_row of the N x K matrix @dst of dtype @to: the bytes as they are
 * for MXFP4, else w = e2m1 * 2^(s - 127) (exact in float32) rounded to @to,
 * as transformers' convert_moe_packed_tensors dequantizes. */
static void put_mxfp4_row(struct packer *pk, const uint8_t *codes, const uint8_t *scales, uint64_t src_row,
			  uint8_t *dst, enum moe_dtype to, uint64_t N, uint64_t K, uint64_t dst_row)
{
	const uint8_t *c = codes + src_row * (K / 2), *sc = scales + src_row * (K / MOE_MXFP4_BLOCK);

	if (to == MOE_DTYPE_MXFP4) {
		memcpy(dst + dst_row * (K / 2), c, K / 2);
		memcpy(dst + moe_mxfp4_scales_offset(N, K) + dst_row * (K / MOE_MXFP4_BLOCK), sc,
		       K / MOE_MXFP4_BLOCK);
		return;
	}
	for (uint64_t k = 0; k < K; k++)
		pk->fbuf[k] = moe_e2m1_to_f32((uint8_t)(c[k / 2] >> (4 * (k & 1)))) *
			      moe_e8m0_to_f32(sc[k / MOE_MXFP4_BLOCK]);
	moe_dtype_from_f32(to, pk->fbuf, dst + dst_row * K * moe_dtype_size(to), (size_t)K);
}

/* gpt_oss MXFP4 gate and up (MOE_HF_ROWS_INTERLEAVED: rows 2i and 2i + 1
 * of the [2I][H] block), or down (MOE_HF_ROWS), into @dst as @to: moving
 * rows of bytes is lossless, so the store keeps the release's codes. */
static int copy_mxfp4(struct packer *pk, const struct moe_hf_slice *s, uint8_t *dst, enum moe_dtype to,
		      struct moe_err *err)
{
	uint64_t N = s->rows, K = s->cols, mb = moe_matrix_bytes(to, N, K);
	bool pair = s->layout == MOE_HF_ROWS_INTERLEAVED;
	uint8_t *scales = NULL;
	int r;

	r = read_mxfp4(pk, s, pair ? 2 * N : N, K, &scales, err);
	if (r < 0)
		return r;
	for (uint64_t n = 0; n < N; n++) {
		if (!pair) {
			put_mxfp4_row(pk, pk->block, scales, n, dst, to, N, K, n);
			continue;
		}
		put_mxfp4_row(pk, pk->block, scales, 2 * n, dst, to, N, K, n);          /* gate */
		put_mxfp4_row(pk, pk->block, scales, 2 * n + 1, dst + mb, to, N, K, n); /* up */
	}
	return 0;
}

/*
 * An int4 matrix dequantized into @dst as @to (--dtype): read into the
 * canonical layout, w = (q - z) * s in float32 (exact), rounded to @to.
 */
static int dequant_q4(struct packer *pk, const struct moe_hf_slice *s, uint8_t *dst,
		      enum moe_dtype to, struct moe_err *err)
{
	const struct moe_model_config *c = &pk->m->cfg;
	uint64_t mb = moe_cfg_matrix_bytes(c, MOE_DTYPE_INT4, s->rows, s->cols);
	uint8_t *m = calloc(1, mb);
	float *w = malloc(s->rows * s->cols * sizeof(float));
	int r;

	if (!m || !w) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	r = moe_q4_read(pk->m->ckpt, &pk->m->hc->q4, s->q4, c->q4_flags, s->rows, s->cols, m, err);
	if (r < 0)
		goto out;
	moe_q4_dequant(m, c->q4_group, c->q4_flags, s->rows, s->cols, w);
	moe_dtype_from_f32(to, w, dst, (size_t)(s->rows * s->cols));
	pk->done += s->nbytes;
	if (pk->opt && pk->opt->progress)
		pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
out:
	free(m);
	free(w);
	return r;
}

/* Element (r, c) of a row-major matrix with @ld columns of @es-byte elements
 * to element @i of @dst: the permutations below move bytes, not values,
 * so they hold for any dtype. */
static inline void move_elem(uint8_t *dst, uint64_t i, const uint8_t *src, uint64_t r, uint64_t c,
			     uint64_t ld, size_t es)
{
	memcpy(dst + i * es, src + (r * ld + c) * es, es);
}

/*
 * The row-major [N][K] part from @blk, a block in @layout (elements of @es
 * bytes): MOE_HF_INTERLEAVED_T, @blk is [K][2N] and the part takes column
 * 2n + @odd; MOE_HF_TRANSPOSED, @blk is [K][N].
 */
static void unpermute(const uint8_t *blk, enum moe_hf_layout layout, bool odd, uint64_t N,
		      uint64_t K, size_t es, uint8_t *dst)
{
	for (uint64_t n = 0; n < N; n++)
		for (uint64_t k = 0; k < K; k++) {
			if (layout == MOE_HF_INTERLEAVED_T)
				move_elem(dst, n * K + k, blk, k, 2 * n + odd, 2 * N, es);
			else
				move_elem(dst, n * K + k, blk, k, n, N, es);
		}
}

/* The slice @s, which is in another layout than the blob's, converted to
 * @to in pk->block. */
static int read_block(struct packer *pk, const struct moe_hf_slice *s, enum moe_dtype to,
		      struct moe_err *err)
{
	uint64_t need = s->n_elems * moe_dtype_size(to);

	if (need > pk->block_bytes) {
		uint8_t *b = realloc(pk->block, need);

		if (!b)
			return moe_err_set(err, -ENOMEM, "out of memory");
		pk->block = b;
		pk->block_bytes = need;
	}
	return copy_slice(pk, s, pk->block, to, err);
}

/* gpt_oss: expert @expert's biases, float32, at their place in @blob
 * (gate [I], up [I], down [H]; the padding before them zeroed). */
static int copy_expert_bias(struct packer *pk, uint32_t li, uint32_t expert, uint8_t *blob,
			    enum moe_dtype to, uint64_t matrix_end, struct moe_err *err)
{
	struct moe_model_config c = pk->m->cfg;
	struct moe_hf_slice s;
	uint64_t I, off;
	float *b, *gu;
	int r;

	c.weight_dtype = to;            /* the store's, which places the biases */
	I = c.moe_intermediate_size;
	off = moe_expert_bias_offset(&c);
	b = (float *)(void *)(blob + off);

	memset(blob + matrix_end, 0, off - matrix_end);
	r = moe_hf_expert_bias_slice(pk->m, li, expert, false, &s);
	if (r == 0)
		r = read_block(pk, &s, MOE_DTYPE_F32, err);
	if (r < 0)
		return r;
	gu = (float *)(void *)pk->block;
	for (uint64_t i = 0; i < I; i++) {
		b[i] = gu[2 * i];               /* gate: even */
		b[I + i] = gu[2 * i + 1];       /* up: odd */
	}
	r = moe_hf_expert_bias_slice(pk->m, li, expert, true, &s);
	if (r == 0)
		r = copy_slice(pk, &s, b + 2 * I, MOE_DTYPE_F32, err);
	return r;
}

/* One expert (@expert, or UINT32_MAX for the shared one) into @blob:
 * gate, up, down back to back in the store's dtype @to, then its biases if
 * it has them. */
static int copy_expert(struct packer *pk, uint32_t li, uint32_t expert, uint8_t *blob,
		       enum moe_dtype to, struct moe_err *err)
{
	uint64_t pos = 0, H = pk->m->cfg.hidden_size;
	size_t es = moe_dtype_size(to);
	int r;

	for (int p = pk->m->cfg.gated ? MOE_HF_GATE : MOE_HF_UP; p <= MOE_HF_DOWN; p++) {
		struct moe_hf_slice s;
		uint64_t I;

		r = moe_hf_expert_slice(pk->m, li, expert, (enum moe_hf_part)p, &s);
		if (r < 0)
			return moe_err_set(err, r, "layer %" PRIu32 ": no %s projection",
					   pk->m->layers[li].layer, moe_hf_part_name((enum moe_hf_part)p));
		if (s.dtype == MOE_DTYPE_MXFP4) {
			if (moe_dtype_is_blocked(to) && to != s.dtype)
				return moe_err_set(err, -EINVAL, "tensor '%s': %s cannot become %s", s.t->name,
						   moe_dtype_name(s.dtype), moe_dtype_name(to));
			if (p == MOE_HF_UP && s.layout == MOE_HF_ROWS_INTERLEAVED)
				continue;       /* taken with the gate from the same block */
			r = copy_mxfp4(pk, &s, blob + pos, to, err);
			if (r < 0)
				return r;
			pos += (s.layout == MOE_HF_ROWS_INTERLEAVED ? 2 : 1) * moe_matrix_bytes(to, s.rows, s.cols);
			continue;
		}
		if (s.layout == MOE_HF_ROWS) {
			if (moe_dtype_is_blocked(to) && s.dtype != to &&
			    (moe_dtype_is_blocked(s.dtype) || to == MOE_DTYPE_INT4))
				return moe_err_set(err, -EINVAL, "tensor '%s': %s cannot become %s", s.t->name,
						   moe_dtype_name(s.dtype), moe_dtype_name(to));
			if (s.dtype == MOE_DTYPE_INT4 && to == s.dtype) {
				r = moe_q4_read(pk->m->ckpt, &pk->m->hc->q4, s.q4, pk->m->cfg.q4_flags, s.rows,
						s.cols, blob + pos, err);
				pk->done += s.nbytes;
				if (r == 0 && pk->opt && pk->opt->progress)
					pk->opt->progress(pk->opt->ctx, pk->done, pk->total, pk->what);
			} else if (s.dtype == MOE_DTYPE_INT4)
				r = dequant_q4(pk, &s, blob + pos, to, err);
			else if (moe_dtype_is_blocked(to) && s.dtype != to)   /* --quantize */
				r = quant_fp8(pk, &s, blob + pos, err);
			else if (s.dtype == MOE_DTYPE_FP8_E4M3_B128)
				r = to == s.dtype ? copy_fp8(pk, &s, blob + pos, err)
						  : dequant_fp8(pk, &s, blob + pos, to, err);
			else
				r = copy_slice(pk, &s, blob + pos, to, err);
			if (r < 0)
				return r;
			pos += moe_cfg_matrix_bytes(&pk->m->cfg, to, s.rows, s.cols);
			continue;
		}
		/* gpt_oss's layouts: element permutations, never of blocked bytes
		 * (moe_model_config_validate refuses expert biases with FP8) */
		if (moe_dtype_is_blocked(s.dtype) || moe_dtype_is_blocked(to))
			return moe_err_set(err, -ENOTSUP, "tensor '%s': %s in a permuted layout is not supported",
					   s.t->name, moe_dtype_name(moe_dtype_is_blocked(to) ? to : s.dtype));
		if (p == MOE_HF_UP && s.layout == MOE_HF_INTERLEAVED_T)
			continue;               /* taken with the gate from the same block */
		r = read_block(pk, &s, to, err);
		if (r < 0)
			return r;
		I = pk->m->cfg.moe_intermediate_size;
		if (s.layout == MOE_HF_INTERLEAVED_T) {
			unpermute(pk->block, s.layout, false, I, H, es, blob + pos);
			unpermute(pk->block, s.layout, true, I, H, es, blob + pos + I * H * es);
			pos += 2 * I * H * es;
		} else {
			unpermute(pk->block, s.layout, false, H, I, es, blob + pos);
			pos += I * H * es;
		}
	}
	if (pk->m->cfg.has_expert_bias && expert != UINT32_MAX)
		return copy_expert_bias(pk, li, expert, blob, to, pos, err);
	return 0;
}

/*
 * How many of the tensors of the shared expert (@shared) or of the routed
 * experts, over every MoE layer, have a name containing @name (as
 * transformers matches modules_to_not_convert); the first that does and
 * the first that does not, for messages.
 */
static void match_kind(const struct moe_hf_model *m, const char *name, bool shared, uint64_t *n,
		       uint64_t *hits, const char **hit, const char **miss)
{
	uint32_t E = shared ? 1 : m->cfg.num_experts;

	*n = *hits = 0;
	*hit = *miss = NULL;
	for (uint32_t li = 0; li < m->hc->n_moe_layers; li++)
		for (uint32_t j = 0; j < E; j++)
			for (int p = MOE_HF_GATE; p <= MOE_HF_DOWN; p++) {
				struct moe_hf_slice s;

				if (moe_hf_expert_slice(m, li, shared ? UINT32_MAX : j, (enum moe_hf_part)p,
							&s) < 0)
					continue;
				(*n)++;
				if (strstr(s.t->name, name)) {
					(*hits)++;
					if (!*hit)
						*hit = s.t->name;
				} else if (!*miss) {
					*miss = s.t->name;
				}
			}
}

/*
 * --quantize-skip @list: which kind of expert keeps its dtype.  A name of
 * a module the store does not hold (attention, lm_head: a release's whole
 * modules_to_not_convert list may be given) changes nothing; one that
 * names no tensor at all is a typo, refused.
 */
static int resolve_skip(const char *dir, const struct moe_hf_model *m, const char *list,
			bool *keep_shared, bool *keep_routed, struct moe_err *err)
{
	char *dup = strdup(list), *save = NULL, *item;
	int r = 0, items = 0;

	if (!dup)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (item = strtok_r(dup, ",", &save); item && r == 0; item = strtok_r(NULL, ",", &save)) {
		uint64_t n, hits;
		const char *hit, *miss;
		bool any = false;

		items++;
		if (!strcmp(item, "shared")) {
			if (!m->cfg.shared_intermediate_size)
				r = moe_err_set(err, -EINVAL, "%s: --quantize-skip shared: this model has no "
						"shared expert", dir);
			*keep_shared = true;
			continue;
		}
		if (!strcmp(item, "routed")) {
			*keep_routed = true;
			continue;
		}
		for (int k = 0; k < 2 && r == 0; k++) {
			match_kind(m, item, k == 0, &n, &hits, &hit, &miss);
			if (hits && hits < n)
				r = moe_err_set(err, -EINVAL, "%s: --quantize-skip '%s' names tensor '%s' but "
						"not '%s': the store holds all the %s experts in one dtype, so "
						"a name must cover all of them or none ('%s' does)", dir, item,
						hit, miss, k == 0 ? "shared" : "routed",
						k == 0 ? "shared" : "routed");
			else if (hits)
				*(k == 0 ? keep_shared : keep_routed) = any = true;
		}
		for (size_t i = 0; r == 0 && !any && i < m->ckpt->n_tensors; i++)
			any = strstr(m->ckpt->tensors[i].name, item) != NULL;
		if (r == 0 && !any)
			r = moe_err_set(err, -EINVAL, "%s: --quantize-skip '%s' names no tensor of the "
					"checkpoint (give 'shared', 'routed' or part of a tensor name, such "
					"as mlp.shared_experts)", dir, item);
	}
	free(dup);
	if (r == 0 && !items)
		r = moe_err_set(err, -EINVAL, "%s: --quantize-skip: the list is empty", dir);
	if (r == 0 && *keep_routed && (*keep_shared || !m->cfg.shared_intermediate_size))
		r = moe_err_set(err, -EINVAL, "%s: --quantize-skip keeps every expert in its dtype: "
				"nothing is left to quantize (drop --quantize)", dir);
	return r;
}

/* Bytes pack reads from the checkpoint: the total for progress. */
static uint64_t source_bytes(const struct moe_hf_model *m)
{
	const struct moe_model_config *c = &m->cfg;
	uint64_t total = 0;

	for (uint32_t li = 0; li < m->hc->n_moe_layers; li++) {
		const struct moe_hf_layer *hl = &m->layers[li];

		total += hl->router->nbytes;
		if (hl->bias)
			total += hl->bias->nbytes;
		if (hl->shared_gate)
			total += hl->shared_gate->nbytes;
		for (uint32_t j = 0; j <= c->num_experts; j++) {
			uint32_t e = j == c->num_experts ? UINT32_MAX : j;   /* last: shared */
			struct moe_hf_slice sl;

			for (int p = MOE_HF_GATE; p <= MOE_HF_DOWN; p++)
				if (moe_hf_expert_slice(m, li, e, (enum moe_hf_part)p, &sl) == 0 &&
				    !(p == MOE_HF_UP && (sl.layout == MOE_HF_INTERLEAVED_T ||
							 sl.layout == MOE_HF_ROWS_INTERLEAVED)))
					total += sl.nbytes +    /* gpt_oss: gate and up read once */
						 (sl.dtype == MOE_DTYPE_MXFP4 ? sl.n_elems / MOE_MXFP4_BLOCK : 0);
			for (int d = 0; d < 2 && e != UINT32_MAX; d++)
				if (moe_hf_expert_bias_slice(m, li, e, d, &sl) == 0)
					total += sl.nbytes;
		}
	}
	return total;
}

int moe_pack(const char *hf_dir, const char *out, const struct moe_pack_options *opt,
	     struct moe_err *err)
{
	struct packer pk = { .opt = opt };
	struct moe_store_writer *w = NULL;
	struct moe_model_config cfg;
	enum moe_dtype to, to_shared;
	float *router = NULL, *bias = NULL, *sgate = NULL;
	uint8_t *blob = NULL, *shared = NULL;
	char *source = NULL;
	uint64_t E, H;
	int r;

	r = moe_hf_model_open(hf_dir, &pk.m, err);
	if (r < 0)
		return r;
	cfg = pk.m->cfg;
	E = cfg.num_experts;
	H = cfg.hidden_size;
	if (opt && opt->quantize_skip && opt->quantize_skip[0] && !opt->quantize) {
		r = moe_err_set(err, -EINVAL, "%s: --quantize-skip says what --quantize leaves alone: "
				"it needs --quantize fp8", hf_dir);
		goto out;
	}
	if (opt && opt->quantize) {
		bool keep_shared = false, keep_routed = false;

		if (strcmp(opt->quantize, "fp8") != 0) {
			r = moe_err_set(err, -EINVAL, "%s: --quantize %s: not supported (supported: fp8)",
					hf_dir, opt->quantize);
			goto out;
		}
		if (opt->dtype >= 0) {
			r = moe_err_set(err, -EINVAL, "%s: --quantize and --dtype cannot be combined: "
					"--quantize chooses the store's dtype", hf_dir);
			goto out;
		}
		if (moe_dtype_is_blocked(pk.m->expert_dtype) ||
		    (pk.m->mixed_tensor[0] && moe_dtype_is_blocked(pk.m->mixed_dtype)) ||
		    (cfg.shared_intermediate_size && (moe_dtype_is_blocked(pk.m->cfg.shared_dtype) ||
		     (pk.m->shared_mixed_tensor[0] && moe_dtype_is_blocked(pk.m->shared_mixed_dtype))))) {
			r = moe_err_set(err, -EINVAL, "%s: --quantize fp8: the checkpoint is already "
					"quantized (%s); pack it without --quantize to keep its bytes",
					hf_dir, pk.m->hc->q4.format ? moe_q4_format_name(pk.m->hc->q4.format) :
					pk.m->expert_dtype == MOE_DTYPE_MXFP4 ? "MXFP4" : "FP8");
			goto out;
		}
		if (cfg.has_expert_bias) {
			r = moe_err_set(err, -ENOTSUP, "%s: --quantize fp8: this model has expert biases "
					"(gpt_oss), which the store does not hold next to FP8 weights; "
					"pack it without --quantize", hf_dir);
			goto out;
		}
		/* the shared expert too unless skipped: DeepSeek-V3's release
		 * and gen-model --quant fp8 quantize every expert, and it is
		 * read for every token */
		to = to_shared = MOE_DTYPE_FP8_E4M3_B128;
		if (opt->quantize_skip && opt->quantize_skip[0]) {
			r = resolve_skip(hf_dir, pk.m, opt->quantize_skip, &keep_shared, &keep_routed, err);
			if (r == 0 && keep_routed && pk.m->mixed_tensor[0])
				r = moe_err_set(err, -EINVAL, "%s: --quantize-skip: the routed experts come in "
						"more than one dtype (%s, and %s in tensor '%s'), which a store "
						"cannot keep", hf_dir, moe_dtype_name(pk.m->expert_dtype),
						moe_dtype_name(pk.m->mixed_dtype), pk.m->mixed_tensor);
			if (r == 0 && keep_shared && pk.m->shared_mixed_tensor[0])
				r = moe_err_set(err, -EINVAL, "%s: --quantize-skip: the shared expert comes in "
						"more than one dtype (%s, and %s in tensor '%s'), which a store "
						"cannot keep", hf_dir, moe_dtype_name(pk.m->cfg.shared_dtype),
						moe_dtype_name(pk.m->shared_mixed_dtype), pk.m->shared_mixed_tensor);
			if (r < 0)
				goto out;
			if (keep_routed)
				to = pk.m->expert_dtype;
			if (keep_shared)
				to_shared = pk.m->cfg.shared_dtype;
		}
	} else if (opt && opt->dtype >= 0) {
		if (opt->dtype >= MOE_DTYPE_COUNT) {
			r = moe_err_set(err, -EINVAL, "invalid target dtype %d", opt->dtype);
			goto out;
		}
		to = to_shared = (enum moe_dtype)opt->dtype;
		/* FP8 and MXFP4 weights dequantize to any of them; --quantize quantizes */
		if (moe_dtype_is_blocked(to)) {
			r = moe_err_set(err, -ENOTSUP, "%s: --dtype %s: --dtype does not quantize: use "
					"--quantize fp8 (an FP8 or MXFP4 checkpoint keeps its weights' bytes "
					"without --dtype)", hf_dir, moe_dtype_name(to));
			goto out;
		}
	} else if (pk.m->mixed_tensor[0]) {
		r = moe_err_set(err, -EINVAL, "%s: expert weights come in more than one dtype (%s, and %s in "
				"tensor '%s'); choose one with --dtype", hf_dir,
				moe_dtype_name(pk.m->expert_dtype), moe_dtype_name(pk.m->mixed_dtype),
				pk.m->mixed_tensor);
		goto out;
	} else if (pk.m->shared_mixed_tensor[0]) {
		r = moe_err_set(err, -EINVAL, "%s: the shared expert's weights come in more than one dtype "
				"(%s, and %s in tensor '%s'); choose one with --dtype", hf_dir,
				moe_dtype_name(pk.m->cfg.shared_dtype), moe_dtype_name(pk.m->shared_mixed_dtype),
				pk.m->shared_mixed_tensor);
		goto out;
	} else {
		to = pk.m->expert_dtype;
		to_shared = pk.m->cfg.shared_dtype;
	}
	cfg.weight_dtype = to;
	cfg.shared_dtype = to_shared;
	if (to != MOE_DTYPE_INT4 && (!cfg.shared_intermediate_size || to_shared != MOE_DTYPE_INT4))
		cfg.q4_group = cfg.q4_flags = 0;   /* dequantized (--dtype): no int4 left */

	source = realpath(hf_dir, NULL);
	r = moe_store_writer_open(out, &cfg, pk.m->hc->n_moe_layers, pk.m->hc->moe_layers,
				  source ? source : hf_dir,
				  pk.m->mixed_tensor[0] ? "mixed" :
				  pk.m->expert_dtype == MOE_DTYPE_INT4 ? moe_q4_format_name(pk.m->hc->q4.format) :
				  pk.m->expert_dtype == MOE_DTYPE_FP8_E4M3_B128 ? "fp8" :
				  moe_dtype_name(pk.m->expert_dtype),
				  &w, err);
	if (r < 0)
		goto out;
	if (opt && opt->source_fingerprint)
		moe_store_writer_set_fingerprint(w, opt->source_fingerprint);

	router = malloc(E * H * sizeof(float));
	bias = malloc(E * sizeof(float));
	sgate = malloc(H * sizeof(float));
	pk.fbuf = malloc(CHUNK_ELEMS * sizeof(float));
	pk.stage = malloc(CHUNK_ELEMS * sizeof(float));
	/* 4096-aligned like the reader's buffers; the writer does not need it */
	if (posix_memalign((void **)&blob, 4096, moe_expert_bytes(&cfg) ? moe_expert_bytes(&cfg) : 1))
		blob = NULL;
	if (cfg.shared_intermediate_size &&
	    posix_memalign((void **)&shared, 4096, moe_shared_bytes(&cfg)))
		shared = NULL;
	/* the padding inside FP8 blobs stays zero: only the parts are written */
	if (blob)
		memset(blob, 0, moe_expert_bytes(&cfg));
	if (shared)
		memset(shared, 0, moe_shared_bytes(&cfg));
	if (!router || !bias || !sgate || !pk.fbuf || !pk.stage || !blob ||
	    (cfg.shared_intermediate_size && !shared)) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}

	pk.total = source_bytes(pk.m);
	for (uint32_t li = 0; li < pk.m->hc->n_moe_layers; li++) {
		const struct moe_hf_layer *hl = &pk.m->layers[li];

		snprintf(pk.what, sizeof(pk.what), "layer %" PRIu32, hl->layer);
		r = copy_tensor_f32(&pk, hl->router, router, E * H, err);
		if (r == 0 && cfg.has_bias)
			r = copy_tensor_f32(&pk, hl->bias, bias, E, err);
		if (r == 0 && cfg.shared_gate)
			r = copy_tensor_f32(&pk, hl->shared_gate, sgate, H, err);
		if (r == 0)
			r = moe_store_writer_put_router(w, li, router, cfg.has_bias ? bias : NULL,
							cfg.shared_gate ? sgate : NULL, err);
		if (r == 0 && cfg.shared_intermediate_size) {
			r = copy_expert(&pk, li, UINT32_MAX, shared, to_shared, err);
			if (r == 0)
				r = moe_store_writer_put_shared(w, li, shared, err);
		}
		for (uint32_t j = 0; r == 0 && j < E; j++) {
			r = copy_expert(&pk, li, j, blob, to, err);
			if (r == 0)
				r = moe_store_writer_put_expert(w, li, j, blob, err);
		}
		if (r < 0)
			goto out;
	}
	r = moe_store_writer_finish(w, err);
	w = NULL;
out:
	moe_store_writer_abort(w);
	moe_hf_model_close(pk.m);
	free(source);
	free(router);
	free(bias);
	free(sgate);
	free(pk.fbuf);
	free(pk.stage);
	free(pk.block);
	free(blob);
	free(shared);
	return r;
}
