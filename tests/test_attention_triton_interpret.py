"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) against the reference: output and dq, dk, dv.

The interpreter must be switched on before triton decorates the kernels, and another test module may already have
imported them in compiled mode, so every case runs in ONE subprocess (this file with ``--worker``) and the tests
read its results. fp32 and fp16 only (tl.dot of two bf16 operands is wrong in the interpreter); bf16 is tested on
the GPU. Outputs and gradients are filled with NaN before each run, so an unwritten element fails.
"""

import json
import os
import random
import subprocess
import sys

import pytest

CASES = [
    # name, seed, dtype, head_dim, (hq, hkv), tokens_per_frame, config ("small": 16/16 blocks, "mixed": 32/16)
    ("fp32_basic", 0, "float32", 16, (2, 1), 4, "small"),
    ("fp32_gqa_m5", 1, "float32", 32, (4, 2), 5, "small"),
    ("fp32_m16_even", 2, "float32", 16, (2, 2), 16, "small"),
    ("fp32_mixed_blocks", 3, "float32", 16, (2, 1), 12, "mixed"),
    ("fp32_m32_mixed", 4, "float32", 16, (2, 1), 32, "mixed"),
    ("fp16_d64", 5, "float16", 64, (2, 1), 8, "small"),
    ("fp16_gqa", 6, "float16", 16, (4, 1), 3, "small"),
    ("fp32_packed_padded", 7, "float32", 16, (2, 1), 2, "small"),
    ("fp32_text_only", 8, "float32", 16, (2, 1), 4, "mixed"),
    ("fp32_noncontiguous", 9, "float32", 16, (2, 1), 4, "small"),
    ("fp32_many_videos_flat", 10, "float32", 16, (2, 1), 3, "small"),
    ("fp32_many_videos_general", 10, "float32", 16, (2, 1), 3, "general"),
    ("fp32_two_videos_general", 11, "float32", 16, (2, 1), 5, "general_mixed"),
    ("fp32_split_key_tiles", 12, "float32", 16, (4, 2), 4, "split"),
    ("fp16_split_key_tiles_pad", 7, "float16", 32, (2, 1), 3, "split"),
    # backward variant: dO V^T issued before the exponentials (dq_early_dp, dkdv_early_dp), misaligned + split
    ("fp32_early_dp_split", 13, "float32", 16, (4, 2), 5, "early_dp"),
    ("fp16_early_dp_mixed", 14, "float16", 32, (2, 1), 6, "early_dp_mixed"),
]


def _random_rows(rng: random.Random, case_name: str):
    if case_name == "fp32_text_only":
        return [[[37]], [[5], ("pad", 3), [20]]]
    if case_name.startswith("fp32_many_videos"):  # 5 videos in one sequence: > 3 prefix segments
        return [[("pad", 2), [3, ("video", 2), 2, ("video", 1), ("video", 3), 4, ("video", 2), 1, ("video", 2), 3]]]
    rows = []
    nrows = 2 if case_name in ("fp32_packed_padded", "fp16_split_key_tiles_pad") else 1
    for _ in range(nrows):
        row = []
        packed = case_name in ("fp32_packed_padded", "fp16_split_key_tiles_pad")
        for _ in range(rng.randint(1, 2) if packed else 1):
            if rng.random() < 0.5 or packed:
                row.append(("pad", rng.randint(1, 5)))
            seq = []
            for _ in range(rng.randint(2, 4)):
                if rng.random() < 0.6:
                    seq.append(("video", rng.randint(1, 6)))
                else:
                    seq.append(rng.randint(1, 20))
            row.append(seq)
        rows.append(row)
    return rows


def _worker() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from sophia_kernels import HierLayout, hierarchical_attention_reference
    from sophia_kernels.ops.hier_attention_triton import HierAttnConfig, hier_attention_triton

    configs = {
        "small": HierAttnConfig.for_interpreter(),
        "mixed": HierAttnConfig(32, 16, 4, 1, 32, 16, 4, 1, 16, 32, 4, 1),
        "general": HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, allow_flat=False),
        "split": HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, dkdv_split_chunk=20),
        "early_dp": HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, dkdv_split_chunk=20,
                                   dq_early_dp=True, dkdv_early_dp=True),
        "early_dp_mixed": HierAttnConfig(32, 16, 4, 1, 32, 16, 4, 1, 16, 32, 4, 1, dq_early_dp=True,
                                         dkdv_early_dp=True),
        "general_mixed": HierAttnConfig(32, 16, 4, 1, 32, 16, 4, 1, 16, 32, 4, 1, dkdv_kv_as_b=True,
                                        allow_flat=False),
    }
    results = {}
    for name, seed, dtype_name, d, (hq, hkv), m, cfg_name in CASES:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        rows = _random_rows(rng, name)
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=m, arity=rng.choice([2, 3]),
                                             levels=rng.choice([2, 3, 4]), neighbours=rng.choice([0, 1, 2]))
        b = len(rows)
        dtype = getattr(torch, dtype_name)
        if name == "fp32_noncontiguous":
            q = torch.randn(b, n, hq, d, dtype=dtype).transpose(1, 2)
            k = torch.randn(b, n, hkv, d, dtype=dtype).transpose(1, 2)
            v = torch.randn(b, n, hkv, d, dtype=dtype).transpose(1, 2)
        else:
            q = torch.randn(b, hq, n, d, dtype=dtype)
            k = torch.randn(b, hkv, n, d, dtype=dtype)
            v = torch.randn(b, hkv, n, d, dtype=dtype)
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
        do = torch.randn(b, hq, n, d, dtype=dtype)
        out = hier_attention_triton(q, k, v, layout, config=configs[cfg_name], poison=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = hierarchical_attention_reference(q64, k64, v64, layout)
        rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        pad = torch.ones(b, n, dtype=torch.bool)
        for r, s0, s1 in layout.seqs.tolist():
            pad[r, s0:s1] = False
        res = {"n": n, "shape": [b, hq, hkv, n, d]}
        for tag, x, y in [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, rgrads)):
            x = x.detach().double()
            nan = int(torch.isnan(x).sum())
            y = y.detach()
            err = float((x - y).norm() / y.norm().clamp_min(1e-30)) if nan == 0 else float("nan")
            pad_nonzero = int((x.permute(0, 2, 1, 3)[pad] != 0).sum())
            res[tag] = {"rel_err": err, "nan": nan, "pad_nonzero": pad_nonzero}
        results[name] = res
    print("RESULTS-JSON " + json.dumps(results))


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                          text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS-JSON ")]
    assert proc.returncode == 0 and line, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(line[-1][len("RESULTS-JSON "):])


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_triton_interpreter_matches_reference(interp_results, case):
    res = interp_results[case]
    dtype = [c for c in CASES if c[0] == case][0][2]
    tol = 1e-5 if dtype == "float32" else 5e-3
    for tag in ("out", "dq", "dk", "dv"):
        r = res[tag]
        assert r["nan"] == 0, f"{case} {tag}: {r['nan']} NaN (unwritten or invalid) elements, shape {res['shape']}"
        assert r["rel_err"] < tol, f"{case} {tag}: relative error {r['rel_err']:.3e} >= {tol}, shape {res['shape']}"
        assert r["pad_nonzero"] == 0, f"{case} {tag}: {r['pad_nonzero']} nonzero elements at padding positions"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
