"""Where a video comes from: the one resolver that turns any video entry into something the decoders read.

A video arrives as a local path (absolute, or relative to the dataset file, the current folder or
``$ROOT_IMAGE_DIR``, ms-swift's rule), an ``http(s)://`` URL, a ``data:`` URL or a base64 string (the inline loader
turns those into a ``BytesIO``: ms-swift's ``load_file``, which ``import swift_sophia`` sets, see
:func:`set_inline_loader`), raw bytes, a ``{'bytes': ..., 'path': ...}`` dict (HF datasets) or a binary file object.
:func:`resolve_video_source` returns ``(source, name)``: ``source`` is a path or an in-memory file, ``name`` is what
error messages print. Used by the template (:func:`swift_sophia.video.frames.load_video`), shot detection and shot
precomputation alike.
"""
from __future__ import annotations

import io
import os
from typing import Any, Callable, Optional, Tuple, Union

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, io.IOBase]
InlineLoader = Callable[[str], io.IOBase]

_INLINE_PREFIXES = ('http://', 'https://', 'data:')
_LONGEST_NAME = 1024  # characters of a video named as given; a longer string is base64 unless it is a path
_inline_loader: Optional[InlineLoader] = None


class VideoError(ValueError):
    """A video that cannot be used, with the reason and the video's name in the message."""


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video file does not exist (message: ``video file not found: <path>``)."""


class VideoDecodeError(VideoError, RuntimeError):
    """The file exists but is not a readable video (message: ``cannot decode video <name>: ...``)."""


def describe(video) -> str:
    """A short, printable name for a video given as a path, URL, data URL, base64 string or bytes."""
    if isinstance(video, os.PathLike):
        return os.fspath(video)
    if isinstance(video, str):
        v = video.strip()
        if v.startswith('data:'):
            return f'<data URL, {len(v)} chars>'
        if len(v) > _LONGEST_NAME:  # base64, or a path no one writes: named without asking the disk which
            return f'<base64 video, {len(v)} chars>'
        return v
    if isinstance(video, (bytes, bytearray, memoryview)):
        return f'<{len(video)} bytes>'
    if isinstance(video, dict):
        return describe(video.get('path')) if video.get('path') and not video.get('bytes') else '<bytes>'
    return f'<{type(video).__name__}>'


def is_inline(video: str) -> bool:
    """Whether :func:`resolve_video_source` reads a video given as this text from the text itself (a URL to
    fetch, a data URL, base64) rather than from a file."""
    v = video.strip()
    return v.startswith(_INLINE_PREFIXES) or (len(v) > _LONGEST_NAME and not os.path.exists(v[:_LONGEST_NAME]))


def set_inline_loader(loader: Optional[InlineLoader]) -> None:
    """What reads a video given as text to fetch or decode (an ``http(s)://`` URL, a ``data:`` URL, base64) into a
    file object. ``import swift_sophia`` sets ms-swift's ``load_file`` (ms-swift's timeout and retries), so that such
    a video is read the way ms-swift reads one; None: such videos are refused."""
    global _inline_loader
    _inline_loader = loader


def resolve_video_source(video: Any, base_dir: Optional[str] = None, *, prefer_base: bool = True
                         ) -> Tuple[VideoSource, str]:
    """Turn a video entry into ``(source, name)``; ``source`` is an absolute path, bytes or a file object.

    Relative paths are looked up in ``base_dir`` (the dataset file's folder), the current folder and
    ``$ROOT_IMAGE_DIR``, ``base_dir`` first when ``prefer_base``. URLs, data URLs and base64 strings go through
    the inline loader (a ``BytesIO``, :func:`set_inline_loader`). Raises :class:`VideoNotFoundError` for a missing
    file and :class:`VideoError` for an entry that is no video at all or cannot be fetched.
    """
    if isinstance(video, dict):
        if video.get('bytes'):
            return bytes(video['bytes']), '<bytes>'
        video = video.get('path')
    if isinstance(video, (bytes, bytearray, memoryview)):
        return bytes(video), describe(video)
    if isinstance(video, io.IOBase) or (hasattr(video, 'read') and hasattr(video, 'seek')):
        return video, describe(video)
    if isinstance(video, os.PathLike):
        video = os.fspath(video)
    if not isinstance(video, str) or not video.strip():
        raise VideoError(f'unsupported video entry {type(video).__name__}: {str(video)[:80]!r}')
    v = video.strip()
    name = describe(v)
    if is_inline(v):
        if v.startswith('data:') and not v.partition(',')[2].strip():
            raise VideoDecodeError(f'video {name} is empty (its data URL holds no data)')
        if _inline_loader is None:
            raise VideoError(f'cannot read video {name}: no loader for URLs, data URLs and base64 is set')
        try:
            return _inline_loader(v), name
        except Exception as exc:  # bad base64, unreachable URL, ...
            raise VideoError(f'cannot read video {name}: {exc}' if str(exc) else
                             f'cannot read video {name}: {type(exc).__name__}') from exc
    expanded = os.path.expanduser(v)
    if os.path.isabs(expanded):
        _check_is_file(expanded, expanded)
        return expanded, expanded
    root = os.environ.get('ROOT_IMAGE_DIR')
    swift_rule = [os.path.abspath(expanded)] + ([os.path.join(root, expanded)] if root else [])
    base = [os.path.join(base_dir, expanded)] if base_dir else []
    candidates = base + swift_rule if prefer_base else swift_rule + base
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c), v
    if any(os.path.isdir(c) for c in candidates):
        raise VideoError(f'video {v} is a directory, not a video file')
    looked = ', '.join(os.path.dirname(c) or '.' for c in candidates)
    raise VideoNotFoundError(f'video file not found: {v} (looked in: {looked})')


def _check_is_file(path: str, name: str) -> None:
    if os.path.isdir(path):
        raise VideoError(f'video {name} is a directory, not a video file')
    if not os.path.isfile(path):
        raise VideoNotFoundError(f'video file not found: {name}')


def shareable(src: VideoSource) -> bool:
    """Whether several readers can read ``src`` at once, each from its own :func:`fresh_stream` (a file object
    other than ``BytesIO`` is one read position that they would move under each other)."""
    return isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview, io.BytesIO))


def fresh_stream(src: VideoSource):
    """What a decoder opens: the path itself, or a new ``BytesIO`` at position 0 over the bytes (decoders read
    from the current position and move it; the caller's file object is left where it was)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise VideoNotFoundError(f'video file not found: {path}')
        return path
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if isinstance(src, io.BytesIO):
        return io.BytesIO(src.getbuffer())
    if hasattr(src, 'read') and hasattr(src, 'seek'):
        pos = src.tell()
        src.seek(0)
        data = src.read()
        src.seek(pos)
        return io.BytesIO(data)
    raise TypeError(f'unsupported video source {type(src).__name__}')


__all__ = ['VideoSource', 'VideoError', 'VideoNotFoundError', 'VideoDecodeError', 'describe', 'is_inline',
           'set_inline_loader', 'resolve_video_source', 'fresh_stream', 'shareable']
