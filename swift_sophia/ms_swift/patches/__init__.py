"""Sophia's changes to ms-swift's own commands, one module each, each with an idempotent `apply()`; importing a
module changes nothing. `apply()` here runs them all and is called in one place, the plugin
(`swift_sophia/plugin.py`), so every `swift` command that loads the plugin gets them and nothing else does.

    out_of_memory   `swift deploy`: a request that runs out of memory gets the error, its memory is freed
    deploy_errors   `swift deploy`: requests checked before the model (4xx naming the problem), size limits, 503
                    on out of memory, media paths allowed per server
    batch_infer     `swift infer --val_dataset`: a bad row is recorded, not fatal; a run resumes into its results
    interactive     `swift infer` interactive mode: unreadable videos asked for again, quoted paths, Ctrl-D
    resume_check    `swift sft --resume_from_checkpoint`: a checkpoint that cannot resume its run is refused
    swift_eval      `swift eval`: no OpenCompass needed; local videos sent to a local server as paths
and ms-swift's sequence parallelism driving Sophia's (`swift_sophia/ms_swift/sequence_parallel.py`).
"""
from .. import sequence_parallel
from . import batch_infer, deploy_errors, interactive, out_of_memory, resume_check, swift_eval


def apply() -> None:
    """Apply every patch (idempotent)."""
    out_of_memory.apply()
    deploy_errors.apply()
    batch_infer.apply()
    interactive.apply()
    resume_check.apply()
    swift_eval.apply()
    sequence_parallel.apply()


__all__ = ["apply"]
