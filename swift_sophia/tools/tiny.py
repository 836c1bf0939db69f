"""The embedded tiny default: a `sophia-tiny` checkpoint built locally, random weights, offline tokenizer.

It has the real architecture (InternViT-style tower, pixel-shuffle projector, Qwen2 decoder, aggregation CNN,
frame pruner), just small: a training step takes a fraction of a second on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import torch

from ..model.configuration_sophia import SophiaConfig
from ..model.tokens import SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_CORPUS = [
    "What color is the background of the first shot? What shape appears in the last shot?",
    "red green blue yellow purple orange white black cyan magenta circle square triangle",
    "How many shots does the video have? one two three four five six seven eight nine ten",
    "Describe the video. The video shows a shape on a plain background. Answer with one word.",
    "the a an of in on at to is are was were be this that what which who how when where why",
    "frame frames video shot shots scene first second third last middle start end color shape",
    "You are a helpful assistant. Please answer the question about the video.",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - yes no",
]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a small built-in corpus, with ChatML and Sophia's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None, additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def tiny_config(tokenizer, *, decoder: str = "qwen2", num_frames: int = 8, text_overrides: Optional[dict] = None,
                **overrides) -> SophiaConfig:
    """The tiny default's config; `text_overrides` replace decoder (text_config) fields, `overrides` SophiaConfig's."""
    text = dict(model_type=decoder, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                max_position_embeddings=32768, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text.update(text_overrides or {})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=56, patch_size=14)
    return SophiaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<VIDEO_CONTEXT>"),
        image_seq_length=4, num_frames=num_frames, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)


def build_tiny(output_dir: str, *, seed: int = 0, decoder: str = "qwen2", num_frames: int = 8,
               dtype: Optional[torch.dtype] = torch.float32, text_overrides: Optional[dict] = None, **overrides) -> str:
    """Write a randomly initialised sophia-tiny checkpoint (safetensors, config, tokenizer) to `output_dir`."""
    from transformers import GenerationConfig

    from ..model.modeling_sophia import SophiaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, decoder=decoder, num_frames=num_frames, text_overrides=text_overrides, **overrides)
    model = SophiaForConditionalGeneration(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("# sophia-tiny\n\nRandomly initialised Sophia model for tests and the quickstart. "
                f"Decoder: {decoder}; {sum(p.numel() for p in model.parameters()):,} parameters.\n")
    # ms-swift reads the dtype from config.json; keep it explicit for CPU runs.
    cfg_path = os.path.join(output_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return output_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia build-tiny DIR`."""
    parser = argparse.ArgumentParser(
        prog="sophia build-tiny",
        description="sophia-tiny: random float32 weights (a 2-layer decoder of width 64, a 1-layer vision tower at 56 "
                    "px, 4 tokens a frame) and a tokenizer built offline; what the quickstart and the tests train. "
                    "Runs on a CPU in seconds.")
    parser.add_argument("output_dir", help="folder to write (created)")
    parser.add_argument("--decoder", default="qwen2", choices=["qwen2", "llama"], help="decoder family (default qwen2)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames sampled per video unless VIDEO_SEGMENTS or "
                                                                    "FPS says otherwise (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    path = build_tiny(args.output_dir, seed=args.seed, decoder=args.decoder, num_frames=args.num_frames)
    print(f"sophia-tiny written to {path}")
    return 0


__all__ = ["build_tokenizer", "tiny_config", "build_tiny", "main"]
