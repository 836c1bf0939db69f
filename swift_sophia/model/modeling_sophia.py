"""Sophia: an InternVL-style VLM for hour-long videos (shot-adaptive frame pruning + hierarchical attention).

Reads top to bottom like transformers' InternVL and LLaVA modeling files (docs/architecture.md has the picture):

* helpers of the forward pass (shot ranges, the plain <-> extended sequence, the loss reduction);
* `SophiaAggregator`, the CNN that builds the frames of levels 1 .. L-1 from level 0;
* `SophiaPreTrainedModel`, the base of both models: the config class, the weight-name prefix and the
  initialisation of Sophia's own modules (for checkpoints without them);
* `SophiaModel` (what `AutoModel` gives) and its output: vision tower + projector (inherited from InternVL, run a
  chunk of frames at a time), frame pruning, aggregation, the merge into the extended sequence, and the decoder
  with hierarchical attention; it returns the hidden states of the plain sequence, so that they line up with
  `input_ids`, and a KV cache that holds only what decoding reads;
* `SophiaForConditionalGeneration` and its output: the model, the LM head and the loss (from the label positions
  only), and generation, which continues from that cache.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.models.internvl.modeling_internvl import (
    InternVLCausalLMOutputWithPast,
    InternVLModel,
    InternVLModelOutputWithPast,
    InternVLPreTrainedModel,
)
from transformers.utils import can_return_tuple, logging

from sophia_kernels import level_counts

from . import attention, liger, sequence_parallel
from .chunking import chunk_positionwise_layers, chunk_rotary_embedding
from .configuration_sophia import SophiaConfig, prunes, resolve_runtime_settings
from .extended_sequence import ExtendedPlan, VideoRun, build_extended_plan, find_video_runs
from .feature_cache import FeatureSlot, VideoFeatureCache
from .frame_budget import frame_budgets
from .frame_features import FrameFeatureWriter
from .kv_cache import PrefillCache, cache_index
from .lean_prefill import lean_prefill, supports_lean_prefill
from .pruning import FramePruner, GumbelTemperature, QueryLinear
from .value_gates import ValueGateGradient

logger = logging.get_logger(__name__)


def _has_accelerator() -> bool:
    return torch.accelerator.current_accelerator() is not None

Shot = Tuple[int, int]
HOST_FEATURES_FROM_BYTES = 4 << 30  # frame features at least this large wait in host memory (see _features_on_host)


def shots_of(frame_shots: Optional[torch.Tensor], offset: int, frames: int) -> List[Shot]:
    """Shot ranges [(start, end), ...] of one video from its per-frame shot ids (None: one shot). The ids of a
    video must be non-decreasing (each shot one contiguous range)."""
    if frame_shots is None:
        return [(0, frames)]
    ids = frame_shots[offset:offset + frames].tolist()
    if len(ids) != frames:
        raise ValueError(f"video_frame_shots has {len(ids)} ids for a video of {frames} frames")
    if any(b < a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"video_frame_shots of a video must be non-decreasing (one range per shot), got {ids}")
    bounds = [0] + [i for i in range(1, frames) if ids[i] != ids[i - 1]] + [frames]
    return list(zip(bounds[:-1], bounds[1:]))


def _plain_causal_mask(plan: ExtendedPlan, batch: int) -> torch.Tensor:
    """[B, N_ext] padding mask of the extended rows (valid tokens first), for the decoder's causal attention."""
    if len(plan.layout.seq_list()) > batch:
        raise ValueError("use_hierarchy=False (SOPHIA_HIERARCHY=0) does not take packed rows (padding_free/packing)")
    return (plan.source.view(batch, plan.length) >= 0).long()


