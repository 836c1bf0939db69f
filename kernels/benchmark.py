"""Benchmark of the hierarchical-attention kernels on the reference shapes (GPU only).

    python -m sophia_kernels.benchmark [--frames 32 128 512] [--dense-frames 32 128] [--flex-frames 32 128]
                                       [--sweep] [--json out.json]
    python -m sophia_kernels.benchmark --ab-bwd --json out.json   # backward variants A/B (BWD_VARIANTS)

Shapes (as in the reference measurements): batch 1, 32 query heads, 8 kv heads, D 128, M 256, E 2, A 2, L 4, 64 text tokens before and
64 after the video, bf16. Medians of triton.testing.do_bench. "Dense" is causal SDPA (flash backend) over the
plain sequence (64 + 256 F + 64 tokens); "Flex" is FlexAttention (compiled) with a BlockMask of exactly the same
rule over the extended sequence. Useful TFLOP/s count only allowed (q, k) pairs: 4 * D * pairs * Hq per forward,
2.5x that for the backward (fwd+bwd = 3.5x).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

from .layout import HierLayout

HQ, HKV, D, M = 32, 8, 128, 256


def _bench(fn, warmup=25, rep=100) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _bench(lambda: a @ b)
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    tc = _bench(lambda: y.copy_(x))
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * 8192**3 / t / 1e9, "copy_tbps": 2 * (1 << 30) / tc / 1e9}


def setup_ms(rows, reps=30, device="cuda") -> float:
    from .ops.hier_attention_triton import _plans, default_config

    cfg = default_config(D)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ts = []
    for _ in range(reps):
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=M)
        sync()
        t0 = time.perf_counter()
        _plans(layout, 1, n, HKV, cfg, dev)
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _inputs(n, hq=HQ, hkv=HKV, dtype=torch.bfloat16, grad=False):
    q = torch.randn(1, hq, n, D, device="cuda", dtype=dtype, requires_grad=grad)
    k = torch.randn(1, hkv, n, D, device="cuda", dtype=dtype, requires_grad=grad)
    v = torch.randn(1, hkv, n, D, device="cuda", dtype=dtype, requires_grad=grad)
    return q, k, v


def time_fn(attn, n, want_mem=True) -> dict:
    """fwd and fwd+bwd medians (ms) and peak extra memory (GiB) of attn(q, k, v)."""
    q, k, v = _inputs(n, grad=True)
    do = torch.randn_like(q)
    with torch.no_grad():
        fwd = _bench(lambda: attn(q, k, v))

    def fb():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    fwdbwd = _bench(fb)
    mem = None
    if want_mem:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fb()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**30
    del q, k, v, do
    torch.cuda.empty_cache()
    return {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "extra_mem_gib": mem}


def ours(layout, cfg=None):
    from .ops.hier_attention_triton import hier_attention_triton

    return lambda q, k, v: hier_attention_triton(q, k, v, layout, config=cfg)


def dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def dense_expanded(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                                                v.repeat_interleave(g, 1), is_causal=True)


def flex_builder(layout, n):
    """(attention callable, BlockMask build seconds) for FlexAttention with the same rule."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    meta = layout.token_metadata(1, n, device="cuda")
    seq, vid, lev, frm, vst = (meta[k][0] for k in ("seq", "video", "level", "frame", "video_start"))
    a, e = layout.arity, layout.neighbours

    def mask_mod(b, h, qi, ki):
        same = (seq[qi] == seq[ki]) & (seq[qi] >= 0)
        kagg = lev[ki] >= 1
        qtext = vid[qi] < 0
        text_rule = qtext & (ki <= qi) & ~kagg
        before = (ki < vst[qi]) & ~kagg
        dl = lev[ki] - lev[qi]
        df = frm[qi] - frm[ki]
        window = (dl == 0) & (df <= e) & (df >= -e)
        parent = (dl == 1) & (frm[ki] == frm[qi] // a)
        child = (dl == -1) & (frm[ki] // a == frm[qi])
        vid_rule = (~qtext) & (before | ((vid[qi] == vid[ki]) & (window | parent | child)))
        return same & (text_rule | vid_rule)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, 1, 1, n, n, device="cuda", _compile=True)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    fa = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: fa(q, k, v, block_mask=bm, enable_gqa=True)), build_s


