"""What `swift deploy` checks in a chat request before the model runs: its messages, its `<video>` tags, that each
video can be read, and that its frames and tokens fit the server's limits.

Each video is opened (its packet index is read, nothing is decoded) to count the frames the template will sample
from it (``VIDEO_SEGMENTS`` / ``FPS`` rules, :class:`swift_sophia.video.frames.FrameSampling`). A request is rejected
with :class:`RequestRejected` (HTTP 400), naming the video as the client gave it, when:

* it has no messages, or its `<video>` / `<image>` tags do not match its videos / images (a tag with no video at
  all included);
* a video is missing, empty, not a readable video, or has no frames; it is a directory;
* a video given inline (a data URL or base64) holds more than ``SWIFT_MAX_DOWNLOAD_SIZE_MB`` (ms-swift's cap on a
  downloaded file, which ms-swift applies to URLs while downloading; default 1024, ``0``: no limit);
* a video's frames have more than ``SOPHIA_MAX_FRAME_PIXELS`` pixels (width x height; default 8192 x 4320, the
  largest 8K frame; ``0``: no limit), found from the file's header before anything is decoded;
* its videos give more than ``REQUEST_MAX_FRAMES`` frames together (``--model_kwargs '{"request_max_frames": N}'``
  works too; unset: no frame limit);
* its video and image tokens alone exceed ``--max_length`` (ms-swift's default: the model's ``max_model_len``), or
  leave no room for one new token in ``max_model_len``. A request whose text pushes it over is stopped by
  ms-swift's own length check once it is encoded, still before the model runs.

Local files (:class:`LocalMedia`): a request may name files on the server's disk only inside the folders of
``SOPHIA_ALLOWED_MEDIA_PATH`` (``:``-separated, as vLLM's ``--allowed-local-media-path``); unset, any file when
the server listens on loopback only and none otherwise. The server checks each video and image of a request
before reading or downloading anything (:mod:`swift_sophia.ms_swift.patches.deploy_errors`).
"""
from __future__ import annotations

import io
import ipaddress
import os
import re
import socket
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from swift.template.template_inputs import StdTemplateInputs
from swift.utils import SafeMediaPath, SafeUrlFetcher, get_env_args

from ..video.frames import FrameSampling, VideoDecodeError, _env_int, _env_number, open_reader
from ..video.source import describe, is_inline, resolve_video_source

MAX_FRAMES_ENV = "REQUEST_MAX_FRAMES"
ALLOWED_MEDIA_ENV = "SOPHIA_ALLOWED_MEDIA_PATH"
MAX_VIDEO_MB_ENV = "SWIFT_MAX_DOWNLOAD_SIZE_MB"  # ms-swift's cap on a download, also applied to inline videos
MAX_FRAME_PIXELS_ENV = "SOPHIA_MAX_FRAME_PIXELS"
DEFAULT_MAX_FRAME_PIXELS = 8192 * 4320  # DCI 8K, the largest 8K frame
MB = 1024 ** 2
_DATA_URL = re.compile(r"data:[^,]*?;base64,(.*)", re.S)
_SHOWN = 4  # videos listed in a message


