"""`sophia init-from-internvl` on OpenGVLab's original `internvl_chat` layout, built offline at toy size.

The checkpoints here have every key name and shape of the published modeling files (modeling_internvl_chat.py,
modeling_intern_vit.py, modeling_internlm2.py; Qwen2 decoders in transformers' names), random weights and an
InternLM2-style sentencepiece tokenizer trained on the spot. The reference forward below implements the published
formulas directly in torch (fused InternViT `qkv`, fused InternLM2 `wqkv` grouped by key-value head, InternLM2's
rotary scaling), independently of the converter; the converted Sophia model must give its logits.
"""
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
from swift_sophia.model.tokens import SPECIAL_TOKENS
from swift_sophia.tools.convert import ConversionError, init_from_internvl
from swift_sophia.tools.convert_internvl_chat import TEMPLATE_SYSTEM_MESSAGES

INTERNLM2_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                      "<|im_start|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "What color is the background of the first shot? What shape appears in the last shot?",
    "red green blue yellow purple orange white black cyan magenta circle square triangle",
    "How many shots does the video have?  one two three four five   six seven eight nine ten",
    "def f(x):\n    return x + 1  # code keeps its spaces\n\tand tabs",
    "你好，世界。这是一个视频。 数字 12345 ！ ＡＢＣ ｆｕｌｌ",
    "You are a helpful assistant. Please answer the question about the video. The video shows a shape.",
]
CHAT_TURN = ("<|im_start|>system\n你是一个助手。<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
             "What color is   the first shot?  <|im_end|>\n<|im_start|>assistant\n red<|im_end|>\n")
IMAGE = 56  # px: 16 patches of 14, 4 tokens a tile after pixel shuffle


# ------------------------------------------------------------------------------------------------ tokenizers
def train_sentencepiece(add_dummy_prefix=False, remove_extra_whitespaces=False, rule="identity",
                        user_defined=()):
    """A BPE model laid out like InternLM2's: <unk> <s> </s>, 256 byte pieces, merges, and `[UNUSED_TOKEN_n]`
    pieces at the end where InternLM2 keeps the ids of its chat tokens."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buffer, model_type="bpe", vocab_size=430,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
        normalization_rule_name=rule, user_defined_symbols=list(user_defined), unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    for i in range(len(INTERNLM2_SPECIALS)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"[UNUSED_TOKEN_{141 + i}]", 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto


def write_internlm2_tokenizer(folder, proto):
    """tokenizer.model + the tokenizer_config.json of an InternVL2 InternLM2 checkpoint; returns token -> id."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    pieces = len(proto.pieces)
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids.update({t: pieces - len(INTERNLM2_SPECIALS) + i for i, t in enumerate(INTERNLM2_SPECIALS)})
    ids.update({t: pieces + i for i, t in enumerate(INTERNVL_TOKENS)})
    token = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config = {
        "added_tokens_decoder": {str(i): dict(token, content=t) for t, i in ids.items()},
        "additional_special_tokens": INTERNLM2_SPECIALS + INTERNVL_TOKENS,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "model_max_length": 8192, "tokenizer_class": "InternLM2Tokenizer",
        "chat_template": INTERNLM2_CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return ids


def internlm2_reference_ids(folder, ids, text):
    """InternLM2Tokenizer's encoding (tokenization_internlm2.py): added tokens split out first, each stretch between
    them encoded by the sentencepiece model, <s> in front."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    pattern = "(" + "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)) + ")"
    out = [ids["<s>"]]
    for part in re.split(pattern, text):
        if part:
            out += [ids[part]] if part in ids else sp.encode(part)
    return out


def write_qwen2_tokenizer(folder):
    """A byte-level BPE tokenizer with Qwen2's chat tokens and InternVL's, saved as a Qwen2Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + INTERNVL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(path))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    json.dump(config, open(path, "w"), indent=2)
    return tokenizer


