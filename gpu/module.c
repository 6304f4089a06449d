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

/*
 * What the kernels here do not compute, refused before the device is
 * touched, so that "auto" serves the model on the CPU with this reason and
 * "cuda" fails with it; never a wrong answer:
 *  - gpt_oss's expert biases and clamped SwiGLU (the streaming kernels and
 *    the cuBLAS path apply act(gate) * up and no bias);
 *  - any weight dtype but f32, bf16 and f16 (FP8, int4), and a shared
 *    expert in another dtype than the routed ones: the
 *    kernels of launch.cu read every expert, the shared one too, as
 *    weight_dtype elements of 4 or 2 bytes.
 * No engine symbol here (the module links none): names written out.
 */
static bool plain_dtype(enum moe_dtype t)
{
	return t == MOE_DTYPE_F32 || t == MOE_DTYPE_BF16 || t == MOE_DTYPE_F16;
}

/* The name of a dtype for the message (no engine symbol: written out). */
static const char *dtype_word(enum moe_dtype t)
{
	switch (t) {
	case MOE_DTYPE_FP8_E4M3_B128: return "FP8 (fp8_e4m3_b128)";
	case MOE_DTYPE_INT4: return "int4 (GPTQ, AWQ, compressed-tensors)";
	default: return "these";
	}
}

static int cuda_supports(const struct moe_model_config *cfg, struct moe_err *err)
{
	char why[256];

	if (cfg->has_expert_bias || cfg->act == MOE_ACT_SWIGLU_OAI) {
		snprintf(why, sizeof(why), "the CUDA backend does not compute %s experts yet (expert "
			 "biases, clamped SwiGLU): use the CPU backend",
			 cfg->arch == MOE_ARCH_GPT_OSS ? "gpt_oss" : "these");
		return refuse(err, why);
	}
	/* an allowlist: a dtype added to the engine stays on the CPU until
	 * kernels here read it */
	if (!plain_dtype(cfg->weight_dtype) ||
	    (cfg->shared_intermediate_size && !plain_dtype(cfg->shared_dtype))) {
		snprintf(why, sizeof(why), "the CUDA backend has no kernels for %s expert weights yet "
			 "(it reads f32, bf16 and f16; the CPU backend serves them; moectl pack --dtype "
			 "bf16 dequantizes the checkpoint for the GPU)",
			 !plain_dtype(cfg->weight_dtype) ? dtype_word(cfg->weight_dtype)
							 : dtype_word(cfg->shared_dtype));
		return refuse(err, why);
	}
	if (cfg->shared_intermediate_size && cfg->shared_dtype != cfg->weight_dtype) {
		snprintf(why, sizeof(why), "the CUDA backend needs the shared expert in the routed "
			 "experts' dtype (%d, not %d)", (int)cfg->weight_dtype, (int)cfg->shared_dtype);
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
