"""Prefill tokens and time of the tiny default, with and without frame pruning.

    python benchmarks/bench_prefill.py [--frames 32 64 128] [--repeats 5] [--device cpu]

Prints a markdown table: frames, pruning (alpha/beta), frames kept, plain tokens, extended tokens (what the
decoder runs on), median prefill time over the repeats. Shots are uniform segments of 8 frames (the pruner's
input), the query is a fixed question.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sophia_kernels import level_counts
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
    from swift_sophia.tools.tiny import build_tiny

    path = build_tiny(tempfile.mkdtemp(prefix="sophia-tiny-"))
    model = SophiaForConditionalGeneration.from_pretrained(path).eval().to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    m = cfg.tokens_per_frame
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"device: {device_name}; torch {torch.__version__}; tiny default (M={m}, A={cfg.hier_arity}, "
          f"L={cfg.hier_levels}, E={cfg.hier_neighbours}); median of {args.repeats}\n")
    print("| frames | alpha/beta | frames kept | plain tokens | extended tokens | prefill (ms) |")
    print("|---|---|---|---|---|---|")
    ids = tokenizer.convert_tokens_to_ids(["<vid>", "<VIDEO_CONTEXT>", "</vid>"])
    question = tokenizer.encode("What color is the background of the first shot?")
    for frames in args.frames:
        prompt = (tokenizer.encode("<|im_start|>user\n") + [ids[0]] + [ids[1]] * (frames * m) + [ids[2]]
                  + question + tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n"))
        inputs = dict(input_ids=torch.tensor([prompt], device=args.device),
                      pixel_values_videos=torch.randn(frames, 3, 56, 56, device=args.device),
                      video_frame_counts=torch.tensor([frames], device=args.device),
                      video_frame_shots=(torch.arange(frames) // 8).to(args.device),
                      video_query_ids=torch.tensor([question], device=args.device),
                      video_query_mask=torch.ones(1, len(question), dtype=torch.long, device=args.device))
        for alpha, beta in ((0, 0), (30, 30)):
            os.environ["PRUNE_ALPHA"], os.environ["PRUNE_BETA"] = str(alpha), str(beta)
            times = []
            with torch.no_grad():
                for i in range(args.repeats + 1):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model(**inputs, use_cache=True, logits_to_keep=1)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    if i:  # the first run warms up
                        times.append(time.perf_counter() - t0)
            kept = len(out.kept_frames[0])
            extended = len(prompt) - frames * m + m * sum(level_counts(kept, cfg.hier_arity, cfg.hier_levels))
            print(f"| {frames} | {alpha}/{beta} | {kept} | {len(prompt)} | {extended} | "
                  f"{statistics.median(times) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
