/* SPDX-License-Identifier: MIT */
/*
 * gpu_client SOCKET: hidden states in GPU memory through moed
 * (moe_client_forward_cuda), run by gpu_daemon.sh against a moed on the
 * CUDA backend.  For batches of 1, 7, 64 and 300 tokens of each MoE layer:
 * the output and routing equal those of moe_client_forward() on the same
 * tokens from host memory, bit for bit (both run alone here); a pointer
 * outside the registered regions is refused with -EFAULT, also after
 * unregistering.  Exit 0 pass, 1 fail, 77 skip (no device, or moed is not
 * on the CUDA backend).
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wundef"
#include <cuda_runtime.h>
#pragma GCC diagnostic pop

#include "libmoeclient/moeclient.h"

#define MAX_T 300

static int fail(const char *fmt, const char *a, long b, long c)
{
	fprintf(stderr, "FAIL: ");
	fprintf(stderr, fmt, a, b, c);
	fputc('\n', stderr);
	return 1;
}

int main(int argc, char **argv)
{
	static const uint64_t sizes[] = { 1, 7, 64, MAX_T };
	struct moe_model_info info;
	struct moe_client *c;
	float *hx, *hy, *hy2, *dx, *dy, *hw, *hw2;
	int32_t *hid, *hid2;
	uint32_t rx, ry;
	uint64_t seed = 12345, H, k;
	int n = 0, r;

	if (argc != 2) {
		fprintf(stderr, "usage: gpu_client SOCKET\n");
		return 2;
	}
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		printf("SKIP: no CUDA device\n");
		return 77;
	}
	r = moe_client_connect(argv[1], NULL, &c);
	if (r < 0)
		return fail("connect to %s: %ld", argv[1], r, 0);
	moe_client_info(c, &info);
	if (strcmp(info.backend, "cuda")) {
		printf("SKIP: moed runs on the %s backend\n", info.backend);
		moe_client_disconnect(c);
		return 77;
	}
	H = info.hidden_size;
	k = info.top_k;
	hx = malloc(MAX_T * H * 4);
	hy = malloc(MAX_T * H * 4);
	hy2 = malloc(MAX_T * H * 4);
	hid = malloc(MAX_T * k * 4);
	hid2 = malloc(MAX_T * k * 4);
	hw = malloc(MAX_T * k * 4);
	hw2 = malloc(MAX_T * k * 4);
	if (!hx || !hy || !hy2 || !hid || !hid2 || !hw || !hw2)
		return fail("out of memory%s%ld%ld", "", 0, 0);
	for (uint64_t i = 0; i < MAX_T * H; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		hx[i] = (float)((double)(seed >> 40) / (double)(1u << 23) - 1.0);
	}
	if (cudaMalloc((void **)&dx, MAX_T * H * 4) != cudaSuccess ||
	    cudaMalloc((void **)&dy, MAX_T * H * 4) != cudaSuccess ||
	    cudaMemcpy(dx, hx, MAX_T * H * 4, cudaMemcpyHostToDevice) != cudaSuccess)
		return fail("cudaMalloc/cudaMemcpy%s%ld%ld", "", 0, 0);
	if ((r = moe_client_cuda_register(c, dx, MAX_T * H * 4, &rx)) < 0 ||
	    (r = moe_client_cuda_register(c, dy, MAX_T * H * 4, &ry)) < 0)
		return fail("moe_client_cuda_register: %s%ld%ld", moe_strerror(r), 0, 0);
	for (uint32_t li = 0; li < info.num_moe_layers; li++) {
		uint32_t layer = info.moe_layers[li];

		for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
			uint64_t T = sizes[si];

			cudaMemset(dy, 0xff, T * H * 4);
			r = moe_client_forward_cuda(c, layer, dx, dy, T, hid, hw);
			if (r < 0)
				return fail("forward_cuda: %s (layer %ld, %ld tokens)", moe_strerror(r), layer, (long)T);
			if (cudaMemcpy(hy, dy, T * H * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
				return fail("cudaMemcpy%s%ld%ld", "", 0, 0);
			r = moe_client_forward(c, layer, MOE_F32, hx, hy2, T, hid2, hw2);
			if (r < 0)
				return fail("forward: %s (layer %ld, %ld tokens)", moe_strerror(r), layer, (long)T);
			if (memcmp(hy, hy2, T * H * 4))
				return fail("%s (layer %ld, %ld tokens)", "the output from GPU memory differs from the host's",
					    layer, (long)T);
			if (memcmp(hid, hid2, T * k * 4) || memcmp(hw, hw2, T * k * 4))
				return fail("%s (layer %ld, %ld tokens)", "the routing from GPU memory differs", layer,
					    (long)T);
		}
	}
	/* outside the regions, and after unregistering */
	if ((r = moe_client_forward_cuda(c, info.moe_layers[0], dx + MAX_T * H - 1, dy, 1, NULL, NULL)) != -EFAULT)
		return fail("a range past the region gave %s%ld%ld", moe_strerror(r), 0, 0);
	if ((r = moe_client_forward_cuda(c, info.moe_layers[0], hx, dy, 1, NULL, NULL)) != -EFAULT)
		return fail("host memory as device input gave %s%ld%ld", moe_strerror(r), 0, 0);
	if ((r = moe_client_cuda_unregister(c, rx)) < 0)
		return fail("unregister: %s%ld%ld", moe_strerror(r), 0, 0);
	if ((r = moe_client_forward_cuda(c, info.moe_layers[0], dx, dy, 1, NULL, NULL)) != -EFAULT)
		return fail("an unregistered input gave %s%ld%ld", moe_strerror(r), 0, 0);
	moe_client_cuda_unregister(c, ry);
	moe_client_disconnect(c);
	cudaFree(dx);
	cudaFree(dy);
	printf("PASS: %u layers, batches 1..%d from GPU memory match host memory bit for bit\n",
	       info.num_moe_layers, MAX_T);
	return 0;
}
