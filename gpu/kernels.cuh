// SPDX-License-Identifier: MIT
// The CUDA backend's kernels.  Every output element is produced by one warp
// (or one thread) summing in a fixed order, so results are the same run to
// run; no float atomics anywhere.
//
//   k_select     routing: one thread per token, router_sel.h's rules
//   k_gate_up    weight streaming, phase A: h = act(gate x) * (up x); a warp
//                per weight row, the row read once for up to TT tokens
//   k_down       weight streaming, phase B: y = down h, a warp per row
//                (both read f32, bf16, f16, FP8, MXFP4 or INT4 rows, widened
//                or dequantized in registers; gpt_oss's biases and clamped
//                SwiGLU applied as the CPU does)
//   k_dequant    large groups, FP8: an expert matrix as bf16 hi + lo
//   k_dequant_mx large groups, MXFP4: an expert matrix as bf16 (exact)
//   k_dequant_q4 large groups, INT4: an expert matrix as bf16 hi + lo, its
//                columns in input order
//   k_add_bias   large groups, gpt_oss: down's bias added to y
//   k_split_x    large groups: the expert's tokens gathered as bf16 hi + lo
//   k_act_split  large groups: h = act(g) * u from the cuBLAS product, as
//                bf16 hi + lo for the second product
//   k_shared_gate qwen2_moe: sigmoid(shared_gate . x) per token
//   k_logits     router logits, a warp per router row (fixed order)
//   k_combine    out[t] = sum_s w[t][s] y[t][s] + sg[t] ysh[t], slot order
#ifndef MOE_GPU_KERNELS_CUH
#define MOE_GPU_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "engine/act.h"
#include "engine/model.h"
#include "engine/router_sel.h"

#define MOE_WARPS 8                 // warps per block of the streaming kernels
#define MOE_ROWS_PER_WARP 4         // weight rows per warp
#define MOE_ROWS_PER_BLOCK (MOE_WARPS * MOE_ROWS_PER_WARP)
#define MOE_TT 8                    // tokens per pass over a weight row

// One expert of a streaming launch (or the shared expert).  Its matrices
// in the store's layout (model.h moe_matrix_bytes), of the launch's dtype.
struct moe_witem {
	const unsigned char *gate; // [inter][H], NULL when not gated
	const unsigned char *up;   // [inter][H]
	const unsigned char *down; // [H][inter]
	const float *bias;        // gpt_oss: gate [inter] (gated), up [inter], down [H];
				  // NULL: none
	const int32_t *tok;       // [count] token of each of its entries, ascending
	float *h;                 // [count][inter]
	float *y;                 // [count][H]
	uint32_t inter;           // intermediate size of this expert
	uint32_t count;           // its entries (tokens)
	uint32_t vec_a;           // rows of gate/up can be read 16 bytes at a time
	uint32_t vec_b;           // rows of down can
};

// One block of a streaming launch: rows [row0, row0 + MOE_ROWS_PER_BLOCK)
// of item @item.
struct moe_wblock {
	uint32_t item;
	uint32_t row0;
};

__device__ __forceinline__ float moe_warp_sum(float v)
{
	// butterfly: after each step lanes l and l ^ off hold the same sum
	// (a + b == b + a), so every lane ends with the same bits
	for (int off = 16; off > 0; off >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, off);
	return v;
}

__device__ __forceinline__ float moe_act(int a, float v)
{
	return moe_act_apply((enum moe_act)a, v);
}

// Elements per 16-byte load, and their widening to float.
template <typename T> struct moe_vec;

template <> struct moe_vec<__nv_bfloat16> {
	static constexpr int N = 8;
	__device__ __forceinline__ static void load(const __nv_bfloat16 *p, size_t c, float *f)
	{
		uint4 u = __ldg(reinterpret_cast<const uint4 *>(p) + c);
		const __nv_bfloat162 *b = reinterpret_cast<const __nv_bfloat162 *>(&u);
		for (int i = 0; i < 4; i++) {
			float2 t = __bfloat1622float2(b[i]);
			f[2 * i] = t.x;
			f[2 * i + 1] = t.y;
		}
	}
	__device__ __forceinline__ static float one(const __nv_bfloat16 *p, size_t i)
	{
		return __bfloat162float(p[i]);
	}
};

