"""Issue 11: `swift infer` survives what users do. Interactive mode: quoted paths, Ctrl-D, a bad VIDEO_SEGMENTS.
Batch mode (`--val_dataset`): bad rows are recorded, good rows answered, an interrupted run resumes.

Every test runs the real `swift infer` on the tiny model (no training needed)."""
import json
import subprocess
from types import SimpleNamespace

import pytest

from swift_cli import SWIFT, env, swift
from swift_sophia.ms_swift.plugin_path import plugin_path

pytestmark = pytest.mark.slow

QUESTION = "<video>What color is the background of the first shot? Answer with one word."
MS_SWIFT_FIELDS = ["response", "labels", "logprobs", "messages", "videos", "dataset"]


def _infer_args(model, args):
    return ["infer", "--model", model, "--model_type", "sophia", "--external_plugins", plugin_path(),
            "--infer_backend", "transformers", "--max_new_tokens", "3", *args]


def infer_ok(model, *args, input=None, extra_env=None):
    """`swift infer` on the tiny model, which must exit 0; returns the process and its whole output."""
    proc = swift(*_infer_args(model, args), timeout=300, input=input, extra_env=extra_env)
    return proc, proc.stdout + proc.stderr


def infer_any(model, *args, input=None, extra_env=None):
    """The same, whatever the exit status."""
    proc = subprocess.run([SWIFT, *map(str, _infer_args(model, args))], capture_output=True, text=True,
                          timeout=300, env=env(**(extra_env or {})), input=input)
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def video(synthetic_data):
    return json.loads(open(synthetic_data["val"]).readline())["videos"][0]


# ------------------------------------------------------------------------------------------- interactive mode
def test_interactive_quoted_paths_then_ctrl_d_at_the_video_prompt(tiny_model_dir, video, tmp_path):
    result = tmp_path / "chat.jsonl"
    # Two questions with the path quoted as a shell drag-and-drop gives it ('...' and "..."), then a third whose
    # video prompt gets end of input (Ctrl-D).
    script = f"{QUESTION}\n'{video}'\n{QUESTION}\n\"{video}\"\n{QUESTION}\n"
    proc, text = infer_ok(tiny_model_dir, "--stream", "false", "--result_path", result, input=script)
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "EOFError" not in text, text[-3000:]
    assert "not found" not in text, text[-3000:]
    assert text.count("-" * 50) == 2  # both questions answered
    assert "end of input: session ended" in text
    rows = [json.loads(line) for line in open(result)]
    assert [r["videos"] for r in rows] == [[video], [video, video]]  # the paths without their quotes


def test_interactive_ctrl_d_at_the_question_prompt(tiny_model_dir):
    proc, text = infer_ok(tiny_model_dir, "--stream", "false", input="")
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]


def test_video_segments_not_a_number_is_named(tiny_model_dir, video):
    proc, text = infer_any(tiny_model_dir, "--stream", "false", input=f"{QUESTION}\n{video}\nexit\n",
                           extra_env={"VIDEO_SEGMENTS": "abc"})
    assert proc.returncode != 0
    assert "VIDEO_SEGMENTS='abc'" in text and "invalid literal for int()" not in text, text[-3000:]


