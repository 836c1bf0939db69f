"""`swift deploy`: a bad request gets a 4xx naming the problem and the video as the client gave it, a request that
runs out of memory gets a 503, and the server keeps serving.

What changes in ms-swift's server (``SwiftDeploy``), for every model it serves with this plugin loaded:

* a video given as a local path stays a path (ms-swift inlines the file as a data URL when it validates the
  request: a missing file was a 422 "value: <path>", and every later error named "<data URL, N chars>"); images
  in messages are inlined as before; the ``images`` / ``audios`` / ``videos`` fields of a chat, completion or
  embedding request stay as given too (ms-swift read their files, those that exist, before anything checked them);
* :func:`swift_sophia.ms_swift.request_check.check_request` runs before the engine (in a thread, the event loop goes
  on): messages, tags, readable videos, ``REQUEST_MAX_FRAMES``, ``--max_length``; a failure is a 400;
* errors the engine raises later name the videos as the client gave them (a URL, not the server's downloaded
  copy); an out-of-memory error is a 503 (:mod:`swift_sophia.ms_swift.patches.out_of_memory` frees the memory); a
  stream whose prefill fails gets its status before the first byte (ms-swift sent a 200 and cut the stream);
* a request body that does not validate is a 400 with the reason (FastAPI's default is a 422);
* the transformers engine answers each request of a batch with its own error (ms-swift's deploy puts the engine in
  strict mode, where one request that cannot be encoded fails every request batched with it);
* a request may name files on the server's disk only where :class:`swift_sophia.ms_swift.request_check.LocalMedia`
  allows (``SOPHIA_ALLOWED_MEDIA_PATH``; unset: any file on a server that listens on loopback only, none otherwise),
  checked before ms-swift reads a file or downloads a URL: where ms-swift checks a path before reading it
  (``SafeMediaPath.check``, while it validates the request) and before it fetches the request's media;
* a request whose body is over ``SOPHIA_MAX_REQUEST_MB`` (default 1536) gets a 413 before it is parsed;
* the server that ``swift eval`` and ``swift app`` start for themselves listens on 127.0.0.1 only.
"""
import asyncio
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, List, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from swift.infer_engine import TransformersEngine
from swift.infer_engine.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from swift.pipelines.infer import deploy as ms_deploy
from swift.pipelines.infer.deploy import SwiftDeploy
from swift.template.base import MaxLengthError
from swift.utils import SafeMediaPath, get_logger

from ...video.frames import _env_number
from ...video.source import describe
from ..request_check import (
    MAX_FRAMES_ENV,
    MB,
    LocalMedia,
    RequestLimits,
    RequestRejected,
    VideoPlan,
    check_messages,
    check_request,
    request_videos,
    summary,
)
from ..template import SophiaTemplate
from .out_of_memory import guard_engine, is_out_of_memory

logger = get_logger()

OUT_OF_MEMORY_STATUS = int(HTTPStatus.SERVICE_UNAVAILABLE)
MAX_REQUEST_MB_ENV = "SOPHIA_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 1536  # a 1024 MB video (SWIFT_MAX_DOWNLOAD_SIZE_MB's default) as a data URL, and the rest


def _is_video_path(part: Any) -> bool:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in ("video", "video_url"):
        return False
    value = part.get(kind)
    value = value.get("url") if isinstance(value, dict) else value
    return isinstance(value, str) and not value.strip().lower().startswith(("data:", "http://", "https://"))


_MEDIA_FIELDS = ("images", "audios", "videos")


def _post_init_keeping_media(request, post_init) -> None:
    """``post_init`` (ms-swift's ``__post_init__``) with the request's media fields set aside: it would read each
    local file into a base64 string, before the server checks that the request may name the file
    (:func:`prepare_request_media`); the template reads the files later."""
    given = {name: getattr(request, name) for name in _MEDIA_FIELDS}
    for name in _MEDIA_FIELDS:
        setattr(request, name, [])
    post_init()
    for name, values in given.items():
        setattr(request, name, [values] if isinstance(values, str) else list(values or []))


@dataclass
class SophiaChatCompletionRequest(ChatCompletionRequest):
    """ms-swift's chat request, with its media fields and local video parts kept as given and its messages
    checked."""

    def __post_init__(self):
        check_messages(self.messages)
        _post_init_keeping_media(self, super().__post_init__)

    def convert_to_base64(self):
        # ms-swift's conversion, on the messages without their local video parts (the parts are the same dicts,
        # so whatever it converts in place stays converted)
        messages = self.messages
        self.messages = [dict(m, content=[p for p in m["content"] if not _is_video_path(p)])
                         if isinstance(m.get("content"), list) else m for m in messages]
        try:
            super().convert_to_base64()
        finally:
            self.messages = messages


