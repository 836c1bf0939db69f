"""Video frames for Sophia: how many frames a video gives, which ones, and decoding them.

How many (:class:`FrameSampling`, the template reads it once from the environment, see
:meth:`FrameSampling.from_env`): ``VIDEO_SEGMENTS`` frames when set; else, when ``FPS`` is set,
``clamp(round(duration * FPS), FPS_MIN_FRAMES, FPS_MAX_FRAMES)`` frames (never more than the video has); else the
model config's ``num_frames``. Which ones: uniformly spread, at segment centres (InternVL's rule,
:func:`sample_frame_indices`); every frame once when the video has no more frames than asked for.

Decoding (:func:`open_reader`, :func:`decode_frames`): PyAV, with frame threading, seeking to the keyframe before
a sampled frame only when that skips decoding (``benchmarks/bench_video_decode.py`` measured it against decord);
decord when PyAV cannot open the file. Frame ``i`` is the ``i``-th frame in presentation order for both (the
same numbering as decord's ``VideoReader``, which the shot cache and older releases use; tested equal). The
template asks for the vision tower's square input size: frames are decoded at full size a chunk at a time (64
frames, fewer above 1080p: at most 398 MB of full-size RGB) and resized with torch's antialiased bicubic on uint8
(:func:`decode_resized`), which keeps 4,096 frames of a 720p video at 2.5 GB instead of 11 GB of full-size RGB
and, unlike swscale's single-threaded bicubic, is vectorised and uses every core.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass
from io import BytesIO
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .pyav_runs import RunDecodeError, decode_run
from .source import (
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
    VideoSource,
    describe,
    fresh_stream,
    resolve_video_source,
    shareable,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FPS_MIN_FRAMES = 4  # ms-swift / qwen_vl_utils defaults
DEFAULT_FPS_MAX_FRAMES = 768


# ------------------------------------------------------------------------------------------------ how many frames
def _env_number(name: str, kind, default, minimum, what: str):
    """The environment variable ``NAME`` (``name`` upper-cased) as ``kind``, ``default`` when it is unset, read as
    ms-swift's ``get_env_args`` reads it (ms-swift sets it from ``--model_kwargs '{"<name>": ...}'``, as for its own
    templates), with an error that names the variable and says what it accepts."""
    text = os.environ.get(name.upper())
    try:
        value = default if text is None else kind(text)
    except (TypeError, ValueError):
        raise ValueError(f'{name.upper()}={os.environ.get(name.upper())!r} is not valid: it must be {what} '
                         f'(set it with the environment variable or --model_kwargs \'{{"{name}": ...}}\')') from None
    if value is not None and (not math.isfinite(value) or value < minimum):
        raise ValueError(f'{name.upper()}={os.environ.get(name.upper(), value)!r} is not valid: it must be {what}')
    return value


def _env_int(name, default, minimum=1):
    return _env_number(name, int, default, minimum, f'an integer >= {minimum}')


@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take from a video: a fixed count (``num_frames``) or a rate (``fps``) with bounds."""
    num_frames: Optional[int] = 32
    fps: Optional[float] = None
    min_frames: int = DEFAULT_FPS_MIN_FRAMES
    max_frames: int = DEFAULT_FPS_MAX_FRAMES

    def __post_init__(self):
        if self.fps is None and (self.num_frames is None or self.num_frames < 1):
            raise ValueError(f'num_frames must be >= 1, got {self.num_frames}')
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f'fps must be > 0, got {self.fps}')
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f'need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}')

    @classmethod
    def from_env(cls, default_frames: int = 32) -> 'FrameSampling':
        """``VIDEO_SEGMENTS`` wins; else ``FPS`` (with ``FPS_MIN_FRAMES``, ``FPS_MAX_FRAMES``); else
        ``default_frames`` (the model config's ``num_frames``). Each is also ``--model_kwargs``' lower-case key.
        A value that is not a number, or out of range, raises a ``ValueError`` naming the variable."""
        segments = _env_int('video_segments', None)
        fps = _env_number('fps', float, None, 0, 'a number > 0 (frames per second of video)') \
            if segments is None else None
        if fps is not None and fps <= 0:
            raise ValueError(f'FPS={os.environ.get("FPS")!r} is not valid: it must be a number > 0')
        if fps is None:
            return cls(num_frames=segments if segments is not None else default_frames)
        lo = _env_int('fps_min_frames', DEFAULT_FPS_MIN_FRAMES)
        hi = _env_int('fps_max_frames', DEFAULT_FPS_MAX_FRAMES)
        if hi < lo:
            raise ValueError(f'FPS_MAX_FRAMES={hi} is below FPS_MIN_FRAMES={lo}')
        return cls(num_frames=None, fps=fps, min_frames=lo, max_frames=hi)

    def count(self, total_frames: int, video_fps: float) -> int:
        """Frames to sample from a video of ``total_frames`` frames at ``video_fps``."""
        if self.fps is None:
            return int(self.num_frames)
        if not video_fps or video_fps <= 0 or not math.isfinite(video_fps):
            logger.warning('the video reports no frame rate: FPS sampling takes FPS_MAX_FRAMES=%d frames',
                           self.max_frames)
            n = self.max_frames
        else:
            n = min(max(int(round(total_frames / video_fps * self.fps)), self.min_frames), self.max_frames)
        return max(1, min(n, total_frames))

    def describe(self) -> str:
        if self.fps is None:
            return f'{self.num_frames} frames per video'
        return f'{self.fps:g} frames per second, {self.min_frames}..{self.max_frames} frames per video'


