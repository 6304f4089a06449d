/* SPDX-License-Identifier: MIT */
/*
 * CPU compute kernels.
 *
 * The one primitive is a block of dot products between weight rows (stored
 * float32, bfloat16 or float16, widened in registers: no float32 copy of an
 * expert is ever made) and float32 token vectors, accumulated in float32.
 *
 * Batch invariance: every output element is computed in one canonical
 * order, whatever the tile that computes it and however many rows and
 * tokens are in the call: lane l of one vector accumulator takes the
 * products k = l, l + W, l + 2W, ... by fused multiply-add, the tail is
 * loaded masked (as if zero padded), and the W lanes are summed by one
 * fixed tree.  So a token's output bits do not depend on its batch.  The
 * order (W) depends on the instruction set picked at start-up, so bits can
 * differ between machines, never between runs or batches on one machine.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

enum moe_kern_isa {
	MOE_KERN_SCALAR = 0,   /* portable C, 8 lanes emulated */
	MOE_KERN_AVX2 = 1,     /* AVX2 + FMA + F16C, 8 lanes */
	MOE_KERN_AVX512 = 2,   /* AVX-512 F/BW/VL, 16 lanes */
	MOE_KERN_AVX512_VBMI = 3, /* AVX512 and VBMI: FP8 decoded by byte permutes
				   * (same order and bits as AVX512); MXFP4 is
				   * AVX512's kernel */
	MOE_KERN_ISA_COUNT
};

/*
 * y[c * ldy + r] = sum_k W[r][k] * xs[c][k]   for r < nr, c < nt
 * W holds nr rows of K elements of type @dt, row r at element r * ldw.
 */
typedef void (*moe_kern_dot_rows_fn)(enum moe_dtype dt, const void *W, size_t ldw, size_t K,
				     size_t nr, const float *const *xs, size_t nt, float *y,
				     size_t ldy);

/* The kernel of the instruction set picked for this machine (the best one
 * the CPU has, or $MOE_KERNEL = scalar | avx2 | avx512 | avx512vbmi if set
 * and usable). */
void moe_kern_dot_rows(enum moe_dtype dt, const void *W, size_t ldw, size_t K, size_t nr,
		       const float *const *xs, size_t nt, float *y, size_t ldy);

/* The kernel of @isa, or NULL if this CPU cannot run it (for tests). */
moe_kern_dot_rows_fn moe_kern_get(enum moe_kern_isa isa);

/*
 * The packed layout, in which the CPU backend keeps resident expert
 * matrices.  A tile of MOE_KERN_GROUP rows then reads one sequential
 * stream instead of one stream per row (measured: 4 interleaved row
 * streams read at 70% of one stream's bandwidth).  A matrix of N rows of K
 * elements is stored with rows padded to ld = moe_kern_packed_ld(K)
 * (zeros); full groups of MOE_KERN_GROUP rows are interleaved in chunks of
 * MOE_KERN_CHUNK elements:
 *   element (r, k), r in a full group g:  g*GROUP*ld + (k/CHUNK)*GROUP*CHUNK
 *                                         + (r%GROUP)*CHUNK + k%CHUNK
 *   rows after the last full group:       r*ld + k
 * The accumulation order is the canonical one, so packed and plain give
 * the same bits.
 */
#define MOE_KERN_GROUP 4
#define MOE_KERN_CHUNK 16

/* The padded row length of the packed layout. */
size_t moe_kern_packed_ld(size_t K);

/* Pack the N x K matrix @src of type @dt (the store's layout,
 * moe_matrix_bytes()) into @dst, which holds moe_kern_packed_bytes(). */
void moe_kern_pack(enum moe_dtype dt, const void *src, size_t N, size_t K, void *dst);

/* The same for the elements [e0, e0 + ne) (row-major order) of the matrix
 * only, @src pointing at element e0: a matrix that arrives in pieces is
 * packed piece by piece, in any order, to the same bytes. */
