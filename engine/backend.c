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
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
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

/* The CUDA backend, once it has passed the self-test on a throwaway
 * instance (so that the test leaves no state in the one that serves); once
 * per process: the device does not change under it. */
static int cuda_open_checked(const struct moe_backend_options *opt, struct moe_backend **ret,
			     struct moe_err *err)
{
	static bool passed;
	struct moe_backend_options small = opt ? *opt : (struct moe_backend_options){ 0 };
	struct moe_backend *be;
	int r;

	if (__atomic_load_n(&passed, __ATOMIC_ACQUIRE))
		return cuda_open(opt, ret, err);
	small.device_bytes = 64u << 20;
	r = cuda_open(&small, &be, err);
	if (r < 0)
		return r;
	r = moe_backend_selftest(be, err);
	moe_backend_close(be);
	if (r < 0)
		return r;
	__atomic_store_n(&passed, true, __ATOMIC_RELEASE);
	return cuda_open(opt, ret, err);
}

/* ------------------------------------------------------------------ self-test */

/*
 * A small layer run through @be and through the CPU backend: every token's
 * experts must agree and its output be within a relative L2 of 1e-3.  A
 * backend that has never been checked on this machine's device (a new GPU,
 * a new driver) proves itself before it serves.  Expert 0 takes every
 * token, so that a large batch reaches the products of many tokens per
 * expert (the CUDA backend's cuBLAS path) as well as the small ones.
 * MOE_BACKEND_SELFTEST_FAULT=1 perturbs @be's output (tests).
 */
#define ST_H 256
#define ST_I 128
#define ST_E 8
#define ST_K 2
#define ST_TOKENS 200

