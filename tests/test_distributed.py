"""Real multi-process training on CPU: `NPROC_PER_NODE=2 swift sft` over gloo with DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Every run trains the tiny default for five steps on a mixed dataset ordered so that, in each step, the two ranks
hold different kinds of rows (with --per_device_train_batch_size 1 and no shuffling, ms-swift's BatchSamplerShard
gives rank r the rows r, r + 2, r + 4, ...):

    step   rank 0                      rank 1
    1      video (8 sampled frames)    text only
    2      text only                   video (3 frames)
    3      video (8 frames)            video (3 frames)
    4      image                       two videos (8 + 5 frames)
    5      text only                   image

A rank that calls a module its peer does not call crashes the run (gloo: "op.preamble.length <= op.nbytes ...
collective mismatch", DeepSpeed: "Detected a disagreement on list length", DDP: "Expected to have finished
reduction in the prior iteration"); a hang is cut by --ddp_timeout and by the subprocess timeout.

A small callback plugin written by the tests (`--external_plugins <probe> --callbacks rank_probe`) records on each
rank what its batches held, its own loss per step and a hash of all parameters (after every step outside ZeRO-3,
gathered at the end under ZeRO-3), so the tests check that the planned mix really happened, that the logged loss is
the mean of the ranks' losses, and that both ranks ended with one and the same model, the one in the checkpoint.

DeepSpeed runs use examples/deepspeed/zero{2,3}_cpu.json: ms-swift's own zero2/zero3 configs without the
`train_batch_size` key (on CPU processes accelerate counts one process and DeepSpeed's batch-size check fails).
The first DeepSpeed run on a machine builds DeepSpeed's C++ shared-memory op (about 2 minutes on 2 cores, cached
under ~/.cache/torch_extensions); the `deepspeed_op` fixture does that once, outside the timed runs.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deploy_process import free_port
from swift_cli import CPU_TRAIN, SWIFT, env, swift, train_losses
from swift_sophia.ms_swift.plugin_path import plugin_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ZERO2 = REPO / "examples" / "deepspeed" / "zero2_cpu.json"
ZERO3 = REPO / "examples" / "deepspeed" / "zero3_cpu.json"
RUN_TIMEOUT = 240  # one 2-process run takes about 25 s on 2 cores; a hang fails here
DDP_TIMEOUT = "120"  # torch.distributed's collective timeout inside the run (ms-swift's default is 18,000,000 s)
STEPS = 5
# (sampled frames per video, images) of each rank's batch in each step: the plan in the module docstring
PLAN = [
    (([8], 0), ([], 0)),
    (([], 0), ([3], 0)),
    (([8], 0), ([3], 0)),
    (([], 1), ([8, 5], 0)),
    (([], 0), ([], 1)),
]
STAGE1 = ["--tuner_type", "full", "--freeze_vit", "true", "--freeze_llm", "true", "--freeze_aligner", "false",
          "--learning_rate", "1e-3"]
STAGE2 = ["--tuner_type", "full", "--freeze_vit", "false", "--freeze_llm", "false", "--freeze_aligner", "false",
          "--learning_rate", "1e-3"]
STAGE3 = ["--tuner_type", "full", "--freeze_parameters_ratio", "1", "--trainable_parameters", "model.pruner",
          "--model_kwargs", json.dumps({"prune_alpha": 30, "prune_beta": 30}), "--learning_rate", "1e-2"]

PROBE = r'''
"""Test probe: per rank, what each batch held, the rank's own loss, a hash of all parameters."""
import hashlib, json, os

import torch.distributed as dist
from swift.callbacks import TrainerCallback, callbacks_map


def _hash(params):
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _digest(model, gather):
    names, params = zip(*sorted(model.named_parameters()))
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned and gather:  # ZeRO-3: every rank gathers (a collective), then hashes the full tensors
        import deepspeed
        with deepspeed.zero.GatheredParameters(partitioned):
            return list(names), _hash(params)
    return list(names), (None if partitioned else _hash(params))


class RankProbe(TrainerCallback):
    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.steps = []
        self.rank = os.environ.get("LOCAL_RANK", "0")
        compute_loss = trainer.compute_loss

        def probed(model, inputs, *a, **k):
            out = compute_loss(model, inputs, *a, **k)
            loss = out[0] if isinstance(out, tuple) else out
            counts = inputs.get("video_frame_counts")
            images = inputs.get("pixel_values")
            self.steps.append({"loss": float(loss.detach()),
                               "frames": [] if counts is None else counts.tolist(),
                               "images": 0 if images is None else int(images.shape[0])})
            return out

        trainer.compute_loss = probed

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.steps and model is not None and not args.deepspeed:  # DeepSpeed keeps its gradients elsewhere
            self.steps[-1]["no_grad"] = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                                                if p.requires_grad and p.grad is None})

    def _write(self, name, data):
        with open(os.path.join(self.args.output_dir, f"probe_{name}_rank{self.rank}.json"), "w") as f:
            json.dump(data, f)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.steps:
            self.steps[-1]["step"] = state.global_step
            self.steps[-1]["digest"] = _digest(model, gather=False)[1]
        self._write("steps", self.steps)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        names, digest = _digest(model, gather=True)
        self._write("final", {"rank": dist.get_rank() if dist.is_initialized() else None,
                              "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                              "backend": dist.get_backend() if dist.is_initialized() else None,
                              "steps": self.steps, "param_names": names, "digest": digest})


