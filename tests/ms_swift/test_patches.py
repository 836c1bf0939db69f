"""Sophia changes ms-swift's commands only where the plugin is loaded: importing its modules (the template, the
registration, the patches themselves) changes nothing of ms-swift; the plugin file applies every patch, and applying
them again changes nothing more."""
import json
import subprocess
import sys

from swift_cli import env

CHECK = r'''
import inspect, json
from swift.arguments import EvalArguments
from swift.infer_engine.utils import TokensIteratorStreamer
from swift.pipelines.infer import deploy as ms_deploy
from swift.pipelines.infer.deploy import SwiftDeploy
from swift.pipelines.infer.infer import SwiftInfer
from swift.pipelines.infer.utils import InferCliState
from swift.pipelines.train.sft import SwiftSft
from swift.sequence_parallel import SequenceParallel
from swift.utils import SafeMediaPath, import_external_file

def raw(owner, name):
    value = inspect.getattr_static(owner, name, None)  # None: ms-swift has none (SwiftDeploy.infer_async)
    return getattr(value, "__func__", value)  # a staticmethod's or classmethod's function


PATCHED = {
    "SwiftDeploy.create_chat_completion": lambda: raw(SwiftDeploy, "create_chat_completion"),
    "SwiftDeploy.create_completion": lambda: raw(SwiftDeploy, "create_completion"),
    "SwiftDeploy.create_embedding": lambda: raw(SwiftDeploy, "create_embedding"),
    "SwiftDeploy.infer_async": lambda: raw(SwiftDeploy, "infer_async"),
    "SwiftDeploy._register_app": lambda: raw(SwiftDeploy, "_register_app"),
    "SwiftDeploy._prepare_request_media": lambda: raw(SwiftDeploy, "_prepare_request_media"),
    "SafeMediaPath.check": lambda: raw(SafeMediaPath, "check"),
    "deploy._deploy_main": lambda: ms_deploy._deploy_main,
    "SwiftInfer.infer_dataset": lambda: raw(SwiftInfer, "infer_dataset"),
    "SwiftInfer._batch_infer": lambda: raw(SwiftInfer, "_batch_infer"),
    "InferCliState.input_mm_data": lambda: raw(InferCliState, "input_mm_data"),
    "InferCliState.input_text": lambda: raw(InferCliState, "input_text"),
    "SwiftSft._get_resume_checkpoint": lambda: raw(SwiftSft, "_get_resume_checkpoint"),
    "EvalArguments.list_eval_dataset": lambda: raw(EvalArguments, "list_eval_dataset"),
    "TokensIteratorStreamer.__next__": lambda: raw(TokensIteratorStreamer, "__next__"),
    "SequenceParallel.prepare": lambda: raw(SequenceParallel, "prepare"),
    "SequenceParallel.prepare_inputs": lambda: raw(SequenceParallel, "prepare_inputs"),
}
try:
    from evalscope.models.utils import openai as es_openai
    PATCHED["evalscope openai_chat_completion_part"] = lambda: es_openai.openai_chat_completion_part
except ImportError:
    pass


def ours():
    return sorted(name for name, get in PATCHED.items() if getattr(get(), "__module__", "").startswith("swift_sophia"))


def current():
    return {name: get() for name, get in PATCHED.items()}


import swift_sophia.ms_swift.template
import swift_sophia.ms_swift.register
import swift_sophia.ms_swift.patches
from swift_sophia.ms_swift import patches
from swift_sophia.ms_swift.plugin_path import plugin_path
from swift_sophia.model import sequence_parallel

result = {"imported": ours(), "group_source": sequence_parallel._group_source is not None}
import_external_file(plugin_path())
result["plugin"] = ours()
after_plugin = current()
patches.apply()
result["again_unchanged"] = current() == after_plugin
result["group_source_after"] = sequence_parallel._group_source is not None
result["names"] = sorted(PATCHED)
print(json.dumps(result))
'''


def test_importing_changes_nothing_the_plugin_applies_every_patch_once():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == [] and not result["group_source"], result
    assert result["plugin"] == result["names"], result
    assert result["again_unchanged"] and result["group_source_after"], result
