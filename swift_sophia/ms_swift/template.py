"""The `sophia` chat template for ms-swift: the decoder's ChatML format plus `<video>` and `<image>` tags.

A `<video>` tag becomes `<vid>` + frames x M `<VIDEO_CONTEXT>` tokens + `</vid>`: the frames' tokens are contiguous,
so that the model can place each video's hierarchy right after its level-0 frames. An `<image>` tag becomes
`<img>` + M `<IMG_CONTEXT>` tokens + `</img>` (one tile per image).

Frames per video, read once when the template is built (`init_env_args`; each variable can also be given as
`--model_kwargs '{"<lower-case name>": value}'`, which ms-swift turns into the environment variable):

1. `VIDEO_SEGMENTS=N` (InternVL's name): N frames, whatever the video's length. An explicit value wins.
2. else `FPS=r` (Qwen2.5-VL's name and meaning): `clamp(round(duration_s * r), FPS_MIN_FRAMES, FPS_MAX_FRAMES)`
   frames, never more than the video has (defaults as in ms-swift: `FPS_MIN_FRAMES=4`, `FPS_MAX_FRAMES=768`;
   e.g. `FPS=1 FPS_MAX_FRAMES=4096` takes 3,600 frames of an hour and 4,096 of two hours). A video that reports
   no frame rate gets `FPS_MAX_FRAMES` frames.
3. else the model config's `num_frames`.

The frames are spread uniformly (segment centres, :func:`swift_sophia.video.frames.sample_frame_indices`) and decoded
straight to the vision tower's input size. A value that is not a number or out of range (`VIDEO_SEGMENTS=abc`,
`FPS=-1`) raises a `ValueError` that names the variable.

Pruning settings: `resolve_runtime_settings` (configuration_sophia) applies the `PRUNE_ALPHA` / `PRUNE_BETA`
environment overrides to the config once, here; shots are computed only when pruning is on.
"""
from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Literal, Optional

import torch
from swift.template import Template, register_template
from swift.template.template_inputs import StdTemplateInputs
from swift.template.templates.utils import ChatmlTemplateMeta
from swift.template.utils import Context

from ..model.feature_cache import FeatureSlot, VideoFeatures, feature_key
from ..model.tokens import IMAGE_CONTEXT, IMAGE_END, IMAGE_START, SPECIAL_TOKENS, VIDEO_CONTEXT, VIDEO_END, VIDEO_START
from ..video.frames import FrameSampling, VideoClip, VideoError, describe, frames_to_pixel_values, load_video
from ..video.source import resolve_video_source, shareable

SOPHIA_TEMPLATE = "sophia"
_TAG = re.compile(r"<(video|image)>")


def _budget_words(budget) -> str:
    if budget == "auto":
        return ", then as many frames as the GPU memory free for the request holds"
    return f", then at most {budget} frames of each video" if budget else ""


