# SPDX-License-Identifier: MIT
"""The exceptions of the moed package.

Every failure of libmoeclient reaches Python as a :class:`MoedError` that
carries the library's code (a negative errno or ``-MOE_E_*``) and a message
made of the call's context (which call, layer, shape, socket) and
``moe_strerror()``'s text.
"""
from __future__ import annotations

import errno as _errno

__all__ = ["MoedError", "MoedConnectionError", "MoedTimeoutError", "MOE_E_PROTO", "MOE_E_LAYER", "MOE_E_CHECKSUM"]

# enum moe_error of <moeclient.h>: above every errno Linux defines.
MOE_E_PROTO = 4096
MOE_E_LAYER = 4097
MOE_E_CHECKSUM = 4098


class MoedError(Exception):
    """A call to moed failed.

    Attributes:
        code: the library's code, a negative errno (``-errno.ENOENT``) or a
            negated ``MOE_E_*`` value (``-moed.MOE_E_LAYER``); 0 for failures
            found by the package itself before any call (none at present).
        message: what failed and why, with the library's message.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.code, self.message))


class MoedConnectionError(MoedError, ConnectionError):
    """moe_client_connect() failed: no moed at the socket, refused, full."""

    # OSError's constructor would read (code, message) as (errno, strerror);
    # keep errno positive as OSError users expect.
    def __init__(self, code: int, message: str) -> None:
        MoedError.__init__(self, code, message)
        self.errno = -code if code < 0 and -code < 4096 else None
        self.strerror = message


class MoedTimeoutError(MoedError, TimeoutError):
    """A wait ran out of time (Request.wait's timeout)."""

    def __init__(self, code: int, message: str) -> None:
        MoedError.__init__(self, code, message)
        self.errno = -code if code < 0 else code
        self.strerror = message


def errname(code: int) -> str:
    """A short name for @code: "ENOENT", "MOE_E_LAYER"."""
    c = -code if code < 0 else code
    for name, value in (("MOE_E_PROTO", MOE_E_PROTO), ("MOE_E_LAYER", MOE_E_LAYER),
                        ("MOE_E_CHECKSUM", MOE_E_CHECKSUM)):
        if c == value:
            return name
    return _errno.errorcode.get(c, str(code))
