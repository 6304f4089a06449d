# SPDX-License-Identifier: MIT
"""moed.transformers against transformers itself, on a real moed.

For each architecture: a small random model built by transformers
(from_config, seeded, save_pretrained in float32), packed by moectl and
served by a moed on a temporary socket.  Loaded through
moed.transformers.from_pretrained it must generate the same 32 greedy
tokens as transformers alone, give each MoE layer's output within 1e-4
relative L2 of transformers' float32 block on the same hidden states,
record the same router logits, and hold exactly the model's parameters
minus the experts.  Then: four processes generating at once through one
moed get the tokens they get alone; loading never allocates the experts
(peak RSS); a model moed does not serve is refused, naming both.

Run by tests/python_transformers.sh (make check), which sets MOECTL, MOED,
MOED_LIBRARY and PYTHONPATH; needs torch and transformers >= 5.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import moed
import moed.transformers as mtf

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

MOECTL = os.environ.get("MOECTL", "")
MOED = os.environ.get("MOED", "")
TMP = None

# Small enough for 2 cores: 3 layers, hidden 64, 8 experts of 32, top 2.
# initializer_range 0.1 (not 0.02) so the MoE layers move the logits:
# with tiny weights every token would come out the same whatever moed did.
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
              initializer_range=0.1, tie_word_embeddings=False)
DEEPSEEK_ATTN = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                     qk_nope_head_dim=8, v_head_dim=16)
ARCH_CONFIGS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    # layer 1 dense (mlp_only_layers): the dense MLP stays local
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      head_dim=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                  eos_token_id=1, pad_token_id=0),
    # first layer dense, group-limited routing
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5, **DEEPSEEK_ATTN),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, rope_scaling=None, **DEEPSEEK_ATTN),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     n_shared_experts=1, first_k_dense_replace=1, head_dim=16),
}
NEW_TOKENS = 32


def setUpModule():
    global TMP
    if not (os.access(MOECTL, os.X_OK) and os.access(MOED, os.X_OK)):
        raise unittest.SkipTest("MOECTL and MOED must name the built moectl and moed")
    TMP = tempfile.mkdtemp(prefix="moe-hf-")


def tearDownModule():
    if TMP and not os.environ.get("MOE_TEST_KEEP"):
        shutil.rmtree(TMP, ignore_errors=True)


def make_checkpoint(arch: str, name: str, seed: int, fused: bool = False, **extra) -> str:
    """A random model of @arch built and saved by transformers (float32);
    @fused: in transformers 5's own fused-experts layout
    (save_original_format=False) instead of the per-expert hub layout."""
    d = os.path.join(TMP, name)
    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCH_CONFIGS[arch], **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if fused:
        model.save_pretrained(d, save_original_format=False)
    else:
        model.save_pretrained(d)
    return d


def pack(ckpt: str) -> str:
    store = ckpt + ".moe"
    r = subprocess.run([MOECTL, "pack", ckpt, "-o", store], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"moectl pack {ckpt} failed: {r.stderr.strip()}")
    return store


def _die_with_parent() -> None:
    """In a moed child: SIGTERM when the test process dies, however it dies
    (PR_SET_PDEATHSIG), so that no moed outlives a killed test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class Moed:
    """A moed serving @store on a temporary socket, the CPU backend."""

    def __init__(self, store: str) -> None:
        base = store[:-4]
        self.socket = base + ".sock"
        self.log = base + ".moed.log"
        conf = base + ".conf"
        with open(conf, "w") as f:
            f.write(f'model = "{store}";\nbackend = "cpu";\n'
                    f'socket = {{ path = "{self.socket}"; mode = "0600"; group = ""; }};\n'
                    'log = { level = "warning"; };\n')
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen([MOED, "--config", conf], stdout=logf, stderr=logf,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"moed exited {self.proc.returncode}: {self.read_log()}")
            try:
                moed.Client(self.socket).close()
                return
            except moed.MoedError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"moed does not answer on {self.socket}: {self.read_log()}")
                time.sleep(0.05)

    def read_log(self) -> str:
        with open(self.log) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fingerprints_supported(client) -> bool:
    return client.info.fingerprint is not None


def prompt(seed: int, batch: int = 1, length: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, COMMON["vocab_size"], (batch, length), generator=g)


