#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bench_python.py: what the moed Python package adds to a call, against
moe_client_forward called from C, measured in the same run.

The anchor is bench/bench_daemon's "through moed" row (a 1-token
moe_client_forward from C, copies included); this script runs it and the
Python side alternately, ROUNDS times, on one moed, so that both see the
same machine.  Python rows, each N 1-token calls per round:

  ctypes floor          moe_client_forward through ctypes with everything
                        prepared: what any ctypes binding pays at least
  Client.forward numpy  a float32 numpy array (the copy path)
  Client.forward torch  a float32 CPU tensor (when torch imports)
  Client.forward arena  an array from Client.empty() (zero copy: submit
                        and wait on the arena)

and for each the median and p99 in microseconds, and the median minus the
C anchor's (the target of issue 12 is <= 10 us for Client.forward).

The model: "small" (default; qwen3_moe, hidden 1024, 32 experts of 256,
top-4: bench_daemon's) keeps a call short enough that microseconds show;
"qwen3-30b-a3b" uses that model's shapes (4 MoE layers, as issue 12's
benchmark), where one token reads ~75 MB of experts and the overhead is
lost in the noise.  The store is made once in BENCH_DIR (default
/var/tmp/moed-bench), moed is started on a temporary socket with every
expert pinned, and stopped at the end.

usage: bench/bench_python.py [--build DIR] [--model small|qwen3-30b-a3b]
                             [-n N] [--rounds R]
Timing only: never part of make check.  Run it on a quiet machine.
"""
import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "small": ["--arch", "qwen3_moe", "--layers", "2", "--hidden", "1024", "--moe-intermediate", "256",
              "--experts", "32", "--top-k", "4", "--vocab", "64", "--seed", "5"],
    "qwen3-30b-a3b": ["--preset", "qwen3-30b-a3b", "--layers", "4", "--vocab", "256", "--seed", "3"],
}


def die(msg):
    print(f"bench_python: {msg}", file=sys.stderr)
    sys.exit(1)


def pct(v):
    v = sorted(v)
    return v[len(v) // 2], v[len(v) * 99 // 100]


def make_store(moectl, bench_dir, model):
    os.makedirs(bench_dir, exist_ok=True)
    store = os.path.join(bench_dir, f"python-{model}.moe")
    if not os.path.exists(store):
        hf = store[:-4] + ".hf"
        subprocess.run([moectl, "gen-model"] + MODELS[model] + ["-o", hf], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([moectl, "pack", hf, "-o", store], check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(hf)
    return store


def start_moed(moed, moectl, store, work, layers):
    sock = os.path.join(work, "s.sock")
    conf = os.path.join(work, "moed.conf")
    pins = ", ".join(f'"{l}:*"' for l in layers)
    with open(conf, "w") as f:
        f.write(f'model = "{store}";\nbackend = "cpu";\n'
                f'socket = {{ path = "{sock}"; group = ""; }};\ncache = {{ pin = [ {pins} ]; }};\n')
    log = open(os.path.join(work, "moed.log"), "w")
    p = subprocess.Popen([moed, "--config", conf], stdout=log, stderr=log)
    for _ in range(600):
        if subprocess.run([moectl, "--socket", sock, "info"], capture_output=True).returncode == 0:
            return p, sock
        if p.poll() is not None:
            die(f"moed exited: {open(log.name).read()}")
        time.sleep(0.1)
    die("moed did not start")


def c_anchor(bench_daemon, sock, store, layer, n):
    """bench_daemon's 'through moed' p50 and p99 (us)."""
    out = subprocess.run([bench_daemon, sock, store, str(layer), str(n)], capture_output=True,
                         text=True)
    if out.returncode:
        die(f"bench_daemon failed: {out.stderr}")
    m = re.search(r"^\s*through moed\s+([0-9.]+)\s+([0-9.]+)", out.stdout, re.M)
    if not m:
        die(f"no 'through moed' row in bench_daemon's output:\n{out.stdout}")
    return float(m.group(1)), float(m.group(2))