# ------------------------------------------------------------------------------------------------ checkpoints
def vision_config(kind):
    common = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", num_channels=3, patch_size=14,
                  image_size=IMAGE, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                  hidden_act="gelu", layer_norm_eps=1e-6, dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
                  initializer_range=0.02, initializer_factor=0.1, use_flash_attn=True)
    if kind == "300m":  # InternViT-300M: LayerNorm, qkv bias, no q/k norm
        return dict(common, norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
    return dict(common, norm_type="rms_norm", qkv_bias=False, qk_normalization=True)  # InternViT-6B


def internlm2_config(vocab_size, **extra):
    return dict(dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=vocab_size,
                     hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5,
                     bias=False, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
                     bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="eager",
                     auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"}), **extra)


def qwen2_config(vocab_size, **extra):
    return dict(dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab_size,
                     hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False, sliding_window=32768,
                     max_window_layers=2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2,
                     torch_dtype="bfloat16"), **extra)


def chat_config(llm, vision="300m", **extra):
    return dict(dict(architectures=["InternVLChatModel"], model_type="internvl_chat",
                     auto_map={"AutoModel": "modeling_internvl_chat.InternVLChatModel"}, downsample_ratio=0.5,
                     force_image_size=IMAGE, select_layer=-1, ps_version="v2", template="internlm2-chat",
                     dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=12, min_dynamic_patch=1,
                     use_backbone_lora=0, use_llm_lora=0, pad2square=False, torch_dtype="float32",
                     vision_config=vision_config(vision), llm_config=llm), **extra)


def random_state_dict(config, seed=0):
    """Every weight the published modules hold, by their names and shapes (random, all values distinct)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, around=0.0, scale=0.1):
        return around + scale * torch.randn(*shape, generator=g)

    vision, llm = config["vision_config"], config["llm_config"]
    c, n = vision["hidden_size"], (vision["image_size"] // vision["patch_size"]) ** 2
    sd = {"vision_model.embeddings.class_embedding": rand(1, 1, c),
          "vision_model.embeddings.position_embedding": rand(1, n + 1, c),
          "vision_model.embeddings.patch_embedding.weight": rand(c, 3, vision["patch_size"], vision["patch_size"]),
          "vision_model.embeddings.patch_embedding.bias": rand(c)}
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd[p + "attn.qkv.weight"] = rand(3 * c, c, scale=0.3)
        if vision["qkv_bias"]:
            sd[p + "attn.qkv.bias"] = rand(3 * c)
        if vision["qk_normalization"]:
            sd[p + "attn.q_norm.weight"], sd[p + "attn.k_norm.weight"] = rand(c, around=1.0), rand(c, around=1.0)
        sd.update({p + "attn.proj.weight": rand(c, c, scale=0.3), p + "attn.proj.bias": rand(c),
                   p + "mlp.fc1.weight": rand(vision["intermediate_size"], c, scale=0.3),
                   p + "mlp.fc1.bias": rand(vision["intermediate_size"]),
                   p + "mlp.fc2.weight": rand(c, vision["intermediate_size"], scale=0.3), p + "mlp.fc2.bias": rand(c),
                   p + "ls1": rand(c, around=0.5), p + "ls2": rand(c, around=0.5)})
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = rand(c, around=1.0)
            if vision["norm_type"] == "layer_norm":
                sd[p + norm + ".bias"] = rand(c)
    d, shuffled = llm["hidden_size"], c * 4
    sd.update({"mlp1.0.weight": rand(shuffled, around=1.0), "mlp1.0.bias": rand(shuffled),
               "mlp1.1.weight": rand(d, shuffled, scale=0.2), "mlp1.1.bias": rand(d),
               "mlp1.3.weight": rand(d, d, scale=0.2), "mlp1.3.bias": rand(d)})
    heads, kv, inter, vocab = llm["num_attention_heads"], llm["num_key_value_heads"], llm["intermediate_size"], \
        llm["vocab_size"]
    hd = d // heads
    if llm["architectures"] == ["InternLM2ForCausalLM"]:
        sd["language_model.model.tok_embeddings.weight"] = rand(vocab, d, scale=1.0)
        for i in range(llm["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            sd.update({p + "attention.wqkv.weight": rand((heads + 2 * kv) * hd, d, scale=0.3),
                       p + "attention.wo.weight": rand(d, heads * hd, scale=0.3),
                       p + "feed_forward.w1.weight": rand(inter, d, scale=0.3),
                       p + "feed_forward.w3.weight": rand(inter, d, scale=0.3),
                       p + "feed_forward.w2.weight": rand(d, inter, scale=0.3),
                       p + "attention_norm.weight": rand(d, around=1.0), p + "ffn_norm.weight": rand(d, around=1.0)})
            if llm["bias"]:
                sd[p + "attention.wqkv.bias"], sd[p + "attention.wo.bias"] = rand((heads + 2 * kv) * hd), rand(d)
        sd["language_model.model.norm.weight"] = rand(d, around=1.0)
        sd["language_model.output.weight"] = rand(vocab, d, scale=0.3)
    else:
        sd["language_model.model.embed_tokens.weight"] = rand(vocab, d, scale=1.0)
        for i in range(llm["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            sd.update({p + "self_attn.q_proj.weight": rand(heads * hd, d, scale=0.3),
                       p + "self_attn.q_proj.bias": rand(heads * hd),
                       p + "self_attn.k_proj.weight": rand(kv * hd, d, scale=0.3),
                       p + "self_attn.k_proj.bias": rand(kv * hd),
                       p + "self_attn.v_proj.weight": rand(kv * hd, d, scale=0.3),
                       p + "self_attn.v_proj.bias": rand(kv * hd),
                       p + "self_attn.o_proj.weight": rand(d, heads * hd, scale=0.3),
                       p + "mlp.gate_proj.weight": rand(inter, d, scale=0.3),
                       p + "mlp.up_proj.weight": rand(inter, d, scale=0.3),
                       p + "mlp.down_proj.weight": rand(d, inter, scale=0.3),
                       p + "input_layernorm.weight": rand(d, around=1.0),
                       p + "post_attention_layernorm.weight": rand(d, around=1.0)})
        sd["language_model.model.norm.weight"] = rand(d, around=1.0)
        sd["language_model.lm_head.weight"] = rand(vocab, d, scale=0.3)
    return sd


def write_checkpoint(folder, config, state_dict, generation=None):
    """config.json and the weights in two safetensors shards with their index, as the hub repositories have them."""
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), ensure_ascii=False, indent=2)
    keys = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard in shards.items():
        save_file({k: state_dict[k].contiguous() for k in shard}, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    if generation is not None:
        json.dump(generation, open(os.path.join(folder, "generation_config.json"), "w"))


def internlm2_checkpoint(folder, max_position_embeddings=32768, bias=False):
    ids = write_internlm2_tokenizer(folder, train_sentencepiece())
    config = chat_config(internlm2_config(max(ids.values()) + 1, max_position_embeddings=max_position_embeddings,
                                          bias=bias))
    state_dict = random_state_dict(config)
    write_checkpoint(folder, config, state_dict, generation={"_from_model_config": True, "eos_token_id": 2,
                                                             "transformers_version": "4.37.2"})
    return config, state_dict, ids


# ------------------------------------------------------------------------------------------------ reference
def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def intern_vit(sd, vision, pixels, select_layer):
    """modeling_intern_vit.py, eager path: patch embedding, class token, bicubically resampled positions, then
    x + ls1 * attn(norm1 x), x + ls2 * mlp(norm2 x) with one fused qkv projection."""
    c, heads, eps = vision["hidden_size"], vision["num_attention_heads"], vision["layer_norm_eps"]
    p = "vision_model.embeddings."
    patches = F.conv2d(pixels, sd[p + "patch_embedding.weight"], sd[p + "patch_embedding.bias"],
                       stride=vision["patch_size"])
    b, _, h, w = patches.shape
    x = torch.cat([sd[p + "class_embedding"].expand(b, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
    pos = sd[p + "position_embedding"]
    side = vision["image_size"] // vision["patch_size"]
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).reshape(1, -1, h * w).permute(0, 2, 1)
    x = x + torch.cat([pos[:, :1], grid], dim=1)

    def norm(x, name):
        if vision["norm_type"] == "layer_norm":
            return F.layer_norm(x, (c,), sd[name + ".weight"], sd[name + ".bias"], eps)
        return rms_norm(x, sd[name + ".weight"], eps)

    states = [x]
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        y = norm(x, p + "norm1")
        n = y.shape[1]
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if vision["qk_normalization"]:  # over all heads at once: [B, N, C]
            q = rms_norm(q.transpose(1, 2).flatten(-2), sd[p + "attn.q_norm.weight"], eps)
            k = rms_norm(k.transpose(1, 2).flatten(-2), sd[p + "attn.k_norm.weight"], eps)
            q, k = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, k))
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + y * sd[p + "ls1"]
        y = norm(x, p + "norm2")
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        x = x + y * sd[p + "ls2"]
        states.append(x)
    return states[select_layer]


def image_features(sd, config, pixels):
    """modeling_internvl_chat.py extract_feature: drop the class token, pixel shuffle ('v2'), mlp1."""
    x = intern_vit(sd, config["vision_config"], pixels, config["select_layer"])[:, 1:]
    n, side = x.shape[0], int(x.shape[1] ** 0.5)
    x = x.reshape(n, side, side, -1)
    r = config["downsample_ratio"]
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * r), int(w * r), int(c / (r * r))).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"])
    x = F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])
    return x


def rotary(llm, head_dim, length):
    """InternLM2RotaryEmbedding and its 'dynamic' (NTK, once the sequence is longer than max_position_embeddings)
    and 'linear' variants; Qwen2's is the plain one."""
    base, positions = float(llm["rope_theta"]), torch.arange(length, dtype=torch.float32)
    scaling = llm.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" and length > llm["max_position_embeddings"]:
        factor = scaling["factor"]
        base = base * ((factor * length / llm["max_position_embeddings"]) - (factor - 1)) ** (head_dim / (head_dim - 2))
    if scaling.get("type") == "linear":
        positions = positions / scaling["factor"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], dim=-1)


