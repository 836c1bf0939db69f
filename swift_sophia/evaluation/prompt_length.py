"""How many tokens the server's template makes of a question with an N-frame video, without decoding N frames.

The question is encoded once by the checkpoint's own ms-swift template, exactly as the server receives it from
EvalScope (its prompt template, the video part where `<video 1>` stands), with a one-frame video; an N-frame video
adds (N - 1) x tokens_per_frame (`<vid>` + frames x M tokens + `</vid>`, swift_sophia.ms_swift.template). Used to
mark the needle-in-a-haystack cells that exceed the server's max_length: those are not sent.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Dict

import numpy as np

from .vmcq import PROMPT_TEMPLATE

_PLACEHOLDER = re.compile(r"<(image|video)[_ ](\d+)>")


class PromptLength:
    def __init__(self, model_dir: str):
        from swift.model import get_processor
        from swift.template import get_template

        import swift_sophia.ms_swift.register  # noqa: F401  (the sophia model type and template)

        self.processor = get_processor(model_dir, model_type="sophia")
        self.template = get_template(self.processor, template_type="sophia")
        # pruning happens in the model, after the prompt is built, and changes no token count here; off, it spares
        # shot detection on the one-frame video (this template only counts tokens)
        self.template.config.prune_alpha = self.template.config.prune_beta = 0
        self.max_model_len = self.processor.model_info.max_model_len
        self.tokens_per_frame = int(self.template.config.tokens_per_frame)
        self.size = int(self.template.config.vision_config.image_size[0])
        self._cache: Dict[str, int] = {}

    def _content(self, text: str, video: str):
        parts, last = [], 0
        for m in _PLACEHOLDER.finditer(text):
            if text[last:m.start()].strip():
                parts.append({"type": "text", "text": text[last:m.start()]})
            parts.append({"type": "video", "video": video})
            last = m.end()
        if text[last:].strip():
            parts.append({"type": "text", "text": text[last:]})
        return parts

    def one_frame(self, question: str, options) -> int:
        """Tokens of a `general_vmcq` row's question (with its `<video 1>`) and options, with a 1-frame video."""
        from evalscope.utils.multi_choices import prompt
        from swift.infer_engine.protocol import ChatCompletionRequest

        from ..video.synthetic_clips import write_mp4

        text = prompt(question=question, choices=list(options), template=PROMPT_TEMPLATE)
        if text not in self._cache:
            with tempfile.TemporaryDirectory() as tmp:
                video = os.path.join(tmp, "one.mp4")
                write_mp4(video, np.zeros((1, self.size, self.size, 3), np.uint8))
                request = ChatCompletionRequest(model="sophia", messages=[
                    {"role": "user", "content": self._content(text, video)}])
                infer_request, _ = request.parse()
                self._cache[text] = len(self.template.encode(infer_request)["input_ids"])
        return self._cache[text]

    def tokens(self, question: str, options, frames: int) -> int:
        return self.one_frame(question, options) + (frames - 1) * self.tokens_per_frame