template <> struct moe_vec<__half> {
	static constexpr int N = 8;
	__device__ __forceinline__ static void load(const __half *p, size_t c, float *f)
	{
		uint4 u = __ldg(reinterpret_cast<const uint4 *>(p) + c);
		const __half2 *b = reinterpret_cast<const __half2 *>(&u);
		for (int i = 0; i < 4; i++) {
			float2 t = __half22float2(b[i]);
			f[2 * i] = t.x;
			f[2 * i + 1] = t.y;
		}
	}
	__device__ __forceinline__ static float one(const __half *p, size_t i)
	{
		return __half2float(p[i]);
	}
};

template <> struct moe_vec<float> {
	static constexpr int N = 4;
	__device__ __forceinline__ static void load(const float *p, size_t c, float *f)
	{
		float4 u = __ldg(reinterpret_cast<const float4 *>(p) + c);
		f[0] = u.x;
		f[1] = u.y;
		f[2] = u.z;
		f[3] = u.w;
	}
	__device__ __forceinline__ static float one(const float *p, size_t i)
	{
		return p[i];
	}
};

// float8 e4m3fn to float32, exactly (every e4m3 value is a float32): sign,
// 4 exponent bits of bias 7, 3 mantissa bits; exponent 0 is subnormal,
// m/8 * 2^-6; S.1111.111 is NaN; there are no infinities.
__device__ __forceinline__ float moe_e4m3(uint32_t b)
{
	uint32_t e = (b >> 3) & 15u, m = b & 7u;
	float v;

	if (e == 0)
		v = (float)m * 0x1p-9f;
	else if (e == 15 && m == 7)
		v = __int_as_float(0x7fc00000);
	else
		v = __uint_as_float(((e + 120u) << 23) | (m << 20));
	return (b & 0x80u) ? -v : v;
}

// Two codes (the low byte first) to float32: by the conversion instruction
// where the device has one (sm_89 on; e4m3 -> f16 is exact, and so is f16
// -> f32), else by moe_e4m3.  The same values either way.
__device__ __forceinline__ float2 moe_e4m3x2(uint32_t pair)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
	__half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)pair, __NV_E4M3);
	return __half22float2(__half2(r));
#else
	return make_float2(moe_e4m3(pair & 0xffu), moe_e4m3((pair >> 8) & 0xffu));
#endif
}

// N float32 activations starting at element c * N of @x (16-byte aligned).
template <int N>
__device__ __forceinline__ void moe_load_x(const float *x, size_t c, float *f)
{
	const float4 *p = reinterpret_cast<const float4 *>(x + c * N);
	for (int i = 0; i < N / 4; i++) {
		float4 u = __ldg(p + i);
		f[4 * i] = u.x;
		f[4 * i + 1] = u.y;
		f[4 * i + 2] = u.z;
		f[4 * i + 3] = u.w;
	}
}

// The activations a row's elements multiply: x itself, in the row's chunks
// of N (x) or one by one (xone); a permuted INT4 row gathers them instead.
// own_x: the row's x differs from another row's of the same length (gate
// and up then cannot share their loads of x).
#define MOE_ROW_PLAIN_X                                                              \
	__device__ __forceinline__ void x(const float *xr, size_t c, float *f) const \
	{                                                                            \
		moe_load_x<N>(xr, c, f);                                             \
	}                                                                            \
	__device__ __forceinline__ float xone(const float *xr, size_t i) const       \
	{                                                                            \
		return xr[i];                                                        \
	}                                                                            \
	__device__ __forceinline__ bool own_x() const                                \
	{                                                                            \
		return false;                                                        \
	}

// A weight row of a plain dtype, widened as it is read.
template <typename T> struct moe_prow {
	static constexpr int N = moe_vec<T>::N;
	const T *p;
	__device__ __forceinline__ void load(size_t c, float *f) const
	{
		moe_vec<T>::load(p, c, f);
	}
	__device__ __forceinline__ float one(size_t i) const
	{
		return moe_vec<T>::one(p, i);
	}
	MOE_ROW_PLAIN_X
};

