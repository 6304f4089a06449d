// SPDX-License-Identifier: MIT
// The CUDA backend's cuBLAS: opened with dlopen when a device is found.
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>

#include "device_impl.cuh"

namespace moe_gpu __attribute__((visibility("hidden"))) {

struct blas_api blas;

#define MOE_STR2(x) #x
#define MOE_STR(x) MOE_STR2(x)
#define MOE_CUBLAS_SONAME "libcublas.so." MOE_STR(CUBLAS_VER_MAJOR)

int blas_open(char *why, size_t why_len)
{
	void *h;

	if (blas.h)
		return 0;
	h = dlopen(MOE_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#ifdef MOE_CUDA_LIBDIR
	if (!h)   // the toolkit this module was built with, when ld.so does not know it
		h = dlopen(MOE_CUDA_LIBDIR "/" MOE_CUBLAS_SONAME, RTLD_NOW | RTLD_LOCAL);
#endif
	if (!h) {
		snprintf(why, why_len, "cannot load cuBLAS: %s", dlerror());
		return -ENODEV;
	}
#define SYM(field, name)                                                                   \
	do {                                                                               \
		blas.field = (decltype(blas.field))dlsym(h, name);                        \
		if (!blas.field) {                                                         \
			snprintf(why, why_len, "%s lacks %s", MOE_CUBLAS_SONAME, name);    \
			dlclose(h);                                                        \
			return -ENODEV;                                                    \
		}                                                                          \
	} while (0)
	SYM(create, "cublasCreate_v2");
	SYM(destroy, "cublasDestroy_v2");
	SYM(set_stream, "cublasSetStream_v2");
	SYM(set_workspace, "cublasSetWorkspace_v2");
	SYM(set_math, "cublasSetMathMode");
	SYM(sgemm, "cublasSgemm_v2");
	SYM(gemm_ex, "cublasGemmEx");
#undef SYM
	blas.h = h;
	return 0;
}

} // namespace moe_gpu