def timed(fn, n):
    clock = time.perf_counter_ns
    v = []
    for _ in range(n // 10):    # warm-up
        fn()
    for _ in range(n):
        t0 = clock()
        fn()
        v.append((clock() - t0) / 1000.0)
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.environ.get("BUILD_DIR", os.path.join(SRC, "build")))
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("-n", type=int, default=4000, help="1-token calls per row and round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()

    b = os.path.abspath(a.build)
    moectl, moed_bin = os.path.join(b, "client/moectl"), os.path.join(b, "daemon/moed")
    bench_daemon = os.path.join(b, "bench/bench_daemon")
    lib = os.path.join(b, "libmoeclient/.libs/libmoeclient.so.0")
    for f in (moectl, moed_bin, bench_daemon, lib):
        if not os.path.exists(f):
            die(f"{f} is missing: build first (make -C {b} daemon/moed client/moectl bench/bench_daemon)")
    os.environ.setdefault("MOED_LIBRARY", lib)
    sys.path.insert(0, os.path.join(SRC, "python"))
    import numpy as np
    import moed
    try:
        import torch
    except ImportError:
        torch = None

    store = make_store(moectl, os.environ.get("BENCH_DIR", "/var/tmp/moed-bench"), a.model)
    work = tempfile.mkdtemp(prefix="moed-pybench-")
    j = subprocess.run([moectl, "inspect", "--json", store], capture_output=True, text=True, check=True)
    import json
    layers = json.loads(j.stdout)["moe_layers"]
    proc, sock = start_moed(moed_bin, moectl, store, work, layers)
    try:
        c = moed.Client(sock)
        H, layer = c.info.hidden_size, c.info.moe_layers[0]
        # warm: the pinned experts are in, the engine's threads awake
        c.forward(np.random.default_rng(0).uniform(-1, 1, (256, H)).astype(np.float32), layer)
        x = np.random.default_rng(1).uniform(-1, 1, (1, H)).astype(np.float32)
        y = np.empty_like(x)
        fwd = moed._lib.load().moe_client_forward
        h, xp, yp = c._s.h, x.ctypes.data, y.ctypes.data
        xa = c.empty((1, H))
        xa[...] = x
        rows = {"ctypes floor": lambda: fwd(h, layer, 0, xp, yp, 1, None, None),
                "Client.forward numpy": lambda: c.forward(x, layer),
                "Client.forward arena": lambda: c.forward(xa, layer)}
        if torch is not None:
            xt = torch.from_numpy(x.copy())
            rows["Client.forward torch"] = lambda: c.forward(xt, layer)
        samples = {k: [] for k in rows}
        anchors = []
        for _ in range(a.rounds):
            anchors.append(c_anchor(bench_daemon, sock, store, layer, a.n))
            for k, fn in rows.items():
                samples[k] += timed(fn, a.n)
        c.close()
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    a50 = statistics.median(p[0] for p in anchors)
    a99 = statistics.median(p[1] for p in anchors)
    print(f"Python overhead per 1-token forward, layer {layer} of {a.model} ({c.info.model_type}, hidden "
          f"{H}, {c.info.num_experts} experts, top-{c.info.top_k}); {a.rounds} rounds of {a.n} calls, "
          "alternated with the C anchor")
    print(f"  python {sys.version.split()[0]}, numpy {np.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ", no torch"))
    print(f"  {'':28} {'p50 us':>9} {'p99 us':>9} {'p50 - C':>9}")
    print(f"  {'C moe_client_forward (anchor)':28} {a50:9.2f} {a99:9.2f} {0:9.2f}")
    for k, v in samples.items():
        p50, p99 = pct(v)
        note = "   target <= 10 us" if k.startswith("Client.forward numpy") else ""
        print(f"  {k:28} {p50:9.2f} {p99:9.2f} {p50 - a50:9.2f}{note}")


if __name__ == "__main__":
    main()
