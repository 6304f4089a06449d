# SPDX-License-Identifier: MIT
"""attach(): put a model's MoE layers in moed's hands, after checking that
moed serves this very model.

The checks name both sides so that a mismatch says what to do: the wrong
store, the wrong socket, or a model saved since the store was packed.
"""
from __future__ import annotations

import errno
import os
import warnings

import torch
from torch import nn

from ..errors import MoedError
from ._arch import Arch, arch_of, block_layer
from ._block import MoedBlock


class ModelMismatchError(MoedError, ValueError):
    """The model and the store moed serves differ (architecture, shapes,
    MoE layers or checkpoint fingerprint); the message names both."""

    def __init__(self, message: str) -> None:
        super().__init__(-errno.EINVAL, message)


def _blocks(model: nn.Module, arch: Arch) -> dict[int, tuple[nn.Module, str, nn.Module]]:
    """Decoder layer number -> (parent, attribute, block) for every MoE block."""
    found = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, MoedBlock) or type(mod).__name__ == arch.block):
            continue
        layer = block_layer(name)
        if layer is None:
            raise ValueError(f"{name}: a {type(mod).__name__} outside model.layers.L.mlp; "
                             "moed.transformers does not know which layer it is")
        parent_name, _, attr = name.rpartition(".")
        found[layer] = (model.get_submodule(parent_name), attr, mod)
    return found


def _model_dims(model: nn.Module, arch: Arch, router: nn.Module) -> dict:
    cfg = model.config
    return {
        "hidden_size": cfg.hidden_size,
        "num_experts": router.num_experts,
        "top_k": router.top_k,
        "moe_intermediate_size": getattr(cfg, arch.intermediate),
    }


def _check_shapes(model, arch, blocks, info, where: str) -> None:
    mt = model.config.model_type
    if info.model_type != mt:
        raise ModelMismatchError(f"the model is {mt} but moed ({where}) serves {info.model_type}; "
                                 "start moed on the store packed from this model's checkpoint")
    router = next(iter(blocks.values()))[2]
    router = router.moed_router if isinstance(router, MoedBlock) else getattr(router, arch.router_attr)
    for field, mine in _model_dims(model, arch, router).items():
        theirs = getattr(info, field)
        if int(mine) != int(theirs):
            raise ModelMismatchError(
                f"{field}: the model has {mine}, moed ({where}) serves {theirs}; "
                "start moed on the store packed from this model's checkpoint")
    mine_layers, served = sorted(blocks), sorted(info.moe_layers)
    if mine_layers != served:
        raise ModelMismatchError(
            f"MoE layers: the model has {mine_layers}, moed ({where}) serves {served}; "
            "start moed on the store packed from this model's checkpoint")


def _warn_semantics(cfg) -> None:
    """Where transformers computes otherwise than the model's reference code,
    which moed follows (docs/ARCHITECTURE.md 4.1), say so once."""
    if (cfg.model_type == "deepseek_v2" and getattr(cfg, "norm_topk_prob", False)
            and getattr(cfg, "num_experts_per_tok", 1) > 1):
        warnings.warn("deepseek_v2 with norm_topk_prob: moed normalises the top-k weights as "
                      "DeepSeek's code does; transformers 5 does not, so outputs differ from "
                      "transformers alone", stacklevel=3)


def _check_fingerprint(model, client, checkpoint, verify: bool, where: str) -> None:
    if not verify:
        return
    served = client.info.fingerprint
    path = checkpoint if checkpoint is not None else getattr(model.config, "_name_or_path", "")
    if not served:
        raise ModelMismatchError(
            f"moed ({where}) serves a store without a checkpoint fingerprint (packed by an older "
            "moectl), so it cannot prove it serves this model; repack the checkpoint with "
            "moectl pack, or pass verify=False to attach without the check")
    if not path or not os.path.isdir(path):
        raise ModelMismatchError(
            f"cannot check the served store against the model: {path!r} is not a checkpoint "
            "directory; pass checkpoint=DIR (the directory moectl pack read), or verify=False")
    from .. import checkpoint_fingerprint

    mine = checkpoint_fingerprint(path)
    if mine != served:
        raise ModelMismatchError(
            f"moed ({where}) serves a store with checkpoint fingerprint {served}, but the "
            f"model's checkpoint {path} has fingerprint {mine}; pack that checkpoint "
            f"(moectl pack {path} -o STORE) and start moed on the new store, or connect "
            "to the moed that serves it")


def attach(model: nn.Module, client, *, checkpoint: str | os.PathLike | None = None,
           verify: bool = True) -> nn.Module:
    """Serve every MoE block of a transformers model from moed.

    Each MoE block (routed and shared experts) is replaced by a MoedBlock
    that keeps the block's router and sends the hidden states to
    ``client.forward`` for moed's layer of the same number; the experts'
    memory is released with the old blocks.  Dense layers stay local.

    Checks first, and raises ModelMismatchError naming both sides, unless
    the model and the served store agree on model_type, hidden size, number
    of experts, top-k, expert intermediate size and the set of MoE layers,
    and (``verify=True``) unless the store's checkpoint fingerprint equals
    that of ``checkpoint`` (default: ``model.config._name_or_path``).

    Returns the model (changed in place).  The client must stay open while
    the model is used.
    """
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"moed.transformers needs transformers 5 (found "
                          f"{transformers.__version__}); pip install 'transformers>=5'")
    arch = arch_of(model.config)
    # the socket, for messages (the package's own session object has it)
    sock = getattr(client, "socket", None) or getattr(getattr(client, "_s", None), "socket", None)
    where = f"on {sock}" if sock else "on its socket"
    dtype = getattr(model, "dtype", None)
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"moed takes float32 or bfloat16 hidden states, the model is {dtype}; "
                        "load it with dtype=torch.float32 or torch.bfloat16")
    blocks = _blocks(model, arch)
    if not blocks:
        raise ValueError(f"no {arch.block} in the model: nothing for moed to serve")
    info = client.info
    _check_shapes(model, arch, blocks, info, where)
    _warn_semantics(model.config)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
    _check_fingerprint(model, client, checkpoint, verify, where)

    for layer, (parent, attr, block) in blocks.items():
        if not isinstance(block, MoedBlock):
            router = getattr(block, arch.router_attr)
            new = MoedBlock(arch, router, model.config.hidden_size)
            new.train(block.training)
            setattr(parent, attr, new)
            block = new
        block.bind(client, layer)
    return model
