/* SPDX-License-Identifier: MIT */
/*
 * Error values with a message.
 *
 * Engine code returns 0 (or a count) on success and a negative errno on
 * failure.  Where the caller needs to tell a person *what* failed (the file,
 * the tensor, the field, the layer), the function also takes a struct moe_err
 * and fills its message.  Engine code never logs; the edges (moed, moectl)
 * print err->msg.
 */
#ifndef MOE_ERR_H
#define MOE_ERR_H

#include <errno.h>
#include <stddef.h>

/* Long enough for a path, a tensor name and a reason. */
#define MOE_ERR_MSG_MAX 1024

/* Backend modules fill it (init): any change to it, or to MOE_ERR_MSG_MAX,
 * bumps MOE_BACKEND_ABI_VERSION (backend.h). */
struct moe_err {
	int code;                    /* the negative errno last set, 0 if none */
	char msg[MOE_ERR_MSG_MAX];   /* one line, no trailing newline */
};

/*
 * What lower layers have to say that is not an error of the call they are
 * in (a backend's failed CUDA call, the pager's fallback): one line, no
 * newline, through a callback that the edge passes in and that logs it.
 * @level as syslog(3): 3 error, 4 warning, 5 notice.  Backend modules get
 * it (moe_backend_options): any change to it bumps MOE_BACKEND_ABI_VERSION.
 */
typedef void (*moe_log_fn)(void *ctx, int level, const char *msg);

/*
 * Set the message of @err (may be NULL) from a printf format and return
 * @code, which must be a negative errno, so that "fill and return" is one
 * statement:   return moe_err_set(err, -EINVAL, "%s: bad shape", name);
 */
int moe_err_set(struct moe_err *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/*
 * Prefix the message already in @err with "prefix: " (context added by a
 * caller that knows more, e.g. the file name); returns @code.
 */
int moe_err_prefix(struct moe_err *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Reset @err to "no error". */
void moe_err_clear(struct moe_err *err);

#endif