def _release_after_first_layer(decoder: nn.Module, embeddings: torch.Tensor):
    """Inference: the decoder's input embeddings are read by its first layer only, but the decoder's forward holds
    them until it returns. Free their memory once the first layer has run (one [tokens x hidden] tensor less
    through all later layers); anything reading them afterwards fails loudly instead of reading stale values."""
    def free(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is embeddings:
            embeddings.untyped_storage().resize_(0)

    return decoder.layers[0].register_forward_hook(free, with_kwargs=True)


def _to_plain(extended: torch.Tensor, plan: ExtendedPlan, last: int = 0) -> torch.Tensor:
    """Extended-sequence hidden states [B, N_ext, D] -> plain-sequence ones [B, N, D] (zeros where a plain token
    has no extended position: padding, pruned frames); `last` > 0: only the last `last` plain positions [B, last, D]
    (a prefill that needs the next token's logits only: at an hour of video the plain sequence holds every sampled
    frame's tokens, 2.6 M at 10,000 frames)."""
    batch, hidden = extended.shape[0], extended.shape[-1]
    index = plan.plain_to_extended
    if last:
        index = index.view(batch, -1)[:, -last:].reshape(-1)
    plain = extended.reshape(-1, hidden).index_select(0, index.clamp(min=0))
    return plain.masked_fill_((index < 0).unsqueeze(-1), 0).view(batch, -1, hidden)


def _keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    return hidden[:, logits_to_keep, :]


def _reduce_token_loss(token_loss: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM reduction: the mean over target tokens, or their sum over `num_items_in_batch`."""
    if num_items_in_batch is not None:
        return token_loss.sum() / torch.as_tensor(num_items_in_batch, device=token_loss.device)
    return token_loss.sum() / (targets != -100).sum().clamp(min=1).to(token_loss.device)


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

    def forward(self, videos: List[torch.Tensor]) -> torch.Tensor:
        """videos: level-0 frames [F, M, D] of each video. Returns the aggregated frames of all videos in one
        tensor [sum of counts_1.., M, D], video after video, level 1 first (`level_counts` gives the split).

        One output tensor and, in training, a zero-weighted term of every parameter (a one-frame video reaches no
        level): DeepSpeed ZeRO-3 hooks every output tensor of a module in backward, so ranks whose videos reach
        different numbers of levels must still see the same outputs and gradients."""
        out = []
        for frames in videos:
            counts = level_counts(frames.shape[0], self.arity, self.levels)
            current = frames
            for level, count in enumerate(counts[1:]):
                x = current.permute(1, 2, 0)  # [M, D, F]: one sequence of frames per token position
                x = nn.functional.pad(x, (0, count * self.arity - current.shape[0]))
                x = nn.functional.conv1d(x, self.weight[level].to(x.dtype), self.bias[level].to(x.dtype),
                                         stride=self.arity)
                current = x.permute(2, 0, 1)  # [count, M, D]
                out.append(current)
        first = videos[0]
        levels = torch.cat(out) if out else first.new_zeros((0,) + tuple(first.shape[1:]))
        if self.training:
            levels = levels + ((self.weight.sum() + self.bias.sum()) * 0.0).to(levels.dtype)
        return levels

    def split(self, levels: torch.Tensor, kept_frames: Sequence[int]) -> List[List[torch.Tensor]]:
        """The output of `forward` per video and level."""
        out, offset = [], 0
        for frames in kept_frames:
            per_video = []
            for count in level_counts(frames, self.arity, self.levels)[1:]:
                per_video.append(levels[offset:offset + count])
                offset += count
            out.append(per_video)
        return out


class SophiaPreTrainedModel(InternVLPreTrainedModel):
    """The base of `SophiaModel` and `SophiaForConditionalGeneration` (InternVL's, with Sophia's config). Each
    model's `_no_split_modules` (`device_map="auto"`, FSDP) is gathered by transformers' `post_init` from its
    vision tower and decoder: InternVL's vision layer and whichever decoder layer the config names."""

    config: SophiaConfig
    config_class = SophiaConfig
    base_model_prefix = "model"

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers initialises the weights a checkpoint lacks through the modules that own them (for a model
        outside transformers, only those), children before parents, skipping modules whose weights were all loaded.
        A checkpoint without Sophia's modules (an InternVL one) gets their documented initialisation here: the
        aggregator averages; the pruner, whose weights its query layers and Gumbel schedule own, is a fresh pruner
        (identity query mapping, replacing the generic initialisation its layers just got; the schedule at step 0)."""
        super()._init_weights(module)
        if isinstance(module, SophiaAggregator):
            module.reset_parameters()
        elif isinstance(module, (QueryLinear, GumbelTemperature)):
            pruner = self.base_model.pruner
            pruner.reset_parameters()
            pruner.gumbel.set_step(0)


@dataclass
class SophiaModelOutputWithPast(InternVLModelOutputWithPast):
    """InternVL's output, with `last_hidden_state` over the plain sequence (aligned with `input_ids`; zeros at pruned
    frames). Set by a prefill over videos: the cache's 2-D attention mask, the next token's position per row, and
    the frames of each video that the pruner kept."""

    cache_attention_mask: Optional[torch.LongTensor] = None
    next_position_ids: Optional[torch.LongTensor] = None
    kept_frames: Optional[list] = None


class SophiaModel(SophiaPreTrainedModel, InternVLModel):
    def __init__(self, config: SophiaConfig):
        super().__init__(config)
        resolve_runtime_settings(config)
        hidden = config.text_config.hidden_size
        self.aggregator = SophiaAggregator(hidden, config.hier_arity, config.hier_levels)
        self.pruner = FramePruner(hidden)
        self.video_feature_cache = VideoFeatureCache()  # follow-up questions about a video (feature_cache.py)
        attention.install(self.language_model.config)
        chunk_positionwise_layers(self.language_model, config)
        chunk_rotary_embedding(self.language_model, config.decoder_chunk_tokens)
        if config.liger_kernel:
            if torch.cuda.is_available():
                liger.apply_liger_kernel_to_sophia(self)
            else:
                logger.warning("liger_kernel is set but there is no CUDA device: Liger's kernels stay off")

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        attention.install(self.language_model.config)  # the chosen implementation, under Sophia's routing

    # ------------------------------------------------------------------------------------------ vision
    def video_frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + pixel shuffle + projector: [F, 3, H, W] -> [F, M, D], `vision_chunk_frames` at a time.

        A frozen tower runs without autograd; a trained one recomputes each chunk in backward when there is more
        than one chunk, so memory stays that of one chunk either way.
        """
        chunk, frames = self.config.vision_chunk_frames, pixel_values.shape[0]
        if chunk <= 0 or frames <= chunk or is_deepspeed_zero3_enabled():
            return self._frame_features(pixel_values)
        recompute = self._tower_trained() and torch.is_grad_enabled()
        return torch.cat([checkpoint(self._frame_features, pixel_values[s:s + chunk], use_reentrant=False)
                          if recompute else self._frame_features(pixel_values[s:s + chunk])
                          for s in range(0, frames, chunk)])

    def _tower_trained(self) -> bool:
        return any(p.requires_grad for p in self.vision_tower.parameters())

    def _frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._tower_trained()):
            tower = self._tower_features(pixel_values)
        return self.multi_modal_projector(tower)

    def _tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What InternVL's `get_image_features` computes before the projector: [F, M, 4 C] after pixel shuffle."""
        config = self.config
        pixel_values = pixel_values.to(dtype=self.dtype)
        layer = config.vision_feature_layer
        outputs = self.vision_tower(pixel_values=pixel_values, output_hidden_states=layer != -1, return_dict=True)
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:, :]
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1)
        features = self.pixel_shuffle(features, scale_factor=config.downsample_ratio)
        return features.reshape(features.shape[0], -1, features.shape[-1])

    def placeholder_mask(self, token_id: int, input_ids, inputs_embeds) -> torch.Tensor:
        """Bool [B, N]: where the placeholder `token_id` is, from the ids or, without them, from the embeddings."""
        if input_ids is not None:
            return input_ids == token_id
        token = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token.to(inputs_embeds.dtype)).all(-1)

    def _scatter_images(self, mask: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{int(mask.sum())} image placeholder tokens but {features.shape[0]} image tiles of "
                             f"{features.shape[1]} tokens")
        return embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    # ------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        pixel_values_videos: Optional[torch.FloatTensor] = None,
        video_frame_counts: Optional[torch.LongTensor] = None,
        video_frame_shots: Optional[torch.LongTensor] = None,
        video_query_ids: Optional[torch.LongTensor] = None,
        video_query_mask: Optional[torch.LongTensor] = None,
        video_feature_slots: Optional[List[Optional[FeatureSlot]]] = None,
        **kwargs,
    ) -> SophiaModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        chunk_rotary_embedding(self.language_model, self.config.decoder_chunk_tokens)  # the setting may have changed
        if pixel_values_videos is not None:
            return self._forward_video(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                use_cache=use_cache, pixel_values_videos=pixel_values_videos, video_frame_counts=video_frame_counts,
                video_frame_shots=video_frame_shots, video_query_ids=video_query_ids,
                video_query_mask=video_query_mask, video_feature_slots=video_feature_slots, **kwargs)
        kwargs.pop("sophia_plain_last", None)  # the plain sequence is all there is: nothing to save
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        features = None
        if pixel_values is not None:
            features = self.video_frame_features(pixel_values).to(inputs_embeds.dtype)
            mask = self.placeholder_mask(self.config.image_token_id, input_ids, inputs_embeds)
            inputs_embeds = self._scatter_images(mask, inputs_embeds, features)
        if self._distributed_training():
            inputs_embeds = inputs_embeds + self._dummy_visual_pass(inputs_embeds, features)
        outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_values=past_key_values,
                                      use_cache=use_cache, return_dict=True, **kwargs)
        return SophiaModelOutputWithPast(last_hidden_state=outputs.last_hidden_state,
                                         past_key_values=outputs.past_key_values,
                                         hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                         image_hidden_states=features)

    def _forward_video(self, *, input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds,
                       use_cache, pixel_values_videos, video_frame_counts, video_frame_shots, video_query_ids,
                       video_query_mask, video_feature_slots=None, **kwargs) -> SophiaModelOutputWithPast:
        """A prefill (or training step) over videos. Every large intermediate is freed as soon as the next one
        exists, so that at hour scale the decoder runs beside the extended embeddings and little else."""
        config = self.config
        m = config.tokens_per_frame
        plain_last = kwargs.pop("sophia_plain_last", 0)  # from the LM head: only these last positions are read
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("videos can only be given in the first forward pass (prefill), not with a filled cache")
        if video_frame_counts is None:
            raise ValueError("pixel_values_videos needs video_frame_counts (frames per video)")
        counts = [int(c) for c in video_frame_counts.tolist()]
        slots = video_feature_slots or [None] * len(counts)
        if len(slots) != len(counts):
            raise ValueError(f"{len(slots)} video_feature_slots for {len(counts)} videos")
        given = sum(c for c, slot in zip(counts, slots) if not (slot is not None and slot.hit))
        if given != pixel_values_videos.shape[0]:
            raise ValueError(f"video_frame_counts sum to {given} frames to encode (besides cached ones) but "
                             f"{pixel_values_videos.shape[0]} frames were given")
        # Only the text needs token embeddings: at hour scale nearly every plain token is a video placeholder. The
        # pruning queries (when pruning is on) are embedded in the same call: one call of every module per step.
        queries = self._query_ids(video_query_ids, video_query_mask, len(counts)) if self._pruning() else []
        query_ids = torch.cat(queries) if queries else None
        if input_ids is not None:
            is_video = input_ids == config.video_token_id
            text = (~is_video).flatten().nonzero().squeeze(1)
            text_ids = input_ids.flatten()[text]
            ids = text_ids if query_ids is None else torch.cat([text_ids, query_ids.to(text_ids.device)])
            text_embeds = self.get_input_embeddings()(ids)
        else:
            is_video = self.placeholder_mask(config.video_token_id, None, inputs_embeds)
            text = (~is_video).flatten().nonzero().squeeze(1)
            text_embeds = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])[text]
            if query_ids is not None:
                text_embeds = torch.cat([text_embeds, self.get_input_embeddings()(query_ids.to(text.device))])
        query_embeds = None
        if query_ids is not None:
            text_embeds, query_embeds = text_embeds[:text.numel()], text_embeds[text.numel():]
            query_embeds = list(query_embeds.split([q.numel() for q in queries]))
        runs = find_video_runs(is_video, counts, m)

        # One pass of the vision tower over image tiles and video frames together.
        images = 0 if pixel_values is None else pixel_values.shape[0]
        pixels = pixel_values_videos if not images else torch.cat([pixel_values, pixel_values_videos.to(pixel_values)])
        descriptors = None
        on_host = not images and self._features_on_host(sum(counts), text_embeds)
        if not pixels.shape[0]:  # every video's features come from the cache
            frames = None
        elif on_host:
            frames, descriptors = self._frame_features_on_host(pixels, text_embeds.dtype)
        else:
            frames = self.video_frame_features(pixels).to(text_embeds.dtype)
        del pixels
        if images:
            mask = (text_ids == config.image_token_id if input_ids is not None
                    else self.placeholder_mask(config.image_token_id, None, text_embeds[None])[0])
            text_embeds = self._scatter_images(mask, text_embeds, frames[:images])
            frames = frames[images:]
        if any(slot is not None for slot in slots):
            frames, descriptors = self._with_cached_features(frames, descriptors, counts, slots, text_embeds, on_host)

        # 1. Shot-adaptive pruning and 2. the hierarchy of every video, in one table with the text embeddings:
        # [text embeddings; per video: kept level-0 frames, levels 1..L-1; one zero row for padding].
        table, gates = self._embedding_table(text_embeds, frames, runs, frame_shots=video_frame_shots,
                                      query_embeds=query_embeds, descriptors=descriptors)
        del frames, descriptors

        # 3. Merge into the extended sequence and run the decoder with hierarchical attention.
        plan = build_extended_plan(is_video, attention_mask, position_ids, runs, tokens_per_frame=m,
                                   arity=config.hier_arity, levels=config.hier_levels if config.use_hierarchy else 1,
                                   neighbours=config.hier_neighbours)
        batch, hidden = is_video.shape[0], text_embeds.shape[-1]
        del text_embeds
        # plan.source indexes [plain tokens (B * N); bank]; the table holds only the text of the plain tokens.
        plain_tokens = is_video.numel()
        rank = torch.full((plain_tokens,), -1, dtype=torch.long, device=text.device)
        rank[text] = torch.arange(text.numel(), device=text.device)
        source = plan.source
        source = torch.where(source < 0, table.shape[0] - 1,
                             torch.where(source < plain_tokens, rank[source.clamp(0, plain_tokens - 1)],
                                         source - plain_tokens + text.numel()))
        extended = table.index_select(0, source).view(batch, plan.length, hidden)
        attend_gates = {}
        if gates is not None:  # stage 3: the pruner's straight-through gates, on the values of the kept frames
            probe = ValueGateGradient(batch, plan.length, extended.device)
            extended = probe.attach(extended, gates.index_select(0, source).view(batch, plan.length))
            attend_gates = dict(sophia_value_gate=probe)
        del table, source, rank
        cache = cache_mask = None
        if use_cache:
            index, cache_mask = cache_index(plan.cache_keep, device=extended.device)
            cache = PrefillCache(index, config=config.text_config, kv_bits=config.kv_cache_bits)
        if self._lean(kwargs):
            hidden = lean_prefill(self.language_model, extended, plan.position_ids, plan.layout, cache,
                                  chunk=config.decoder_chunk_tokens, backend=config.attention_backend)
            return self._plain_output(hidden, plan, runs, cache=cache, cache_mask=cache_mask, last=plain_last)
        attention.install(self.language_model.config)  # whatever set the implementation since loading
        release = None
        if not torch.is_grad_enabled() and not kwargs.get("output_hidden_states", config.output_hidden_states):
            release = _release_after_first_layer(self.language_model, extended)
        if config.use_hierarchy:
            step, attend = attention.hierarchical_step(), dict(attention_mask=None, hier_layout=plan.layout,
                                                               sophia_attention_backend=config.attention_backend)
        else:  # the ablation: the decoder's own causal attention over text and kept frames
            step, attend = contextlib.nullcontext(), dict(attention_mask=_plain_causal_mask(plan, batch))
        try:
            with step:
                outputs = self.language_model(inputs_embeds=extended, position_ids=plan.position_ids,
                                              past_key_values=cache, use_cache=bool(use_cache), return_dict=True,
                                              **attend, **attend_gates, **kwargs)
        finally:
            if release is not None:
                release.remove()
        del extended

        out = self._plain_output(outputs.last_hidden_state, plan, runs, cache=cache, cache_mask=cache_mask,
                                 last=plain_last)
        out.attentions = outputs.attentions
        if outputs.hidden_states is not None:
            out.hidden_states = tuple(_to_plain(h, plan) for h in outputs.hidden_states)
        return out

    def _lean(self, decoder_kwargs) -> bool:
        """Whether this prefill runs through `lean_prefill`: inference over the hierarchy, nothing asked of the
        decoder but its last hidden states and cache, a decoder of the Llama layout, no sequence parallelism."""
        config = self.config
        return (config.lean_prefill and config.use_hierarchy and not torch.is_grad_enabled()
                and not decoder_kwargs.get("output_hidden_states", config.output_hidden_states)
                and not decoder_kwargs.get("output_attentions", False)
                and sequence_parallel.active_group() is None and supports_lean_prefill(self.language_model))

    @staticmethod
    def _plain_output(hidden, plan: ExtendedPlan, runs, cache, cache_mask, last: int = 0) -> SophiaModelOutputWithPast:
        """4. Back to the plain sequence, so that hidden states (and logits, labels) line up with input_ids."""
        out = SophiaModelOutputWithPast(last_hidden_state=_to_plain(hidden, plan, last),
                                        kept_frames=[run.kept for run in runs])
        if cache is not None:
            cache.end_prefill()
            out.past_key_values, out.cache_attention_mask = cache, cache_mask
            out.next_position_ids = plan.next_position
        return out

    def _features_on_host(self, frames: int, like: torch.Tensor) -> bool:
        """Whether the frames' features wait in host memory while the pruner chooses: at inference with pruning or a
        frame budget on a GPU, once they would take `HOST_FEATURES_FROM_BYTES` (most of an hour's features, 21 GiB
        for 10,000 frames at the 8B shape, would otherwise sit in GPU memory next to the KV cache, to be dropped).
        Below that the copies (about 0.5 s a GiB with pinning, measured at 10,000 frames) cost more than they save."""
        size = frames * self.config.tokens_per_frame * like.shape[-1] * like.element_size()
        return (not torch.is_grad_enabled() and self._pruning() and like.device.type == "cuda"
                and size >= HOST_FEATURES_FROM_BYTES)

    def _frame_features_on_host(self, pixels: torch.Tensor, dtype: torch.dtype):
        """`video_frame_features` a chunk of frames at a time, each chunk's features copied to (pinned) host memory
        and its pruning descriptors (`FramePruner.frame_descriptors`, [F, D] float32) kept on the device. Returns
        (host features [F, M, D], descriptors); the same values as computing them all on the device."""
        writer = FrameFeatureWriter(self, pixels.shape[0], dtype, on_host=True)
        writer.add(0, pixels)
        return writer.result()

    def video_feature_writer(self, frames: int) -> FrameFeatureWriter:
        """A writer of one video's frame features from chunks of its pixels (`frame_features.py`), laid out as this
        model's forward pass lays them out for a video of `frames` frames alone: `video_feature_slots` take them."""
        like = self.get_input_embeddings().weight
        with torch.no_grad():  # the rule of inference
            on_host = self._features_on_host(frames, like)
        return FrameFeatureWriter(self, frames, like.dtype, on_host=on_host)

    def _with_cached_features(self, computed, descriptors, counts, slots, like, on_host: bool):
        """Every video's frame features in order: given ones (`slot.hit`: from the cache, or computed while the video
        decoded) as they are, the others from `computed` (the frames that were encoded, in order), which are stored
        for the next question about them. Laid out as the encoded ones were: on the device, or in host memory with the
        pruner's descriptors."""
        pieces, start = [], 0
        for count, slot in zip(counts, slots):
            if slot is not None and slot.hit:
                pieces.append((slot.entry.features, slot.entry.descriptors))
                continue
            piece = computed[start:start + count]
            piece_descriptors = None if descriptors is None else descriptors[start:start + count]
            pieces.append((piece, piece_descriptors))
            start += count
            if slot is not None and not torch.is_grad_enabled():
                slot.entry.features, slot.entry.descriptors = piece, piece_descriptors
                self.video_feature_cache.put(slot.key, slot.entry)
        if not on_host:
            placed = [p.to(device=like.device, dtype=like.dtype) for p, _ in pieces]
            return (placed[0] if len(placed) == 1 else torch.cat(placed)), None
        if len(pieces) == 1 and pieces[0][1] is not None and pieces[0][0].dtype == like.dtype and \
                pieces[0][0].device.type == "cpu":  # one video already laid out for the pruner
            return pieces[0][0], pieces[0][1].to(like.device)
        total = sum(counts)
        host = torch.empty((total,) + tuple(pieces[0][0].shape[1:]), dtype=like.dtype, device="cpu",
                           pin_memory=torch.cuda.is_available())
        described = torch.empty(total, like.shape[-1], dtype=torch.float32, device=like.device)
        chunk, offset = self.config.vision_chunk_frames or total, 0
        for piece, piece_descriptors in pieces:
            n = piece.shape[0]
            host[offset:offset + n].copy_(piece)
            if piece_descriptors is None:
                for s in range(0, n, chunk):
                    part = piece[s:s + chunk].to(device=like.device, dtype=like.dtype, non_blocking=True)
                    described[offset + s:offset + s + part.shape[0]] = self.pruner.frame_descriptors(part)
            else:
                described[offset:offset + n] = piece_descriptors.to(like.device)
            offset += n
        return host, described

    def _embedding_table(self, text_embeds, frames, runs: List[VideoRun], frame_shots, query_embeds,
                         descriptors: Optional[torch.Tensor] = None):
        """Prune every video (recording the kept frames on its run), aggregate the kept frames, and stack the
        rows that `ExtendedPlan.source` indexes. The pruner's query MLP and the aggregator run once for the whole
        batch, and in training every trainable parameter of theirs takes part (a zero-weighted term where the batch
        would not reach it: a one-frame video has no level to aggregate), so that all ranks of a distributed run
        make the same calls and reduce the same gradients."""
        hidden = text_embeds.shape[-1]
        mapped, unused = self._map_queries(query_embeds, text_embeds)
        kept, gates, offset = [], [], 0
        budgets = frame_budgets(self.config, [run.frames for run in runs], text_embeds.device, frames.dtype)
        for i, (run, budget) in enumerate(zip(runs, budgets)):
            video = frames[offset:offset + run.frames]
            shots = shots_of(frame_shots, offset, run.frames)
            video, run.kept, gate = self._prune(
                video, shots, query=mapped[i] if mapped else None, budget=budget,
                descriptors=None if descriptors is None else descriptors[offset:offset + run.frames])
            video = video.to(text_embeds.device)  # the kept frames only, from host memory where they waited
            offset += run.frames
            kept.append(video)
            gates.append(gate)
            if budget is not None and not self.training:
                logger.info(f"[sophia] video {i}: {len(run.kept)} of {run.frames} frames kept (frame budget "
                            f"{budget}{', auto' if self.config.prune_max_frames == 'auto' else ''})")
        if self.training and is_deepspeed_zero3_enabled():
            kept = [video + unused.to(video.dtype) for video in kept]  # (see _dummy_visual_pass)
        if not self.config.use_hierarchy:  # the ablation: kept frames only, no aggregated levels
            if self.training:
                raise ValueError("use_hierarchy=False (SOPHIA_HIERARCHY=0) is an evaluation ablation; train with "
                                 "the hierarchy on")
            return torch.cat([text_embeds] + [video.reshape(-1, hidden) for video in kept]
                             + [text_embeds.new_zeros(1, hidden)]), None
        aggregated = self.aggregator(kept)
        if self.training:  # connected to the loss even when no video reaches a level (one-frame videos)
            unused = unused + aggregated.sum() * 0.0
        levels = self.aggregator.split(aggregated, [video.shape[0] for video in kept])
        rows = [text_embeds + unused.to(text_embeds.dtype) if self.training else text_embeds]
        for video, video_levels in zip(kept, levels):
            rows.append(video.reshape(-1, hidden))
            rows.extend(level.reshape(-1, hidden) for level in video_levels)
        rows.append(text_embeds.new_zeros(1, hidden))
        return torch.cat(rows), _value_gates(text_embeds.shape[0], kept, levels, gates)

    def _pruning(self) -> bool:
        return prunes(self.config)

    def _distributed_training(self) -> bool:
        """Training in several processes (DDP, DeepSpeed): every rank must call the same modules per step."""
        if not self.training:
            return False
        if is_deepspeed_zero3_enabled():
            return True
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @staticmethod
    def _query_ids(query_ids, query_mask, videos: int) -> List[torch.Tensor]:
        """Token ids of every video's pruning query (the user text of the turn that holds it; may be empty)."""
        out = []
        for video in range(videos):
            if query_ids is None or video >= query_ids.shape[0]:
                out.append(torch.zeros(0, dtype=torch.long))
                continue
            ids = query_ids[video]
            out.append(ids[query_mask[video].bool()] if query_mask is not None else ids)
        return out

    def _map_queries(self, query_embeds: Optional[List[torch.Tensor]], like: torch.Tensor):
        """The pruner's query MLP over all videos' queries in one call (`query_embeds` None: pruning is off).
        In training one zero token rides along, so that the MLP runs once per step and reaches its gradients
        whatever the batch holds, pruning on or off (ranks of a distributed run must make the same calls and
        reduce the same gradients); returns (mapped queries per video or None, the zero-weighted term to add)."""
        unused = like.new_zeros(())
        parts = list(query_embeds or []) + ([like.new_zeros(1, like.shape[-1])] if self.training else [])
        if not sum(p.shape[0] for p in parts):
            return (None if query_embeds is None else [None] * len(query_embeds)), unused
        mapped = self.pruner.map_query(torch.cat(parts))
        if self.training:
            unused = mapped[-1].sum() * 0.0
            mapped = mapped[:-1]
        if query_embeds is None:
            return None, unused
        return [m if m.shape[0] else None for m in mapped.split([q.shape[0] for q in query_embeds])], unused

    def _dummy_visual_pass(self, embeds, features=None):
        """A training batch without video in a multi-process run still calls, in the order a video batch does,
        the vision tower (unless images did), the pruner's query MLP and the aggregation CNN, on blank input, and
        adds nothing: every rank makes the same module calls (ZeRO-3 gathers weights per call) and reduces the
        same gradients (DDP, ZeRO-2)."""
        if features is None:
            size = self.config.vision_config.image_size
            pixels = torch.zeros(1, 3, size[0], size[1], device=embeds.device, dtype=embeds.dtype)
            features = self.video_frame_features(pixels).to(embeds.dtype)
        video = features[:1]
        unused = self._map_queries([] if self._pruning() else None, embeds.reshape(-1, embeds.shape[-1]))[1]
        frames = video.expand(self.config.hier_arity, -1, -1)
        if is_deepspeed_zero3_enabled():
            # ZeRO-3 gathers a module's weights again for its backward, so the aggregator's backward must run on
            # every rank or on none: its input depends on the query MLP here as it does on a rank whose videos
            # are pruned with gradients (stage 3), and in the video path (above) on every rank.
            frames = frames + unused.to(frames.dtype)
        levels = self.aggregator([frames])
        return (video.sum() + levels.sum() + unused) * 0.0

    def _prune(self, video: torch.Tensor, shots: Sequence[Shot], query, budget: Optional[int] = None,
               descriptors: Optional[torch.Tensor] = None):
        alpha, beta = self.config.prune_alpha, self.config.prune_beta
        if alpha <= 0 and beta <= 0 and (budget is None or video.shape[0] <= budget):
            return video, list(range(video.shape[0])), None
        tau = self.pruner.temperature(self.config) if self.training else None
        selection = self.pruner.select(video, shots, query, alpha=alpha, beta=beta, tau=tau, query_mapped=True,
                                       max_frames=budget, descriptors=descriptors)
        kept = video[selection.keep.to(video.device)]
        gate = selection.gate if tau is not None and selection.gate.requires_grad else None
        return kept, selection.keep.tolist(), gate


