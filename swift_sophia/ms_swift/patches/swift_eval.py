"""What `swift eval` on a Sophia checkpoint needs from ms-swift 4.6 and EvalScope 1.10 (`apply`).

1. ms-swift checks `--eval_dataset` against the datasets of every backend, and listing OpenCompass's imports the
   `opencompass` package (ms-opencompass, which pins numpy < 2) even when `--eval_backend Native` is asked for.
   Here a backend whose package is missing lists no datasets, unless it is the one asked for (then its import
   error is raised as before).
2. EvalScope sends every local video as a base64 data URL: an hour-long video becomes a request of a gigabyte,
   and the server's errors can only say "<data URL, N chars>". A server on this machine (loopback address) gets
   the path instead, as a `{"type": "video", "video": PATH}` part, which ms-swift's server reads from disk.
"""
from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from swift.arguments import EvalArguments

_ms_list_eval_dataset = EvalArguments.list_eval_dataset


def _list_eval_dataset(eval_backend=None):
    try:
        return _ms_list_eval_dataset(eval_backend)
    except ImportError:
        if eval_backend == "OpenCompass":
            raise
    from evalscope.api.registry import BENCHMARK_REGISTRY
    from evalscope.constants import EvalBackend

    res = {EvalBackend.NATIVE: sorted(BENCHMARK_REGISTRY.keys()), EvalBackend.OPEN_COMPASS: []}
    try:
        from evalscope.backend.vlm_eval_kit import VLMEvalKitBackendManager

        res[EvalBackend.VLM_EVAL_KIT] = sorted(VLMEvalKitBackendManager.list_supported_datasets())
    except ImportError:
        if eval_backend == EvalBackend.VLM_EVAL_KIT:
            raise
    return res


def is_loopback(base_url) -> bool:
    host = urlsplit(str(base_url or "")).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _patch_evalscope_video_parts():
    try:
        from evalscope.models.utils import openai as es_openai
    except ImportError:  # EvalScope not installed: `swift eval` itself will say so
        return
    original = es_openai.openai_chat_completion_part
    if getattr(original, "sophia", False):
        return

    def part(content, *args, **kwargs):
        base_url = kwargs.get("base_url", args[0] if args else None)
        video = getattr(content, "video", None) if getattr(content, "type", None) == "video" else None
        if video and is_loopback(base_url) and os.path.isfile(video):
            return {"type": "video", "video": os.path.abspath(video)}
        return original(content, *args, **kwargs)

    part.sophia = True
    es_openai.openai_chat_completion_part = part


def apply() -> None:
    EvalArguments.list_eval_dataset = staticmethod(_list_eval_dataset)
    _patch_evalscope_video_parts()
