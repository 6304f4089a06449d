/* SPDX-License-Identifier: MIT */
/*
 * The CUDA backend, built as a module that the engine opens at run time
 * (dlopen), so that moed and moectl run where the CUDA libraries or the
 * driver are missing.  It exports one symbol: moe_backend_module_ops.
 *
 * This version finds the device; the compute entries (route, experts) are
 * filled by the CUDA backend issue.  Until then init reports why it cannot
 * serve, and "auto" falls back to the CPU backend.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>

#include "backend.h"
#include "cuda.h"

static int cuda_init(struct moe_backend *be, const struct moe_backend_options *opt,
		     struct moe_err *err)
{
	char why[256] = "";
	int dev;

	(void)be;
	(void)opt;
	dev = moe_cuda_probe(why, sizeof(why));
	if (dev < 0) {
		if (err) {
			snprintf(err->msg, sizeof(err->msg), "%s", why);
			err->code = dev;
		}
		return dev;
	}
	if (err) {
		snprintf(err->msg, sizeof(err->msg),
			 "CUDA device %d found, but this build's CUDA backend has no compute kernels yet",
			 dev);
		err->code = -ENOTSUP;
	}
	return -ENOTSUP;
}

static void cuda_fini(struct moe_backend *be)
{
	(void)be;
}

__attribute__((visibility("default")))
const struct moe_backend_ops moe_backend_module_ops = {
	.name = "cuda",
	.init = cuda_init,
	.fini = cuda_fini,
	.route = NULL,
	.experts = NULL,
};