class SophiaTemplate(Template):
    placeholder_tokens = [VIDEO_CONTEXT, IMAGE_CONTEXT]
    # Packed rows (--padding_free / --packing) work in the template and the model (tested: same loss as the padded
    # batch); ms-swift's CLI allows them only with a flash attention --attn_impl, i.e. with flash-attn installed.
    support_padding_free = True
    # ms-swift hands the model to the template (`self.model`): at inference its video feature cache
    # (feature_cache.py) lets a follow-up question about a video skip decoding, shots and the vision tower.
    use_model = True

    def init_env_args(self):
        super().init_env_args()
        if self.config is not None:
            from ..model.configuration_sophia import resolve_runtime_settings

            self.config = resolve_runtime_settings(self.config)
            if self._prunes():
                from swift.utils import get_logger

                get_logger().info_once(
                    f"[sophia] frame pruning on: {self.config.prune_alpha:g} % of each video's shots and "
                    f"{self.config.prune_beta:g} % of the frames of each kept shot are dropped by the model, after "
                    f"the vision tower{_budget_words(self.config.prune_max_frames)} (the prompt's token count "
                    "still counts every sampled frame)")
        default_frames = getattr(self.config, "num_frames", 32) if self.config is not None else 32
        self.frame_sampling = FrameSampling.from_env(default_frames)
        # the fixed frame count, None under FPS sampling (kept for callers that read it)
        self.video_segments = self.frame_sampling.num_frames
        self.stream_features = _stream_setting()

    # --------------------------------------------------------------------------------------------- tags
    @staticmethod
    def _add_default_tags(inputs: StdTemplateInputs):
        """ms-swift's fallback (a row with media but no tags gets them in front of its first message), made
        strict: a row with some tags must have exactly one tag per video and per image."""
        SophiaTemplate._check_tags(inputs)
        Template._add_default_tags(inputs)

    @staticmethod
    def _check_tags(inputs: StdTemplateInputs):
        texts = [m["content"] for m in inputs.messages if isinstance(m.get("content"), str)]
        if inputs.system:
            texts.append(inputs.system)
        for media, tag in ((inputs.videos, "<video>"), (inputs.images, "<image>")):
            tags = sum(t.count(tag) for t in texts)
            if tags and tags != len(media):
                names = ", ".join(describe(v) for v in media[:4]) or "none"
                raise ValueError(f"the sample has {tags} {tag} tag(s) but {len(media)} {tag[1:-1]}(s) "
                                 f"[{names}]; give exactly one tag per {tag[1:-1]}, or no tags at all "
                                 f"(then they are put before the first message)")

    def replace_tag(self, media_type: Literal["image", "video", "audio"], index: int,
                    inputs: StdTemplateInputs) -> List[Context]:
        tokenizer = self.tokenizer
        m = self.config.tokens_per_frame
        if media_type == "video":
            clip = inputs._sophia_clips[index]
            ids = tokenizer.convert_tokens_to_ids([VIDEO_START, VIDEO_CONTEXT, VIDEO_END])
            return [[ids[0]] + [ids[1]] * (len(clip.indices) * m) + [ids[2]], "\n"]
        if media_type == "image":
            ids = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_CONTEXT, IMAGE_END])
            return [[ids[0]] + [ids[1]] * m + [ids[2]], "\n"]
        raise ValueError(f"the sophia template does not take {media_type} inputs")

    # --------------------------------------------------------------------------------------------- encode
    def _encode(self, inputs: StdTemplateInputs) -> Dict[str, Any]:
        if inputs.audios:
            raise ValueError("the sophia template does not take audio inputs")
        if not inputs.is_multimodal:  # ms-swift checks tags only for rows with media: a tag without one is an error
            self._check_tags(inputs)
        size = self.config.vision_config.image_size[0]
        clips, slots, shots = [], [], []
        with ThreadPoolExecutor(1) as detector:  # shots found while the sampled frames decode
            for i, video in enumerate(inputs.videos):
                start = self._shots_starter(detector, shots, i)
                try:
                    clip, slot = self._load_video(video, size, start)
                except VideoError as exc:
                    raise VideoError(f"video {i} of the sample: {exc}") from exc
                clips.append(clip)
                slots.append(slot)
        inputs._sophia_clips = clips
        inputs._sophia_shots = shots
        encoded = super()._encode(inputs)
        if clips:
            dtype = self.model_info.torch_dtype
            pixels = [torch.empty((0, 3, size, size), dtype=dtype)]
            for clip in clips:  # the decoded frames go once converted: 2.4 GB at 4,096 frames of 448 px
                if clip.frames is not None:
                    pixels.append(frames_to_pixel_values(clip.frames, size, dtype))
                clip.frames = None
            encoded["pixel_values_videos"] = pixels[-1] if len(pixels) == 2 else torch.cat(pixels)
            encoded["video_frame_counts"] = torch.tensor([len(c.indices) for c in clips], dtype=torch.long)
            encoded["video_query_ids"] = self._video_queries(inputs)
            frame_shots = self._video_shots(clips, slots, shots)
            if frame_shots is not None:
                encoded["video_frame_shots"] = frame_shots
            cache = self._feature_cache()
            for slot in slots if cache is not None else ():
                if slot is not None and slot.fresh:
                    cache.put(slot.key, slot.entry)
            if any(slot is not None for slot in slots):
                encoded["video_feature_slots"] = slots
        if inputs.images:
            encoded["pixel_values"] = frames_to_pixel_values(inputs.images, size, self.model_info.torch_dtype)
        return encoded

    def _feature_cache(self):
        """The model's video feature cache, at inference and when it is on; else None."""
        if self.is_training or self.model is None:
            return None
        cache = getattr(self.model, "video_feature_cache", None)
        return cache if cache is not None and cache.enabled else None

    def _shots_starter(self, detector: ThreadPoolExecutor, shots: list, video: int):
        """With pruning on: a callback for `load_video` that starts finding video `video`'s shots in `detector`'s
        thread once its sampled frames are known (`shots[video]`: the future), while the frames decode. Sources
        one reader cannot share (file objects other than BytesIO) are left to `_video_shots`."""
        shots.append(None)
        if not self._prunes():
            return None
        from ..video.shots import sampled_shots

        def start(source, indices, total, video_hash=None):
            if shareable(source):
                shots[video] = detector.submit(sampled_shots, source, indices, total_frames=total,
                                               video_hash=video_hash)
        return start

    def _streams(self) -> bool:
        """Whether a video's features are computed while it decodes (at inference, on a GPU by default)."""
        if self.is_training or self.model is None or not hasattr(self.model, "video_feature_writer"):
            return False
        setting = getattr(self, "stream_features", None)
        if setting is not None:
            return setting
        return next(self.model.parameters()).device.type == "cuda"

    def _load_video(self, video, size: int, on_indices=None):
        """(clip, slot): the sampled frames decoded at `size`, or, when the model's feature cache holds this video
        at these settings, its frame indices only (`clip.frames` None) and the cached entry in the slot. When
        streaming (`_streams`), each chunk of frames goes through the model's vision tower as soon as it is decoded,
        while the next ones decode: the slot holds the features (`slot.fresh`) and the clip no frames."""
        cache, streams = self._feature_cache(), self._streams()
        if cache is None and not streams:
            return load_video(video, self.frame_sampling, size=size, on_indices=on_indices), None
        source, name = resolve_video_source(video)
        key = video_hash = None
        if cache is not None:
            from ..video.shot_cache import content_hash

            video_hash = content_hash(source)
            key = feature_key(video_hash, vars(self.frame_sampling), size, self.model_info.torch_dtype,
                              _active_adapter(self.model))
            entry = cache.get(key)
            if entry is not None:
                from swift.utils import get_logger

                get_logger().info(f"[sophia] video {name}: features of its {len(entry.indices)} frames reused "
                                  f"(feature cache)")
                clip = VideoClip(frames=None, indices=entry.indices, total_frames=entry.total_frames, fps=entry.fps,
                                 source=source, name=name)
                return clip, FeatureSlot(key, name, entry)
        # the shot detector reuses the content hash just computed (an inline video is hashed once)
        started = None if on_indices is None else functools.partial(on_indices, video_hash=video_hash)
        try:
            clip, features = (self._load_streamed(source, size, started) if streams else
                              (load_video(source, self.frame_sampling, size=size, on_indices=started), None))
        except VideoError as exc:  # name the video as the request gave it, not as the fetched bytes
            raise type(exc)(str(exc).replace(describe(source), name)) from exc
        clip.name = name
        entry = VideoFeatures(list(clip.indices), clip.total_frames, clip.fps)
        if features is not None:
            entry.features, entry.descriptors = features
        return clip, FeatureSlot(key, name, entry, fresh=streams)

    def _load_streamed(self, source, size: int, on_indices=None):
        """`load_video_features`: each decoded chunk of frames through the model's vision tower while the next ones
        decode."""
        from swift.utils import get_logger

        from .streamed_features import load_video_features

        get_logger().info_once("[sophia] each video's frames go through the vision tower while the video decodes "
                               "(streamed features; SOPHIA_STREAM_FEATURES=0 turns it off)")
        return load_video_features(self.model, source, self.frame_sampling, size, on_indices)

    def _video_queries(self, inputs: StdTemplateInputs) -> List[List[int]]:
        """Per video, in tag order (system prompt first, then the messages), the token ids of its pruning query:
        the text of the first user message at or after the one that holds the video (the question asked about
        it), else the holding message's own text. Content given as a list of parts counts its video parts."""
        turns = ([{"role": "system", "content": inputs.system}] if inputs.system else []) + list(inputs.messages)
        texts, videos = zip(*[_text_and_videos(turn.get("content")) for turn in turns]) if turns else ((), ())
        queries = []
        for i, (turn, count) in enumerate(zip(turns, videos)):
            if not count:
                continue
            asked = next((texts[j] for j in range(i, len(turns)) if turns[j].get("role") == "user" and texts[j]),
                         texts[i])
            ids = self.tokenizer.encode(asked, add_special_tokens=False) if asked else []
            queries.extend([ids] * count)
        if len(queries) != len(inputs.videos):
            raise ValueError(f"found {len(queries)} video tags or parts for {len(inputs.videos)} videos "
                             f"[{', '.join(describe(v) for v in inputs.videos[:4])}]")
        return queries

    def _prunes(self) -> bool:
        from ..model.configuration_sophia import prunes

        return prunes(self.config)

    def _video_shots(self, clips, slots, started) -> Optional[torch.Tensor]:
        """Per-frame shot ids of every video, concatenated; only computed when pruning is on (and kept with the
        video's cached features). `started`: per video, the future of its shots when they were started while its
        frames decoded."""
        if not self._prunes():
            return None
        from ..video.shots import sampled_shots

        ids = []
        for i, (clip, slot) in enumerate(zip(clips, slots)):
            if slot is not None and slot.entry.frame_shots is not None:
                ids.append(slot.entry.frame_shots)
                continue
            try:
                shots = started[i].result() if started[i] is not None else \
                    sampled_shots(clip.source, clip.indices, total_frames=clip.total_frames)
            except VideoError as exc:
                raise VideoError(f"video {i} of the sample: {exc}") from exc
            frame_ids = torch.zeros(len(clip.indices), dtype=torch.long)
            for shot, (start, end) in enumerate(shots):
                frame_ids[start:end] = shot
            ids.append(frame_ids)
            if slot is not None:
                slot.entry.frame_shots = frame_ids
        return torch.cat(ids)

    # --------------------------------------------------------------------------------------------- collate
    def _data_collator_mm_data(self, batch: List[Dict[str, Any]]) -> Dict[str, Any]:
        res = super()._data_collator_mm_data(batch)
        for key in ("video_frame_counts", "video_frame_shots"):
            values = [b[key] for b in batch if b.get(key) is not None]
            if values:
                res[key] = torch.cat(values)
        slots = [s for b in batch for s in (b.get("video_feature_slots") or [])]
        if slots:  # every row's videos, in order (None for a row encoded without the cache)
            res["video_feature_slots"] = [
                s for b in batch for s in b.get("video_feature_slots") or [None] * len(b.get("video_frame_counts", ()))]
        queries = []
        for b in batch:
            q = b.get("video_query_ids")
            if isinstance(q, torch.Tensor):  # a row packed and collated already (padding_free packs, then collates)
                queries += [row[keep.bool()].tolist() for row, keep in zip(q, b["video_query_mask"])]
            elif q:
                queries += list(q)
        if queries:
            longest = max(1, max(len(q) for q in queries))
            ids = torch.zeros(len(queries), longest, dtype=torch.long)
            mask = torch.zeros(len(queries), longest, dtype=torch.long)
            for i, q in enumerate(queries):
                ids[i, :len(q)] = torch.tensor(q, dtype=torch.long)
                mask[i, :len(q)] = 1
            res["video_query_ids"], res["video_query_mask"] = ids, mask
        return res


