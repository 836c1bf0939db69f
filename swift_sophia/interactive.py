"""`swift infer` interactive mode: a video path that cannot be read is asked for again instead of ending the
session (ms-swift would stop with a traceback on the first typo)."""
from __future__ import annotations

import re

from swift.pipelines.infer.utils import InferCliState

from .video import VideoError, load_video

_TAGS = re.compile(r"<(image|video|audio)>")


def _ask_video() -> str:
    while True:
        path = input("Input a video path or URL <<< ").strip()
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
            getattr(self, f"{media_type}s").append(input(f"Input {a_an} {media_type} path or URL <<< "))


InferCliState.input_mm_data = input_mm_data
