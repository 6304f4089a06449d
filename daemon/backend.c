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
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

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

static int cuda_open(const struct moe_backend_options *opt, struct moe_backend **ret,
		     struct moe_err *err)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	const struct moe_backend_ops *ops;
	char path[PATH_MAX];
	void *h;
	int r;

	if (!dir || !*dir)
		dir = MOE_BACKEND_DIR;
	snprintf(path, sizeof(path), "%s/%s", dir, CUDA_MODULE);
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return moe_err_set(err, -ENODEV, "CUDA backend not available: %s", dlerror());
	ops = dlsym(h, "moe_backend_module_ops");
	if (!ops || !ops->init || !ops->fini) {
		dlclose(h);
		return moe_err_set(err, -ENODEV, "%s is not a moed backend module", path);
	}
	if (!ops->route || !ops->experts) {
		/* let the module say why it cannot serve (no device, no kernels) */
		struct moe_err why = { 0 };
		r = ops->init(NULL, opt, &why);
		dlclose(h);
		return moe_err_set(err, r < 0 ? r : -ENOTSUP, "%s",
				   why.msg[0] ? why.msg : "the CUDA backend cannot compute here");
	}
	r = backend_start(ops, h, opt, ret, err);
	if (r < 0)
		dlclose(h);
	return r;
}

int moe_backend_open(const char *name, const struct moe_backend_options *opt,
		     struct moe_backend **ret, struct moe_err *err)
{
	struct moe_err why = { 0 };
	int r;

	if (!name || !strcmp(name, "auto")) {
		r = cuda_open(opt, ret, &why);
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
		return cuda_open(opt, ret, err);
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
