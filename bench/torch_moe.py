#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/torch_moe.py: the PyTorch comparison for bench_gpu.

torch_moe.py [--out FILE] [--budget S] [--batches 1,8,...] [--impl I]
             [--device DEV] NAME=HF_DIR...

For each Hugging Face checkpoint (what `moectl gen-model` writes, before
`moectl pack` turns it into the store that bench_gpu times), the first MoE
layer in PyTorch on the same device, with the same weights (bf16; FP8
block-scaled and gpt-oss's MXFP4 weights are dequantized to bf16 once, at
load, as transformers does for a device without kernels of its own for
them: w = e4m3 * weight_scale_inv per 128 x 128 block, or e2m1 *
2^(scale - 127) per 32 inputs, in float32 then rounded to bf16):

  loop     the per-expert loop of Hugging Face's MoE blocks (Mixtral, Qwen3
           MoE): one-hot mask of the routing, for each expert that got
           tokens: index its tokens, down(silu(gate(x)) * up(x)) times the
           routing weight, index_add_ into the output; plus the shared
           expert on every token where the model has one;
  batched  tokens sorted by expert, then torch._grouped_mm (one grouped
           GEMM for gate+up, one for down) where this torch has it and it
           runs here, else torch.bmm over groups padded to the largest
           (which computes every expert, used or not); the rows go back in
           token order and are summed with the routing weights.

Routing is moed's (ARCHITECTURE.md 4.1): float32 logits, softmax (mixtral,
qwen, olmoe, deepseek_v2) or sigmoid with the correction bias and group
limits (deepseek_v3, glm4_moe), top-k, the model's normalisation and
scaling; gpt_oss adds the router bias to the logits, takes the top-k and
the softmax of those k alone, and its experts have biases and the clamped
SwiGLU of GptOssExperts ((up + 1) * gate * sigmoid(alpha * gate), gate
clamped above and up both ways at swiglu_limit).  Routing is part of every
timed forward, as it is of moe_engine_forward.  Inputs are
random bf16 rows already on the device (the usual way PyTorch runs a
layer); the "batched, host f32" column adds what moe_engine_forward's
callers pay: a float32 batch in pageable host memory copied in, and the
float32 output copied back.

Each figure is the median over forwards on fresh slices of a random pool
(CUDA events around each), after two untimed ones.  Prints a table and,
with --out, one line per model and batch size for bench_gpu -t:
  NAME TOKENS LOOP_US BATCHED_US BATCHED_HOST_US
Reads the safetensors files with the `safetensors` package when it is
importable, else with the small reader below (8-byte little-endian header
length, JSON header, raw little-endian data).
"""
import argparse
import importlib.util
import json
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# FP8 checkpoints (DeepSeek-V3, GLM-4.5-FP8, gen-model --quant fp8): torch 2.1 on
FP8 = getattr(torch, "float8_e4m3fn", None)
if FP8 is not None:
    DTYPES["F8_E4M3"] = FP8

# e2m1 (MXFP4) code -> value: sign in bit 3, then 0, .5, 1, 1.5, 2, 3, 4, 6
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]

WARM = 2          # untimed forwards before each measurement
MIN_REPS = 5      # timed forwards, at least ...
MAX_REPS = 200    # ... and at most


def die(msg):
    print(f"torch_moe.py: {msg}", file=sys.stderr)
    sys.exit(1)


# --------------------------------------------------------------------------
# checkpoint reading

class Checkpoint:
    """Tensors of a Hugging Face checkpoint directory, by name, on the CPU."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "config.json")) as f:
            self.config = json.load(f)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                wmap = json.load(f)["weight_map"]
            self.where = {k: os.path.join(path, v) for k, v in wmap.items()}
        else:
            single = os.path.join(path, "model.safetensors")
            self.where = {k: single for k in self._header(single)[0] if k != "__metadata__"}
        self.headers = {}
        self.handles = {}
        if importlib.util.find_spec("safetensors") is not None:
            self.reader = "safetensors package"
        else:
            self.reader = "own safetensors reader"

    @staticmethod
    def _header(path):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)), 8 + n

    def has(self, name):
        return name in self.where

    def get(self, name):
        path = self.where.get(name)
        if path is None:
            die(f"{self.path}: no tensor {name}")
        if self.reader == "safetensors package":
            try:
                from safetensors import safe_open
                if path not in self.handles:
                    self.handles[path] = safe_open(path, framework="pt", device="cpu")
                return self.handles[path].get_tensor(name)
            except Exception as ex:  # an API this script does not know: read it ourselves
                print(f"torch_moe.py: the safetensors package failed ({ex}); reading the files directly",
                      file=sys.stderr)
                self.reader = "own safetensors reader"
        if path not in self.headers:
            self.headers[path] = self._header(path)
        hdr, base = self.headers[path]
        meta = hdr[name]
        if meta["dtype"] not in DTYPES:
            die(f"{path}: {name}: dtype {meta['dtype']} is not supported here")
        a, b = meta["data_offsets"]
        buf = bytearray(b - a)
        with open(path, "rb") as f:
            f.seek(base + a)
            if f.readinto(buf) != b - a:
                die(f"{path}: {name}: file is truncated")
        if not buf:
            return torch.empty(meta["shape"], dtype=DTYPES[meta["dtype"]])
        t = torch.frombuffer(buf, dtype=DTYPES[meta["dtype"]])
        return t.reshape(meta["shape"])