# ------------------------------------------------------------------------------------------------ batch mode
@pytest.fixture(scope="module")
def mixed_rows(synthetic_data, tmp_path_factory):
    """A validation jsonl of 3 good rows and 5 bad ones (missing, truncated, zero-byte and non-video files, and a
    row with two <video> tags for one video), with the words each bad row's error must contain."""
    d = tmp_path_factory.mktemp("bad-rows")
    good = [json.loads(line) for line in open(synthetic_data["val"])][:3]
    data = open(good[0]["videos"][0], "rb").read()
    (d / "truncated.mp4").write_bytes(data[:len(data) // 3])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_bytes(b"not a video " * 100)

    def row(videos, content=None):
        messages = json.loads(json.dumps(good[0]["messages"]))
        if content:
            messages[0]["content"] = content
        return {"messages": messages, "videos": videos}

    bad = [
        (row([str(d / "missing.mp4")]), [str(d / "missing.mp4"), "not found"]),
        (row([str(d / "truncated.mp4")]), [str(d / "truncated.mp4"), "cannot decode"]),
        (row([str(d / "empty.mp4")]), [str(d / "empty.mp4")]),
        (row(good[1]["videos"], "<video><video>Which two?"), ["2 <video> tag(s) but 1 video(s)",
                                                              good[1]["videos"][0]]),
        (row([str(d / "text.mp4")]), [str(d / "text.mp4"), "cannot decode"]),
    ]
    rows = [good[0], bad[0][0], bad[1][0], good[1], bad[2][0], bad[3][0], bad[4][0], good[2]]
    expected_errors = {1: bad[0][1], 2: bad[1][1], 4: bad[2][1], 5: bad[3][1], 6: bad[4][1]}
    path = d / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, expected_errors


@pytest.fixture(scope="module")
def batch_run(tiny_model_dir, mixed_rows, tmp_path_factory):
    path, _, _ = mixed_rows
    result = tmp_path_factory.mktemp("batch") / "result.jsonl"
    proc, text = infer_any(tiny_model_dir, "--val_dataset", path, "--result_path", result, "--max_batch_size", "2")
    return proc, text, result


def test_batch_records_bad_rows_and_answers_good_ones(batch_run, mixed_rows):
    proc, text, result = batch_run
    _, rows, expected_errors = mixed_rows
    assert proc.returncode == 0, text[-3000:]
    out = [json.loads(line) for line in open(result)]
    assert len(out) == len(rows)
    assert [r["videos"] for r in out] == [r["videos"] for r in rows]  # every row, in order
    for i, r in enumerate(out):
        if i in expected_errors:
            assert r["response"] is None and r["logprobs"] is None, r
            for word in expected_errors[i]:
                assert word in r["error"], (word, r["error"])
            assert r["messages"] == rows[i]["messages"][:1] and r["labels"] == rows[i]["messages"][1]["content"]
            assert f"row {i}: {r['error']}" in text  # the summary
        else:  # exactly what ms-swift writes for an answered row
            assert list(r) == MS_SWIFT_FIELDS and "error" not in r
            assert isinstance(r["response"], str) and r["response"]
            assert r["messages"] == [rows[i]["messages"][0], {"role": "assistant", "content": r["response"]}]
            assert r["labels"] == rows[i]["messages"][1]["content"]
    assert f"{len(expected_errors)} rows could not be answered" in text


def test_batch_resumes_and_strict_mode_exits_nonzero(tiny_model_dir, batch_run, mixed_rows, tmp_path):
    _, _, full = batch_run
    path, rows, expected_errors = mixed_rows
    lines = open(full).readlines()
    # An interrupted run: the first 4 rows written (2 answered, 2 failed), the 5th cut off mid-line.
    result = tmp_path / "result.jsonl"
    result.write_text("".join(lines[:4]) + lines[4][:40])
    proc, text = infer_any(tiny_model_dir, "--val_dataset", path, "--result_path", result, "--max_batch_size", "2",
                           extra_env={"SOPHIA_INFER_STRICT": "1"})
    assert proc.returncode == 1, text[-3000:]
    assert "its 2 answered rows are kept and not asked again; 2 rows recorded there as failed are asked again" in text
    assert "2 already answered" in text and f"{len(rows) - 2} to answer" in text
    assert "SOPHIA_INFER_STRICT=1" in text and "Traceback" not in text, text[-3000:]
    # Everything is written once, as by the uninterrupted run.
    assert sorted(open(result).readlines()) == sorted(lines)


def test_a_batch_that_fails_after_encoding_is_answered_row_by_row():
    from swift_sophia.ms_swift.patches.batch_infer import _infer_rows

    class Pipeline:
        infer_kwargs = {}
        infer_engine = SimpleNamespace()

        def infer(self, rows, request_config, use_tqdm=None):
            assert self.infer_engine.strict is False
            if len(rows) > 1:
                raise RuntimeError("out of memory")
            if rows[0] == "bad":
                raise RuntimeError("row failed")
            return [f"answer to {rows[0]}"]

    p = Pipeline()
    out = _infer_rows(p, ["a", "bad", "b"], None)
    assert out[0] == "answer to a" and out[2] == "answer to b" and str(out[1]) == "row failed"
    assert not hasattr(p.infer_engine, "strict")  # the engine's setting is restored