void moe_kern_pack_range(enum moe_dtype dt, const void *src, size_t N, size_t K, size_t e0,
			 size_t ne, void *dst);

/*
 * dot_rows on rows [0, nr) of a packed matrix starting at @Wp, which must
 * be the start of a group (row index a multiple of MOE_KERN_GROUP); @nr
 * must be a multiple of MOE_KERN_GROUP unless the rows end at the matrix's
 * last row.  For the packed kernels of moe_kern_get_packed, ldw is the
 * padded row length.
 */
void moe_kern_dot_rows_packed(enum moe_dtype dt, const void *Wp, size_t K, size_t nr,
			      const float *const *xs, size_t nt, float *y, size_t ldy);
moe_kern_dot_rows_fn moe_kern_get_packed(enum moe_kern_isa isa);

/*
 * MOE_DTYPE_FP8_E4M3_B128: the same product with w = e4m3(code) * scale,
 * computed as e4m3(code), exact in float32, times the token scaled by the
 * block's scale, x[k] * scale rounded once to float32, in the canonical
 * fused multiply-add order (a tile's rows share their block of 128 rows,
 * so it scales each token vector once for all of them; a weight scaled
 * per row cost a multiply per 16 weights and row).
 * @W holds nr rows of K codes (row r at r * ldw, or packed as above);
 * these are rows row0 .. row0 + nr - 1 of their matrix, whose float32
 * scales are @scales [ceil(N/128)][ceil(K/128)].  A NaN code gives NaN.
 */
typedef void (*moe_kern_dot_rows_fp8_fn)(const uint8_t *W, size_t ldw, size_t K, size_t nr,
					 const float *scales, size_t row0, const float *const *xs,
					 size_t nt, float *y, size_t ldy);
/* The FP8 kernel of @isa, plain (@packed false) or packed; NULL if this CPU
 * cannot run it (for tests). */
moe_kern_dot_rows_fp8_fn moe_kern_get_fp8(enum moe_kern_isa isa, bool packed);

/*
 * MOE_DTYPE_MXFP4: the same product with w = e2m1(code) * 2^(s - 127), one
 * float32 multiplication of two exact values (an E8M0 byte of 255 is NaN),
 * then the canonical fused multiply-add order.  @W holds nr rows of K/2
 * code bytes back to back (row r at r * K/2) in the resident order below,
 * @S their nr rows of K/32 scale bytes; K must be a multiple of 32.
 * Resident order: rows stay whole (the codes are a quarter of bf16's
 * bytes already), but each whole block of 128 values of a row (64 bytes)
 * holds its values 32j + p (low nibble) and 32j + 16 + p (high nibble) in
 * byte 4p + j, p < 16, j < 4, so that a 64-byte load at byte j, as it is
 * and shifted by 4, gives every 32-bit lane its own value's nibble; after
 * the row's last whole block, each group of 16 values (8 bytes) holds the
 * 8 even values' nibbles in bytes 0..3 and the 8 odd values' in bytes
 * 4..7, each half in order, low nibble first, so that one 64-bit
 * broadcast and one variable shift do the same (kernels_mxfp4.c).  The
 * scales are as stored.
 */
typedef void (*moe_kern_dot_rows_mxfp4_fn)(const uint8_t *W, const uint8_t *S, size_t K, size_t nr,
					   const float *const *xs, size_t nt, float *y, size_t ldy);
/* The MXFP4 kernel of @isa (kernels_mxfp4.c); NULL if this CPU cannot run
 * it (for tests). */
moe_kern_dot_rows_mxfp4_fn moe_kern_get_mxfp4(enum moe_kern_isa isa);

/*
 * A whole matrix in the resident packed layout: for plain dtypes the packed
 * elements (N * moe_kern_packed_ld(K) of them); for FP8 the packed codes,
 * zeros to a multiple of 64 bytes, then the float32 scales as the store
 * holds them, zeros to a multiple of 64 bytes; for MXFP4 the size of the
 * store's (moe_matrix_bytes()), the codes in the resident order above.
 */
