# SPDX-License-Identifier: MIT
"""MoedBlock: the module that takes a MoE block's place in a model.

It keeps the block's router (a few kilobytes per layer) and sends the
hidden states to moed for everything else: routing, routed experts and
shared experts, which moed computes from the store it serves.  It returns
what the replaced block returns in transformers 5: the output tensor, of
the input's shape and dtype (gpt_oss: the tuple (output, router_scores)).
"""
from __future__ import annotations

import torch
from torch import nn

from ._arch import Arch

try:
    # transformers 5 collects router logits with forward hooks on the
    # router modules, active only while a collector is set (output_
    # router_logits=True).  Knowing that lets the block run its router only
    # when someone records it.
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions
    _active_collector = None

_DTYPES = (torch.float32, torch.bfloat16)


def _recording_router_logits() -> bool:
    if _active_collector is None:
        return True     # cannot tell: run the router, which is always correct
    collected = _active_collector.get()
    return collected is not None and "router_logits" in collected


class MoedBlock(nn.Module):
    """A MoE block served by moed.

    Built by attach() (from a loaded block, whose router it keeps) or by
    from_pretrained() (empty, before the weights load: then the router is
    the only thing of the block ever allocated).  ``bind()`` gives it the
    client and the moed layer number; until then forward() refuses.
    """

    def __init__(self, arch: Arch, router: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.moed_arch = arch
        self.hidden_size = hidden_size
        # registered under the original name so that checkpoint keys
        # (model.layers.L.mlp.gate.weight) and output recorders find it
        self.add_module(arch.router_attr, router)
        self.moed_layer: int | None = None
        self._client = None

    @property
    def moed_router(self) -> nn.Module:
        return getattr(self, self.moed_arch.router_attr)

    def bind(self, client, layer: int) -> None:
        self._client = client
        self.moed_layer = layer

    def extra_repr(self) -> str:
        return f"model_type={self.moed_arch.model_type}, moed_layer={self.moed_layer}"

    def forward(self, hidden_states: torch.Tensor):
        client = self._client
        if client is None:
            raise RuntimeError("this MoE block is served by moed but has no client: "
                               "call moed.transformers.attach(model, client) first")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"layer {self.moed_layer}: hidden states of size "
                             f"{hidden_states.shape[-1]}, the model's is {self.hidden_size}")
        if hidden_states.dtype not in _DTYPES:
            raise TypeError(f"layer {self.moed_layer}: moed takes float32 or bfloat16 hidden "
                            f"states, not {hidden_states.dtype}; load the model with "
                            f"dtype=torch.float32 or torch.bfloat16")
        if self.training and torch.is_grad_enabled() and hidden_states.requires_grad:
            raise RuntimeError(f"layer {self.moed_layer}: moed serves the experts for inference; "
                               "it gives no gradients (call model.eval() or use torch.no_grad())")
        shape = hidden_states.shape
        x = hidden_states.detach().reshape(-1, shape[-1])
        if _recording_router_logits():
            self.moed_router(x)     # its output recorder keeps the logits
        device = x.device
        if device.type != "cpu":
            x = x.to("cpu")
        if not x.is_contiguous():
            x = x.contiguous()
        if self.moed_arch.returns_scores:
            y, _ids, weights = client.forward(x, self.moed_layer, return_routing=True)
            scores = torch.as_tensor(weights).to(device=device, dtype=hidden_states.dtype)
            return y.to(device).reshape(shape), scores
        y = client.forward(x, self.moed_layer)
        return y.to(device).reshape(shape)
