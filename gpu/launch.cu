// SPDX-License-Identifier: MIT
// The CUDA backend's launches and the work of its ops: routing (k_logits,
// k_select), the split experts call (begin: tokens grouped by expert, x up;
// run: experts made resident and launched; end: k_combine, out back), the
// streaming kernels and the cuBLAS path.  Every kernel of kernels.cuh is
// launched from here and only here: without relocatable device code each
// translation unit carries its own copy of the kernels it includes.
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <utility>

#include "device_impl.cuh"
#include "kernels.cuh"

// An expert with at least this many tokens in a batch goes to cuBLAS.
#define MOE_GEMM_MIN_TOKENS 64

namespace moe_gpu __attribute__((visibility("hidden"))) {

// ---- launches --------------------------------------------------------------

// Launch the streaming kernels for blocks [b0, b1) of phase A, with phase
// B's blocks following in [b1, b2); M reads the launch's dtype.
template <typename M>
int launch_stream(struct gpu *g, const struct moe_model_config *c, size_t b0, size_t b1, size_t b2)
{
	const moe_witem *items = (const moe_witem *)g->e_items.p;
	const moe_wblock *blocks = (const moe_wblock *)g->e_blocks.p;

	if (b1 > b0)
		k_gate_up<M><<<(unsigned)(b1 - b0), MOE_WARPS * 32, 0, g->cs>>>(
			items, blocks + b0, (const float *)g->e_x.p, c->hidden_size, (int)c->act, c->swiglu_alpha,
			c->swiglu_limit, c->q4_group, c->q4_flags);
	if (b2 > b1)
		k_down<M><<<(unsigned)(b2 - b1), MOE_WARPS * 32, 0, g->cs>>>(items, blocks + b1, c->hidden_size,
									      c->q4_group, c->q4_flags);
	CK(cudaGetLastError());
	return 0;
}

int launch_stream_any(struct gpu *g, const struct moe_model_config *c, enum moe_dtype dt, size_t b0, size_t b1,
		      size_t b2)
{
	switch (dt) {
	case MOE_DTYPE_BF16:
		return launch_stream<moe_pmat<__nv_bfloat16>>(g, c, b0, b1, b2);
	case MOE_DTYPE_F16:
		return launch_stream<moe_pmat<__half>>(g, c, b0, b1, b2);
	case MOE_DTYPE_F32:
		return launch_stream<moe_pmat<float>>(g, c, b0, b1, b2);
	case MOE_DTYPE_FP8_E4M3_B128:
		return launch_stream<moe_fmat>(g, c, b0, b1, b2);
	case MOE_DTYPE_MXFP4:
		return launch_stream<moe_mxmat>(g, c, b0, b1, b2);
	case MOE_DTYPE_INT4:
		return launch_stream<moe_q4mat>(g, c, b0, b1, b2);
	default:
		return -EINVAL;   // cuda_supports refused it
	}
}

unsigned grid_for(size_t total)
{
	size_t b = (total + 255) / 256;
	return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

// C = A B (@beta 0) or C += A B (@beta 1) in float32 from bf16 operands, in
// cuBLAS's column-major terms: A^T of the [M][K] row-major weights @W,
// B the [m][K] row-major activations @X, C [m][M] row-major.
int gemm_bf16(struct gpu *g, uint32_t M, uint32_t m, uint32_t K, const void *W, const void *X, float *C, float beta)
{
	const float one = 1.0f;

	CKB(blas.gemm_ex(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)M, (int)m, (int)K, &one, W, CUDA_R_16BF, (int)K, X,
			 CUDA_R_16BF, (int)K, &beta, C, CUDA_R_32F, (int)M, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
	return 0;
}

// One expert (or the shared one) of dtype @dt with many tokens, by cuBLAS.
// @it is the host copy of its item.
int launch_gemm(struct gpu *g, const struct moe_model_config *c, enum moe_dtype dt, const moe_witem *it)
{
	uint32_t H = c->hidden_size, I = it->inter, nin = c->gated ? 2 : 1, m = it->count;
	const float one = 1.0f, zero = 0.0f;
	// gate and up are back to back in the blob: one product of nin * I rows
	const unsigned char *w = it->gate ? it->gate : it->up;
	const unsigned char *wd = it->down;
	const float *bd = it->bias ? it->bias + (size_t)nin * I : nullptr;
	int r;

	if ((r = dgrow(g, &g->g_G, (size_t)m * nin * I * sizeof(float))) < 0)
		return r;
	if (dt == MOE_DTYPE_F32) {
		// float32 weights: plain float32 products
		if ((r = dgrow(g, &g->g_xhi, (size_t)m * (H > I ? H : I) * sizeof(float))) < 0)
			return r;
		float *xs = (float *)g->g_xhi.p, *G = (float *)g->g_G.p;
		k_gather_x<<<grid_for((size_t)m * H), 256, 0, g->cs>>>((const float *)g->e_x.p, it->tok, m, H, xs);
		CKB(blas.sgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)(nin * I), (int)m, (int)H, &one,
				(const float *)w, (int)H, xs, (int)H, &zero, G, (int)(nin * I)));
		k_act_split<<<grid_for((size_t)m * I), 256, 0, g->cs>>>(G, m, I, (int)c->act, c->gated, c->swiglu_alpha,
									  c->swiglu_limit, it->bias, nullptr, nullptr,
									  xs);
		CKB(blas.sgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)H, (int)m, (int)I, &one, (const float *)wd,
				(int)I, xs, (int)I, &zero, it->y, (int)H));
		if (bd)
			k_add_bias<<<grid_for((size_t)m * H), 256, 0, g->cs>>>(it->y, m, H, bd);
		CK(cudaGetLastError());
		return 0;
	}
	// bf16 weights: x = hi + lo in bf16, two tensor-core products summed in
	// float32 (C += lo W^T), which keeps float32-level accuracy.  FP8 and
	// INT4 weights: the expert dequantized to bf16 hi + lo (w = e4m3 *
	// scale, (q - z) * s are not bf16s), a third product W_lo x_hi; W_lo
	// x_lo, under 2^-18 of the sum, is left out.  MXFP4: dequantized to one
	// bf16 copy, exact, and the two products of bf16 weights.
	size_t wid = H > I ? H : I;
	if ((r = dgrow(g, &g->g_xhi, (size_t)m * wid * 2)) < 0 || (r = dgrow(g, &g->g_xlo, (size_t)m * wid * 2)) < 0)
		return r;
	__nv_bfloat16 *hi = (__nv_bfloat16 *)g->g_xhi.p, *lo = (__nv_bfloat16 *)g->g_xlo.p;
	__nv_bfloat16 *whi = nullptr, *wlo = nullptr;
	float *G = (float *)g->g_G.p;
	const void *wdl = nullptr, *wl = nullptr;
	if (dt == MOE_DTYPE_FP8_E4M3_B128 || dt == MOE_DTYPE_INT4 || dt == MOE_DTYPE_MXFP4) {
		size_t up_el = (size_t)nin * I * H, all = up_el + (size_t)H * I;
		bool two = dt != MOE_DTYPE_MXFP4;
		if ((r = dgrow(g, &g->g_whi, all * 2)) < 0 || (two && (r = dgrow(g, &g->g_wlo, all * 2)) < 0))
			return r;
		whi = (__nv_bfloat16 *)g->g_whi.p;
		wlo = two ? (__nv_bfloat16 *)g->g_wlo.p : nullptr;
		// [gate; up] as one [nin * I][H] matrix, then down [H][I]
		const unsigned char *src[3] = { it->gate, it->up, it->down };
		const uint32_t rows[3] = { I, I, H }, cols[3] = { H, H, I };
		const size_t at[3] = { 0, (size_t)(nin - 1) * I * H, up_el };
		for (int k = 0; k < 3; k++) {
			if (!src[k])
				continue;
			unsigned gr = grid_for((size_t)rows[k] * cols[k]);
			if (dt == MOE_DTYPE_FP8_E4M3_B128)
				k_dequant<<<gr, 256, 0, g->cs>>>(src[k], rows[k], cols[k], whi + at[k], wlo + at[k]);
			else if (dt == MOE_DTYPE_INT4)
				k_dequant_q4<<<gr, 256, 0, g->cs>>>(src[k], rows[k], cols[k], c->q4_group, c->q4_flags,
								     whi + at[k], wlo + at[k]);
			else
				k_dequant_mx<<<gr, 256, 0, g->cs>>>(src[k], rows[k], cols[k], whi + at[k]);
		}
		CK(cudaGetLastError());
		w = (const unsigned char *)whi;
		wl = wlo;
		wd = (const unsigned char *)(whi + up_el);
		wdl = two ? wlo + up_el : nullptr;
	}
	k_split_x<<<grid_for((size_t)m * H), 256, 0, g->cs>>>((const float *)g->e_x.p, it->tok, m, H, hi, lo);
	if ((r = gemm_bf16(g, nin * I, m, H, w, hi, G, 0.0f)) < 0 || (r = gemm_bf16(g, nin * I, m, H, w, lo, G, 1.0f)) < 0 ||
	    (wl && (r = gemm_bf16(g, nin * I, m, H, wl, hi, G, 1.0f)) < 0))
		return r;
	k_act_split<<<grid_for((size_t)m * I), 256, 0, g->cs>>>(G, m, I, (int)c->act, c->gated, c->swiglu_alpha,
								  c->swiglu_limit, it->bias, hi, lo, nullptr);
	if ((r = gemm_bf16(g, H, m, I, wd, hi, it->y, 0.0f)) < 0 || (r = gemm_bf16(g, H, m, I, wd, lo, it->y, 1.0f)) < 0 ||
	    (wdl && (r = gemm_bf16(g, H, m, I, wdl, hi, it->y, 1.0f)) < 0))
		return r;
	if (bd)
		k_add_bias<<<grid_for((size_t)m * H), 256, 0, g->cs>>>(it->y, m, H, bd);
	CK(cudaGetLastError());
	return 0;
}

