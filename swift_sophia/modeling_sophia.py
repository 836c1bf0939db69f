"""Sophia: an InternVL-style VLM for hour-long videos (shot-adaptive frame pruning + hierarchical attention).

Reads top to bottom like transformers' InternVL: vision features and projector (inherited), Sophia's frame
pruner and aggregation CNN, the merge into the extended sequence, the decoder with hierarchical attention, the
LM head, and generation, which drops the aggregated tokens from the KV cache after prefill.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import ModelOutput
from transformers.models.internvl.modeling_internvl import (InternVLForConditionalGeneration, InternVLModel,
                                                            InternVLPreTrainedModel)

from sophia_kernels import level_counts

from . import attention
from .configuration_sophia import SophiaConfig
from .extended_sequence import ExtendedPlan, build_extended_plan, find_video_runs
from .pruning import FramePruner


class SophiaAggregator(nn.Module):
    """The learnable CNN that builds frame n of level l + 1 from frames nA .. nA + A - 1 of level l.

    It works token by token: token m of the parent sees token m of its A children (missing children are zero),
    a 1-D convolution over the frame axis with kernel and stride A; one convolution per level transition,
    initialised to the mean of the children so that stage 1 starts from average pooling. The weights are
    parameters of this module itself and all videos of a batch go through one call, so that under ZeRO-3 every
    rank gathers them exactly once per step.
    """

    def __init__(self, hidden_size: int, arity: int, levels: int):
        super().__init__()
        self.arity, self.levels = arity, levels
        self.weight = nn.Parameter(torch.empty(max(levels - 1, 0), hidden_size, hidden_size, arity))
        self.bias = nn.Parameter(torch.empty(max(levels - 1, 0), hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        eye = torch.eye(self.weight.shape[1], dtype=self.weight.dtype, device=self.weight.device)
        self.weight.copy_(eye[None, :, :, None].expand_as(self.weight) / self.arity)
        self.bias.zero_()

    def forward(self, videos: List[torch.Tensor]) -> List[List[torch.Tensor]]:
        """videos: level-0 frames [F, M, D] of each video. Returns each video's aggregated levels, [count_l, M, D]."""
        out = []
        for frames in videos:
            counts = level_counts(frames.shape[0], self.arity, self.levels)
            levels, current = [], frames
            for level, count in enumerate(counts[1:]):
                x = current.permute(1, 2, 0)  # [M, D, F]: one sequence of frames per token position
                x = nn.functional.pad(x, (0, count * self.arity - current.shape[0]))
                x = nn.functional.conv1d(x, self.weight[level].to(x.dtype), self.bias[level].to(x.dtype),
                                         stride=self.arity)
                current = x.permute(2, 0, 1)  # [count, M, D]
                levels.append(current)
            out.append(levels)
        return out


