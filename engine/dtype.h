/* SPDX-License-Identifier: MIT */
/*
 * Element types of weights and activations, and exact conversions.
 *
 * bfloat16 and float16 widen to float32 exactly; narrowing rounds to nearest
 * even (NaN stays NaN), as PyTorch and numpy do.
 */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* Values are stored in .moe files: never renumber. */
enum moe_dtype {
	MOE_DTYPE_F32 = 0,
	MOE_DTYPE_BF16 = 1,
	MOE_DTYPE_F16 = 2,
	MOE_DTYPE_COUNT
};

/* Bytes per element; 0 for an invalid value. */
size_t moe_dtype_size(enum moe_dtype t);

/* Short lower-case name: "f32", "bf16", "f16"; "?" if invalid. */
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
uint16_t moe_f32_to_f16(float f);

/* Convert @n elements of type @t at @src to float32 at @dst. */
void moe_dtype_to_f32(enum moe_dtype t, const void *src, float *dst, size_t n);

/* Convert @n float32 values to type @t (round to nearest even). */
void moe_dtype_from_f32(enum moe_dtype t, const float *src, void *dst, size_t n);

#endif
