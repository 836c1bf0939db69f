"""Out-of-memory errors in `swift deploy`'s transformers engine: the request that ran out of memory gets the error,
its memory is freed, and the engine goes on with the next requests.

ms-swift's engine answers every request of a batch with the batch's exception, and keeps the failed step's tensors
alive as long as that exception (its traceback holds the frames). Here (:func:`guard_engine`):

* the exception is replaced by an :class:`OutOfMemory` that holds only its message, then the garbage collector
  runs and, on CUDA, ``torch.cuda.empty_cache()`` returns the cached blocks;
* a batch of several requests that ran out of memory is answered again one request at a time, so only the
  request(s) that do not fit alone fail;
* streaming: an exception inside ``generate`` (which ms-swift runs in a thread of its own) used to leave the stream
  waiting forever and the engine's only worker with it, so that no later request was answered; it now ends the
  stream with the error.

CPU allocation failures count as out of memory too: PyTorch's "DefaultCPUAllocator: can't allocate memory",
Python's ``MemoryError``, ENOMEM, and threads that cannot start (Python's "can't start new thread", a video
decoder's EAGAIN), which is how a process at its memory limit fails to get a thread's stack.
"""
from __future__ import annotations

import errno
import gc
import re
from typing import Any, Iterator, List, Optional

import torch
from swift.infer_engine.utils import TokensIteratorStreamer
from swift.utils import get_logger

logger = get_logger()
# PyTorch's CPU allocator, CUDA errors outside the caching allocator, Python failing to start a thread (its stack)
_RUNTIME_MESSAGES = ("DefaultCPUAllocator", "out of memory", "can't start new thread")
_OPERATOR_ADVICE = ("If reserved but unallocated", "See documentation")
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?")


class OutOfMemory(RuntimeError):
    """A request ran out of memory; the message is the allocator's first line (no traceback is kept)."""


def is_out_of_memory(exc: Optional[BaseException]) -> bool:
    """``exc``, or an exception it was raised from, is an allocation failure (CUDA or CPU)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError, OutOfMemory)):
            return True
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _RUNTIME_MESSAGES):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOMEM, errno.EAGAIN):  # EAGAIN: a decoder's threads
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    """The allocator's first line, without the C++ assertion PyTorch's CPU allocator puts in front of it and without
    the CUDA allocator's advice to the operator (a client cannot set PYTORCH_CUDA_ALLOC_CONF); whole sentences, up to
    400 characters."""
    line = _ENFORCE.sub("", (str(exc).strip() or type(exc).__name__).splitlines()[0])
    reason = ""
    for sentence in re.split(r"(?<=\.)\s+", line):
        if sentence.startswith(_OPERATOR_ADVICE) or len(reason) + len(sentence) >= 400:
            break
        reason = f"{reason} {sentence}" if reason else sentence
    return reason or line[:400]


def release_memory() -> str:
    """Free what the failed step left behind; returns the memory state, for the log."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        gib = 2 ** 30
        return (f"cuda: {torch.cuda.memory_allocated() / gib:.2f} GiB allocated, "
                f"{torch.cuda.memory_reserved() / gib:.2f} GiB reserved after freeing")
    return "cpu"


class _GenerateFailed:
    """Put in a stream's token queue by a ``generate`` that raised; the stream raises ``exc``."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_ms_next = TokensIteratorStreamer.__next__


def _next(self):
    value = _ms_next(self)
    if isinstance(value, _GenerateFailed):
        exc, value.exc = value.exc, None
        raise exc
    return value




def guard_engine(engine) -> None:
    """Install the out-of-memory handling on a ``TransformersEngine`` (its ``_infer`` and its template's
    ``generate``; other engines and other servers are left as they are)."""
    infer, generate = engine._infer, engine.template.generate

    def guarded_generate(model, *args, **kwargs):
        try:
            return generate(model, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            streamer = kwargs.get("streamer")
            if not isinstance(streamer, TokensIteratorStreamer):
                raise
            streamer.queue.put(_GenerateFailed(exc))  # the stream raises it in the engine's worker

    def guarded_infer(infer_requests: List[Any], request_config, **kwargs):
        failure = None
        try:
            result = infer(infer_requests, request_config, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            failure = OutOfMemory(_reason(exc))
        if failure is None:
            if request_config.stream:
                return _guarded_stream(result, len(infer_requests))
            return _replace_failures(result)
        # here the original exception, its traceback and the tensors its frames held are gone
        state = release_memory()
        if len(infer_requests) == 1:
            logger.warning(f"[sophia] a request ran out of memory ({failure}); memory freed ({state})")
            raise failure
        logger.warning(f"[sophia] a batch of {len(infer_requests)} requests ran out of memory ({failure}); memory "
                       f"freed ({state}); answering each request alone")
        out = []
        for request in infer_requests:
            try:
                out += guarded_infer([request], request_config, **kwargs)
            except Exception as exc:  # noqa: BLE001  (the engine's worker hands it to this request)
                out.append(exc)
        return out

    engine._infer = guarded_infer
    engine.template.generate = guarded_generate


def _replace_failures(results: List[Any]) -> List[Any]:
    """Out-of-memory exceptions returned in a request's place (a request that ran out of memory while it was
    encoded: the engine's non-strict mode returns encoding errors) become :class:`OutOfMemory`, in place, and the
    memory is freed."""
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException) and is_out_of_memory(r)]
    for i in failed:
        results[i] = OutOfMemory(_reason(results[i]))
    if failed:
        logger.warning(f"[sophia] {len(failed)} request(s) ran out of memory while encoded; memory freed "
                       f"({release_memory()})")
    return results


def _guarded_stream(stream: Iterator, size: int) -> Iterator:
    failure = None
    try:
        for chunk in stream:
            yield _replace_failures(chunk) if isinstance(chunk, list) else chunk
        return
    except Exception as exc:  # noqa: BLE001
        if not is_out_of_memory(exc):
            raise
        failure = OutOfMemory(_reason(exc))
    logger.warning(f"[sophia] a stream of {size} request(s) ran out of memory ({failure}); memory freed "
                   f"({release_memory()})")
    raise failure


def apply() -> None:
    """A stream whose ``generate`` raised ends with the error (:func:`guard_engine` puts it in the stream's queue;
    `swift deploy`'s patch installs it on the server's engine)."""
    TokensIteratorStreamer.__next__ = _next


__all__ = ["OutOfMemory", "guard_engine", "is_out_of_memory", "release_memory", "apply"]
