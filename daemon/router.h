/* SPDX-License-Identifier: MIT */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H
#endif
