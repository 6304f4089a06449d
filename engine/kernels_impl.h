/* SPDX-License-Identifier: MIT */
/*
 * What the kernel files share inside the engine (kernels.c picks the
 * instruction set; kernels_int4.c has the INT4 kernels).  Not an interface:
 * kernels.h is.
 */
#ifndef MOE_KERNELS_IMPL_H
#define MOE_KERNELS_IMPL_H

#include <stdbool.h>

#include "kernels.h"

/* True if this CPU can run @isa's kernels. */
bool moe_kern_isa_usable(enum moe_kern_isa isa);

#endif
