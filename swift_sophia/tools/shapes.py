"""Named real model shapes: random-weight Sophia checkpoints (and their dense InternVL twins) for benchmarks.

    from swift_sophia.tools.shapes import shape_config, internvl_config, build_random
    config = shape_config("internvl2.5-8b")          # a SophiaConfig, nothing written, no weights
    build_random("internvl2.5-8b", "/tmp/sophia-8b", device="cuda")   # `sophia build-random` does this

Shapes (vision tower + decoder; the vision tower is InternViT-300M-448px in every real shape: hidden 1024,
24 layers, 16 heads, MLP 4096, 448 px, patch 14, qkv bias, layer scale; pixel shuffle 0.5 -> 256 tokens a frame):

- ``internvl2.5-8b`` (alias ``sophia-8b``): InternLM2.5-7B-shaped decoder in the Llama layout (hidden 4096,
  32 layers, 32 query / 8 key-value heads, head dim 128, MLP 14336, vocabulary 92544, rope_theta 5e7, untied
  LM head). The shape of the design's measured anchors (../shared/design/targets.md).
- ``internvl3-8b``: Qwen2.5-7B-shaped decoder (hidden 3584, 28 layers, 28 / 4 heads, MLP 18944, vocabulary
  151674, rope_theta 1e6, qkv bias, untied).
- ``tiny-test``: the same structure at toy size (2-layer Llama decoder, 56 px frames of 4 tokens), for tests
  and ``--shape tiny`` CPU runs of the benchmarks.
- ``study-small``: the GPU miniature study's model, trained from random weights (examples/gpu_study.sh): a
  4-layer tower of width 256 at 112 px (16 tokens a frame), an 8-layer Llama decoder of width 512 (8 / 4 heads,
  MLP 1408, vocabulary 1024); about 30 M parameters.

Every shape has ``max_position_embeddings`` = 2^20 (room for 1M-token prompts) and uses the offline tokenizer of
:mod:`swift_sophia.tools.tiny` (its ids are far below the model's vocabulary; the special tokens' ids are the
config's ``image_token_id`` / ``video_token_id``). Weights are random (normal, std 0.02, as transformers
initialises them): for speed and memory measurements only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Dict, Optional, Sequence

import torch

from ..model.configuration_sophia import SophiaConfig
from ..model.tokens import IMAGE_CONTEXT, VIDEO_CONTEXT

MAX_POSITIONS = 1 << 20

INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
                      layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=False, hidden_act="gelu")

INTERNLM25_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=92544,
                     rope_theta=50_000_000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False)

QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=14, attention_bias=True, layer_scale_init_value=0.1, use_mean_pooling=False)
TINY_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, rope_theta=50_000_000.0,
                 tie_word_embeddings=False)

# the GPU miniature study's model (examples/gpu_study.sh): big enough to learn its task, small enough to train in
# minutes; 112 px frames of 16 tokens, a 4-layer tower of width 256, an 8-layer decoder of width 512 (about 30 M
# parameters in all)
STUDY_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=14, attention_bias=True, layer_scale_init_value=0.1,
                    use_mean_pooling=False)
STUDY_TEXT = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=1024, rope_theta=10_000.0,
                  tie_word_embeddings=False)

SHAPES: Dict[str, dict] = {
    "internvl2.5-8b": dict(vision=INTERNVIT_300M, text=INTERNLM25_7B,
                           note="InternViT-300M + InternLM2.5-7B-shaped Llama decoder"),
    "internvl3-8b": dict(vision=INTERNVIT_300M, text=QWEN25_7B, note="InternViT-300M + Qwen2.5-7B-shaped decoder"),
    "tiny-test": dict(vision=TINY_VISION, text=TINY_TEXT, note="toy size, same structure (tests, --shape tiny)"),
    "study-small": dict(vision=STUDY_VISION, text=STUDY_TEXT,
                        note="the GPU miniature study's model (112 px, 16 tokens a frame, 8-layer decoder of width "
                             "512), trained from these random weights"),
}
ALIASES = {"sophia-8b": "internvl2.5-8b", "8b": "internvl2.5-8b", "tiny": "tiny-test"}


def shape_names() -> list:
    return sorted(SHAPES) + sorted(ALIASES)


def resolve_shape(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(shape_names())}")
    return key


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        from .tiny import build_tokenizer

        tokenizer = build_tokenizer()
    ids = dict(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
               video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_CONTEXT),
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return ids, len(tokenizer)


def _sub_configs(name: str, tokenizer=None, attn_implementation: Optional[str] = "sdpa"):
    shape = SHAPES[resolve_shape(name)]
    ids, tokenizer_len = _token_ids(tokenizer)
    text = dict(shape["text"], max_position_embeddings=MAX_POSITIONS, bos_token_id=None,
                eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    if text["vocab_size"] < tokenizer_len:
        raise ValueError(f"shape {name!r}: vocabulary {text['vocab_size']} < tokenizer length {tokenizer_len}")
    vision = dict(shape["vision"])
    if attn_implementation:
        text["attn_implementation"] = attn_implementation
        vision["attn_implementation"] = attn_implementation
    top = dict(image_token_id=ids["image_token_id"], image_seq_length=None, downsample_ratio=0.5,
               projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
               tie_word_embeddings=False, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    top["image_seq_length"] = int(patches * top["downsample_ratio"] ** 2)
    return vision, text, top, ids


def shape_config(name: str, tokenizer=None, *, attn_implementation: Optional[str] = "sdpa",
                 num_frames: int = 32, **overrides) -> SophiaConfig:
    """The SophiaConfig of a named shape (nothing is built or written). ``overrides`` are SophiaConfig fields
    (prune_alpha, hier_neighbours, attention_backend, ...)."""
    vision, text, top, ids = _sub_configs(name, tokenizer, attn_implementation)
    config = SophiaConfig(vision_config=vision, text_config=text, video_token_id=ids["video_token_id"],
                          num_frames=num_frames, **top, **overrides)
    if attn_implementation:
        config._attn_implementation_internal = attn_implementation
    return config


def internvl_config(name: str, tokenizer=None, *, attn_implementation: Optional[str] = "sdpa"):
    """transformers' own InternVLConfig with the same vision tower, projector and decoder: the dense baseline."""
    from transformers import InternVLConfig

    vision, text, top, _ = _sub_configs(name, tokenizer, attn_implementation)
    config = InternVLConfig(vision_config=vision, text_config=text, **top)
    if attn_implementation:
        config._attn_implementation_internal = attn_implementation
    return config


