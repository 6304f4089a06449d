# SPDX-License-Identifier: MIT
"""Hugging Face transformers models with their MoE layers served by moed.

    import moed, moed.transformers, torch
    with moed.Client() as client:
        model = moed.transformers.from_pretrained("/models/Qwen3-30B-A3B", client,
                                                  dtype=torch.bfloat16)
        out = model.generate(input_ids, max_new_tokens=32)

``from_pretrained`` loads everything but the routed and shared experts
(they are never allocated) and ``attach`` serves an already loaded model's
MoE blocks from moed; both first check that moed serves this very model.
Architectures: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
deepseek_v3, gpt_oss, glm4_moe, as transformers 5 defines them.  Needs
torch and transformers >= 5 (python/README.md says how to install them).
"""
from ._arch import ARCHS
from ._attach import ModelMismatchError, attach
from ._block import MoedBlock
from ._load import from_pretrained

__all__ = ["ARCHS", "ModelMismatchError", "MoedBlock", "attach", "from_pretrained"]