// A row of FP8 codes with the scales of its band of 128 rows: w =
// e4m3(code) * scale, one float32 rounding (the CPU kernels round x *
// scale instead, kernels.h: a rounding apart, inside the self-test's
// tolerance).  16-byte chunk c, codes 16c .. 16c + 15, lies in column
// block c / 8 (128 / 16 chunks per block).
struct moe_frow {
	static constexpr int N = 16;
	const uint8_t *p;
	const float *s;           // [ceil(K/128)] the band's scales
	__device__ __forceinline__ void load(size_t c, float *f) const
	{
		uint4 u = __ldg(reinterpret_cast<const uint4 *>(p) + c);
		float sc = __ldg(s + (c >> 3));
		uint32_t w[4] = { u.x, u.y, u.z, u.w };

#pragma unroll
		for (int i = 0; i < 4; i++) {
			float2 a = moe_e4m3x2(w[i] & 0xffffu), b = moe_e4m3x2(w[i] >> 16);
			f[4 * i] = a.x * sc;
			f[4 * i + 1] = a.y * sc;
			f[4 * i + 2] = b.x * sc;
			f[4 * i + 3] = b.y * sc;
		}
	}
	__device__ __forceinline__ float one(size_t i) const
	{
		return moe_e4m3(__ldg(p + i)) * __ldg(s + (i >> 7));
	}
	MOE_ROW_PLAIN_X
};

// Matrices of N rows of K elements at @b, in the store's layout.
template <typename T> struct moe_pmat {
	typedef moe_prow<T> Row;
	const T *w;
	uint32_t K;
	__device__ __forceinline__ moe_pmat(const unsigned char *b, uint32_t N, uint32_t K_, uint32_t q4g, uint32_t q4f)
		: w(reinterpret_cast<const T *>(b)), K(K_)
	{
		(void)N;
		(void)q4g;
		(void)q4f;
	}
	__device__ __forceinline__ Row row(uint32_t r) const
	{
		return Row{ w + (size_t)r * K };
	}
};

// FP8: the N * K codes, zeros to 64 bytes, then the float32 scales
// [ceil(N/128)][ceil(K/128)] (model.h moe_matrix_bytes).
struct moe_fmat {
	typedef moe_frow Row;
	const uint8_t *codes;
	const float *scales;
	uint32_t K, kb;
	__device__ __forceinline__ moe_fmat(const unsigned char *b, uint32_t N, uint32_t K_, uint32_t q4g, uint32_t q4f)
		: codes(b), scales(reinterpret_cast<const float *>(b + (((uint64_t)N * K_ + 63) & ~(uint64_t)63))),
		  K(K_), kb((K_ + 127) / 128)
	{
		(void)q4g;
		(void)q4f;
	}
	__device__ __forceinline__ Row row(uint32_t r) const
	{
		return Row{ codes + (size_t)r * K, scales + (size_t)(r / 128) * kb };
	}
};

// e2m1 (MXFP4's 4-bit value: sign bit 3, magnitudes 0, .5, 1, 1.5, 2, 3,
// 4, 6 by the low 3 bits), exactly, by arithmetic on the code rather than a
// table (lanes index it divergently).
__device__ __forceinline__ float moe_e2m1(uint32_t code)
{
	uint32_t m = code & 7u;
	float v = m < 4 ? (float)m * 0.5f : m < 6 ? (float)m - 2.0f : ((float)m - 4.0f) * 2.0f;

	return (code & 8u) ? -v : v;
}

// E8M0: 2^(s - 127) as a float32; s = 0 is the subnormal 2^-127, 255 NaN
// (dtype.h moe_e8m0_to_f32).
__device__ __forceinline__ float moe_e8m0(uint32_t s)
{
	if (s == 255)
		return __int_as_float(0x7fc00000);
	return __uint_as_float(s == 0 ? 0x00400000u : s << 23);
}

// A row of MXFP4 codes and its E8M0 scales: w = e2m1(code) * scale, exact
// in float32 as on the CPU.  16-byte chunk c holds values 32c .. 32c + 31,
// one scale block (value 2i in the low nibble of byte i).
struct moe_mxrow {
	static constexpr int N = 32;
	const uint8_t *p;         // K/2 bytes
	const uint8_t *s;         // K/32 scales
	__device__ __forceinline__ void load(size_t c, float *f) const
	{
		uint4 u = __ldg(reinterpret_cast<const uint4 *>(p) + c);
		float sc = moe_e8m0(__ldg(s + c));
		uint32_t w[4] = { u.x, u.y, u.z, u.w };

#pragma unroll
		for (int i = 0; i < 4; i++)
#pragma unroll
			for (int b = 0; b < 4; b++) {
				uint32_t byte = (w[i] >> (8 * b)) & 0xffu;
				f[8 * i + 2 * b] = moe_e2m1(byte & 15u) * sc;
				f[8 * i + 2 * b + 1] = moe_e2m1(byte >> 4) * sc;
			}
	}
	__device__ __forceinline__ float one(size_t i) const
	{
		return moe_e2m1((__ldg(p + i / 2) >> (4 * (i & 1))) & 15u) * moe_e8m0(__ldg(s + i / 32));
	}
	MOE_ROW_PLAIN_X
};

