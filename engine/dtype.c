/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <errno.h>
#include <math.h>

#include "dtype.h"

size_t moe_dtype_size(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return 4;
	case MOE_DTYPE_BF16: return 2;
	case MOE_DTYPE_F16: return 2;
	case MOE_DTYPE_FP8_E4M3_B128: return 1;
	case MOE_DTYPE_MXFP4: return 1;
	case MOE_DTYPE_INT4: return 1;
	default: return 0;
	}
}

const char *moe_dtype_name(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return "f32";
	case MOE_DTYPE_BF16: return "bf16";
	case MOE_DTYPE_F16: return "f16";
	case MOE_DTYPE_FP8_E4M3_B128: return "fp8_e4m3_b128";
	case MOE_DTYPE_MXFP4: return "mxfp4";
	case MOE_DTYPE_INT4: return "int4";
	default: return "?";
	}
}

const char *moe_dtype_st_name(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32: return "F32";
	case MOE_DTYPE_BF16: return "BF16";
	case MOE_DTYPE_F16: return "F16";
	case MOE_DTYPE_FP8_E4M3_B128: return "F8_E4M3";
	case MOE_DTYPE_MXFP4: return "U8";
	default: return "?";
	}
}

int moe_dtype_parse(const char *name, enum moe_dtype *ret)
{
	static const struct { const char *name; enum moe_dtype t; } names[] = {
		{ "f32", MOE_DTYPE_F32 }, { "F32", MOE_DTYPE_F32 },
		{ "float32", MOE_DTYPE_F32 }, { "fp32", MOE_DTYPE_F32 },
		{ "bf16", MOE_DTYPE_BF16 }, { "BF16", MOE_DTYPE_BF16 },
		{ "bfloat16", MOE_DTYPE_BF16 },
		{ "f16", MOE_DTYPE_F16 }, { "F16", MOE_DTYPE_F16 },
		{ "float16", MOE_DTYPE_F16 }, { "fp16", MOE_DTYPE_F16 },
	};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(name, names[i].name) == 0) {
			*ret = names[i].t;
			return 0;
		}
	return -EINVAL;
}

float moe_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu;
	uint32_t man = h & 0x3ffu;
	uint32_t u;
	float f;

	if (exp == 0) {
		/* zero or subnormal: man * 2^-24, exact in float32 */
		f = ldexpf((float)man, -24);
		return sign ? -f : f;
	}
	if (exp == 31)
		u = sign | 0x7f800000u | (man << 13);
	else
		u = sign | ((exp + 112) << 23) | (man << 13);
	memcpy(&f, &u, sizeof(f));
	return f;
}

uint16_t moe_f32_to_f16(float f)
{
	uint32_t u, sign, exp, man;

	memcpy(&u, &f, sizeof(u));
	sign = (u >> 16) & 0x8000u;
	exp = (u >> 23) & 0xffu;
	man = u & 0x7fffffu;
	if (exp == 0xff)                        /* Inf or NaN */
		return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
	int e = (int)exp - 127 + 15;
	if (e >= 31)                            /* overflow to Inf */
		return (uint16_t)(sign | 0x7c00u);
	if (e <= 0) {                           /* subnormal or zero */
		if (e < -10)
			return (uint16_t)sign;
		man |= 0x800000u;
		uint32_t shift = (uint32_t)(14 - e);
		uint32_t half = 1u << (shift - 1);
		uint32_t rest = man & ((1u << shift) - 1);
		uint32_t r = man >> shift;
		if (rest > half || (rest == half && (r & 1u)))
			r++;
		return (uint16_t)(sign | r);
	}
	uint32_t r = ((uint32_t)e << 10) | (man >> 13);
	uint32_t rest = man & 0x1fffu;
	if (rest > 0x1000u || (rest == 0x1000u && (r & 1u)))
		r++;                            /* may carry into Inf: correct */
	return (uint16_t)(sign | r);
}

float moe_e4m3_to_f32(uint8_t code)
{
	uint32_t exp = (code >> 3) & 0xfu, man = code & 7u;
	float f;

	if ((code & 0x7fu) == 0x7fu)
		return NAN;
	if (exp == 0)
		f = ldexpf((float)man, -9);                     /* m/8 * 2^-6 */
	else
		f = ldexpf((float)(8u + man), (int)exp - 10);   /* (1 + m/8) * 2^(e-7) */
	return (code & 0x80u) ? -f : f;
}

uint8_t moe_f32_to_e4m3(float f)
{
	uint8_t sign = signbit(f) ? 0x80u : 0;
	float a = fabsf(f);
	int e;

	if (isnan(f))
		return 0x7fu;
	if (a >= 464.0f)                /* halfway between 448 and 480 (NaN) and up */
		return (uint8_t)(sign | 0x7eu);
	if (a < ldexpf(1.0f, -6)) {     /* subnormal: multiples of 2^-9 */
		float q = nearbyintf(ldexpf(a, 9));      /* default rounding: to even */

		return (uint8_t)(sign | (uint8_t)q);     /* q == 8 is the smallest normal */
	}
	frexpf(a, &e);                  /* a = m * 2^e, m in [0.5, 1) */
	/* 3 mantissa bits: a step of 2^(e-4); round to even in that grid */
	float q = nearbyintf(ldexpf(a, 4 - e));          /* 8..16 */
	int ex = e - 1 + 7;
	if (q >= 16.0f) {
		q = 8.0f;
		ex++;
	}
	if (ex > 15 || (ex == 15 && q > 14.0f))
		return (uint8_t)(sign | 0x7eu);
	return (uint8_t)(sign | (uint8_t)(ex << 3) | (uint8_t)((int)q - 8));
}