def greedy(model, ids: torch.Tensor) -> list:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def served_bytes(model) -> int:
    """Bytes of what moed serves in a full model: routed and shared experts."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".mlp.experts." in n or ".mlp.shared_expert" in n)


class ArchCase:
    """One architecture end to end; subclasses set ARCH."""

    ARCH = ""
    FUSED = False

    @classmethod
    def setUpClass(cls):
        cls.ckpt = make_checkpoint(cls.ARCH, cls.ARCH + ("_fused" if cls.FUSED else ""), seed=1234,
                                   fused=cls.FUSED)
        cls.moed = Moed(pack(cls.ckpt))
        cls.client = None
        try:    # tearDownClass does not run when this fails: stop moed here
            cls.ref = AutoModelForCausalLM.from_pretrained(cls.ckpt, dtype=torch.float32).eval()
            cls.client = moed.Client(cls.moed.socket)
            verify = fingerprints_supported(cls.client)
            cls.model = mtf.from_pretrained(cls.ckpt, cls.client, dtype=torch.float32, verify=verify)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        if cls.client is not None:
            cls.client.close()
        cls.moed.stop()

    def moe_layers(self) -> list:
        return sorted(self.client.info.moe_layers)

    def test_greedy_generate_matches_transformers(self):
        ids = prompt(7, batch=2)
        mine, ref = greedy(self.model, ids), greedy(self.ref, ids)
        self.assertEqual(mine, ref, f"{self.ARCH}: generated tokens differ")
        self.assertEqual(len(mine[0]), NEW_TOKENS)

    def test_each_moe_layer_matches_float32_block(self):
        # the hidden states each MoE block of transformers sees on a prompt
        seen = {}
        hooks = [self.ref.model.layers[L].mlp.register_forward_hook(
                     lambda m, a, out, L=L: seen.__setitem__(L, a[0].detach().clone()))
                 for L in self.moe_layers()]
        try:
            with torch.no_grad():
                self.ref(prompt(3, batch=2, length=12))
        finally:
            for h in hooks:
                h.remove()
        self.assertEqual(sorted(seen), self.moe_layers())
        for L, x in seen.items():
            with torch.no_grad():
                want = self.ref.model.layers[L].mlp(x)
                got = self.model.model.layers[L].mlp(x)
            if isinstance(want, tuple):     # gpt_oss: (hidden, router_scores)
                self.assertIsInstance(got, tuple)
                self.assertEqual(got[1].shape, want[1].shape)
                self.assertLess(rel_l2(got[1], want[1]), 1e-4, f"layer {L} router scores")
                want, got = want[0], got[0]
            self.assertEqual(got.shape, want.shape)
            self.assertEqual(got.dtype, want.dtype)
            err = rel_l2(got, want)
            self.assertLess(err, 1e-4, f"{self.ARCH} layer {L}: relative L2 {err:.3g}")
            self.assertGreater(float(want.norm()), 0.0)

    def test_dense_layers_stay_local_and_experts_are_not_loaded(self):
        for i, layer in enumerate(self.model.model.layers):
            if i in self.client.info.moe_layers:
                self.assertIsInstance(layer.mlp, mtf.MoedBlock)
                self.assertEqual(layer.mlp.moed_layer, i)
            else:
                self.assertNotIsInstance(layer.mlp, mtf.MoedBlock)
        self.assertEqual(param_bytes(self.model), param_bytes(self.ref) - served_bytes(self.ref))
        self.assertGreater(served_bytes(self.ref), 0)

    def test_router_logits_as_transformers_records_them(self):
        ids = prompt(5, batch=1, length=6)
        with torch.no_grad():
            want = self.ref(ids, output_router_logits=True).router_logits
            got = self.model(ids, output_router_logits=True).router_logits
        self.assertEqual(len(got), len(want))
        self.assertEqual(len(got), len(self.moe_layers()))
        for g, w in zip(got, want):
            self.assertEqual(g.shape, w.shape)
            self.assertLess(rel_l2(g, w), 1e-4)


def _arch_class(arch, fused=False):
    name = "Test_" + arch + ("_fused" if fused else "")
    return type(name, (ArchCase, unittest.TestCase), {"ARCH": arch, "FUSED": fused})


for _a in ARCH_CONFIGS:
    globals()["Test_" + _a] = _arch_class(_a)
# transformers 5's fused layout, as save_pretrained(save_original_format=
# False) writes it (gpt_oss has only that one): with and without a shared
# expert, and mixtral's renamed block
for _a in ("mixtral", "qwen2_moe", "deepseek_v3"):
    globals()["Test_" + _a + "_fused"] = _arch_class(_a, fused=True)
del _a

_CHILD = r"""
import json, sys, torch
import moed, moed.transformers as mtf
ckpt, sock, seed, verify = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
g = torch.Generator().manual_seed(seed)
ids = torch.randint(2, 128, (1, 8), generator=g)
with moed.Client(sock) as c:
    m = mtf.from_pretrained(ckpt, c, dtype=torch.float32, verify=verify)
    print("ready", flush=True)
    sys.stdin.readline()            # all four generate at the same moment
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                         min_new_tokens=32, do_sample=False, pad_token_id=0)
print(json.dumps(out[:, 8:].tolist()))
"""


class TestSharedMoed(unittest.TestCase):
    """Four processes generate at once through one moed."""

    def test_four_processes_get_the_tokens_they_get_alone(self):
        ckpt = make_checkpoint("deepseek_v3", "shared", seed=99)
        server = Moed(pack(ckpt))
        try:
            with moed.Client(server.socket) as c:
                verify = fingerprints_supported(c)
            seeds = [11, 12, 13, 14]
            procs = [subprocess.Popen([sys.executable, "-c", _CHILD, ckpt, server.socket, str(s),
                                       "1" if verify else "0"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for s in seeds]
            for p in procs:     # each has loaded the model
                self.assertEqual(p.stdout.readline().strip(), "ready",
                                 p.stderr.read() if p.poll() is not None else "")
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [p.communicate(timeout=300) for p in procs]
        finally:
            server.stop()
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        for s, p, (out, err) in zip(seeds, procs, outs):
            self.assertEqual(p.returncode, 0, f"process {s}: {err}")
            got = json.loads(out.strip().splitlines()[-1])
            self.assertEqual(got, greedy(ref, prompt(s)), f"process with prompt seed {s}")


_RSS_CHILD = r"""
import importlib, json, sys, torch, transformers
import moed, moed.transformers as mtf
ckpt, sock, how = sys.argv[1], sys.argv[2], sys.argv[3]
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
cfg = transformers.AutoConfig.from_pretrained(ckpt)
importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
c = moed.Client(sock)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                # peak RSS (VmHWM) := current RSS
before = status("VmRSS")
if how == "moed":
    m = mtf.from_pretrained(ckpt, c, dtype=torch.float32, verify=c.info.fingerprint is not None)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
params = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"grew": status("VmHWM") - before, "params": params}))
"""


class TestExpertsNeverAllocated(unittest.TestCase):
    """from_pretrained reads no expert: the peak RSS of a loading process
    grows by far less than the experts' bytes, while a full load grows by
    at least them (Linux: /proc/self/clear_refs resets the peak first)."""

    def test_peak_rss_stays_below_the_experts(self):
        # 4 layers of 32 experts of 512 x 256 (float32): 192 MiB of
        # experts, 2 MiB of everything else
        ckpt = make_checkpoint("qwen3_moe", "big", seed=5, hidden_size=256, num_experts=32,
                               moe_intermediate_size=512, num_hidden_layers=4, head_dim=32)
        experts = 4 * 32 * 3 * 512 * 256 * 4
        server = Moed(pack(ckpt))
        try:
            res = {}
            for how in ("moed", "full"):
                r = subprocess.run([sys.executable, "-c", _RSS_CHILD, ckpt, server.socket, how],
                                   capture_output=True, text=True, timeout=300)
                self.assertEqual(r.returncode, 0, r.stderr)
                res[how] = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            server.stop()
        self.assertGreaterEqual(res["full"]["grew"], experts, res)
        self.assertLess(res["moed"]["grew"], experts // 8, res)
        print(f"\npeak RSS growth: {res['moed']['grew'] >> 20} MiB through moed, "
              f"{res['full']['grew'] >> 20} MiB in full; experts {experts >> 20} MiB", file=sys.stderr)
        self.assertEqual(res["moed"]["params"], res["full"]["params"] - experts, res)


class TestRefusals(unittest.TestCase):
    """A model moed does not serve is refused, naming both sides."""

    @classmethod
    def setUpClass(cls):
        cls.ckpt = make_checkpoint("qwen3_moe", "served", seed=1)
        cls.moed = Moed(pack(cls.ckpt))
        try:
            cls.client = moed.Client(cls.moed.socket)
        except BaseException:
            cls.moed.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.moed.stop()

    def test_other_architecture(self):
        other = make_checkpoint("mixtral", "other_arch", seed=1)
        with self.assertRaisesRegex(mtf.ModelMismatchError, "mixtral model but moed serves qwen3_moe"):
            mtf.from_pretrained(other, self.client)
        model = AutoModelForCausalLM.from_pretrained(other)
        with self.assertRaisesRegex(mtf.ModelMismatchError,
                                    "the model is mixtral but moed .* serves qwen3_moe"):
            mtf.attach(model, self.client, verify=False)

    def test_other_shapes(self):
        for name, extra, needle in (
                ("hidden", dict(hidden_size=32, head_dim=8), "hidden_size: the model has 32, moed .* serves 64"),
                ("experts", dict(num_experts=4), "num_experts: the model has 4, moed .* serves 8"),
                ("topk", dict(num_experts_per_tok=3), "top_k: the model has 3, moed .* serves 2"),
                ("layers", dict(mlp_only_layers=[2]), r"MoE layers: the model has \[0, 1\], moed .* serves \[0, 1, 2\]")):
            with self.subTest(name):
                d = make_checkpoint("qwen3_moe", "shape_" + name, seed=1, **extra)
                with self.assertRaisesRegex(mtf.ModelMismatchError, needle):
                    mtf.from_pretrained(d, self.client, verify=False)

    def test_other_weights_by_fingerprint(self):
        if not fingerprints_supported(self.client):
            self.skipTest("this moed reports no checkpoint fingerprint")
        other = make_checkpoint("qwen3_moe", "other_seed", seed=2)
        fp_served = self.client.info.fingerprint
        fp_other = moed.checkpoint_fingerprint(other)
        self.assertNotEqual(fp_served, fp_other)
        with self.assertRaises(mtf.ModelMismatchError) as cm:
            mtf.from_pretrained(other, self.client)
        msg = str(cm.exception)
        for part in (fp_served, fp_other, other, "moectl pack"):
            self.assertIn(part, msg)
        # verify=False is the documented way around it
        m = mtf.from_pretrained(other, self.client, verify=False)
        self.assertIsInstance(m.model.layers[0].mlp, mtf.MoedBlock)
        # and the model it was packed from passes
        mtf.from_pretrained(self.ckpt, self.client)

    def test_store_without_fingerprint_needs_verify_false(self):
        if not fingerprints_supported(self.client):
            self.skipTest("this moed reports no checkpoint fingerprint")
        try:
            xxh = ctypes.CDLL(ctypes.util.find_library("xxhash") or "libxxhash.so.0")
        except OSError:
            self.skipTest("no libxxhash to rewrite a store header with")
        xxh.XXH3_64bits.restype = ctypes.c_uint64
        xxh.XXH3_64bits.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
        # the store as an older moectl packed it: source_fingerprint (offset
        # 744, 16 bytes) all zero, header_checksum (offset 24) of the 4096
        # header bytes with itself zero (moe-store(5))
        store = os.path.join(TMP, "nofp.moe")
        shutil.copyfile(self.ckpt + ".moe", store)
        with open(store, "r+b") as f:
            hdr = bytearray(f.read(4096))
            hdr[744:760] = bytes(16)
            hdr[24:32] = bytes(8)
            hdr[24:32] = xxh.XXH3_64bits(bytes(hdr), 4096).to_bytes(8, "little")
            f.seek(0)
            f.write(hdr)
        server = Moed(store)
        try:
            with moed.Client(server.socket) as c:
                self.assertIsNone(c.info.fingerprint)
                with self.assertRaisesRegex(mtf.ModelMismatchError,
                                            "without a checkpoint fingerprint .* verify=False"):
                    mtf.from_pretrained(self.ckpt, c)
                m = mtf.from_pretrained(self.ckpt, c, verify=False)
                self.assertIsInstance(m.model.layers[0].mlp, mtf.MoedBlock)
        finally:
            server.stop()

    def test_attach_a_loaded_model_frees_its_experts(self):
        model = AutoModelForCausalLM.from_pretrained(self.ckpt).eval()
        full = param_bytes(model)
        experts = served_bytes(model)
        ids = prompt(9)
        want = greedy(model, ids)
        mtf.attach(model, self.client, verify=fingerprints_supported(self.client))
        self.assertEqual(param_bytes(model), full - experts)
        self.assertEqual(greedy(model, ids), want)

    def test_float16_and_training_are_refused(self):
        verify = fingerprints_supported(self.client)
        with self.assertRaisesRegex(TypeError, "float32 or bfloat16 .* torch.float16"):
            mtf.from_pretrained(self.ckpt, self.client, dtype=torch.float16, verify=verify)
        m = mtf.from_pretrained(self.ckpt, self.client, verify=verify)
        m.train()
        with self.assertRaisesRegex(RuntimeError, "layer 0: moed serves the experts for inference"):
            m(prompt(1))
        m.eval()
        with torch.no_grad():
            m(prompt(1))

    def test_bfloat16_model(self):
        m = mtf.from_pretrained(self.ckpt, self.client, dtype=torch.bfloat16,
                                verify=fingerprints_supported(self.client))
        ref = AutoModelForCausalLM.from_pretrained(self.ckpt, dtype=torch.float32).eval()
        x = torch.randn(2, 5, 64)
        with torch.no_grad():
            want = ref.model.layers[0].mlp(x)
            got = m.model.layers[0].mlp(x.bfloat16())
        self.assertEqual(got.dtype, torch.bfloat16)
        self.assertLess(rel_l2(got.float(), want), 1e-2)


if __name__ == "__main__":
    unittest.main()
