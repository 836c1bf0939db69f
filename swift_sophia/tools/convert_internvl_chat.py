"""OpenGVLab's original InternVL checkpoints (`model_type: internvl_chat`) in Sophia's module layout.

Every InternVL 1.5, 2 and 2.5 release and the original InternVL3 repositories are `internvl_chat` checkpoints,
written by custom code: an InternViT tower (`vision_model.*`, attention with one fused `qkv`), the projector
`mlp1.*` and a decoder under `language_model.*`. This module turns their config and weights into Sophia's, which
are transformers' InternVL names: InternLM2 decoders become Llama ones (the fused `wqkv` split by key-value group,
the other names mapped), Qwen2 and Llama decoders keep their names, InternViT's `qkv` is split into q, k and v.

The rules are those of the published modeling files (`modeling_internvl_chat.py`, `modeling_intern_vit.py`,
`modeling_internlm2.py` and their configuration files); defaults of missing config fields are theirs too.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

SUPPORTED_DECODERS = {
    # architecture in llm_config -> transformers model type of the converted decoder
    "InternLM2ForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}

# Defaults of the published configuration classes, for fields a config.json leaves out.
INTERN_VIT_DEFAULTS = dict(num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                           num_attention_heads=25, intermediate_size=12800, qk_normalization=True,
                           num_hidden_layers=48, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6,
                           dropout=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1)
INTERNLM2_DEFAULTS = dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                          max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, bias=True, rope_theta=10000, rope_scaling=None)
INTERNVL_CHAT_DEFAULTS = dict(select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                              ps_version="v1", use_backbone_lora=0, use_llm_lora=0)

# The system prompts of the conversation templates that InternVL checkpoints name in `template` (their
# `conversation.py`); a config's own `system_message` wins.
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"  # noqa: E501
TEMPLATE_SYSTEM_MESSAGES = {
    "internlm2-chat": _INTERNVL2_SYSTEM,
    "Hermes-2": _INTERNVL2_SYSTEM,
    "internvl2_5": "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",  # noqa: E501
}

# Fields of an llm_config that describe the saved object rather than the decoder.
_BOOKKEEPING = {"architectures", "auto_map", "_name_or_path", "transformers_version", "attn_implementation",
                "_attn_implementation_autoset", "use_bfloat16", "torch_dtype", "dtype", "model_type",
                "_commit_hash"}

# fmt: off
# Source name (a full match) -> Sophia name. The InternViT tower, InternVL's projector and each decoder family.
_VIT_LAYER, _TOWER_LAYER = r"vision_model\.encoder\.layers\.(\d+)\.", r"model.vision_tower.encoder.layer.\1."
VISION_KEY_MAPPING = {
    r"vision_model\.embeddings\.class_embedding":                r"model.vision_tower.embeddings.cls_token",
    r"vision_model\.embeddings\.position_embedding":             r"model.vision_tower.embeddings.position_embeddings",
    r"vision_model\.embeddings\.patch_embedding\.(weight|bias)": r"model.vision_tower.embeddings.patch_embeddings.projection.\1",  # noqa: E501
    _VIT_LAYER + r"attn\.qkv\.(weight|bias)":                    _TOWER_LAYER + r"attention.qkv.\2",  # split
    _VIT_LAYER + r"attn\.proj\.(weight|bias)":                   _TOWER_LAYER + r"attention.projection_layer.\2",
    _VIT_LAYER + r"attn\.(q_norm|k_norm)\.weight":               _TOWER_LAYER + r"attention.\2.weight",
    _VIT_LAYER + r"mlp\.(fc1|fc2)\.(weight|bias)":               _TOWER_LAYER + r"mlp.\2.\3",
    _VIT_LAYER + r"norm1\.(weight|bias)":                        _TOWER_LAYER + r"layernorm_before.\2",
    _VIT_LAYER + r"norm2\.(weight|bias)":                        _TOWER_LAYER + r"layernorm_after.\2",
    _VIT_LAYER + r"ls1":                                         _TOWER_LAYER + r"lambda_1",
    _VIT_LAYER + r"ls2":                                         _TOWER_LAYER + r"lambda_2",
    r"mlp1\.0\.(weight|bias)":                                   r"model.multi_modal_projector.layer_norm.\1",
    r"mlp1\.1\.(weight|bias)":                                   r"model.multi_modal_projector.linear_1.\1",
    r"mlp1\.3\.(weight|bias)":                                   r"model.multi_modal_projector.linear_2.\1",
}

_LM_LAYER, _DECODER_LAYER = r"language_model\.model\.layers\.(\d+)\.", r"model.language_model.layers.\1."
INTERNLM2_KEY_MAPPING = {
    r"language_model\.model\.tok_embeddings\.weight":            r"model.language_model.embed_tokens.weight",
    _LM_LAYER + r"attention\.wqkv\.(weight|bias)":               _DECODER_LAYER + r"self_attn.wqkv.\2",  # split
    _LM_LAYER + r"attention\.wo\.(weight|bias)":                 _DECODER_LAYER + r"self_attn.o_proj.\2",
    _LM_LAYER + r"feed_forward\.w1\.weight":                     _DECODER_LAYER + r"mlp.gate_proj.weight",
    _LM_LAYER + r"feed_forward\.w3\.weight":                     _DECODER_LAYER + r"mlp.up_proj.weight",
    _LM_LAYER + r"feed_forward\.w2\.weight":                     _DECODER_LAYER + r"mlp.down_proj.weight",
    _LM_LAYER + r"attention_norm\.weight":                       _DECODER_LAYER + r"input_layernorm.weight",
    _LM_LAYER + r"ffn_norm\.weight":                             _DECODER_LAYER + r"post_attention_layernorm.weight",
    r"language_model\.model\.norm\.weight":                      r"model.language_model.norm.weight",
    r"language_model\.output\.weight":                           r"lm_head.weight",
}

# Qwen2 and Llama decoders already have transformers' names below `language_model.`.
TRANSFORMERS_DECODER_KEY_MAPPING = {
    r"language_model\.model\.(.+)":                              r"model.language_model.\1",
    r"language_model\.lm_head\.weight":                          r"lm_head.weight",
}
# fmt: on

# Buffers some older checkpoints saved; the converted model recomputes them.
RECOMPUTED_BUFFERS = re.compile(r".*\.rotary_emb\.inv_freq")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names what was found and what was expected."""


