"""Start a Sophia checkpoint from an InternVL one: `sophia init-from-internvl SRC DIR`.

Two formats are read, from a local folder or a Hugging Face Hub name:

* `internvl_chat`, OpenGVLab's original releases (InternVL 1.5, InternVL2, InternVL2.5, the original InternVL3
  repositories, e.g. OpenGVLab/InternVL2-8B): custom code, converted by :mod:`.convert_internvl_chat` (weights)
  and :mod:`.convert_tokenizer` (InternLM2's sentencepiece tokenizer as a fast one); the weights are read and
  written one safetensors file at a time, never the whole model at once;
* `internvl`, transformers' own InternVL (the `-hf` repositories, e.g. OpenGVLab/InternVL3-8B-hf), whose module
  names are Sophia's.

The vision tower, projector, decoder and LM head keep their weights; the aggregation CNN starts as average pooling
and the pruner's query MLP as the identity; Sophia's special tokens are added to the tokenizer (their embedding
rows start at the mean of the others). The generation config and, where the base has one, its system prompt are
carried over (the system prompt through `args.json`, which `swift infer`, `deploy`, `export` and `eval` read; the
checkpoint also remembers the plugin there). Stage 1 then trains the new modules.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from ..model.configuration_sophia import SophiaConfig
from ..model.tokens import IMAGE_CONTEXT, SPECIAL_TOKENS, VIDEO_CONTEXT
from .convert_internvl_chat import ConversionError, WeightConverter, check_layout, sophia_fields, system_message
from .convert_tokenizer import load_source_tokenizer

# What a checkpoint needs, when it is fetched from the hub (no custom code, no other weight formats).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja"]
ROW_PER_TOKEN = ("model.language_model.embed_tokens.weight", "lm_head.weight")
NEW_MODULES = ("model.aggregator.", "model.pruner.")
CHAT_STOP_TOKEN = "<|im_end|>"  # the end of a turn in every InternVL conversation template Sophia takes
_NOT_COPIED = {"model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"}


def init_from_internvl(source: str, output_dir: str, **overrides) -> str:
    """Write a Sophia checkpoint made from the InternVL checkpoint `source` (folder or hub name) to `output_dir`."""
    folder = resolve_checkpoint(source)
    config = read_json(os.path.join(folder, "config.json"), source)
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        return from_internvl_chat(folder, config, output_dir, source, **overrides)
    if model_type == "internvl":
        return from_transformers_internvl(folder, output_dir, source, **overrides)
    raise ConversionError(
        f"{source} is a {model_type!r} checkpoint (config.json); init-from-internvl takes InternVL checkpoints: "
        "'internvl_chat' (OpenGVLab's original releases, e.g. OpenGVLab/InternVL2-8B) or 'internvl' "
        "(transformers' layout, e.g. OpenGVLab/InternVL3-8B-hf).")


# ---------------------------------------------------------------------------------------------------- source
def resolve_checkpoint(source: str) -> str:
    """A local folder as it is; anything else as a Hugging Face Hub name, fetched (or found in the cache) the way
    transformers does."""
    if os.path.isdir(source):
        return source
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ConversionError(f"{source} is not a folder, and not a Hugging Face Hub name (owner/name) either.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=CHECKPOINT_FILES)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, gated or network: the message says which
        raise ConversionError(
            f"{source} is not a local folder, and fetching it from the Hugging Face Hub failed ({type(exc).__name__}: "
            f"{exc}). Give the folder of a downloaded copy (e.g. `huggingface-cli download {source} --local-dir "
            "DIR`), or check the name, the network and HF_HUB_OFFLINE.") from exc


def read_json(path: str, source: str) -> dict:
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        raise ConversionError(f"{source} has no {os.path.basename(path)}; found {sorted(os.listdir(folder))}.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class SafetensorsCheckpoint:
    """The weight files of a checkpoint folder, read one file at a time."""

    def __init__(self, folder: str, source: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index, source)["weight_map"]
            self.files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            self.files = ["model.safetensors"]
        else:
            raise ConversionError(f"{source} has no safetensors weights (model.safetensors or "
                                  f"model.safetensors.index.json); found {sorted(os.listdir(folder))}.")
        missing = [f for f in self.files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConversionError(f"{source} lacks weight files its index names: {missing}; found "
                                  f"{sorted(os.listdir(folder))} (an interrupted download?).")
        self.folder = folder

    def tensors(self, file: str, meta: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, tensor) of one file; `meta`: shapes and dtypes only, nothing read."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.folder, file), framework="pt") as f:
            for key in f.keys():
                if meta:
                    piece = f.get_slice(key)
                    yield key, torch.empty(piece.get_shape(), dtype=_DTYPES[piece.get_dtype()], device="meta")
                else:
                    yield key, f.get_tensor(key)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


# ---------------------------------------------------------------------------------------------------- internvl_chat
def from_internvl_chat(folder: str, raw_config: dict, output_dir: str, source: str, **overrides) -> str:
    fields = sophia_fields(raw_config)
    tokenizer = load_source_tokenizer(folder)
    if IMAGE_CONTEXT not in tokenizer.get_vocab():
        raise ConversionError(f"The tokenizer of {source} has no {IMAGE_CONTEXT} token; every InternVL chat "
                              "checkpoint's has (it marks the image tokens).")
    add_sophia_tokens(tokenizer)
    vocab_size = max(fields["text_config"]["vocab_size"], len(tokenizer))
    fields["text_config"]["vocab_size"] = vocab_size
    weights = SafetensorsCheckpoint(folder, source)
    dtype = weights_dtype(weights)
    config = SophiaConfig(**fields, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
                          video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_CONTEXT),
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    config.dtype = dtype
    new = new_module_tensors(config, dtype)

    # A dry run on meta tensors first, so that nothing is written for a checkpoint that does not convert.
    converter = WeightConverter(raw_config)
    shapes = {name: tuple(t.shape) for file in weights.files
              for name, t in converted(weights.tensors(file, meta=True), converter, vocab_size)}
    converter.check_complete(source)
    check_layout({**shapes, **{k: tuple(v.shape) for k, v in new.items()}}, sophia_layout(config), source)

    os.makedirs(output_dir, exist_ok=True)
    write_weights(weights, WeightConverter(raw_config), vocab_size, new, output_dir)
    save_config(config, output_dir)
    tokenizer.save_pretrained(output_dir)
    generation_config(folder, tokenizer).save_pretrained(output_dir)
    write_swift_args(output_dir, system_message(raw_config))
    return output_dir


def converted(tensors: Iterable[Tuple[str, torch.Tensor]], converter: WeightConverter,
              vocab_size: int) -> Iterator[Tuple[str, torch.Tensor]]:
    for key, tensor in tensors:
        for name, value in converter.convert(key, tensor):
            yield name, (with_rows(value, vocab_size) if name in ROW_PER_TOKEN else value)


def with_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A [vocab, hidden] table with rows for the added tokens: the mean row, as transformers' resizing starts them."""
    if table.shape[0] >= rows:
        return table
    if table.is_meta:
        return torch.empty((rows, *table.shape[1:]), dtype=table.dtype, device="meta")
    mean = table.float().mean(0, keepdim=True).to(table.dtype)
    return torch.cat([table, mean.expand(rows - table.shape[0], -1)])