// An expert of dtype @dt with @count tokens goes to cuBLAS (float16 never:
// the hi + lo split is in bf16).
bool use_gemm(enum moe_dtype dt, uint32_t count)
{
	return count >= MOE_GEMM_MIN_TOKENS && dt != MOE_DTYPE_F16;
}

// Queue the experts @list[0..nl) (expert E: the shared one), all of dtype
// @dt, whose weights are at @mem[]: items and blocks go up, then the
// launches.
int launch_group(struct gpu *g, enum moe_dtype dt, const uint32_t *list, unsigned char *const *mem, uint32_t nl)
{
	const struct moe_model_config *c = g->lw->cfg;
	uint32_t H = c->hidden_size, E = c->num_experts;
	size_t esz = dtype_size(dt);
	bool fp8 = dt == MOE_DTYPE_FP8_E4M3_B128;
	moe_witem *hi = (moe_witem *)g->eh_items.p;
	moe_wblock *hb = (moe_wblock *)g->eh_blocks.p;
	size_t i0 = g->nitems, b0 = g->nblocks, b1 = b0, b2;
	int r;

	if (!nl)
		return 0;
	if (i0 + nl > g->items_cap)
		return -EINVAL;
	for (uint32_t j = 0; j < nl; j++) {
		uint32_t e = list[j];
		moe_witem *it = &hi[i0 + j];
		bool sh = e == E;

		it->inter = sh ? c->shared_intermediate_size : c->moe_intermediate_size;
		uint64_t mb = matrix_bytes(c, dt, it->inter, H);
		it->gate = c->gated ? mem[j] : nullptr;
		it->up = mem[j] + (c->gated ? mb : 0);
		it->down = mem[j] + (c->gated ? 2 : 1) * mb;
		// routed experts only (the shared ones of other models have none)
		it->bias = !sh && c->has_expert_bias ? (const float *)(mem[j] + bias_offset(c)) : nullptr;
		it->count = sh ? (uint32_t)g->n : g->count[e];
		it->tok = (const int32_t *)g->e_tok.p + (sh ? g->n * g->kk : g->first[e]);
		it->h = sh ? (float *)g->e_hsh.p : (float *)g->e_h.p + g->first[e] * c->moe_intermediate_size;
		it->y = sh ? (float *)g->e_ysh.p : (float *)g->e_y.p + g->first[e] * H;
		// 16-byte loads need 16-byte aligned rows of weights and of x or h
		// (float32: a multiple of 4 elements); FP8 reads 16 codes a load,
		// MXFP4 32 (16 bytes, one scale block), INT4 16 (8 bytes, in one
		// group: G and K multiples of 16)
		if (dt == MOE_DTYPE_MXFP4) {
			it->vec_a = H % 32 == 0;
			it->vec_b = it->inter % 32 == 0;
		} else if (dt == MOE_DTYPE_INT4) {
			uint32_t ga = c->q4_group ? c->q4_group : H, gb = c->q4_group ? c->q4_group : it->inter;
			it->vec_a = H % 16 == 0 && ga % 16 == 0;
			it->vec_b = it->inter % 16 == 0 && gb % 16 == 0;
		} else if (fp8) {
			it->vec_a = H % 16 == 0;
			it->vec_b = it->inter % 16 == 0;
		} else {
			it->vec_a = (H * esz) % 16 == 0;
			it->vec_b = ((size_t)it->inter * esz) % 16 == 0 && it->inter % 4 == 0;
		}
	}
	// phase A blocks, then phase B blocks, of the streaming experts
	size_t nb = b0;
	for (int phase = 0; phase < 2; phase++) {
		if (phase == 1)
			b1 = nb;
		for (uint32_t j = 0; j < nl; j++) {
			const moe_witem *it = &hi[i0 + j];
			uint32_t rows = phase == 0 ? it->inter : H;
			if (use_gemm(dt, it->count))
				continue;
			for (uint32_t r0 = 0; r0 < rows; r0 += MOE_ROWS_PER_BLOCK) {
				if (nb >= g->blocks_cap)
					return -EINVAL;
				hb[nb].item = (uint32_t)(i0 + j);
				hb[nb].row0 = r0;
				nb++;
			}
		}
	}
	b2 = nb;
	CK(cudaMemcpyAsync((moe_witem *)g->e_items.p + i0, hi + i0, nl * sizeof(*hi), cudaMemcpyHostToDevice, g->cs));
	if (b2 > b0)
		CK(cudaMemcpyAsync((moe_wblock *)g->e_blocks.p + b0, hb + b0, (b2 - b0) * sizeof(*hb),
				   cudaMemcpyHostToDevice, g->cs));
	g->nitems = i0 + nl;
	g->nblocks = b2;
	if ((r = launch_stream_any(g, c, dt, b0, b1, b2)) < 0)
		return r;
	for (uint32_t j = 0; j < nl; j++)
		if (use_gemm(dt, hi[i0 + j].count) && (r = launch_gemm(g, c, dt, &hi[i0 + j])) < 0)
			return r;
	return 0;
}