// MXFP4: codes, then scales at model.h's moe_mxfp4_scales_offset (K a multiple of 32,
// which the store validates).
struct moe_mxmat {
	typedef moe_mxrow Row;
	const uint8_t *codes, *scales;
	uint32_t K;
	__device__ __forceinline__ moe_mxmat(const unsigned char *b, uint32_t N, uint32_t K_, uint32_t q4g,
					     uint32_t q4f)
		: codes(b), scales(b + moe_mxfp4_scales_offset(N, K_)), K(K_)
	{
		(void)q4g;
		(void)q4f;
	}
	__device__ __forceinline__ Row row(uint32_t r) const
	{
		return Row{ codes + (size_t)r * (K / 2), scales + (size_t)r * (K / 32) };
	}
};

// A row of INT4 codes with its group's scale (float16 or bfloat16) and
// zero point (8 without MOE_Q4_ZEROS): w = (q - z) * s in float32, exact,
// as the CPU computes it.  8-byte chunk c holds stored columns 16c ..
// 16c + 15, all in one group (G and K are multiples of 16, which the store
// validates).  With a permutation, stored column j multiplies x[perm[j]]
// (clamped into the row: a store with a bad perm reads no foreign memory).
struct moe_q4row {
	static constexpr int N = 16;
	const uint8_t *p;         // K/2 bytes
	const uint16_t *s;        // [K/G] scales
	const uint8_t *z;         // [K/G] zero points, or NULL
	const uint32_t *perm;     // [K], or NULL
	uint32_t G, K;
	bool bf16;
	__device__ __forceinline__ float scale(size_t g) const
	{
		uint16_t h = __ldg(s + g);
		return bf16 ? __uint_as_float((uint32_t)h << 16) : __half2float(__ushort_as_half(h));
	}
	__device__ __forceinline__ int zero(size_t g) const
	{
		return z ? (int)__ldg(z + g) : 8;
	}
	__device__ __forceinline__ void load(size_t c, float *f) const
	{
		uint2 u = __ldg(reinterpret_cast<const uint2 *>(p) + c);
		size_t g = (c * 16) / G;
		float sc = scale(g);
		int zz = zero(g);
		uint32_t w[2] = { u.x, u.y };

#pragma unroll
		for (int i = 0; i < 2; i++)
#pragma unroll
			for (int n = 0; n < 8; n++)
				f[8 * i + n] = (float)((int)((w[i] >> (4 * n)) & 15u) - zz) * sc;
	}
	__device__ __forceinline__ float one(size_t i) const
	{
		size_t g = i / G;
		return (float)((int)((__ldg(p + i / 2) >> (4 * (i & 1))) & 15u) - zero(g)) * scale(g);
	}
	__device__ __forceinline__ size_t col(size_t j) const
	{
		uint32_t k = __ldg(perm + j);
		return k < K ? k : K - 1;
	}
	__device__ __forceinline__ void x(const float *xr, size_t c, float *f) const
	{
		if (!perm) {
			moe_load_x<N>(xr, c, f);
			return;
		}
#pragma unroll
		for (int i = 0; i < N; i++)
			f[i] = __ldg(xr + col(c * N + i));
	}
	__device__ __forceinline__ float xone(const float *xr, size_t i) const
	{
		return perm ? xr[col(i)] : xr[i];
	}
	__device__ __forceinline__ bool own_x() const
	{
		return perm != nullptr;
	}
};

