"""Benchmark of the hierarchical-attention kernels on the reference shapes (GPU only).

    python -m sophia_kernels.benchmark [--frames 32 128 512] [--dense-frames 32 128] [--flex-frames 32 128 512]
                                       [--prefix-check 0 64 100 128] [--config "field=value,..."] [--json out.json]
    python -m sophia_kernels.benchmark --ab-bwd [--ab-prefix 64] --json out.json   # backward variants (BWD_VARIANTS)
    python -m sophia_kernels.benchmark --frames 128 512 --ab-cfg "s4:fwd_stages=4"  # configurations vs the default

Configurations: the default is the automatic choice for bf16, D 128 on the device (``choose_config``; on H100 /
H200 the tuned HierAttnConfig defaults); "field=value,..." strings (``config_with``) replace HierAttnConfig fields.

Shapes (as in the reference measurements): batch 1, 32 query heads, 8 kv heads, D 128, M 256, E 2, A 2, L 4,
64 text tokens before and 64 after the video, bf16. Medians over >= 25 runs of triton.testing.do_bench. "Dense"
is causal SDPA (flash backend) over the plain sequence (64 + 256 F + 64 tokens); "Flex" is FlexAttention
(compiled) with a BlockMask of exactly the same rule over the extended sequence (built chunk-wise by
``flex_block_mask``; its build time is reported). Useful TFLOP/s count only allowed (q, k) pairs: 4 * D * pairs *
Hq per forward, 2.5x that for the backward (fwd+bwd = 3.5x).
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


def _bench(fn, warmup=25, rep=100, min_runs=25) -> float:
    """Median ms of ``fn`` (triton's do_bench) over at least ``min_runs`` timed runs: do_bench repeats for ``rep``
    milliseconds, which alone would give a single run of a 75 ms function."""
    import triton

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=max(warmup, 3 * est), rep=max(rep, min_runs * est),
                                   return_mode="median")


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


def base_config(device="cuda"):
    """The configuration the kernels choose for the benchmark shapes (bf16, D 128) on ``device``."""
    from .ops.config import choose_config

    return choose_config(torch.bfloat16, D, device)


def config_with(cfg, fields: str, source: str = "config"):
    """``cfg`` (a HierAttnConfig) with the fields of a "field=value,..." string replaced (e.g.
    ``dkdv_block_n=64,dkdv_warps=4``); integers. An empty string changes nothing."""
    import dataclasses

    kw = {}
    for item in filter(None, (x.strip() for x in fields.split(","))):
        name, _, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if name not in type(cfg).__dataclass_fields__:
            raise ValueError(f"{source}: unknown field {name!r}")
        kw[name] = int(raw)
    return dataclasses.replace(cfg, **kw)


def setup_ms(rows, reps=30, device="cuda") -> float:
    from .ops.hier_attention_triton import _plans

    dev = torch.device(device)
    cfg = base_config(dev)
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


def flex_mask_mod(layout, n, device="cuda"):
    """FlexAttention mask_mod of the hierarchical rule (docs/hierarchical_attention.md), from per-token tables."""
    meta = layout.token_metadata(1, n, device=device)
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

    return mask_mod


def flex_block_mask(mask_mod, n, device="cuda", block=128, chunk_elems=1 << 26):
    """BlockMask of ``mask_mod`` over an n x n score matrix, built by evaluating the rule on a few query blocks at a
    time (n must be a multiple of ``block``). Same partial/full block lists as ``create_block_mask``, which in our
    runs took minutes on the GPU machine (NOTES.md)."""
    from torch.nn.attention.flex_attention import BlockMask

    if n % block:
        raise ValueError(f"n={n} is not a multiple of the block size {block}")
    nb = n // block
    keys = torch.arange(n, device=device)
    partial = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    rows = max(1, chunk_elems // (block * n))
    for i0 in range(0, nb, rows):
        i1 = min(nb, i0 + rows)
        qi = torch.arange(i0 * block, i1 * block, device=device)
        m = mask_mod(0, 0, qi[:, None], keys[None, :]).view(i1 - i0, block, nb, block)
        any_, all_ = m.any(dim=3).any(dim=1), m.all(dim=3).all(dim=1)
        full[i0:i1] = all_
        partial[i0:i1] = any_ & ~all_

    def lists(sel):
        num = sel.sum(1, dtype=torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return num[None, None].contiguous(), idx[None, None].contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod)


def flex_builder(layout, n):
    """(attention callable, BlockMask build seconds) for FlexAttention with the same rule."""
    from torch.nn.attention.flex_attention import flex_attention

    mask_mod = flex_mask_mod(layout, n)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = flex_block_mask(mask_mod, n)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    fa = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: fa(q, k, v, block_mask=bm, enable_gqa=True)), build_s


BWD_VARIANTS = {  # name -> HierAttnConfig fields replaced; "default" = the default config (NOTES.md: v3 -> v4)
    "default": {},
    "v3_dkdv_n128m64w8s3": {"dkdv_block_n": 128, "dkdv_block_m": 64, "dkdv_warps": 8, "dkdv_stages": 3},
    "dq_m64n64w4s2": {"dq_block_m": 64, "dq_block_n": 64, "dq_warps": 4, "dq_stages": 2},
}


def ab_bwd(json_path=None, frames=(128, 512), prefix=64) -> int:
    """Whole-backward variants (BWD_VARIANTS) timed alone at 128 and 512 frames (``prefix`` text tokens before the
    video, 64 after) and checked against the default's
    gradients; then fwd+bwd of the default vs the fastest variant, alternating (A, B, A, B). Writes the fastest as a
    "field=value,..." string (``--config`` of this benchmark and of gpu_check) to best_cfg.txt next to json_path."""
    import dataclasses
    import os

    from .ops import hier_attention_triton as H

    base = base_config()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "base": repr(base), "bwd": [], "fwdbwd": []}
    total: dict[str, float] = {}
    scale = D ** -0.5

    def rd(x, y):
        return float((x.float() - y.float()).norm() / y.float().norm())

    for f in frames:
        layout, n = HierLayout.from_segments([[[prefix, ("video", f), 64]]], tokens_per_frame=M)
        q, k, v = _inputs(n)
        do = torch.randn_like(q)
        o, lse, _ = H.hier_attention_fwd(q, k, v, layout, scale, base)
        ref = H.hier_attention_bwd(do, q, k, v, o, lse, layout, scale, base)
        for name, kw in BWD_VARIANTS.items():
            cfg = dataclasses.replace(base, **kw)
            got = again = None
            try:
                got = H.hier_attention_bwd(do, q, k, v, o, lse, layout, scale, cfg, poison=True)
                again = H.hier_attention_bwd(do, q, k, v, o, lse, layout, scale, cfg)
                diff = max(rd(x, y) for x, y in zip(got, ref))
                rerun = max(rd(x, y) for x, y in zip(again, got))
                t = _bench(lambda: H.hier_attention_bwd(do, q, k, v, o, lse, layout, scale, cfg))
            except Exception as exc:  # compile failure / out of resources: report, keep going
                print(name, "failed:", str(exc)[:300], flush=True)
                diff = rerun = t = float("nan")
            r = {"frames": f, "prefix": prefix, "variant": name, "bwd_ms": t, "rel_diff_vs_default": diff,
                 "rerun_diff": rerun}
            info["bwd"].append(r)
            print(r, flush=True)
            good = diff == diff and diff < 1e-2
            total[name] = total.get(name, 0.0) + (t if good else float("inf"))
            del got, again
        del q, k, v, do, o, lse, ref
        torch.cuda.empty_cache()
    best = min(total, key=total.get)
    kw = BWD_VARIANTS[best]
    env = ",".join(f"{a}={b}" for a, b in kw.items())
    info["best"], info["best_config"] = best, env
    print("best", best, f"--config {env!r}", flush=True)
    if json_path:
        with open(os.path.join(os.path.dirname(json_path) or ".", "best_cfg.txt"), "w") as fh:
            fh.write(env)
    info["fwdbwd"] = interleaved({"default": base, best: dataclasses.replace(base, **kw)}, frames, prefix,
                                 want_mem=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(info, fh, indent=1, default=str)
    print(f"\n## backward variants, prefix {prefix}, {info['device']}, torch {info['torch']}, {info['date']}")
    print("\n| variant | frames | backward ms | rel diff vs default | second-run diff |\n|---|---|---|---|---|")
    for r in info["bwd"]:
        print(f"| {r['variant']} | {r['frames']} | {r['bwd_ms']:.2f} | {r['rel_diff_vs_default']:.1e} | "
              f"{r['rerun_diff']:.1e} |")
    print("\n| frames | config | fwd ms | fwd+bwd ms | extra mem GiB |\n|---|---|---|---|---|")
    for r in info["fwdbwd"]:
        mem = "-" if r["extra_mem_gib"] is None else f"{r['extra_mem_gib']:.2f}"
        print(f"| {r['frames']} | {r['config']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {mem} |")
    return 0


def interleaved(cfgs: dict, frames, prefix: int = 64, reps: int = 2, want_mem: bool = False) -> list[dict]:
    """fwd and fwd+bwd of each configuration, interleaved (A, B, ..., A, B, ...) ``reps`` times at each size;
    peak memory in the first round when ``want_mem``."""
    rows = []
    for f in frames:
        layout, n = HierLayout.from_segments([[[prefix, ("video", f), 64]]], tokens_per_frame=M)
        for rep in range(reps):
            for name, cfg in cfgs.items():
                t = time_fn(ours(layout, cfg), n, want_mem=want_mem and rep == 0)
                rows.append({"frames": f, "prefix": prefix, "rep": rep, "config": name, **t})
                print(rows[-1], flush=True)
    return rows


def ab_configs(specs: list[str], frames=(128, 512), reps: int = 2) -> int:
    """fwd and fwd+bwd of configurations given as "name:field=value,..." strings (fields of HierAttnConfig over the
    default; "default" alone is the default), interleaved with the default."""
    base = base_config()
    cfgs = {}
    for spec in ["default"] + [x for x in specs if x != "default"]:
        name, _, fields = spec.partition(":")
        cfgs[name] = config_with(base, fields, source=f"--ab-cfg {name}")
    rows = interleaved(cfgs, frames, reps=reps)
    print(f"\n## {torch.cuda.get_device_name()}\n\n| frames | config | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['config']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("--dense-frames", type=int, nargs="*", default=[32, 128])
    p.add_argument("--flex-frames", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("--prefix-check", type=int, nargs="*", default=[0, 64, 100, 128], help="prefixes at 128 frames")
    p.add_argument("--ab-bwd", action="store_true",
                   help="A/B of backward variants (alone, then fwd+bwd of the default vs the best); only this")
    p.add_argument("--ab-prefix", type=int, default=64, help="text tokens before the video in --ab-bwd")
    p.add_argument("--ab-cfg", nargs="*", default=None,
                   help='configurations "name:field=value,..." timed against the default, interleaved; only this')
    p.add_argument("--config", default="",
                   help='"field=value,..." replacing fields of the default configuration in the main table')
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.ab_cfg is not None:
        return ab_configs(args.ab_cfg, tuple(args.frames))
    if args.ab_bwd:
        return ab_bwd(args.json, prefix=args.ab_prefix)

    cfg = config_with(base_config(), args.config, source="--config")
    dev = torch.cuda.get_device_name()
    info = {"device": dev, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    import triton

    info["triton"] = triton.__version__
    info.update(ceilings())
    print(info, flush=True)
    info["config"] = repr(cfg)
    rows_out = []
    for f in args.frames:
        rows = [[[64, ("video", f), 64]]]
        layout, n = HierLayout.from_segments(rows, tokens_per_frame=M)
        fl = 4 * D * layout.allowed_pairs() * HQ
        r = {"frames": f, "plain_tokens": 128 + M * f, "ext_tokens": n, "useful_tflop_fwd": fl / 1e12,
             "setup_ms": setup_ms(rows)}
        r["ours"] = time_fn(ours(layout, cfg), n)
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
        t = time_fn(ours(layout, cfg), n, want_mem=False)
        t["tflops_fwd"] = fl / t["fwd_ms"] / 1e9
        prefix_rows.append({"prefix": pre, "ext_tokens": n, **t})
        print("prefix", pre, t, flush=True)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