def _stream_setting() -> Optional[bool]:
    """`SOPHIA_STREAM_FEATURES`: 1 streams decoded frames through the vision tower while the video decodes, 0 does
    not; unset: on when the model is on a GPU (where the tower runs beside the decoders)."""
    raw = os.environ.get("SOPHIA_STREAM_FEATURES", "").strip().lower()
    if not raw:
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"SOPHIA_STREAM_FEATURES={raw!r} is not valid: it must be 1 or 0")


def _active_adapter(model):
    """The adapter(s) a PEFT-wrapped model runs with (they may change the projector's features), else None."""
    if not getattr(model, "peft_config", None):
        return None
    active = getattr(model, "active_adapters", None) or getattr(model, "active_adapter", None)
    active = active() if callable(active) else active
    return list(active) if isinstance(active, (list, tuple)) else active


def _text_and_videos(content) -> tuple:
    """(text without media tags, number of videos) of a message's content: a string with <video> tags, or a list of
    OpenAI-style parts."""
    if isinstance(content, str):
        return _TAG.sub("", content).strip(), content.count("<video>")
    if isinstance(content, (list, tuple)):
        text, videos = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("video", "video_url"):
                videos += 1
            elif kind == "text":
                text.append(_TAG.sub("", str(part.get("text", ""))))
                videos += str(part.get("text", "")).count("<video>")
        return " ".join(t.strip() for t in text if t.strip()), videos
    return "", 0


register_template(ChatmlTemplateMeta(SOPHIA_TEMPLATE, template_cls=SophiaTemplate, auto_add_bos=False))

__all__ = ["SophiaTemplate", "SOPHIA_TEMPLATE", "SPECIAL_TOKENS"]