def weights_dtype(weights: SafetensorsCheckpoint) -> torch.dtype:
    counts = Counter(t.dtype for file in weights.files for _, t in weights.tensors(file, meta=True)
                     if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def new_module_tensors(config: SophiaConfig, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Sophia's modules in their documented start: the aggregator averages the children, the pruner's query map is
    the identity and its temperature schedule is at step 0."""
    from ..model.modeling_sophia import SophiaAggregator
    from ..model.pruning import FramePruner

    hidden = config.text_config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same checkpoint converts to the same files
        modules = {"model.aggregator.": SophiaAggregator(hidden, config.hier_arity, config.hier_levels),
                   "model.pruner.": FramePruner(hidden)}
    return {prefix + name: (value.to(dtype) if value.is_floating_point() else value).contiguous()
            for prefix, module in modules.items() for name, value in module.state_dict().items()}


def sophia_layout(config: SophiaConfig) -> Dict[str, Tuple[int, ...]]:
    from ..model.modeling_sophia import SophiaForConditionalGeneration

    with torch.device("meta"):
        model = SophiaForConditionalGeneration(config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def write_weights(weights: SafetensorsCheckpoint, converter: WeightConverter, vocab_size: int,
                  new: Dict[str, torch.Tensor], output_dir: str) -> None:
    """One output file per source file, plus one for Sophia's new modules, with transformers' index."""
    from safetensors.torch import save_file

    total = len(weights.files) + 1
    weight_map, size = {}, 0
    for i, file in enumerate(weights.files + [None], start=1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = new if file is None else dict(converted(weights.tensors(file), converter, vocab_size))
        save_file(tensors, os.path.join(output_dir, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def save_config(config: SophiaConfig, output_dir: str) -> None:
    config.architectures = ["SophiaForConditionalGeneration"]
    config.save_pretrained(output_dir)
    # ms-swift reads the weights' dtype from config.json's `torch_dtype`.
    path = os.path.join(output_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["torch_dtype"] = str(config.dtype).replace("torch.", "")
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)


def generation_config(folder: str, tokenizer):
    """The base's generation config, stopping at the end of a chat turn as InternVL's chat code does."""
    from transformers import GenerationConfig

    path = os.path.join(folder, "generation_config.json")
    base = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            base = {k: v for k, v in json.load(f).items() if k not in ("_from_model_config", "transformers_version")}
    eos = base.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if CHAT_STOP_TOKEN in tokenizer.get_vocab():
        eos.insert(0, tokenizer.convert_tokens_to_ids(CHAT_STOP_TOKEN))
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    eos = list(dict.fromkeys(eos))
    base.update(eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tokenizer.pad_token_id)
    return GenerationConfig(**base)


# ---------------------------------------------------------------------------------------------------- shared
def add_sophia_tokens(tokenizer) -> None:
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def write_swift_args(output_dir: str, system: Optional[str]) -> None:
    """ms-swift's `args.json`: `swift infer / deploy / export / eval --model DIR` take the model type, template,
    plugin and system prompt from it (`swift sft` reads it with `--load_args true`)."""
    from importlib.metadata import version

    from ..ms_swift.plugin_path import plugin_path

    args = {"model_type": "sophia", "template": "sophia", "external_plugins": [plugin_path()],
            "swift_version": version("ms-swift")}
    if system:
        args["system"] = system
    with open(os.path.join(output_dir, "args.json"), "w", encoding="utf-8") as f:
        json.dump(args, f, ensure_ascii=False, indent=2)


# ---------------------------------------------------------------------------------------------------- internvl
def from_transformers_internvl(folder: str, output_dir: str, source: str, **overrides) -> str:
    from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

    from ..model.modeling_sophia import SophiaForConditionalGeneration

    base = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_sophia_tokens(tokenizer)
    fields = {k: v for k, v in base.to_dict().items() if k not in _NOT_COPIED}
    fields.update(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
                  video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_CONTEXT), **overrides)
    config = SophiaConfig(**fields)
    # InternVL loads its own (older-layout) checkpoints; its module names are Sophia's, plus Sophia's new modules.
    internvl = InternVLForConditionalGeneration.from_pretrained(folder, dtype="auto")
    model = SophiaForConditionalGeneration(config).to(internvl.dtype)
    missing, unexpected = model.load_state_dict(internvl.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith(NEW_MODULES)]
    if unexpected or new:
        raise ConversionError(f"{source} does not match Sophia's layout: unexpected {unexpected[:5]}, missing "
                              f"{new[:5]}.")
    del internvl
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    write_swift_args(output_dir, None)
    return output_dir


# ---------------------------------------------------------------------------------------------------- command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia init-from-internvl SRC DIR`."""
    parser = argparse.ArgumentParser(
        prog="sophia init-from-internvl",
        description="SRC: a local folder or a Hugging Face Hub name of an InternVL checkpoint, in OpenGVLab's original "
                    "layout (model_type internvl_chat: InternVL 1.5, InternVL2, InternVL2.5 and the original InternVL3 "
                    "repositories, with InternLM2, Qwen2 or Llama decoders, e.g. OpenGVLab/InternVL2-8B) or in "
                    "transformers' (model_type internvl: the -hf repositories, e.g. OpenGVLab/InternVL3-8B-hf). "
                    "Nothing of the checkpoint's custom code runs. docs/checkpoints.md has the details.")
    parser.add_argument("source", metavar="SRC", help="folder or hub name of the InternVL checkpoint")
    parser.add_argument("output_dir", metavar="DIR", help="folder to write the Sophia checkpoint to")
    parser.add_argument("--num-frames", type=int, default=32, help="frames sampled per video by default (default 32)")
    args = parser.parse_args(argv)
    try:
        path = init_from_internvl(args.source, args.output_dir, num_frames=args.num_frames)
    except ConversionError as exc:
        parser.exit(1, f"sophia init-from-internvl: {exc}\n")
    print(f"Sophia checkpoint written to {path}")
    return 0


__all__ = ["ConversionError", "init_from_internvl", "resolve_checkpoint", "main"]