def decoder_logits(sd, llm, embeds):
    """modeling_internlm2.py (fused wqkv: `rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups)`, queries
    `[..., :groups, :]`, key `[..., -2, :]`, value `[..., -1, :]`) or Qwen2 (separate q/k/v with bias)."""
    internlm2 = llm["architectures"] == ["InternLM2ForCausalLM"]
    d, heads, kv = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"]
    hd, groups, eps = d // heads, heads // kv, llm["rms_norm_eps"]
    b, t, _ = embeds.shape
    cos, sin = rotary(llm, hd, t)
    causal = torch.full((t, t), float("-inf")).triu(1)
    x = embeds
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        if internlm2:
            y = rms_norm(x, sd[p + "attention_norm.weight"], eps)
            qkv = F.linear(y, sd[p + "attention.wqkv.weight"], sd.get(p + "attention.wqkv.bias"))
            qkv = qkv.reshape(b, t, kv, groups + 2, hd)
            q, k, v = qkv[..., :groups, :].reshape(b, t, heads, hd), qkv[..., -2, :], qkv[..., -1, :]
        else:
            y = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            q = F.linear(y, sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.bias"]).reshape(b, t, heads, hd)
            k = F.linear(y, sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.k_proj.bias"]).reshape(b, t, kv, hd)
            v = F.linear(y, sd[p + "self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.bias"]).reshape(b, t, kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = (q @ k.transpose(2, 3) / math.sqrt(hd) + causal).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        if internlm2:
            x = x + F.linear(out, sd[p + "attention.wo.weight"], sd.get(p + "attention.wo.bias"))
            y = rms_norm(x, sd[p + "ffn_norm.weight"], eps)
            w1, w3, w2 = (sd[p + f"feed_forward.{w}.weight"] for w in ("w1", "w3", "w2"))
        else:
            x = x + F.linear(out, sd[p + "self_attn.o_proj.weight"])
            y = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            w1, w3, w2 = (sd[p + f"mlp.{w}_proj.weight"] for w in ("gate", "up", "down"))
        x = x + F.linear(F.silu(F.linear(y, w1)) * F.linear(y, w3), w2)
    x = rms_norm(x, sd["language_model.model.norm.weight"], eps)
    return F.linear(x, sd["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"])


def reference_logits(sd, config, input_ids, pixels, image_token_id):
    """InternVLChatModel.forward: image features replace the <IMG_CONTEXT> embeddings, then the decoder."""
    llm = config["llm_config"]
    internlm2 = llm["architectures"] == ["InternLM2ForCausalLM"]
    embeds = sd[f"language_model.model.{'tok_embeddings' if internlm2 else 'embed_tokens'}.weight"][input_ids].clone()
    features = image_features(sd, config, pixels)
    embeds[input_ids == image_token_id] = features.reshape(-1, features.shape[-1])
    return decoder_logits(sd, llm, embeds)


def image_prompt(ids_of, text_ids, images, tokens_per_tile):
    prompt = []
    for _ in range(images):
        prompt += [ids_of("<img>")] + [ids_of("<IMG_CONTEXT>")] * tokens_per_tile + [ids_of("</img>")]
    return torch.tensor([prompt + text_ids])


def assert_same_logits(logits, expected):
    """Equal up to float32 rounding, which the two rotary tables (same formula, different order of operations)
    dominate: a few 1e-6 of the largest logit. A wrong split or name moves logits by their own size."""
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-5 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("max_positions,bias", [(32768, False), (16, True)], ids=["internlm2-chat", "ntk-bias"])
def test_internlm2_checkpoint_gives_the_same_logits(tmp_path, max_positions, bias):
    """InternVL2-8B's layout (InternViT-300M + InternLM2). At max_position_embeddings 16 the 26-token prompt runs
    InternLM2's dynamic NTK rotary scaling, and the fused wqkv / wo biases are split too."""
    config, sd, ids = internlm2_checkpoint(str(tmp_path / "src"), max_positions, bias)
    out = init_from_internvl(str(tmp_path / "src"), str(tmp_path / "sophia"), num_frames=4)
    model = SophiaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.image_token_id == ids["<IMG_CONTEXT>"]
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    text = [ids["<|im_start|>"], 300, 301, 302, 303, 304, ids["<|im_end|>"], 305]
    input_ids = torch.cat([torch.tensor([[ids["<s>"], 310, 311, 312, 313, 314]]), image_prompt(ids.get, text, 2, 4)], 1)
    with torch.no_grad():
        expected = reference_logits(sd, config, input_ids, pixels, ids["<IMG_CONTEXT>"])
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    # The reference has the source vocabulary; Sophia's tokens are extra rows at the end.
    assert_same_logits(logits[..., : expected.shape[-1]], expected)


def test_qwen2_decoder_with_internvit_6b_tower_gives_the_same_logits(tmp_path):
    """InternVL2.5-1B/4B's layout (a Qwen2 decoder, names kept) with the InternViT-6B tower's RMSNorm, q/k norm and
    bias-free qkv, features taken from the second-to-last layer, and linear rope scaling."""
    src = str(tmp_path / "src")
    tokenizer = write_qwen2_tokenizer(src)
    llm = qwen2_config(len(tokenizer) + 5, rope_scaling={"type": "linear", "factor": 2.0})
    config = chat_config(llm, vision="6b", select_layer=-2, template="internvl2_5")
    sd = random_state_dict(config, seed=3)
    # Older checkpoints also saved the rotary tables' inverse frequencies; they are recomputed, not converted.
    write_checkpoint(src, config, {**sd, "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    out = init_from_internvl(src, str(tmp_path / "sophia"))
    model = SophiaForConditionalGeneration.from_pretrained(out).eval()
    ids_of = tokenizer.convert_tokens_to_ids
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    input_ids = image_prompt(ids_of, tokenizer.encode("What color is the first shot?"), 1, 4)
    with torch.no_grad():
        expected = reference_logits(sd, config, input_ids, pixels, ids_of("<IMG_CONTEXT>"))
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    assert_same_logits(logits[..., : expected.shape[-1]], expected)
    # The tokenizer loads without custom code and keeps every id; Sophia's tokens are added after the vocabulary.
    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(out)
    assert converted.encode(CHAT_TURN) == tokenizer.encode(CHAT_TURN)
    assert [converted.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS] == [ids_of(t) for t in INTERNVL_TOKENS]
    assert json.load(open(os.path.join(out, "args.json")))["system"] == TEMPLATE_SYSTEM_MESSAGES["internvl2_5"]


def test_every_source_tensor_is_used_exactly_once(tmp_path):
    """All values are distinct random floats: the converted weights, less Sophia's new modules and the rows of the
    added tokens, hold exactly the source's values, each once."""
    config, sd, ids = internlm2_checkpoint(str(tmp_path / "src"), bias=True)
    out = init_from_internvl(str(tmp_path / "src"), str(tmp_path / "sophia"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    converted = {}
    for file in sorted(set(index.values())):
        converted.update(load_file(os.path.join(out, file)))
    vocab = config["llm_config"]["vocab_size"]
    kept = [v[:vocab] if k in ("model.language_model.embed_tokens.weight", "lm_head.weight") else v
            for k, v in converted.items() if not k.startswith(("model.aggregator.", "model.pruner."))]
    source = torch.cat([v.flatten() for v in sd.values()]).sort().values
    written = torch.cat([v.flatten() for v in kept]).sort().values
    assert source.numel() == written.numel()
    assert torch.equal(source, written)
    assert converted["model.language_model.embed_tokens.weight"].shape[0] == vocab + 3  # <vid> <VIDEO_CONTEXT> </vid>


def test_tokenizer_encodes_a_chat_turn_to_the_same_ids(tmp_path):
    """InternLM2's sentencepiece tokenizer -> a fast tokenizer without custom code: the same ids as
    tokenization_internlm2.py for a chat turn (ids of <|im_start|>, <img>, <IMG_CONTEXT> kept), its chat template,
    and Sophia's tokens added; under sentencepiece's normalizer settings too."""
    from transformers import AutoTokenizer

    config, _, ids = internlm2_checkpoint(str(tmp_path / "src"))
    out = init_from_internvl(str(tmp_path / "src"), str(tmp_path / "sophia"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode(CHAT_TURN) == internlm2_reference_ids(str(tmp_path / "src"), ids, CHAT_TURN)
    assert all(tokenizer.convert_tokens_to_ids(t) == i for t, i in ids.items())
    assert tokenizer.decode(tokenizer.encode(CHAT_TURN), skip_special_tokens=False) == "<s>" + CHAT_TURN
    messages = [{"role": "user", "content": "<img><IMG_CONTEXT></img>\nWhat color?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat color?<|im_end|>\n<|im_start|>assistant\n"
    last = max(ids.values())
    added = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t not in ids]
    assert added == [last + 1, last + 2, last + 3]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>"

    from swift_sophia.tools.convert_tokenizer import load_source_tokenizer

    texts = [CHAT_TURN, "def f(x):\n    return x  # ok\n\tindent  ", "  leading and trailing  ",
             "ＡＢＣ ｆｕｌｌ ① ½ 🐉 é", "raw <s> and </s> text <tool>x shot    y", "\n\n", "a<|im_end|>b"]
    for settings in [dict(add_dummy_prefix=True, remove_extra_whitespaces=True, rule="nmt_nfkc"),
                     dict(remove_extra_whitespaces=True), dict(user_defined=("<tool>", "shot", "▁▁▁▁"))]:
        folder = str(tmp_path / "tok" / "-".join(map(str, settings.values())))
        ids = write_internlm2_tokenizer(folder, train_sentencepiece(**settings))
        fast = load_source_tokenizer(folder)
        for text in texts:
            assert fast.encode(text) == internlm2_reference_ids(folder, ids, text), (settings, text)
    # sentencepiece matches user-defined pieces in normalized text: with a dummy prefix that is not reproduced.
    proto = train_sentencepiece(add_dummy_prefix=True, user_defined=("shot",))
    write_internlm2_tokenizer(str(tmp_path / "prefix"), proto)
    with pytest.raises(ConversionError, match=r"user-defined pieces \(\['shot'\]\) and normalizes text"):
        load_source_tokenizer(str(tmp_path / "prefix"))


def test_generation_config_and_system_prompt_are_carried(tmp_path):
    _, _, ids = internlm2_checkpoint(str(tmp_path / "src"))
    out = init_from_internvl(str(tmp_path / "src"), str(tmp_path / "sophia"), num_frames=4)
    generation = json.load(open(os.path.join(out, "generation_config.json")))
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["</s>"]]
    assert generation["pad_token_id"] == ids["</s>"]
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["system"] == TEMPLATE_SYSTEM_MESSAGES["internlm2-chat"]
    assert args["model_type"] == "sophia" and args["template"] == "sophia"
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "sophia" and config["num_frames"] == 4 and config["torch_dtype"] == "float32"
    text = config["text_config"]
    assert text["model_type"] == "llama" and text["num_key_value_heads"] == 2 and text["attention_bias"] is False
    assert text["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    # A config's own system_message wins over its template's.
    path = tmp_path / "src" / "config.json"
    raw = json.load(open(path))
    json.dump(dict(raw, system_message="Answer briefly."), open(path, "w"))
    out = init_from_internvl(str(tmp_path / "src"), str(tmp_path / "sophia2"))
    assert json.load(open(os.path.join(out, "args.json")))["system"] == "Answer briefly."


def test_what_it_does_not_know_is_refused_by_name(tmp_path):
    src = tmp_path / "src"
    config, sd, _ = internlm2_checkpoint(str(src))

    def refused(match, folder=src):
        with pytest.raises(ConversionError, match=match):
            init_from_internvl(str(folder), str(tmp_path / "out"))
        assert not (tmp_path / "out" / "config.json").exists()

    phi3 = dict(config, llm_config=dict(config["llm_config"], architectures=["Phi3ForCausalLM"]))
    json.dump(phi3, open(src / "config.json", "w"))
    refused(r"decoder is 'Phi3ForCausalLM'.*InternLM2ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM")
    json.dump(dict(config, ps_version="v1"), open(src / "config.json", "w"))
    refused(r"pixel shuffle version 'v1'")
    json.dump(config, open(src / "config.json", "w"))
    save_file({"language_model.model.layers.0.attention.rotary_emb.inv_freq": torch.ones(8),
               "language_model.model.layers.0.sophia_gate.weight": torch.ones(2)}, str(src / "extra.safetensors"))
    index = json.load(open(src / "model.safetensors.index.json"))
    index["weight_map"].update({"language_model.model.layers.0.sophia_gate.weight": "extra.safetensors",
                                "language_model.model.layers.0.attention.rotary_emb.inv_freq": "extra.safetensors"})
    json.dump(index, open(src / "model.safetensors.index.json", "w"))
    refused(r"1 weight\(s\) that an internvl_chat checkpoint.*sophia_gate")
    os.remove(src / "extra.safetensors")
    refused(r"lacks weight files its index names: \['extra.safetensors'\]")
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "extra.safetensors"}
    json.dump(index, open(src / "model.safetensors.index.json", "w"))
    os.remove(src / "model-00002-of-00002.safetensors")
    refused(r"lacks weight files its index names: \['model-00002-of-00002.safetensors'\]")
    os.remove(src / "tokenizer.model")
    refused(r"has an InternLM2 tokenizer \(tokenizer_config.json\) but no tokenizer.model")
    json.dump(dict(config, model_type="sophia"), open(src / "config.json", "w"))
    refused(r"is a 'sophia' checkpoint \(config.json\); init-from-internvl takes InternVL checkpoints")
    os.remove(src / "config.json")
    refused(r"has no config.json; found \[")
    # Through the command: a hub name that cannot be fetched (offline here), in one sentence, no traceback.
    proc = subprocess.run([sys.executable, "-m", "swift_sophia", "init-from-internvl", "OpenGVLab/InternVL2-8B",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1
    assert "OpenGVLab/InternVL2-8B is not a local folder, and fetching it from the Hugging Face Hub failed" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_original_checkpoint_trains_stage1_and_answers(tmp_path, synthetic_data):
    """The recipe's path on an InternVL2-8B-shaped toy: `sophia init-from-internvl` on the original layout,
    `swift sft` stage 1 (with the base's system prompt, read from args.json), `swift infer`."""
    from swift_cli import sft, swift, train_losses

    internlm2_checkpoint(str(tmp_path / "InternVL2-8B"))
    subprocess.run([sys.executable, "-m", "swift_sophia", "init-from-internvl", str(tmp_path / "InternVL2-8B"),
                    str(tmp_path / "sophia"), "--num-frames", "4"], check=True, capture_output=True)
    for split, rows in (("train", 4), ("val", 2)):
        lines = open(synthetic_data[split]).readlines()[:rows]
        (tmp_path / f"{split}.jsonl").write_text("".join(lines))
    out = str(tmp_path / "stage1")
    ckpt = sft(str(tmp_path / "sophia"), tmp_path / "train.jsonl", out, "--load_args", "true", "--tuner_type", "full",
               "--freeze_vit", "true", "--freeze_llm", "true", "--freeze_aligner", "false", "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
               "--save_steps", "2")
    losses = train_losses(out)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    before = SophiaForConditionalGeneration.from_pretrained(str(tmp_path / "sophia")).state_dict()
    after = SophiaForConditionalGeneration.from_pretrained(ckpt).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.aggregator.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith(("model.language_model.", "lm_head.", "model.vision_tower.")) for k in changed)
    assert json.load(open(os.path.join(ckpt, "args.json")))["system"] == TEMPLATE_SYSTEM_MESSAGES["internlm2-chat"]

    result = tmp_path / "answers.jsonl"
    swift("infer", "--model", ckpt, "--val_dataset", tmp_path / "val.jsonl", "--infer_backend", "transformers",
          "--max_new_tokens", "4", "--result_path", result)
    answers = [json.loads(line) for line in open(result)]
    assert len(answers) == 2 and all(isinstance(a["response"], str) and not a.get("error") for a in answers)