class RequestRejected(ValueError):
    """A request the server does not answer; ``status`` is its HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_messages(messages: Any) -> None:
    """The shape of a chat request's messages (raises ``ValueError``): ms-swift would fail later on them with
    errors such as "list index out of range"."""
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") != "system"
                                                  for m in messages):
        raise ValueError('the request has no messages: send at least one {"role": "user", "content": ...} message')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {i} of the request needs a "role" and a "content"')
        if isinstance(m["content"], list):
            for j, part in enumerate(m["content"]):
                if not isinstance(part, dict) or part.get("type") not in part:
                    raise ValueError(f'part {j} of message {i} needs a "type" and a value under that key, e.g. '
                                     f'{{"type": "video", "video": "/path/clip.mp4"}}')


def request_videos(messages: list, videos: Sequence[Any] = ()) -> List[Any]:
    """The request's videos in the template's order: the video parts of the messages, else its ``videos`` field."""
    found = StdTemplateInputs.remove_messages_media(deepcopy(messages))["videos"]
    return found or list(videos or [])


@dataclass(frozen=True)
class VideoPlan:
    name: str  # the video as the client gave it
    frames: int  # frames the template will sample


def listens_on_loopback_only(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only (``127.0.0.1``, ``::1``,
    ``localhost``); ``0.0.0.0``, ``::``, an interface's address or a name that cannot be resolved: no."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


@dataclass(frozen=True)
class LocalMedia:
    """The files on the server's disk a request may name: any (``folders`` is None), those inside ``folders``
    (real paths), or none (no folders)."""
    folders: Optional[Tuple[str, ...]]

    @classmethod
    def for_server(cls, host: str) -> "LocalMedia":
        """``SOPHIA_ALLOWED_MEDIA_PATH``'s folders (symlinks and ``..`` resolved; set but empty: none); unset,
        any file when the server listens on loopback only, none otherwise."""
        listed = get_env_args(ALLOWED_MEDIA_ENV.lower(), str, None)
        if listed is None:
            return cls(None if listens_on_loopback_only(host) else ())
        return cls(tuple(os.path.realpath(os.path.expanduser(f.strip())) for f in listed.split(":") if f.strip()))

    def check(self, media: Any) -> None:
        """Raise :class:`RequestRejected` when ``media`` (a video or image of a request as the client gave it)
        would be read from the server's disk outside the allowed folders. Only the path's text and its symlinks
        are looked at, never whether the file is there: a path outside gets the same answer either way."""
        path = _disk_path(media)
        if self.folders is None or path is None:
            return
        name = describe(media if isinstance(media, str) else path)
        if not self.folders:
            raise RequestRejected(
                f"{name} names a file on the server, and this server reads no files from its disk for a request: "
                f"give videos and images as http(s) URLs or as data URLs (data:video/mp4;base64,...). The "
                f"server's operator can allow the files inside chosen folders with "
                f"{ALLOWED_MEDIA_ENV}=/folder1:/folder2.")
        if not (os.path.isabs(path) and _inside(os.path.realpath(path), self.folders)):
            raise RequestRejected(
                f"{name} names a file outside the folders this server reads videos and images from "
                f"({ALLOWED_MEDIA_ENV}): give an absolute path inside one of them, or the video or image as an "
                f"http(s) URL or a data URL (data:video/mp4;base64,...).")

    def check_request(self, infer_request) -> None:
        """:meth:`check` for every video, image and audio of an ms-swift ``InferRequest``, in its messages and in
        its ``videos`` / ``images`` / ``audios`` fields."""
        for media in _request_media(infer_request):
            self.check(media)

    def describe(self) -> str:
        if self.folders is None:
            return "local files: any (the server listens on loopback only)"
        if not self.folders:
            return f"local files: none ({ALLOWED_MEDIA_ENV} to allow folders)"
        return f"local files: inside {', '.join(self.folders)}"


def _disk_path(media: Any) -> Optional[str]:
    """The text of ``media`` that a reader would take for a path on the server's disk, None for a URL, a data
    URL or bytes. Anything else is a path, base64 included (readers tell the two apart by asking the disk, so
    base64 must come as a data URL)."""
    if isinstance(media, dict):
        media = None if media.get("bytes") else media.get("url", media.get("path"))
    if isinstance(media, os.PathLike):
        media = os.fspath(media)
    if not isinstance(media, str):
        return None
    text = media.strip()
    return None if text.startswith("data:") or text.lower().startswith(("http://", "https://")) else text


def _inside(real_path: str, folders: Sequence[str]) -> bool:
    return any(real_path == f or real_path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _request_media(infer_request) -> Iterator[Any]:
    for message in infer_request.messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type", "") if isinstance(part, dict) else ""
            if kind.removesuffix("_url") in ("video", "image", "audio") and kind in part:
                yield part[kind]
    for field in ("videos", "images", "audios"):
        values = getattr(infer_request, field, None) or []
        yield from [values] if isinstance(values, (str, dict)) else values


@dataclass(frozen=True)
class RequestLimits:
    sampling: FrameSampling
    tokens_per_frame: int
    max_frames: Optional[int]  # REQUEST_MAX_FRAMES, None: no frame limit
    max_length: Optional[int]  # the template's --max_length
    max_model_len: Optional[int]
    max_video_bytes: int = 0  # of a video given inline, 0: no limit
    max_frame_pixels: int = 0  # 0: no limit

    @classmethod
    def from_template(cls, template, max_model_len: Optional[int]) -> "RequestLimits":
        video_mb = _env_number(MAX_VIDEO_MB_ENV.lower(), float, SafeUrlFetcher.DEFAULT_MAX_DOWNLOAD_SIZE_MB, 0,
                               "a number of MB >= 0 (0: no limit)")
        return cls(sampling=template.frame_sampling, tokens_per_frame=int(template.config.tokens_per_frame),
                   max_frames=_env_int(MAX_FRAMES_ENV.lower(), None), max_length=template.max_length,
                   max_model_len=max_model_len, max_video_bytes=int(video_mb * MB),
                   max_frame_pixels=_env_int(MAX_FRAME_PIXELS_ENV.lower(), DEFAULT_MAX_FRAME_PIXELS, minimum=0))

    def describe(self) -> str:
        frames = f"{MAX_FRAMES_ENV}={self.max_frames}" if self.max_frames else f"no {MAX_FRAMES_ENV}"
        video = f"{self.max_video_bytes / MB:g} MB" if self.max_video_bytes else "no limit"
        pixels = f"{self.max_frame_pixels:,}" if self.max_frame_pixels else "no limit"
        return (f"{self.sampling.describe()}, {frames}, --max_length {self.max_length}, "
                f"max_model_len {self.max_model_len}, one video {video} ({MAX_VIDEO_MB_ENV}), pixels of a frame "
                f"{pixels} ({MAX_FRAME_PIXELS_ENV})")


def summary(plans: Sequence[VideoPlan]) -> str:
    """``video 0 /a.mp4: 120 frames, video 1 ...`` (the first few)."""
    text = ", ".join(f"video {i} {p.name}: {p.frames} frames" for i, p in enumerate(plans[:_SHOWN]))
    return text + (f", ... ({len(plans)} videos)" if len(plans) > _SHOWN else "")


def check_request(infer_request, client_videos: Sequence[Any], limits: RequestLimits) -> List[VideoPlan]:
    """Check an ms-swift ``InferRequest`` (its media already fetched by the server) before the model runs.
    ``client_videos``: the request's videos as the client sent them, in the same order (for names). Returns each
    video's plan; raises :class:`RequestRejected`."""
    try:
        inputs = StdTemplateInputs.from_dict({"messages": infer_request.messages, "videos": infer_request.videos,
                                              "images": infer_request.images})
    except AssertionError:  # ms-swift's rule: media either as message parts or in the top-level fields
        raise RequestRejected('give the videos and images either as message parts or in the "videos" / "images" '
                              'fields of the request, not both') from None
    client = list(client_videos) if len(client_videos) == len(inputs.videos) else list(inputs.videos)
    names = [describe(v) for v in client]
    _check_tags(inputs, names)
    plans = [VideoPlan(name, _probe(i, server, given, name, limits))
             for i, (server, given, name) in enumerate(zip(inputs.videos, client, names))]
    _check_limits(plans, len(inputs.images), limits)
    return plans