@dataclass
class SophiaCompletionRequest(CompletionRequest):
    """ms-swift's completion request, with its media fields kept as given."""

    def __post_init__(self):
        _post_init_keeping_media(self, super().__post_init__)


@dataclass
class SophiaEmbeddingRequest(EmbeddingRequest):
    """ms-swift's embedding request, with its media fields kept as given."""

    def __post_init__(self):
        _post_init_keeping_media(self, super().__post_init__)


@dataclass
class _Answering:
    """One request while the server answers it."""
    videos: List[Any]  # as the client gave them
    plans: List[VideoPlan] = field(default_factory=list)
    status: Optional[int] = None
    message: Optional[str] = None

    def rejection(self, exc: BaseException, served: List[Any]) -> RequestRejected:
        """The error to answer with: a 4xx/5xx whose message names the videos as the client gave them."""
        if isinstance(exc, RequestRejected):
            return exc
        if is_out_of_memory(exc):
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            videos = summary(self.plans)
            if len(self.plans) > 1:
                videos = f"{sum(p.frames for p in self.plans)} frames: {videos}"
            return RequestRejected(
                f"out of memory while answering this request ({videos or 'no video'}): {reason}. The server freed "
                f"the memory and keeps serving: retry later, or send a shorter video or fewer videos (its operator "
                f"can reject such requests before they run with {MAX_FRAMES_ENV})", OUT_OF_MEMORY_STATUS)
        if isinstance(exc, MaxLengthError):
            return RequestRejected(f"the request is longer than this server's --max_length ({str(exc).rstrip('.')}; "
                                   f"its videos: {summary(self.plans) or 'none'}): send a shorter text or video")
        text = str(exc).strip() or type(exc).__name__
        for server, given in zip(served, self.videos):  # a URL's video is named by the URL, not its download
            if isinstance(server, str) and describe(server) != describe(given):
                text = text.replace(describe(server), describe(given))
        return RequestRejected(text)


_answering: ContextVar[Optional[_Answering]] = ContextVar("sophia_answering", default=None)
_local_media: Optional[LocalMedia] = None  # the serving Sophia model's; None: ms-swift's rules alone
_ms_create_chat_completion = SwiftDeploy.create_chat_completion
_ms_register_app = SwiftDeploy._register_app
_ms_prepare_request_media = SwiftDeploy._prepare_request_media
_ms_check_media_path = SafeMediaPath.check
_ms_deploy_main_of_run_deploy = ms_deploy._deploy_main


def check_media_path(cls, path: str) -> str:
    """ms-swift's check of a path it is about to read (``SWIFT_MEDIA_ALLOWED_DIRS``), then this server's."""
    _ms_check_media_path(path)
    if _local_media is not None:
        _local_media.check(path)
    return path


def prepare_request_media(infer_request):
    """ms-swift's download of the request's URLs into files, once its local paths are allowed."""
    if _local_media is not None:
        _local_media.check_request(infer_request)
    return _ms_prepare_request_media(infer_request)


def serve_the_caller(args):
    """The server that ms-swift's ``run_deploy`` starts for ``swift eval`` and ``swift app`` in a child process:
    the process that started it asks it on 127.0.0.1 and no one else does, so it listens there only (ms-swift's
    default is 0.0.0.0), which also lets it read the local videos that ``swift eval`` sends as paths. The child
    finds this function by its module's name (multiprocessing's spawn); ms-swift's ``_deploy_main``, which it runs,
    loads the plugin there, and the plugin applies these patches before the server starts."""
    args.host = "127.0.0.1"
    return _ms_deploy_main_of_run_deploy(args)


class RequestSizeLimit:
    """ASGI middleware: a request whose body is over ``max_bytes`` is answered with a 413 and never parsed. The
    rest of its body is read and dropped first, a chunk at a time: a client still sending when the server closed
    the connection would see it reset, not the answer. A body within the limit is passed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _drain(receive)
            return await self._refusal(int(declared))(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await _drain(receive)
                return await self._refusal(None)(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            message, body = body, None
            return message if message is not None else await receive()

        await self.app(scope, replay, send)

    def _refusal(self, size: Optional[int]):
        over = "more than" if size is None else f"{size / MB:.1f} MB, more than"
        return SwiftDeploy.create_error_response(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request's body is {over} the {self.max_bytes / MB:g} MB this server takes in one "
            f"request ({MAX_REQUEST_MB_ENV}): give long videos as http(s) URLs rather than inline as data URLs, or "
            f"send a shorter video")


async def _drain(receive) -> None:
    """Read the rest of a request's body and drop it."""
    more = True
    while more:
        message = await receive()
        more = message["type"] == "http.request" and message.get("more_body", False)