# ---------------------------------------------------------------------------------------------------- config
def decoder_architecture(config: dict) -> str:
    llm = config.get("llm_config") or {}
    architecture = (llm.get("architectures") or [None])[0]
    if architecture not in SUPPORTED_DECODERS:
        raise ConversionError(
            f"The checkpoint's decoder is {architecture!r} (llm_config.architectures); Sophia converts "
            f"{', '.join(SUPPORTED_DECODERS)} decoders. InternVL2-4B's Phi-3 and other decoders are not supported.")
    return architecture


def check_supported(config: dict) -> None:
    """Refuse, in whole sentences, what the converted model could not reproduce."""
    top = {**INTERNVL_CHAT_DEFAULTS, **config}
    if top["ps_version"] != "v2":
        raise ConversionError(
            f"The checkpoint uses pixel shuffle version {top['ps_version']!r} (ps_version); Sophia's projector input "
            "is transformers' pixel shuffle, which is InternVL's 'v2' (the 'v1' layout is transposed).")
    if top["use_backbone_lora"] or top["use_llm_lora"]:
        raise ConversionError(
            f"The checkpoint holds unmerged LoRA weights (use_backbone_lora={top['use_backbone_lora']}, "
            f"use_llm_lora={top['use_llm_lora']}); merge them into the base weights first.")
    vision = {**INTERN_VIT_DEFAULTS, **(config.get("vision_config") or {})}
    if vision["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"The vision tower's norm_type is {vision['norm_type']!r}; InternViT has "
                              "'layer_norm' (InternViT-300M) or 'rms_norm' (InternViT-6B).")
    if vision["qk_normalization"] and vision["layer_norm_eps"] != 1e-6:
        raise ConversionError(
            f"The vision tower normalises queries and keys with epsilon {vision['layer_norm_eps']}; transformers' "
            "InternVL tower fixes that epsilon at 1e-6.")
    decoder_architecture(config)