def sweep(frames: int = 128) -> dict:
    """Time each kernel alone under a few launch configurations; returns the best config."""
    from .ops import hier_attention_triton as H

    rows = [[[64, ("video", frames), 64]]]
    layout, n = HierLayout.from_segments(rows, tokens_per_frame=M)
    q, k, v = _inputs(n)
    do = torch.randn_like(q)
    scale = D ** -0.5
    base = H.HierAttnConfig()
    # earlier sweeps (NOTES.md): (128,128,8,3), (128,64,4,3), (64,64,4,3) fwd; (64,64,4,3), (128,32,8,3) dq;
    # (128,32,4,3), (64,64,4,3), (128,64,8,3,kv_as_b) dkdv were all slower
    fwd_cfgs = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
    dq_cfgs = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
    dkdv_cfgs = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)]
    out = {"fwd": [], "dq": [], "dkdv": []}
    best = {}
    for bm, bn, w, s in fwd_cfgs:
        cfg = H.HierAttnConfig(fwd_block_m=bm, fwd_block_n=bn, fwd_warps=w, fwd_stages=s)
        try:
            t = _bench(lambda: H.hier_attention_fwd(q, k, v, layout, scale, cfg))
        except Exception as exc:  # compile failure / out of resources
            t = float("inf")
            print("fwd", (bm, bn, w, s), "failed:", str(exc)[:200])
        out["fwd"].append(((bm, bn, w, s), t))
        print(f"sweep fwd {bm, bn, w, s}: {t:.3f} ms", flush=True)
    best["fwd"] = min(out["fwd"], key=lambda x: x[1])[0]
    o, lse = H.hier_attention_fwd(q, k, v, layout, scale, base)
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    for bm, bn, w, s in dq_cfgs:
        cfg = H.HierAttnConfig(dq_block_m=bm, dq_block_n=bn, dq_warps=w, dq_stages=s)
        try:
            t = _bench(lambda: H.launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, cfg))
        except Exception as exc:
            t = float("inf")
            print("dq", (bm, bn, w, s), "failed:", str(exc)[:200])
        out["dq"].append(((bm, bn, w, s), t))
        print(f"sweep dq {bm, bn, w, s}: {t:.3f} ms", flush=True)
    best["dq"] = min(out["dq"], key=lambda x: x[1])[0]
    H.launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, base)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for c in dkdv_cfgs:
        bn, bm, w, s = c[:4]
        kvb = len(c) > 4 and c[4]
        cfg = H.HierAttnConfig(dkdv_block_n=bn, dkdv_block_m=bm, dkdv_warps=w, dkdv_stages=s, dkdv_kv_as_b=kvb)
        try:
            t = _bench(lambda: H.launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg))
        except Exception as exc:
            t = float("inf")
            print("dkdv", c, "failed:", str(exc)[:200])
        out["dkdv"].append((tuple(c), t))
        print(f"sweep dkdv {c}: {t:.3f} ms", flush=True)
    best["dkdv"] = min(out["dkdv"], key=lambda x: x[1])[0]
    f, dqc, dkc = best["fwd"], best["dq"], best["dkdv"]
    cfg = H.HierAttnConfig(f[0], f[1], f[2], f[3], dqc[0], dqc[1], dqc[2], dqc[3], dkc[0], dkc[1], dkc[2], dkc[3],
                           dkdv_kv_as_b=len(dkc) > 4 and dkc[4])
    del q, k, v, do, o, lse, delta, dq, dk, dv
    torch.cuda.empty_cache()
    return {"results": out, "best": cfg}