// Queue the experts @list[0..nl) (expert E: the shared one), whose weights
// are at @mem[]: one group per dtype (the shared expert may have its own).
int launch_experts(struct gpu *g, uint32_t *list, unsigned char **mem, uint32_t nl)
{
	const struct moe_model_config *c = g->lw->cfg;
	uint32_t E = c->num_experts;

	if (c->shared_dtype == c->weight_dtype)
		return launch_group(g, c->weight_dtype, list, mem, nl);
	// the shared expert, if here, to the end of the list, on its own
	for (uint32_t j = 0; j + 1 < nl; j++)
		if (list[j] == E) {
			std::swap(list[j], list[nl - 1]);
			std::swap(mem[j], mem[nl - 1]);
			break;
		}
	bool sh = nl && list[nl - 1] == E;
	int r = launch_group(g, c->weight_dtype, list, mem, nl - sh);
	if (r < 0 || !sh)
		return r;
	return launch_group(g, c->shared_dtype, list + nl - 1, mem + nl - 1, 1);
}

// Wait for everything queued so far, copies and launches, and let its
// slots go.
int drain(struct gpu *g)
{
	cudaError_t a = cudaStreamSynchronize(g->xs), b = cudaStreamSynchronize(g->cs);

	if (a != cudaSuccess || b != cudaSuccess)
		tier_forget_busy(g);   // what they copied may be incomplete
	for (uint32_t s = 0; s < g->nslots; s++)
		g->slots[s].busy = false;
	if (a != cudaSuccess)
		return fail(g, "copy stream", a);
	if (b != cudaSuccess)
		return fail(g, "compute stream", b);
	return 0;
}

