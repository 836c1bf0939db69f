"""swift-sophia: the Sophia long-video VLM as an ms-swift plugin.

`import swift_sophia` registers the config and the models with transformers' Auto classes (`AutoConfig`,
`AutoModel` -> `SophiaModel`, `AutoModelForImageTextToText` -> `SophiaForConditionalGeneration`). Registration
with ms-swift happens in `swift_sophia.register`, which the plugin file (`sophia plugin-path`) imports.
"""
from .model.configuration_sophia import SophiaConfig
from .model.modeling_sophia import SophiaForConditionalGeneration, SophiaModel

__version__ = "0.1.0"

__all__ = ["SophiaConfig", "SophiaModel", "SophiaForConditionalGeneration"]
