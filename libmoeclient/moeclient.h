/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: the client library of moed.
 *
 * This first version carries the error codes and their messages; the
 * session, ring and tensor calls come with the daemon (see
 * libmoeclient(3)).  Every function returns 0 or a positive
 * value on success and a negative errno on failure; the library never logs,
 * never exits and never raises signals.
 */
#ifndef MOECLIENT_H
#define MOECLIENT_H

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this header; moe_version() tells the library's. */
#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

/*
 * Errors specific to moed, beyond the errno values (returned negated like
 * them).  Their values sit above every errno Linux defines.
 */
enum moe_error {
	MOE_E_BASE = 4096,
	MOE_E_PROTO = 4096,       /* the peer spoke an unknown protocol version */
	MOE_E_LAYER = 4097,       /* not an MoE layer of the served model */
	MOE_E_CHECKSUM = 4098,    /* a weight blob failed its checksum */
	MOE_E_MAX
};

/*
 * A static, human-readable message for @err, a negative errno or -MOE_E_*
 * (positive values are accepted too).  Never NULL; thread-safe.
 */
const char *moe_strerror(int err);

/* The library's version as MAJOR * 10000 + MINOR * 100 + PATCH. */
int moe_version(void);

#ifdef __cplusplus
}
#endif

#endif
