/* SPDX-License-Identifier: MIT */
#ifndef MOE_HFMODEL_H
#define MOE_HFMODEL_H
#endif