def _value_gates(text_rows: int, kept, levels, gates) -> Optional[torch.Tensor]:
    """One gate per row of the embedding table (`_embedding_table`), or None when no video was pruned with
    straight-through gates: a kept frame's M rows carry its shot's gate, every other row (text, aggregated levels,
    padding) a constant 1."""
    if all(gate is None for gate in gates):
        return None
    like = next(gate for gate in gates if gate is not None)
    rows = [like.new_ones(text_rows)]
    for video, video_levels, gate in zip(kept, levels, gates):
        frames, tokens = video.shape[:2]
        rows.append(gate[:, None].expand(frames, tokens).reshape(-1) if gate is not None
                    else like.new_ones(frames * tokens))
        rows.extend(like.new_ones(level.numel() // level.shape[-1]) for level in video_levels)
    rows.append(like.new_ones(1))
    return torch.cat(rows)


@dataclass
class SophiaCausalLMOutput(InternVLCausalLMOutputWithPast):
    """InternVL's causal-LM output, with `SophiaModelOutputWithPast`'s prefill fields and `token_loss`: [B, N]
    cross-entropy per position (0 where there is no target), with labels."""

    cache_attention_mask: Optional[torch.LongTensor] = None
    next_position_ids: Optional[torch.LongTensor] = None
    kept_frames: Optional[list] = None
    token_loss: Optional[torch.FloatTensor] = None


class SophiaForConditionalGeneration(SophiaPreTrainedModel, GenerationMixin):
    """`SophiaModel` with the LM head, as transformers' `InternVLForConditionalGeneration` has `InternVLModel` (same
    weight names: `model.*`, `lm_head`)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: SophiaConfig):
        super().__init__(config)
        self.model = SophiaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs):
        """InternVL's image features of `pixel_values` (vision tower, pixel shuffle, projector)."""
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        attention.install(self.model.language_model.config)

    @property
    def video_feature_cache(self) -> VideoFeatureCache:
        return self.model.video_feature_cache

    def video_feature_writer(self, frames: int) -> FrameFeatureWriter:
        return self.model.video_feature_writer(frames)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        if self.config.offload_checkpoints:
            if "offload" not in inspect.signature(super().gradient_checkpointing_enable).parameters:
                raise RuntimeError(f"offload_checkpoints needs a transformers whose gradient_checkpointing_enable "
                                   f"takes `offload` (this is {transformers.__version__})")
            if _has_accelerator():
                kwargs.setdefault("offload", True)
            else:  # the activations already live in host memory, and pinning them needs an accelerator
                logger.warning_once("offload_checkpoints has no effect without a GPU: the checkpoints are in host "
                                    "memory already")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    @can_return_tuple
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
        video_feature_slots: Optional[List[Optional[FeatureSlot]]] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        **kwargs,
    ) -> SophiaCausalLMOutput:
        r"""With `labels` (or `shift_labels`) and no `logits_to_keep`, the LM head runs on the label positions only
        (no [tokens x vocab] tensor); the loss is the usual shifted cross-entropy, and `token_loss` holds it per
        position. The logits are then returned in eval mode (all positions, as a plain causal LM gives them) and not
        in training (`logits=None`, as Liger-Kernel's fused loss does).

        shift_labels (`torch.LongTensor` [B, N], -100 where there is none): the token each position predicts, already
        shifted, as transformers' causal LMs take them (context or sequence parallelism: this rank's slice of the
        labels); used instead of shifting `labels`."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is None and shift_labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            kwargs["sophia_plain_last"] = logits_to_keep
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, pixel_values_videos=pixel_values_videos,
                             video_frame_counts=video_frame_counts, video_frame_shots=video_frame_shots,
                             video_query_ids=video_query_ids, video_query_mask=video_query_mask,
                             video_feature_slots=video_feature_slots, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        loss = token_loss = None
        if (labels is not None or shift_labels is not None) and isinstance(logits_to_keep, int) and not logits_to_keep:
            if shift_labels is None:
                shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
            token_loss = self.token_cross_entropy(hidden, shift_labels)
            loss = _reduce_token_loss(token_loss, shift_labels, num_items_in_batch)
            logits = None if self.training else self.lm_head(hidden)
        else:
            logits = self.lm_head(_keep(hidden, logits_to_keep))
            if labels is not None or shift_labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                          num_items_in_batch=num_items_in_batch,
                                          shift_labels=None if shift_labels is None else shift_labels.contiguous())
        return SophiaCausalLMOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                    image_hidden_states=outputs.image_hidden_states,
                                    cache_attention_mask=outputs.cache_attention_mask,
                                    next_position_ids=outputs.next_position_ids, kept_frames=outputs.kept_frames,
                                    token_loss=token_loss)

    def token_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, N] float32 cross-entropy of each position's target (0 where it is -100), with the LM head applied
        only where there is a target."""
        targets = targets.to(hidden.device)
        where = targets != -100
        loss = hidden.new_zeros(targets.shape, dtype=torch.float32)
        logits = self.lm_head(hidden[where]).float()
        return loss.index_put((where,), nn.functional.cross_entropy(logits, targets[where], reduction="none"))

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
                        "video_query_ids", "video_query_mask", "video_feature_slots"):
                model_inputs.pop(key, None)
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        cache_mask = getattr(outputs, "cache_attention_mask", None)
        if cache_mask is not None:
            # The prefill kept only text and level-0 tokens in the cache: from now on the attention mask
            # describes that cache and positions continue from the plain sequence.
            model_kwargs["attention_mask"] = torch.cat(
                [cache_mask, cache_mask.new_ones((cache_mask.shape[0], num_new_tokens))], dim=-1)
            model_kwargs["sophia_next_position"] = outputs.next_position_ids
            model_kwargs.pop("position_ids", None)
        elif model_kwargs.get("sophia_next_position") is not None:
            model_kwargs["sophia_next_position"] = model_kwargs["sophia_next_position"] + num_new_tokens
        return model_kwargs


AutoConfig.register("sophia", SophiaConfig)
AutoModel.register(SophiaConfig, SophiaModel)
AutoModelForImageTextToText.register(SophiaConfig, SophiaForConditionalGeneration)

__all__ = ["SophiaAggregator", "SophiaPreTrainedModel", "SophiaModel", "SophiaForConditionalGeneration",
           "SophiaModelOutputWithPast", "SophiaCausalLMOutput", "VideoRun"]
