# SPDX-License-Identifier: MIT
"""moed.Client: a session with moed, and moed.Request, one request in
flight.  See python/README.md for the guide; libmoeclient(3) for the
semantics underneath."""
from __future__ import annotations

import errno
import json
import math
import os
import weakref
from ctypes import byref, c_char, c_void_p, string_at
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _lib, _tensors
from ._lib import MOE_BF16, MOE_F32, MOE_FINGERPRINT_LEN
from ._session import Pending, Session
from ._tensors import NUMPY, TORCH
from .errors import MOE_E_LAYER, MOE_E_PROTO, MoedConnectionError, MoedError, MoedTimeoutError

__all__ = ["Client", "Info", "Request", "checkpoint_fingerprint"]

# struct moe_model_info's weight_dtype, in order (moe-store(5)).
_WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3_b128", "mxfp4", "int4")


@dataclass(frozen=True)
class Info:
    """What moed serves, and this session's limits (moe_client_info(3))."""
    model_type: str             #: "qwen3_moe", "deepseek_v3", ...
    backend: str                #: "cpu" or "cuda"
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    num_hidden_layers: int
    moe_layers: Tuple[int, ...]  #: the MoE layers, in the checkpoint's numbering
    weight_dtype: str           #: "float32", "bfloat16", "float16", "fp8_e4m3_b128", "mxfp4", "int4"
    n_shared_experts: int
    max_tokens: int             #: tokens per request (forward() cuts bigger batches itself)
    arena_bytes: int            #: the session's shared arena
    fingerprint: Optional[str]  #: the checkpoint's fingerprint, None if moed or the library has none


Tensor = Any  # a numpy.ndarray or a torch.Tensor


def _dtype_name(dtype) -> str:
    """"float32"/"bfloat16" for the ways a caller may spell them: a string,
    a numpy dtype or type, ml_dtypes.bfloat16, torch.float32/bfloat16."""
    if isinstance(dtype, str):
        return dtype
    t = str(dtype)
    if t.startswith("torch."):
        return t[6:]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return t


def _fingerprint_str(buf) -> str:
    return bytes(buf).split(b"\0", 1)[0].decode("ascii")


def checkpoint_fingerprint(path: Union[str, "os.PathLike[str]"]) -> str:
    """The fingerprint of the Hugging Face checkpoint in directory @path
    (32 hex digits), as moed reports for a store packed from it
    (Info.fingerprint).  Raises MoedError naming @path on failure, or
    saying the library is too old to compute it."""
    lib = _lib.load()
    p = os.fspath(path)
    if lib.moe_checkpoint_fingerprint is None:
        raise MoedError(-errno.ENOSYS, f"checkpoint_fingerprint({p!r}): the libmoeclient at "
                        f"{lib.path} is too old (no moe_checkpoint_fingerprint); install a newer moed")
    buf = (c_char * MOE_FINGERPRINT_LEN)()
    rc = lib.moe_checkpoint_fingerprint(os.fsencode(p), byref(buf))
    if rc < 0:
        raise MoedError(rc, f"checkpoint_fingerprint({p!r}): {lib.strerror(rc)}")
    return _fingerprint_str(buf)


def _connect_error(lib, rc: int, path: str, arena_bytes: int, sq_entries: int) -> MoedError:
    msg = lib.strerror(rc)
    text = lib.last_error()
    # the library words the socket, the cause and the fix, or moed's own
    # reason for a refusal; the arguments that are Python's are ours to name
    if text and rc not in (-errno.EINVAL, -errno.E2BIG, -errno.ENOSPC):
        return MoedConnectionError(rc, text)
    if rc in (-errno.ENOENT, -errno.ECONNREFUSED):
        hint = (f"no moed listens at {path}: start moed (moed --socket {path} --model STORE) "
                "or set MOED_SOCKET (or Client(socket=...)) to the socket it listens on")
    elif rc == -errno.EACCES:
        hint = (f"{path} refuses user {os.getuid()}: the socket's mode/group or moed's access "
                "lists (moed.conf(5), access) decide who may connect")
    elif rc == -errno.EUSERS:
        hint = (f"moed at {path} serves its maximum of clients (limits.max_clients), or this "
                "user's (limits.max_clients_per_uid): end a session or raise the limit in moed.conf")
    elif rc in (-errno.E2BIG, -errno.ENOSPC):
        hint = (f"arena_bytes={arena_bytes} does not fit moed's limits.segment_mb; ask for "
                "less (0: moed's default)")
    elif rc == -errno.EINVAL:
        hint = f"sq_entries={sq_entries} must be 0 or a power of two up to 4096"
    elif rc == -errno.ENAMETOOLONG:
        hint = f"the socket path {path} is too long for a unix socket (108 bytes)"
    elif rc == -MOE_E_PROTO:
        hint = (f"moed at {path} speaks another protocol version than {lib.path}: use the "
                "libmoeclient of the same moed release")
    else:
        hint = f"moed at {path}"
    return MoedConnectionError(rc, f"cannot connect to moed: {msg}: {hint}")


