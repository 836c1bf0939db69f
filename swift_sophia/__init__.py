"""swift-sophia: the Sophia long-video VLM as an ms-swift plugin.

`import swift_sophia` registers the config and the models with transformers' Auto classes (`AutoConfig`,
`AutoModel` -> `SophiaModel`, `AutoModelForImageTextToText` -> `SophiaForConditionalGeneration`), and gives the
video layer ms-swift's reader of videos given as URLs, data URLs or base64 (imported when such a video is read).
Registration with ms-swift happens in `swift_sophia.ms_swift.register`, which the plugin file (`sophia plugin-path`)
imports.

The layers, each importing only those before it: `model`, `video`, `ms_swift`, `evaluation`, `tools`
(docs/architecture.md).
"""
from .model.configuration_sophia import SophiaConfig
from .model.modeling_sophia import SophiaForConditionalGeneration, SophiaModel
from .video import source as _video_source

__version__ = "0.1.0"


def _load_inline_video(text: str):
    """ms-swift's `load_file`: an http(s) URL (its timeout, SWIFT_TIMEOUT, and retries), a data URL or base64."""
    from swift.template.vision_utils import load_file

    return load_file(text)


_video_source.set_inline_loader(_load_inline_video)

__all__ = ["SophiaConfig", "SophiaModel", "SophiaForConditionalGeneration"]
