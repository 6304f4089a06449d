/* SPDX-License-Identifier: MIT */
/*
 * Backend selection.  The CPU backend is linked in; the CUDA backend is a
 * module opened at run time from $MOE_BACKEND_DIR (tests, uninstalled
 * builds) or the install directory, so a machine without the CUDA libraries
 * or driver still runs everything on the CPU.
 */
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rng.h"

#ifndef MOE_BACKEND_DIR
#define MOE_BACKEND_DIR "/usr/local/lib/moed"
#endif

#define CUDA_MODULE "moe-backend-cuda.so"

/* ThreadSanitizer keeps the atexit handlers a module registers (the CUDA
 * runtime's, which unregister its kernels) in a list of its own that
 * dlclose() does not empty, and calls them at exit into the unmapped
 * module: under TSan a module stays mapped (RTLD_NODELETE). */
#if defined(__SANITIZE_THREAD__)
#define MODULE_NODELETE RTLD_NODELETE
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MODULE_NODELETE RTLD_NODELETE
#endif
#endif
#ifndef MODULE_NODELETE
#define MODULE_NODELETE 0
#endif

static int backend_start(const struct moe_backend_ops *ops, void *handle,
			 const struct moe_backend_options *opt, struct moe_backend **ret,
			 struct moe_err *err)
{
	struct moe_backend *be = calloc(1, sizeof(*be));
	int r;

	if (!be)
		return moe_err_set(err, -ENOMEM, "out of memory");
	be->ops = ops;
	be->handle = handle;
	r = ops->init(be, opt, err);
	if (r < 0) {
		free(be);
		return r;
	}
	*ret = be;
	return 0;
}

/*
 * The ops of the module @h (opened from @path), once its ABI is this
 * engine's: the same MOE_BACKEND_ABI_VERSION and the same size of the ops
 * table.  -ENODEV, with a message naming the module and both versions,
 * for a module of another ABI or of none (built before modules carried
 * one), whose layout cannot be trusted: nothing in it is called.
 */
static int module_ops(void *h, const char *path, const struct moe_backend_ops **ret,
		      struct moe_err *err)
{
	const struct moe_backend_module *m = dlsym(h, MOE_BACKEND_MODULE_SYMBOL);

	if (!m) {
		if (dlsym(h, "moe_backend_module_ops"))
			return moe_err_set(err, -ENODEV, "backend module %s has no ABI version (built before "
					   "moed checked them), this build needs version %u (ops table of %zu "
					   "bytes): rebuild or reinstall the module", path,
					   MOE_BACKEND_ABI_VERSION, sizeof(struct moe_backend_ops));
		return moe_err_set(err, -ENODEV, "%s is not a moed backend module", path);
	}
	if (m->abi_version != MOE_BACKEND_ABI_VERSION || m->ops_size != sizeof(struct moe_backend_ops))
		return moe_err_set(err, -ENODEV, "backend module %s has ABI version %" PRIu32 " (ops table of "
				   "%" PRIu32 " bytes), this build needs version %u (ops table of %zu bytes): "
				   "rebuild or reinstall the module", path, m->abi_version, m->ops_size,
				   MOE_BACKEND_ABI_VERSION, sizeof(struct moe_backend_ops));
	if (!m->ops || !m->ops->init || !m->ops->fini)
		return moe_err_set(err, -ENODEV, "%s is not a moed backend module", path);
	*ret = m->ops;
	return 0;
}

static int cuda_open(const struct moe_backend_options *opt, struct moe_backend **ret,
		     struct moe_err *err)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	const struct moe_backend_ops *ops = NULL;
	char path[PATH_MAX];
	void *h;
	int r;

	if (!dir || !*dir)
		dir = MOE_BACKEND_DIR;
	snprintf(path, sizeof(path), "%s/%s", dir, CUDA_MODULE);
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL | MODULE_NODELETE);
	if (!h)
		return moe_err_set(err, -ENODEV, "CUDA backend not available: %s", dlerror());
	r = module_ops(h, path, &ops, err);
	if (r < 0) {
		dlclose(h);
		return r;
	}
	if (!ops->route || !ops->experts) {
		/* let the module say why it cannot serve (no device, no kernels) */
		struct moe_err why = { 0 };
		r = ops->init(NULL, opt, &why);
		dlclose(h);
		return moe_err_set(err, r < 0 ? r : -ENOTSUP, "%s",
				   why.msg[0] ? why.msg : "the CUDA backend cannot compute here");
	}
	if (ops->supports && opt && opt->model) {
		r = ops->supports(opt->model, err);
		if (r < 0) {
			dlclose(h);
			return r;
		}
	}
	r = backend_start(ops, h, opt, ret, err);
	if (r < 0)
		dlclose(h);
	return r;
}

