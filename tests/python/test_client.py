# SPDX-License-Identifier: MIT
"""moed.Client against a real moed, with numpy alone (tests/python_client.sh
starts moed and sets the environment):

  MOED_TEST_SOCKET      moed's socket            MOED_TEST_STORE  the .moe it serves
  MOED_TEST_CHECKPOINT  the checkpoint packed    MOED_TEST_TMP    a scratch directory
  MOED_TEST_MAX_TOKENS  moed's request limit     MOECTL           the moectl binary

The reference for every output is moectl forward through the same moed:
the C client, moe_client_forward, bit for bit.
"""
import errno
import gc
import json
import os
import subprocess
import sys
import threading
import time
import unittest

import numpy as np

import moed

SOCK = os.environ["MOED_TEST_SOCKET"]
STORE = os.environ["MOED_TEST_STORE"]
CKPT = os.environ["MOED_TEST_CHECKPOINT"]
TMP = os.environ["MOED_TEST_TMP"]
MAX_TOKENS = int(os.environ["MOED_TEST_MAX_TOKENS"])
MOECTL = os.environ["MOECTL"]

# moectl's dtype names (moe_dtype_name) -> Info.weight_dtype
DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def moectl(*args):
    r = subprocess.run([MOECTL, "--socket", SOCK] + list(args), capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"moectl {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r.stdout


def to_bf16(x):
    """float32 -> bfloat16 words (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_n = [0]


def reference(x, layer, bf16=False):
    """moectl forward through moed: (y, ids, weights)."""
    _n[0] += 1
    base = os.path.join(TMP, f"ref{_n[0]}")
    np.save(base + ".in.npy", x)
    args = ["forward", "--layer", str(layer), "--input", base + ".in.npy",
            "--output", base + ".out.npy", "--routing-out", base + ".r.npz"]
    if bf16:
        args += ["--dtype", "bf16"]
    moectl(*args)
    r = np.load(base + ".r.npz")
    return np.load(base + ".out.npy"), r["ids"], r["weights"]


def rand(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = moed.Client(SOCK)
        cls.H = cls.c.info.hidden_size
        cls.layers = cls.c.info.moe_layers

    @classmethod
    def tearDownClass(cls):
        cls.c.close()

    def assertBits(self, a, b, msg=None):
        a, b = np.asarray(a), np.asarray(b)
        self.assertEqual(a.shape, b.shape, msg)
        self.assertEqual(a.dtype, b.dtype, msg)
        self.assertTrue(np.array_equal(a.view(np.uint8), b.view(np.uint8)),
                        f"{msg or 'bits differ'}: max |a-b| "
                        f"{np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))}")

    # ------------------------------------------------------------- info

    def test_info_equals_inspect(self):
        j = json.loads(subprocess.run([MOECTL, "inspect", "--json", STORE], capture_output=True,
                                      text=True, check=True).stdout)
        i = self.c.info
        self.assertIsInstance(i, moed.Info)
        for f in ("model_type", "hidden_size", "moe_intermediate_size", "num_experts", "top_k",
                  "num_hidden_layers", "n_shared_experts"):
            self.assertEqual(getattr(i, f), j[f], f)
        self.assertEqual(i.moe_layers, tuple(j["moe_layers"]))
        self.assertEqual(i.weight_dtype, DTYPE_NAMES.get(j["weight_dtype"], j["weight_dtype"]))
        self.assertEqual(i.backend, "cpu")
        self.assertEqual(i.max_tokens, MAX_TOKENS)
        self.assertGreater(i.arena_bytes, 0)
        with self.assertRaises(Exception):
            i.top_k = 3  # frozen

    def test_fingerprint(self):
        lib = moed._lib.load()
        if lib.moe_checkpoint_fingerprint is None:
            self.assertIsNone(self.c.info.fingerprint)
            with self.assertRaisesRegex(moed.MoedError, "too old"):
                moed.checkpoint_fingerprint(CKPT)
            return
        fp = moed.checkpoint_fingerprint(CKPT)
        self.assertRegex(fp, "^[0-9a-f]{32}$")
        self.assertEqual(self.c.info.fingerprint, fp)
        with self.assertRaises(moed.MoedError) as cm:
            moed.checkpoint_fingerprint(os.path.join(TMP, "no-such-checkpoint"))
        self.assertIn("no-such-checkpoint", str(cm.exception))

    def test_stats(self):
        self.c.forward(rand((2, self.H), 1), self.layers[0])
        st = self.c.stats()
        self.assertIsInstance(st, dict)
        self.assertGreaterEqual(st["clients_connected"], 1)

    # ------------------------------------------------------------- forward

    def test_forward_f32_equals_c_client_every_size(self):
        n = MAX_TOKENS + 3
        for layer in self.layers:
            x = rand((n, self.H), 100 + layer)
            y_ref, ids_ref, w_ref = reference(x, layer)
            for t in range(1, n + 1):
                y = self.c.forward(x[:t], layer)
                self.assertBits(y, y_ref[:t], f"layer {layer}, {t} tokens")
            y, ids, w = self.c.forward(x, layer, return_routing=True)
            self.assertBits(y, y_ref)
            self.assertBits(ids, ids_ref)
            self.assertBits(w, w_ref)

    def test_forward_bf16_equals_c_client(self):
        n = MAX_TOKENS + 3
        x = to_bf16(rand((n, self.H), 7))
        layer = self.layers[-1]
        y_ref, _, _ = reference(x, layer, bf16=True)
        self.assertEqual(y_ref.dtype, np.uint16)
        for t in (1, 2, MAX_TOKENS, MAX_TOKENS + 1, n):
            y = self.c.forward(x[:t], layer, dtype="bfloat16")
            self.assertBits(y, y_ref[:t], f"bf16, {t} tokens")
        if moed._tensors.NP_BF16 is not None:
            xb = x.view(moed._tensors.NP_BF16)
            self.assertBits(self.c.forward(xb, layer).view(np.uint16), y_ref)

    def test_leading_dims_are_tokens(self):
        x = rand((2, 3, 5, self.H), 3)
        layer = self.layers[0]
        y = self.c.forward(x, layer)
        self.assertEqual(y.shape, x.shape)
        self.assertBits(y.reshape(-1, self.H), self.c.forward(x.reshape(-1, self.H), layer))

    def test_non_contiguous_input_is_copied(self):
        base = rand((self.H, 6), 4)
        x = base.T                      # [6, H], not C-contiguous
        self.assertFalse(x.flags.c_contiguous)
        layer = self.layers[0]
        self.assertBits(self.c.forward(x, layer), self.c.forward(np.ascontiguousarray(x), layer))

    def test_out_is_written(self):
        x = rand((4, self.H), 5)
        out = np.full_like(x, np.nan)
        y = self.c.forward(x, self.layers[0], out=out)
        self.assertIs(y, out)
        self.assertBits(out, self.c.forward(x, self.layers[0]))

    def test_routing_is_plausible(self):
        i = self.c.info
        x = rand((9, self.H), 6)
        _, ids, w = self.c.forward(x, self.layers[0], return_routing=True)
        self.assertEqual(ids.shape, (9, i.top_k))
        self.assertEqual(ids.dtype, np.int32)
        self.assertEqual(w.dtype, np.float32)
        for row in ids:
            self.assertEqual(len(set(row.tolist())), i.top_k, f"experts not distinct: {row}")
            self.assertTrue(all(0 <= e < i.num_experts for e in row))
        self.assertTrue(np.all(w > 0))

    def test_zero_copy_equals_copy(self):
        layer = self.layers[0]
        n = 2 * MAX_TOKENS + 5             # pieces in the zero-copy path too
        x = rand((n, self.H), 8)
        want, ids_want, w_want = self.c.forward(x, layer, return_routing=True)
        xa = self.c.empty((n, self.H))
        xa[...] = x
        y = self.c.forward(xa, layer)
        self.assertBits(y, want)
        ya = self.c.empty((n, self.H))
        y2, ids, w = self.c.forward(xa, layer, out=ya, return_routing=True)
        self.assertIs(y2, ya)
        self.assertBits(ya, want)
        self.assertBits(ids, ids_want)
        self.assertBits(w, w_want)
        # bf16 in the arena
        xb = self.c.empty((3, self.H), "bfloat16")
        xb[...] = to_bf16(x[:3]).view(xb.dtype)
        yb = self.c.forward(xb, layer, dtype=None if xb.dtype != np.uint16 else "bfloat16")
        self.assertBits(yb.view(np.uint16), self.c.forward(to_bf16(x[:3]), layer, dtype="bfloat16"))

    # ------------------------------------------------------------- submit

    def test_submit_several_wait_out_of_order(self):
        xs = [rand((1 + 3 * k, self.H), 20 + k) for k in range(6)]
        xs.append(rand((MAX_TOKENS * 2 + 1, self.H), 40))      # in pieces
        layers = [self.layers[k % len(self.layers)] for k in range(len(xs))]
        want = [self.c.forward(x, l) for x, l in zip(xs, layers)]
        reqs = [self.c.submit(x, l) for x, l in zip(xs, layers)]
        for k in (6, 3, 0, 5, 1, 4, 2):
            self.assertBits(reqs[k].wait(timeout=30), want[k], f"request {k}")
            self.assertTrue(reqs[k].done())
        # waiting again gives the same result
        self.assertBits(reqs[2].wait(), want[2])

    def test_submit_beyond_the_ring(self):
        # a 2-entry ring: pieces and requests wait for room, none is lost
        layer = self.layers[0]
        xs = [rand((5 * MAX_TOKENS + 1, self.H), 45)] + [rand((3, self.H), 46 + k) for k in range(4)]
        want = [self.c.forward(x, layer) for x in xs]
        with moed.Client(SOCK, sq_entries=2) as c:
            reqs = [c.submit(x, layer) for x in xs]
            for k in reversed(range(len(xs))):
                self.assertBits(reqs[k].wait(timeout=60), want[k], f"request {k}")
        with self.assertRaises(moed.MoedConnectionError) as cm:
            moed.Client(SOCK, sq_entries=3)
        self.assertIn("sq_entries=3", str(cm.exception))

    def test_submit_out_and_routing(self):
        x = rand((5, self.H), 50)
        layer = self.layers[-1]
        want, ids_w, w_w = self.c.forward(x, layer, return_routing=True)
        out = np.zeros_like(x)
        r = self.c.submit(x, layer, out=out, return_routing=True)
        y, ids, w = r.wait()
        self.assertIs(y, out)
        self.assertBits(out, want)
        self.assertBits(ids, ids_w)
        self.assertBits(w, w_w)

    def test_done_polls_without_blocking(self):
        r = self.c.submit(rand((2, self.H), 51), self.layers[0])
        for _ in range(10000):
            if r.done():
                break
        r.wait()
        self.assertTrue(r.done())

    # ------------------------------------------------------------- errors

    def test_bad_layer(self):
        bad = max(self.layers) + 7
        with self.assertRaises(moed.MoedError) as cm:
            self.c.forward(rand((1, self.H), 1), bad)
        self.assertEqual(cm.exception.code, -moed.MOE_E_LAYER)
        self.assertIn(f"layer {bad}", str(cm.exception))
        with self.assertRaises(moed.MoedError) as cm:
            self.c.submit(rand((1, self.H), 1), -1)
        self.assertEqual(cm.exception.code, -moed.MOE_E_LAYER)
        with self.assertRaisesRegex(TypeError, "layer"):
            self.c.forward(rand((1, self.H), 1), "0")

    def test_wrong_hidden_size(self):
        with self.assertRaisesRegex(ValueError, f"x has shape \\(2, {self.H + 1}\\).*{self.H}"):
            self.c.forward(rand((2, self.H + 1), 1), self.layers[0])
        with self.assertRaisesRegex(ValueError, "x has shape"):
            self.c.forward(np.ones((), np.float32), self.layers[0])

    def test_wrong_dtype(self):
        with self.assertRaisesRegex(TypeError, "x has dtype float64.*float32"):
            self.c.forward(np.zeros((1, self.H)), self.layers[0])
        with self.assertRaisesRegex(TypeError, "x has dtype uint16"):
            self.c.forward(np.zeros((1, self.H), np.uint16), self.layers[0])
        with self.assertRaisesRegex(TypeError, "numpy array or a CPU torch tensor"):
            self.c.forward([[0.0] * self.H], self.layers[0])
        with self.assertRaisesRegex(ValueError, "out is"):
            self.c.forward(rand((2, self.H), 1), self.layers[0], out=np.zeros((3, self.H), np.float32))

    def test_missing_socket(self):
        path = os.path.join(TMP, "no-moed-here.sock")
        with self.assertRaises(moed.MoedConnectionError) as cm:
            moed.Client(path)
        e = cm.exception
        self.assertIsInstance(e, moed.MoedError)
        self.assertIsInstance(e, ConnectionError)
        self.assertEqual(e.code, -errno.ENOENT)
        self.assertIn(path, str(e))
        self.assertIn("MOED_SOCKET", str(e))
        self.assertIn("start moed", str(e))

    def test_moed_socket_environment(self):
        env = dict(os.environ, MOED_SOCKET=SOCK)
        code = "import moed; c = moed.Client(); print(c.info.hidden_size); c.close()"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(int(r.stdout), self.H)

    def test_library_not_found_names_both_ways(self):
        code = "import moed\ntry:\n moed.Client()\nexcept moed.MoedError as e:\n print(e)"
        env = dict(os.environ, MOED_LIBRARY=os.path.join(TMP, "nolib.so"))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        self.assertIn("MOED_LIBRARY=" + os.path.join(TMP, "nolib.so"), r.stdout, r.stderr)
        env = dict(os.environ, LD_LIBRARY_PATH="")
        del env["MOED_LIBRARY"]
        code2 = ("import ctypes\ntry:\n ctypes.CDLL('libmoeclient.so.0')\n print('installed')\n"
                 "except OSError:\n pass\n" + code)
        r = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True)
        if not r.stdout.startswith("installed"):
            self.assertIn("MOED_LIBRARY", r.stdout, r.stderr)
            self.assertIn("libmoeclient.so.0", r.stdout, r.stderr)

    def test_closed_client_refuses(self):
        c = moed.Client(SOCK)
        c.close()
        self.assertTrue(c.closed)
        with self.assertRaisesRegex(moed.MoedError, "closed"):
            c.forward(rand((1, self.H), 1), self.layers[0])
        c.close()   # twice is fine

    @unittest.skipUnless(hasattr(os, "fork"), "no fork")
    def test_fork_child_must_reconnect(self):
        c = moed.Client(SOCK)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                c.forward(rand((1, self.H), 1), self.layers[0])
                msg = b"no error"
            except moed.MoedError as e:
                msg = b"ok" if e.code == -errno.ECHILD and "fork" in str(e) else str(e).encode()
            os.write(w, msg)
            os._exit(0)
        os.close(w)
        msg = os.read(r, 1000)
        os.waitpid(pid, 0)
        os.close(r)
        self.assertEqual(msg, b"ok")
        # the parent's session is intact
        self.assertEqual(c.forward(rand((1, self.H), 1), self.layers[0]).shape, (1, self.H))
        c.close()

    # ------------------------------------------------------------- threads

    def test_four_threads_share_a_client(self):
        layer = self.layers[0]
        xs = [rand((1 + 2 * k, self.H), 60 + k) for k in range(4)]
        alone = [self.c.forward(x, layer) for x in xs]
        bad = []

        def work(k):
            for it in range(50):
                if it % 2:
                    y = self.c.submit(xs[k], layer).wait(timeout=60)
                else:
                    y = self.c.forward(xs[k], layer)
                if not np.array_equal(y, alone[k]):
                    bad.append((k, it))

        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(bad, [])

    def test_gil_released_while_waiting(self):
        # a thread sits in moe_client_wait() for 1 s (nothing in flight);
        # this one must keep running meanwhile
        c = moed.Client(SOCK)
        t = threading.Thread(target=c._s.wait, args=(None, 1.0))
        t.start()
        time.sleep(0.1)
        n, end = 0, time.monotonic() + 0.5
        while time.monotonic() < end:
            n += 1
        alive = t.is_alive()
        t.join()
        c.close()
        self.assertTrue(alive, "the waiting thread returned early")
        self.assertGreater(n, 10000, "this thread barely ran while the other waited in C")

    # ------------------------------------------------------------- arena

    def test_empty_arrays_are_freed(self):
        with moed.Client(SOCK, arena_bytes=1 << 20) as c:
            arena = c.info.arena_bytes
            blk = 64 * 1024
            held = []
            with self.assertRaises(moed.MoedError) as cm:
                for _ in range(2 * arena // blk):
                    held.append(c.empty(blk // 4))
            self.assertEqual(cm.exception.code, -errno.ENOMEM)
            self.assertIn("arena", str(cm.exception))
            n = len(held)
            self.assertGreater(n, 0)
            views = held[0][10:20]          # a view keeps its block
            del held
            gc.collect()
            again = [c.empty(blk // 4) for _ in range(n - 1)]
            views[:] = 1.0
            del views
            gc.collect()
            again.append(c.empty(blk // 4))
            self.assertEqual(len(again), n)

    def test_close_with_live_arrays_keeps_them_valid(self):
        c = moed.Client(SOCK)
        before = self.c.stats()["clients_connected"]
        a = c.empty((4, self.H))
        a[...] = 2.0
        r = c.submit(rand((2, self.H), 70), self.layers[0])
        c.close()
        self.assertTrue(r.done())           # close let it complete
        self.assertEqual(r.wait().shape, (2, self.H))
        self.assertEqual(float(a.sum()), 8.0 * self.H)   # still mapped
        self.assertEqual(self.c.stats()["clients_connected"], before)
        del a, r
        gc.collect()
        # moed notices the hang-up on its own time
        deadline = time.monotonic() + 10
        while self.c.stats()["clients_connected"] != before - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.c.stats()["clients_connected"], before - 1)


if __name__ == "__main__":
    unittest.main()
