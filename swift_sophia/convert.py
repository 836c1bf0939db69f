"""Start a Sophia checkpoint from a transformers-native InternVL one (e.g. OpenGVLab/InternVL3-8B-hf).

The vision tower, projector, decoder and LM head keep their weights (the module names are InternVL's); the
aggregation CNN starts as average pooling and the pruner's query MLP near identity; Sophia's special tokens are
added to the tokenizer and the embeddings resized. Stage 1 then trains the new modules.
"""
from __future__ import annotations

from .configuration_sophia import SophiaConfig
from .tokens import IMAGE_CONTEXT, SPECIAL_TOKENS, VIDEO_CONTEXT

_NOT_COPIED = {"model_type", "transformers_version", "architectures", "auto_map", "_name_or_path"}


def init_from_internvl(source: str, output_dir: str, **overrides) -> str:
    from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

    from .modeling_sophia import SophiaForConditionalGeneration

    base = AutoConfig.from_pretrained(source)
    if base.model_type != "internvl":
        raise ValueError(f"{source} is a {base.model_type!r} checkpoint; expected a transformers-native InternVL "
                         "checkpoint (model_type 'internvl', e.g. OpenGVLab/InternVL3-8B-hf)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    fields = {k: v for k, v in base.to_dict().items() if k not in _NOT_COPIED}
    fields.update(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
                  video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_CONTEXT), **overrides)
    config = SophiaConfig(**fields)
    # InternVL loads its own (older-layout) checkpoints; its module names are Sophia's, plus Sophia's new modules.
    internvl = InternVLForConditionalGeneration.from_pretrained(source, dtype="auto")
    model = SophiaForConditionalGeneration(config).to(internvl.dtype)
    missing, unexpected = model.load_state_dict(internvl.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith(("model.aggregator.", "model.pruner."))]
    if unexpected or new:
        raise ValueError(f"{source} does not match Sophia's layout: unexpected {unexpected[:5]}, missing {new[:5]}")
    del internvl
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


__all__ = ["init_from_internvl"]