class Request:
    """A request submitted with Client.submit(): wait() for its result."""

    __slots__ = ("_s", "_p", "_result", "_arena_out", "_copy_to", "_kind", "_routing")

    def __init__(self, s: Session, p: Pending, result, arena_out, copy_to, kind, routing):
        self._s = s
        self._p = p
        self._result = result
        self._arena_out = arena_out
        self._copy_to = copy_to
        self._kind = kind
        self._routing = routing

    def done(self) -> bool:
        """Has the request completed?  Never blocks."""
        p = self._p
        if p.remaining and not self._s.disconnected:
            self._s.wait(p, 0.0)
        return p.remaining == 0

    def wait(self, timeout: Optional[float] = None):
        """Wait for the request, at most @timeout seconds (None: no limit),
        and return its output (an array or tensor of x's kind, in the arena
        unless out= was ordinary memory), or (output, ids, weights) when
        submitted with return_routing=True.  Raises MoedTimeoutError when
        @timeout passes first, MoedError when the request failed.  Several
        threads may wait at once; completions of other requests that a wait
        reaps are kept for them."""
        p = self._p
        if p.remaining:
            s = self._s
            s.enter()
            try:
                if not s.wait(p, timeout):
                    raise MoedTimeoutError(-errno.ETIMEDOUT, f"Request.wait: {p.where} not done "
                                           f"after {timeout} s")
            finally:
                s.leave()
        if p.res < 0:
            raise MoedError(p.res, f"request for {p.where}: {self._s.lib.strerror(p.res)}")
        if self._copy_to is not None:
            _tensors.copy_into(self._copy_to, self._arena_out, self._kind)
            self._copy_to = self._arena_out = None
        if self._routing is not None:
            return (self._result,) + self._routing
        return self._result


