"""precompute_shots (CLI: errors per row, skip cached, interrupt + rerun) and the ms-swift dataset preprocessor."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from clips import write_clip
from swift_sophia.tools import precompute_shots as P

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(video, question='<video>What colour comes first?'):
    return {'messages': [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': 'red'}],
            'videos': [video]}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    (root / 'videos').mkdir()
    write_clip(root / 'videos' / 'a.mp4', [10, 10, 10])
    b = write_clip(root / 'b.mp4', [24], seed=1)
    (root / 'videos' / 'corrupt.mp4').write_bytes(os.urandom(3000))
    lines = [json.dumps(row('videos/a.mp4')),  # 1: relative to the jsonl's folder
             json.dumps(row(b)),  # 2: absolute
             json.dumps(row('videos/missing.mp4')),  # 3: missing
             json.dumps(row('videos/a.mp4', '<video>again')),  # 4: the same video as row 1
             '{not json',  # 5
             json.dumps(row('videos/corrupt.mp4')),  # 6: not a video
             '']
    (root / 'data.jsonl').write_text('\n'.join(lines))
    (root / 'good.jsonl').write_text('\n'.join(lines[:2] + lines[3:4]) + '\n')
    return root


def run_main(args, capsys):
    rc = P.main(args + ['--no-progress'])
    return rc, capsys.readouterr().err


def test_errors_are_reported_per_row_and_the_rest_is_cached(dataset, tmp_path, capsys):
    cache = tmp_path / 'cache'
    # the three videos go through one batched detector call; the corrupt one fails alone
    rc, err = run_main([str(dataset / 'data.jsonl'), '--workers', '0', '--cache-dir', str(cache),
                        '--batch-videos', '3'], capsys)
    assert rc == 1
    jl = str(dataset / 'data.jsonl')
    assert f'{jl}:3: video file not found: videos/missing.mp4' in err
    assert f'{jl}:5: invalid JSON' in err
    assert f'{jl}:6: ' + str(dataset / 'videos' / 'corrupt.mp4') in err and 'cannot decode' in err
    assert '3 distinct videos' in err  # a (rows 1 and 4), b, corrupt
    assert '2 computed, 0 already cached, 1 failed' in err
    entries = list(cache.rglob('*.json'))
    assert len(entries) == 2 and all('cuts' in json.loads(e.read_text()) for e in entries)
    # rerun: nothing is detected again; the same rows fail again
    rc, err = run_main([jl, '--workers', '0', '--cache-dir', str(cache)], capsys)
    assert rc == 1 and '0 computed, 2 already cached, 1 failed' in err
    # only good rows: success
    rc, err = run_main([str(dataset / 'good.jsonl'), '--workers', '0', '--cache-dir', str(cache)], capsys)
    assert rc == 0 and '0 computed, 2 already cached, 0 failed' in err


def test_precomputed_shots_are_what_training_reads(dataset, tmp_path, capsys):
    from swift_sophia.video.shots import ShotDetector, sampled_shots
    cache = tmp_path / 'cache'
    rc, _ = run_main([str(dataset / 'good.jsonl'), '--workers', '0', '--cache-dir', str(cache),
                      '--num-frames', '30'], capsys)
    assert rc == 0
    det = ShotDetector('cpu')
    shots = sampled_shots(str(dataset / 'videos' / 'a.mp4'), list(range(30)), cache=cache, detector=det)
    assert shots == [(0, 10), (10, 20), (20, 30)] and det.calls == 0 and not det.built


def test_interrupt_then_rerun(tmp_path, capsys):
    vids = tmp_path / 'v'
    vids.mkdir()
    n = 8
    for i in range(n):
        write_clip(vids / f'{i}.mp4', [30, 30], seed=i)
    jl = tmp_path / 'd.jsonl'
    jl.write_text(''.join(json.dumps(row(f'v/{i}.mp4')) + '\n' for i in range(n)))
    cache = tmp_path / 'cache'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + sys.path))
    proc = subprocess.Popen([sys.executable, '-m', 'swift_sophia', 'precompute-shots', str(jl), '--workers', '1',
                             '--threads', '1', '--cache-dir', str(cache), '--no-progress'],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # as in a terminal (a run started with `&` has SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not list(cache.rglob('*.json')) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert 'interrupted: rerun' in err
    entries = list(cache.rglob('*.json'))
    assert 1 <= len(entries) < n
    for e in entries:  # every entry that exists is complete
        assert isinstance(json.loads(e.read_text())['cuts'], list)
    rc, err = run_main([str(jl), '--workers', '0', '--cache-dir', str(cache)], capsys)
    assert rc == 0
    assert f'{n - len(entries)} computed, {len(entries)} already cached, 0 failed' in err
    assert len(list(cache.rglob('*.json'))) == n


# ------------------------------------------------------------------------------------- ms-swift registration
@pytest.fixture()
def swift_env(tmp_path, monkeypatch):
    monkeypatch.setenv('MODELSCOPE_CACHE', str(tmp_path / 'ms'))
    monkeypatch.setenv('SOPHIA_SHOT_CACHE', str(tmp_path / 'shots'))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_registered_preprocessor_caches_shots_when_ms_swift_loads_the_dataset(dataset, swift_env):
    from swift.dataset import load_dataset
    from swift.dataset.register import DATASET_MAPPING

    from swift_sophia.ms_swift.shots_preprocessor import (
        ShotCachePreprocessor,
        register_shot_dataset_preprocessor,
        registered_shot_datasets,
    )
    data = swift_env / 'mine'
    data.mkdir()
    (data / 'train.jsonl').write_text((dataset / 'data.jsonl').read_text().replace(
        'videos/', str(dataset / 'videos') + '/'))
    os.environ['SOPHIA_SHOT_DATASETS'] = str(data / 'train.jsonl')
    try:
        metas = register_shot_dataset_preprocessor()
    finally:
        del os.environ['SOPHIA_SHOT_DATASETS']
    assert len(metas) == 1 and metas[0] in registered_shot_datasets()
    assert DATASET_MAPPING['sophia-shots/train'].dataset_path == str(data / 'train.jsonl')
    assert isinstance(metas[0].preprocess_func, ShotCachePreprocessor)
    # '{not json' makes the json loader fail on the whole file: keep the rows without it
    lines = [ln for ln in (data / 'train.jsonl').read_text().splitlines() if ln.startswith('{"')]
    (data / 'train.jsonl').write_text('\n'.join(lines) + '\n')
    torch.ones(64, 64) @ torch.ones(64, 64)  # torch has run here: the forked map worker must not hang
    # The message comes from the forked worker through ms-swift's logger; whatever stream its handlers were
    # bound to by earlier tests, a file handler added here is inherited by the fork.
    import logging

    from swift.utils import get_logger
    log_file = swift_env / 'preprocess.log'
    handler = logging.FileHandler(log_file)
    get_logger().addHandler(handler)
    try:
        train, _ = load_dataset([str(data / 'train.jsonl')], num_proc=1)  # datasets forks a worker
    finally:
        get_logger().removeHandler(handler)
        handler.close()
    assert len(train) == 3  # rows 1, 2, 4; the missing and the corrupt videos' rows are dropped ...
    logged = log_file.read_text()
    assert 'shot detection failed' in logged
    assert 'missing.mp4' in logged and 'corrupt.mp4' in logged  # ... and each one said so
    assert len(list((swift_env / 'shots').rglob('*.json'))) == 2
    assert train[0]['messages'][0]['content'] == '<video>What colour comes first?'
    # the registered name works as well, and rows whose shots failed can be kept instead
    from swift_sophia.ms_swift.shots_preprocessor import register_shot_dataset
    register_shot_dataset(data / 'train.jsonl', name='sophia-shots/keep', on_error='keep')
    train, _ = load_dataset(['sophia-shots/keep'], num_proc=1, load_from_cache_file=False)
    assert len(train) == 5
