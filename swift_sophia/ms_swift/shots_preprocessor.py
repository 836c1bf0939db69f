"""An ms-swift dataset preprocessor that caches the shot boundaries of every video of every row.

ms-swift (4.6) chooses a dataset's preprocessor through its dataset registry: ``load_dataset`` looks the
``--dataset`` value up in ``swift.dataset.DATASET_MAPPING`` by registered name, by ``dataset_path`` (or by
the file's base name), and runs that ``DatasetMeta.preprocess_func`` on the loaded rows. This module
registers, for the dataset files you name, a :class:`ShotCachePreprocessor`: it first runs the usual
preprocessing (``AutoPreprocessor``: messages / alpaca / query-response rows, unchanged), then, row by row,
makes sure the shot cache holds every video's boundaries (detecting the missing ones), so training reads
shots from the cache and never runs the detector for a cached video.

Use it from the command line (the plugin file calls :func:`register_shot_dataset_preprocessor`)::

    SOPHIA_SHOT_DATASETS=/data/train.jsonl:/data/val.jsonl \
    swift sft --external_plugins "$(sophia plugin-path)" --model ... \
        --dataset /data/train.jsonl --val_dataset /data/val.jsonl --dataset_num_proc 4

or by name: each registered file is also called ``sophia-shots/<file stem>`` (``--dataset
sophia-shots/train``). Or in Python: ``register_shot_dataset('/data/train.jsonl')``.

Rows are never dropped silently: a video that cannot be found or decoded is logged with the row's
videos and the reason (every time, not only the first ten like ms-swift's own tracebacks). Then, by
``on_error`` (env ``SOPHIA_SHOT_ON_ERROR``): ``'drop'`` (default) raises, so that ms-swift drops the row
(``--strict true`` makes it abort instead); ``'keep'`` keeps the row (the template will detect lazily or
fail on it later); ``'raise'`` aborts the whole preprocessing.

The `datasets` library caches the mapped dataset: a second ``swift sft`` on the same file does not run
this preprocessor again (pass ``--load_from_cache_file false`` to re-check the shot cache).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from swift.dataset import AutoPreprocessor, DatasetMeta, RowPreprocessor, register_dataset
from swift.dataset.register import DATASET_MAPPING
from swift.utils import get_logger

from ..video.shot_cache import ShotCache
from ..video.shots import DetectionSettings, ensure_cached, get_default_detector
from ..video.source import resolve_video_source

logger = get_logger()  # ms-swift's logger: it prints from the forked workers `datasets.map` runs rows in

DATASETS_ENV = 'SOPHIA_SHOT_DATASETS'
NAME_PREFIX = 'sophia-shots/'


class ShotCacheError(RuntimeError):
    pass


class ShotCachePreprocessor(RowPreprocessor):
    """``inner`` preprocessing, then shots cached for every video (rows pass through unchanged).

    Args:
        inner: the preprocessor for the row format (default ``AutoPreprocessor()``).
        num_frames: ignored (accepted for old callers): one cache entry per video serves every sampling.
        cache_dir: the shot cache folder (default ``$SOPHIA_SHOT_CACHE`` or ``~/.cache/swift_sophia/shots``).
        settings: detection settings (default :meth:`DetectionSettings.from_env`).
        dataset_dir: where relative video paths are looked up after the current folder and
            ``$ROOT_IMAGE_DIR`` (ms-swift's own rule).
        device: detector device (default ``$SOPHIA_SHOT_DEVICE`` or ``cpu``).
        on_error: ``'drop'``, ``'keep'`` or ``'raise'`` (module docstring).
    """

    def __init__(self, inner=None, *, num_frames: Optional[int] = None, cache_dir: Optional[str] = None,
                 settings: Optional[DetectionSettings] = None, dataset_dir: Optional[str] = None,
                 device: Optional[str] = None, on_error: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner if inner is not None else AutoPreprocessor()
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.settings = settings
        self.dataset_dir = dataset_dir
        self.device = device
        self.on_error = (on_error or os.environ.get('SOPHIA_SHOT_ON_ERROR', 'drop')).lower()
        if self.on_error not in ('drop', 'keep', 'raise'):
            raise ValueError(f"on_error must be 'drop', 'keep' or 'raise', got {self.on_error!r}")

    # ms-swift calls preprocess_func(dataset, num_proc=..., load_from_cache_file=..., strict=..., ...)
    def __call__(self, dataset, *, num_proc: int = 1, load_from_cache_file: bool = True, strict: bool = False,
                 **kwargs):
        dataset = self.inner(dataset, num_proc=num_proc, load_from_cache_file=load_from_cache_file, strict=strict,
                             **kwargs)
        kwargs.pop('enable_auto_mapping', None)
        return super().__call__(dataset, num_proc=num_proc, load_from_cache_file=load_from_cache_file,
                                strict=strict, enable_auto_mapping=False, **kwargs)

    def ensure_row(self, row: Dict[str, Any]) -> List[str]:
        """Cache the shots of every video of ``row``; returns the statuses ('cached'/'computed')."""
        statuses = []
        for video in row.get('videos') or []:
            if video is None:
                continue
            if isinstance(video, (list, tuple)):  # a video given as a list of frame images: no shots to cache
                statuses.append('skipped')
                continue
            src, name = resolve_video_source(video, self.dataset_dir, prefer_base=False)
            try:
                statuses.append(ensure_cached(src, cache=ShotCache(self.cache_dir),
                                              detector=get_default_detector(self.device),
                                              settings=self.settings or DetectionSettings.from_env()))
            except Exception as e:
                raise ShotCacheError(f'{name}: {type(e).__name__}: {e}') from e
        return statuses

    def preprocess(self, row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        try:
            self.ensure_row(row)
        except Exception as e:
            videos = row.get('videos')
            query = ''
            for m in row.get('messages') or []:
                if isinstance(m, dict) and m.get('role') == 'user':
                    query = str(m.get('content'))[:60]
                    break
            action = {'drop': 'the row is dropped', 'keep': 'the row is kept without cached shots',
                      'raise': 'aborting'}[self.on_error]
            logger.error(f'shot detection failed for the row with videos={videos} (user: {query!r}): {e}; {action}')
            if self.on_error == 'keep':
                return row
            raise
        return row


def register_shot_dataset(path: Union[str, os.PathLike], *, name: Optional[str] = None, exist_ok: bool = True,
                          **preprocessor_kwargs) -> DatasetMeta:
    """Register a dataset file (jsonl/json/csv...) with ms-swift so that loading it caches its shots.

    ``swift sft --dataset <path>`` (the same path, or any path with the same base name) and
    ``--dataset sophia-shots/<stem>`` (or ``name``) then use :class:`ShotCachePreprocessor`.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    name = name or NAME_PREFIX + Path(path).stem
    preprocessor_kwargs.setdefault('dataset_dir', os.path.dirname(path))
    meta = DatasetMeta(dataset_path=path, dataset_name=name, preprocess_func=ShotCachePreprocessor(
        **preprocessor_kwargs), tags=['video', 'sophia', 'shots'],
                       help='Sophia: shots of every video cached while the dataset is preprocessed')
    register_dataset(meta, exist_ok=exist_ok)
    return meta


def register_shot_dataset_preprocessor(paths: Union[None, str, List[str]] = None, **kwargs) -> List[DatasetMeta]:
    """Register every dataset file in ``paths`` (default: ``$SOPHIA_SHOT_DATASETS``, separated by
    ``os.pathsep`` or commas). Called by the plugin at import; a no-op when nothing is named."""
    if paths is None:
        paths = os.environ.get(DATASETS_ENV, '')
    if isinstance(paths, str):
        paths = [p for chunk in paths.split(os.pathsep) for p in chunk.split(',')]
    metas = []
    for p in paths:
        p = p.strip()
        if not p:
            continue
        if not os.path.isfile(os.path.expanduser(p)):
            logger.warning('%s names %s, which is not a file; not registered', DATASETS_ENV, p)
            continue
        metas.append(register_shot_dataset(p, **kwargs))
    return metas


def registered_shot_datasets() -> List[DatasetMeta]:
    return [m for m in DATASET_MAPPING.values() if isinstance(m.preprocess_func, ShotCachePreprocessor)]