// INT4: the parts where model.h's moe_q4_layout puts them for the store's q4_group and
// q4_flags.
struct moe_q4mat {
	typedef moe_q4row Row;
	const uint8_t *codes;
	const uint16_t *scales;
	const uint8_t *zeros;
	const uint32_t *perm;
	uint32_t K, G, groups;
	bool bf16;
	__device__ __forceinline__ moe_q4mat(const unsigned char *b, uint32_t N, uint32_t K_, uint32_t q4g,
					     uint32_t q4f)
	{
		struct moe_q4_layout l;

		moe_q4_layout(q4g, q4f, N, K_, &l);

		codes = b;
		scales = reinterpret_cast<const uint16_t *>(b + l.scales);
		zeros = l.zeros ? b + l.zeros : nullptr;
		perm = l.perm ? reinterpret_cast<const uint32_t *>(b + l.perm) : nullptr;
		K = K_;
		G = (uint32_t)l.G;
		groups = (uint32_t)l.groups;
		bf16 = (q4f & MOE_Q4_BF16_SCALES) != 0;
	}
	__device__ __forceinline__ Row row(uint32_t r) const
	{
		return Row{ codes + (size_t)r * (K / 2), scales + (size_t)r * groups,
			    zeros ? zeros + (size_t)r * groups : nullptr, perm, G, K, bf16 };
	}
};

// acc[t] += row . xs[t] for t < nt, the lane's share of the sum: elements
// of 16-byte chunks c = lane, lane + 32, ... in order (vec), or elements
// i = lane, lane + 32, ... (not vec).  The same order whatever nt is, so
// a token's result does not depend on the other tokens of the pass.
template <typename R>
__device__ __forceinline__ void moe_row_dot(const R &row, uint32_t len, bool vec, const float *const *xs,
					    uint32_t nt, uint32_t lane, float *acc)
{
	if (vec) {
		size_t nch = len / R::N;
		// unrolled so that each lane has several 16-byte loads in flight:
		// decode is bound by how many bytes are on their way from HBM
#pragma unroll 4
		for (size_t c = lane; c < nch; c += 32) {
			float wv[R::N];
			row.load(c, wv);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				if (t < nt) {
					float xv[R::N];
					row.x(xs[t], c, xv);
#pragma unroll
					for (int i = 0; i < R::N; i++)
						acc[t] = fmaf(wv[i], xv[i], acc[t]);
				}
			}
		}
	} else {
		for (size_t i = lane; i < len; i += 32) {
			float wv = row.one(i);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++)
				if (t < nt)
					acc[t] = fmaf(wv, row.xone(xs[t], i), acc[t]);
		}
	}
}

// moe_row_dot for two rows of the same length at once (gate and up): each
// chunk of x is loaded once for both, which halves phase A's reads of x
// (for FP8, 64 bytes of x per token against 16 of weights).  Each row's
// sum is in moe_row_dot's order, so the bits are the same.  Only for rows
// that read the same x (!own_x()).
template <typename R>
__device__ __forceinline__ void moe_row_dot2(const R &ra, const R &rb, uint32_t len, bool vec,
					     const float *const *xs, uint32_t nt, uint32_t lane, float *acc_a,
					     float *acc_b)
{
	if (vec) {
		size_t nch = len / R::N;
		// two rows a chunk: as many 16-byte loads in flight as moe_row_dot's 4
#pragma unroll 2
		for (size_t c = lane; c < nch; c += 32) {
			float wa[R::N], wb[R::N];
			ra.load(c, wa);
			rb.load(c, wb);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				if (t < nt) {
					float xv[R::N];
					ra.x(xs[t], c, xv);
#pragma unroll
					for (int i = 0; i < R::N; i++) {
						acc_a[t] = fmaf(wa[i], xv[i], acc_a[t]);
						acc_b[t] = fmaf(wb[i], xv[i], acc_b[t]);
					}
				}
			}
		}
	} else {
		for (size_t i = lane; i < len; i += 32) {
			float a = ra.one(i), b = rb.one(i);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++)
				if (t < nt) {
					float xv = ra.xone(xs[t], i);
					acc_a[t] = fmaf(a, xv, acc_a[t]);
					acc_b[t] = fmaf(b, xv, acc_b[t]);
				}
		}
	}
}

