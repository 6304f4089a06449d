/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "err.h"

int moe_err_set(struct moe_err *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	err->code = code;
	return code;
}

int moe_err_prefix(struct moe_err *err, int code, const char *fmt, ...)
{
	char prefix[MOE_ERR_MSG_MAX], old[MOE_ERR_MSG_MAX];
	va_list ap;

	if (!err)
		return code;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	memcpy(old, err->msg, sizeof(old));
	if (old[0])
		snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old);
	else
		snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, strerror(-code));
	err->code = code;
	return code;
}

void moe_err_clear(struct moe_err *err)
{
	if (!err)
		return;
	err->code = 0;
	err->msg[0] = '\0';
}