callbacks_map["rank_probe"] = RankProbe
'''


# --------------------------------------------------------------------------------------------- data and helpers
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed training set of the plan above, a small validation set and the probe plugin."""
    import random

    from PIL import Image

    from swift_sophia.tools.synthetic import QUESTIONS
    from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4

    root = tmp_path_factory.mktemp("mixed")
    rng = random.Random(7)

    def clip(name, shots, frames_per_shot):
        spec = random_clip_spec(rng, shots)
        path = str(root / f"{name}.mp4")
        write_mp4(path, render_clip(spec, frames_per_shot, seed=rng.randrange(1 << 20)))
        return path, spec[0]["background"]

    long, long_bg = clip("long", 3, 6)  # 18 frames: 8 sampled (the tiny default's num_frames)
    short, short_bg = clip("short", 1, 3)  # 3 frames: all taken
    mid, _ = clip("mid", 1, 5)  # 5 frames
    image = str(root / "image.png")
    spec = random_clip_spec(rng, 1)
    Image.fromarray(np.ascontiguousarray(render_clip(spec, 1, seed=1)[0])).save(image)

    def qa(question, answer, **media):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                **media}

    ask = QUESTIONS["first_color"]
    video8, video3 = qa("<video>" + ask, long_bg, videos=[long]), qa("<video>" + ask, short_bg, videos=[short])
    two = qa("<video><video>What color is the background of the first shot of the first video?", long_bg,
             videos=[long, mid])
    text = qa("Say hi.", "hi")
    img = qa("<image>What color is the background? Answer with one word.", spec[0]["background"], images=[image])
    # rank 0 takes the even rows, rank 1 the odd ones
    rows = [video8, text, text, video3, video8, video3, img, two, text, img]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in (video8, text, two)))
    probe = root / "rank_probe.py"
    probe.write_text(PROBE)
    return {"train": str(train), "val": str(val), "probe": str(probe)}


@pytest.fixture(scope="session")
def deepspeed_op():
    """Build (or load) DeepSpeed's C++ shared-memory comm op once, so that no timed run pays for the build."""
    code = ("import time; t = time.time(); from deepspeed.comm.torch import build_shm_op; build_shm_op(); "
            "print(f'deepspeed shm op ready in {time.time() - t:.0f} s')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout.strip().splitlines()[-1])


_ERROR = re.compile(r"Error|error:|mismatch|disagreement|enforce fail|what\(\)|did not receive grad|SIG[A-Z]+|"
                    r"\]: +rank\d+: \d+")


def _key_lines(log, limit=25):
    """The lines that say why a distributed run failed, without the traceback frames."""
    seen, keep = set(), []
    for line in log.splitlines():
        line = line.strip()
        if _ERROR.search(line) and "File \"" not in line and line not in seen:
            seen.add(line)
            keep.append(line[:400])
    return keep[-limit:]


class Run:
    def __init__(self, out, seconds, log):
        self.out, self.seconds, self.log = out, seconds, log
        self.ckpt = os.path.join(out, "last-checkpoint")
        self.ranks = [json.load(open(os.path.join(out, f"probe_final_rank{r}.json"))) for r in (0, 1)]


def train(model, data, out, *extra, deepspeed=None, timeout=RUN_TIMEOUT, retry_exit_abort=True):
    """`NPROC_PER_NODE=2 swift sft` with the probe; DDP (`--use_cpu true`) unless a DeepSpeed config is given.

    Once in several runs a gloo rank aborted at exit after both ranks had finished every step ("terminate called
    without an active exception"). The plugin destroys the process groups at exit; until that is known to be
    enough, such an exit (and only such) gets one more run. Any other failure fails."""
    cmd = [SWIFT, "sft", "--model", model, "--model_type", "sophia",
           "--external_plugins", plugin_path(), data["probe"], "--callbacks", "rank_probe",
           "--dataset", data["train"], "--output_dir", out, *CPU_TRAIN, "--gradient_checkpointing", "true",
           "--ddp_timeout", DDP_TIMEOUT, "--dataset_shuffle", "false", "--train_dataloader_shuffle", "false",
           "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_steps", str(STEPS),
           "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS),
           *(["--deepspeed", str(deepspeed)] if deepspeed else ["--use_cpu", "true"]), *extra]
    log_path = os.path.join(os.path.dirname(out), os.path.basename(out) + ".log")
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: the group this test started
            proc.wait()
            rc = None
    seconds = time.time() - start
    text = open(log_path).read()
    print(f"{os.path.basename(out)}: {seconds:.0f} s, exit {rc}")
    if rc != 0:
        steps = {}
        for r in (0, 1):
            p = os.path.join(out, f"probe_steps_rank{r}.json")
            if os.path.exists(p):
                steps[r] = [{k: v for k, v in s.items() if k != "digest"} for s in json.load(open(p))]
        finished = len(steps) == 2 and all(len(s) == STEPS for s in steps.values())
        if retry_exit_abort and finished and "terminate called without an active exception" in text:
            print(f"{os.path.basename(out)}: a rank aborted at exit after training; one more run")
            shutil.rmtree(out)
            return train(model, data, out, *extra, deepspeed=deepspeed, timeout=timeout, retry_exit_abort=False)
        why = "timed out (a hang)" if rc is None else f"exited {rc}"
        raise AssertionError(f"2-process swift sft {why} after {seconds:.0f} s; key lines:\n"
                             + "\n".join(_key_lines(text)) + f"\nsteps done per rank: {json.dumps(steps)}\n"
                             + f"log: {log_path}\n--- tail ---\n{text[-2500:]}")
    return Run(out, seconds, text)


def _hash_file(path, names):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    h = hashlib.sha256()
    for n in names:
        h.update(tensors[n].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _changed(before_dir, after_dir):
    before, after = load_file(os.path.join(before_dir, "model.safetensors")), load_file(
        os.path.join(after_dir, "model.safetensors"))
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def check_one_model(run, start_model, *, per_step=True):
    """Both ranks were one data-parallel job on the planned mix, and ended with the model in the checkpoint."""
    r0, r1 = run.ranks
    assert (r0["world_size"], r1["world_size"], r0["backend"]) == (2, 2, "gloo"), (r0["world_size"], r0["backend"])
    assert [s["step"] for s in r0["steps"]] == list(range(1, STEPS + 1))
    held = [((a["frames"], a["images"]), (b["frames"], b["images"])) for a, b in zip(r0["steps"], r1["steps"])]
    assert held == [tuple((list(f), i) for f, i in step) for step in PLAN], held
    # the logged loss of a step is the mean of the two ranks' losses
    logged = train_losses(run.out)
    assert len(logged) == STEPS, logged
    mean = [(a["loss"] + b["loss"]) / 2 for a, b in zip(r0["steps"], r1["steps"])]
    assert np.allclose(logged, mean, rtol=1e-3, atol=1e-4), (logged, mean)
    assert all(0 < x < 20 for x in logged)
    if per_step:  # the same parameters on both ranks after every step
        assert [s["digest"] for s in r0["steps"]] == [s["digest"] for s in r1["steps"]]
    assert r0["digest"] == r1["digest"] is not None
    assert _hash_file(run.ckpt, r0["param_names"]) == r0["digest"], "the checkpoint is not the trained model"
    return _changed(start_model, run.ckpt)


# --------------------------------------------------------------------------------------------- the runs
def test_ddp_stage2_mixed_batches_train_one_model(tiny_model_dir, mixed, tmp_path):
    """DDP (gloo, --use_cpu true) with gradient checkpointing, so DDP looks for no unused parameters: every
    trainable parameter must get a gradient on every rank in every step."""
    run = train(tiny_model_dir, mixed, str(tmp_path / "ddp"), *STAGE2)
    changed = check_one_model(run, tiny_model_dir)
    for part in ("model.vision_tower.", "model.aggregator.", "model.multi_modal_projector.", "model.language_model."):
        assert any(k.startswith(part) for k in changed), part
    for step in run.ranks[0]["steps"] + run.ranks[1]["steps"]:
        assert step["no_grad"] == [], step


def test_zero2_stage1_mixed_batches_train_one_model(tiny_model_dir, mixed, deepspeed_op, tmp_path):
    run = train(tiny_model_dir, mixed, str(tmp_path / "zero2_stage1"), *STAGE1, deepspeed=ZERO2)
    changed = check_one_model(run, tiny_model_dir)
    assert any(k.startswith("model.aggregator.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith(("model.language_model.", "lm_head.", "model.vision_tower.")) for k in changed)


@pytest.fixture(scope="module")
def zero3_stage2(tiny_model_dir, mixed, deepspeed_op, tmp_path_factory):
    return train(tiny_model_dir, mixed, str(tmp_path_factory.mktemp("zero3") / "stage2"), *STAGE2, deepspeed=ZERO3)


def test_zero3_stage2_mixed_batches_train_one_model(tiny_model_dir, zero3_stage2):
    changed = check_one_model(zero3_stage2, tiny_model_dir, per_step=False)
    for part in ("model.vision_tower.", "model.aggregator.", "model.multi_modal_projector.", "model.language_model."):
        assert any(k.startswith(part) for k in changed), part


def test_zero3_checkpoint_answers_in_swift_infer(zero3_stage2, mixed, tmp_path):
    result = tmp_path / "answers.jsonl"
    proc = swift("infer", "--model", zero3_stage2.ckpt, "--val_dataset", mixed["val"], "--infer_backend",
                 "transformers", "--max_new_tokens", "4", "--max_batch_size", "3", "--result_path", result,
                 timeout=RUN_TIMEOUT)
    rows = [json.loads(line) for line in open(result)]
    assert len(rows) == 3, proc.stdout[-2000:]
    assert all(isinstance(r["response"], str) and not r.get("error") for r in rows), rows
    assert [len(r.get("videos") or []) for r in rows] == [1, 0, 2]


@pytest.mark.parametrize("zero", ["zero3", "zero2"])
def test_stage3_pruner_trains_on_mixed_batches(tiny_model_dir, mixed, deepspeed_op, tmp_path, zero):
    run = train(tiny_model_dir, mixed, str(tmp_path / f"{zero}_stage3"), *STAGE3,
                deepspeed={"zero2": ZERO2, "zero3": ZERO3}[zero])
    changed = check_one_model(run, tiny_model_dir, per_step=zero != "zero3")
    assert any(k.startswith("model.pruner.query_mlp.") for k in changed), changed
    assert all(k.startswith("model.pruner.") for k in changed), changed


def test_cpu_deepspeed_configs_are_mswift_configs_without_train_batch_size():
    """The shipped configs stay ms-swift's own zero2/zero3, minus the one key that breaks CPU processes."""
    import swift

    for stage, path in ((2, ZERO2), (3, ZERO3)):
        ours = json.load(open(path))
        theirs = json.load(open(Path(swift.__file__).parent / "config" / f"zero{stage}.json"))
        theirs.pop("train_batch_size")
        assert ours == theirs



STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "nproc": os.environ.get("NPROC_PER_NODE")}) + "\\n")
if sys.argv[1:] == ["plugin-path"]:
    print("/plugin/sophia.py")
"""


def _commands(script, tmp_path, **extra_env):
    """Run an example script with `swift` and `sophia` replaced by stubs; return the commands it ran."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name in ("swift", "sophia"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), MODEL="/ckpt",
                   DATA_DIR="/data", OUT=str(tmp_path / "out"), **extra_env)
    proc = subprocess.run(["bash", str(REPO / "examples" / script), str(tmp_path / "work")], env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in open(log)]


@pytest.mark.parametrize("script, extra_env", [
    ("train_8gpu/stage1_align.sh", {}), ("train_8gpu/stage2_finetune.sh", {}), ("train_8gpu/stage3_prune.sh", {}),
    ("cpu_multiprocess.sh", {"MODE": "ddp", "STAGE": "2"}), ("cpu_multiprocess.sh", {"MODE": "zero3", "STAGE": "3"})])
def test_example_scripts_use_flags_this_ms_swift_takes(script, extra_env, tmp_path):
    """Run as written (with stub `swift`/`sophia`), each example's `swift sft` has only flags ms-swift 4.6 knows
    (4.x renamed --train_type to --tuner_type), is bounded by --ddp_timeout, and picks ms-swift's own zero2/zero3
    (on GPUs) or the shipped CPU variant, or DDP with --use_cpu on CPU processes."""
    from swift.arguments import SftArguments
    from transformers import HfArgumentParser

    sft = [c for c in _commands(script, tmp_path, **extra_env) if c["prog"] == "swift" and c["argv"][0] == "sft"]
    assert len(sft) == 1
    ns, unknown = HfArgumentParser(SftArguments).parse_known_args(sft[0]["argv"][1:])
    assert unknown == [], unknown
    assert ns.tuner_type == "full" and ns.gradient_checkpointing
    assert 60 <= ns.ddp_timeout <= 7200, ns.ddp_timeout
    if script.startswith("train_8gpu"):
        assert sft[0]["nproc"] == "8" and ns.deepspeed in ("zero2", "zero3")
    elif extra_env["MODE"] == "ddp":
        assert ns.use_cpu and ns.deepspeed is None
    else:
        assert Path(ns.deepspeed) == ZERO3 and Path(ns.deepspeed).exists()
