/* SPDX-License-Identifier: MIT */
/*
 * Element types of weights and activations, and exact conversions.
 *
 * bfloat16 and float16 widen to float32 exactly; narrowing rounds to nearest
 * even (NaN stays NaN), as PyTorch and numpy do.
 *
 * MOE_DTYPE_FP8_E4M3_B128 is a block-scaled format, not an element type: a
 * matrix is float8 e4m3fn codes (one byte each) plus one float32 scale per
 * 128 x 128 block (ARCHITECTURE.md 4.1a).  moe_dtype_size() is the size of
 * a code; moe_matrix_bytes() (model.h) the size of a whole matrix.
 */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* Values are stored in .moe files: never renumber. */
enum moe_dtype {
	MOE_DTYPE_F32 = 0,
	MOE_DTYPE_BF16 = 1,
	MOE_DTYPE_F16 = 2,
	/* float8 e4m3fn codes, w[i][j] = e4m3(code) * scale[i / 128][j / 128]
	 * with float32 scales: DeepSeek-V3's weight_block_size [128, 128].  The
	 * block size is in the name because a store of another block size
	 * would need another kernel, so another number. */
	MOE_DTYPE_FP8_E4M3_B128 = 3,
	/* MXFP4 as gpt-oss is released (OCP microscaling): e2m1 codes, two per
	 * byte (low nibble first), and one E8M0 exponent byte per 32 values
	 * along K, w = e2m1(code) * 2^(s - 127).  Layout: moe_matrix_bytes(). */
	MOE_DTYPE_MXFP4 = 4,
	/* 4-bit group-quantized integers (GPTQ, AWQ, compressed-tensors),
	 * w[n][perm[j]] = (q[n][j] - z[n][j / G]) * s[n][j / G]: codes, float16
	 * or bfloat16 scales, optional zero points and column permutation, in
	 * one canonical layout (model.h moe_q4_layout()).  The group size and
	 * the optional parts are the store's (moe_model_config q4_group,
	 * q4_flags), the same for every INT4 matrix of it. */
	MOE_DTYPE_INT4 = 5,
	MOE_DTYPE_COUNT
};

/* Rows and columns of one scale block of MOE_DTYPE_FP8_E4M3_B128. */
#define MOE_FP8_BLOCK 128

/* Values per E8M0 scale of MOE_DTYPE_MXFP4, along K. */
#define MOE_MXFP4_BLOCK 32

/* Bytes per element (per code for FP8; 1 for MXFP4 and INT4, whose bytes
 * hold two codes: only moe_matrix_bytes() / moe_cfg_matrix_bytes() size
 * their matrices); 0 for an invalid
 * value. */
size_t moe_dtype_size(enum moe_dtype t);

/* True for a block-scaled dtype (codes plus scales). */
static inline bool moe_dtype_is_blocked(enum moe_dtype t)
{
	return t == MOE_DTYPE_FP8_E4M3_B128 || t == MOE_DTYPE_MXFP4 || t == MOE_DTYPE_INT4;
}

/* Short lower-case name: "f32", "bf16", "f16", "fp8_e4m3_b128", "mxfp4",
 * "int4"; "?" if invalid. */
const char *moe_dtype_name(enum moe_dtype t);

/*
 * Parse a dtype name.  Accepts the short names, the safetensors names
 * ("F32", "BF16", "F16") and the torch names ("float32", "bfloat16",
 * "float16").  Returns 0 and sets *ret, or -EINVAL.
 */
int moe_dtype_parse(const char *name, enum moe_dtype *ret);

/* The safetensors header name of @t: "F32", "BF16", "F16". */
const char *moe_dtype_st_name(enum moe_dtype t);

static inline float moe_bf16_to_f32(uint16_t h)
{
	uint32_t u = (uint32_t)h << 16;
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

static inline uint16_t moe_f32_to_bf16(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	if ((u & 0x7fffffffu) > 0x7f800000u)        /* NaN: keep it quiet NaN */
		return (uint16_t)((u >> 16) | 0x0040u);
	u += 0x7fffu + ((u >> 16) & 1u);             /* round to nearest even */
	return (uint16_t)(u >> 16);
}

float moe_f16_to_f32(uint16_t h);

/*
 * float8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
 * infinities; exponent 0 is subnormal, m/8 * 2^-6; S.1111.111 is NaN) to
 * float32, exactly: every e4m3 value is a float32.
 */
float moe_e4m3_to_f32(uint8_t code);

/* float32 to e4m3fn, rounding to nearest even; beyond +-448 (the largest
 * finite code) saturates to +-448, as torch's to(float8_e4m3fn) does not
 * (it gives NaN): callers scale so |f| <= 448 anyway.  NaN gives 0x7f. */
uint8_t moe_f32_to_e4m3(float f);
uint16_t moe_f32_to_f16(float f);

/*
 * Block-scaled FP8 as DeepSeek-V3's release holds it: per 128 x 128 block,
 * scale = max |w| / 448 (1 for an all-zero block, whose codes are then 0),
 * code = e4m3(w / scale) rounded to nearest even, all in float32.  The one
 * quantizer of moed: gen-model --quant fp8 and pack --quantize fp8 both
 * call it, so they give the same bytes for the same float32 values.
 *
 * moe_fp8_band_scales: the ceil(@cols / 128) scales of one band, @n <= 128
 * rows of @cols float32 values at @w (row-major), into @scales.
 * moe_fp8_quantize_band: the same scales, and the band's @n * @cols codes
 * into @codes (row-major, same shape as @w).
 */
void moe_fp8_band_scales(const float *w, uint64_t n, uint64_t cols, float *scales);
void moe_fp8_quantize_band(const float *w, uint64_t n, uint64_t cols, uint8_t *codes,
			   float *scales);

/*
 * MXFP4: the e2m1 value of the 4-bit @code (sign bit 3, magnitudes 0, .5,
 * 1, 1.5, 2, 3, 4, 6), and the E8M0 scale 2^(@s - 127) as a float32 (s = 0
 * is the subnormal 2^-127; 255 is NaN).  Their product is exact in float32
 * (or overflows to infinity for the largest scales).
 */
float moe_e2m1_to_f32(uint8_t code);
float moe_e8m0_to_f32(uint8_t s);

/*
 * Quantize 32 float32 values to MXFP4 as OpenAI's and ggml's quantizers do:
 * the scale exponent is floor(log2(amax)) - 2 (so amax / 2^e lies in
 * [4, 8), the top binade of e2m1, whose largest value is 6), clamped to
 * E8M0's range (s = 0 for an all-zero block); each value / 2^e rounds to the
 * nearest e2m1 value (ties to even code, values past 6 saturate to 6).
 * Writes 16 bytes of codes (value 2j in the low nibble of byte j) to @codes
 * and returns the scale byte.
 */
uint8_t moe_mxfp4_quantize_block(const float *w, uint8_t *codes);

/* Convert @n elements of type @t at @src to float32 at @dst (FP8: the
 * codes' values, unscaled). */
void moe_dtype_to_f32(enum moe_dtype t, const void *src, float *dst, size_t n);

/* Convert @n float32 values to type @t (round to nearest even; FP8: the
 * codes of the values, unscaled). */
void moe_dtype_from_f32(enum moe_dtype t, const float *src, void *dst, size_t n);

#endif
