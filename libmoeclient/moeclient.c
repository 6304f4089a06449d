/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <limits.h>
#include <string.h>

#include "moeclient.h"

#define MOE_EXPORT __attribute__((visibility("default")))

MOE_EXPORT const char *moe_strerror(int err)
{
	if (err == INT_MIN)     /* -INT_MIN overflows */
		return "Unknown error";
	if (err < 0)
		err = -err;
	switch (err) {
	case 0: return "Success";
	case MOE_E_PROTO: return "Protocol version not supported by moed";
	case MOE_E_LAYER: return "Not an MoE layer of the served model";
	case MOE_E_CHECKSUM: return "Expert weights failed their checksum";
	default: break;
	}
	if (err < MOE_E_BASE) {
		/* strerrordesc_np (glibc 2.32) is thread-safe and never NULL for a
		 * known errno; unknown values get a fixed text. */
		const char *s = strerrordesc_np(err);
		return s ? s : "Unknown error";
	}
	return "Unknown error";
}

MOE_EXPORT int moe_version(void)
{
	return MOE_VERSION_MAJOR * 10000 + MOE_VERSION_MINOR * 100 + MOE_VERSION_PATCH;
}
