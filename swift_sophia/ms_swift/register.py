"""Registers Sophia with ms-swift: model type, model architecture keys and chat template (and Sophia in Liger's
model-type table, the shot-caching preprocessor for the datasets named in $SOPHIA_SHOT_DATASETS).

Import this module before ms-swift resolves models; `swift_sophia/plugin.py` (`--external_plugins`) imports it and
also applies Sophia's changes to ms-swift's commands (`swift_sophia.ms_swift.patches`), which importing this
module does not.
"""
from __future__ import annotations

import atexit
import sys
from datetime import timedelta

import torch.distributed as dist
from swift.model import ModelGroup, ModelLoader, ModelMeta, MultiModelKeys, register_model, register_model_arch
from transformers import AutoModelForImageTextToText

from ..model import liger
from ..model.modeling_sophia import SophiaForConditionalGeneration  # noqa: F401  (registers the Auto classes)
from .shots_preprocessor import register_shot_dataset_preprocessor
from .template import SOPHIA_TEMPLATE

SOPHIA_MODEL_TYPE = "sophia"


_exiting_on_error = False


def _note_uncaught(exc_type, exc, tb, _previous=sys.excepthook) -> None:
    global _exiting_on_error
    _exiting_on_error = True
    _previous(exc_type, exc, tb)


def _destroy_process_groups() -> None:
    """At exit, before the interpreter's teardown: ms-swift, accelerate and DeepSpeed leave their process groups
    alive, and a gloo rank whose groups were destroyed in the static teardown sometimes aborted after training had
    finished ("terminate called without an active exception", exit status -6; seen under ZeRO-3 and sequence
    parallelism on CPU processes). gloo ranks first meet in a barrier, unless this one is exiting on an uncaught
    exception: only rank 0's wait is bounded, and a failing rank must exit at once so that torchrun stops the job."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo" and not _exiting_on_error:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except Exception:  # a rank that failed or left: destroy anyway, the exit status is already decided
            pass
    dist.destroy_process_group()


sys.excepthook = _note_uncaught
atexit.register(_destroy_process_groups)  # every `swift` command that loads the plugin

# Which modules --freeze_vit / --freeze_aligner / --freeze_llm and LoRA target. The frame pruner belongs to no
# group: it only receives gradients when pruning is on (stage 3), where `--trainable_parameters model.pruner`
# trains it alone.
register_model_arch(
    MultiModelKeys(
        SOPHIA_MODEL_TYPE,
        language_model=["model.language_model", "lm_head"],
        aligner=["model.multi_modal_projector", "model.aggregator"],
        vision_tower=["model.vision_tower"],
    ),
    exist_ok=True,
)


class SophiaLoader(ModelLoader):
    # The classes are registered with transformers' Auto classes by this package: no remote code runs.
    default_trust_remote_code = False

    def get_model(self, model_dir, config, processor, model_kwargs):
        self.auto_model_cls = self.auto_model_cls or AutoModelForImageTextToText
        return super().get_model(model_dir, config, processor, model_kwargs)


register_model(
    ModelMeta(
        SOPHIA_MODEL_TYPE,
        [ModelGroup([], template=SOPHIA_TEMPLATE)],
        SophiaLoader,
        template=SOPHIA_TEMPLATE,
        model_arch=SOPHIA_MODEL_TYPE,
        architectures=["SophiaForConditionalGeneration"],
        is_multimodal=True,
        tags=["vision", "video"],
    ),
    exist_ok=True,
)

# `--use_liger_kernel true`: transformers' Trainer finds `sophia` in Liger's table (when Liger is installed).
liger.register()

# Datasets named in $SOPHIA_SHOT_DATASETS get the shot-caching preprocessor (docs/pruning.md).
register_shot_dataset_preprocessor()

__all__ = ["SOPHIA_MODEL_TYPE", "SophiaLoader"]
