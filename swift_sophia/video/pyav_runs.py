"""Decoding a run of frames with PyAV, as a module and as a worker process.

A decoder seeks to the keyframe before the first wanted frame, decodes forward, seeks again only when the next
keyframe lies beyond where it is, and converts only the wanted frames. :func:`decode_run` is the loop every PyAV
reader of the package uses. Run as a script (``python pyav_runs.py``), this file is a worker that needs neither torch
nor the package: it reads one JSON request on stdin and writes the frames' RGB bytes to stdout, in order. Converting a
frame to another size holds the GIL (0.3-0.6 ms a frame to 96x54), so decoders in threads of one process scale
their frames one at a time, while decoders in processes of their own do not wait for each other.
"""
from __future__ import annotations

import bisect
import json
import sys
from typing import Callable, Optional, Sequence


class RunDecodeError(Exception):
    """A wanted frame is not in the file (it ends early, or a frame has no timestamp)."""


def decode_run(stream, targets: Sequence[int], keys: Sequence[int], emit: Callable[[int, object], None],
               fmt: dict, reformatter=None, num_threads: int = 0) -> None:
    """Decode the frames whose timestamps are `targets` (ascending) from `stream` (a path or a file object), calling
    ``emit(k, frame)`` with the frame converted by ``reformatter.reformat(frame, **fmt).to_ndarray()`` for the k-th
    target; `keys` are the file's keyframe timestamps, sorted."""
    import av
    from av.video.reformatter import VideoReformatter

    reformatter = reformatter or VideoReformatter()
    with av.open(stream) as container:
        video = container.streams.video[0]
        video.thread_type = 'AUTO'
        video.codec_context.thread_count = num_threads
        frames = None
        cur = None  # pts of the last decoded frame
        for k, target in enumerate(targets):
            key = keys[max(0, bisect.bisect_right(keys, target) - 1)]
            if frames is None or cur is None or cur >= target or key > cur:
                container.seek(key, stream=video, backward=True, any_frame=False)
                frames = container.decode(video)
                cur = None
            for frame in frames:
                cur = frame.pts
                if cur is None:
                    raise RunDecodeError('a decoded frame has no timestamp')
                if cur >= target:
                    break
            else:
                raise RunDecodeError(f'frame at pts {target} could not be decoded: the file ends early')
            if cur != target:
                raise RunDecodeError(f'frame at pts {target} could not be decoded (next frame: pts {cur})')
            emit(k, reformatter.reformat(frame, **fmt).to_ndarray())


def request(path: str, targets: Sequence[int], keys: Sequence[int], size: Optional[Sequence[int]],
            interpolation: str, num_threads: int) -> bytes:
    """The worker's request line: decode `targets` of the file at `path` to ``size=(W, H)`` RGB."""
    return (json.dumps(dict(path=path, targets=list(targets), keys=list(keys), size=size,
                            interpolation=interpolation, threads=num_threads)) + '\n').encode()


def _serve() -> int:
    ask = json.loads(sys.stdin.readline())
    fmt = dict(format='rgb24')
    if ask['size']:
        fmt.update(width=ask['size'][0], height=ask['size'][1], interpolation=ask['interpolation'])
    out = sys.stdout.buffer
    try:
        decode_run(ask['path'], ask['targets'], ask['keys'], lambda k, arr: out.write(arr.tobytes()), fmt,
                   num_threads=ask['threads'])
        out.flush()
    except BrokenPipeError:  # the reader stopped reading (it failed elsewhere)
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent raises it with the video's name
        text = str(exc).strip().splitlines()
        print(text[0] if text else type(exc).__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(_serve())
