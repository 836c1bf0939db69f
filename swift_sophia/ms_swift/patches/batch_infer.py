"""`swift infer --val_dataset ... --result_path R`: a bad row is recorded, not fatal, and a run resumes into R.

ms-swift stops at the first row whose video is missing, truncated, empty or not a video (or whose tags do not
match its videos) and writes nothing for the shard. Here:

* every good row is answered and written exactly as ms-swift writes it;
* a bad row is written too, as ``{"response": null, "error": "<the video and the reason>", "labels": ...,
  "logprobs": null, **row}`` (its messages without an answer), logged as it happens and listed in a summary at the
  end; the exit status stays 0 unless ``SOPHIA_INFER_STRICT=1`` (then 1, after everything is written);
* when R already exists, the rows answered in it are not asked again (matched by content: messages, videos, ...;
  so order and shuffling do not matter); rows recorded there as failed are asked again and their old records
  replaced. Results are written every ``--write_batch_size`` rows (ms-swift's option, default 1000): a smaller value
  makes an interrupted run lose less.

How: ms-swift's ``SwiftInfer._batch_infer`` (one shard of rows: encode, generate, build the result rows) is
replaced by the same code that asks the engine not to raise on rows it cannot encode (the engine's own
``strict=False`` mode, which returns the exception in the row's place); a batch that fails after encoding is
answered again one row at a time. ``SwiftInfer.infer_dataset`` is wrapped for what happens once per run: reading
R before, the summary and the strict exit after. The streaming path (``--stream true``) is ms-swift's, unchanged.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from copy import deepcopy
from typing import Any, Dict, List

from swift.infer_engine import InferRequest
from swift.pipelines.infer.infer import SwiftInfer
from swift.utils import get_logger, is_master

from ...video.source import describe

logger = get_logger()

STRICT_ENV = "SOPHIA_INFER_STRICT"
_RESULT_FIELDS = ("response", "error", "labels", "logprobs")
_SUMMARY_LINES = 20

_ms_infer_dataset = SwiftInfer.infer_dataset


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _key(row: Dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def _dataset_row_key(data: Dict[str, Any], task_type: str) -> str:
    """A dataset row as a result row records it: the question without its reference answer."""
    data = deepcopy(data)
    if task_type == "causal_lm":
        InferRequest.remove_response(data["messages"])
    else:
        data.pop("label", None)
    return _key(data)


def _result_row_key(row: Dict[str, Any]) -> str:
    row = {k: v for k, v in row.items() if k not in _RESULT_FIELDS}
    row["messages"] = list(row.get("messages") or [])[:-1]  # the answer ms-swift appended
    return _key(row)


def _is_failed(row: Dict[str, Any]) -> bool:
    return row.get("response") is None and row.get("error") is not None


def _error_message(exc: BaseException, data: Dict[str, Any]) -> str:
    msg = str(exc).strip() or type(exc).__name__
    names = [describe(v) for v in (data.get("videos") or []) + (data.get("images") or [])]
    if names and not any(n in msg for n in names):
        msg += f" (videos/images of the row: {', '.join(names[:4])})"
    return msg


def _read_previous_results(self) -> None:
    """Before a run: the rows already answered in --result_path (skipped), its failed rows (asked again)."""
    self._sophia_done = Counter()
    self._sophia_skipped = 0
    path = getattr(self.jsonl_writer, "fpath", None) or self.args.result_path
    if not path or not os.path.isfile(path):
        return
    kept, failed, broken = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by an interruption
                broken += line.strip() != ""
                continue
            if isinstance(row, dict) and _is_failed(row):
                failed += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
            if isinstance(row, dict) and isinstance(row.get("response"), str):
                self._sophia_done[_result_row_key(row)] += 1
    if (failed or broken) and is_master():
        tmp = f"{path}.sophia-tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    logger.info(f"[sophia] --result_path {path} exists: its {sum(self._sophia_done.values())} answered rows are "
                f"kept and not asked again; {failed} rows recorded there as failed are asked again (their old "
                f"records are replaced){f'; {broken} unreadable lines dropped' if broken else ''}. Give another "
                f"--result_path to start over.")


def infer_dataset(self) -> List[Dict[str, Any]]:
    args = self.args
    self._sophia_errors, self._sophia_offset = [], 0
    self._sophia_done, self._sophia_skipped = Counter(), 0
    if not args.stream and self.jsonl_writer is not None:
        _read_previous_results(self)
    result_list = _ms_infer_dataset(self)
    errors, path = self._sophia_errors, args.result_path
    if self._sophia_skipped:
        skipped = self._sophia_skipped
        logger.info(f"[sophia] {skipped} {'rows were' if skipped > 1 else 'row was'} already answered in {path} and "
                    f"{'were' if skipped > 1 else 'was'} not asked again.")
    if errors:
        lines = "\n".join(f"  row {i}: {msg}" for i, msg in errors[:_SUMMARY_LINES])
        more = f"\n  ... and {len(errors) - _SUMMARY_LINES} more" if len(errors) > _SUMMARY_LINES else ""
        rows = f"{len(errors)} row" + ("s" if len(errors) > 1 else "")
        logger.warning(f"[sophia] {rows} could not be answered; each is recorded in {path} with "
                       f"\"response\": null and its \"error\" (the other rows are answered):\n{lines}{more}")
        if _strict():
            raise SystemExit(f"[sophia] {rows} failed and {STRICT_ENV}=1: exit status 1 (all results, "
                             f"the failed rows included, are in {path}).")
    return result_list


def _infer_rows(self, rows: List[Dict[str, Any]], request_config) -> List[Any]:
    """The engine's answers, an exception in place of each row it could not answer."""
    engine = self.infer_engine
    had, strict = hasattr(engine, "strict"), getattr(engine, "strict", True)
    engine.strict = False  # the engine returns the exception of a row it cannot encode instead of raising it
    try:
        try:
            return self.infer(rows, request_config, use_tqdm=True, **self.infer_kwargs)
        except Exception as exc:  # noqa: BLE001  (a batch that failed after encoding)
            if len(rows) == 1:
                return [exc]
            logger.warning(f"[sophia] a batch of {len(rows)} rows failed ({str(exc)[:200]}); answering its rows "
                           f"one at a time")
            out = []
            for row in rows:
                try:
                    out += self.infer([row], request_config, use_tqdm=False, **self.infer_kwargs)
                except Exception as row_exc:  # noqa: BLE001
                    out.append(row_exc)
            return out
    finally:
        if had:
            engine.strict = strict
        else:
            del engine.strict


