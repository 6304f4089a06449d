#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench/bench_hf.py: transformers with moed against transformers alone, CPU.

A Qwen3-30B-A3B-shaped model cut to 4 layers (hidden 2048, 128 experts of
768, top 8, 32 query heads and 4 KV heads of 128, as released; vocabulary
1024 so that the head does not dominate), random, saved by transformers in
bfloat16 and packed by moectl.  Each configuration runs in a fresh process,
one after the other:

  alone float32 / bfloat16   transformers' own model (eager attention);
                             the faster of the two is the anchor
  moed float32 / bfloat16    moed.transformers.from_pretrained (no experts in
                             the process) against a moed serving the store

Greedy decode tokens/s (after a 16-token prompt: the time of N + 1 new
tokens minus that of 1, so prefill is left out), and the resident memory of
each process (VmRSS after generating, and the same less the process's RSS
after importing torch and transformers).  Targets (issue 12): decode >= 3x
the anchor; a client process <= 15% of the memory the whole model takes.

    PYTHONPATH=python MOED_LIBRARY=build/libmoeclient/.libs/libmoeclient.so.0 \\
        python3 bench/bench_hf.py [--quick] [--tokens N] [--threads T]

moectl and moed: $MOECTL and $MOED, else BUILD_DIR (default ./build).
About 10 GB of memory at full size (float32 alone), 10 GB of disk in
$TMPDIR.  --quick: 16 experts, for checking that it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name: str, env: str, sub: str) -> str:
    if os.environ.get(env):
        return os.environ[env]
    build = os.environ.get("BUILD_DIR", os.path.join(SRC, "build"))
    path = os.path.join(build, sub, name)
    if not os.access(path, os.X_OK):
        sys.exit(f"bench_hf: no {path}: build moed (./bootstrap.sh demo) or set {env}/BUILD_DIR")
    return path


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_checkpoint(path: str, experts: int, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=1024, hidden_size=2048, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=experts, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def child(args) -> None:
    """One configuration, in its own process; prints one JSON line."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    base = status("VmRSS")
    client = None
    if args.socket:
        import moed
        import moed.transformers

        client = moed.Client(args.socket)
        model = moed.transformers.from_pretrained(args.checkpoint, client, dtype=dtype,
                                                  attn_implementation="eager")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.checkpoint, dtype=dtype, attn_implementation="eager").eval()
    ids = torch.randint(1, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    # the time spent in the MoE blocks (transformers' own, or moed's
    # MoedBlock): Amdahl's bound on what serving the experts faster can gain
    in_moe = [0.0, 0.0]                      # total, start of the block running

    def pre(_mod, _inp):
        in_moe[1] = time.perf_counter()

    def post(_mod, _inp, _out):
        in_moe[0] += time.perf_counter() - in_moe[1]

    for m in model.modules():
        name = type(m).__name__
        if name.endswith("SparseMoeBlock") or name == "MoedBlock":
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)

    def run(n):
        in_moe[0] = 0.0
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
        return time.perf_counter() - t, in_moe[0], out

    run(2)                                   # warm up (and moed's cache)
    t1, m1, _ = min((run(1) for _ in range(2)), key=lambda r: r[0])
    tn, mn, out = run(args.tokens + 1)
    print(json.dumps({"tokens_per_s": args.tokens / max(tn - t1, 1e-9), "rss": status("VmRSS"),
                      "moe_share": (mn - m1) / max(tn - t1, 1e-9),
                      "peak": status("VmHWM"), "base": base, "tokens": out[0, 16:].tolist()}))
    if client:
        client.close()


def child_env() -> dict:
    """The environment of every configuration, the anchor's included.
    torch's OpenMP threads (libgomp) spin for about 300000 rounds after
    each parallel region before they sleep: milliseconds of two cores that
    moed needs right then, when the client waits for a MoE layer on the
    same cores.  10000 rounds keep the spin under the time between torch's
    operators (measured here: moed's runs 1.2-1.3x faster, the anchor no
    slower).  The caller's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "10000")
    return env


def run_child(ckpt: str, dtype: str, socket: str | None, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", ckpt, "--dtype", dtype,
           "--tokens", str(a.tokens), "--threads", str(a.threads)]
    if socket:
        cmd += ["--socket", socket]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if r.returncode:
        sys.exit(f"bench_hf: {' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 experts: check that it runs")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--keep", help="build the checkpoint and store here and keep them (reused)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--socket", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    experts = 16 if a.quick else 128
    work = a.keep or tempfile.mkdtemp(prefix="moed-bench-hf-")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, f"qwen3-30b-a3b-{a.layers}l-{experts}e")
    store = ckpt + ".moe"
    moed_proc = None
    try:
        if not os.path.exists(os.path.join(ckpt, "config.json")):
            print(f"bench_hf: building the checkpoint ({experts} experts, {a.layers} layers, bf16)",
                  file=sys.stderr)
            make_checkpoint(ckpt, experts, a.layers)
        if not os.path.exists(store):
            subprocess.run([tool("moectl", "MOECTL", "client"), "pack", ckpt, "-o", store],
                           check=True, stdout=subprocess.DEVNULL)
        res = {}
        for dtype in ("float32", "bfloat16"):
            res[("alone", dtype)] = run_child(ckpt, dtype, None, a)

        sock = os.path.join(work, "moed.sock")
        conf = os.path.join(work, "moed.conf")
        # every expert pinned, so read at start: transformers alone holds the
        # whole model in memory too, and a cold cache would time the disk
        pins = ", ".join(f'"{layer}:*"' for layer in range(a.layers))
        with open(conf, "w") as f:
            f.write(f'model = "{store}";\nbackend = "cpu";\n'
                    f'cache = {{ host_mb = {os.path.getsize(store) // (1 << 20) + 256}; pin = [ {pins} ]; }};\n'
                    f'socket = {{ path = "{sock}"; mode = "0600"; group = ""; }};\n')
        log = open(os.path.join(work, "moed.log"), "w")
        moed_proc = subprocess.Popen([tool("moed", "MOED", "daemon"), "--config", conf],
                                     stdout=log, stderr=log)
        import moed

        for _ in range(600):
            try:
                moed.Client(sock).close()
                break
            except moed.MoedError:
                if moed_proc.poll() is not None:
                    sys.exit(f"bench_hf: moed exited; see {log.name}")
                time.sleep(0.1)
        # moed answers while it still reads the pinned experts: wait until
        # every one is in (moe_client_stats: the pager's loads)
        with moed.Client(sock) as c:
            for _ in range(3000):
                eng = c.stats().get("engine", {})
                if eng.get("pager", {}).get("loads", 0) >= eng.get("host_cache", {}).get("pinned", 0):
                    break
                time.sleep(0.1)
        for dtype in ("float32", "bfloat16"):
            res[("moed", dtype)] = run_child(ckpt, dtype, sock, a)
        with open(f"/proc/{moed_proc.pid}/status") as f:
            moed_rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    finally:
        if moed_proc and moed_proc.poll() is None:
            moed_proc.terminate()
            moed_proc.wait(30)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    anchor_dtype = max(("float32", "bfloat16"), key=lambda d: res[("alone", d)]["tokens_per_s"])
    anchor = res[("alone", anchor_dtype)]["tokens_per_s"]
    mib = 1 << 20
    print(f"# bench_hf: Qwen3-30B-A3B shapes, {a.layers} layers, {experts} experts of 768, top 8, "
          f"hidden 2048, 32/4 heads of 128, vocab 1024; bf16 checkpoint; CPU, "
          f"{a.threads or 'default'} torch threads; {a.tokens} decode tokens after a 16-token prompt")
    env = child_env()
    print(f"# every run: GOMP_SPINCOUNT={env.get('GOMP_SPINCOUNT', '-')} "
          f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '-')}")
    print(f"# anchor: transformers alone, eager, {anchor_dtype} ({anchor:.2f} tokens/s)")
    print(f"{'run':<16} {'tokens/s':>9} {'x anchor':>9} {'in MoE':>7} {'bound':>6} {'RSS MiB':>8} "
          f"{'model MiB':>10} {'RSS/whole':>10} {'same tokens':>12}")
    for (how, dtype), r in res.items():
        whole = res[("alone", dtype)]
        model_mib = (r["rss"] - r["base"]) / mib
        same = "-" if how == "alone" else ("yes" if r["tokens"] == whole["tokens"] else "no")
        # the decode rate with the MoE blocks taking no time at all, over the anchor
        rest = (1 - min(r["moe_share"], 0.999)) / r["tokens_per_s"]
        bound = f"{1 / rest / anchor:6.2f}" if how == "alone" else "     -"
        print(f"{how + ' ' + dtype:<16} {r['tokens_per_s']:9.2f} {r['tokens_per_s'] / anchor:9.2f} "
              f"{r['moe_share']:7.0%} {bound} {r['rss'] / mib:8.0f} {model_mib:10.0f} "
              f"{r['rss'] / whole['rss']:10.1%} {same:>12}")
    print(f"moed (one copy of the experts, for any number of clients): RSS {moed_rss / mib:.0f} MiB")
    print("RSS/whole: the process's RSS over that of transformers alone in the same dtype; "
          "model MiB: RSS less the process's RSS after importing torch and transformers")
    print("in MoE: share of the decode time spent in the MoE blocks (transformers' own, or the "
          "moed.transformers block: the request to moed and back); bound: the anchor-relative "
          "rate that run would reach if its MoE blocks took no time (Amdahl)")
    print("targets: decode >= 3x anchor; client RSS <= 15% of the whole model's")


if __name__ == "__main__":
    main()