static uint32_t st_needed(const struct moe_model_config *model);
static int st_run_mask(struct moe_backend *be, uint32_t mask, struct moe_err *err);

/* The CUDA backend, once it has passed the self-test layers @opt's model
 * needs, on a throwaway instance (so that the test leaves no state in the
 * one that serves); each layer once per process: the device does not change
 * under it. */
static int cuda_open_checked(const struct moe_backend_options *opt, struct moe_backend **ret,
			     struct moe_err *err)
{
	static uint32_t passed;
	struct moe_backend_options small = opt ? *opt : (struct moe_backend_options){ 0 };
	uint32_t todo = st_needed(opt ? opt->model : NULL) & ~__atomic_load_n(&passed, __ATOMIC_ACQUIRE);
	struct moe_backend *be;
	int r;

	if (!todo)
		return cuda_open(opt, ret, err);
	small.device_bytes = 64u << 20;
	r = cuda_open(&small, &be, err);
	if (r < 0)
		return r;
	r = st_run_mask(be, todo, err);
	moe_backend_close(be);
	if (r < 0)
		return r;
	__atomic_fetch_or(&passed, todo, __ATOMIC_ACQ_REL);
	return cuda_open(opt, ret, err);
}

/* ------------------------------------------------------------------ self-test */

/*
 * Small layers run through @be and through the CPU backend: every token's
 * experts must agree and its output be within a relative L2 of 1e-3.  A
 * backend that has never been checked on this machine's device (a new GPU,
 * a new driver) proves itself before it serves, on every kind of layer it
 * computes that the model needs (st_needed()): each dtype it reads (bf16,
 * f32, FP8 with partial 128 x 128 blocks, MXFP4, INT4 with groups, zero
 * points and act-order or one symmetric group a row), a shared expert in
 * another dtype than the routed ones (both ways), shapes that are and are not multiples of 16 (vector and scalar
 * loads), gpt_oss's biases and clamped SwiGLU past the clamp, and the
 * routing rules of softmax, sigmoid with correction bias, and gpt_oss.
 * Expert 0 takes every token, so that a large batch reaches the products
 * of many tokens per expert (the CUDA backend's cuBLAS path) as well as
 * the small ones.  MOE_BACKEND_SELFTEST_FAULT=1 perturbs @be's output
 * in every case, =TEXT in the cases whose description contains TEXT
 * (tests).
 */
#define ST_TOKENS 200

struct st_case {
	const char *what;
	struct moe_model_config cfg;
	float w_scale;                /* expert weights uniform in +-w_scale */
};

/*
 * Largest expert first: a backend may size its device slots on its first
 * call (the CUDA backend does), and st_needed() runs a subset in this
 * order, so each case's routed expert is no larger than that of the first
 * case of any subset that holds it (the MXFP4 and int4 cases, last, are
 * small in bytes; the int4 ones largest first among themselves).  Each
 * case is its own layer number, as the CUDA backend keeps experts
 * resident by layer and expert.
 */