// Phase A: for each row r of the block's rows and each entry e of the item,
// h[e][r] = glu(gate_r . x[tok e] + bg[r], up_r . x[tok e] + bu[r])
// (gated; act(g) * u but for gpt_oss's clamped SwiGLU, moe_act_glu), or
// act(up_r . x[tok e] + bu[r]); the biases only where the item has them.
// M: the matrix type of the launch's dtype (moe_pmat<T>, moe_fmat).
template <typename M>
__global__ void __launch_bounds__(MOE_WARPS * 32)
k_gate_up(const moe_witem *items, const moe_wblock *blocks, const float *x, uint32_t H, int act, float alpha,
	  float limit, uint32_t q4g, uint32_t q4f)
{
	const moe_wblock b = blocks[blockIdx.x];
	const moe_witem it = items[b.item];
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const bool gated = it.gate != nullptr;
	const M gate(gated ? it.gate : it.up, it.inter, H, q4g, q4f), up(it.up, it.inter, H, q4g, q4f);

	for (uint32_t rr = 0; rr < MOE_ROWS_PER_WARP; rr++) {
		uint32_t r = b.row0 + warp * MOE_ROWS_PER_WARP + rr;
		if (r >= it.inter)
			break;
		const typename M::Row gr = gate.row(r), ur = up.row(r);
		for (uint32_t t0 = 0; t0 < it.count; t0 += MOE_TT) {
			uint32_t nt = it.count - t0 < MOE_TT ? it.count - t0 : MOE_TT;
			const float *xs[MOE_TT];
			float ag[MOE_TT], au[MOE_TT];

#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				xs[t] = x + (size_t)it.tok[t0 + (t < nt ? t : nt - 1)] * H;
				ag[t] = 0.0f;
				au[t] = 0.0f;
			}
			if (gated && !gr.own_x()) {
				moe_row_dot2(gr, ur, H, it.vec_a, xs, nt, lane, ag, au);
			} else {
				// gate and up permuted each in its own way (INT4
				// act-order): x gathered for each
				if (gated)
					moe_row_dot(gr, H, it.vec_a, xs, nt, lane, ag);
				moe_row_dot(ur, H, it.vec_a, xs, nt, lane, au);
			}
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				if (t < nt) {
					float g = moe_warp_sum(ag[t]), u = moe_warp_sum(au[t]);
					if (it.bias) {
						// after the dot, as the CPU adds them
						u += it.bias[(gated ? it.inter : 0) + r];
						if (gated)
							g += it.bias[r];
					}
					if (lane == 0)
						it.h[(size_t)(t0 + t) * it.inter + r] =
							gated ? moe_act_glu((enum moe_act)act, alpha, limit, g, u)
							      : moe_act(act, u);
				}
			}
		}
	}
}

// Phase B: y[e][c] = down_c . h[e] (+ bd[c]) for the block's rows c of down
// [H][inter].
template <typename M>
__global__ void __launch_bounds__(MOE_WARPS * 32)
k_down(const moe_witem *items, const moe_wblock *blocks, uint32_t H, uint32_t q4g, uint32_t q4f)
{
	const moe_wblock b = blocks[blockIdx.x];
	const moe_witem it = items[b.item];
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const M down(it.down, H, it.inter, q4g, q4f);
	const float *bd = it.bias ? it.bias + (size_t)(it.gate ? 2 : 1) * it.inter : nullptr;

	for (uint32_t rr = 0; rr < MOE_ROWS_PER_WARP; rr++) {
		uint32_t c = b.row0 + warp * MOE_ROWS_PER_WARP + rr;
		if (c >= H)
			break;
		const typename M::Row dr = down.row(c);
		for (uint32_t t0 = 0; t0 < it.count; t0 += MOE_TT) {
			uint32_t nt = it.count - t0 < MOE_TT ? it.count - t0 : MOE_TT;
			const float *hs[MOE_TT];
			float acc[MOE_TT];

#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				hs[t] = it.h + (size_t)(t0 + (t < nt ? t : nt - 1)) * it.inter;
				acc[t] = 0.0f;
			}
			moe_row_dot(dr, it.inter, it.vec_b, hs, nt, lane, acc);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				if (t < nt) {
					float v = moe_warp_sum(acc[t]);
					if (bd)
						v += bd[c];
					if (lane == 0)
						it.y[(size_t)(t0 + t) * H + c] = v;
				}
			}
		}
	}
}

