/* SPDX-License-Identifier: MIT */
/*
 * The CUDA backend, built as a module that the engine opens at run time
 * (dlopen), so that moed and moectl run where the CUDA libraries or the
 * driver are missing.  It exports one symbol, moe_backend_module: its ops
 * and the ABI they were built for, which the engine checks before it calls
 * any.  The work is in device.cu and the files it names.
 */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>

#include "engine/backend.h"
#include "cuda.h"

static int cuda_init(struct moe_backend *be, const struct moe_backend_options *opt,
		     struct moe_err *err)
{
	char why[256] = "";
	int r;

	if (!be) {
		/* asked only why it cannot serve */
		r = moe_cuda_probe(why, sizeof(why));
		if (r >= 0) {
			snprintf(why, sizeof(why), "CUDA device %d is usable", r);
			r = 0;
		}
	} else {
		r = moe_cuda_init(be, opt, why, sizeof(why));
	}
	if (r < 0 && err) {
		snprintf(err->msg, sizeof(err->msg), "%s", why);
		err->code = r;
	}
	return r;
}

static int refuse(struct moe_err *err, const char *why)
{
	if (err) {
		snprintf(err->msg, sizeof(err->msg), "%s", why);
		err->code = -ENOTSUP;
	}
	return -ENOTSUP;
}

/* The dtypes the kernels of launch.cu read: an allowlist, so that a dtype
 * added to the store later is refused here until it has kernels. */
static bool cuda_dtype_ok(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_F32:
	case MOE_DTYPE_BF16:
	case MOE_DTYPE_F16:
	case MOE_DTYPE_FP8_E4M3_B128:
	case MOE_DTYPE_MXFP4:
	case MOE_DTYPE_INT4:
		return true;
	default:
		return false;
	}
}

/*
 * What the kernels here do not compute, refused before the device is
 * touched, so that "auto" serves the model on the CPU with this reason and
 * "cuda" fails with it; never a wrong answer: expert weights (routed or
 * shared) of a dtype not in cuda_dtype_ok.  Everything else the store
 * holds is computed: every architecture's routing (router_sel.h), gpt_oss's
 * expert biases and clamped SwiGLU, FP8 block-scaled, MXFP4 and INT4
 * (GPTQ, AWQ, compressed-tensors) experts, a shared expert in another
 * dtype than the routed ones.
 * No engine symbol here (the module links none).
 */
static int cuda_supports(const struct moe_model_config *cfg, struct moe_err *err)
{
	char why[256];
	bool sh = cfg->shared_intermediate_size != 0;

	if (!cuda_dtype_ok(cfg->weight_dtype) || (sh && !cuda_dtype_ok(cfg->shared_dtype))) {
		enum moe_dtype bad = cuda_dtype_ok(cfg->weight_dtype) ? cfg->shared_dtype : cfg->weight_dtype;

		snprintf(why, sizeof(why), "the CUDA backend has no kernels for %s expert weights of dtype %d, "
			 "unknown to this build (it computes f32, bf16, f16, fp8_e4m3_b128, mxfp4 and int4): use the "
			 "CPU backend, or a moed built with this store's version",
			 cuda_dtype_ok(cfg->weight_dtype) ? "shared" : "routed", (int)bad);
		return refuse(err, why);
	}
	return 0;
}

static const struct moe_backend_ops cuda_ops = {
	.name = "cuda",
	.init = cuda_init,
	.supports = cuda_supports,
	.fini = moe_cuda_fini,
	.route = moe_cuda_route,
	.experts = moe_cuda_experts,
	.experts_begin = moe_cuda_experts_begin,
	.experts_run = moe_cuda_experts_run,
	.experts_end = moe_cuda_experts_end,
	.host_register = moe_cuda_host_register,
	.host_unregister = moe_cuda_host_unregister,
	.ipc_open = moe_cuda_ipc_open,
	.ipc_close = moe_cuda_ipc_close,
};

__attribute__((visibility("default")))
const struct moe_backend_module moe_backend_module = {
	.abi_version = MOE_BACKEND_ABI_VERSION,
	.ops_size = sizeof(struct moe_backend_ops),
	.ops = &cuda_ops,
};
