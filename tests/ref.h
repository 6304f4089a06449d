/* SPDX-License-Identifier: MIT */
#ifndef MOE_REF_H
#define MOE_REF_H
#endif