// Large groups: the rows of x of the @count tokens @tok, as bf16 hi and lo
// (hi + lo carries 16 bits of the float's 24: a relative error near 2^-17).
__global__ void k_split_x(const float *x, const int32_t *tok, uint32_t count, uint32_t H,
			  __nv_bfloat16 *hi, __nv_bfloat16 *lo)
{
	size_t total = (size_t)count * H;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		size_t e = i / H, c = i % H;
		float v = x[(size_t)tok[e] * H + c];
		__nv_bfloat16 h = __float2bfloat16_rn(v);
		hi[i] = h;
		lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));
	}
}

// Large groups, f32 weights: the rows of x of the @count tokens @tok.
__global__ void k_gather_x(const float *x, const int32_t *tok, uint32_t count, uint32_t H, float *xs)
{
	size_t total = (size_t)count * H;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x)
		xs[i] = x[(size_t)tok[i / H] * H + i % H];
}

// Large groups: h = glu(g + bg[r], u + bu[r]) (gated; g = G[e][r], u =
// G[e][I + r]; moe_act_glu) or act(G[e][r] + bu[r]), from G [count][(gated
// ? 2 : 1) I], the biases @bias (gate [I] when gated, then up [I]) only
// when set; as bf16 hi and lo when @hi is set, else as float32 into @hf.
__global__ void k_act_split(const float *G, uint32_t count, uint32_t I, int act, int gated, float alpha,
			    float limit, const float *bias, __nv_bfloat16 *hi, __nv_bfloat16 *lo, float *hf)
{
	size_t total = (size_t)count * I, ld = (size_t)(gated ? 2 : 1) * I;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		size_t e = i / I, r = i % I;
		float v;

		if (gated) {
			float g = G[e * ld + r], u = G[e * ld + I + r];
			if (bias) {
				u += bias[I + r];
				g += bias[r];
			}
			v = moe_act_glu((enum moe_act)act, alpha, limit, g, u);
		} else {
			float u = G[e * ld + r];
			if (bias)
				u += bias[r];
			v = moe_act(act, u);
		}
		if (hi) {
			__nv_bfloat16 h = __float2bfloat16_rn(v);
			hi[i] = h;
			lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));
		} else {
			hf[i] = v;
		}
	}
}

// Large groups, FP8: the N x K matrix (codes and scales at @m, the store's
// layout) as bf16 hi and lo, w = e4m3(code) * scale in float32 as the
// streaming kernels compute it; hi + lo carries 16 of its 24 bits.
__global__ void k_dequant(const unsigned char *m, uint32_t N, uint32_t K, __nv_bfloat16 *hi, __nv_bfloat16 *lo)
{
	const moe_fmat mat(m, N, K, 0, 0);
	size_t total = (size_t)N * K;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		size_t r = i / K, k = i % K;
		float v = moe_e4m3(mat.codes[i]) * mat.scales[(r / 128) * mat.kb + k / 128];
		__nv_bfloat16 h = __float2bfloat16_rn(v);
		hi[i] = h;
		lo[i] = __float2bfloat16_rn(v - __bfloat162float(h));
	}
}

// Large groups, MXFP4: the N x K matrix at @m as bf16, w = e2m1 * 2^e,
// which bf16 holds exactly (two significant bits, float32's exponents).
__global__ void k_dequant_mx(const unsigned char *m, uint32_t N, uint32_t K, __nv_bfloat16 *hi)
{
	const moe_mxmat mat(m, N, K, 0, 0);
	size_t total = (size_t)N * K;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		size_t r = i / K, k = i % K;
		hi[i] = __float2bfloat16_rn(mat.row((uint32_t)r).one(k));
	}
}

// Large groups, INT4: the N x K matrix at @m as bf16 hi + lo, w = (q - z)
// * s in float32 as the streaming kernels compute it, stored column j
// written to input column perm[j] (a permutation: every column once), so
// that the products take x unpermuted; hi + lo carries 16 of its bits.
__global__ void k_dequant_q4(const unsigned char *m, uint32_t N, uint32_t K, uint32_t q4g, uint32_t q4f,
			     __nv_bfloat16 *hi, __nv_bfloat16 *lo)
{
	const moe_q4mat mat(m, N, K, q4g, q4f);
	size_t total = (size_t)N * K;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x) {
		size_t r = i / K, j = i % K;
		const moe_q4row row = mat.row((uint32_t)r);
		float v = row.one(j);
		size_t o = r * K + (row.perm ? row.col(j) : j);
		__nv_bfloat16 h = __float2bfloat16_rn(v);
		hi[o] = h;
		lo[o] = __float2bfloat16_rn(v - __bfloat162float(h));
	}
}

