#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Serve one model to several generating Python processes with one moed.

Each process loads the model with moed.transformers.from_pretrained: the
attention, norms, embeddings and routers are its own, the experts are
never loaded; every MoE layer goes to moed, which holds the one copy of
the experts and batches the processes' tokens together.  The script
prints each process's tokens/s and resident memory, and what the whole
model would take in each of them.

    python3 examples/python_serve.py                      # a small random qwen3_moe model
    python3 examples/python_serve.py --checkpoint DIR     # a Hugging Face checkpoint
    python3 examples/python_serve.py --socket /run/moed/moed.sock --checkpoint DIR
                                                          # a moed already serving DIR

Without --socket it packs the checkpoint with moectl and starts a moed of
its own on a temporary socket ($MOECTL and $MOED, else BUILD_DIR's or the
source tree's build, else $PATH).  Needs torch and transformers >= 5, and
the moed package (PYTHONPATH=python and MOED_LIBRARY for an uninstalled
build; python/README.md).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)

# Before torch is imported here or in the generating processes: torch's
# OpenMP threads would otherwise spin for milliseconds after each operator,
# on the cores moed computes on while a process waits for it
# (python/README.md, "Run a model").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def find_tool(name: str, env: str, sub: str) -> str:
    """$ENV, then BUILD_DIR/sub/name, the source tree's build, ./build, $PATH."""
    if os.environ.get(env):
        return os.environ[env]
    for base in (os.environ.get("BUILD_DIR"), SRC, os.path.join(SRC, "build")):
        if base and os.access(os.path.join(base, sub, name), os.X_OK):
            return os.path.join(base, sub, name)
    found = shutil.which(name)
    if not found:
        sys.exit(f"python_serve: no {name}: build moed (./bootstrap.sh demo) or set {env}")
    return found


def random_checkpoint(path: str, dtype: str) -> None:
    """A small random qwen3_moe model saved by transformers: 4 layers of 32
    experts, hidden 512 (200 MB of experts in float32)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=2048, hidden_size=512, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                               intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
                               num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(path)


class Moed:
    """moectl pack CHECKPOINT, then a moed serving it on a temporary socket."""

    def __init__(self, checkpoint: str, work: str) -> None:
        moectl = find_tool("moectl", "MOECTL", "client")
        moed_bin = find_tool("moed", "MOED", "daemon")
        store = os.path.join(work, "model.moe")
        self.socket = os.path.join(work, "moed.sock")
        self.log = os.path.join(work, "moed.log")
        r = subprocess.run([moectl, "pack", checkpoint, "-o", store], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"python_serve: moectl pack {checkpoint}: {r.stderr.strip()}")
        conf = os.path.join(work, "moed.conf")
        mb = os.path.getsize(store) // (1 << 20) + 64
        with open(conf, "w") as f:
            f.write(f'model = "{store}";\nbackend = "cpu";\ncache = {{ host_mb = {mb}; }};\n'
                    f'socket = {{ path = "{self.socket}"; mode = "0600"; group = ""; }};\n')
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([moed_bin, "--config", conf], stdout=log, stderr=log)
        import moed

        for _ in range(300):
            if self.proc.poll() is not None:
                sys.exit(f"python_serve: moed exited: {open(self.log).read()}")
            try:
                moed.Client(self.socket).close()
                return
            except moed.MoedError:
                time.sleep(0.1)
        self.stop()
        sys.exit(f"python_serve: moed does not answer on {self.socket}")

    def rss(self) -> int:
        return proc_status(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def proc_status(pid, key: str) -> int:
    """A /proc/PID/status size field (VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(rank: int, checkpoint: str, socket: str, dtype: str, tokens: int, threads: int,
           start, results) -> None:
    import torch
    import transformers

    import moed
    import moed.transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with moed.Client(socket) as client:
        model = moed.transformers.from_pretrained(checkpoint, client, dtype=getattr(torch, dtype))
        load_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=g)
        gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)   # warm up
            start.wait()                 # all processes generate at once
            t1 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **gen)
            dt = time.perf_counter() - t1
    results.put({"rank": rank, "tokens_per_s": tokens / dt, "load_s": load_s,
                 "rss": proc_status("self", "VmRSS"), "peak": proc_status("self", "VmHWM"),
                 "first": out[0, 16:24].tolist()})


def checkpoint_bytes(path: str) -> tuple[int, int]:
    """(all tensors, what moed serves) of a safetensors checkpoint, from the headers."""
    from safetensors import safe_open

    total = served = 0
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                size = n * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 1)
                total += size
                if ".experts." in k or ".shared_expert" in k:
                    served += size
    return total, served


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a Hugging Face checkpoint directory "
                    "(default: a small random qwen3_moe model)")
    ap.add_argument("--socket", help="a moed already serving the checkpoint (default: start one)")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="tokens each process generates")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    if args.socket and not args.checkpoint:
        ap.error("--socket needs --checkpoint: the model moed serves")

    work = tempfile.mkdtemp(prefix="moed-serve-")
    server = None
    try:
        ckpt = args.checkpoint
        if not ckpt:
            ckpt = os.path.join(work, "qwen3_moe")
            print("python_serve: a random qwen3_moe checkpoint (4 layers, 32 experts, hidden 512)")
            random_checkpoint(ckpt, args.dtype)
        socket = args.socket
        if not socket:
            server = Moed(ckpt, work)
            socket = server.socket
            print(f"python_serve: moed serves {ckpt} on {socket}")
        total, served = checkpoint_bytes(ckpt)

        ctx = mp.get_context("spawn")    # no fork: a Client must not cross one
        start = ctx.Barrier(args.processes)
        results = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, ckpt, socket, args.dtype, args.tokens,
                                                  args.threads, start, results))
                 for r in range(args.processes)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        rows = [results.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
        wall = time.perf_counter() - t0
        if any(p.exitcode for p in procs):
            sys.exit("python_serve: a generating process failed")
    finally:
        if server:
            moed_rss = server.rss()
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    mib = 1 << 20
    print(f"\n{args.processes} processes, {args.tokens} tokens each, greedy, {args.dtype}, "
          f"{args.threads} torch thread(s) each")
    print(f"{'process':>8} {'tokens/s':>9} {'load s':>7} {'RSS MiB':>8} {'peak MiB':>9}  first tokens")
    for r in sorted(rows, key=lambda r: r["rank"]):
        print(f"{r['rank']:>8} {r['tokens_per_s']:9.1f} {r['load_s']:7.2f} {r['rss'] / mib:8.0f} "
              f"{r['peak'] / mib:9.0f}  {r['first']}")
    print(f"{'all':>8} {sum(r['tokens_per_s'] for r in rows):9.1f}   (wall {wall:.1f} s)")
    print(f"the checkpoint's tensors: {total / mib:.0f} MiB, of which {served / mib:.0f} MiB are experts "
          f"moed serves; each process above holds none of them")
    if server:
        print(f"moed's resident memory: {moed_rss / mib:.0f} MiB (one copy for all processes)")


if __name__ == "__main__":
    main()