def _check_tags(inputs: StdTemplateInputs, names: List[str]) -> None:
    texts = [m["content"] for m in inputs.messages if isinstance(m.get("content"), str)]
    texts += [inputs.system] if inputs.system else []
    for media, tag, shown in ((inputs.videos, "<video>", names), (inputs.images, "<image>", None)):
        tags = sum(t.count(tag) for t in texts)
        kind = tag[1:-1]
        if tags and not media:
            raise RequestRejected(f'the request has {tags} {tag} tag(s) but no {kind}: give each {kind} as a '
                                  f'{{"type": "{kind}", "{kind}": ...}} part (or in "{kind}s"), or remove the tag')
        if tags and tags != len(media):
            listed = ", ".join((shown or [describe(m) for m in media])[:_SHOWN])
            raise RequestRejected(f"the request has {tags} {tag} tag(s) but {len(media)} {kind}(s) [{listed}]; "
                                  f"give exactly one tag per {kind}, or no tags at all")


def _probe(index: int, server: Any, given: Any, name: str, limits: RequestLimits) -> int:
    """Frames the template will sample from one video; raises :class:`RequestRejected` naming it."""
    try:
        return _count_frames(server, given, name, limits)
    except RequestRejected:  # a local path refused: the same answer as where ms-swift's checks refuse it
        raise
    except ValueError as exc:  # VideoError, SafeMediaPath's refusal, the checks below
        raise RequestRejected(f"video {index} of the request: {_renamed(exc, server, name)}") from None