uint64_t moe_kern_packed_bytes(enum moe_dtype dt, uint64_t N, uint64_t K);

/* Bytes [b0, b0 + nb) of the N x K matrix in the store's layout
 * (moe_matrix_bytes(), model.h), @src pointing at byte b0, into their
 * places in the packed matrix @dst; any split gives the same bytes. */
void moe_kern_pack_bytes(enum moe_dtype dt, const void *src, size_t N, size_t K, uint64_t b0,
			 uint64_t nb, void *dst);

/* dot_rows on rows [row0, row0 + nr) of the packed N x K matrix @Wp of
 * moe_kern_packed_bytes() (row0 and nr as for moe_kern_dot_rows_packed). */
void moe_kern_dot_rows_packed_at(enum moe_dtype dt, const void *Wp, size_t N, size_t K, size_t row0,
				 size_t nr, const float *const *xs, size_t nt, float *y, size_t ldy);

/*
 * MOE_DTYPE_INT4 (model.h moe_q4_layout()): one matrix in its resident
 * layout, which is the store's (the same size: moe_kern_packed_bytes() and
 * moe_kern_pack_bytes() do not take INT4, whose size depends on the
 * store's q4_group and q4_flags, moe_cfg_matrix_bytes()) but for the order
 * of the codes in each row's whole blocks of 128 values (64 bytes): byte
 * 4p + j of a block holds its values 32j + p (low nibble) and 32j + 16 + p
 * (high nibble), p < 16, j < 4, so that a 64-byte load at byte j and the
 * same shifted by 4 give 16 lanes their own canonical columns
 * (kernels_int4.c).  The values after a row's last whole block, the
 * scales, zero points and permutation are as stored.
 */
struct moe_q4_matrix {
	const uint8_t *codes;            /* [N][K/2] */
	const uint16_t *scales;          /* [N][K/G] float16, or bfloat16 with bf16 */
	const uint8_t *zeros;            /* [N][K/G], or NULL: 8 */
	const uint32_t *perm;            /* [K], or NULL: the identity */
	size_t N, K, G;
	bool bf16;
};

/* Bytes [b0, b0 + nb) of the N x K INT4 matrix in the store's layout
 * (moe_q4_layout()), @src pointing at byte b0, into their places in the
 * resident matrix @dst (the same size); any split, in any order, gives the
 * same bytes. */
void moe_kern_q4_pack_bytes(const void *src, size_t N, size_t K, uint64_t b0, uint64_t nb, void *dst);

/* The parts of the N x K INT4 matrix at @m (64-byte aligned). */
void moe_q4_matrix_at(const void *m, uint32_t q4_group, uint32_t q4_flags, size_t N, size_t K,
		      struct moe_q4_matrix *ret);

/*
 * y[c * ldy + r] = sum_k W[row0 + r][k] * xs[c][k] for r < nr, c < nt, with
 * W dequantized in registers, w = (q - z) * s exactly in float32, then the
 * canonical fused multiply-add order (K and G are multiples of 16, so a
 * vector of lanes never straddles a group).  With a permutation, stored
 * column j multiplies xs[c][perm[j]].
 */
typedef void (*moe_kern_dot_rows_q4_fn)(const struct moe_q4_matrix *m, size_t row0, size_t nr,
					const float *const *xs, size_t nt, float *y, size_t ldy);
/* The INT4 kernel of @isa, or NULL if this CPU cannot run it (for tests). */
moe_kern_dot_rows_q4_fn moe_kern_get_q4(enum moe_kern_isa isa);
/* The INT4 kernel of the picked instruction set. */
void moe_kern_dot_rows_q4(const struct moe_q4_matrix *m, size_t row0, size_t nr,
			  const float *const *xs, size_t nt, float *y, size_t ldy);

/* The instruction set moe_kern_dot_rows uses. */
enum moe_kern_isa moe_kern_active(void);

/* "scalar", "avx2", "avx512", "avx512vbmi". */
const char *moe_kern_isa_name(enum moe_kern_isa isa);

#endif
