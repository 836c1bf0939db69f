"""GPU correctness check of the Triton hierarchical-attention kernels against the reference.

    python -m sophia_kernels.gpu_check            # prints a pass/fail table, exit code 1 on any failure

bf16 and fp16 inputs, fresh random inputs per case, outputs and gradients poisoned with NaN before each run,
randomized layouts (packed rows, padding, text before/between/after, several videos, trapezoids, any M) and the
the reference shape at 32 frames. The reference runs on upcast inputs (float64 for small cases, float32 for the large
one). Error metric: ||x - ref|| / ||ref||; NaN never passes; padding rows must be exactly 0; a second run on the
same inputs must give bitwise-identical results (no races: the kernels use no atomics).
"""

from __future__ import annotations

import random
import sys
import time

import torch

from .layout import HierLayout
from .reference import hierarchical_attention_reference

TOL = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 5e-3)}  # (output, gradients)


def random_rows(rng: random.Random, m: int, max_frames: int = 10, max_text: int = 300, rows: int = 2):
    out = []
    for _ in range(rows):
        row = []
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.4:
                row.append(("pad", rng.randint(1, 200)))
            seq = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.6:
                    seq.append(("video", rng.randint(1, max_frames)))
                else:
                    seq.append(rng.randint(1, max_text))
            row.append(seq)
        out.append(row)
    return out


def make_cases(quick: bool = False):
    """(name, layout, n, batch, hq, hkv, d, dtype, ref_dtype)."""
    cases = []
    rng = random.Random(1234)
    specs = [
        # m, d, hq, hkv, dtype, arity, levels, neighbours
        (256, 128, 4, 1, torch.bfloat16, 2, 4, 2),
        (64, 128, 4, 2, torch.float16, 2, 4, 2),
        (100, 64, 4, 1, torch.bfloat16, 2, 3, 1),
        (16, 64, 2, 2, torch.float16, 3, 4, 2),
        (37, 128, 4, 4, torch.bfloat16, 2, 5, 3),
        (256, 64, 8, 2, torch.bfloat16, 2, 4, 0),
        (128, 128, 4, 1, torch.bfloat16, 2, 4, 2),
        (200, 128, 2, 1, torch.float16, 2, 4, 2),
    ]
    if quick:
        specs = specs[:3]
    for i, (m, d, hq, hkv, dtype, a, lv, e) in enumerate(specs):
        rows = random_rows(rng, m, max_frames=8 if m >= 128 else 12)
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=m, arity=a, levels=lv, neighbours=e)
        name = f"rand{i}_M{m}_D{d}_{str(dtype)[6:]}_A{a}L{lv}E{e}"
        cases.append((name, layout, n, len(rows), hq, hkv, d, dtype, torch.float64))
    # no videos at all, and a text-free video
    layout, n = HierLayout.from_segments([[[777]], [[300], ("pad", 77), [200]]], tokens_per_frame=256)
    cases.append(("text_only_packed", layout, n, 2, 4, 2, 128, torch.bfloat16, torch.float64))
    layout, n = HierLayout.from_segments([[[("video", 7)]]], tokens_per_frame=256)
    cases.append(("video_only_7f", layout, n, 1, 4, 1, 128, torch.bfloat16, torch.float64))
    if not quick:
        # the reference shape at 32 frames: 64 text, 32 frames of 256 tokens (+ levels), 64 text; 32 q heads, 8 kv
        layout, n = HierLayout.from_segments([[[64, ("video", 32), 64]]], tokens_per_frame=256)
        cases.append(("targets_32f", layout, n, 1, 32, 8, 128, torch.bfloat16, torch.float32))
        layout, n = HierLayout.from_segments([[[0, ("video", 32), 64]]], tokens_per_frame=256)
        cases.append(("targets_32f_prefix0", layout, n, 1, 32, 8, 128, torch.float16, torch.float32))
    return cases


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.detach().to(y.dtype)
    if torch.isnan(x).any():
        return float("nan")
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def check_case(case, seed: int = 0) -> dict:
    from .ops.hier_attention_triton import hier_attention_triton

    name, layout, n, b, hq, hkv, d, dtype, ref_dtype = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, generator=g)
    res = {"case": name, "shape": f"B{b} Hq{hq} Hkv{hkv} N{n} D{d}", "dtype": str(dtype)[6:]}

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = hier_attention_triton(qq, kk, vv, layout, poison=True)
        grads = torch.autograd.grad(out, (qq, kk, vv), do)
        torch.cuda.synchronize()
        return (out.detach(),) + tuple(grads)

    t0 = time.perf_counter()
    got = run()
    again = run()
    res["kernel_s"] = time.perf_counter() - t0
    res["deterministic"] = all(torch.equal(x, y) for x, y in zip(got, again))
    qr, kr, vr = (t.to(ref_dtype).requires_grad_(True) for t in (q, k, v))
    ref = hierarchical_attention_reference(qr, kr, vr, layout)
    rgr = torch.autograd.grad(ref, (qr, kr, vr), do.to(ref_dtype))
    pad = torch.ones(b, n, dtype=torch.bool, device="cuda")
    for r, s0, s1 in layout.seqs.tolist():
        pad[r, s0:s1] = False
    tol_o, tol_g = TOL[dtype]
    ok = res["deterministic"]
    for tag, x, y, tol in [("out", got[0], ref, tol_o)] + [(t, x, y, tol_g) for t, x, y in
                                                            zip(("dq", "dk", "dv"), got[1:], rgr)]:
        e = rel(x, y.detach())
        res[tag] = e
        pad_bad = int((x.permute(0, 2, 1, 3)[pad] != 0).sum())
        ok = ok and (e == e) and e < tol and pad_bad == 0
        if pad_bad:
            res[tag + "_pad_nonzero"] = pad_bad
    res["pass"] = bool(ok)
    del ref, rgr, qr, kr, vr
    torch.cuda.empty_cache()
    return res


def run_checks(quick: bool = False, verbose: bool = True) -> list[dict]:
    results = []
    for i, case in enumerate(make_cases(quick)):
        try:
            r = check_case(case, seed=i)
        except Exception as exc:  # report, keep going
            r = {"case": case[0], "pass": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        results.append(r)
        if verbose:
            print(r, flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| case | shape | dtype | out | dq | dk | dv | deterministic | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | | | | | FAIL: {r['error']} |")
            continue
        f = lambda x: f"{x:.2e}"  # noqa: E731
        lines.append(f"| {r['case']} | {r['shape']} | {r['dtype']} | {f(r['out'])} | {f(r['dq'])} | {f(r['dk'])} | "
                     f"{f(r['dv'])} | {r['deterministic']} | {'pass' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    results = run_checks(quick="--quick" in argv)
    print(f"\nDevice: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(table(results))
    bad = [r["case"] for r in results if not r["pass"]]
    print("ALL PASS" if not bad else f"FAILED: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
