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

from layouts import INTERPRETER, INTERPRETER_PACKED, random_rows

CASES = [
    # name, seed, dtype, head_dim, (hq, hkv), tokens_per_frame, config ("small": 16/16 blocks, "mixed": 32/16;
    # "split": heavy key tiles split, pieces of 128 tokens). Layouts with more than 3 prefix segments in some tile
    # (many_videos, four_videos) run the general nested-loop path of the query-side kernels; the "split_key_tiles"
    # layouts have text keys seen by more than 128 later tokens (split pieces, the reduction kernel).
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
    ("fp32_many_videos_general", 10, "float32", 16, (2, 1), 3, "small"),
    ("fp32_four_videos_general_mixed", 11, "float32", 16, (2, 1), 5, "mixed"),
    ("fp32_split_key_tiles", 12, "float32", 16, (4, 2), 16, "split"),
    ("fp16_split_key_tiles_pad", 7, "float16", 32, (2, 1), 3, "split"),
    ("fp32_misaligned_m5", 13, "float32", 16, (4, 2), 5, "split"),
    ("fp16_mixed_misaligned", 14, "float16", 32, (2, 1), 6, "mixed"),
    # int64 row offsets forced (INT64_OFFSETS_FROM = 0; in production only when row stride x N >= 2**31) on the
    # decoder's strided [B, N, H, D] -> [B, H, N, D] views of q, k, v, dO: no copy, O and dQ/dK/dV in those layouts
    ("fp32_noncontiguous_int64", 15, "float32", 16, (4, 2), 4, "mixed"),
    ("fp16_split_key_tiles_noncontiguous_int64", 12, "float16", 16, (4, 2), 16, "split"),
]


def _random_rows(rng: random.Random, case_name: str):
    if case_name == "fp32_text_only":
        return [[[37]], [[5], ("pad", 3), [20]]]
    if case_name.startswith("fp32_many_videos"):  # 5 videos in one sequence: > 3 prefix segments
        return [[("pad", 2), [3, ("video", 2), 2, ("video", 1), ("video", 3), 4, ("video", 2), 1, ("video", 2), 3]]]
    if case_name == "fp32_four_videos_general_mixed":  # 4 videos: the text after them has 4 prefix segments
        return [[[5, ("video", 2), 7, ("video", 1), ("video", 3), 9, ("video", 2), 11]]]
    if case_name.startswith(("fp32_split_key_tiles", "fp16_split_key_tiles_noncontiguous")):
        # long text after the video: early keys' later range > 128 tokens
        return [[[20, ("video", 3), 150]]]
    if case_name == "fp16_split_key_tiles_pad":
        return [[("pad", 3), [37, ("video", 2), 140]], [[200], ("pad", 5)]]
    packed = case_name == "fp32_packed_padded"
    return random_rows(rng, **(INTERPRETER_PACKED if packed else INTERPRETER))


