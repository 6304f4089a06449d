# SPDX-License-Identifier: MIT
"""moed.Client with torch tensors against a real moed (tests/python_client.sh
with MOED_PY_SUITE=torch starts it; run by a Python that has torch).  The
reference is the numpy path, itself checked bit for bit against the C
client by test_client.py."""
import os
import sys
import threading
import unittest

import numpy as np
import torch

import moed

SOCK = os.environ["MOED_TEST_SOCKET"]
MAX_TOKENS = int(os.environ["MOED_TEST_MAX_TOKENS"])


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1


class TorchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = moed.Client(SOCK)
        cls.H = cls.c.info.hidden_size
        cls.layer = cls.c.info.moe_layers[-1]

    @classmethod
    def tearDownClass(cls):
        cls.c.close()

    def bits(self, a, b, msg=None):
        self.assertEqual(a.dtype, b.dtype, msg)
        self.assertEqual(a.shape, b.shape, msg)
        if a.dtype == torch.bfloat16:
            a, b = a.view(torch.int16), b.view(torch.int16)
        self.assertTrue(torch.equal(a, b), msg)

    def test_f32_equals_numpy_path(self):
        for t in (1, MAX_TOKENS, MAX_TOKENS + 3):
            x = rand((t, self.H), t)
            y = self.c.forward(x, self.layer)
            self.assertIsInstance(y, torch.Tensor)
            want = self.c.forward(x.numpy(), self.layer)
            self.bits(y, torch.from_numpy(want), f"{t} tokens")

    def test_bf16_equals_numpy_path(self):
        x = rand((MAX_TOKENS + 3, 2, self.H), 9).to(torch.bfloat16)
        y = self.c.forward(x, self.layer)
        self.assertEqual(y.dtype, torch.bfloat16)
        self.assertEqual(y.shape, x.shape)
        want = self.c.forward(x.view(torch.int16).numpy().view(np.uint16), self.layer, dtype="bfloat16")
        self.bits(y, torch.from_numpy(want.view(np.int16)).view(torch.bfloat16))

    def test_routing_is_torch(self):
        x = rand((4, self.H), 2)
        y, ids, w = self.c.forward(x, self.layer, return_routing=True)
        self.assertEqual(ids.dtype, torch.int32)
        self.assertEqual(w.dtype, torch.float32)
        _, ids_n, w_n = self.c.forward(x.numpy(), self.layer, return_routing=True)
        self.assertTrue(np.array_equal(ids.numpy(), ids_n))
        self.assertTrue(np.array_equal(w.numpy(), w_n))

    def test_arena_tensors_zero_copy(self):
        for dt in (torch.float32, torch.bfloat16):
            x = rand((MAX_TOKENS * 2 + 1, self.H), 5).to(dt)
            want = self.c.forward(x, self.layer)
            xa = self.c.empty(tuple(x.shape), dt, torch=True)
            self.assertIsInstance(xa, torch.Tensor)
            self.assertEqual(xa.dtype, dt)
            xa.copy_(x)
            y = self.c.forward(xa, self.layer)
            self.bits(y, want, str(dt))
            r = self.c.submit(x, self.layer).wait()
            self.bits(r, want, f"submit {dt}")

    def test_non_contiguous_and_grad(self):
        base = rand((self.H, 3), 6)
        x = base.t()
        self.assertFalse(x.is_contiguous())
        self.bits(self.c.forward(x, self.layer), self.c.forward(x.contiguous(), self.layer))
        g = rand((2, self.H), 7).requires_grad_()
        self.bits(self.c.forward(g, self.layer), self.c.forward(g.detach(), self.layer))

    def test_wrong_tensors(self):
        with self.assertRaisesRegex(TypeError, "x has dtype torch.float64"):
            self.c.forward(torch.zeros((1, self.H), dtype=torch.float64), self.layer)
        with self.assertRaisesRegex(ValueError, "hidden size"):
            self.c.forward(torch.zeros((1, self.H - 1)), self.layer)
        with self.assertRaisesRegex(TypeError, "out"):
            self.c.forward(torch.zeros((1, self.H)), self.layer, out=np.zeros((1, self.H), np.float32))
        if hasattr(torch, "device"):
            meta = torch.zeros((1, self.H), device="meta")
            with self.assertRaisesRegex(ValueError, "CPU"):
                self.c.forward(meta, self.layer)

    def test_threads(self):
        xs = [rand((1 + k, self.H), 30 + k) for k in range(4)]
        alone = [self.c.forward(x, self.layer) for x in xs]
        bad = []

        def work(k):
            for _ in range(40):
                if not torch.equal(self.c.forward(xs[k], self.layer), alone[k]):
                    bad.append(k)

        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(bad, [])


if __name__ == "__main__":
    print("torch", torch.__version__, file=sys.stderr)
    unittest.main()
