"""GPU correctness check of the Triton hierarchical-attention kernels against the reference.

    python -m sophia_kernels.gpu_check [--quick] [--config "field=value,..."]   # pass/fail table, exit 1 on failure

bf16, fp16 and fp32 inputs, fresh random inputs per case, outputs and gradients poisoned with NaN before each run,
varied layouts (packed rows, padding, text before/between/after, several videos, trapezoids, any M; drawn once by
the tests' random-layout generator, tests/layouts.py, and written out here) and the reference shape at 32 frames.
The reference runs on upcast inputs (float64 for small cases, float32 for the large ones). Error metric:
||x - ref|| / ||ref||; NaN never passes; padding rows must be exactly 0; a second run on the same inputs must give
bitwise-identical results (no races: the kernels use no atomics). Without ``--config`` the kernels run with the
automatic configuration (``choose_config``: fitted to the device's shared memory); ``--config`` replaces fields of
the default ``HierAttnConfig`` (A/B of variants).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .layout import HierLayout
from .reference import hierarchical_attention_reference

TOL = {torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 5e-3),  # (output, gradients)
       torch.float32: (2e-3, 5e-3)}  # fp32 inputs: tl.dot runs in tf32 (10-bit mantissa, like fp16)


# the layouts of the "rand" cases: tests/layouts.py random_rows(random.Random(1234), **GPU) with frames up to 8
# (M >= 128) or 12, drawn in this order for the M of each spec
RAND_ROWS = [
    [[("pad", 24), [43], ("pad", 91), [("video", 1), ("video", 8)]],
     [("pad", 47), [258], [("video", 8), ("video", 2)]]],
    [[("pad", 143), [247]], [("pad", 168), [("video", 9), 261], ("pad", 86), [194, ("video", 2)]]],
    [[("pad", 143), [("video", 6), 272], ("pad", 79), [("video", 5), 21, ("video", 3), ("video", 3)]],
     [("pad", 99), [("video", 10), 244, ("video", 8)], [("video", 9), 152]]],
    [[("pad", 48), [("video", 2), 53, 249, ("video", 11)], ("pad", 50), [("video", 12), 81, ("video", 5)]],
     [[229, 41, ("video", 1)]]],
    [[[("video", 2), 163], ("pad", 118), [("video", 2)]],
     [[("video", 12)], [("video", 6), 106, ("video", 12), ("video", 10)]]],
    [[("pad", 91), [("video", 8), ("video", 3)]], [[36, 88]]],
    [[[76]], [("pad", 101), [("video", 7), 144, ("video", 5)]]],
    [[("pad", 148), [48, 143], [("video", 7), ("video", 5), 204]], [("pad", 113), [85, ("video", 1)]]],
]


def make_cases(quick: bool = False):
    """(name, layout, n, batch, hq, hkv, d, dtype, ref_dtype)."""
    cases = []
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
        rows = RAND_ROWS[i]
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
        # float32 inputs (the configuration is shrunk to fit shared memory: 4-byte tiles)
        layout, n = HierLayout.from_segments(RAND_ROWS[0], tokens_per_frame=256)
        cases.append(("fp32_rand_M256_D128", layout, n, 2, 4, 1, 128, torch.float32, torch.float64))
        layout, n = HierLayout.from_segments(RAND_ROWS[1], tokens_per_frame=64)
        cases.append(("fp32_rand_M64_D64", layout, n, 2, 4, 2, 64, torch.float32, torch.float64))
        layout, n = HierLayout.from_segments([[[64, ("video", 32), 64]]], tokens_per_frame=256)
        cases.append(("targets_32f_fp32", layout, n, 1, 32, 8, 128, torch.float32, torch.float32))
    return cases


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.detach().to(y.dtype)
    if torch.isnan(x).any():
        return float("nan")
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def check_case(case, seed: int = 0, config=None) -> dict:
    """Run one case of ``make_cases`` (``config``: a HierAttnConfig, None for the automatic choice)."""
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
        out = hier_attention_triton(qq, kk, vv, layout, config=config, poison=True)
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


def run_checks(quick: bool = False, verbose: bool = True, config=None) -> list[dict]:
    results = []
    for i, case in enumerate(make_cases(quick)):
        try:
            r = check_case(case, seed=i, config=config)
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
    p = argparse.ArgumentParser(description="GPU correctness check of the Triton kernels against the reference")
    p.add_argument("--quick", action="store_true", help="the first few cases only")
    p.add_argument("--config", default=None,
                   help='replace fields of the default HierAttnConfig, e.g. "dkdv_block_n=128,dkdv_warps=8" '
                        "(default: the automatic choice for each dtype and head dim)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    config = None
    if args.config is not None:
        from .benchmark import config_with
        from .ops.config import HierAttnConfig

        config = config_with(HierAttnConfig(), args.config, source="--config")
    results = run_checks(quick=args.quick, config=config)
    print(f"\nDevice: {torch.cuda.get_device_name()}  torch {torch.__version__}"
          + (f"  config {config}" if config is not None else ""))
    print(table(results))
    bad = [r["case"] for r in results if not r["pass"]]
    print("ALL PASS" if not bad else f"FAILED: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