def _worker() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from sophia_kernels import HierLayout, hierarchical_attention_reference
    from sophia_kernels.ops import hier_attention_triton as H
    from sophia_kernels.ops.hier_attention_triton import HierAttnConfig, _k_masks, _q_masks, hier_attention_triton
    from sophia_kernels.ops.tile_plan import build_plan

    configs = {
        "small": HierAttnConfig.for_interpreter(),
        "mixed": HierAttnConfig(32, 16, 4, 1, 32, 16, 4, 1, 16, 32, 4, 1),
        "split": HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1, dkdv_split_chunk=20),
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
        strided = "noncontiguous" in name
        H.INT64_OFFSETS_FROM = 0 if "int64" in name else 2**31
        if strided:
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
        do = torch.randn(b, n, hq, d, dtype=dtype).transpose(1, 2) if strided else torch.randn(b, hq, n, d, dtype=dtype)
        out = hier_attention_triton(q, k, v, layout, config=configs[cfg_name], poison=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
        with torch.no_grad():  # inference writing O over q itself (programs run one after another here, so a tile
            q_over = q.detach().clone()  # that read another tile's already overwritten rows would show)
            q_over_ptr = q_over.data_ptr()
            over = hier_attention_triton(q_over, k.detach(), v.detach(), layout, config=configs[cfg_name], out=q_over)
        int64 = H._int64(n, q)
        H.INT64_OFFSETS_FROM = 2**31
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ref = hierarchical_attention_reference(q64, k64, v64, layout)
        rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        pad = torch.ones(b, n, dtype=torch.bool)
        for r, s0, s1 in layout.seqs.tolist():
            pad[r, s0:s1] = False
        cfg = configs[cfg_name]
        plan = build_plan(layout, b, n, cfg.fwd_block_m, cfg.dkdv_block_n, "cpu", cfg.dkdv_split_chunk, hkv, 4)
        res = {"n": n, "shape": [b, hq, hkv, n, d], "q_flat": plan.q_flat, "n_slots": plan.n_slots,
               "out_in_q_layout": out.stride() == q.stride(), "int64": int64,
               "over_q_equal": bool(torch.equal(over, out.detach())), "over_q_in_place": over.data_ptr() == q_over_ptr,
               "grads_in_input_layouts": [g.stride() == x.stride() for g, x in zip(grads, (q, k, v))],
               **_q_masks(plan, cfg.fwd_block_n), **_k_masks(plan, cfg.dkdv_block_m)}
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


@pytest.mark.parametrize("case", ["fp32_basic", "fp32_noncontiguous", "fp32_noncontiguous_int64",
                                  "fp16_split_key_tiles_noncontiguous_int64"])
def test_output_and_gradients_come_in_the_layouts_of_the_inputs(interp_results, case):
    """A decoder's q is a [B, N, H, D] tensor seen as [B, H, N, D]: O is written in that layout, so that the
    decoder's transpose(1, 2).contiguous() before o_proj copies nothing; dQ, dK, dV come in q's, k's, v's layouts.
    With int64 row offsets too (long sequences): nothing is copied to contiguous."""
    res = interp_results[case]
    assert res["out_in_q_layout"] and all(res["grads_in_input_layouts"]), res
    assert res["int64"] == case.endswith("int64")


@pytest.mark.parametrize("case", ["fp32_basic", "fp32_noncontiguous_int64", "fp32_many_videos_general",
                                  "fp16_split_key_tiles_pad", "fp32_packed_padded"])
def test_inference_output_written_over_q_is_exact(interp_results, case):
    """out=q (inference): O overwrites q in place and equals the separately allocated output bit for bit, on the
    flat and the general path, with padding and packed sequences."""
    res = interp_results[case]
    assert res["over_q_in_place"] and res["over_q_equal"], res


def test_out_needs_no_grad_and_matching_shape():
    import torch

    from sophia_kernels import HierLayout, hierarchical_attention

    layout, n = HierLayout.from_segments([[[3, ("video", 2), 2]]], tokens_per_frame=2, arity=2, levels=2,
                                         neighbours=1)
    q, k, v = torch.randn(1, 2, n, 8, requires_grad=True), torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    with pytest.raises(ValueError, match="inference"):
        hierarchical_attention(q, k, v, layout, out=q)
    with pytest.raises(ValueError, match="out must match q"):
        hierarchical_attention(q.detach(), k, v, layout, out=torch.empty(1, 2, n, 4))
    with torch.no_grad():
        expected = hierarchical_attention(q, k, v, layout, implementation="reference")
        q_over = q.detach().clone()
        assert hierarchical_attention(q_over, k, v, layout, implementation="reference", out=q_over) is q_over
    assert torch.equal(q_over, expected)


def test_long_strided_inputs_are_not_copied():
    """A 32-head, D = 128 decoder view at 524,288 tokens (row stride 4096: 2**31 elements): kept as it is, int64 row
    offsets chosen; at 2**31 - 1 elements or for a contiguous [B, H, N, D] tensor of the same size: int32."""
    import torch

    from sophia_kernels.ops import hier_attention_triton as H

    n = 524_288
    q = torch.empty(1, n, 32, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    assert H._prep(q, n) is q
    assert H._int64(n, q) and not H._int64(n - 1, q[:, :, 1:])
    assert not H._int64(n, torch.empty(1, 32, n, 128, device="meta"))
    assert H._like(q).stride() == q.stride()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_triton_interpreter_matches_reference(interp_results, case):
    res = interp_results[case]
    dtype = [c for c in CASES if c[0] == case][0][2]
    tol = 1e-5 if dtype == "float32" else 5e-3
    if "general" in case:
        assert not res["q_flat"], f"{case}: meant for the general path, ran the flat loop"
    if "split_key_tiles" in case:
        assert res["n_slots"] > 0, f"{case}: no key tile was split"
    for tag in ("out", "dq", "dk", "dv"):
        r = res[tag]
        assert r["nan"] == 0, f"{case} {tag}: {r['nan']} NaN (unwritten or invalid) elements, shape {res['shape']}"
        assert r["rel_err"] < tol, f"{case} {tag}: relative error {r['rel_err']:.3e} >= {tol}, shape {res['shape']}"
        assert r["pad_nonzero"] == 0, f"{case} {tag}: {r['pad_nonzero']} nonzero elements at padding positions"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


# ---------------------------------------------------------------------------------------------- configuration
# shared memory per block (opt-in maximum): H100 / H200, A100, sm_86 / sm_89 cards
SMEM_LIMITS = (232448, 166912, 101376)


@pytest.fixture
def on_cuda_with(monkeypatch):
    """choose_config as on a CUDA device with a given shared-memory limit (no GPU needed)."""
    pytest.importorskip("triton")
    from sophia_kernels.ops import config as C

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def set_limit(limit):
        monkeypatch.setattr(C, "max_shared_memory", lambda device: limit)
        monkeypatch.setattr(C, "_CHOSEN", {})
        return C

    return set_limit


def test_shared_memory_estimate_matches_triton():
    """The model against offline sm_90 compiles (Triton 3.9): exact for the tuned bf16 kernels at D = 128, and the
    262,144 bytes of the fp32 forward that made the H200 fail (NOTES.md)."""
    from sophia_kernels.ops.config import HierAttnConfig, shared_memory_bytes

    cfg = HierAttnConfig()
    assert [shared_memory_bytes(cfg, k, 128, 2) for k in ("fwd", "dq", "dkdv")] == [131072, 163840, 99328]
    assert shared_memory_bytes(cfg, "fwd", 128, 4) == 262144


def test_float32_d128_fits_h200(on_cuda_with):
    import torch

    C = on_cuda_with(232448)
    cfg = C.choose_config(torch.float32, 128, "cuda:0")
    for kernel in C.KERNELS:
        assert C.shared_memory_bytes(cfg, kernel, 128, 4) <= 232448, (kernel, cfg)


@pytest.mark.parametrize("limit", SMEM_LIMITS)
def test_every_chosen_config_fits(on_cuda_with, limit):
    import torch

    C = on_cuda_with(limit)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (64, 128):
            cfg = C.choose_config(dtype, d, "cuda:0")
            for kernel in C.KERNELS:
                used = C.shared_memory_bytes(cfg, kernel, d, dtype.itemsize)
                assert used <= limit, (dtype, d, kernel, used, cfg)
                bm, bn, warps, stages = cfg.blocks(kernel)
                assert bm >= 16 and bn >= 16 and stages >= 1 and warps >= 1


def test_tuned_half_precision_configs_unchanged_on_hopper(on_cuda_with):
    import torch

    C = on_cuda_with(232448)
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            assert C.choose_config(dtype, d, "cuda:0") == C.HierAttnConfig()


def test_out_of_resources_shrinks_and_remembers(on_cuda_with):
    """Last resort: Triton reports more shared memory than the model; the wrapper shrinks that kernel and retries,
    and the next choose_config for the device returns the config that ran."""
    import torch
    from triton.runtime.errors import OutOfResources

    from sophia_kernels.ops import hier_attention_triton as H

    C = on_cuda_with(232448)
    chosen = (torch.float32, 128, torch.device("cuda:0"))
    start = C.choose_config(*chosen)
    tried = []

    def launch(cfg):  # pretend Triton needs 25 % more than the estimate
        tried.append(cfg)
        need = C.shared_memory_bytes(cfg, "dq", 128, 4) * 5 // 4
        if need > 232448:
            raise OutOfResources(need, 232448, "shared memory")

    ran = H._with_fallback("dq", start, chosen, launch)
    assert len(tried) > 1 and ran is tried[-1]
    assert C.shared_memory_bytes(ran, "dq", 128, 4) * 5 // 4 <= 232448
    assert (ran.fwd_block_m, ran.dkdv_block_n) == (start.fwd_block_m, start.dkdv_block_n)  # other kernels kept
    assert C.choose_config(*chosen) == ran
    with pytest.raises(OutOfResources):  # an explicit config runs as given
        H._with_fallback("dq", start, None, launch)
