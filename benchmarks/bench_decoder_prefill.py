"""Prefill of a 7B-shaped decoder over a video prompt: dense causal attention over the plain sequence against
Sophia's extended sequence with hierarchical attention, with and without frame pruning (GPU).

    python benchmarks/bench_decoder_prefill.py [--frames 32 128 256 512] [--keep 1.0 0.5] [--repeats 3]

The decoder is InternLM2.5-7B-shaped (Llama layout: hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP
14336, vocabulary 92544), random bf16 weights, fed `inputs_embeds` with logits for the last token only, as in the
whole-model anchor of the design's targets. Prompt: 64 text tokens, F frames of M = 256 tokens, 64 text tokens.
"dense" runs the model's SDPA (flash backend) over the plain sequence (64 + 256 F + 64 tokens). "sophia keep k"
runs the same decoder through Sophia's attention routing over the extended sequence of round(k F) kept frames
(levels L = 4, arity A = 2, neighbours E = 2: 1.875x the kept level-0 tokens); the aggregation CNN and the
pruner are not included (their cost is small next to the decoder's and is not measured here). Prints a table:
median prefill seconds over the repeats after one warm-up, and peak GPU memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

M, TEXT = 256, 64


def decoder(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=92544, max_position_embeddings=1 << 20,
                      rope_theta=50_000_000.0, attn_implementation=attn)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def time_prefill(model, n: int, repeats: int, **kwargs) -> tuple[float, float]:
    from swift_sophia.attention import hierarchical_step

    embeds = torch.randn(1, n, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    times = []
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if "hier_layout" in kwargs:
                with hierarchical_step():  # the mask is the kernel's rule: no N x N mask is built
                    out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1, **kwargs)
            else:
                out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128, 256, 512])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    from sophia_kernels import HierLayout
    from swift_sophia.attention import install

    model = decoder("sdpa")
    weights = torch.cuda.memory_allocated() / 2**30
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
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; weights {weights:.1f} GiB; "
          f"median of {args.repeats} after one warm-up\n")
    print("| frames | variant | frames kept | tokens | prefill s | peak GiB beyond weights |")
    print("|---|---|---|---|---|---|")
    for frames, name, kept, n, t, peak in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"| {frames} | {name} | {kept} | {n:,} | {t:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
