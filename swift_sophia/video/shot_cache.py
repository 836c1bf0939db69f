"""On-disk cache of shot boundaries (docs/pruning.md, "Caching").

An entry is a small JSON file named by a key that hashes

* the video's *content* (BLAKE2b of every byte, so a path and the same file handed over as bytes or
  ``BytesIO`` share an entry, and a renamed or copied file is still a hit),
* the detector settings (detector version, threshold, which frames the detector sees: always every frame).

The boundaries are video-level (native frame numbers), mapped onto any sampling, so one entry serves every
``num_frames`` / ``FPS``.

Writes are atomic (temporary file in the same folder, ``fsync``, ``os.replace``): an interrupted writer
leaves either no entry or a complete one, never a truncated file. A file that does not parse, or whose
stored key does not match its name, is treated as a miss and rewritten by the next ``put``.

The cache folder is ``$SOPHIA_SHOT_CACHE`` when set, else ``~/.cache/swift_sophia/shots``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .source import VideoSource

logger = logging.getLogger(__name__)

CACHE_ENV = 'SOPHIA_SHOT_CACHE'
CACHE_FORMAT = 1
_HASH_CHUNK = 1 << 20

# (realpath, size, mtime_ns) -> content hash. Per process; cleared with clear_content_hash_memo().
_HASH_MEMO: Dict[Tuple[str, int, int], str] = {}
_HASH_MEMO_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path('~/.cache/swift_sophia/shots').expanduser()


def _new_hasher():
    return hashlib.blake2b(digest_size=20)


def _hash_buffer(buf) -> str:
    h = _new_hasher()
    mv = memoryview(buf).cast('B')
    for i in range(0, len(mv), _HASH_CHUNK):
        h.update(mv[i:i + _HASH_CHUNK])
    return h.hexdigest()


def content_hash(src: VideoSource) -> str:
    """BLAKE2b-160 hex digest of the video's bytes.

    ``src`` is a path (``str``/``PathLike``), raw bytes, or a binary file object (``BytesIO`` as returned
    by ms-swift's ``load_file``). File objects are read from position 0 and their position is restored.
    Paths are memoised per process by ``(realpath, size, mtime_ns)``, so hashing a file twice costs one
    ``stat``.
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.path.realpath(os.fspath(src))
        st = os.stat(path)
        memo_key = (path, st.st_size, st.st_mtime_ns)
        with _HASH_MEMO_LOCK:
            hit = _HASH_MEMO.get(memo_key)
        if hit is not None:
            return hit
        h = _new_hasher()
        with open(path, 'rb') as f:
            while True:
                chunk = f.read(_HASH_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
        digest = h.hexdigest()
        with _HASH_MEMO_LOCK:
            _HASH_MEMO[memo_key] = digest
        return digest
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _hash_buffer(src)
    if isinstance(src, io.BytesIO):
        return _hash_buffer(src.getbuffer())
    if hasattr(src, 'read') and hasattr(src, 'seek'):
        pos = src.tell()
        try:
            src.seek(0)
            h = _new_hasher()
            while True:
                chunk = src.read(_HASH_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
            return h.hexdigest()
        finally:
            src.seek(pos)
    raise TypeError(f'cannot hash a video given as {type(src).__name__}')


def clear_content_hash_memo() -> None:
    with _HASH_MEMO_LOCK:
        _HASH_MEMO.clear()


def make_key(video_hash: str, settings: Dict[str, Any], sampling: Optional[Dict[str, Any]] = None) -> str:
    """Cache key: hash of the content hash, the detector settings and (optionally) the sampling."""
    payload = json.dumps({'format': CACHE_FORMAT, 'video': video_hash, 'settings': settings, 'sampling': sampling},
                         sort_keys=True, separators=(',', ':'))
    return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()


class ShotCache:
    """A folder of ``<key[:2]>/<key>.json`` entries. Safe for concurrent processes (atomic replace)."""

    def __init__(self, root: Union[str, os.PathLike, None] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f'ShotCache({str(self.root)!r})'

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f'{key}.json'

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        path = self.path_for(key)
        try:
            with open(path, 'r', encoding='utf-8') as f:
                entry = json.load(f)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError) as e:  # unreadable or corrupt: a miss, rewritten by the next put
            logger.warning('ignoring unreadable shot cache entry %s: %s', path, e)
            self.misses += 1
            return None
        if not isinstance(entry, dict) or entry.get('key') != key or entry.get('format') != CACHE_FORMAT \
                or not isinstance(entry.get('cuts'), list):
            logger.warning('ignoring malformed shot cache entry %s', path)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, entry: Dict[str, Any]) -> Path:
        entry = dict(entry, key=key, format=CACHE_FORMAT)
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{key}.', suffix='.tmp', dir=path.parent)
        try:
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                json.dump(entry, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def clean_temporaries(self, min_age_s: float = 600.0) -> int:
        """Remove temporary files left by killed writers (never read as entries) that are older than
        ``min_age_s`` (younger ones may belong to a writer still running). Returns how many."""
        import time
        n = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        for p in self.root.glob('*/.*.tmp'):
            try:
                if now - p.stat().st_mtime >= min_age_s:
                    p.unlink()
                    n += 1
            except OSError:
                pass
        return n


def resolve_cache(cache: Union[bool, None, str, os.PathLike, ShotCache]) -> Optional[ShotCache]:
    """``True`` -> the default cache; ``False``/``None`` -> no cache; a path -> that folder; a ShotCache."""
    if cache is True:
        return ShotCache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, ShotCache):
        return cache
    return ShotCache(cache)