def parameter_count(config, cls=None) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory, no init)."""
    if cls is None:
        from ..model.modeling_sophia import SophiaForConditionalGeneration as cls
    with torch.device("meta"):
        model = cls(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def build_model(config, *, device="cpu", dtype=torch.bfloat16, cls=None, seed: int = 0):
    """Random-weight model built directly on ``device`` in ``dtype`` (transformers' init: normal, std 0.02)."""
    if cls is None:
        from ..model.modeling_sophia import SophiaForConditionalGeneration as cls
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(copy.deepcopy(config), dtype=dtype)
    return model


def build_random(name: str, output_dir: str, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, num_frames: int = 32, verbose: bool = False, **overrides) -> str:
    """Write a random-weight Sophia checkpoint of a named shape (safetensors, config with ``torch_dtype``,
    generation config, offline tokenizer) that ``swift sft/infer --model DIR --model_type sophia`` load."""
    from transformers import GenerationConfig

    from .tiny import build_tokenizer

    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = MAX_POSITIONS
    config = shape_config(name, tokenizer, num_frames=num_frames, **overrides)
    model = build_model(config, device=device, dtype=dtype, seed=seed)
    if device != "cpu" and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(output_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    cfg_path = os.path.join(output_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")  # ms-swift reads this key
    cfg["dtype"] = cfg["torch_dtype"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        purpose = "" if resolve_shape(name) == "study-small" else ", for speed and memory measurements only"
        f.write(f"# sophia random {resolve_shape(name)}\n\nRandom weights (normal, std 0.02){purpose}. "
                f"{SHAPES[resolve_shape(name)]['note']}; {params:,} parameters, "
                f"{str(dtype).replace('torch.', '')}. Built by `sophia build-random --shape {name}`.\n")
    if verbose:
        print(f"built {params:,} parameters on {device} in {t1 - t0:.1f} s, saved in "
              f"{time.perf_counter() - t1:.1f} s")
    return output_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia build-random --shape NAME DIR`."""
    parser = argparse.ArgumentParser(
        prog="sophia build-random",
        description="Random weights of a real shape (swift_sophia/tools/shapes.py), for speed and memory "
                    "measurements: `swift sft/infer --model DIR --model_type sophia` load it.")
    parser.add_argument("output_dir")
    parser.add_argument("--shape", required=True, help="internvl2.5-8b (alias sophia-8b), internvl3-8b, tiny-test, "
                                                       "study-small")
    parser.add_argument("--device", default="cpu", help="where to build it: cuda is fast (seconds), cpu takes "
                                                        "minutes at 8B")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="weight dtype (default bfloat16)")
    parser.add_argument("--num-frames", type=int, default=32, help="frames sampled per video by default (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    try:
        resolve_shape(args.shape)
    except ValueError as exc:
        parser.error(str(exc))
    path = build_random(args.shape, args.output_dir, device=args.device, dtype=getattr(torch, args.dtype),
                        seed=args.seed, num_frames=args.num_frames, verbose=True)
    print(f"random {args.shape} checkpoint written to {path}")
    return 0


__all__ = ["SHAPES", "shape_names", "resolve_shape", "shape_config", "internvl_config", "parameter_count",
           "build_model", "build_random", "main"]
