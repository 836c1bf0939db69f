"""`sophia`: small commands around ms-swift's own CLIs.

    sophia plugin-path                 the file to give `swift ... --external_plugins`
    sophia build-tiny DIR              write the sophia-tiny checkpoint (random weights, offline tokenizer)
    sophia build-random --shape NAME DIR   a random-weight checkpoint of a real shape (internvl2.5-8b, ...)
    sophia make-data DIR               write the synthetic video QA dataset (mp4 clips + train/val jsonl)
    sophia init-from-internvl SRC DIR  start a Sophia checkpoint from an InternVL one (folder or hub name)
    sophia convert-benchmark NAME ROOT OUT   a benchmark's published files -> a local set for `swift eval`
    sophia eval-breakdown SET EVAL_OUT  accuracy of a `swift eval` run by the set's categories (overlapping too)
    sophia niah --model CKPT --output-dir DIR   video needle-in-a-haystack: set, evaluation, heatmap
"""
from __future__ import annotations

import argparse
import sys

from swift_sophia.ms_swift.plugin_path import plugin_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sophia", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugin-path", help="print the path of the ms-swift plugin file")
    tiny = sub.add_parser("build-tiny", help="build the sophia-tiny checkpoint",
                          description="sophia-tiny: random float32 weights (a 2-layer decoder of width 64, a 1-layer "
                                      "vision tower at 56 px, 4 tokens a frame) and a tokenizer built offline; what "
                                      "the quickstart and the tests train. Runs on a CPU in seconds.")
    tiny.add_argument("output_dir", help="folder to write (created)")
    tiny.add_argument("--decoder", default="qwen2", choices=["qwen2", "llama"], help="decoder family (default qwen2)")
    tiny.add_argument("--num-frames", type=int, default=8, help="frames sampled per video unless VIDEO_SEGMENTS or "
                                                                  "FPS says otherwise (default 8)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    rand = sub.add_parser("build-random", help="build a random-weight checkpoint of a named real shape",
                          description="Random weights of a real shape (swift_sophia/tools/shapes.py), for speed and "
                                      "memory measurements: `swift sft/infer --model DIR --model_type sophia` load it.")
    rand.add_argument("output_dir")
    rand.add_argument("--shape", required=True, help="internvl2.5-8b (alias sophia-8b), internvl3-8b, tiny-test")
    rand.add_argument("--device", default="cpu", help="where to build it: cuda is fast (seconds), cpu takes minutes "
                                                      "at 8B")
    rand.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                      help="weight dtype (default bfloat16)")
    rand.add_argument("--num-frames", type=int, default=32, help="frames sampled per video by default (default 32)")
    rand.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    data = sub.add_parser("make-data", help="write the synthetic video QA dataset",
                          description="Synthetic video QA: short mp4 clips of coloured shots with moving shapes and "
                                      "questions about them (the background colour of the first or the last shot, "
                                      "the shape in the first shot), as ms-swift jsonl rows (messages + videos), "
                                      "written "
                                      "with PyAV. Nothing is downloaded.")
    data.add_argument("output_dir", help="folder to write: train.jsonl, val.jsonl and the clips (created)")
    data.add_argument("--num-train", type=int, default=64, help="training rows (default 64)")
    data.add_argument("--num-val", type=int, default=8, help="held-out rows (default 8)")
    data.add_argument("--seed", type=int, default=0, help="seed of the clips and questions (default 0)")
    conv = sub.add_parser(
        "init-from-internvl", help="start a Sophia checkpoint from an InternVL one (original or -hf layout)",
        description="SRC: a local folder or a Hugging Face Hub name of an InternVL checkpoint, in OpenGVLab's original "
                    "layout (model_type internvl_chat: InternVL 1.5, InternVL2, InternVL2.5 and the original InternVL3 "
                    "repositories, with InternLM2, Qwen2 or Llama decoders, e.g. OpenGVLab/InternVL2-8B) or in "
                    "transformers' (model_type internvl: the -hf repositories, e.g. OpenGVLab/InternVL3-8B-hf). "
                    "Nothing of the checkpoint's custom code runs. docs/checkpoints.md has the details.")
    conv.add_argument("source", metavar="SRC", help="folder or hub name of the InternVL checkpoint")
    conv.add_argument("output_dir", metavar="DIR", help="folder to write the Sophia checkpoint to")
    conv.add_argument("--num-frames", type=int, default=32, help="frames sampled per video by default (default 32)")
    from swift_sophia.evaluation import breakdown, convert_cli, niah

    convert_cli.add_arguments(sub.add_parser(
        "convert-benchmark", help="turn a benchmark's published files into a local video MCQ set for swift eval"))
    breakdown.add_arguments(sub.add_parser(
        "eval-breakdown", help="accuracy of a swift eval run by any field of the set's questions",
        description=breakdown.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    niah.add_arguments(sub.add_parser(
        "niah", help="video needle-in-a-haystack: build the set, evaluate a checkpoint, draw the heatmap",
        description=niah.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)

    if args.command == "plugin-path":
        print(plugin_path())
    elif args.command == "build-tiny":
        from swift_sophia.tools.tiny import build_tiny

        path = build_tiny(args.output_dir, seed=args.seed, decoder=args.decoder, num_frames=args.num_frames)
        print(f"sophia-tiny written to {path}")
    elif args.command == "build-random":
        import torch

        from swift_sophia.tools.shapes import build_random, resolve_shape

        try:
            resolve_shape(args.shape)
        except ValueError as exc:
            parser.error(str(exc))
        path = build_random(args.shape, args.output_dir, device=args.device, dtype=getattr(torch, args.dtype),
                            seed=args.seed, num_frames=args.num_frames, verbose=True)
        print(f"random {args.shape} checkpoint written to {path}")
    elif args.command == "make-data":
        from swift_sophia.tools.synthetic import make_dataset

        paths = make_dataset(args.output_dir, args.num_train, args.num_val, seed=args.seed)
        print(f"train: {paths['train']}\nval: {paths['val']}")
    elif args.command == "init-from-internvl":
        from swift_sophia.tools.convert import ConversionError, init_from_internvl

        try:
            path = init_from_internvl(args.source, args.output_dir, num_frames=args.num_frames)
        except ConversionError as exc:
            parser.exit(1, f"sophia init-from-internvl: {exc}\n")
        print(f"Sophia checkpoint written to {path}")
    elif args.command == "convert-benchmark":
        return convert_cli.run(args)
    elif args.command == "eval-breakdown":
        return breakdown.run(args)
    elif args.command == "niah":
        return niah.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