static const struct st_case st_cases[] = {
	{ "gpt_oss (router and expert biases, clamped SwiGLU past the clamp), bf16",
	  { .arch = MOE_ARCH_GPT_OSS, .hidden_size = 256, .moe_intermediate_size = 128, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .scoring = MOE_SCORING_SOFTMAX,
	    .topk_method = MOE_TOPK_GREEDY, .has_bias = true, .gated = true, .has_expert_bias = true,
	    .act = MOE_ACT_SWIGLU_OAI, .swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
	    .weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16 }, 1.0f },
	{ "qwen3_moe, bf16",
	  { .arch = MOE_ARCH_QWEN3_MOE, .hidden_size = 256, .moe_intermediate_size = 128, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .scoring = MOE_SCORING_SOFTMAX,
	    .topk_method = MOE_TOPK_GREEDY, .norm_topk_prob = true, .gated = true, .act = MOE_ACT_SILU,
	    .routed_scaling_factor = 1.0f, .weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16 },
	  0.0625f },
	{ "gpt_oss, float32, H = 200",
	  { .arch = MOE_ARCH_GPT_OSS, .hidden_size = 200, .moe_intermediate_size = 60, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .scoring = MOE_SCORING_SOFTMAX,
	    .topk_method = MOE_TOPK_GREEDY, .has_bias = true, .gated = true, .has_expert_bias = true,
	    .act = MOE_ACT_SWIGLU_OAI, .swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
	    .weight_dtype = MOE_DTYPE_F32, .shared_dtype = MOE_DTYPE_F32 }, 1.0f },
	{ "deepseek_v3, FP8 experts (partial blocks) and a bf16 shared expert",
	  { .arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 256, .moe_intermediate_size = 144, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .n_shared_experts = 1,
	    .shared_intermediate_size = 96, .scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC,
	    .norm_topk_prob = true, .has_bias = true, .gated = true, .act = MOE_ACT_SILU,
	    .routed_scaling_factor = 2.5f, .weight_dtype = MOE_DTYPE_FP8_E4M3_B128,
	    .shared_dtype = MOE_DTYPE_BF16 }, 0.0625f },
	{ "qwen2_moe, bf16 experts and an FP8 shared expert, H = 200, shared I = 72",
	  { .arch = MOE_ARCH_QWEN2_MOE, .hidden_size = 200, .moe_intermediate_size = 64, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .n_shared_experts = 1,
	    .shared_intermediate_size = 72, .scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY,
	    .shared_gate = true, .gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
	    .weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_FP8_E4M3_B128 }, 0.0625f },
	{ "FP8 experts and FP8 shared expert, H = 200, I = 72 (scalar loads)",
	  { .arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 200, .moe_intermediate_size = 72, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .n_shared_experts = 1,
	    .shared_intermediate_size = 72, .scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC,
	    .norm_topk_prob = true, .has_bias = true, .gated = true, .act = MOE_ACT_SILU,
	    .routed_scaling_factor = 2.5f, .weight_dtype = MOE_DTYPE_FP8_E4M3_B128,
	    .shared_dtype = MOE_DTYPE_FP8_E4M3_B128 }, 0.0625f },
	{ "gpt_oss, MXFP4 experts (router and expert biases, clamped SwiGLU past the clamp), H = 288, I = 96",
	  { .arch = MOE_ARCH_GPT_OSS, .hidden_size = 288, .moe_intermediate_size = 96, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .scoring = MOE_SCORING_SOFTMAX,
	    .topk_method = MOE_TOPK_GREEDY, .has_bias = true, .gated = true, .has_expert_bias = true,
	    .act = MOE_ACT_SWIGLU_OAI, .swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
	    .weight_dtype = MOE_DTYPE_MXFP4, .shared_dtype = MOE_DTYPE_MXFP4 }, 1.0f },
	{ "qwen3_moe, int4 experts in groups of 32 with zero points and act-order, f16 scales",
	  { .arch = MOE_ARCH_QWEN3_MOE, .hidden_size = 256, .moe_intermediate_size = 128, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .scoring = MOE_SCORING_SOFTMAX,
	    .topk_method = MOE_TOPK_GREEDY, .norm_topk_prob = true, .gated = true, .act = MOE_ACT_SILU,
	    .routed_scaling_factor = 1.0f, .weight_dtype = MOE_DTYPE_INT4, .shared_dtype = MOE_DTYPE_INT4,
	    .q4_group = 32, .q4_flags = MOE_Q4_ZEROS | MOE_Q4_PERM }, 0.0625f },
	{ "qwen2_moe, int4 experts and shared expert, one group a row, symmetric, bf16 scales, H = 208, I = 80",
	  { .arch = MOE_ARCH_QWEN2_MOE, .hidden_size = 208, .moe_intermediate_size = 80, .num_experts = 8,
	    .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1, .n_shared_experts = 1,
	    .shared_intermediate_size = 48, .scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY,
	    .shared_gate = true, .gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
	    .weight_dtype = MOE_DTYPE_INT4, .shared_dtype = MOE_DTYPE_INT4, .q4_group = 0,
	    .q4_flags = MOE_Q4_BF16_SCALES }, 0.0625f },
};

