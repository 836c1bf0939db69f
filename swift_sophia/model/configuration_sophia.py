"""Configuration of the Sophia long-video VLM.

Sophia is an InternVL-style model (InternViT vision tower, pixel-shuffle MLP projector, any transformers
decoder) plus two additions: shot-adaptive frame pruning before the decoder and hierarchical attention inside
it. Everything InternVL has lives in `InternVLConfig`; this class adds the Sophia settings.
"""
from __future__ import annotations

import os

from transformers import InternVLConfig

from sophia_kernels import check_hierarchy

# Settings a run may change without touching the checkpoint, by config field and environment variable:
# `--model_kwargs '{"prune_alpha": 30}'` (ms-swift turns it into PRUNE_ALPHA=30) or the variable itself. Read once,
# when the model or template is built.
RUNTIME_SETTINGS = {
    "prune_alpha": "PRUNE_ALPHA",
    "prune_beta": "PRUNE_BETA",
    "prune_max_frames": "PRUNE_MAX_FRAMES",
    "hier_neighbours": "HIER_NEIGHBOURS",
    "use_hierarchy": "SOPHIA_HIERARCHY",
    "vision_chunk_frames": "VISION_CHUNK_FRAMES",
    "decoder_chunk_tokens": "DECODER_CHUNK_TOKENS",
    "liger_kernel": "SOPHIA_LIGER_KERNEL",
    "lean_prefill": "SOPHIA_LEAN_PREFILL",
    "offload_checkpoints": "SOPHIA_OFFLOAD_CHECKPOINTS",
    "kv_cache_bits": "SOPHIA_KV_CACHE_BITS",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SophiaConfig(InternVLConfig):
    r"""
    video_token_id (`int`):
        Id of the placeholder token that stands for one visual token of a video frame. The template expands a
        `<video>` tag into `frames * tokens_per_frame` of them, between `<vid>` and `</vid>`.
    hier_arity (`int`, defaults to 2): A, children per parent frame in the hierarchy.
    hier_levels (`int`, defaults to 4): L, levels including the real frames (level 0).
    hier_neighbours (`int`, defaults to 2): E, hops to same-level neighbour frames a video frame attends to.
    attention_backend (`str`, defaults to `"auto"`): `"auto"` (Triton on CUDA, PyTorch reference elsewhere),
        `"triton"` or `"reference"`.
    num_frames (`int`, defaults to 32): frames sampled per video when the `VIDEO_SEGMENTS` environment
        variable (or `--model_kwargs '{"video_segments": N}'`) does not say otherwise.
    prune_alpha, prune_beta (`float`, defaults to 0): percent of shots dropped by query-guided inter-shot
        pruning, and percent of frames dropped inside each kept shot by intra-shot redundancy pruning.
        0 and 0 give the unpruned model.
    prune_max_frames (`int` or `"auto"`, defaults to 0): the frame budget: at most this many frames of each video
        reach the decoder, the shots that best match the question first (docs/pruning.md); 0: no budget. With
        `"auto"` the budget of a request is what the GPU memory free at that moment holds at this model's shape
        (KV cache and decoder working set per kept frame), shared among its videos by frame count; on a CPU
        `"auto"` sets no budget. Combines with prune_alpha and prune_beta (applied after them).
    gumbel_tau_start, gumbel_tau_min, gumbel_anneal_rate: temperature schedule of the Gumbel-Softmax used to
        train the pruner: tau(step) = max(tau_min, tau_start * exp(-rate * step)).
    vision_chunk_frames (`int`, defaults to 64): frames the vision tower takes at once (0: all at once). Bounds the
        tower's activation memory for long videos; the result is the same.
    decoder_chunk_tokens (`int`, defaults to 16384): tokens the decoder's position-wise layers (MLP, norms) take at
        once for long inputs (0: all at once), so that no [tokens x MLP width] tensor exists at 100K+ tokens; the
        result is the same. In training each chunk is recomputed in backward.
    use_hierarchy (`bool`, defaults to True): hierarchical attention over the kept frames and their aggregated
        levels. False is the "without hierarchical attention" ablation, for evaluation: the same weights, plain
        causal attention over the kept frames, no aggregated tokens.
    lean_prefill (`bool`, defaults to True): at inference, run the decoder over an extended sequence layer by layer
        with the residual updated in place and q, k, v, attention, output projection and MLP over chunks of tokens
        (`lean_prefill.py`): the same result with about a third of the decoder's working memory. False: the
        decoder's own forward (for comparison).
    offload_checkpoints (`bool`, defaults to False): in training with gradient checkpointing, keep what the
        recompute needs (each decoder layer's input: one [tokens x hidden] tensor per layer, most of the training
        memory at hour scale) in pinned host memory instead of on the GPU (transformers' `offload`). Costs a copy
        to the host in forward and back in backward.
    kv_cache_bits (`int`, defaults to 16): 16 (the model's dtype) or 8: the KV cache of a prefill over videos in
        int8 with one scale per head and token (`kv_cache.Int8KVLayer`): half the memory per kept frame, for longer
        videos or larger frame budgets on one card (the `auto` budget counts it). Logits of every decoding step
        within 0.12 % (relative norm) of the 16-bit cache's on the tiny model; not yet measured at the 8B shape.
    liger_kernel (`bool`, defaults to False): Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in the decoder (CUDA;
        `swift sft --use_liger_kernel true` does the same for training). Faster and leaner; not bit-identical.
    """

    model_type = "sophia"

    video_token_id: int = 151668
    hier_arity: int = 2
    hier_levels: int = 4
    hier_neighbours: int = 2
    attention_backend: str = "auto"
    num_frames: int = 32
    prune_alpha: float = 0.0
    prune_beta: float = 0.0
    prune_max_frames: int | str = 0
    gumbel_tau_start: float = 1.0
    gumbel_tau_min: float = 0.1
    gumbel_anneal_rate: float = 1e-3
    vision_chunk_frames: int = 64
    decoder_chunk_tokens: int = 16384
    use_hierarchy: bool = True
    liger_kernel: bool = False
    lean_prefill: bool = True
    offload_checkpoints: bool = False
    kv_cache_bits: int = 16

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_hierarchy(self.hier_arity, self.hier_levels, self.hier_neighbours)
        if self.vision_chunk_frames < 0 or self.decoder_chunk_tokens < 0:
            raise ValueError("vision_chunk_frames and decoder_chunk_tokens must be >= 0 (0: no chunking)")
        self.prune_max_frames = parse_frame_budget(self.prune_max_frames, "prune_max_frames")
        if self.kv_cache_bits not in (8, 16):
            raise ValueError(f"kv_cache_bits must be 16 or 8, got {self.kv_cache_bits}")
        if self.attention_backend not in ("auto", "triton", "reference"):
            raise ValueError(f"attention_backend must be auto, triton or reference, got {self.attention_backend!r}")

    @property
    def hidden_size(self) -> int:
        # DeepSpeed ZeRO-3 sizes its buckets from the top-level config's hidden_size.
        return self.text_config.hidden_size

    @property
    def tokens_per_frame(self) -> int:
        """M: visual tokens per frame after pixel shuffle (one tile per frame)."""
        vision = self.vision_config
        patches = (vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
        return int(patches * self.downsample_ratio**2)


def resolve_runtime_settings(config: SophiaConfig) -> SophiaConfig:
    """Apply the environment's overrides of `RUNTIME_SETTINGS` (e.g. PRUNE_ALPHA=30) to `config`, once."""
    for name, variable in RUNTIME_SETTINGS.items():
        raw = os.environ.get(variable)
        if raw in (None, ""):
            continue
        if name == "prune_max_frames":
            config.prune_max_frames = parse_frame_budget(raw, variable)
            continue
        setattr(config, name, _parse_setting(variable, raw, type(getattr(SophiaConfig, name)), name))
    for name in ("prune_alpha", "prune_beta"):
        value = getattr(config, name)
        if not 0 <= value < 100:
            raise ValueError(f"{name}={value:g} is out of range: it is the percentage of "
                             f"{'shots' if name == 'prune_alpha' else 'frames of each kept shot'} to drop, "
                             f"0 <= {name} < 100 (set by {RUNTIME_SETTINGS[name]}, --model_kwargs or the checkpoint's "
                             f"config.json)")
    if config.kv_cache_bits not in (8, 16):
        raise ValueError(f"kv_cache_bits={config.kv_cache_bits} is not valid: 16 (the model's dtype) or 8 (int8) (set "
                         f"by {RUNTIME_SETTINGS['kv_cache_bits']}, --model_kwargs or the checkpoint's config.json)")
    check_hierarchy(config.hier_arity, config.hier_levels, config.hier_neighbours)
    return config


def parse_frame_budget(value, source: str = "prune_max_frames"):
    """A frame budget as a setting gives it: an int >= 0 (0: none) or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or number < 0:
        raise ValueError(f"{source}={value!r} is not a frame budget: give a whole number of frames (0: no budget) "
                         "or 'auto' (what the GPU memory free for the request holds)")
    return int(number)


def prunes(config) -> bool:
    """Whether the model drops frames: alpha or beta above 0, or a frame budget."""
    return config.prune_alpha > 0 or config.prune_beta > 0 or bool(getattr(config, "prune_max_frames", 0))


def _parse_setting(variable: str, raw: str, kind: type, name: str):
    if kind is bool:
        if raw.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(f"{variable}={raw!r} is not a valid boolean for the setting {name} (use 1 or 0)")
        return raw.strip().lower() in _TRUE
    try:
        value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {kind.__name__} for the setting {name}") from None
    if value < 0:
        raise ValueError(f"{variable}={raw!r} must be >= 0")
    return value


__all__ = ["SophiaConfig", "RUNTIME_SETTINGS", "resolve_runtime_settings", "parse_frame_budget", "prunes"]
