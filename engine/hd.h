/* SPDX-License-Identifier: MIT */
/* MOE_HD marks code compiled for the host and, under nvcc, the device. */
#ifndef MOE_HD_H
#define MOE_HD_H

#ifdef __CUDACC__
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

#endif
