/* SPDX-License-Identifier: MIT */
/*
 * The CUDA backend, as far as this build has one.
 *
 * Without a usable device (no driver, no GPU, or a module without compute
 * kernels) "auto" must fall back to the CPU backend and say why, "cuda"
 * must fail with that reason, and the test exits 77 (skip): nothing here
 * can be checked on a device.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

int main(void)
{
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	int r;

	r = moe_backend_open("auto", NULL, &be, &err);
	if (r < 0) {
		fprintf(stderr, "FAIL: auto backend did not open: %s\n", err.msg);
		return 1;
	}
	if (strcmp(be->ops->name, "cpu") == 0) {
		if (!be->reason[0]) {
			fprintf(stderr, "FAIL: auto fell back to the CPU without saying why\n");
			moe_backend_close(be);
			return 1;
		}
		printf("auto -> cpu: %s\n", be->reason);
	}
	moe_backend_close(be);

	r = moe_backend_open("cuda", NULL, &be, &err);
	if (r < 0) {
		if (!err.msg[0]) {
			fprintf(stderr, "FAIL: cuda backend failed (%d) without a reason\n", r);
			return 1;
		}
		printf("SKIP: %s\n", err.msg);
		return 77;
	}
	/* A device and kernels: the CUDA backend issue adds the comparisons
	 * against the CPU backend here. */
	printf("cuda backend opened: %s\n", be->ops->name);
	moe_backend_close(be);
	return 0;
}