def sample_frame_indices(total_frames: int, num_frames: int) -> List[int]:
    """Uniform segment-centre sampling; every frame once when the video has no more than `num_frames`."""
    if total_frames <= 0:
        raise VideoError("the video has no frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    seg = total_frames / num_frames
    return [min(total_frames - 1, max(0, int(round((i + 0.5) * seg - 0.5)))) for i in range(num_frames)]


# ------------------------------------------------------------------------------------------------------- readers
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PyAVReader:
    """Frames by presentation-order index, with PyAV. Opening reads the packet index (no decoding): every
    packet's timestamp, sorted (frame ``i`` has the ``i``-th smallest), and the keyframes'.

    :meth:`get` decodes forward through the file and converts only the wanted frames; it seeks to the
    keyframe before the next wanted frame when that keyframe lies beyond the current position (decoding the
    frames in between would be wasted). ``num_threads=0``: FFmpeg's automatic thread count, frame threading.
    ``segments`` > 1: the wanted frames are split into that many runs of consecutive ones, each decoded by its own
    demuxer and decoder in a thread (PyAV releases the GIL while FFmpeg decodes and converts), so that a long file
    is decoded by several decoders at once; the same frames (each run starts at the keyframe before its first
    frame). ``segments=0``: ``SOPHIA_DECODE_SEGMENTS``, else one per 4 cores, for at least 64 frames a run.
    """
    backend = 'pyav'

    def __init__(self, src: VideoSource, num_threads: int = 0, segments: int = 0):
        import av
        from av.video.reformatter import VideoReformatter

        self._src = src
        self.num_threads = int(num_threads)
        self.segments = int(segments)
        # one scaler for every frame: a frame's own (`frame.to_ndarray(width=...)`) builds its filters anew each
        # time, 1.9 ms a frame to 96x54 against 0.33 ms
        self._reformatter = VideoReformatter()
        with av.open(fresh_stream(src)) as container:
            if not container.streams.video:
                raise VideoDecodeError('no video stream')
            stream = container.streams.video[0]
            pts, keys = [], []
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(int(packet.pts))
                if packet.is_keyframe:
                    keys.append(int(packet.pts))
            rate = stream.average_rate or stream.guessed_rate or 0
            self.fps = float(rate) if rate else 0.0
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
        self.pts = sorted(pts)
        self.keys = sorted(keys) or self.pts[:1]

    def __len__(self) -> int:
        return len(self.pts)

    def worker(self, runs: int) -> 'PyAVReader':
        """A reader of the same file for one of `runs` threads decoding at once: the same packet index, its own
        frame converter, one decoder with this reader's threads or its share of the cores."""
        from av.video.reformatter import VideoReformatter

        other = copy.copy(self)
        other._reformatter, other.segments = VideoReformatter(), 1
        other.num_threads = self.threads_per_run(runs)
        return other

    def threads_per_run(self, runs: int) -> int:
        """Decoder threads of each of `runs` decoders at once: this reader's, else its share of the cores."""
        return self.num_threads or max(1, (os.cpu_count() or 1) // runs)

    @property
    def parallel(self) -> bool:
        """Whether several decoders can read the source at once."""
        return shareable(self._src)

    def get(self, indices: Sequence[int], size: Optional[Tuple[int, int]] = None,
            interpolation: str = 'BICUBIC') -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]`` RGB; ``size=(W, H)`` scales with swscale (``interpolation``)."""
        idx = [int(i) for i in indices]
        n = len(self.pts)
        if any(i < 0 or i >= n for i in idx):
            raise IndexError(f'frame index out of range for a video of {n} frames')
        w, h = size if size is not None else (self.width, self.height)
        out = np.empty((len(idx), h, w, 3), np.uint8)
        if not idx:
            return out
        wanted = sorted(set(idx))
        where = {i: [] for i in wanted}
        for k, i in enumerate(idx):
            where[i].append(k)
        fmt = dict(format='rgb24')
        if size is not None and (w, h) != (self.width, self.height):
            fmt.update(width=w, height=h, interpolation=interpolation)
        runs = decode_segments(len(wanted), self.segments) if self.parallel else 1
        if runs == 1:
            self._decode_run(wanted, where, out, fmt)
            return out
        workers = [(part, self.worker(runs)) for part in _split(wanted, runs)]
        _in_threads([lambda p=part, w=worker: w._decode_run(p, where, out, fmt) for part, worker in workers])
        return out

    def _decode_run(self, wanted: List[int], where, out: np.ndarray, fmt: dict) -> None:
        """Decode the sorted frame indices `wanted` with a demuxer and decoder of their own into `out`'s rows."""
        def emit(k, arr):
            for row in where[wanted[k]]:
                out[row] = arr

        try:
            decode_run(fresh_stream(self._src), [self.pts[i] for i in wanted], self.keys, emit, fmt,
                       self._reformatter, self.num_threads)
        except RunDecodeError as exc:
            raise VideoDecodeError(str(exc)) from None


SEGMENT_MIN_FRAMES = 64


def _split(items: Sequence, parts: int) -> List[Sequence]:
    bounds = [round(k * len(items) / parts) for k in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def _in_threads(jobs) -> None:
    """Run the callables `jobs` in threads of their own; the first error is raised once all have ended."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
    for future in futures:
        future.result()


def decode_segments(frames: int, segments: int = 0) -> int:
    """Decoders that decode `frames` wanted frames at once: `segments` when > 0, else `SOPHIA_DECODE_SEGMENTS`, else
    one per 4 cores (at most 8); never more than one per `SEGMENT_MIN_FRAMES` frames."""
    if segments <= 0:
        raw = os.environ.get('SOPHIA_DECODE_SEGMENTS', '').strip()
        if raw:
            try:
                segments = int(raw)
            except ValueError:
                raise ValueError(f'SOPHIA_DECODE_SEGMENTS={raw!r} is not valid: it must be an integer >= 1') from None
            if segments < 1:
                raise ValueError(f'SOPHIA_DECODE_SEGMENTS={raw!r} is not valid: it must be an integer >= 1')
        else:
            segments = min(8, max(1, (os.cpu_count() or 1) // 4))
    return max(1, min(segments, frames // SEGMENT_MIN_FRAMES))


class DecordReader:
    """Frames by index with decord's ``VideoReader.get_batch``; ``size=(W, H)`` uses decord's scaler, which
    works only for widths that are multiples of 32 (others: decoded at full size, then resized with torch)."""
    backend = 'decord'

    def __init__(self, src: VideoSource, num_threads: int = 1, size: Optional[Tuple[int, int]] = None):
        import decord
        kw = {} if size is None else dict(width=size[0], height=size[1])
        self.scaled = size is not None
        try:
            self._vr = decord.VideoReader(fresh_stream(src), ctx=decord.cpu(0), num_threads=num_threads, **kw)
        except (VideoNotFoundError, TypeError):
            raise
        except Exception:
            if size is None:
                raise
            self._vr = decord.VideoReader(fresh_stream(src), ctx=decord.cpu(0), num_threads=num_threads)
            self.scaled = False
        self._size = size
        self.fps = float(self._vr.get_avg_fps() or 0.0)
        self._shape: Optional[Tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self._vr)

    @property
    def width(self) -> int:
        return self._frame_shape()[1]

    @property
    def height(self) -> int:
        return self._frame_shape()[0]

    def _frame_shape(self) -> Tuple[int, ...]:
        if self._shape is None:  # decord tells a frame's size only by decoding one
            self._shape = tuple(self._vr[0].shape)
        return self._shape

    def get(self, indices: Sequence[int], size: Optional[Tuple[int, int]] = None, interpolation: str = 'AREA'
            ) -> np.ndarray:
        idx = [int(i) for i in indices]
        n = len(self._vr)
        if any(i < 0 or i >= n for i in idx):
            raise IndexError(f'frame index out of range for a video of {n} frames')
        frames = self._vr.get_batch(idx).asnumpy() if idx else np.zeros((0, 1, 1, 3), np.uint8)
        if size is not None and tuple(frames.shape[1:3]) != (size[1], size[0]) and len(frames):
            frames = resize_frames(frames, size)
        return frames


def resize_frames(frames: np.ndarray, size: Tuple[int, int], mode: str = 'area') -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> uint8 ``[F, size[1], size[0], 3]``: ``mode`` 'area' (the shot detector's small
    frames) or 'bicubic' (antialiased, on uint8 in channels-last layout: torch's vectorised path, which uses every
    core; the vision tower's input)."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # channels-last view
    if mode == 'bicubic':
        t = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode='bicubic', align_corners=False,
                                            antialias=True)
        return t.permute(0, 2, 3, 1).contiguous().numpy()
    t = torch.nn.functional.interpolate(t.float(), size=(size[1], size[0]), mode=mode)
    return t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


RESIZE_CHUNK_FRAMES = 64
RESIZE_CHUNK_BYTES = RESIZE_CHUNK_FRAMES * 1920 * 1080 * 3  # 64 full-size RGB frames of 1080p, 398 MB


def resize_chunk_frames(width: int, height: int) -> int:
    """Frames decoded at full size at a time: ``RESIZE_CHUNK_FRAMES``, fewer where their RGB would exceed
    ``RESIZE_CHUNK_BYTES`` (16 frames of 4K, 4 of 8K)."""
    return max(1, min(RESIZE_CHUNK_FRAMES, RESIZE_CHUNK_BYTES // max(1, width * height * 3)))


def decode_resized(reader, indices: Sequence[int], size: Tuple[int, int], *,
                   src: Optional[VideoSource] = None) -> np.ndarray:
    """The frames at ``size``: decoded at full size a chunk at a time (:func:`resize_chunk_frames`) and resized
    with torch's antialiased bicubic, frame by frame the same bits whatever the chunk. Memory stays that of the
    output plus a chunk per decoder. (Decoding straight to the size with swscale's bicubic runs on one core: 17.7 of
    31.4 s for 3,600 frames of an hour of 360p on 16 cores, more than the decoding itself; docs/benchmarks.md.)"""
    out = np.empty((len(indices), size[1], size[0], 3), np.uint8)
    for start, part in iter_resized(reader, indices, size, src=src):
        out[start:start + len(part)] = part
    return out


def iter_resized(reader, indices: Sequence[int], size: Tuple[int, int], *,
                 src: Optional[VideoSource] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """:func:`decode_resized`'s frames a chunk at a time, as they decode: ``(first position in indices, uint8
    [n, H, W, 3])``, every position once. Several PyAV decoders (:func:`decode_segments`) each decode a run of whole
    chunks in a thread of their own; their chunks come in the order they are ready. A caller that stops early stops
    the decoders after their current chunk; a decoder's error is raised here."""
    chunk = resize_chunk_frames(reader.width, reader.height)

    def decode_chunk(run_reader, start: int, stop: int) -> np.ndarray:
        part = decode_frames(run_reader, indices[start:stop], None, src=src)
        same = tuple(part.shape[1:3]) == (size[1], size[0])
        return part if same else resize_frames(part, size, mode='bicubic')

    chunks = range(0, len(indices), chunk)
    runs = decode_segments(len(indices)) if isinstance(reader, PyAVReader) and reader.parallel else 1
    runs = min(runs, len(chunks))
    if runs <= 1:
        for start in chunks:
            yield start, decode_chunk(reader, start, min(start + chunk, len(indices)))
        return
    # Runs of whole chunks: chunk k holds positions [k * chunk, (k + 1) * chunk) whatever the number of decoders.
    ready: 'queue.SimpleQueue' = queue.SimpleQueue()
    stop = threading.Event()

    def decode_run_of_chunks(run_reader, run: range) -> None:
        try:
            for start in run:
                if stop.is_set():
                    return
                ready.put((start, decode_chunk(run_reader, start, min(start + chunk, len(indices)))))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(exc)
        finally:
            ready.put(None)

    threads = [threading.Thread(target=decode_run_of_chunks, args=(reader.worker(runs), run), daemon=True)
               for run in _split(chunks, runs)]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = ready.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def open_reader(src: VideoSource, *, backend: str = 'auto', num_threads: int = 0):
    """A reader (``len(reader)``, ``reader.fps``, ``reader.get(indices, size)``) for a resolved source.

    ``backend='auto'``: PyAV, else decord when PyAV cannot open the file. Raises :class:`VideoNotFoundError`
    or :class:`VideoDecodeError` (the file is not a readable video)."""
    errors = []
    order = {'auto': ('pyav', 'decord'), 'pyav': ('pyav',), 'decord': ('decord',)}[backend]
    for name in order:
        try:
            reader = PyAVReader(src, num_threads) if name == 'pyav' else DecordReader(src, num_threads or 1)
            if len(reader) == 0:
                raise VideoDecodeError('the video has zero frames')
            return reader
        except (VideoNotFoundError, TypeError):
            raise
        except Exception as exc:  # noqa: BLE001 - PyAV / decord raise many types
            errors.append(f'{name}: {_first_line(exc)}')
    raise VideoDecodeError('; '.join(errors))


def decode_frames(reader, indices: Sequence[int], size: Optional[Tuple[int, int]] = None, *,
                  src: Optional[VideoSource] = None) -> np.ndarray:
    """``reader.get(indices, size)``; when the reader is decord's and it fails on the file (it cannot copy
    frames of videos 48 or 72 pixels wide: "DECORDArrayCopyFromTo: The size must exactly match"), PyAV decodes
    the same frames instead (``src`` is needed for that)."""
    try:
        return reader.get(indices, size)
    except IndexError:
        raise
    except Exception as exc:  # noqa: BLE001
        if getattr(reader, 'backend', None) != 'decord' or src is None:
            raise
        logger.info('decord cannot decode %s (%s); decoding with PyAV', describe(src), _first_line(exc))
        fallback = PyAVReader(src)
        if len(fallback) != len(reader):
            raise VideoDecodeError(f'decord failed ({_first_line(exc)}) and PyAV counts {len(fallback)} frames, '
                                   f'not {len(reader)}') from exc
        return fallback.get(indices, size)


def video_info(src: VideoSource) -> Tuple[int, float]:
    """``(number of frames, average fps)`` of a resolved source."""
    reader = open_reader(src)
    return len(reader), reader.fps


# --------------------------------------------------------------------------------------------------- the clip
@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 [F, H, W, 3], the sampled frames
    indices: List[int]  # their indices in the video
    total_frames: int
    fps: float
    source: Union[str, bytes, BytesIO]  # what was decoded (a path, or the bytes of a URL / base64 video)
    name: str  # for messages


def load_video(video, sampling: Union[int, FrameSampling], *, size: Optional[int] = None,
               num_threads: int = 0, on_indices=None,
               on_frames: Optional[Callable[[int, np.ndarray], None]] = None) -> VideoClip:
    """Decode the sampled frames of a video (path, URL, data URL, base64, bytes). ``sampling``: a frame count
    or a :class:`FrameSampling`. ``size``: frames at ``size x size`` (the vision tower's input; decoded a chunk
    at a time and resized with torch's antialiased bicubic, :func:`decode_resized`), else full size. Raises
    :class:`VideoError` naming the video on any problem. ``on_indices(source, indices, total_frames)`` is called
    once the sampled frames are known, before they are decoded (the template starts the shot detector then).
    ``on_frames(start, frames)`` (needs ``size``): each chunk of frames is handed to it as soon as it is decoded
    (:func:`iter_resized`), in this thread, and not kept (``clip.frames`` is None); its own errors pass through."""
    if not isinstance(sampling, FrameSampling):
        sampling = FrameSampling(num_frames=int(sampling))
    if on_frames is not None and size is None:
        raise ValueError('load_video(on_frames=...) needs size')
    source, name = resolve_video_source(video)
    try:
        reader = open_reader(source, num_threads=num_threads)
    except VideoNotFoundError:
        raise
    except VideoDecodeError as exc:
        if 'zero frames' in str(exc):
            raise VideoDecodeError(f'video {name} has zero frames') from exc
        raise VideoDecodeError(f'cannot decode video {name}: not a readable video file ({exc})') from exc
    total = len(reader)
    indices = sample_frame_indices(total, sampling.count(total, reader.fps))
    if on_indices is not None:
        on_indices(source, indices, total)

    def cannot_decode(exc: BaseException) -> VideoDecodeError:
        return VideoDecodeError(f'cannot decode frames {indices[0]}..{indices[-1]} of video {name}: '
                                f'{_first_line(exc)}')

    frames = None
    if on_frames is None:
        try:
            frames = (decode_frames(reader, indices, None, src=source) if size is None
                      else decode_resized(reader, indices, (int(size), int(size)), src=source))
        except Exception as exc:  # noqa: BLE001
            raise cannot_decode(exc) from exc
    else:
        def decoded():  # the decoders' errors name the video; on_frames' own pass through as they are
            try:
                yield from iter_resized(reader, indices, (int(size), int(size)), src=source)
            except Exception as exc:  # noqa: BLE001
                raise cannot_decode(exc) from exc

        with contextlib.closing(decoded()) as chunks:  # stops the decoders at once when on_frames fails
            for start, part in chunks:
                on_frames(start, part)
    if isinstance(source, BytesIO):
        source.seek(0)
    return VideoClip(frames=frames, indices=indices, total_frames=total, fps=reader.fps, source=source, name=name)


def frames_to_pixel_values(frames: Union[np.ndarray, Sequence], image_size: int, dtype: torch.dtype = torch.float32,
                           chunk: int = 256, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or a list of PIL images) -> [F, 3, S, S] in `dtype`, resized and ImageNet-normalised.

    Converted `chunk` frames at a time, so that an hour of frames never exists in float32 (4,096 frames at 448 px
    are 9.9 GB in float32, 2.5 GB in bfloat16); every frame's values are those of the one-shot conversion.
    `device`: where the conversion runs and the result lives (the uint8 frames go there first, a quarter of the
    bytes of bfloat16 pixels)."""
    if not isinstance(frames, np.ndarray):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty((frames.shape[0], 3, image_size, image_size), dtype=dtype, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for start in range(0, frames.shape[0], chunk):
        part = torch.from_numpy(np.ascontiguousarray(frames[start:start + chunk]))
        if device.type != "cpu":
            part = part.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else part.to(device)
        x = part.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (image_size, image_size):
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic",
                                                align_corners=False, antialias=True).clamp_(0.0, 1.0)
        out[start:start + chunk] = (x - mean) / std
    return out


__all__ = ["VideoClip", "VideoError", "VideoNotFoundError", "VideoDecodeError", "FrameSampling",
           "sample_frame_indices", "open_reader", "decode_frames", "video_info", "load_video",
           "frames_to_pixel_values", "describe", "resize_frames", "resize_chunk_frames", "decode_resized",
           "iter_resized", "PyAVReader", "DecordReader"]
