"""`swift sft --resume_from_checkpoint CKPT`: a checkpoint that cannot resume its run is refused, not half-loaded.

transformers' Trainer resumes from whatever the folder holds. From a checkpoint saved with
``--save_only_model true`` (weights and trainer_state.json only) it loads the weights and the step counter, skips the
data already seen and silently starts a new optimizer and a new learning-rate schedule, warmup included: the resumed
run trains differently from the interrupted one. Here ms-swift's ``SwiftSft._get_resume_checkpoint`` (where it decides
what ``trainer.train`` resumes from) is wrapped: the checkpoint must hold the trainer state, the optimizer state and
the scheduler state, else the run stops with an error naming what is missing and the two ways on. A missing RNG state
for this process alone (e.g. resumed on another number of processes) is a warning: the run resumes, not bit-exactly.
``--resume_only_model true`` (ms-swift's explicit "weights only") is not checked.

The check applies to every model type the process trains: it looks only at the files transformers writes, which are
the same for all models.
"""
from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Tuple

from swift.pipelines.train.sft import SwiftSft
from swift.utils import get_logger
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME

logger = get_logger()

_ms_get_resume_checkpoint = SwiftSft._get_resume_checkpoint


def _has_optimizer_state(checkpoint: str, deepspeed: bool) -> bool:
    # The same tests transformers makes before loading: DeepSpeed's global_step* folder; optimizer.pt/.bin, or a
    # folder with "optimizer" in its name (FSDP).
    if deepspeed:
        return any(os.path.isdir(p) for p in glob.glob(os.path.join(checkpoint, "global_step*")))
    if any(os.path.isfile(os.path.join(checkpoint, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN)):
        return True
    return any("optimizer" in n and os.path.isdir(os.path.join(checkpoint, n)) for n in os.listdir(checkpoint))


def missing_resume_state(checkpoint: str, *, deepspeed: bool = False, deepspeed_scheduler: bool = False,
                         world_size: int = 1, process_index: int = 0) -> Tuple[List[str], Optional[str]]:
    """What `checkpoint` lacks to resume a run exactly: (the missing states resuming needs, the missing RNG state).

    ``deepspeed_scheduler``: the DeepSpeed config has its own "scheduler" (saved inside global_step*, no scheduler.pt).
    """
    missing = []
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
        missing.append(f"trainer state ({TRAINER_STATE_NAME}: the step and the data position)")
    if not _has_optimizer_state(checkpoint, deepspeed):
        where = "DeepSpeed's global_step* folder" if deepspeed else OPTIMIZER_NAME
        missing.append(f"optimizer state ({where})")
    if not (deepspeed and deepspeed_scheduler) and not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
        missing.append(f"learning-rate scheduler state ({SCHEDULER_NAME})")
    rng = "rng_state.pth" if world_size <= 1 else f"rng_state_{process_index}.pth"
    missing_rng = None if os.path.isfile(os.path.join(checkpoint, rng)) else f"RNG state ({rng})"
    return missing, missing_rng


def _saved_model_only(checkpoint: str) -> bool:
    try:
        with open(os.path.join(checkpoint, "args.json"), encoding="utf-8") as f:
            return json.load(f).get("save_only_model") is True
    except (OSError, ValueError, AttributeError):
        return False


def check_resumable(checkpoint: str, *, deepspeed: bool = False, deepspeed_scheduler: bool = False,
                    world_size: int = 1, process_index: int = 0) -> None:
    """Raise ValueError if `checkpoint` cannot resume its run; warn if it resumes without this process's RNG state."""
    missing, missing_rng = missing_resume_state(checkpoint, deepspeed=deepspeed,
                                                deepspeed_scheduler=deepspeed_scheduler, world_size=world_size,
                                                process_index=process_index)
    if missing:
        items = missing + ([missing_rng] if missing_rng else [])
        lacks = ", the ".join(items[:-1]) + " and the " + items[-1] if len(items) > 1 else items[0]
        cause = " (it was saved with --save_only_model true)" if _saved_model_only(checkpoint) else ""
        raise ValueError(
            f"[sophia] --resume_from_checkpoint {checkpoint} cannot resume training: the checkpoint lacks the {lacks}"
            f"{cause}. Resumed from it, training would silently start these afresh (a model-only checkpoint: a new "
            f"optimizer, the learning-rate schedule from its start, warmup included) and differ from the run that "
            f"saved it. To resume exactly, use a checkpoint saved with --save_only_model false (ms-swift's default; "
            f"retrain with it if you have none). To continue from its weights with a new optimizer and schedule, say "
            f"so with --resume_only_model true (training goes on from its step, past the data already seen; add "
            f"--ignore_data_skip true to start again at step 0).")
    if missing_rng:
        logger.warning(f"[sophia] --resume_from_checkpoint {checkpoint} has no {missing_rng} (saved by another "
                       f"number of processes?): training resumes with the optimizer and scheduler states, but random "
                       f"draws (dropout, stage 3's Gumbel noise) differ from the interrupted run.")


def _get_resume_checkpoint(self, trainer):
    checkpoint = _ms_get_resume_checkpoint(self, trainer)
    args = trainer.args
    if checkpoint and not getattr(args, "resume_only_model", False):
        ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None) or {}
        check_resumable(checkpoint, deepspeed=bool(getattr(trainer, "is_deepspeed_enabled", False)),
                        deepspeed_scheduler="scheduler" in ds_config, world_size=args.world_size,
                        process_index=args.process_index)
    return checkpoint


def apply() -> None:
    SwiftSft._get_resume_checkpoint = _get_resume_checkpoint


__all__ = ["check_resumable", "missing_resume_state", "apply"]
