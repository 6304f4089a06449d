/* SPDX-License-Identifier: MIT */
/*
 * A backend module built wrong on purpose, for check_module: its ABI
 * version is off by FAKE_ABI_DELTA, its ops table's size by
 * FAKE_SIZE_DELTA, or (FAKE_UNVERSIONED) it exports only its ops table, as
 * modules did before they carried a version.  The engine must refuse it
 * before it calls anything in it: every op aborts.
 */
#include "config.h"

#include <stdlib.h>

#include "engine/backend.h"

#ifndef FAKE_ABI_DELTA
#define FAKE_ABI_DELTA 0
#endif
#ifndef FAKE_SIZE_DELTA
#define FAKE_SIZE_DELTA 0
#endif

static int fake_init(struct moe_backend *be, const struct moe_backend_options *opt,
		     struct moe_err *err)
{
	(void)be;
	(void)opt;
	(void)err;
	abort();        /* a refused module is never called */
}

static void fake_fini(struct moe_backend *be)
{
	(void)be;
	abort();
}

#ifdef FAKE_UNVERSIONED
__attribute__((visibility("default")))
const struct moe_backend_ops moe_backend_module_ops = {
	.name = "fake",
	.init = fake_init,
	.fini = fake_fini,
};
#else
static const struct moe_backend_ops fake_ops = {
	.name = "fake",
	.init = fake_init,
	.fini = fake_fini,
};

__attribute__((visibility("default")))
const struct moe_backend_module moe_backend_module = {
	.abi_version = MOE_BACKEND_ABI_VERSION + FAKE_ABI_DELTA,
	.ops_size = sizeof(struct moe_backend_ops) + FAKE_SIZE_DELTA,
	.ops = &fake_ops,
};
#endif
