"""Prefill of a 7B-shaped decoder over a video prompt: dense causal attention over the plain sequence against
Sophia's extended sequence with hierarchical attention, with and without frame pruning (GPU).

    python benchmarks/bench_decoder_prefill.py [--frames 32 128 256 512] [--keep 1.0 0.5] [--repeats 3]
    python benchmarks/bench_decoder_prefill.py --shape tiny      (CPU check: toy decoder, frames 8 32)

The decoder is InternLM2.5-7B-shaped (Llama layout: hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP
14336, vocabulary 92544), random bf16 weights, fed `inputs_embeds` with logits for the last token only, as in the
whole-model anchor of the design's targets. Prompt: 64 text tokens, F frames of M = 256 tokens, 64 text tokens.
"dense" runs the model's SDPA (flash backend) over the plain sequence (64 + 256 F + 64 tokens). "sophia keep k"
runs the same decoder through Sophia's attention routing over the extended sequence of round(k F) kept frames
(levels L = 4, arity A = 2, neighbours E = 2: 1.875x the kept level-0 tokens); the aggregation CNN and the
pruner are not included (their cost is small next to the decoder's and is not measured here). Prints a table:
median prefill seconds over the repeats after one warm-up, and peak GPU memory. `--shape` takes any decoder of
swift_sophia/tools/shapes.py (default internvl2.5-8b, the decoder above; internvl3-8b is Qwen2.5-7B-shaped).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

TEXT = 64


def decoder(attn: str, shape: str = "internvl2.5-8b", device: str = "cuda"):
    """The decoder of a named shape (swift_sophia/tools/shapes.py), random bf16 weights built on `device`."""
    from transformers import AutoModelForCausalLM

    from swift_sophia.tools.shapes import shape_config

    config = shape_config(shape, attn_implementation=None)
    cfg = config.text_config
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    return model.eval(), config.tokens_per_frame


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, n: int, repeats: int, **kwargs) -> tuple[float, float]:
    from swift_sophia.model.attention import hierarchical_step

    device = model.device
    cuda = device.type == "cuda"
    embeds = torch.randn(1, n, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            if "hier_layout" in kwargs:
                with hierarchical_step():  # the mask is the kernel's rule: no N x N mask is built
                    out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1, **kwargs)
            else:
                out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
            del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="internvl2.5-8b",
                        help="a shape of swift_sophia/tools/shapes.py; tiny = CPU check")
    parser.add_argument("--device", default=None, help="default: cuda, cpu for --shape tiny")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="default 32 128 256 512 (tiny: 8 32)")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from sophia_kernels import HierLayout
    from swift_sophia.model.attention import install
    from swift_sophia.tools.shapes import resolve_shape

    tiny = resolve_shape(args.shape) == "tiny-test"
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.frames = args.frames or ([8, 32] if tiny else [32, 128, 256, 512])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --shape tiny for a CPU check)")
    model, M = decoder("sdpa", args.shape, args.device)
    weights = (torch.cuda.memory_allocated() if args.device.startswith("cuda") else
               sum(p.numel() * p.element_size() for p in model.parameters())) / 2**30
    rows = []
    for frames in args.frames:
        n = 2 * TEXT + M * frames
        t, peak = time_prefill(model, n, args.repeats)
        rows.append((frames, "dense (SDPA flash)", frames, n, t, peak))
        print(rows[-1], flush=True)
    install(model.config)  # "sophia_sdpa": hierarchical kernel when a layout is passed, SDPA otherwise
    for frames in args.frames:
        for keep in args.keep:
            kept = max(1, round(frames * keep))
            layout, n = HierLayout.from_segments([[[TEXT, ("video", kept), TEXT]]], tokens_per_frame=M)
            t, peak = time_prefill(model, n, args.repeats, hier_layout=layout)
            rows.append((frames, f"sophia keep {keep:g}", kept, n, t, peak))
            print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{name}, torch {torch.__version__}, shape {args.shape}; weights {weights:.1f} GiB; "
          f"median of {args.repeats} after one warm-up\n")
    print("| frames | variant | frames kept | tokens | prefill s | peak GiB beyond weights |")
    print("|---|---|---|---|---|---|")
    for frames, name, kept, n, t, peak in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"| {frames} | {name} | {kept} | {n:,} | {t:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
