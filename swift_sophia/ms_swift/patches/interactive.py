"""`swift infer` interactive mode, made forgiving (ms-swift would stop with a traceback in each case):

* a video path that cannot be read is asked for again instead of ending the session;
* a path in quotes (``'/x.mp4'`` or ``"/x.mp4"``, as a shell drag-and-drop gives) or with backslash-escaped spaces
  is taken as the path inside;
* Ctrl-D (end of input) at the question prompt or at a media prompt ends the session with exit status 0.
"""
from __future__ import annotations

import os
import re
import shlex

from swift.pipelines.infer.utils import InferCliState

from ...video.frames import VideoError, load_video

_TAGS = re.compile(r"<(image|video|audio)>")
_ms_input_text = InferCliState.input_text


def _read(prompt: str) -> str:
    """`input(prompt)`; at end of input (Ctrl-D), end the session cleanly: the rows answered so far are already in
    the result file (ms-swift writes each answer as it comes)."""
    try:
        return input(prompt)
    except EOFError:
        print("\n[sophia] end of input: session ended.", flush=True)
        raise SystemExit(0) from None


def unquote_path(text: str) -> str:
    """The path a user typed or dropped: surrounding quotes removed, backslash escapes (``a\\ b.mp4``) undone."""
    path = text.strip()
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1]
    if "\\" in path and not os.path.exists(path):
        try:
            parts = shlex.split(path)
        except ValueError:
            return path
        if len(parts) == 1:
            return parts[0]
    return path


def _ask_video() -> str:
    while True:
        path = unquote_path(_read("Input a video path or URL <<< "))
        try:
            load_video(path, 1)
            return path
        except VideoError as exc:
            print(f"[sophia] {exc}; please give another video path or URL.")


def input_mm_data(self) -> None:
    for media_type in _TAGS.findall(self.messages[-1]["content"]):
        if media_type == "video":
            self.videos.append(_ask_video())
        else:
            a_an = "an" if media_type[0] in "ia" else "a"
            getattr(self, f"{media_type}s").append(unquote_path(_read(f"Input {a_an} {media_type} path or URL <<< ")))


def input_text(self) -> str:
    """ms-swift's question prompt; Ctrl-D there means `exit` (the session ends the ordinary way)."""
    try:
        return _ms_input_text(self)
    except EOFError:
        print()
        return "exit"


def apply() -> None:
    InferCliState.input_mm_data = input_mm_data
    InferCliState.input_text = input_text
