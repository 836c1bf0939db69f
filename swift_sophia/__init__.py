"""swift-sophia: the Sophia long-video VLM as an ms-swift plugin.

`import swift_sophia` registers the config and model with transformers' Auto classes. Registration with ms-swift
happens in `swift_sophia.register`, which the plugin file (`sophia plugin-path`) imports.
"""
from .configuration_sophia import SophiaConfig

__version__ = "0.1.0"


def __getattr__(name):
    if name == "SophiaForConditionalGeneration":
        from .modeling_sophia import SophiaForConditionalGeneration
        return SophiaForConditionalGeneration
    raise AttributeError(name)


__all__ = ["SophiaConfig", "SophiaForConditionalGeneration"]