def _count_frames(server: Any, given: Any, name: str, limits: RequestLimits) -> int:
    if isinstance(given, str) and given.strip().startswith("data:"):
        match = _DATA_URL.match(given.strip())
        if match is None:
            raise ValueError(f"{name} is not a base64 data URL (data:video/mp4;base64,...)")
        if not match.group(1).strip():
            raise ValueError(f"video {name} is empty (its data URL holds no data)")
    if isinstance(given, str) and given == server and not given.strip().startswith(("data:", "http://", "https://")):
        SafeMediaPath.check(given)  # before looking at the file, as ms-swift does (SWIFT_MEDIA_ALLOWED_DIRS)
    _check_inline_size(server, name, limits.max_video_bytes)
    source, _ = resolve_video_source(server)
    if _size(source) == 0:
        raise ValueError(f"video {name} is empty (0 bytes)")
    try:
        reader = open_reader(source)
    except VideoDecodeError as exc:
        if "zero frames" in str(exc):
            raise ValueError(f"video {name} has zero frames") from None
        raise ValueError(f"cannot decode video {name}: not a readable video file ({exc})") from None
    _check_frame_size(reader, name, limits.max_frame_pixels)
    return min(limits.sampling.count(len(reader), reader.fps), len(reader))  # as sample_frame_indices takes them


def _check_inline_size(video: Any, name: str, max_bytes: int) -> None:
    """A video in the request itself (data URL or base64), before it is decoded: ms-swift caps a download at the
    same size while downloading it."""
    if not isinstance(video, str) or not is_inline(video) or video.strip().startswith(("http://", "https://")):
        return
    text = video.strip()
    size = len(text.partition(",")[2] if text.startswith("data:") else text) * 3 // 4
    if max_bytes and size > max_bytes:
        raise ValueError(f"video {name} holds {size / MB:.1f} MB, more than the {max_bytes / MB:g} MB this server "
                         f"takes for one video ({MAX_VIDEO_MB_ENV}): send a shorter video or one of a lower "
                         f"resolution or bitrate")


def _check_frame_size(reader, name: str, max_pixels: int) -> None:
    width, height = reader.width, reader.height
    if max_pixels and width * height > max_pixels:
        raise ValueError(f"video {name} has frames of {width}x{height} pixels ({width * height:,}), more than "
                         f"the {max_pixels:,} this server decodes ({MAX_FRAME_PIXELS_ENV}): send the video at a "
                         f"lower resolution")


def _renamed(exc: BaseException, server: Any, name: str) -> str:
    """The error's message with the server's name for the video (a downloaded copy of a URL) replaced by the
    client's."""
    text = str(exc) or type(exc).__name__
    if isinstance(server, str) and describe(server) != name:
        text = text.replace(describe(server), name)
    return text


def _size(source) -> Optional[int]:
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    if isinstance(source, io.BytesIO):
        return source.getbuffer().nbytes
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return None


def _check_limits(plans: List[VideoPlan], images: int, limits: RequestLimits) -> None:
    frames = sum(p.frames for p in plans)
    if limits.max_frames and frames > limits.max_frames:
        raise RequestRejected(f"the request's videos give {frames} frames ({summary(plans)}), more than "
                              f"{MAX_FRAMES_ENV}={limits.max_frames}, the most this server takes in one request: "
                              f"send a shorter video or fewer videos")
    m = limits.tokens_per_frame
    tokens = sum(p.frames * m + 2 for p in plans) + images * (m + 2)  # <vid> + frames x M + </vid>, per video
    bounds = []
    if limits.max_length:
        bounds.append((limits.max_length, f"this server's --max_length {limits.max_length}"))
    if limits.max_model_len:
        bounds.append((limits.max_model_len - 1, f"what the model's context (max_model_len {limits.max_model_len}) "
                                                 f"leaves for a prompt"))
    for bound, what in sorted(bounds):
        if tokens > bound:
            raise RequestRejected(f"the request's videos alone give {tokens} tokens ({summary(plans)}; {m} tokens "
                                  f"per frame), more than {what}: send a shorter video or fewer videos")


__all__ = ["MAX_FRAMES_ENV", "ALLOWED_MEDIA_ENV", "MAX_VIDEO_MB_ENV", "MAX_FRAME_PIXELS_ENV", "RequestRejected",
           "RequestLimits", "LocalMedia", "VideoPlan", "check_messages", "check_request", "listens_on_loopback_only",
           "request_videos", "summary"]