class SophiaModel(InternVLModel):
    config_class = SophiaConfig

    def __init__(self, config: SophiaConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.aggregator = SophiaAggregator(hidden, config.hier_arity, config.hier_levels)
        self.pruner = FramePruner(hidden)
        attention.install(self.language_model.config)

    def _init_weights(self, module):
        # transformers initialises missing weights module by module, through the nearest PreTrainedModel and
        # only for modules that own parameters, so a checkpoint without Sophia's modules (an InternVL one) gets
        # their documented initialisation here: the aggregator averages, the pruner's query MLP is the identity
        # (zero residual branch; plain tensor ops, which transformers' init guards do not skip).
        super()._init_weights(module)
        if isinstance(module, SophiaAggregator):
            module.reset_parameters()
        elif getattr(self, "pruner", None) is not None and module is self.pruner.query_mlp[-1] \
                and self.pruner.residual:
            with torch.no_grad():
                module.weight.zero_()
                module.bias.zero_()

    def video_frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + pixel shuffle + projector: [F, 3, H, W] -> [F, M, D]."""
        return self.get_image_features(
            pixel_values,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        ).pooler_output


@dataclass
class SophiaCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    # Set by a prefill over videos: the compacted cache's 2-D mask and the next token's position per row.
    cache_attention_mask: Optional[torch.LongTensor] = None
    next_position_ids: Optional[torch.LongTensor] = None
    kept_frames: Optional[list] = None


class SophiaForConditionalGeneration(InternVLForConditionalGeneration):
    config_class = SophiaConfig
    _no_split_modules = ["InternVLVisionLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]

    def __init__(self, config: SophiaConfig):
        InternVLPreTrainedModel.__init__(self, config)
        self.model = SophiaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # ----------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values_videos: Optional[torch.FloatTensor] = None,
        video_frame_counts: Optional[torch.LongTensor] = None,
        video_frame_shots: Optional[torch.LongTensor] = None,
        video_query_ids: Optional[torch.LongTensor] = None,
        video_query_mask: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> SophiaCausalLMOutput:
        prefilled = past_key_values is not None and past_key_values.get_seq_length() > 0
        if pixel_values_videos is None:
            return self._forward_plain(input_ids, pixel_values, attention_mask, position_ids, past_key_values,
                                       inputs_embeds, labels, use_cache, logits_to_keep, **kwargs)
        if prefilled:
            raise ValueError("videos can only be given in the first forward pass (prefill), not with a filled cache")
        if input_ids is None:
            raise ValueError("a forward pass with videos needs input_ids (the template's video placeholders)")
        if video_frame_counts is None:
            raise ValueError("pixel_values_videos needs video_frame_counts (frames per video)")
        return self._forward_video(input_ids, pixel_values, attention_mask, position_ids, labels, use_cache,
                                   logits_to_keep, pixel_values_videos, video_frame_counts, video_frame_shots,
                                   video_query_ids, video_query_mask, **kwargs)

    def _forward_plain(self, input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds,
                       labels, use_cache, logits_to_keep, **kwargs) -> SophiaCausalLMOutput:
        """Text, images, and decoding steps: the InternVL forward with causal attention."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        features = None
        if pixel_values is not None:
            features = self.model.video_frame_features(pixel_values).to(inputs_embeds.dtype)
            inputs_embeds = self._scatter_images(input_ids, inputs_embeds, features)
        if self.training and is_deepspeed_zero3_enabled():
            inputs_embeds = inputs_embeds + self._dummy_visual_pass(inputs_embeds, features)
        outputs = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            position_ids=position_ids, past_key_values=past_key_values,
                                            use_cache=use_cache, **kwargs)
        logits = self.lm_head(_keep(outputs.last_hidden_state, logits_to_keep))
        loss = self._loss(logits, labels, **kwargs)
        return SophiaCausalLMOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _forward_video(self, input_ids, pixel_values, attention_mask, position_ids, labels, use_cache,
                       logits_to_keep, pixel_values_videos, video_frame_counts, video_frame_shots,
                       video_query_ids, video_query_mask, **kwargs) -> SophiaCausalLMOutput:
        config = self.config
        m = config.tokens_per_frame
        counts = [int(c) for c in video_frame_counts.tolist()]
        if sum(counts) != pixel_values_videos.shape[0]:
            raise ValueError(f"video_frame_counts sum to {sum(counts)} but {pixel_values_videos.shape[0]} frames "
                             "were given")
        embeds = self.get_input_embeddings()(input_ids)
        # One pass of the vision tower over image tiles and video frames together.
        images = 0 if pixel_values is None else pixel_values.shape[0]
        pixels = pixel_values_videos if not images else torch.cat([pixel_values, pixel_values_videos.to(pixel_values)])
        features = self.model.video_frame_features(pixels).to(embeds.dtype)
        if images:
            embeds = self._scatter_images(input_ids, embeds, features[:images])
        frames = features[images:]
        runs = find_video_runs(input_ids, config.video_token_id, counts, m)

        # 1. Shot-adaptive pruning, then 2. the hierarchy of each video: its kept frames and aggregated levels.
        kept, offset = [], 0
        for i, run in enumerate(runs):
            video = frames[offset:offset + run.frames]
            shots = _shots_of(video_frame_shots, offset, run.frames)
            query = self._query_embeds(video_query_ids, video_query_mask, i)
            video, run.kept = self._prune(video, shots, query)
            offset += run.frames
            kept.append(video)
        bank = []
        for video, levels in zip(kept, self.model.aggregator(kept)):
            bank.append(video.reshape(-1, video.shape[-1]))
            bank.extend(level.reshape(-1, level.shape[-1]) for level in levels)

        # 3. Merge into the extended sequence and run the decoder with hierarchical attention.
        plan = build_extended_plan(input_ids, attention_mask, position_ids, runs, tokens_per_frame=m,
                                   arity=config.hier_arity, levels=config.hier_levels,
                                   neighbours=config.hier_neighbours)
        batch, hidden = input_ids.shape[0], embeds.shape[-1]
        table = torch.cat([embeds.reshape(-1, hidden)] + bank)
        valid = (plan.source >= 0).unsqueeze(-1)
        extended = (table[plan.source.clamp(min=0)] * valid).view(batch, plan.length, hidden)
        cache = DynamicCache(config=config.text_config) if use_cache else None
        with attention.hierarchical_step():
            outputs = self.model.language_model(inputs_embeds=extended, attention_mask=None,
                                                position_ids=plan.position_ids, past_key_values=cache,
                                                use_cache=bool(use_cache), hier_layout=plan.layout,
                                                sophia_attention_backend=config.attention_backend, **kwargs)

        # 4. Back to the plain sequence for the LM head, so logits and labels line up as ms-swift expects.
        flat = outputs.last_hidden_state.reshape(-1, hidden)
        index = plan.plain_to_extended
        plain = (flat[index.clamp(min=0)] * (index >= 0).unsqueeze(-1)).view(batch, -1, hidden)
        logits = self.lm_head(_keep(plain, logits_to_keep))
        loss = self._loss(logits, labels, **kwargs)

        out = SophiaCausalLMOutput(loss=loss, logits=logits, kept_frames=[run.kept for run in runs])
        if use_cache:
            out.past_key_values, out.cache_attention_mask = _compact_cache(cache, plan, config.text_config)
            out.next_position_ids = plan.next_position
        return out

    # --------------------------------------------------------------------------------------------- pieces
    def _scatter_images(self, input_ids, embeds, features):
        mask = (input_ids == self.config.image_token_id)
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{int(mask.sum())} image placeholder tokens but {features.shape[0]} image tiles of "
                             f"{features.shape[1]} tokens")
        return embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def _dummy_visual_pass(self, embeds, features=None):
        """ZeRO-3 gathers a module's weights when it is called, so every rank must call the same modules the same
        number of times per step: a batch without video still runs the vision tower (unless images did), the
        aggregation CNN, on a blank frame, and adds nothing. (The pruner is called a varying number of times per
        step, once per video, so pruning is trained with ZeRO-2 or without DeepSpeed; see `_prune`.)"""
        if features is None:
            size = self.config.vision_config.image_size
            pixels = torch.zeros(1, 3, size[0], size[1], device=embeds.device, dtype=embeds.dtype)
            features = self.model.video_frame_features(pixels).to(embeds.dtype)
        video = features[:1]
        levels = self.model.aggregator([video.expand(self.config.hier_arity, -1, -1)])[0]
        return (video.sum() + sum(level.sum() for level in levels)) * 0.0

    def _query_embeds(self, query_ids, query_mask, video: int) -> Optional[torch.Tensor]:
        """The pruning query of a video: the user text of the turn that holds it (None if absent or empty)."""
        if query_ids is None or video >= query_ids.shape[0]:
            return None
        ids = query_ids[video][query_mask[video].bool()] if query_mask is not None else query_ids[video]
        if ids.numel() == 0:
            return None
        return self.get_input_embeddings()(ids)

    def _prune(self, video: torch.Tensor, shots, query):
        alpha, beta = prune_settings(self.config)
        if alpha <= 0 and beta <= 0:
            return video, list(range(video.shape[0]))
        if self.training and is_deepspeed_zero3_enabled():
            raise ValueError("training with frame pruning on (stage 3) needs --deepspeed zero2 or no DeepSpeed: "
                             "ZeRO-3 would hang, the pruner runs once per video and videos per rank differ")
        tau = self.model.pruner.temperature(self.config) if self.training else None
        selection = self.model.pruner.select(video, shots, query, alpha=alpha, beta=beta, tau=tau)
        kept = selection.keep.tolist()
        return video[selection.keep] * selection.gate.to(video.dtype)[:, None, None], kept

    def _loss(self, logits, labels, **kwargs):
        if labels is None:
            return None
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                  **kwargs)

    # ------------------------------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        next_position = kwargs.pop("sophia_next_position", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration,
            **kwargs)
        if next_position is not None and not is_first_iteration:
            steps = model_inputs["input_ids"].shape[1]
            model_inputs["position_ids"] = next_position[:, None] + torch.arange(steps, device=next_position.device)
            for key in ("pixel_values_videos", "pixel_values", "video_frame_counts", "video_frame_shots",
                        "video_query_ids", "video_query_mask"):
                model_inputs.pop(key, None)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        compact_mask = getattr(outputs, "cache_attention_mask", None)
        if compact_mask is not None:
            # The prefill dropped the aggregated tokens (and pruned frames) from the cache: from now on the
            # attention mask describes the compacted cache and positions continue from the plain sequence.
            model_kwargs["attention_mask"] = torch.cat(
                [compact_mask, compact_mask.new_ones((compact_mask.shape[0], num_new_tokens))], dim=-1)
            model_kwargs["sophia_next_position"] = outputs.next_position_ids
            model_kwargs.pop("position_ids", None)
        elif model_kwargs.get("sophia_next_position") is not None:
            model_kwargs["sophia_next_position"] = model_kwargs["sophia_next_position"] + num_new_tokens
        return model_kwargs


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    return hidden[:, logits_to_keep, :]