# --------------------------------------------------------------------------
# the layer

ACTS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "gelu_new": lambda v: F.gelu(v, approximate="tanh"),
}


def dequant_fp8(codes, scale, block):
    """w = e4m3(code) * scale of its [bo, bi] block, in float32, as bf16."""
    N, K = codes.shape
    bo, bi = block
    s = scale.float().repeat_interleave(bo, 0)[:N].repeat_interleave(bi, 1)[:, :K]
    return (codes.float() * s).to(torch.bfloat16)


def dequant_mxfp4(blocks, scales):
    """[..., R, G, 16] bytes of two e2m1 codes (low nibble first) and
    [..., R, G] E8M0 exponents (bias 127) -> [..., R, G * 32] bf16."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    v = torch.stack((lo, hi), dim=-1).reshape(*blocks.shape[:-1], 32)
    v = torch.ldexp(v, (scales.long() - 127).unsqueeze(-1).to(torch.int32))
    return v.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32).to(torch.bfloat16)


class Layer:
    """One MoE layer of a checkpoint on @dev: router (float32), experts (bf16)."""

    def matrix(self, ck, name, dev):
        """Weight @name on @dev as bf16; an F8_E4M3 one with its
        weight_scale_inv dequantized."""
        t = ck.get(name)
        if FP8 is not None and t.dtype == FP8:
            sname = name + "_scale_inv"
            if not ck.has(sname):
                die(f"{ck.path}: {name} is F8_E4M3 but {sname} is missing")
            self.formats.add("fp8")
            return dequant_fp8(t.to(dev), ck.get(sname).to(dev), self.block)
        if t.dtype == torch.uint8:
            die(f"{ck.path}: {name} is F8_E4M3 and torch {torch.__version__} has no float8_e4m3fn")
        self.formats.add({torch.bfloat16: "bf16", torch.float16: "f16"}.get(t.dtype, "f32"))
        return t.to(dev, torch.bfloat16)

    def __init__(self, ck, dev):
        c = ck.config
        self.arch = c["model_type"]
        self.H = c["hidden_size"]
        self.formats = set()
        q = c.get("quantization_config") or {}
        self.block = tuple(q.get("weight_block_size") or (128, 128))
        # GptOssConfig: num_experts_per_tok, 4 by default (the release also
        # writes experts_per_token)
        self.k = c.get("num_experts_per_tok", c.get("experts_per_token", 4 if self.arch == "gpt_oss" else None))
        if self.k is None:
            die(f"{ck.path}: no num_experts_per_tok")
        self.act = ACTS.get(c.get("hidden_act", "silu"))
        if self.act is None:
            die(f"{ck.path}: hidden_act {c.get('hidden_act')} is not supported here")
        self.norm = c.get("norm_topk_prob", False)
        self.scale = c.get("routed_scaling_factor", 1.0)
        self.n_group = c.get("n_group", 1) or 1
        self.topk_group = c.get("topk_group", 1) or 1
        self.topk_method = c.get("topk_method", "greedy")
        router = "gate"
        if self.arch == "gpt_oss":
            # GptOssConfig's defaults; hidden_act is not what its experts apply
            self.E = c.get("num_local_experts", 128)
            self.I = c.get("intermediate_size", 2880)
            self.limit = c.get("swiglu_limit", 7.0)
            self.alpha = c.get("swiglu_alpha", 1.702)
            self.norm, self.scale = True, 1.0
            pre, names, router = "mlp", None, "router"
        elif self.arch == "mixtral":
            self.E, self.I = c["num_local_experts"], c["intermediate_size"]
            pre, names = "block_sparse_moe", ("w1", "w3", "w2")
        elif self.arch in ("qwen2_moe", "qwen3_moe", "olmoe"):
            self.E = c["num_experts"]
            self.I = c.get("moe_intermediate_size", c.get("intermediate_size"))
            pre, names = "mlp", ("gate_proj", "up_proj", "down_proj")
        elif self.arch in ("deepseek_v2", "deepseek_v3"):
            self.E, self.I = c["n_routed_experts"], c["moe_intermediate_size"]
            pre, names = "mlp", ("gate_proj", "up_proj", "down_proj")
        elif self.arch == "glm4_moe":
            # Glm4MoeConfig's defaults for absent fields
            self.E = c.get("n_routed_experts", 128)
            self.I = c.get("moe_intermediate_size", 1408)
            self.norm = c.get("norm_topk_prob", True)
            pre, names = "mlp", ("gate_proj", "up_proj", "down_proj")
        else:
            die(f"{ck.path}: model_type {self.arch} is not supported")
        # the first MoE layer: the lowest L with a router (what moectl pack
        # stores first, and bench_gpu times)
        L = next((L for L in range(c["num_hidden_layers"])
                  if ck.has(f"model.layers.{L}.{pre}.{router}.weight")), None)
        if L is None:
            die(f"{ck.path}: no MoE layer found")
        self.layer = L
        p = f"model.layers.{L}.{pre}"
        if self.arch != "gpt_oss" and (ck.has(f"{p}.experts.gate_up_proj") or ck.has(f"{p}.experts.up_proj")):
            die(f"{ck.path}: fused (transformers v5) experts are not supported here")
        E, H, I = self.E, self.H, self.I
        bf = torch.bfloat16
        self.router = ck.get(f"{p}.{router}.weight").to(dev, torch.float32)
        self.bias = None
        if self.arch in ("deepseek_v3", "glm4_moe"):
            self.bias = ck.get(f"{p}.gate.e_score_correction_bias").to(dev, torch.float32)
        if self.arch == "gpt_oss":
            self.bias = ck.get(f"{p}.router.bias").to(dev, torch.float32)
        # expert biases [E, 2I] (gate, then up) and [E, H]: gpt_oss only
        self.b13 = self.b2 = None
        # stacked as the batched code wants them; the loop uses views of the
        # same storage (one copy of the weights on the device)
        if self.arch == "gpt_oss":
            self.gated = True
            self.load_gpt_oss(ck, p, dev)
        else:
            self.gated = ck.has(f"{p}.experts.0.{names[0]}.weight")
            rows = 2 * I if self.gated else I
            self.w13 = torch.empty(E, rows, H, dtype=bf, device=dev)
            self.w2 = torch.empty(E, H, I, dtype=bf, device=dev)
            for j in range(E):
                if self.gated:
                    self.w13[j, :I] = self.matrix(ck, f"{p}.experts.{j}.{names[0]}.weight", dev)
                    self.w13[j, I:] = self.matrix(ck, f"{p}.experts.{j}.{names[1]}.weight", dev)
                else:
                    self.w13[j] = self.matrix(ck, f"{p}.experts.{j}.{names[1]}.weight", dev)
                self.w2[j] = self.matrix(ck, f"{p}.experts.{j}.{names[2]}.weight", dev)
        # shared expert(s), in their own dtype (FP8 or not, as the release
        # quantized them)
        self.shared = None
        self.shared_gate = None
        sp = {"qwen2_moe": f"{p}.shared_expert", "deepseek_v2": f"{p}.shared_experts",
              "deepseek_v3": f"{p}.shared_experts", "glm4_moe": f"{p}.shared_experts"}.get(self.arch)
        if sp and ck.has(f"{sp}.down_proj.weight"):
            g = self.matrix(ck, f"{sp}.gate_proj.weight", dev) if ck.has(f"{sp}.gate_proj.weight") else None
            self.shared = (g, self.matrix(ck, f"{sp}.up_proj.weight", dev),
                           self.matrix(ck, f"{sp}.down_proj.weight", dev))
            if self.arch == "qwen2_moe":
                self.shared_gate = ck.get(f"{p}.shared_expert_gate.weight").to(dev, torch.float32)
        self.expert_bytes = (self.w13[0].numel() + self.w2[0].numel()) * 2

    def load_gpt_oss(self, ck, p, dev):
        """GptOssExperts' weights as moed stores them: gate [I][H] and up
        [I][H] from the interleaved columns (gate even, up odd) of the
        input-major gate_up_proj [E, H, 2I], down [H][I] from down_proj
        [E, I, H]; the MXFP4 release holds them output-major as *_blocks
        and *_scales ([E, 2I, H/32, 16] and [E, H, I/32, 16])."""
        E, H, I = self.E, self.H, self.I
        bf = torch.bfloat16
        self.w13 = torch.empty(E, 2 * I, H, dtype=bf, device=dev)
        self.w2 = torch.empty(E, H, I, dtype=bf, device=dev)
        x = f"{p}.experts"
        if ck.has(f"{x}.gate_up_proj_blocks"):
            self.formats.add("mxfp4")
            gub, gus = ck.get(f"{x}.gate_up_proj_blocks"), ck.get(f"{x}.gate_up_proj_scales")
            dnb, dns = ck.get(f"{x}.down_proj_blocks"), ck.get(f"{x}.down_proj_scales")
            for j in range(E):      # one expert at a time: bounded float32 temporaries
                gu = dequant_mxfp4(gub[j].to(dev), gus[j].to(dev))    # [2I, H]
                self.w13[j, :I] = gu[0::2]
                self.w13[j, I:] = gu[1::2]
                self.w2[j] = dequant_mxfp4(dnb[j].to(dev), dns[j].to(dev))  # [H, I]
        else:
            gu_all = ck.get(f"{x}.gate_up_proj")
            dn_all = ck.get(f"{x}.down_proj")
            self.formats.add({torch.bfloat16: "bf16", torch.float16: "f16"}.get(gu_all.dtype, "f32"))
            for j in range(E):
                gu = gu_all[j].to(dev, bf)                 # [H, 2I]
                self.w13[j, :I] = gu[:, 0::2].t()
                self.w13[j, I:] = gu[:, 1::2].t()
                self.w2[j] = dn_all[j].to(dev, bf).t()     # [I, H] -> [H, I]
        b = ck.get(f"{x}.gate_up_proj_bias").to(dev, bf)   # [E, 2I] interleaved
        self.b13 = torch.cat((b[:, 0::2], b[:, 1::2]), dim=1).contiguous()
        self.b2 = ck.get(f"{x}.down_proj_bias").to(dev, bf)

    def glu(self, g, u):
        """The gated activation of the expert: act(gate) * up, or gpt_oss's
        clamped SwiGLU (GptOssExperts)."""
        if self.arch != "gpt_oss":
            return self.act(g) * u
        g = g.clamp(max=self.limit)
        u = u.clamp(min=-self.limit, max=self.limit)
        return (u + 1) * (g * torch.sigmoid(g * self.alpha))

    # --- routing (ARCHITECTURE.md 4.1) -------------------------------------
    def route(self, x):
        s = x.float() @ self.router.t()
        n, E, k = s.shape[0], self.E, self.k
        if self.arch == "gpt_oss":
            # GptOssTopKRouter: top-k of the biased logits, softmax of those k
            v, ids = (s + self.bias).topk(k, dim=-1)
            return ids, v.softmax(-1)
        if self.arch in ("deepseek_v3", "glm4_moe"):
            p = s.sigmoid()
            b = p + self.bias
            if self.n_group > 1:
                G = self.n_group
                g = b.view(n, G, E // G).topk(2, dim=-1).values.sum(-1)
                keep = g.topk(self.topk_group, dim=-1).indices
                mask = torch.zeros(n, G, dtype=torch.bool, device=s.device).scatter_(1, keep, True)
                b = b.masked_fill(~mask.repeat_interleave(E // G, dim=1), float("-inf"))
            ids = b.topk(k, dim=-1).indices
            w = p.gather(1, ids)
            # glm4_moe (transformers' Glm4MoeMoE) normalises even at k = 1
            if self.norm and (k > 1 or self.arch == "glm4_moe"):
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return ids, w * self.scale
        p = s.softmax(-1)
        if self.arch == "deepseek_v2":
            if self.topk_method == "group_limited_greedy" and self.n_group > 1:
                G = self.n_group
                g = p.view(n, G, E // G).max(dim=-1).values
                keep = g.topk(self.topk_group, dim=-1).indices
                mask = torch.zeros(n, G, dtype=torch.bool, device=s.device).scatter_(1, keep, True)
                p = p.masked_fill(~mask.repeat_interleave(E // G, dim=1), 0.0)
            w, ids = p.topk(k, dim=-1)
            if k > 1 and self.norm:
                return ids, w / (w.sum(-1, keepdim=True) + 1e-20)
            return ids, w * self.scale
        w, ids = p.topk(k, dim=-1)
        if self.arch == "mixtral" or self.norm:
            w = w / w.sum(-1, keepdim=True)
        return ids, w

    def shared_out(self, x):
        g, u, d = self.shared
        h = self.act(F.linear(x, g)) * F.linear(x, u) if g is not None else self.act(F.linear(x, u))
        y = F.linear(h, d)
        if self.shared_gate is not None:
            y = y * torch.sigmoid(x.float() @ self.shared_gate.t()).to(y.dtype)
        return y

    # --- Hugging Face's per-expert loop ------------------------------------
    def forward_loop(self, x):
        n, H, I = x.shape[0], self.H, self.I
        ids, w = self.route(x)
        w = w.to(x.dtype)
        out = torch.zeros((n, H), dtype=x.dtype, device=x.device)
        mask = F.one_hot(ids, num_classes=self.E).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        for e in hit:
            idx, top_x = torch.where(mask[e])
            cur = x[top_x]
            b13 = self.b13[e] if self.b13 is not None else None
            if self.gated:
                h = self.glu(F.linear(cur, self.w13[e, :I], None if b13 is None else b13[:I]),
                             F.linear(cur, self.w13[e, I:], None if b13 is None else b13[I:]))
            else:
                h = self.act(F.linear(cur, self.w13[e]))
            y = F.linear(h, self.w2[e], None if self.b2 is None else self.b2[e]) * w[top_x, idx, None]
            out.index_add_(0, top_x, y.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared_out(x)
        return out

    # --- sorted by expert, grouped GEMMs ------------------------------------
    def forward_batched(self, x, impl):
        n, H, I, k = x.shape[0], self.H, self.I, self.k
        ids, w = self.route(x)
        flat = ids.reshape(-1)
        srt, order = torch.sort(flat, stable=True)
        tok = order // k
        xs = x[tok]
        counts = torch.bincount(flat, minlength=self.E)
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)
            if self.b13 is not None:
                h = h + self.b13[srt]
            a = self.glu(h[:, :I], h[:, I:]) if self.gated else self.act(h)
            y = torch._grouped_mm(a, self.w2.transpose(1, 2), offs=offs)
            if self.b2 is not None:
                y = y + self.b2[srt]
        else:
            maxc = int(counts.max())
            starts = counts.cumsum(0) - counts
            pos = torch.arange(n * k, device=x.device) - starts[srt]
            buf = torch.zeros((self.E, maxc, H), dtype=x.dtype, device=x.device)
            buf[srt, pos] = xs
            h = torch.bmm(buf, self.w13.transpose(1, 2))
            if self.b13 is not None:
                h = h + self.b13[:, None, :]
            a = self.glu(h[..., :I], h[..., I:]) if self.gated else self.act(h)
            y = torch.bmm(a, self.w2.transpose(1, 2))
            if self.b2 is not None:
                y = y + self.b2[:, None, :]
            y = y[srt, pos]
        y = y * w.reshape(-1)[order, None].to(y.dtype)
        back = torch.empty_like(y)
        back[order] = y
        out = back.view(n, k, H).sum(1)
        if self.shared is not None:
            out = out + self.shared_out(x)
        return out


# --------------------------------------------------------------------------
# timing

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, make_input, dev, budget):
    """Median seconds of fn(make_input()) over fresh inputs."""
    times = []
    spent = 0.0
    it = -WARM
    while it < MAX_REPS and (it < MIN_REPS or spent < budget):
        x = make_input()
        sync(dev)
        if dev.type == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) * 1e-3
        else:
            t0 = time.perf_counter()
            fn(x)
            dt = time.perf_counter() - t0
        if it >= 0:
            times.append(dt)
            spent += dt
        it += 1
    times.sort()
    m = len(times)
    return times[m // 2] if m % 2 else 0.5 * (times[m // 2 - 1] + times[m // 2])


def choose_impl(layer, dev, want):
    """grouped_mm where it exists, runs and agrees with bmm; else bmm."""
    if want == "bmm":
        return "bmm", "torch.bmm over groups padded to the largest (every expert computed)"
    why = ""
    if not hasattr(torch, "_grouped_mm"):
        why = f"torch {torch.__version__} has no torch._grouped_mm"
    else:
        try:
            g = torch.Generator(device=dev).manual_seed(1)
            x = torch.randn(37, layer.H, generator=g, device=dev).to(torch.bfloat16)
            a = layer.forward_batched(x, "grouped_mm").float()
            b = layer.forward_batched(x, "bmm").float()
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            if err > 2e-2:
                why = f"torch._grouped_mm disagrees with bmm here (relative error {err:.3g})"
        except (RuntimeError, NotImplementedError, TypeError) as ex:
            why = f"torch._grouped_mm fails here: {str(ex).splitlines()[0]}"
    if not why:
        return "grouped_mm", "torch._grouped_mm over tokens sorted by expert (gate+up, then down)"
    if want == "grouped_mm":
        die(why)
    return "bmm", f"torch.bmm over groups padded to the largest (every expert computed; {why})"


def slicer(src, n, starts):
    """A function giving src[s:s + n] for each s of @starts in turn."""
    it = iter(starts)

    def nxt():
        s = next(it)
        return src[s:s + n]
    return nxt


def bench_model(label, path, dev, args, batches):
    """Time one checkpoint's layer; returns the lines for --out."""
    t0 = time.time()
    ck = Checkpoint(path)
    layer = Layer(ck, dev)
    sync(dev)
    load_s = time.time() - t0
    impl, note = choose_impl(layer, dev, args.impl)
    lines = [f"# batched: {note}"]
    stored = "+".join(sorted(layer.formats))
    lines.append(f"# {label}: weights {stored} in the checkpoint, bf16 in PyTorch"
                 f"{' (dequantized at load)' if layer.formats - {'bf16'} else ''}")
    print(f"\n{label} ({layer.arch}), layer {layer.layer}: hidden {layer.H}, {layer.E} experts of "
          f"{layer.I} ({layer.expert_bytes / 1e6:.1f} MB each in bf16; checkpoint {stored}"
          f"{', dequantized at load' if layer.formats - {'bf16'} else ''}), top-{layer.k}"
          f"{', shared expert' if layer.shared is not None else ''}; read with the {ck.reader} "
          f"in {load_s:.1f} s")
    print(f"  batched: {note}")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    pool_rows = max(batches) + 4096
    pool = torch.randn(pool_rows, layer.H, generator=gen, device=dev).to(torch.bfloat16)
    pool_host = pool.float().cpu()
    out_host = torch.empty(max(batches), layer.H, dtype=torch.float32)

    with torch.no_grad():
        # the two implementations agree (a check of this script, not of moed)
        x = pool[:64]
        a, b = layer.forward_loop(x).float(), layer.forward_batched(x, impl).float()
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        print(f"  loop vs batched on 64 tokens: relative L2 difference {rel:.2e}"
              f"{'  <- TOO LARGE: a bug in this script' if rel > 2e-2 else ''}")

        print(f"  {'tokens':>6} {'loop us':>10} {'batched us':>11} {'batched, host f32 us':>21}  {'took':>6}")
        for n in batches:
            t1 = time.time()
            g = torch.Generator().manual_seed(n)
            starts = torch.randint(0, pool_rows - n + 1, (MAX_REPS + WARM,), generator=g).tolist()

            def host_batched(xh, n=n):
                y = layer.forward_batched(xh.to(dev).to(torch.bfloat16), impl)
                out_host[:n].copy_(y.float())

            t_loop = time_fn(layer.forward_loop, slicer(pool, n, starts), dev, args.budget)
            t_bat = time_fn(lambda v: layer.forward_batched(v, impl), slicer(pool, n, starts), dev,
                            args.budget)
            t_host = time_fn(host_batched, slicer(pool_host, n, starts), dev, args.budget)
            print(f"  {n:6d} {t_loop * 1e6:10.1f} {t_bat * 1e6:11.1f} {t_host * 1e6:21.1f}  "
                  f"{time.time() - t1:5.1f}s", flush=True)
            lines.append(f"{label} {n} {t_loop * 1e6:.1f} {t_bat * 1e6:.1f} {t_host * 1e6:.1f}")
    print(f"  ({label} took {time.time() - t0:.1f} s)")
    return lines


