"""Sequence parallelism over Sophia's extended sequence, in real processes on CPU (torch.distributed over gloo).

1. `sharded_hierarchical_attention` on 2 processes (each holding half of every row's tokens) equals the unsharded
   kernel: outputs and the gradients of q, k, v, with GQA, packed rows, padding, and rows longer than the layout.
2. `NPROC_PER_NODE=2 swift sft --sequence_parallel_size 2` (ms-swift's own sequence parallelism, one data-parallel
   rank) trains exactly like a single-process `swift sft` on the same batches: the same loss and gradient norm at
   every step (the second step starts from the parameters the first step updated). The batches mix video rows of
   different lengths, padding and a text-only row; every module trains, pruning on (Gumbel-Softmax in training:
   both ranks of the group must keep the same frames, which the run checks before every decoder call). The LM
   head runs on each rank's label positions only (no [tokens x vocab] logits; ms-swift's own loss under sequence
   parallelism takes logits over the rank's whole slice).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deploy_process import free_port
from swift_cli import CPU_TRAIN, SWIFT, env, train_losses
from swift_sophia.ms_swift.plugin_path import plugin_path

TIMEOUT = 150  # a run takes about 40 s on 2 idle cores; a hang in a collective fails here

KERNEL_WORKER = r'''
import json, os, random, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
from layouts import random_layout
from sophia_kernels import hierarchical_attention
from swift_sophia.model.sequence_parallel import sharded_hierarchical_attention

dist.init_process_group("gloo", init_method=os.environ["INIT"], rank=int(os.environ["RANK"]), world_size=2)
rank, errors, scale = dist.get_rank(), [], []
for seed in range(6):
    rng = random.Random(seed)
    layout, n = random_layout(rng, rows=2, seqs=(1, 2), p_pad_end=0.5)
    n += -n % 2 + 2 * (seed % 2)  # rows longer than the layout: trailing padding
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    up = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64)
    full = hierarchical_attention(q, k, v, layout, implementation="reference")
    full.backward(up)
    part = slice(rank * n // 2, (rank + 1) * n // 2)
    mine = [x.detach()[:, :, part].clone().requires_grad_(True) for x in (q, k, v)]
    out = sharded_hierarchical_attention(*mine, layout, dist.group.WORLD, implementation="reference")
    out.backward(up[:, :, part])
    errors.append(max(float((a - b).detach().abs().max()) for a, b in
                      [(out, full[:, :, part])] + [(m.grad, x.grad[:, :, part]) for m, x in zip(mine, (q, k, v))]))
    scale.append(float(full.detach()[:, :, part].abs().max()))
with open(os.environ["RESULT"], "w") as f:
    json.dump({"errors": errors, "scale": scale}, f)
# Leave without the interpreter's teardown, once both ranks are done: once in many runs a gloo rank aborted in the
# static teardown after its work was done ("terminate called without an active exception", exit -6), which says
# nothing about the kernel under test.
dist.barrier()
sys.stdout.flush()
os._exit(0)
'''


def _wait(procs, logs, timeout):
    """Wait for every process group started here; kill them all on a timeout. Returns the exit codes."""
    deadline, codes = time.time() + timeout, []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc, code in zip(procs, codes):
        if code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for log, code in zip(logs, codes):
        assert code == 0, f"{log}: {'timed out (a hang)' if code is None else f'exited {code}'}\n" + \
            Path(log).read_text()[-4000:]


def test_sharded_kernel_equals_the_unsharded_kernel(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(KERNEL_WORKER)
    init = f"tcp://127.0.0.1:{free_port()}"
    procs, logs, results = [], [], []
    for rank in (0, 1):
        results.append(tmp_path / f"errors{rank}.json")
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env=env(RANK=str(rank), INIT=init, RESULT=str(results[-1]),
                        TESTS_DIR=str(Path(__file__).parents[1]), OMP_NUM_THREADS="1")))
    _wait(procs, logs, TIMEOUT)
    for result in results:
        got = json.loads(result.read_text())
        assert len(got["errors"]) == 6 and max(got["errors"]) < 1e-12, got
        assert min(got["scale"]) > 0.1, got  # every shard has attended tokens


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    """Two batches of two rows: (8-frame video, 3-frame video), (text only, 5-frame video)."""
    from swift_sophia.tools.synthetic import QUESTIONS
    from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4

    root, rng = tmp_path_factory.mktemp("sp_data"), random.Random(3)

    def video(name, shots, per_shot):
        spec = random_clip_spec(rng, shots)
        path = str(root / f"{name}.mp4")
        write_mp4(path, render_clip(spec, per_shot, seed=rng.randrange(1 << 20)))
        return {"messages": [{"role": "user", "content": "<video>" + QUESTIONS["first_color"]},
                             {"role": "assistant", "content": spec[0]["background"]}], "videos": [path]}

    text = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    rows = [video("a", 3, 6), video("b", 1, 3), text, video("c", 1, 5)]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# A second plugin for the sequence-parallel run: records, for every forward of the model on each rank, the rows the
# LM head ran on, the rank's target count and whether logits came back.
LM_HEAD_OBSERVER = r'''
import json, os
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

_forward = SophiaForConditionalGeneration.forward


def forward(self, *args, **kwargs):
    rows = []
    hook = self.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[:-1].numel()))
    try:
        out = _forward(self, *args, **kwargs)
    finally:
        hook.remove()
    targets = kwargs.get("shift_labels")
    with open(os.environ["LM_HEAD_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
        f.write(json.dumps({"rows": rows, "targets": None if targets is None else int((targets != -100).sum()),
                            "logits": out.logits is not None}) + "\n")
    return out


SophiaForConditionalGeneration.forward = forward
'''


def _sft(model, data, out, *extra, nproc, plugins=()):
    cmd = [SWIFT, "sft", "--model", model, "--model_type", "sophia", "--external_plugins", plugin_path(), *plugins,
           "--dataset", data, "--output_dir", out, *CPU_TRAIN, "--dataset_shuffle", "false",
           "--train_dataloader_shuffle", "false", "--per_device_train_batch_size", "2",
           "--gradient_accumulation_steps", "1", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
           "--tuner_type", "full", "--learning_rate", "1e-3", "--ddp_timeout", "120",
           "--model_kwargs", json.dumps({"prune_alpha": 30, "prune_beta": 30}), *extra]
    log = out + ".log"
    extra_env = dict(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port())) if nproc > 1 else {}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env(LM_HEAD_LOG=out + ".lm_head", **extra_env))
    return proc, log


def _grad_norms(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "logging.jsonl"))]
    return [float(r["grad_norm"]) for r in rows if "grad_norm" in r]


@pytest.mark.slow
def test_swift_sft_sequence_parallel_trains_like_one_process(tiny_model_dir, mixed_rows, tmp_path):
    single, parallel = str(tmp_path / "single"), str(tmp_path / "sp2")
    observer = tmp_path / "lm_head_observer.py"
    observer.write_text(LM_HEAD_OBSERVER)
    sp_args = ("--use_cpu", "true", "--sequence_parallel_size", "2")
    runs = [_sft(tiny_model_dir, mixed_rows, single, nproc=1),
            _sft(tiny_model_dir, mixed_rows, parallel, *sp_args, nproc=2, plugins=[str(observer)])]
    try:
        _wait([p for p, _ in runs], [log for _, log in runs], TIMEOUT)
    except AssertionError:
        # Once in several runs a gloo rank aborted after training had finished ("terminate called without an
        # active exception" at exit). The plugin now destroys the process groups at exit; until that is known to
        # be enough, such an exit (and only such) gets one more run. Any other failure fails here.
        text = Path(runs[1][1]).read_text()
        if runs[0][0].returncode != 0 or "terminate called without an active exception" not in text or \
                len(train_losses(parallel)) != 2:
            raise
        for path in Path(parallel).parent.glob(Path(parallel).name + ".lm_head.*"):
            path.unlink()
        shutil.rmtree(parallel)
        runs[1] = _sft(tiny_model_dir, mixed_rows, parallel, *sp_args, nproc=2, plugins=[str(observer)])
        _wait([runs[1][0]], [runs[1][1]], TIMEOUT)
    assert "Sophia: the extended sequence is split over 2 ranks" in Path(runs[1][1]).read_text()
    losses, sp_losses = train_losses(single), train_losses(parallel)
    assert len(losses) == len(sp_losses) == 2, (losses, sp_losses)
    np.testing.assert_allclose(sp_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(_grad_norms(parallel), _grad_norms(single), rtol=1e-5)
    for rank in (0, 1):  # each rank's LM head ran on its label positions only, once per step, and gave no logits
        calls = [json.loads(line) for line in open(f"{parallel}.lm_head.{rank}")]
        assert len(calls) == 2, calls
        for call in calls:
            assert call["targets"] is not None and call["rows"] == [call["targets"]] and not call["logits"], call
    assert sum(c["targets"] for r in (0, 1) for c in map(json.loads, open(f"{parallel}.lm_head.{r}"))) > 0