// ---- the ops -----------------------------------------------------------------

int gpu_route(struct moe_backend *be, const struct moe_layer_weights *lw, const float *x, size_t n,
	      int32_t *ids, float *w, bool dev_x)
{
	struct gpu *g = (struct gpu *)be->priv;
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, k = c->top_k;
	struct dlayer *l;
	int r;

	if (n == 0)
		return 0;
	if (n > (size_t)UINT32_MAX / E || (n + MOE_LOGIT_TOKENS - 1) / MOE_LOGIT_TOKENS > 65535)
		return -EINVAL;
	g->r_last = nullptr;
	if (!lw->router)
		return -EINVAL;
	if ((r = layer_get(g, lw, false, &l)) < 0)
		return r;
	if ((r = dgrow(g, &g->r_x, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->r_logits, n * E * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->r_scratch, n * MOE_ROUTER_SCRATCH(E) * sizeof(double))) < 0 ||
	    (r = dgrow(g, &g->r_ids, n * k * sizeof(int32_t))) < 0 || (r = dgrow(g, &g->r_w, n * k * sizeof(float))) < 0 ||
	    (r = hgrow(g, &g->rh_x, n * H * sizeof(float))) < 0 || (r = hgrow(g, &g->rh_ids, n * k * sizeof(int32_t))) < 0 ||
	    (r = hgrow(g, &g->rh_w, n * k * sizeof(float))) < 0)
		return r;
	if (dev_x) {
		// a client's device memory: copied on the device (any alignment)
		CK(cudaMemcpyAsync(g->r_x.p, x, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	} else {
		memcpy(g->rh_x.p, x, n * H * sizeof(float));
		CK(cudaMemcpyAsync(g->r_x.p, g->rh_x.p, n * H * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	}
	dim3 grid((E + MOE_ROWS_PER_BLOCK - 1) / MOE_ROWS_PER_BLOCK,
		  (unsigned)((n + MOE_LOGIT_TOKENS - 1) / MOE_LOGIT_TOKENS));
	k_logits<<<grid, MOE_WARPS * 32, 0, g->cs>>>(l->router, (const float *)g->r_x.p, n, E, H, H % 4 == 0,
						     (float *)g->r_logits.p);
	k_select<<<(unsigned)((n + 127) / 128), 128, 0, g->cs>>>(*c, (const float *)g->r_logits.p, l->bias,
								 (double *)g->r_scratch.p, n, (int32_t *)g->r_ids.p,
								 (float *)g->r_w.p);
	CK(cudaGetLastError());
	CK(cudaMemcpyAsync(g->rh_ids.p, g->r_ids.p, n * k * sizeof(int32_t), cudaMemcpyDeviceToHost, g->cs));
	CK(cudaMemcpyAsync(g->rh_w.p, g->r_w.p, n * k * sizeof(float), cudaMemcpyDeviceToHost, g->cs));
	CK(cudaStreamSynchronize(g->cs));
	g->r_last = x;
	g->r_last_n = n;
	memcpy(ids, g->rh_ids.p, n * k * sizeof(int32_t));
	memcpy(w, g->rh_w.p, n * k * sizeof(float));
	return 0;
}

int begin(struct gpu *g, const struct moe_layer_weights *lw, const float *x, size_t n, uint32_t kk,
	  const int32_t *ids, const float *w, float *out, unsigned flags)
{
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts, H = c->hidden_size, I = c->moe_intermediate_size;
	uint32_t Is = c->shared_intermediate_size;
	bool shared = lw->shared && Is > 0;
	bool dev_io = (flags & MOE_BACKEND_DEVICE_IO) != 0;
	size_t nk = n * kk, ent = nk + (shared ? n : 0);
	int r;

	if (kk == 0 || nk / kk != n || nk > UINT32_MAX)
		return -EINVAL;
	if ((r = tier_setup(g, expert_bytes(c))) < 0)
		return r;
	struct dlayer *cl;
	if ((r = layer_get(g, lw, shared, &cl)) < 0)
		return r;
	g->cli = (uint32_t)(cl - g->layers);
	if (E > g->cnt_cap) {
		free(g->count);
		free(g->first);
		free(g->done);
		free(g->list);
		free(g->mem);
		g->count = (uint32_t *)malloc(E * sizeof(uint32_t));
		g->first = (uint64_t *)malloc(E * sizeof(uint64_t));
		g->done = (uint8_t *)malloc(E + 1);
		g->list = (uint32_t *)malloc((E + 1) * sizeof(uint32_t));
		g->mem = (unsigned char **)malloc((E + 1) * sizeof(unsigned char *));
		g->cnt_cap = g->count && g->first && g->done && g->list && g->mem ? E : 0;
		if (!g->cnt_cap)
			return -ENOMEM;
	}
	g->items_cap = (size_t)E + 1;
	g->blocks_cap = g->items_cap * ((size_t)((I > Is ? I : Is) + H) / MOE_ROWS_PER_BLOCK + 2);
	if ((r = dgrow(g, &g->e_x, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->e_w, nk * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_pos, nk * sizeof(uint32_t))) < 0 || (r = dgrow(g, &g->e_tok, ent * sizeof(int32_t))) < 0 ||
	    (r = dgrow(g, &g->e_h, nk * I * sizeof(float))) < 0 || (r = dgrow(g, &g->e_y, nk * H * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_out, n * H * sizeof(float))) < 0 ||
	    (r = dgrow(g, &g->e_items, g->items_cap * sizeof(moe_witem))) < 0 ||
	    (r = dgrow(g, &g->e_blocks, g->blocks_cap * sizeof(moe_wblock))) < 0 ||
	    (r = hgrow(g, &g->eh_w, nk * sizeof(float))) < 0 ||
	    (r = hgrow(g, &g->eh_pos, nk * sizeof(uint32_t))) < 0 || (r = hgrow(g, &g->eh_tok, ent * sizeof(int32_t))) < 0 ||
	    (r = hgrow(g, &g->eh_out, n * H * sizeof(float))) < 0 ||
	    (r = hgrow(g, &g->eh_items, g->items_cap * sizeof(moe_witem))) < 0 ||
	    (r = hgrow(g, &g->eh_blocks, g->blocks_cap * sizeof(moe_wblock))) < 0)
		return r;
	if (shared && ((r = dgrow(g, &g->e_hsh, n * Is * sizeof(float))) < 0 ||
		       (r = dgrow(g, &g->e_ysh, n * H * sizeof(float))) < 0 || (r = dgrow(g, &g->e_sg, n * sizeof(float))) < 0))
		return r;

	// group the entries by expert, tokens ascending within each (a
	// counting sort); pos[t][s] is the entry of slot s of token t
	uint32_t *pos = (uint32_t *)g->eh_pos.p;
	int32_t *tok = (int32_t *)g->eh_tok.p;
	memset(g->count, 0, E * sizeof(uint32_t));
	for (size_t i = 0; i < nk; i++) {
		if (ids[i] < 0 || (uint32_t)ids[i] >= E)
			return -EINVAL;
		g->count[ids[i]]++;
	}
	uint64_t acc = 0;
	for (uint32_t e = 0; e < E; e++) {
		g->first[e] = acc;
		acc += g->count[e];
	}
	for (size_t t = 0; t < n; t++)
		for (uint32_t s = 0; s < kk; s++) {
			uint32_t e = (uint32_t)ids[t * kk + s];
			uint64_t p = g->first[e]++;
			pos[t * kk + s] = (uint32_t)p;
			tok[p] = (int32_t)t;
		}
	for (uint32_t e = 0; e < E; e++)
		g->first[e] -= g->count[e];
	// the cuBLAS experts' scratch, grown now: in run() the device tier's
	// slots are busy and cannot make room
	{
		size_t need_g = 0, need_x = 0, need_lo = 0, need_w = 0, need_wlo = 0;
		uint32_t nin = c->gated ? 2 : 1;

		for (uint32_t e = 0; e <= E; e++) {
			size_t m = e < E ? g->count[e] : shared ? n : 0;
			uint32_t inter = e < E ? I : Is;
			enum moe_dtype dt = e < E ? c->weight_dtype : c->shared_dtype;
			size_t esz = dt == MOE_DTYPE_F32 ? 4 : 2;   // x as float32, or bf16 hi + lo

			if (!m || !use_gemm(dt, (uint32_t)m))
				continue;
			need_g = std::max(need_g, m * nin * inter * sizeof(float));
			need_x = std::max(need_x, m * std::max(H, inter) * esz);
			if (esz == 2)
				need_lo = std::max(need_lo, m * std::max(H, inter) * esz);
			// the dequantized weights: hi + lo, MXFP4 hi alone
			if (dt == MOE_DTYPE_FP8_E4M3_B128 || dt == MOE_DTYPE_INT4 || dt == MOE_DTYPE_MXFP4)
				need_w = std::max(need_w, ((size_t)nin + 1) * inter * H * sizeof(__nv_bfloat16));
			if (dt == MOE_DTYPE_FP8_E4M3_B128 || dt == MOE_DTYPE_INT4)
				need_wlo = std::max(need_wlo, ((size_t)nin + 1) * inter * H * sizeof(__nv_bfloat16));
		}
		if (need_g && ((r = dgrow(g, &g->g_G, need_g)) < 0 || (r = dgrow(g, &g->g_xhi, need_x)) < 0 ||
			       (need_lo && (r = dgrow(g, &g->g_xlo, need_lo)) < 0) ||
			       (need_w && (r = dgrow(g, &g->g_whi, need_w)) < 0) ||
			       (need_wlo && (r = dgrow(g, &g->g_wlo, need_wlo)) < 0)))
			return r;
	}
	if (shared)
		for (size_t t = 0; t < n; t++)
			tok[nk + t] = (int32_t)t;
	memset(g->done, 0, E + 1);

	// x went up for the routing just before: copy it on the device
	bool routed = (flags & MOE_BACKEND_X_ROUTED) && g->r_last == x && g->r_last_n == n &&
		      g->r_x.cap >= n * H * sizeof(float);
	// the pinned staging of x only when x has to come from host memory
	if (!dev_io && !routed) {
		if ((r = hgrow(g, &g->eh_x, n * H * sizeof(float))) < 0)
			return r;
		memcpy(g->eh_x.p, x, n * H * sizeof(float));
	}
	memcpy(g->eh_w.p, w, nk * sizeof(float));
	if (routed)
		CK(cudaMemcpyAsync(g->e_x.p, g->r_x.p, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	else if (dev_io)
		CK(cudaMemcpyAsync(g->e_x.p, x, n * H * sizeof(float), cudaMemcpyDeviceToDevice, g->cs));
	else
		CK(cudaMemcpyAsync(g->e_x.p, g->eh_x.p, n * H * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_w.p, g->eh_w.p, nk * sizeof(float), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_pos.p, pos, nk * sizeof(uint32_t), cudaMemcpyHostToDevice, g->cs));
	CK(cudaMemcpyAsync(g->e_tok.p, tok, ent * sizeof(int32_t), cudaMemcpyHostToDevice, g->cs));
	if (lw->shared_gate && !cl->sgate)
		return -EIO;
	if (shared && cl->sgate && n)
		k_shared_gate<<<(unsigned)((n + 7) / 8), 256, 0, g->cs>>>(cl->sgate, (const float *)g->e_x.p, n, H,
									  (float *)g->e_sg.p);
	CK(cudaGetLastError());
	g->lw = lw;
	g->n = n;
	g->kk = kk;
	g->out = out;
	g->dev_io = dev_io;
	g->nitems = g->nblocks = 0;
	return 0;
}

int run(struct gpu *g, const struct moe_layer_weights *lw, const uint8_t *ready, bool with_shared)
{
	const struct moe_model_config *c = lw->cfg;
	uint32_t E = c->num_experts;
	uint64_t eb = expert_bytes(c);
	struct moe_device_counters *dc = lw->dev;
	struct dlayer *cl = &g->layers[g->cli];
	uint32_t *list = g->list, nl = 0;
	unsigned char **mem = g->mem;
	uint64_t t0, copied = 0;
	int r;

	// the resident experts (and the shared one) first: they compute
	// while the others copy
	for (uint32_t e = 0; e < E; e++) {
		int32_t s = cl->slot_of[e];
		if (!ready[e] || !g->count[e] || g->done[e] || s < 0)
			continue;
		g->slots[s].busy = true;
		tier_touch(g, s);
		list[nl] = e;
		mem[nl++] = g->slots[s].mem;
		g->done[e] = 1;
		if (dc)
			dc->hits++;
	}
	if (with_shared && !g->done[E] && lw->shared && c->shared_intermediate_size) {
		list[nl] = E;
		mem[nl++] = (unsigned char *)cl->shared;
		g->done[E] = 1;
	}
	if ((r = launch_experts(g, list, mem, nl)) < 0)
		return r;

	// the misses: each copied into a slot on the copy stream, then
	// computed together once the copies are in
	nl = 0;
	t0 = now_ns();
	for (uint32_t e = 0; e < E; e++) {
		if (!ready[e] || !g->count[e] || g->done[e])
			continue;
		if (!lw->experts[e])
			return -EINVAL;
		int32_t s = tier_take(g);
		if (s < 0) {
			// every slot is in use by this call: compute what is
			// copied, wait for all of it, and go on with free slots
			if (nl) {
				CK(cudaEventRecord(g->copied, g->xs));
				CK(cudaStreamWaitEvent(g->cs, g->copied, 0));
				if ((r = launch_experts(g, list, mem, nl)) < 0)
					return r;
				nl = 0;
			}
			if ((r = drain(g)) < 0)
				return r;
			if ((s = tier_take(g)) < 0)
				return -ENOMEM;
		}
		// tier_take cleared the slot's old owner; it names its new one
		// only once the copy is queued
		struct slot *x = &g->slots[s];
		x->busy = true;
		CK(cudaMemcpyAsync(x->mem, lw->experts[e], eb, cudaMemcpyHostToDevice, g->xs));
		x->layer_index = (int32_t)g->cli;
		x->expert = e;
		cl->slot_of[e] = s;
		copied += eb;
		list[nl] = e;
		mem[nl++] = x->mem;
		g->done[e] = 1;
		if (dc)
			dc->misses++;
	}
	if (nl) {
		CK(cudaEventRecord(g->copied, g->xs));
		CK(cudaStreamWaitEvent(g->cs, g->copied, 0));
		if ((r = launch_experts(g, list, mem, nl)) < 0)
			return r;
	}
	// the host tier's copies may be evicted once this returns
	CK(cudaStreamSynchronize(g->xs));
	if (dc && copied) {
		dc->bytes += copied;
		dc->copy_ns += now_ns() - t0;
	}
	return 0;
}

int end(struct gpu *g, bool abandon)
{
	const struct moe_model_config *c = g->lw->cfg;
	uint32_t H = c->hidden_size;
	size_t n = g->n;
	int r = 0;

	if (!abandon) {
		bool shared = g->done[c->num_experts];
		k_combine<<<grid_for(n * H), 256, 0, g->cs>>>((const float *)g->e_y.p, (const uint32_t *)g->e_pos.p,
						   (const float *)g->e_w.p, g->kk,
						   shared ? (const float *)g->e_ysh.p : nullptr,
						   shared && g->layers[g->cli].sgate ? (const float *)g->e_sg.p : nullptr, n, H,
						   (float *)g->e_out.p);
		cudaError_t rc = cudaGetLastError();
		if (rc == cudaSuccess)
			rc = cudaMemcpyAsync(g->dev_io ? (void *)g->out : g->eh_out.p, g->e_out.p, n * H * sizeof(float),
					     g->dev_io ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost,
					     g->cs);
		if (rc != cudaSuccess)
			r = fail(g, "combine", rc);
	}
	int d = drain(g);
	if (!r && d < 0)
		r = d;
	if (!r && !abandon)
		if (!g->dev_io)
			memcpy(g->out, g->eh_out.p, n * H * sizeof(float));
	g->lw = nullptr;
	return r;
}

cudaError_t kernel_attributes(cudaFuncAttributes *fa)
{
	return cudaFuncGetAttributes(fa, k_combine);
}

} // namespace moe_gpu