def _batch_infer(self, val_dataset, request_config):
    """ms-swift's ``SwiftInfer._batch_infer`` (same sharding, same result rows), with bad rows recorded and the rows
    already in --result_path left out."""
    args = self.args
    offset = self.__dict__.get("_sophia_offset", 0)
    self._sophia_offset = offset + len(val_dataset)
    index = list(range(offset, offset + len(val_dataset)))
    done = self.__dict__.get("_sophia_done")
    if done:
        keep = []
        for i, data in enumerate(val_dataset):
            k = _dataset_row_key(data, args.task_type)
            if done[k] > 0:
                done[k] -= 1
            else:
                keep.append(i)
        skipped = len(val_dataset) - len(keep)
        if skipped:
            self._sophia_skipped = self.__dict__.get("_sophia_skipped", 0) + skipped
            logger.info(f"[sophia] rows {offset}..{offset + len(val_dataset) - 1}: {skipped} already answered in "
                        f"{args.result_path}, {len(keep)} to answer")
            val_dataset = val_dataset.select(keep)
            index = [index[i] for i in keep]
    # ---- from here on, ms-swift's code (swift/pipelines/infer/infer.py, SwiftInfer._batch_infer)
    result_list = []
    if args.infer_backend == 'vllm':
        rank = args.rank // args.vllm_tensor_parallel_size if args.rank >= 0 else -1
        data_parallel_size = args.global_world_size // args.vllm_tensor_parallel_size
    else:
        rank, data_parallel_size = args.rank, args.global_world_size
    # The dataset is insufficient for DP partitioning
    if len(val_dataset) < data_parallel_size:
        if rank >= len(val_dataset):
            return []
        data_parallel_size = len(val_dataset)
    if rank >= 0 and data_parallel_size > 1:
        val_dataset = val_dataset.shard(data_parallel_size, rank, contiguous=True)
        div, mod = divmod(len(index), data_parallel_size)  # datasets' contiguous shard
        start = div * rank + min(rank, mod)
        index = index[start:start + div + (rank < mod)]
    val_dataset = list(val_dataset)
    labels_list = []
    for data in val_dataset:
        if args.task_type == 'causal_lm':
            labels = InferRequest.remove_response(data['messages'])
        else:
            labels = data.pop('label', None)
        labels_list.append(labels)

    resp_list = _infer_rows(self, val_dataset, request_config)
    if not (args.infer_backend == 'vllm' and rank >= 0
            and args.rank % args.vllm_tensor_parallel_size != 0):  # DP & TP
        for i, data, resp, labels in zip(index, val_dataset, resp_list, labels_list):
            if isinstance(resp, BaseException):
                msg = _error_message(resp, data)
                self.__dict__.setdefault("_sophia_errors", []).append((i, msg))
                logger.warning(f"[sophia] row {i} not answered: {msg}")
                result_list.append({'response': None, 'error': msg, 'labels': labels, 'logprobs': None, **data})
                continue
            response = resp.choices[0].message.content
            data['messages'].append({'role': 'assistant', 'content': response})
            data = {'response': response, 'labels': labels, 'logprobs': resp.choices[0].logprobs, **data}
            result_list.append(data)
    return result_list


def apply() -> None:
    SwiftInfer.infer_dataset = infer_dataset
    SwiftInfer._batch_infer = _batch_infer


__all__ = ["STRICT_ENV", "apply"]