static float st_uniform(uint64_t *s, float scale)
{
	return scale * (float)((double)(moe_splitmix64(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

int moe_backend_selftest(struct moe_backend *be, struct moe_err *err)
{
	const struct moe_model_config cfg = {
		.arch = MOE_ARCH_QWEN3_MOE, .hidden_size = ST_H, .moe_intermediate_size = ST_I,
		.num_experts = ST_E, .top_k = ST_K, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY, .norm_topk_prob = true,
		.gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f, .weight_dtype = MOE_DTYPE_BF16,
		.shared_dtype = MOE_DTYPE_BF16,
	};
	const size_t eb = 3 * (size_t)ST_H * ST_I * 2;
	const bool fault = getenv("MOE_BACKEND_SELFTEST_FAULT") && !strcmp(getenv("MOE_BACKEND_SELFTEST_FAULT"), "1");
	struct moe_backend_options o = { .threads = 1 };
	struct moe_backend *cpu = NULL;
	float *router = NULL, *x = NULL, *y0 = NULL, *y1 = NULL, *w0 = NULL, *w1 = NULL;
	int32_t *i0 = NULL, *i1 = NULL;
	uint16_t *blobs = NULL;
	void *packed[ST_E] = { NULL }, *bpacked[ST_E] = { NULL };
	const void *bp[ST_E], *pp[ST_E];
	uint64_t seed = 0x5e1f7e57;
	int r;

	r = backend_start(&moe_backend_cpu_ops, NULL, &o, &cpu, err);
	if (r < 0)
		return r;
	router = calloc((size_t)ST_E * ST_H, sizeof(float));
	x = malloc((size_t)ST_TOKENS * ST_H * sizeof(float));
	y0 = malloc((size_t)ST_TOKENS * ST_H * sizeof(float));
	y1 = malloc((size_t)ST_TOKENS * ST_H * sizeof(float));
	w0 = malloc((size_t)ST_TOKENS * ST_K * sizeof(float));
	w1 = malloc((size_t)ST_TOKENS * ST_K * sizeof(float));
	i0 = malloc((size_t)ST_TOKENS * ST_K * sizeof(int32_t));
	i1 = malloc((size_t)ST_TOKENS * ST_K * sizeof(int32_t));
	blobs = malloc(ST_E * eb);
	if (!router || !x || !y0 || !y1 || !w0 || !w1 || !i0 || !i1 || !blobs) {
		r = moe_err_set(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < (size_t)ST_E * ST_H; i++)
		router[i] = st_uniform(&seed, 0.1f);
	for (size_t i = 0; i < (size_t)ST_TOKENS * ST_H; i++)
		x[i] = st_uniform(&seed, 1.0f);
	for (size_t t = 0; t < ST_TOKENS; t++)
		x[t * ST_H] = 4.0f;               /* with router[0][0] = 2: expert 0 for all */
	router[0] = 2.0f;
	for (size_t i = 0; i < ST_E * eb / 2; i++)
		blobs[i] = moe_f32_to_bf16(st_uniform(&seed, 0.0625f));
	for (uint32_t e = 0; e < ST_E; e++) {
		bp[e] = (const uint8_t *)blobs + e * eb;
		packed[e] = malloc(cpu->ops->blob_bytes(&cfg, cfg.weight_dtype, ST_I));
		if (!packed[e]) {
			r = moe_err_set(err, -ENOMEM, "out of memory");
			goto out;
		}
		cpu->ops->blob_prepare(&cfg, cfg.weight_dtype, ST_I, bp[e], packed[e]);
		pp[e] = packed[e];
		if (be->ops->blob_prepare) {
			/* @be's own resident layout, if it has one */
			bpacked[e] = malloc(be->ops->blob_bytes(&cfg, cfg.weight_dtype, ST_I));
			if (!bpacked[e]) {
				r = moe_err_set(err, -ENOMEM, "out of memory");
				goto out;
			}
			be->ops->blob_prepare(&cfg, cfg.weight_dtype, ST_I, (const uint8_t *)blobs + e * eb, bpacked[e]);
			bp[e] = bpacked[e];
		}
	}
	for (size_t n = 3; n <= ST_TOKENS; n += ST_TOKENS - 3) {
		struct moe_layer_weights lc = { .cfg = &cfg, .layer = 0, .router = router, .experts = pp };
		struct moe_layer_weights lb = { .cfg = &cfg, .layer = 0, .router = router, .experts = bp };

		if ((r = cpu->ops->route(cpu, &lc, x, n, i0, w0, 0)) < 0 ||
		    (r = cpu->ops->experts(cpu, &lc, x, n, ST_K, i0, w0, y0, 0)) < 0) {
			r = moe_err_set(err, r, "self-test: the CPU backend failed: %s", strerror(-r));
			goto out;
		}
		if ((r = be->ops->route(be, &lb, x, n, i1, w1, 0)) < 0 ||
		    (r = be->ops->experts(be, &lb, x, n, ST_K, i1, w1, y1, 0)) < 0) {
			r = moe_err_set(err, r, "self-test: the %s backend failed on %zu tokens: %s", be->ops->name, n,
					strerror(-r));
			goto out;
		}
		if (fault)
			y1[(n - 1) * ST_H] += 1.0f;
		for (size_t t = 0; t < n; t++) {
			double d = 0, s = 0;

			for (uint32_t j = 0; j < ST_K; j++)
				if (i0[t * ST_K + j] != i1[t * ST_K + j] ||
				    fabsf(w0[t * ST_K + j] - w1[t * ST_K + j]) > 1e-5f * fabsf(w0[t * ST_K + j])) {
					r = moe_err_set(err, -EIO, "self-test: the %s backend routes token %zu of %zu to "
							"expert %d (weight %g), the CPU to %d (weight %g)", be->ops->name,
							t, n, i1[t * ST_K + j], (double)w1[t * ST_K + j],
							i0[t * ST_K + j], (double)w0[t * ST_K + j]);
					goto out;
				}
			for (uint32_t h = 0; h < ST_H; h++) {
				double a = y0[t * ST_H + h], b = y1[t * ST_H + h];

				d += (a - b) * (a - b);
				s += a * a;
			}
			if (!(d <= 1e-6 * s)) {
				r = moe_err_set(err, -EIO, "self-test: the %s backend's output of token %zu of %zu is %.2g "
						"from the CPU backend's (relative L2; at most 1e-3)", be->ops->name, t, n,
						sqrt(d / (s > 0 ? s : 1)));
				goto out;
			}
		}
	}
	r = 0;
out:
	for (uint32_t e = 0; e < ST_E; e++) {
		free(packed[e]);
		free(bpacked[e]);
	}
	free(router);
	free(x);
	free(y0);
	free(y1);
	free(w0);
	free(w1);
	free(i0);
	free(i1);
	free(blobs);
	moe_backend_close(cpu);
	return r;
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