/* e2m1 magnitudes by the code's low 3 bits */
static const float e2m1_mag[8] = { 0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f };

float moe_e2m1_to_f32(uint8_t code)
{
	float f = e2m1_mag[code & 7u];

	return (code & 8u) ? -f : f;
}

float moe_e8m0_to_f32(uint8_t s)
{
	uint32_t u = s == 0 ? 0x00400000u : (uint32_t)s << 23;   /* 2^-127 is subnormal */
	float f;

	if (s == 255)
		return NAN;
	memcpy(&f, &u, sizeof(f));
	return f;
}

/* The nearest of the 16 codes to @x at scale @d, the first (smaller
 * magnitude, +0 before -0) on ties, as ggml's best_index_mxfp4 scans. */
static uint8_t e2m1_nearest(float x, float d)
{
	uint8_t best = 0;
	float best_err = fabsf(x);

	for (uint8_t i = 1; i < 16; i++) {
		float err = fabsf(moe_e2m1_to_f32(i) * d - x);

		if (err < best_err) {
			best = i;
			best_err = err;
		}
	}
	return best;
}

uint8_t moe_mxfp4_quantize_block(const float *w, uint8_t *codes)
{
	float amax = 0.0f, d;
	int s = 0, ex;

	for (int i = 0; i < MOE_MXFP4_BLOCK; i++)
		amax = fmaxf(amax, fabsf(w[i]));
	if (amax > 0.0f && isfinite(amax)) {
		frexpf(amax, &ex);                  /* amax = m 2^ex, m in [0.5, 1): exact floor(log2) */
		s = ex - 1 - 2 + 127;
		s = s < 0 ? 0 : s > 254 ? 254 : s;
	}
	d = moe_e8m0_to_f32((uint8_t)s);
	for (int j = 0; j < MOE_MXFP4_BLOCK / 2; j++)
		codes[j] = (uint8_t)(e2m1_nearest(w[2 * j], d) | e2m1_nearest(w[2 * j + 1], d) << 4);
	return (uint8_t)s;
}

/* The largest finite e4m3fn value: a block's amax maps to it. */
#define E4M3_MAX 448.0f

void moe_fp8_band_scales(const float *w, uint64_t n, uint64_t cols, float *scales)
{
	for (uint64_t b = 0; b * MOE_FP8_BLOCK < cols; b++) {
		uint64_t c1 = (b + 1) * MOE_FP8_BLOCK < cols ? (b + 1) * MOE_FP8_BLOCK : cols;
		float amax = 0.0f;

		for (uint64_t r = 0; r < n; r++)
			for (uint64_t c = b * MOE_FP8_BLOCK; c < c1; c++)
				amax = fmaxf(amax, fabsf(w[r * cols + c]));
		scales[b] = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
	}
}

void moe_fp8_quantize_band(const float *w, uint64_t n, uint64_t cols, uint8_t *codes,
			   float *scales)
{
	moe_fp8_band_scales(w, n, cols, scales);
	for (uint64_t r = 0; r < n; r++)
		for (uint64_t c = 0; c < cols; c++)
			codes[r * cols + c] = moe_f32_to_e4m3(w[r * cols + c] / scales[c / MOE_FP8_BLOCK]);
}

void moe_dtype_to_f32(enum moe_dtype t, const void *src, float *dst, size_t n)
{
	const uint16_t *h = src;

	switch (t) {
	case MOE_DTYPE_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case MOE_DTYPE_BF16:
		for (size_t i = 0; i < n; i++)
			dst[i] = moe_bf16_to_f32(h[i]);
		break;
	case MOE_DTYPE_F16:
		for (size_t i = 0; i < n; i++)
			dst[i] = moe_f16_to_f32(h[i]);
		break;
	case MOE_DTYPE_FP8_E4M3_B128:
		for (size_t i = 0; i < n; i++)
			dst[i] = moe_e4m3_to_f32(((const uint8_t *)src)[i]);
		break;
	default:
		break;
	}
}

void moe_dtype_from_f32(enum moe_dtype t, const float *src, void *dst, size_t n)
{
	uint16_t *h = dst;

	switch (t) {
	case MOE_DTYPE_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case MOE_DTYPE_BF16:
		for (size_t i = 0; i < n; i++)
			h[i] = moe_f32_to_bf16(src[i]);
		break;
	case MOE_DTYPE_F16:
		for (size_t i = 0; i < n; i++)
			h[i] = moe_f32_to_f16(src[i]);
		break;
	case MOE_DTYPE_FP8_E4M3_B128:
		for (size_t i = 0; i < n; i++)
			((uint8_t *)dst)[i] = moe_f32_to_e4m3(src[i]);
		break;
	default:
		break;
	}
}