def main():
    ap = argparse.ArgumentParser(description="PyTorch MoE layer timings for bench_gpu -t")
    ap.add_argument("models", nargs="+", metavar="NAME=HF_DIR")
    ap.add_argument("--out", help="write the figures for bench_gpu -t here")
    ap.add_argument("--budget", type=float, default=0.3, help="timed seconds per figure (default 0.3)")
    ap.add_argument("--batches", default="1,8,64,512,4096")
    ap.add_argument("--impl", choices=("auto", "grouped_mm", "bmm"), default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    models = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        if not label or not path:
            die(f"expected NAME=HF_DIR, got {spec}")
        models.append((label, path))
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("torch_moe.py: no CUDA device for torch: skipped", file=sys.stderr)
        sys.exit(77)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        name = torch.cuda.get_device_name(dev)
    else:
        name = "CPU"
    # the router's float32 logits in float32, as moed computes them
    torch.backends.cuda.matmul.allow_tf32 = False
    clock = "CUDA events" if dev.type == "cuda" else "perf_counter"
    print(f"PyTorch comparison: torch {torch.__version__} on {name}; medians of times by {clock}, "
          f"{args.budget} s per figure")
    t_all = time.time()
    lines = [f"# torch_moe.py: torch {torch.__version__} on {name}"]
    for label, path in models:
        lines += bench_model(label, path, dev, args, batches)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"torch_moe.py took {time.time() - t_all:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
