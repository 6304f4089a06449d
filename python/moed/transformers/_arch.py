# SPDX-License-Identifier: MIT
"""What moed.transformers knows about each architecture moed serves.

One row per transformers ``model_type``: the class of its MoE block in the
installed modeling module (the module the decoder layer builds), the name
of the block's router submodule (kept in Python: its weights are small and
checkpoint keys and output recorders find it under that name), the config
field of the expert FFN's intermediate size, and whether the block returns
a tuple.  These are transformers 5's classes (fused experts, separate
router modules); transformers 4's blocks differ and are refused.
"""
from __future__ import annotations

import dataclasses
import importlib
import re


@dataclasses.dataclass(frozen=True)
class Arch:
    model_type: str
    block: str            # the MoE block's class in modeling_<model_type>.py
    router_attr: str      # the block's router submodule: "gate" or "router"
    router: str           # the router's class (an OutputRecorder target)
    intermediate: str     # config field of one routed expert's intermediate size
    returns_scores: bool  # the block returns (hidden, router_scores), not hidden


ARCHS: dict[str, Arch] = {a.model_type: a for a in (
    Arch("mixtral", "MixtralSparseMoeBlock", "gate", "MixtralTopKRouter",
         "intermediate_size", False),
    Arch("qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", "Qwen2MoeTopKRouter",
         "moe_intermediate_size", False),
    Arch("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", "Qwen3MoeTopKRouter",
         "moe_intermediate_size", False),
    Arch("olmoe", "OlmoeSparseMoeBlock", "gate", "OlmoeTopKRouter",
         "intermediate_size", False),
    Arch("deepseek_v2", "DeepseekV2Moe", "gate", "DeepseekV2TopkRouter",
         "moe_intermediate_size", False),
    Arch("deepseek_v3", "DeepseekV3MoE", "gate", "DeepseekV3TopkRouter",
         "moe_intermediate_size", False),
    # GptOssMLP returns (hidden, router_scores); the decoder layer drops the
    # scores, but the block's contract is the tuple.
    Arch("gpt_oss", "GptOssMLP", "router", "GptOssTopKRouter",
         "intermediate_size", True),
    Arch("glm4_moe", "Glm4MoeMoE", "gate", "Glm4MoeTopkRouter",
         "moe_intermediate_size", False),
)}

# Where a decoder layer keeps its feed-forward block: model.layers.L.mlp in
# every supported architecture (transformers 5 renamed mixtral's
# block_sparse_moe; its checkpoints keep the old name, which transformers'
# own key mapping handles when loading).
_BLOCK_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")

# Checkpoint keys (after transformers' renaming) of what moed serves: routed
# experts, shared experts and qwen2_moe's shared-expert gate.  They are left
# unloaded by from_pretrained.
SERVED_KEYS = r"\.mlp\.(experts|shared_experts?|shared_expert_gate)\."


def arch_of(config) -> Arch:
    """The row for @config's model_type, or ValueError naming the supported ones."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"model_type {mt!r} is not served by moed.transformers "
                         f"(supported: {', '.join(ARCHS)})")
    return ARCHS[mt]


def modeling_module(arch: Arch):
    """transformers.models.<type>.modeling_<type>, checked to have the
    classes this table names (otherwise the installed transformers is one
    this module was not written for)."""
    import transformers

    name = f"transformers.models.{arch.model_type}.modeling_{arch.model_type}"
    mod = importlib.import_module(name)
    for cls in (arch.block, arch.router):
        if not hasattr(mod, cls):
            raise ImportError(
                f"{name} has no class {cls}: moed.transformers needs transformers 5 "
                f"(found {transformers.__version__}); pip install 'transformers>=5'")
    return mod


def block_layer(name: str) -> int | None:
    """The decoder layer number of a module named model.layers.L.mlp, else None."""
    m = _BLOCK_PATH.search(name)
    return int(m.group(1)) if m else None
