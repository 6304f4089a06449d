# SPDX-License-Identifier: MIT
"""from_pretrained(): load a model without its experts, then attach moed.

transformers builds the model on the meta device and then materialises
only the checkpoint tensors that match a parameter of the model.  So the
MoE block class that the decoder layers build is swapped, for the length of
the call, for one that holds only the router: the routed and shared
experts' tensors then match nothing, are never read from the safetensors
files and never allocated; transformers' own key mapping (mixtral's
block_sparse_moe, fused or per-expert layouts) still places the router.
"""
from __future__ import annotations

import contextlib
import os
import threading

from torch import nn

from ._arch import SERVED_KEYS, Arch, arch_of, modeling_module
from ._attach import attach
from ._block import MoedBlock

# The swap changes module globals of transformers: one load at a time.
_swap_lock = threading.Lock()


@contextlib.contextmanager
def _experts_left_out(arch: Arch):
    mod = modeling_module(arch)
    router_cls = getattr(mod, arch.router)

    def empty_block(config, *args, **kwargs):
        return MoedBlock(arch, router_cls(config), config.hidden_size)

    # the architecture's PreTrainedModel: every head class inherits from
    # it, and its _keys_to_ignore_on_load_unexpected keeps the expert keys
    # out of transformers' load report ("unexpected keys")
    bases = [c for c in vars(mod).values()
             if isinstance(c, type) and c.__module__ == mod.__name__
             and c.__name__.endswith("PreTrainedModel")]
    with _swap_lock:
        saved_block = getattr(mod, arch.block)
        saved_ignore = [(c, c.__dict__.get("_keys_to_ignore_on_load_unexpected", None),
                         "_keys_to_ignore_on_load_unexpected" in c.__dict__) for c in bases]
        setattr(mod, arch.block, empty_block)
        for c, old, _ in saved_ignore:
            inherited = old if old is not None else getattr(c, "_keys_to_ignore_on_load_unexpected")
            c._keys_to_ignore_on_load_unexpected = list(inherited or []) + [SERVED_KEYS]
        try:
            yield
        finally:
            setattr(mod, arch.block, saved_block)
            for c, old, had in saved_ignore:
                if had:
                    c._keys_to_ignore_on_load_unexpected = old
                else:
                    del c._keys_to_ignore_on_load_unexpected


def _checkpoint_dir(path) -> str | None:
    """The local directory of @path (a directory, or a Hub id already in
    the local cache), for the fingerprint check; None if there is none."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        return None


def from_pretrained(path: str | os.PathLike, client, *, verify: bool = True,
                    model_class=None, **kwargs) -> nn.Module:
    """Load a transformers model without its routed and shared experts and
    serve its MoE layers from moed.

    ``path`` is what ``AutoModelForCausalLM.from_pretrained`` takes; the
    other keyword arguments go to it (``dtype=torch.bfloat16``...).
    ``model_class`` (default ``transformers.AutoModelForCausalLM``) picks
    another head.  The experts are never allocated: only the router of each
    MoE block, the attention, norms, embeddings and dense layers are read.
    Then ``attach(model, client, checkpoint=path, verify=verify)`` checks
    that moed serves this checkpoint and binds the blocks.

    Raises ModelMismatchError (before reading any weight when the config
    alone shows it) if moed serves another model; ValueError if the
    checkpoint lacks tensors the model needs.
    """
    import transformers

    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(
            path, trust_remote_code=kwargs.get("trust_remote_code", False))
    arch = arch_of(config)
    info = client.info
    if info.model_type != config.model_type:
        from ._attach import ModelMismatchError

        raise ModelMismatchError(
            f"{os.fspath(path)} is a {config.model_type} model but moed serves "
            f"{info.model_type}; start moed on the store packed from this checkpoint")
    kwargs.pop("output_loading_info", None)
    with _experts_left_out(arch):
        model, loading = model_class.from_pretrained(path, config=config,
                                                     output_loading_info=True, **kwargs)
    missing = sorted(loading.get("missing_keys", ()))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{os.fspath(path)}: the checkpoint lacks {len(missing)} tensor(s) the "
                         f"model needs besides the experts: {shown}")
    mismatched = loading.get("mismatched_keys") or ()
    if mismatched:
        raise ValueError(f"{os.fspath(path)}: tensors of the wrong shape: "
                         f"{', '.join(str(m) for m in list(mismatched)[:8])}")
    model.eval()
    ckpt = _checkpoint_dir(path)
    return attach(model, client, checkpoint=ckpt if ckpt else os.fspath(path), verify=verify)


__all__ = ["from_pretrained"]
