# SPDX-License-Identifier: MIT
"""numpy arrays and torch tensors as libmoeclient sees them: their
activation dtype, their address, and new arrays of the same kind.

torch is never imported here: a tensor can only reach us from a program
that imported torch already, so sys.modules tells.
"""
from __future__ import annotations

import sys
from ctypes import addressof, c_char

import numpy as np

from ._lib import MOE_BF16, MOE_F32

NP_F32 = np.dtype(np.float32)
NP_U16 = np.dtype(np.uint16)
NP_I16 = np.dtype(np.int16)
NP_I32 = np.dtype(np.int32)
try:
    import ml_dtypes as _ml_dtypes
    NP_BF16: np.dtype | None = np.dtype(_ml_dtypes.bfloat16)
except ImportError:
    NP_BF16 = None

NUMPY, TORCH = 0, 1
_ESIZE = {MOE_F32: 4, MOE_BF16: 2}
_BF16_HOW = ("bfloat16 as ml_dtypes.bfloat16 (pip install ml_dtypes), or as a uint16 array "
             "with dtype=\"bfloat16\"")


def esize(act: int) -> int:
    return _ESIZE[act]


def np_address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data.  c_char.from_buffer is
    the cheapest route numpy offers (a.ctypes.data costs several times
    more); read-only and empty arrays take the slow one."""
    try:
        return addressof(c_char.from_buffer(a))
    except Exception:
        return a.__array_interface__["data"][0]


def _np_act(d: np.dtype, dtype: str | None, name: str) -> int:
    if d is NP_F32 or d == NP_F32:
        if dtype is None or dtype == "float32":
            return MOE_F32
    elif NP_BF16 is not None and d == NP_BF16:
        if dtype is None or dtype == "bfloat16":
            return MOE_BF16
    elif d == NP_U16 and dtype == "bfloat16":
        return MOE_BF16
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: moed takes dtype None, \"float32\" or \"bfloat16\"")
    if dtype is not None:
        raise TypeError(f"{name} has dtype {d} but dtype={dtype!r} was given: pass float32 "
                        f"arrays as float32 and {_BF16_HOW}")
    raise TypeError(f"{name} has dtype {d}; moed takes float32, or {_BF16_HOW}")


def torch_module():
    return sys.modules.get("torch")


def adapt(x, hidden: int, dtype: str | None, name: str):
    """Check @x and make it C-contiguous (a copy if it was not).
    Returns (x, kind, act, address, tokens)."""
    if isinstance(x, np.ndarray):
        act = _np_act(x.dtype, dtype, name)
        shape = x.shape
        if not shape or shape[-1] != hidden:
            raise ValueError(f"{name} has shape {tuple(shape)}; moed serves hidden size {hidden}: "
                             f"{name} must be [..., {hidden}]")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return x, NUMPY, act, np_address(x), x.size // hidden
    torch = torch_module()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on device {x.device}; moed.Client takes CPU tensors "
                             f"({name}.cpu())")
        if x.dtype is torch.float32:
            act = MOE_F32
        elif x.dtype is torch.bfloat16:
            act = MOE_BF16
        else:
            raise TypeError(f"{name} has dtype {x.dtype}; moed takes torch.float32 or torch.bfloat16")
        if dtype is not None and dtype != ("float32", "bfloat16")[act]:
            raise TypeError(f"{name} has dtype {x.dtype} but dtype={dtype!r} was given")
        shape = x.shape
        if not shape or shape[-1] != hidden:
            raise ValueError(f"{name} has shape {tuple(shape)}; moed serves hidden size {hidden}: "
                             f"{name} must be [..., {hidden}]")
        if not x.is_contiguous():
            x = x.contiguous()
        return x, TORCH, act, x.data_ptr(), x.numel() // hidden
    raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__}; moed takes a numpy "
                    "array or a CPU torch tensor")


def check_out(out, x, kind: int):
    """@out must be of @x's kind, dtype and shape, C-contiguous and
    writable; returns its address."""
    if kind == NUMPY:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out is a {type(out).__name__}; x is a numpy array, so out must be one")
        if out.dtype != x.dtype or out.shape != x.shape:
            raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; it must be like x: "
                             f"{x.dtype} {tuple(x.shape)}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a C-contiguous, writable array")
        return np_address(out)
    torch = torch_module()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out is a {type(out).__name__}; x is a torch tensor, so out must be one")
    if out.dtype != x.dtype or out.shape != x.shape or out.device.type != "cpu":
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)} on {out.device}; it must be like "
                         f"x: {x.dtype} {tuple(x.shape)} on cpu")
    if not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor")
    return out.data_ptr()


def new_like(x, kind: int):
    """A new array or tensor of @x's shape and dtype (ordinary memory)."""
    if kind == NUMPY:
        return np.empty(x.shape, x.dtype)
    return torch_module().empty(x.shape, dtype=x.dtype)


def new_routing(tokens: int, top_k: int, kind: int):
    """ids int32 and weights float32 [tokens, top_k] (ordinary memory)."""
    if kind == NUMPY:
        return np.empty((tokens, top_k), NP_I32), np.empty((tokens, top_k), NP_F32)
    torch = torch_module()
    return (torch.empty((tokens, top_k), dtype=torch.int32),
            torch.empty((tokens, top_k), dtype=torch.float32))


def address(a, kind: int) -> int:
    return np_address(a) if kind == NUMPY else a.data_ptr()


def copy_into(dst, src, kind: int) -> None:
    if kind == NUMPY:
        np.copyto(dst, src, casting="no")
    else:
        dst.copy_(src)