class Client:
    """A session with moed over libmoeclient.

    Client(socket=None, *, arena_bytes=0, sq_entries=0) connects to
    @socket (None: $MOED_SOCKET, else libmoeclient's default, which is
    /run/moed/moed.sock or, for a moed run by hand, $XDG_RUNTIME_DIR/moed.sock) and maps the
    session's arena; @arena_bytes and @sq_entries as moe_client_connect(3)
    (0: moed's defaults).  Raises MoedConnectionError (a MoedError and a
    ConnectionError) naming the socket when that fails.

    Use it as a context manager, or close() it.  One Client may be shared
    by threads (libmoeclient(3), THREAD SAFETY); the GIL is released while
    a call waits for moed.
    """

    def __init__(self, socket: Union[str, "os.PathLike[str]", None] = None, *,
                 arena_bytes: int = 0, sq_entries: int = 0) -> None:
        if not isinstance(arena_bytes, int) or not 0 <= arena_bytes < 1 << 64:
            raise ValueError(f"arena_bytes={arena_bytes!r}: a byte count, 0 for moed's default")
        if not isinstance(sq_entries, int) or not 0 <= sq_entries < 1 << 32:
            raise ValueError(f"sq_entries={sq_entries!r}: 0 or a power of two up to 4096")
        lib = _lib.load()
        if socket is None:
            socket = os.environ.get("MOED_SOCKET") or None
        # None lets libmoeclient choose, as for any program: its default,
        # or $XDG_RUNTIME_DIR/moed.sock where a moed run by hand is
        path = os.fspath(socket) if socket is not None else "the default socket (moe_client_connect(3))"
        opt = _lib.ClientOptions(arena_bytes, sq_entries)
        h = c_void_p()
        rc = lib.moe_client_connect(os.fsencode(socket) if socket is not None else None, byref(opt),
                                    byref(h))
        if rc < 0:
            raise _connect_error(lib, rc, path, arena_bytes, sq_entries)
        s = Session(lib, h.value, path)
        self._s = s
        self._finalizer = weakref.finalize(self, s.close, False)
        mi = _lib.ModelInfo()
        rc = lib.moe_client_info(s.h, byref(mi))
        if rc < 0:
            self.close()
            raise s.error(rc, f"moe_client_info ({path})")
        fp = None
        if lib.moe_client_fingerprint is not None:
            buf = (c_char * MOE_FINGERPRINT_LEN)()
            if lib.moe_client_fingerprint(s.h, byref(buf)) == 0:
                fp = _fingerprint_str(buf)
        wd = mi.weight_dtype
        self.info = Info(
            model_type=mi.model_type.decode("utf-8", "replace"),
            backend=mi.backend.decode("utf-8", "replace"),
            hidden_size=mi.hidden_size,
            moe_intermediate_size=mi.moe_intermediate_size,
            num_experts=mi.num_experts,
            top_k=mi.top_k,
            num_hidden_layers=mi.num_hidden_layers,
            moe_layers=tuple(mi.moe_layers[i] for i in range(mi.num_moe_layers)),
            weight_dtype=_WEIGHT_DTYPES[wd] if wd < len(_WEIGHT_DTYPES) else f"unknown({wd})",
            n_shared_experts=mi.n_shared_experts,
            max_tokens=mi.max_tokens,
            arena_bytes=mi.arena_bytes,
            fingerprint=fp,
        )
        # The per-call path reads these, not self.info (attribute lookups
        # on a frozen dataclass are not free).
        self._h = s.h
        self._fwd = lib.moe_client_forward
        self._hidden = mi.hidden_size
        self._top_k = mi.top_k
        self._max_tokens = mi.max_tokens
        self._layers = frozenset(self.info.moe_layers)

    # ------------------------------------------------------------------ life

    def close(self) -> None:
        """End the session.  New calls raise MoedError at once; requests in
        flight complete first; the arena (and moe_client_disconnect) goes
        once no array from empty() or submit() is alive: those arrays stay
        valid until garbage collected.  Calling close() again does nothing."""
        self._finalizer.detach()
        self._s.close(True)

    @property
    def closed(self) -> bool:
        return self._s.closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        state = "closed" if self._s.closed else "open"
        return (f"<moed.Client {self._s.socket} {state}: {i.model_type} {i.weight_dtype}, hidden "
                f"{i.hidden_size}, {len(i.moe_layers)} MoE layers>")

    # ------------------------------------------------------------------ errors

    def _check_layer(self, layer) -> int:
        if type(layer) is not int:
            if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
                layer = int(layer)
            else:
                raise TypeError(f"layer is a {type(layer).__name__}; it must be an int, one of "
                                f"the MoE layers {self._layers_text()}")
        if layer not in self._layers:
            raise MoedError(-MOE_E_LAYER, f"layer {layer}: {self._s.lib.strerror(-MOE_E_LAYER)}: "
                            f"the MoE layers of the served {self.info.model_type} model are "
                            f"{self._layers_text()}")
        return layer

    def _layers_text(self) -> str:
        ls = self.info.moe_layers
        if ls and list(ls) == list(range(ls[0], ls[-1] + 1)) and len(ls) > 2:
            return f"{ls[0]}-{ls[-1]}"
        return ", ".join(map(str, ls)) or "(none)"

    def _request_error(self, rc: int, call: str, layer: int, x) -> MoedError:
        return MoedError(rc, f"{call} (layer {layer}, x {tuple(x.shape)}): {self._s.lib.strerror(rc)}")

    # ------------------------------------------------------------------ arena

    def empty(self, shape, dtype: Any = "float32", *, torch: bool = False):
        """An uninitialised array of @shape in this session's arena: numpy
        (torch=True: a torch tensor sharing its memory), float32 or
        bfloat16 (ml_dtypes.bfloat16 if installed, else uint16 words; a
        torch tensor is torch.bfloat16).  forward() and submit() pass arena
        arrays to moed without a copy.  The memory returns to the arena when
        the array (and every view of it) is garbage collected."""
        if isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        name = _dtype_name(dtype)
        if name not in ("float32", "bfloat16"):
            raise TypeError(f"dtype {dtype!r}: the arena holds float32 or bfloat16 tensors")
        act = MOE_F32 if name == "float32" else MOE_BF16
        s = self._s
        s.enter()
        try:
            return self._arena_array(shape, act, TORCH if torch else NUMPY,
                                     f"Client.empty({shape}, {name!r})")
        finally:
            s.leave()

    def _arena_array(self, shape, act: int, kind: int, what: str, bf16_np=None):
        n = math.prod(shape)
        es = 4 if act == MOE_F32 else 2
        if n == 0:
            a = np.empty(shape, np.float32 if act == MOE_F32 else np.uint16)
        elif act == MOE_F32:
            a = np.asarray(self._s.alloc(n * es, shape, "<f4", what))
        else:
            a = np.asarray(self._s.alloc(n * es, shape, "<u2", what))
        if kind == TORCH:
            torch = _tensors.torch_module()
            if torch is None:
                import torch  # noqa: F811 -- empty(torch=True) asks for it
            if act == MOE_F32:
                return torch.from_numpy(a)
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        if act == MOE_BF16:
            dt = bf16_np or _tensors.NP_BF16
            if dt is not None and dt != _tensors.NP_U16:
                return a.view(dt)
        return a

    def _arena_like(self, x, kind: int, act: int, what: str):
        bf = x.dtype if kind == NUMPY and act == MOE_BF16 else None
        return self._arena_array(tuple(x.shape), act, kind, what, bf)

    def _arena_routing(self, tokens: int, kind: int):
        k = self._top_k
        ids = self._arena_array((tokens, k), MOE_F32, kind, "routing ids")
        w = self._arena_array((tokens, k), MOE_F32, kind, "routing weights")
        if kind == NUMPY:
            return ids.view(np.int32), w
        return ids.view(_tensors.torch_module().int32), w

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, layer: int, *, out: Optional[Tensor] = None,
                return_routing: bool = False, dtype: Optional[str] = None):
        """Run MoE layer @layer (the checkpoint's number) on @x and return
        the output, of @x's kind (numpy or torch), dtype and shape.

        @x: float32 or bfloat16, shape [..., hidden_size] (leading dims are
        tokens); numpy (bfloat16 as ml_dtypes.bfloat16, or uint16 words with
        dtype="bfloat16") or a CPU torch tensor.  A non-contiguous @x is
        copied to a contiguous one first.  When @x (and @out, if given) lie
        in this session's arena (empty()), moed reads and writes them in
        place and the output is an arena array; otherwise
        moe_client_forward(3) copies through the arena (one copy each way),
        in pieces of at most max_tokens.  @out: where to write (like @x).
        return_routing=True returns (y, ids, weights): int32 and float32
        [tokens, top_k], each token's experts and their weights.

        Raises TypeError/ValueError for a wrong argument (naming it),
        MoedError with the library's code otherwise (-MOE_E_LAYER for a
        layer that is not an MoE layer)."""
        s = self._s
        s.enter()
        try:
            x, kind, act, xp, tokens = _tensors.adapt(x, self._hidden, dtype, "x")
            if type(layer) is not int or layer not in self._layers:
                layer = self._check_layer(layer)
            nbytes = tokens * self._hidden * (4 if act == MOE_F32 else 2)
            if s.starts and s.in_arena(xp, nbytes):
                yp = None if out is None else _tensors.check_out(out, x, kind)
                if yp is None or s.in_arena(yp, nbytes):
                    return self._forward_arena(x, kind, act, xp, tokens, layer, out, return_routing)
            if out is None:
                y = _tensors.new_like(x, kind)
                yp = _tensors.address(y, kind)
            else:
                y = out
                yp = _tensors.check_out(out, x, kind)
            if tokens == 0:
                return (y,) + _tensors.new_routing(0, self._top_k, kind) if return_routing else y
            if return_routing:
                ids, w = _tensors.new_routing(tokens, self._top_k, kind)
                rc = self._fwd(self._h, layer, act, xp, yp, tokens,
                               _tensors.address(ids, kind), _tensors.address(w, kind))
                if rc < 0:
                    raise self._request_error(rc, "moe_client_forward", layer, x)
                return y, ids, w
            rc = self._fwd(self._h, layer, act, xp, yp, tokens, None, None)
            if rc < 0:
                raise self._request_error(rc, "moe_client_forward", layer, x)
            return y
        finally:
            s.leave()

    def _queue(self, x, kind, act, xp, yp, tokens, layer, routing, pend) -> None:
        """Submit [tokens] rows at xp/yp in pieces of at most max_tokens."""
        H, k, mt = self._hidden, self._top_k, self._max_tokens
        row = H * (4 if act == MOE_F32 else 2)
        ip = wp = None
        if routing is not None:
            ip = _tensors.address(routing[0], kind)
            wp = _tensors.address(routing[1], kind)
        req = _lib.Request()
        req.layer = layer
        req.dtype = act
        for t0 in range(0, tokens, mt):
            n = min(mt, tokens - t0)
            req.tokens = n
            req.input = xp + t0 * row
            req.output = yp + t0 * row
            req.ids = None if ip is None else ip + t0 * k * 4
            req.weights = None if wp is None else wp + t0 * k * 4
            self._s.submit(req, pend)

    def _forward_arena(self, x, kind, act, xp, tokens, layer, out, return_routing):
        s = self._s
        y = out if out is not None else self._arena_like(x, kind, act, "forward output")
        if tokens == 0:
            return (y,) + _tensors.new_routing(0, self._top_k, kind) if return_routing else y
        routing = self._arena_routing(tokens, kind) if return_routing else None
        pend = Pending((x, y, routing), layer, x.shape)
        self._queue(x, kind, act, xp, _tensors.address(y, kind), tokens, layer, routing, pend)
        s.wait(pend, None)
        if pend.res < 0:
            raise self._request_error(pend.res, "moe_client_submit", layer, x)
        return (y,) + routing if return_routing else y

    def submit(self, x: Tensor, layer: int, *, out: Optional[Tensor] = None,
               return_routing: bool = False, dtype: Optional[str] = None) -> Request:
        """Queue MoE layer @layer on @x and return a Request at once; its
        wait() gives the output.  @x and @out as in forward(); those not in
        the arena are copied into it (x now, out when wait() returns).  Any
        number may be in flight; a request of more than max_tokens tokens
        goes as several.  The arrays must stay unchanged until the request
        is done (the Request keeps them alive)."""
        s = self._s
        s.enter()
        try:
            x, kind, act, xp, tokens = _tensors.adapt(x, self._hidden, dtype, "x")
            layer = self._check_layer(layer)
            if tokens == 0:
                raise ValueError(f"x has shape {tuple(x.shape)}: no tokens to submit")
            nbytes = tokens * self._hidden * (4 if act == MOE_F32 else 2)
            if not s.in_arena(xp, nbytes):
                xa = self._arena_like(x, kind, act, f"submit: the arena copy of x {tuple(x.shape)}")
                _tensors.copy_into(xa, x, kind)
                x, xp = xa, _tensors.address(xa, kind)
            copy_to = None
            if out is not None:
                yp = _tensors.check_out(out, x, kind)
                if s.in_arena(yp, nbytes):
                    y = out
                else:
                    copy_to = out
                    y = self._arena_like(x, kind, act, "submit: the arena output")
                    yp = _tensors.address(y, kind)
            else:
                y = self._arena_like(x, kind, act, "submit: the arena output")
                yp = _tensors.address(y, kind)
            routing = self._arena_routing(tokens, kind) if return_routing else None
            pend = Pending((x, y, routing), layer, x.shape)
            self._queue(x, kind, act, xp, yp, tokens, layer, routing, pend)
            return Request(s, pend, copy_to if copy_to is not None else y, y, copy_to, kind, routing)
        finally:
            s.leave()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """moed's figures (moe_client_stats(3)) as a dict."""
        s = self._s
        s.enter()
        try:
            p = c_void_p()
            rc = s.lib.moe_client_stats(s.h, byref(p))
            if rc < 0:
                raise s.error(rc, f"moe_client_stats ({s.socket})")
            try:
                text = string_at(p.value)
            finally:
                s.lib.free(p)
            return json.loads(text)
        finally:
            s.leave()
