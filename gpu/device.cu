// SPDX-License-Identifier: MIT
// The CUDA side of the CUDA backend: device discovery.  The kernels (routing,
// grouped expert GEMMs, combine) come with the CUDA backend issue.
#include <errno.h>
#include <stdio.h>

#include <cuda_runtime.h>

#include "cuda.h"

extern "C" int moe_cuda_probe(char *why, size_t why_len)
{
	int n = 0;
	cudaError_t rc = cudaGetDeviceCount(&n);

	if (rc != cudaSuccess) {
		snprintf(why, why_len, "no usable CUDA device: %s (%s)",
			 cudaGetErrorString(rc), cudaGetErrorName(rc));
		return -ENODEV;
	}
	if (n == 0) {
		snprintf(why, why_len, "no usable CUDA device: the driver reports none");
		return -ENODEV;
	}
	for (int i = 0; i < n; i++) {
		cudaDeviceProp p;
		if (cudaGetDeviceProperties(&p, i) == cudaSuccess && p.major >= 8)
			return i;
	}
	snprintf(why, why_len, "no usable CUDA device: none of the %d has compute capability 8.0 or newer", n);
	return -ENODEV;
}