BWD_VARIANTS = {  # name -> HierAttnConfig fields replaced ("base" = the default; NOTES.md, v3 -> v4)
    "dq": {"base": {},
           "m64n64w4s2": {"dq_block_m": 64, "dq_block_n": 64, "dq_warps": 4, "dq_stages": 2}},
    "dkdv": {"base": {},
             "v3_n128m64w8s3": {"dkdv_block_n": 128, "dkdv_block_m": 64, "dkdv_warps": 8, "dkdv_stages": 3},
             "n64m64w4s2": {"dkdv_block_n": 64, "dkdv_block_m": 64, "dkdv_warps": 4, "dkdv_stages": 2},
             "n64m32w4s3": {"dkdv_block_n": 64, "dkdv_block_m": 32, "dkdv_warps": 4, "dkdv_stages": 3},
             "n64m32w4s2": {"dkdv_block_n": 64, "dkdv_block_m": 32, "dkdv_warps": 4, "dkdv_stages": 2}},
}


def ab_bwd(json_path=None) -> int:
    """Backward variants timed alone (dQ, dK/dV) at 128 and 512 frames, checked against the default kernels'
    results; then fwd+bwd of the default vs the best dQ + best dK/dV combination (A, B, A, B). Writes the best
    combination as a SOPHIA_HIER_CONFIG string to best_cfg.txt next to json_path."""
    import dataclasses
    import os

    from .ops import hier_attention_triton as H

    base = H.default_config(D)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "base": repr(base), "kernels": [], "fwdbwd": []}
    tot = {"dq": {}, "dkdv": {}}
    for f in (128, 512):
        layout, n = HierLayout.from_segments([[[64, ("video", f), 64]]], tokens_per_frame=M)
        q, k, v = _inputs(n)
        do = torch.randn_like(q)
        scale = D ** -0.5
        o, lse = H.hier_attention_fwd(q, k, v, layout, scale, base)
        delta = torch.empty_like(lse)
        dq0 = torch.empty_like(q)
        H.launch_dq(q, k, v, o, lse, do, delta, dq0, layout, scale, base)
        dk0, dv0 = torch.empty_like(k), torch.empty_like(v)
        H.launch_dkdv(q, k, v, do, lse, delta, dk0, dv0, layout, scale, base)
        torch.cuda.synchronize()

        def rd(x, y):
            return float((x.float() - y.float()).norm() / y.float().norm())

        for name, kw in BWD_VARIANTS["dq"].items():
            cfg = dataclasses.replace(base, **kw)
            dq = torch.full_like(q, float("nan"))
            dl = torch.empty_like(lse)
            H.launch_dq(q, k, v, o, lse, do, dl, dq, layout, scale, cfg)
            diff = rd(dq, dq0)
            t = _bench(lambda: H.launch_dq(q, k, v, o, lse, do, dl, dq, layout, scale, cfg))
            r = {"frames": f, "kernel": "dq", "variant": name, "ms": t, "rel_diff_vs_base": diff}
            info["kernels"].append(r)
            print(r, flush=True)
            tot["dq"][name] = tot["dq"].get(name, 0.0) + (t if diff == diff and diff < 1e-2 else float("inf"))
        for name, kw in BWD_VARIANTS["dkdv"].items():
            cfg = dataclasses.replace(base, **kw)
            dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
            H.launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg)
            diff = max(rd(dk, dk0), rd(dv, dv0))
            t = _bench(lambda: H.launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg))
            r = {"frames": f, "kernel": "dkdv", "variant": name, "ms": t, "rel_diff_vs_base": diff}
            info["kernels"].append(r)
            print(r, flush=True)
            tot["dkdv"][name] = tot["dkdv"].get(name, 0.0) + (t if diff == diff and diff < 1e-2 else float("inf"))
        del q, k, v, do, o, lse, delta, dq0, dk0, dv0
        torch.cuda.empty_cache()
    best = {kind: min(v, key=v.get) for kind, v in tot.items()}
    kw = {**BWD_VARIANTS["dq"][best["dq"]], **BWD_VARIANTS["dkdv"][best["dkdv"]]}
    info["best"] = best
    cfg_best = dataclasses.replace(base, **kw)
    env = ",".join(f"{a}={int(b) if isinstance(b, bool) else b}" for a, b in kw.items())
    info["best_env"] = env
    print("best", best, "SOPHIA_HIER_CONFIG=" + env, flush=True)
    if json_path:
        with open(os.path.join(os.path.dirname(json_path) or ".", "best_cfg.txt"), "w") as fh:
            fh.write(env)
    for f in (128, 512):
        layout, n = HierLayout.from_segments([[[64, ("video", f), 64]]], tokens_per_frame=M)
        for rep in range(2):
            for tag, cfg in (("default", base), ("best", cfg_best)):
                t = time_fn(ours(layout, cfg), n, want_mem=(rep == 0))
                r = {"frames": f, "rep": rep, "which": tag, **t}
                info["fwdbwd"].append(r)
                print(r, flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(info, fh, indent=1, default=str)
    print("\n| frames | which | fwd ms | fwd+bwd ms | extra mem GiB |\n|---|---|---|---|---|")
    for r in info["fwdbwd"]:
        mem = "-" if r["extra_mem_gib"] is None else f"{r['extra_mem_gib']:.2f}"
        print(f"| {r['frames']} | {r['which']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {mem} |")
    print("\n| kernel | variant | frames | ms | rel diff vs base |\n|---|---|---|---|---|")
    for r in info["kernels"]:
        print(f"| {r['kernel']} | {r['variant']} | {r['frames']} | {r['ms']:.3f} | {r['rel_diff_vs_base']:.1e} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("--dense-frames", type=int, nargs="*", default=[32, 128])
    p.add_argument("--flex-frames", type=int, nargs="*", default=[])
    p.add_argument("--prefix-check", type=int, nargs="*", default=[0, 64, 100], help="prefixes at 128 frames")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--ab", action="store_true", help="A/B: dK/dV tile splitting and the split prefix loop")
    p.add_argument("--ab-bwd", action="store_true",
                   help="A/B of backward variants (kernels alone, then fwd+bwd of the default vs the best); only this")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.ab_bwd:
        return ab_bwd(args.json)

    from .ops import hier_attention_triton as H

    dev = torch.cuda.get_device_name()
    info = {"device": dev, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    import triton

    info["triton"] = triton.__version__
    info.update(ceilings())
    print(info, flush=True)
    if args.sweep:
        sw = sweep(128)
        H._DEFAULT_CONFIG = sw["best"]
        info["sweep"] = {k: [(list(c), t) for c, t in v] for k, v in sw["results"].items()}
        print("best config:", sw["best"], flush=True)
    info["config"] = repr(H.default_config(D))
    rows_out = []
    for f in args.frames:
        rows = [[[64, ("video", f), 64]]]
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=M)
        fl = 4 * D * layout.allowed_pairs() * HQ
        r = {"frames": f, "plain_tokens": 128 + M * f, "ext_tokens": n, "useful_tflop_fwd": fl / 1e12,
             "setup_ms": setup_ms(rows)}
        r["ours"] = time_fn(ours(layout), n)
        r["ours"]["tflops_fwd"] = fl / r["ours"]["fwd_ms"] / 1e9
        r["ours"]["tflops_fwdbwd"] = 3.5 * fl / r["ours"]["fwdbwd_ms"] / 1e9
        print(f, "ours", r["ours"], flush=True)
        if f in args.dense_frames:
            npl = 128 + M * f
            try:
                r["dense"] = time_fn(dense, npl)
            except Exception as exc:
                print("dense with enable_gqa failed, expanding kv:", str(exc)[:200])
                r["dense"] = time_fn(dense_expanded, npl)
            print(f, "dense", r["dense"], flush=True)
        if f in args.flex_frames:
            try:
                fn, build_s = flex_builder(layout, n)
                r["flex_build_s"] = build_s
                r["flex"] = time_fn(fn, n, want_mem=False)
                r["flex"]["tflops_fwd"] = fl / r["flex"]["fwd_ms"] / 1e9
                print(f, "flex", r["flex"], "build", build_s, flush=True)
            except Exception as exc:
                print("flex failed:", str(exc)[:300])
        rows_out.append(r)
        torch.cuda.empty_cache()
    prefix_rows = []
    for pre in args.prefix_check:
        rows = [[[pre, ("video", 128), 64]]]
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=M)
        fl = 4 * D * layout.allowed_pairs() * HQ
        t = time_fn(ours(layout), n, want_mem=False)
        t["tflops_fwd"] = fl / t["fwd_ms"] / 1e9
        prefix_rows.append({"prefix": pre, "ext_tokens": n, **t})
        print("prefix", pre, t, flush=True)
    if args.ab:
        import dataclasses

        base = H.default_config(D)
        ab = []
        for f in (128, 512):
            layout, n = HierLayout.from_segments([[[64, ("video", f), 64]]], tokens_per_frame=M)
            q, k, v = _inputs(n)
            do = torch.randn_like(q)
            scale = D ** -0.5
            o, lse = H.hier_attention_fwd(q, k, v, layout, scale, base)
            delta = torch.empty_like(lse)
            dq = torch.empty_like(q)
            H.launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, base)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            for chunk in (-1, 0):
                cfg = dataclasses.replace(base, dkdv_split_chunk=chunk)
                t = _bench(lambda: H.launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg))
                ab.append({"frames": f, "what": f"dkdv split_chunk={chunk}", "ms": t})
                print(ab[-1], flush=True)
            t = _bench(lambda: H.launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, base))
            ab.append({"frames": f, "what": "dq", "ms": t})
            print(ab[-1], flush=True)
            del q, k, v, do, o, lse, delta, dq, dk, dv
            torch.cuda.empty_cache()
        for pre in (100,):
            layout, n = HierLayout.from_segments([[[pre, ("video", 128), 64]]], tokens_per_frame=M)
            for sp in (False, True):
                cfg = dataclasses.replace(base, split_prefix=sp)
                t = time_fn(ours(layout, cfg), n, want_mem=False)
                ab.append({"frames": 128, "what": f"prefix {pre} split_prefix={sp}", "ms": t["fwd_ms"],
                           "fwdbwd_ms": t["fwdbwd_ms"]})
                print(ab[-1], flush=True)
        info["ab"] = ab
    info["rows"] = rows_out
    info["prefix"] = prefix_rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1, default=str)

    def ms(x):
        return "-" if x is None else f"{x:.2f}"

    print(f"\n## {dev}, torch {info['torch']}, triton {info['triton']}, {info['date']}")
    print(f"measured ceilings: bf16 matmul {info['matmul_tflops']:.0f} TFLOP/s, copy {info['copy_tbps']:.2f} TB/s")
    print(f"config: {info['config']}\n")
    print("| frames | ext tokens | useful TFLOP fwd | ours fwd ms | ours fwd+bwd ms | ours TFLOP/s fwd | "
          "ours TFLOP/s fwd+bwd | ours extra mem GiB | dense fwd ms | dense fwd+bwd ms | flex fwd ms | "
          "flex fwd+bwd ms | flex build s | setup ms |")
    print("|" + "---|" * 14)
    for r in rows_out:
        o, d_, fx = r["ours"], r.get("dense", {}), r.get("flex", {})
        print(f"| {r['frames']} | {r['ext_tokens']:,} | {r['useful_tflop_fwd']:.2f} | {ms(o['fwd_ms'])} | "
              f"{ms(o['fwdbwd_ms'])} | {o['tflops_fwd']:.0f} | {o['tflops_fwdbwd']:.0f} | {o['extra_mem_gib']:.2f} | "
              f"{ms(d_.get('fwd_ms'))} | {ms(d_.get('fwdbwd_ms'))} | {ms(fx.get('fwd_ms'))} | "
              f"{ms(fx.get('fwdbwd_ms'))} | {ms(r.get('flex_build_s'))} | {r['setup_ms']:.3f} |")
    if prefix_rows:
        print("\n| prefix (128 frames) | ext tokens | fwd ms | fwd+bwd ms | useful TFLOP/s fwd |")
        print("|---|---|---|---|---|")
        for r in prefix_rows:
            print(f"| {r['prefix']} | {r['ext_tokens']:,} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
                  f"{r['tflops_fwd']:.0f} |")
    if info.get("ab"):
        print("\n| A/B | frames | ms | fwd+bwd ms |\n|---|---|---|---|")
        for r in info["ab"]:
            print(f"| {r['what']} | {r['frames']} | {r['ms']:.3f} | {r.get('fwdbwd_ms', '-')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