async def create_chat_completion(self, request: SophiaChatCompletionRequest, raw_request: Request, *,
                                 return_cmpl_response: bool = False):
    answering = _Answering(request_videos(request.messages, request.videos))
    token = _answering.set(answering)
    try:
        response = await _ms_create_chat_completion(self, request, raw_request,
                                                    return_cmpl_response=return_cmpl_response)
    finally:
        _answering.reset(token)
    if answering.status not in (None, 400):  # ms-swift answers every failure with a 400
        return self.create_error_response(answering.status, answering.message)
    return response


async def create_completion(self, request: SophiaCompletionRequest, raw_request: Request):
    chat_request = SophiaChatCompletionRequest.from_cmpl_request(request)
    return await self.create_chat_completion(chat_request, raw_request, return_cmpl_response=True)


async def create_embedding(self, request: SophiaEmbeddingRequest, raw_request: Request):
    chat_request = SophiaChatCompletionRequest.from_cmpl_request(request)
    return await self.create_chat_completion(chat_request, raw_request, return_cmpl_response=True)


async def infer_async(self, infer_request, request_config=None, **kwargs):
    answering = _answering.get() or _Answering(request_videos(infer_request.messages, infer_request.videos))
    served = request_videos(infer_request.messages, infer_request.videos)
    try:
        if getattr(self, "_sophia_limits", None) is not None:
            answering.plans = await asyncio.to_thread(check_request, infer_request, answering.videos,
                                                      self._sophia_limits)
        result = await self.infer_engine.infer_async(infer_request, request_config, **kwargs)
        if request_config is not None and request_config.stream:
            result = await _started(result)
        return result
    except Exception as exc:  # noqa: BLE001  (ms-swift's handler answers it; the status is set below)
        rejected = answering.rejection(exc, served)
    answering.status, answering.message = rejected.status, str(rejected)
    raise rejected


async def _started(stream):
    """The stream, its first chunk already there: an error before it (encoding, prefill) gets an HTTP status."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None

    async def chunks():
        if first is None:
            return
        yield first
        async for chunk in stream:
            yield chunk

    return chunks()


async def _validation_error(request: Request, exc: RequestValidationError):
    reasons = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())[1:])
        msg = str(error.get("msg", "")).removeprefix("Value error, ")
        reasons.append(f"{where}: {msg}" if where else msg)
    return SwiftDeploy.create_error_response(HTTPStatus.BAD_REQUEST, "; ".join(reasons) or str(exc))


def _register_app(self):
    global _local_media
    self._sophia_limits = None  # another model's template: no video checks
    if isinstance(self.template, SophiaTemplate):
        self._sophia_limits = RequestLimits.from_template(self.template,
                                                          getattr(self.infer_engine, "max_model_len", None))
        _local_media = LocalMedia.for_server(self.args.host)
        max_request_mb = _env_number(MAX_REQUEST_MB_ENV.lower(), float, DEFAULT_MAX_REQUEST_MB, 0,
                                     "a number of MB >= 0 (0: no limit)")
        if max_request_mb:
            self.app.add_middleware(RequestSizeLimit, max_bytes=int(max_request_mb * MB))
        logger.info(f"[sophia] requests are checked before the model runs: {self._sophia_limits.describe()}, "
                    f"one request {max_request_mb:g} MB ({MAX_REQUEST_MB_ENV}; 0: no limit), "
                    f"{_local_media.describe()}")
    if isinstance(self.infer_engine, TransformersEngine):
        self.infer_engine.strict = False  # each request of a batch gets its own error
        guard_engine(self.infer_engine)
    self.app.add_exception_handler(RequestValidationError, _validation_error)
    _ms_register_app(self)


def apply() -> None:
    """Install all of the above in ms-swift's server (``SwiftDeploy``), its media path check and ``run_deploy``."""
    SwiftDeploy.create_chat_completion = create_chat_completion
    SwiftDeploy.create_completion = create_completion
    SwiftDeploy.create_embedding = create_embedding
    SwiftDeploy.infer_async = infer_async
    SwiftDeploy._register_app = _register_app
    SwiftDeploy._prepare_request_media = staticmethod(prepare_request_media)
    SafeMediaPath.check = classmethod(check_media_path)
    ms_deploy._deploy_main = serve_the_caller


__all__ = ["apply", "OUT_OF_MEMORY_STATUS", "MAX_REQUEST_MB_ENV", "RequestSizeLimit", "SophiaChatCompletionRequest",
           "SophiaCompletionRequest", "SophiaEmbeddingRequest"]