def vision_config(config: dict) -> dict:
    """InternVisionConfig fields -> transformers' InternVLVisionConfig fields (InternViT-300M and -6B)."""
    vision = {**INTERN_VIT_DEFAULTS, **(config.get("vision_config") or {})}
    image_size = config.get("force_image_size") or vision["image_size"]
    return dict(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
        num_channels=vision["num_channels"], image_size=image_size, patch_size=vision["patch_size"],
        hidden_act=vision["hidden_act"], norm_type=vision["norm_type"], layer_norm_eps=vision["layer_norm_eps"],
        attention_bias=vision["qkv_bias"], use_qk_norm=vision["qk_normalization"],
        attention_dropout=vision["attention_dropout"], projection_dropout=vision["dropout"],
        initializer_range=vision["initializer_range"], layer_scale_init_value=vision["initializer_factor"],
        # InternViT adds position embeddings to every token and has no norm after its last layer.
        use_absolute_position_embeddings=True, use_mean_pooling=True)


def internlm2_text_config(llm: dict) -> dict:
    """InternLM2Config fields -> LlamaConfig fields (the same decoder with split projections)."""
    llm = {**INTERNLM2_DEFAULTS, **llm}
    heads = llm["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(llm["rope_theta"])}
    scaling = llm["rope_scaling"]
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("linear", "dynamic"):
            raise ConversionError(f"The decoder's rope_scaling is {scaling}; InternLM2 defines 'linear' and "
                                  "'dynamic' scaling only.")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return dict(
        model_type="llama", vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=llm["num_key_value_heads"] or heads,
        head_dim=llm["hidden_size"] // heads, hidden_act=llm["hidden_act"],
        max_position_embeddings=llm["max_position_embeddings"], initializer_range=llm["initializer_range"],
        rms_norm_eps=llm["rms_norm_eps"], attention_bias=llm["bias"], mlp_bias=False, rope_parameters=rope,
        bos_token_id=llm["bos_token_id"], eos_token_id=llm["eos_token_id"], pad_token_id=llm["pad_token_id"],
        tie_word_embeddings=False)


def text_config(config: dict) -> dict:
    architecture = decoder_architecture(config)
    llm = dict(config["llm_config"])
    if architecture == "InternLM2ForCausalLM":
        return internlm2_text_config(llm)
    fields = {k: v for k, v in llm.items() if k not in _BOOKKEEPING}
    # InternVLChatConfig unties the LM head of every decoder.
    return dict(fields, model_type=SUPPORTED_DECODERS[architecture], tie_word_embeddings=False)


def sophia_fields(config: dict) -> dict:
    """The SophiaConfig fields an internvl_chat config determines (the token ids come from the tokenizer)."""
    check_supported(config)
    top = {**INTERNVL_CHAT_DEFAULTS, **config}
    vision = vision_config(config)
    tokens_per_tile = (vision["image_size"] // vision["patch_size"]) ** 2 * top["downsample_ratio"] ** 2
    return dict(vision_config=vision, text_config=text_config(config), downsample_ratio=top["downsample_ratio"],
                vision_feature_layer=top["select_layer"], vision_feature_select_strategy="default",
                projector_hidden_act="gelu", image_seq_length=int(tokens_per_tile), tie_word_embeddings=False)


def system_message(config: dict) -> Optional[str]:
    """The system prompt the checkpoint's chat code uses: its own `system_message`, else its template's."""
    return config.get("system_message") or TEMPLATE_SYSTEM_MESSAGES.get(config.get("template"))


# ---------------------------------------------------------------------------------------------------- weights
def split_intern_vit_qkv(fused: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternViT's `qkv` rows are [q; k; v], each `hidden_size` rows (`reshape(B, N, 3, heads, head_dim)`)."""
    return tuple(t.clone() for t in fused.chunk(3, dim=0))


def split_internlm2_wqkv(fused: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """InternLM2's `wqkv` rows are grouped by key-value head: for each of the `kv_heads` groups, its
    `heads // kv_heads` query heads, then its key head, then its value head (`modeling_internlm2.py`:
    `rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups, d=head_dim)`). Query head h * groups + g is
    query g of group h, which is the order transformers' `repeat_kv` pairs with key-value head h."""
    groups = heads // kv_heads
    grouped = fused.reshape(kv_heads, groups + 2, head_dim, *fused.shape[1:])
    q = grouped[:, :groups].reshape(heads * head_dim, *fused.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *fused.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *fused.shape[1:])
    return q.clone(), k.clone(), v.clone()


def key_mapping(config: dict) -> Dict[str, str]:
    architecture = decoder_architecture(config)
    decoder = INTERNLM2_KEY_MAPPING if architecture == "InternLM2ForCausalLM" else TRANSFORMERS_DECODER_KEY_MAPPING
    return {**VISION_KEY_MAPPING, **decoder}


def rename(key: str, mapping: Dict[str, str]) -> Optional[str]:
    for pattern, replacement in mapping.items():
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
    return None


class WeightConverter:
    """Converts the source tensors one at a time and keeps count, so that every source tensor is used exactly
    once and anything unknown is named."""

    def __init__(self, config: dict):
        self.mapping = key_mapping(config)
        text = text_config(config)
        self.heads = text["num_attention_heads"]
        self.kv_heads = text.get("num_key_value_heads") or self.heads
        self.head_dim = text.get("head_dim") or text["hidden_size"] // self.heads
        self.used: List[str] = []
        self.unknown: List[str] = []

    def convert(self, key: str, tensor: torch.Tensor) -> Iterable[Tuple[str, torch.Tensor]]:
        if RECOMPUTED_BUFFERS.fullmatch(key):
            return []
        target = rename(key, self.mapping)
        if target is None:
            self.unknown.append(key)
            return []
        self.used.append(key)
        split = self._splitter(target)
        if split is None:
            return [(target, tensor)]
        fused_name, split_names = split
        pieces = (split_intern_vit_qkv(tensor) if fused_name == "attention.qkv."
                  else split_internlm2_wqkv(tensor, self.heads, self.kv_heads, self.head_dim))
        return [(target.replace(fused_name, name), piece) for name, piece in zip(split_names, pieces)]

    @staticmethod
    def _splitter(target: str) -> Optional[Tuple[str, Tuple[str, str, str]]]:
        for fused, names in (("attention.qkv.", ("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")),
                             ("self_attn.wqkv.", ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj."))):
            if fused in target:
                return fused, names
        return None

    def check_complete(self, source: str) -> None:
        if self.unknown:
            raise ConversionError(
                f"{source} has {len(self.unknown)} weight(s) that an internvl_chat checkpoint with this decoder does "
                f"not have, e.g. {self.unknown[:6]}; expected only vision_model.*, mlp1.* and language_model.* "
                "names of the published modeling files.")
        repeated = sorted({k for k in self.used if self.used.count(k) > 1})
        if repeated:
            raise ConversionError(f"{source} stores these weights more than once: {repeated[:6]}.")


def check_layout(written: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]], source: str) -> None:
    """The names and shapes to be written against Sophia's (from a model built on the meta device)."""
    missing = sorted(k for k in expected if k not in written)
    unexpected = sorted(k for k in written if k not in expected)
    wrong = sorted(f"{k}: {tuple(written[k])} instead of {tuple(expected[k])}" for k in written
                   if k in expected and tuple(written[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{source} does not convert to Sophia's layout: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shapes {wrong[:6]}. A checkpoint without some of these weights (e.g. an incomplete download) or with "
            "a config.json that does not describe its weights gives this.")


__all__ = ["ConversionError", "SUPPORTED_DECODERS", "TEMPLATE_SYSTEM_MESSAGES", "WeightConverter", "check_layout",
           "sophia_fields", "system_message", "split_intern_vit_qkv", "split_internlm2_wqkv"]
