"""InternLM2's sentencepiece tokenizer (custom code, `tokenization_internlm2.py`) as a fast tokenizer.

InternLM2's tokenizer encodes each stretch of text between added tokens with its sentencepiece BPE model
(`tokenizer.model`, byte fallback) and puts `<s>` in front. The fast tokenizer built here does the same without
custom code: the sentencepiece vocabulary, where the ids of added tokens carry the added tokens' text (InternLM2
keeps `<|im_start|>` and friends at ids whose pieces read `[UNUSED_TOKEN_...]`), BPE merges ranked by the pieces'
scores, byte fallback, and the model's own normalizer settings (dummy prefix, extra whitespace, character map).
InternLM's own fast tokenizer (`tokenization_internlm2_fast.py`) is built the same way.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from .convert_internvl_chat import ConversionError

SPIECE_UNDERLINE = "▁"
# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BPE = 2
INTERNLM2_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def is_internlm2_tokenizer(tokenizer_config: dict) -> bool:
    auto = (tokenizer_config.get("auto_map") or {}).get("AutoTokenizer") or []
    classes = [tokenizer_config.get("tokenizer_class")] + [c.rsplit(".", 1)[-1] for c in auto if c]
    return any(c in INTERNLM2_TOKENIZER_CLASSES for c in classes)


def load_sentencepiece_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def added_tokens(folder: str, tokenizer_config: dict) -> Dict[int, dict]:
    """id -> added-token fields, from `added_tokens_decoder` (tokenizer_config.json) and `added_tokens.json`."""
    tokens = {int(i): dict(t) for i, t in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for content, index in json.load(f).items():
                tokens.setdefault(int(index), {"content": content, "special": True})
    return tokens


def bpe_merges(vocab: Dict[str, int], scores: Dict[str, float]) -> List[Tuple[str, str]]:
    """sentencepiece BPE merges the adjacent pair whose merged piece scores highest; as ranked merges: every way
    to split a piece into two pieces of the vocabulary, ranked by the merged piece's score."""
    merges = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                merges.append((-score, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def normalizer(spec):
    """sentencepiece's normalization, in its order: character map, whitespace clean-up, dummy prefix, spaces -> ▁."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(r" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    return normalizers.Sequence(steps)


def internlm2_fast_tokenizer(folder: str, tokenizer_config: dict):
    """A `PreTrainedTokenizerFast` that encodes as InternLM2's tokenizer does, ids included."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    model_file = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise ConversionError(f"{folder} has an InternLM2 tokenizer (tokenizer_config.json) but no tokenizer.model, "
                              f"the sentencepiece model it reads; found {sorted(os.listdir(folder))}.")
    proto = load_sentencepiece_proto(model_file)
    if proto.trainer_spec.model_type != _BPE:
        raise ConversionError(f"{model_file} is a sentencepiece model of type {proto.trainer_spec.model_type}; "
                              f"InternLM2's is BPE (type {_BPE}).")
    extra = added_tokens(folder, tokenizer_config)
    matched_first = matched_before_bpe(proto, extra, model_file)
    pieces = [p.piece for p in proto.pieces]
    for index, token in matched_first.items():
        if index < len(pieces):
            pieces[index] = token["content"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConversionError(f"{model_file} with the added tokens of tokenizer_config.json repeats a piece; "
                              "ids would not be kept.")
    mergeable = {pieces[i]: p.score for i, p in enumerate(proto.pieces) if p.type == _NORMAL and i not in extra}
    has_bytes = any(p.type == _BYTE for p in proto.pieces)
    tokenizer = Tokenizer(BPE(vocab, bpe_merges(vocab, mergeable), unk_token=proto.trainer_spec.unk_piece,
                              fuse_unk=True, byte_fallback=has_bytes))
    tokenizer.normalizer = normalizer(proto.normalizer_spec)
    tokenizer.decoder = decoder(proto.normalizer_spec, has_bytes)
    add_matched_first(tokenizer, matched_first, folder, len(pieces))

    bos, eos = _content(tokenizer_config.get("bos_token", "<s>")), _content(tokenizer_config.get("eos_token", "</s>"))
    add_bos, add_eos = tokenizer_config.get("add_bos_token", True), tokenizer_config.get("add_eos_token", False)
    tokenizer.post_processor = post_processor(vocab, bos if add_bos else None, eos if add_eos else None)

    named = {name: _content(tokenizer_config[name]) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
             if tokenizer_config.get(name)}
    named.setdefault("pad_token", eos)  # InternLM2Tokenizer's default
    extra_specials = [t["content"] for _, t in sorted(extra.items())
                      if t.get("special", True) and t["content"] not in named.values()]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **named, additional_special_tokens=extra_specials,
        clean_up_tokenization_spaces=tokenizer_config.get("clean_up_tokenization_spaces", False),
        model_max_length=tokenizer_config.get("model_max_length", int(1e30)),
        padding_side=tokenizer_config.get("padding_side", "right"))
    if tokenizer_config.get("chat_template"):
        fast.chat_template = tokenizer_config["chat_template"]
    return fast


def matched_before_bpe(proto, extra: Dict[int, dict], model_file: str) -> Dict[int, dict]:
    """id -> token of everything matched in the text before BPE runs: sentencepiece's control symbols (<s>, </s>),
    its user-defined pieces, and the checkpoint's added tokens, whose text takes its id over the piece's (InternLM2's
    `[UNUSED_TOKEN_146]` is `<|im_start|>`)."""
    matched = {i: {"content": p.piece, "special": True} for i, p in enumerate(proto.pieces)
               if p.type in (_CONTROL, _UNKNOWN)}
    user_defined = {i: {"content": p.piece.replace(SPIECE_UNDERLINE, " "), "special": False}
                    for i, p in enumerate(proto.pieces) if p.type == _USER_DEFINED and i not in extra}
    spec = proto.normalizer_spec
    if user_defined and (spec.precompiled_charsmap or spec.add_dummy_prefix or spec.remove_extra_whitespaces):
        raise ConversionError(
            f"{model_file} has user-defined pieces ({sorted(t['content'] for t in user_defined.values())[:6]}) and "
            f"normalizes text (rule {spec.name!r}, dummy prefix {spec.add_dummy_prefix}, extra whitespace removal "
            f"{spec.remove_extra_whitespaces}); sentencepiece matches those pieces in the normalized text, which a "
            "fast tokenizer reproduces only when the text is not normalized.")
    matched.update(user_defined)
    matched.update(extra)
    return matched


def add_matched_first(tokenizer, tokens: Dict[int, dict], folder: str, pieces: int) -> None:
    from tokenizers import AddedToken

    for index in sorted(tokens):
        token = tokens[index]
        tokenizer.add_tokens([AddedToken(token["content"], special=token.get("special", True), normalized=False,
                                         lstrip=token.get("lstrip", False), rstrip=token.get("rstrip", False),
                                         single_word=token.get("single_word", False))])
    moved = {t["content"]: (i, tokenizer.token_to_id(t["content"])) for i, t in tokens.items()
             if tokenizer.token_to_id(t["content"]) != i}
    if moved:
        raise ConversionError(f"The added tokens of {folder} do not follow the sentencepiece vocabulary of {pieces} "
                              f"pieces without gaps, so their ids would change: {moved} (token: (id in the "
                              "checkpoint, id it would get)).")


def decoder(spec, has_bytes: bool):
    from tokenizers import decoders

    steps = [decoders.Replace(SPIECE_UNDERLINE, " ")] + ([decoders.ByteFallback()] if has_bytes else [])
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    return decoders.Sequence(steps)


def post_processor(vocab: Dict[str, int], bos: Optional[str], eos: Optional[str]):
    from tokenizers import processors

    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else token


def load_source_tokenizer(folder: str):
    """The checkpoint's tokenizer as a fast tokenizer that loads without custom code."""
    from transformers import AutoTokenizer

    config_path = os.path.join(folder, "tokenizer_config.json")
    tokenizer_config = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            tokenizer_config = json.load(f)
    if is_internlm2_tokenizer(tokenizer_config):
        return internlm2_fast_tokenizer(folder, tokenizer_config)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the message names the cause
        raise ConversionError(
            f"The tokenizer in {folder} (tokenizer_class {tokenizer_config.get('tokenizer_class')!r}) does not load "
            f"without custom code: {type(exc).__name__}: {exc}. Sophia converts InternLM2 sentencepiece tokenizers "
            "and tokenizers transformers loads itself (Qwen2, Llama).") from exc


__all__ = ["internlm2_fast_tokenizer", "is_internlm2_tokenizer", "load_source_tokenizer"]