// Large groups, gpt_oss: y[e][c] += bd[c] after the down product.
__global__ void k_add_bias(float *y, uint32_t count, uint32_t H, const float *bd)
{
	size_t total = (size_t)count * H;

	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
	     i += (size_t)gridDim.x * blockDim.x)
		y[i] += bd[i % H];
}

// qwen2_moe: sg[t] = sigmoid(gate . x[t]), a warp per token.
__global__ void k_shared_gate(const float *gate, const float *x, size_t n, uint32_t H, float *sg)
{
	size_t t = blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32;
	uint32_t lane = threadIdx.x % 32;
	float acc = 0.0f;

	if (t >= n)
		return;
	for (size_t i = lane; i < H; i += 32)
		acc = fmaf(gate[i], x[t * H + i], acc);
	acc = moe_warp_sum(acc);
	if (lane == 0)
		sg[t] = 1.0f / (1.0f + expf(-acc));
}

// out[t][i] = sum over s of w[t][s] * y[pos[t][s]][i], s = 0..kk-1 in turn,
// then + sg[t] * ysh[t][i] (sg NULL: 1) when ysh is set.
__global__ void k_combine(const float *y, const uint32_t *pos, const float *w, uint32_t kk, const float *ysh,
			  const float *sg, size_t n, uint32_t H, float *out)
{
	size_t total = n * H;

	for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < total;
	     j += (size_t)gridDim.x * blockDim.x) {
		size_t t = j / H, i = j % H;
		float o = 0.0f;

		for (uint32_t s = 0; s < kk; s++)
			o = fmaf(w[t * kk + s], y[(size_t)pos[t * kk + s] * H + i], o);
		if (ysh)
			o = fmaf(sg ? sg[t] : 1.0f, ysh[t * H + i], o);
		out[j] = o;
	}
}

// Router logits: logits[t][e] = router_e . x[t] in float32, a warp per row
// of the router and up to MOE_TT tokens per pass, blockIdx.y choosing a
// range of MOE_LOGIT_TOKENS tokens.  The order of each sum is fixed, so a
// token's logits do not depend on the batch (cuBLAS would pick its kernel
// by the batch size).
#define MOE_LOGIT_TOKENS 64
__global__ void __launch_bounds__(MOE_WARPS * 32)
k_logits(const float *router, const float *x, size_t n, uint32_t E, uint32_t H, int vec, float *logits)
{
	const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
	const size_t tb = (size_t)blockIdx.y * MOE_LOGIT_TOKENS;
	const size_t te = tb + MOE_LOGIT_TOKENS < n ? tb + MOE_LOGIT_TOKENS : n;

	for (uint32_t rr = 0; rr < MOE_ROWS_PER_WARP; rr++) {
		uint32_t e = blockIdx.x * MOE_ROWS_PER_BLOCK + warp * MOE_ROWS_PER_WARP + rr;
		if (e >= E)
			break;
		const float *row = router + (size_t)e * H;
		for (size_t t0 = tb; t0 < te; t0 += MOE_TT) {
			uint32_t nt = te - t0 < MOE_TT ? (uint32_t)(te - t0) : MOE_TT;
			const float *xs[MOE_TT];
			float acc[MOE_TT];

#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				xs[t] = x + (t0 + (t < nt ? t : nt - 1)) * H;
				acc[t] = 0.0f;
			}
			moe_row_dot(moe_prow<float>{ row }, H, vec, xs, nt, lane, acc);
#pragma unroll
			for (uint32_t t = 0; t < MOE_TT; t++) {
				if (t < nt) {
					float v = moe_warp_sum(acc[t]);
					if (lane == 0)
						logits[(t0 + t) * E + e] = v;
				}
			}
		}
	}
}

// Routing: one thread per token, the rules of router_sel.h.
__global__ void k_select(struct moe_model_config cfg, const float *logits, const float *bias, double *scratch,
			 size_t n, int32_t *ids, float *w)
{
	size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;

	if (t >= n)
		return;
	moe_rs_select(&cfg, logits + t * cfg.num_experts, bias, scratch + t * MOE_ROUTER_SCRATCH(cfg.num_experts),
		      ids + t * cfg.top_k, w + t * cfg.top_k);
}

#endif