def _shots_of(frame_shots: Optional[torch.Tensor], offset: int, frames: int):
    """Shot ranges [(start, end), ...] of one video from its per-frame shot ids (None: one shot)."""
    if frame_shots is None:
        return [(0, frames)]
    ids = frame_shots[offset:offset + frames].tolist()
    bounds = [0] + [i for i in range(1, frames) if ids[i] != ids[i - 1]] + [frames]
    return list(zip(bounds[:-1], bounds[1:]))


def runtime_setting(config, name: str) -> float:
    """A pruning setting: the environment (`--model_kwargs '{"prune_alpha": 30}'` sets PRUNE_ALPHA) overrides the
    config, so it can change per run and at inference without touching the checkpoint."""
    value = os.environ.get(name.upper())
    return float(value) if value not in (None, "") else float(getattr(config, name))


def prune_settings(config) -> tuple:
    """(alpha, beta) in percent for this forward pass."""
    return runtime_setting(config, "prune_alpha"), runtime_setting(config, "prune_beta")


def _compact_cache(cache: DynamicCache, plan: ExtendedPlan, text_config):
    """Keep only text and level-0 tokens in the cache, rows right-aligned (left padding) for decoding."""
    keep = plan.cache_keep
    longest = max(int(k.numel()) for k in keep)
    batch = len(keep)
    device = plan.position_ids.device
    mask = torch.zeros(batch, longest, dtype=torch.long, device=device)
    index = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for b, k in enumerate(keep):
        n = int(k.numel())
        mask[b, longest - n:] = 1
        index[b, longest - n:] = k
    compact = DynamicCache(config=text_config)
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # [B, H, N_ext, D]
        gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        compact.update(torch.gather(keys, 2, gather), torch.gather(values, 2, gather), layer_idx)
    return compact, mask


AutoConfig.register("sophia", SophiaConfig)
AutoModel.register(SophiaConfig, SophiaForConditionalGeneration)
AutoModelForImageTextToText.register(SophiaConfig, SophiaForConditionalGeneration)

__all__ = ["SophiaAggregator", "SophiaModel", "SophiaForConditionalGeneration", "SophiaCausalLMOutput"]
