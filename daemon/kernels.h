/* SPDX-License-Identifier: MIT */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H
#endif
