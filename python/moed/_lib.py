# SPDX-License-Identifier: MIT
"""libmoeclient through ctypes: finding the library, its structures and
its prototypes.

The structures mirror <moeclient.h> field by field (tests/python/
test_client_layout.py compares them with the compiler's offsets, so a
drift fails make check).  The library is loaded once, on first use, so that
``import moed`` works where libmoeclient is not installed.

Calls go through ctypes.CDLL, which releases the GIL for the duration of
each C call: a thread blocked in moe_client_wait() does not stop the
others.  (PyDLL would hold it; never use it here.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from ctypes import POINTER, c_char, c_char_p, c_int, c_int32, c_uint32, c_uint64, c_void_p, c_size_t, c_float

from .errors import MoedError

# The soname: libtool's -version-info 2:0:2 of Makefile.am gives
# current - age = 0, i.e. libmoeclient.so.0 (libmoeclient(3), VERSIONING).
SONAME = "libmoeclient.so.0"

MOE_F32 = 0
MOE_BF16 = 1
MOE_DEFAULT_SOCKET = "/run/moed/moed.sock"
MOE_FINGERPRINT_LEN = 33


class ClientOptions(ctypes.Structure):
    """struct moe_client_options"""
    _fields_ = [
        ("arena_bytes", c_uint64),
        ("sq_entries", c_uint32),
        ("reserved", c_uint32 * 5),
    ]


class ModelInfo(ctypes.Structure):
    """struct moe_model_info"""
    _fields_ = [
        ("model_type", c_char * 32),
        ("backend", c_char * 16),
        ("hidden_size", c_uint32),
        ("moe_intermediate_size", c_uint32),
        ("num_experts", c_uint32),
        ("top_k", c_uint32),
        ("num_hidden_layers", c_uint32),
        ("num_moe_layers", c_uint32),
        ("moe_layers", POINTER(c_uint32)),
        ("weight_dtype", c_uint32),
        ("n_shared_experts", c_uint32),
        ("max_tokens", c_uint32),
        ("arena_bytes", c_uint64),
    ]


class Request(ctypes.Structure):
    """struct moe_request"""
    _fields_ = [
        ("layer", c_uint32),
        ("dtype", c_uint32),
        ("tokens", c_uint64),
        ("input", c_void_p),
        ("output", c_void_p),
        ("ids", c_void_p),
        ("weights", c_void_p),
        ("user_data", c_uint64),
    ]


class Completion(ctypes.Structure):
    """struct moe_completion"""
    _fields_ = [
        ("user_data", c_uint64),
        ("res", c_int),
    ]


# name -> (restype, argtypes).  Pointers to tensors are c_void_p so that
# Python ints pass straight through (the cheapest conversion ctypes has).
_PROTOTYPES = {
    "moe_strerror": (c_char_p, [c_int]),
    "moe_version": (c_int, []),
    "moe_client_connect": (c_int, [c_char_p, POINTER(ClientOptions), POINTER(c_void_p)]),
    "moe_client_disconnect": (None, [c_void_p]),
    "moe_client_info": (c_int, [c_void_p, POINTER(ModelInfo)]),
    "moe_client_alloc": (c_int, [c_void_p, c_size_t, POINTER(c_void_p)]),
    "moe_client_free": (c_int, [c_void_p, c_void_p]),
    "moe_client_submit": (c_int, [c_void_p, POINTER(Request)]),
    "moe_client_nop": (c_int, [c_void_p, c_uint64]),
    "moe_client_wait": (c_int, [c_void_p, POINTER(Completion), c_int]),
    "moe_client_forward": (c_int, [c_void_p, c_uint32, c_uint32, c_void_p, c_void_p, c_uint64,
                                   c_void_p, c_void_p]),
    "moe_client_stats": (c_int, [c_void_p, POINTER(c_void_p)]),
}

# Added after the first release: bound when the library has them.
_OPTIONAL = {
    "moe_checkpoint_fingerprint": (c_int, [c_char_p, POINTER(c_char * MOE_FINGERPRINT_LEN)]),
    "moe_client_fingerprint": (c_int, [c_void_p, POINTER(c_char * MOE_FINGERPRINT_LEN)]),
    "moe_client_last_error": (c_char_p, []),
}

_lock = threading.Lock()
_lib = None


class Library:
    """The loaded libmoeclient: its path and its functions as attributes
    (None for an optional one it lacks)."""

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self.path = path
        for name, (res, args) in _PROTOTYPES.items():
            f = getattr(cdll, name)
            f.restype = res
            f.argtypes = args
            setattr(self, name, f)
        for name, (res, args) in _OPTIONAL.items():
            f = getattr(cdll, name, None)
            if f is not None:
                f.restype = res
                f.argtypes = args
            setattr(self, name, f)
        libc = ctypes.CDLL(None)
        self.free = libc.free
        self.free.restype = None
        self.free.argtypes = [c_void_p]

    def last_error(self) -> str:
        """moe_client_last_error(): why this thread's last failed connect,
        submit or forward failed, in words; "" when the library is older or
        has nothing to add.  ctypes calls run on the calling thread, so it
        describes the call just made here."""
        if self.moe_client_last_error is None:
            return ""
        return (self.moe_client_last_error() or b"").decode("utf-8", "replace")

    def strerror(self, code: int) -> str:
        return self.moe_strerror(code).decode("utf-8", "replace")


def _candidates():
    """Where to look without $MOED_LIBRARY: the libdir `make install` used,
    then the dynamic loader's path."""
    try:
        from . import _libdir  # written by make install; absent otherwise
        yield os.path.join(_libdir.LIBDIR, SONAME)
    except ImportError:
        pass
    yield SONAME
    found = ctypes.util.find_library("moeclient")
    if found:
        yield found


def load() -> Library:
    """The library, loaded on first call: $MOED_LIBRARY (a path) if set,
    else the soname through the dynamic loader.  Raises MoedError naming
    both when neither loads."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        env = os.environ.get("MOED_LIBRARY")
        if env:
            try:
                cdll = ctypes.CDLL(env)
            except OSError as e:
                raise MoedError(-errno.ENOENT,
                                f"cannot load libmoeclient from MOED_LIBRARY={env}: {e}; "
                                "point MOED_LIBRARY at libmoeclient.so.0, or unset it to use "
                                "the dynamic loader's path") from None
            path = env
        else:
            cdll = path = None
            tried = []
            for cand in _candidates():
                if cand.startswith("/") and not os.path.exists(cand):
                    tried.append(cand)
                    continue
                try:
                    cdll = ctypes.CDLL(cand)
                    path = cand
                    break
                except OSError:
                    tried.append(cand)
            if cdll is None:
                raise MoedError(-errno.ENOENT,
                                f"cannot find libmoeclient: MOED_LIBRARY is not set and the "
                                f"dynamic loader has no {SONAME} (tried {', '.join(tried)}); "
                                "install moed (make install; then ldconfig) or set "
                                "MOED_LIBRARY=/path/to/libmoeclient.so.0")
        try:
            _lib = Library(cdll, path)
        except AttributeError as e:
            raise MoedError(-errno.ENOSYS,
                            f"{path} is not a usable libmoeclient ({e}); point MOED_LIBRARY "
                            "at the libmoeclient.so.0 of moed") from None
        return _lib
