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

/*
 * What the kernels here do not compute: gpt_oss's expert biases and clamped
 * SwiGLU (the streaming kernels and the cuBLAS path apply act(gate) * up
 * and no bias).  Such a model is refused at init, before anything is
 * served, so that "auto" falls back to the CPU backend with this reason
 * and "cuda" fails with it; never a wrong answer.
 */
static bool model_unsupported(const struct moe_model_config *m, char *why, size_t len)
{
	if (!m || (!m->has_expert_bias && m->act != MOE_ACT_SWIGLU_OAI))
		return false;
	/* the module does not link the engine: no moe_arch_name() here */
	snprintf(why, len, "the CUDA backend does not compute %s experts yet (expert biases, clamped "
		 "SwiGLU): use the CPU backend", m->arch == MOE_ARCH_GPT_OSS ? "gpt_oss" : "these");
	return true;
}

static int cuda_init(struct moe_backend *be, const struct moe_backend_options *opt,
		     struct moe_err *err)
{
	char why[256] = "";
	int r;

	if (opt && model_unsupported(opt->model, why, sizeof(why))) {
		r = -ENOTSUP;
	} else if (!be) {
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

static const struct moe_backend_ops cuda_ops = {
	.name = "cuda",
	.init = cuda_init,
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