static float st_uniform(uint64_t *s, float scale)
{
	return scale * (float)((double)(moe_splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static void *st_zalloc(size_t bytes)
{
	void *p = NULL;

	if (posix_memalign(&p, 64, bytes ? bytes : 1))
		return NULL;
	memset(p, 0, bytes);
	return p;
}

/* INT4: random codes, zero points and a permutation, scales in [scale/16,
 * scale/8] (so that w = (q - z) s lies within about +-scale), in @c's
 * layout (moe_q4_layout). */
static void st_matrix_q4(const struct moe_model_config *c, uint32_t N, uint32_t K, float scale, uint64_t *seed,
			 uint8_t *dst)
{
	struct moe_q4_layout l;
	enum moe_dtype sd = c->q4_flags & MOE_Q4_BF16_SCALES ? MOE_DTYPE_BF16 : MOE_DTYPE_F16;

	moe_q4_layout(c->q4_group, c->q4_flags, N, K, &l);
	for (size_t i = 0; i < (size_t)N * K / 2; i++)
		dst[i] = (uint8_t)moe_splitmix64(seed);
	for (size_t i = 0; i < (size_t)N * l.groups; i++) {
		float v = scale / 16.0f * (1.5f + 0.5f * st_uniform(seed, 1.0f));

		moe_dtype_from_f32(sd, &v, dst + l.scales + 2 * i, 1);
		if (l.zeros)
			dst[l.zeros + i] = (uint8_t)(moe_splitmix64(seed) & 15);
	}
	if (l.perm) {
		uint32_t *perm = (uint32_t *)(void *)(dst + l.perm);

		for (uint32_t j = 0; j < K; j++)
			perm[j] = j;
		for (uint32_t j = K - 1; j > 0; j--) {   /* Fisher-Yates */
			uint32_t k = (uint32_t)(moe_splitmix64(seed) % (j + 1)), t = perm[j];

			perm[j] = perm[k];
			perm[k] = t;
		}
	}
}

/* An N x K matrix of random weights in the store's layout
 * (moe_cfg_matrix_bytes) at @dst (zeroed), FP8 and MXFP4 quantized as
 * gen-model and pack do, INT4 random in its own terms; @tmp holds N * K
 * floats. */
static void st_matrix(const struct moe_model_config *c, enum moe_dtype dt, uint32_t N, uint32_t K, float scale,
		      uint64_t *seed, float *tmp, uint8_t *dst)
{
	if (dt == MOE_DTYPE_INT4) {
		st_matrix_q4(c, N, K, scale, seed, dst);
		return;
	}
	for (size_t i = 0; i < (size_t)N * K; i++)
		tmp[i] = st_uniform(seed, scale);
	if (dt == MOE_DTYPE_MXFP4) {
		uint8_t *sc = dst + moe_mxfp4_scales_offset(N, K);

		for (size_t b = 0; b < (size_t)N * K / MOE_MXFP4_BLOCK; b++)
			sc[b] = moe_mxfp4_quantize_block(tmp + b * MOE_MXFP4_BLOCK, dst + b * (MOE_MXFP4_BLOCK / 2));
	} else if (dt == MOE_DTYPE_FP8_E4M3_B128) {
		uint64_t kb = (K + MOE_FP8_BLOCK - 1) / MOE_FP8_BLOCK;
		float *sc = (float *)(dst + moe_matrix_scales_offset(N, K));

		for (uint32_t r0 = 0; r0 < N; r0 += MOE_FP8_BLOCK)
			moe_fp8_quantize_band(tmp + (size_t)r0 * K, N - r0 < MOE_FP8_BLOCK ? N - r0 : MOE_FP8_BLOCK, K,
					      dst + (size_t)r0 * K, sc + (r0 / MOE_FP8_BLOCK) * kb);
	} else {
		moe_dtype_from_f32(dt, tmp, dst, (size_t)N * K);
	}
}

/* An expert blob as the store holds it: gate, up, down of dtype @dt, and
 * with @bias the float32 biases (routed experts of has_expert_bias). */
static void st_blob(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I, bool bias, float scale,
		    uint64_t *seed, float *tmp, uint8_t *dst)
{
	uint32_t H = c->hidden_size;
	uint64_t m = moe_cfg_matrix_bytes(c, dt, I, H);
	uint32_t nin = c->gated ? 2 : 1;

	for (uint32_t j = 0; j < nin; j++)
		st_matrix(c, dt, I, H, scale, seed, tmp, dst + j * m);
	st_matrix(c, dt, H, I, scale, seed, tmp, dst + nin * m);
	if (bias) {
		float *b = (float *)(dst + moe_expert_bias_offset(c));
		for (uint64_t i = 0; i < moe_expert_bias_count(c); i++)
			b[i] = st_uniform(seed, 4.0f);
	}
}

/* @be's own resident copy of a store blob: the blob itself unless it
 * converts (blob_prepare).  NULL: out of memory. */
static void *st_resident(struct moe_backend *be, const struct moe_model_config *c, enum moe_dtype dt, uint32_t I,
			 const void *blob)
{
	void *p;

	if (!be->ops->blob_prepare)
		return NULL;
	p = st_zalloc(be->ops->blob_bytes(c, dt, I));
	if (p)
		be->ops->blob_prepare(c, dt, I, blob, p);
	return p;
}

static int st_run(struct moe_backend *be, struct moe_backend *cpu, const struct st_case *sc, uint32_t layer,
		  bool fault, struct moe_err *err)
{
	const struct moe_model_config *c = &sc->cfg;
	const uint32_t H = c->hidden_size, I = c->moe_intermediate_size, E = c->num_experts, K = c->top_k;
	const uint32_t Is = c->shared_intermediate_size;
	const size_t nmax = ST_TOKENS;
	uint64_t eb = moe_expert_bytes(c), sb = moe_shared_bytes(c);
	uint64_t seed = 0x5e1f7e57 + layer;
	float *router, *bias, *sgate, *x, *y0, *y1, *w0, *w1, *tmp;
	int32_t *i0, *i1;
	uint8_t **blobs;
	void **cpu_res, **be_res;
	const void **cp, **bp;
	size_t big = (size_t)(I > Is ? I : Is) * H;
	int r = -ENOMEM;

	router = calloc((size_t)E * H, sizeof(float));
	bias = calloc(E, sizeof(float));
	sgate = calloc(H, sizeof(float));
	x = malloc(nmax * H * sizeof(float));
	y0 = malloc(nmax * H * sizeof(float));
	y1 = malloc(nmax * H * sizeof(float));
	w0 = malloc(nmax * K * sizeof(float));
	w1 = malloc(nmax * K * sizeof(float));
	i0 = malloc(nmax * K * sizeof(int32_t));
	i1 = malloc(nmax * K * sizeof(int32_t));
	tmp = malloc(big * sizeof(float));
	/* E routed experts and the shared one at [E] */
	blobs = calloc(E + 1, sizeof(*blobs));
	cpu_res = calloc(E + 1, sizeof(*cpu_res));
	be_res = calloc(E + 1, sizeof(*be_res));
	cp = calloc(E + 1, sizeof(*cp));
	bp = calloc(E + 1, sizeof(*bp));
	if (!router || !bias || !sgate || !x || !y0 || !y1 || !w0 || !w1 || !i0 || !i1 || !tmp || !blobs || !cpu_res ||
	    !be_res || !cp || !bp)
		goto nomem;
	for (size_t i = 0; i < (size_t)E * H; i++)
		router[i] = st_uniform(&seed, 0.1f);
	for (uint32_t e = 0; e < E; e++)
		bias[e] = st_uniform(&seed, c->arch == MOE_ARCH_GPT_OSS ? 0.5f : 0.01f);
	for (uint32_t i = 0; i < H; i++)
		sgate[i] = st_uniform(&seed, 0.1f);
	for (size_t i = 0; i < nmax * H; i++)
		x[i] = st_uniform(&seed, 1.0f);
	for (size_t t = 0; t < nmax; t++)
		x[t * H] = 4.0f;                  /* with router[0][0] = 2: expert 0 for all */
	router[0] = 2.0f;
	for (uint32_t e = 0; e <= E; e++) {
		bool sh = e == E;
		enum moe_dtype dt = sh ? c->shared_dtype : c->weight_dtype;
		uint32_t inter = sh ? Is : I;

		if (sh && !Is)
			break;
		if (!(blobs[e] = st_zalloc(sh ? sb : eb)))
			goto nomem;
		st_blob(c, dt, inter, !sh && c->has_expert_bias, sc->w_scale, &seed, tmp, blobs[e]);
		cpu_res[e] = st_resident(cpu, c, dt, inter, blobs[e]);
		be_res[e] = st_resident(be, c, dt, inter, blobs[e]);
		if (!cpu_res[e] || (be->ops->blob_prepare && !be_res[e]))
			goto nomem;
		cp[e] = cpu_res[e];
		bp[e] = be_res[e] ? be_res[e] : blobs[e];
	}
	for (size_t n = 3; n <= nmax; n += nmax - 3) {
		struct moe_layer_weights lc = { .cfg = c, .layer = layer, .router = router, .experts = cp,
						.bias = c->has_bias ? bias : NULL,
						.shared_gate = c->shared_gate ? sgate : NULL, .shared = Is ? cp[E] : NULL };
		struct moe_layer_weights lb = lc;

		lb.experts = bp;
		lb.shared = Is ? bp[E] : NULL;
		if ((r = cpu->ops->route(cpu, &lc, x, n, i0, w0, 0)) < 0 ||
		    (r = cpu->ops->experts(cpu, &lc, x, n, K, i0, w0, y0, 0)) < 0) {
			r = moe_err_set(err, r, "self-test (%s): the CPU backend failed: %s", sc->what, strerror(-r));
			goto out;
		}
		if ((r = be->ops->route(be, &lb, x, n, i1, w1, 0)) < 0 ||
		    (r = be->ops->experts(be, &lb, x, n, K, i1, w1, y1, 0)) < 0) {
			r = moe_err_set(err, r, "self-test (%s): the %s backend failed on %zu tokens: %s", sc->what,
					be->ops->name, n, strerror(-r));
			goto out;
		}
		if (fault) {
			/* a tenth of the last token's norm, whatever its scale */
			double s = 0;
			for (uint32_t h = 0; h < H; h++)
				s += (double)y1[(n - 1) * H + h] * y1[(n - 1) * H + h];
			y1[(n - 1) * H] += (float)(0.1 * sqrt(s)) + 1.0f;
		}
		for (size_t t = 0; t < n; t++) {
			double d = 0, s = 0;

			for (uint32_t j = 0; j < K; j++)
				if (i0[t * K + j] != i1[t * K + j] ||
				    fabsf(w0[t * K + j] - w1[t * K + j]) > 1e-5f * fabsf(w0[t * K + j])) {
					r = moe_err_set(err, -EIO, "self-test (%s): the %s backend routes token %zu of %zu "
							"to expert %d (weight %g), the CPU to %d (weight %g)", sc->what,
							be->ops->name, t, n, i1[t * K + j], (double)w1[t * K + j],
							i0[t * K + j], (double)w0[t * K + j]);
					goto out;
				}
			for (uint32_t h = 0; h < H; h++) {
				double a = y0[t * H + h], b = y1[t * H + h];

				d += (a - b) * (a - b);
				s += a * a;
			}
			if (!(d <= 1e-6 * s)) {
				r = moe_err_set(err, -EIO, "self-test (%s): the %s backend's output of token %zu of %zu "
						"is %.2g from the CPU backend's (relative L2; at most 1e-3)", sc->what,
						be->ops->name, t, n, sqrt(d / (s > 0 ? s : 1)));
				goto out;
			}
		}
	}
	r = 0;
	goto out;
nomem:
	r = moe_err_set(err, -ENOMEM, "out of memory");
out:
	for (uint32_t e = 0; e <= E && blobs; e++) {
		free(blobs[e]);
		free(cpu_res ? cpu_res[e] : NULL);
		free(be_res ? be_res[e] : NULL);
	}
	free(blobs);
	free(cpu_res);
	free(be_res);
	free(cp);
	free(bp);
	free(router);
	free(bias);
	free(sgate);
	free(x);
	free(y0);
	free(y1);
	free(w0);
	free(w1);
	free(i0);
	free(i1);
	free(tmp);
	return r;
}

static bool st_uses(const struct moe_model_config *c, enum moe_dtype dt)
{
	return c->weight_dtype == dt || (c->shared_intermediate_size && c->shared_dtype == dt);
}

/* The self-test cases @model needs, as a mask of st_cases indices (all
 * with NULL): a case of FP8, MXFP4 or INT4 weights only for a model that
 * reads that dtype, a gpt_oss case only for gpt_oss; the plain ones
 * always. */
static uint32_t st_needed(const struct moe_model_config *model)
{
	/* the dtypes whose cases only their models run */
	static const enum moe_dtype only[] = { MOE_DTYPE_FP8_E4M3_B128, MOE_DTYPE_MXFP4, MOE_DTYPE_INT4 };
	uint32_t mask = 0;

	_Static_assert(sizeof(st_cases) / sizeof(st_cases[0]) <= 32, "self-test cases fit a mask");
	for (uint32_t i = 0; i < sizeof(st_cases) / sizeof(st_cases[0]); i++) {
		const struct moe_model_config *c = &st_cases[i].cfg;
		bool skip = false;

		for (size_t d = 0; d < sizeof(only) / sizeof(only[0]); d++)
			if (model && st_uses(c, only[d]) && !st_uses(model, only[d]))
				skip = true;
		if (skip)
			continue;
		if (model && c->arch == MOE_ARCH_GPT_OSS && model->arch != MOE_ARCH_GPT_OSS)
			continue;
		mask |= 1u << i;
	}
	return mask;
}

static int st_run_mask(struct moe_backend *be, uint32_t mask, struct moe_err *err)
{
	const char *fault = getenv("MOE_BACKEND_SELFTEST_FAULT");
	struct moe_backend_options o = { .threads = 1 };
	struct moe_backend *cpu = NULL;
	int r;

	r = backend_start(&moe_backend_cpu_ops, NULL, &o, &cpu, err);
	if (r < 0)
		return r;
	for (uint32_t i = 0; i < sizeof(st_cases) / sizeof(st_cases[0]) && r == 0; i++)
		if (mask & (1u << i))
			r = st_run(be, cpu, &st_cases[i], i,
				   fault && (!strcmp(fault, "1") || strstr(st_cases[i].what, fault)), err);
	moe_backend_close(cpu);
	return r;
}

int moe_backend_selftest_model(struct moe_backend *be, const struct moe_model_config *model,
			       struct moe_err *err)
{
	return st_run_mask(be, st_needed(model), err);
}

int moe_backend_selftest(struct moe_backend *be, struct moe_err *err)
{
	return moe_backend_selftest_model(be, NULL, err);
}

int moe_backend_open(const char *name, const struct moe_backend_options *opt,
		     struct moe_backend **ret, struct moe_err *err)
{
	struct moe_err why = { 0 };
	int r;

	if (!name || !strcmp(name, "auto")) {
		r = cuda_open_checked(opt, ret, &why);
		if (r == 0)
			return 0;
		r = backend_start(&moe_backend_cpu_ops, NULL, opt, ret, err);
		if (r == 0)
			snprintf((*ret)->reason, sizeof((*ret)->reason), "%s", why.msg);
		return r;
	}
	if (!strcmp(name, "cpu"))
		return backend_start(&moe_backend_cpu_ops, NULL, opt, ret, err);
	if (!strcmp(name, "cuda"))
		return cuda_open_checked(opt, ret, err);
	return moe_err_set(err, -EINVAL, "unknown backend '%s' (use auto, cpu or cuda)", name);
}

void moe_backend_close(struct moe_backend *be)
{
	if (!be)
		return;
	be->ops->fini(be);
	if (be->handle)
		dlclose(be->handle);
	free(be);
}
