"""Inference over an extended sequence: free each [tokens x hidden] tensor as soon as nothing reads it again.

transformers' decoder code keeps tensors alive until its functions return: the decoder's forward holds its input
embeddings to the end, an attention module holds its normed input until it returns, and its output projection
allocates a new tensor while its input (the attention output) is still held. At 250K+ tokens each of these is
several GiB. Without autograd (a prefill for `swift infer` / `swift deploy`), and only while the decoder runs on an
extended sequence, Sophia hooks the decoder so that

* the input embeddings are freed once the first layer has read them;
* each layer's normed attention input is freed once its q, k and v projections have read it;
* each layer's output projection writes its result over its input (row by row, a chunk at a time: output row i
  depends on input row i only), so no second [tokens x hidden] tensor is allocated.

A freed tensor keeps its shape but has no storage: anything that read it afterwards would fail loudly, not read
stale values. Modules this cannot see into (a LoRA-wrapped or quantised projection) are left as they are.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn import functional as F

IN_PLACE_CHUNK_TOKENS = 8192  # rows of the output projection computed at a time when it writes over its input


def _free(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear  # not a PEFT / bitsandbytes / Liger wrapper: its forward is F.linear


class InferenceMemory:
    """The hooks above on `decoder` for one forward over `embeddings`; `remove()` takes them off."""

    def __init__(self, decoder: nn.Module, embeddings: torch.Tensor):
        self._handles: List = []
        self._projections: List = []
        layers = decoder.layers
        self._handles.append(layers[0].register_forward_hook(self._free_embeddings(embeddings), with_kwargs=True))
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            q, k, v, o = (getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
            if all(_plain_linear(m) for m in (q, k, v)):
                self._free_normed_input_after(layer, (q, k, v))
            if _plain_linear(o) and o.in_features == o.out_features and "forward" not in o.__dict__:
                o.forward = _InPlaceLinear(o)  # (an instance forward already there: accelerate's offloading hooks)
                self._projections.append(o)

    @staticmethod
    def _free_embeddings(embeddings):
        def free(module, args, kwargs, output):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is embeddings:
                _free(embeddings)
        return free

    def _free_normed_input_after(self, layer, projections):
        state = {}  # data pointers only: a reference would keep every layer's input alive

        def remember_layer_input(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            state.update(residual=hidden.untyped_storage().data_ptr(), inputs=[])

        def count_reads(module, args, output):
            normed = args[0]
            state["inputs"].append(id(normed))
            # after the last of q, k, v, when all three read this tensor; never the layer's input itself (a
            # decoder without an input norm)
            if len(state["inputs"]) == len(projections) and len(set(state["inputs"])) == 1 and \
                    normed.untyped_storage().data_ptr() != state["residual"]:
                _free(normed)

        self._handles.append(layer.register_forward_pre_hook(remember_layer_input, with_kwargs=True))
        self._handles += [m.register_forward_hook(count_reads) for m in projections]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._projections:
            del module.forward  # back to the class's forward
        self._handles, self._projections = [], []


class _InPlaceLinear:
    """`nn.Linear.forward` of a square projection that writes its output over its input (when that is a
    contiguous tensor of its own), a chunk of rows at a time."""

    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        rows = x.numel() // x.shape[-1]
        if rows <= IN_PLACE_CHUNK_TOKENS or not x.is_contiguous() or x.dtype != weight.dtype or \
                torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        flat = x.view(rows, x.shape[-1])
        for start in range(0, rows, IN_PLACE_CHUNK_TOKENS):
            part = flat[start:start + IN_PLACE_CHUNK_TOKENS]
            part.copy_(F.linear(part, weight, bias))
        return x


__all__ = ["InferenceMemory", "IN_PLACE_CHUNK_TOKENS"]
