"""Sequence parallelism (`swift sft --sequence_parallel_size P`, Ulysses): the ms-swift half. The torch half (the
sharded kernel, the hooks that gather and split the sequence) is `swift_sophia/model/sequence_parallel.py`.

`apply` (the plugin runs it) makes ms-swift's sequence parallelism drive Sophia's:

* `active_group` gives the model ms-swift's sequence-parallel group while its sequence parallelism is on;
* ms-swift's `SequenceParallel.prepare` (which `swift sft` calls after loading the model) hooks every SophiaModel;
* the loss comes from the label positions only. ms-swift's trainer takes the labels out of the model's inputs under
  sequence parallelism and computes the loss from logits over the rank's whole slice ([B, N/P, vocab]: at 1M
  tokens on 8 ranks, 48 GB of float32 logits per rank). Here the rank's labels also go to the model as
  `shift_labels` (`SequenceParallel.prepare_inputs`), the model returns the cross-entropy per position
  (`token_loss`, the LM head run at the label positions only) and no logits in training, and ms-swift's
  `per_token_loss_func_sp` gathers that instead of computing it from logits.
"""
from __future__ import annotations

import torch
from swift.sequence_parallel import GatherLoss, SequenceParallel, sequence_parallel
from swift.utils import get_logger

from ..model import sequence_parallel as torch_half
from ..model.modeling_sophia import SophiaModel


def active_group():
    """The sequence-parallel process group while ms-swift's sequence parallelism is on, else None."""
    sp = sequence_parallel
    if not sp.enabled():
        return None
    if sp.rp_world_size > 1:
        raise NotImplementedError(
            f"Sophia's hierarchical attention supports Ulysses sequence parallelism only: --sequence_parallel_size "
            f"{sp.world_size} needs ring attention ({sp.rp_world_size} rings) because the decoder has "
            f"{sp.num_heads} key/value heads; use a size that divides the key/value head count")
    return sp.sp_group if sp.sp_world_size > 1 else None


def attach(model, sp) -> list:
    """Hook every SophiaModel inside `model` (after ms-swift's `prepare`); returns the hook handles."""
    group = sp.sp_group
    handles = []
    for module in model.modules():
        if isinstance(module, SophiaModel) and not getattr(module, "_sophia_sequence_parallel", False):
            handles += torch_half.hook_model(module, group)
            module._sophia_sequence_parallel = True
    if handles:
        get_logger().info(f"Sophia: the extended sequence is split over {sp.sp_world_size} ranks; hierarchical "
                          "attention runs on each rank's heads over the full sequence")
    return handles


def gather_token_loss(token_loss: torch.Tensor, labels: torch.Tensor, enable_dft_loss: bool = False,
                      return_labels: bool = False, **kwargs):
    """ms-swift's `per_token_loss_func_sp` from the model's per-position cross-entropy instead of logits: DFT's
    reweighting, then the same gather over the group (its lines after the cross-entropy)."""
    sp = sequence_parallel
    loss = token_loss.reshape(-1).to(labels.device)
    if enable_dft_loss:
        with torch.no_grad():
            target_probs = torch.exp(-loss)
        loss = loss * target_probs
    batch = labels.shape[0]
    position_ids = sp.real_position_ids
    if position_ids is not None:
        position_ids = sp.pad(position_ids, padding_value=-1, position_ids=position_ids)
    loss, labels = GatherLoss.apply(loss.reshape(batch, -1), labels.reshape(batch, -1), 1, position_ids)
    if position_ids is not None and position_ids.min() == -1:
        real = position_ids >= 0
        loss, labels = loss[real].contiguous(), labels[real].contiguous()
    return (loss, labels) if return_labels else loss


def _patch_swift_loss() -> None:
    import swift.trainers.seq2seq_trainer as trainer

    original = trainer.per_token_loss_func_sp
    if getattr(original, "sophia", False):
        return

    def per_token_loss_func_sp(outputs, labels, **kwargs):
        token_loss = getattr(outputs, "token_loss", None)
        if token_loss is None:  # not Sophia, or a model output without targets
            return original(outputs, labels, **kwargs)
        return gather_token_loss(token_loss, labels, **kwargs)

    per_token_loss_func_sp.sophia = True
    trainer.per_token_loss_func_sp = per_token_loss_func_sp


def apply() -> None:
    """Make ms-swift's `SequenceParallel.prepare` hook Sophia, and its `prepare_inputs` (which splits the labels)
    give the model this rank's labels as `shift_labels` (transformers' name for already-shifted targets); the
    model's attention finds ms-swift's group through `active_group`. Idempotent."""
    torch_half.set_group_source(active_group)
    original, original_prepare_inputs = SequenceParallel.prepare, SequenceParallel.prepare_inputs
    if getattr(original, "sophia", False):
        return

    def prepare(self, sp_size, model, *args, **kwargs):
        original(self, sp_size, model, *args, **kwargs)
        if sp_size > 1 and self.rp_world_size == 1 and attach(model, self):
            _patch_swift_loss()
            self.sophia_shift_labels = True

    def prepare_inputs(self, inputs):
        original_prepare_inputs(self, inputs)
        if getattr(self, "sophia_shift_labels", False) and inputs.get("labels") is not None:
            inputs["shift_labels"] = inputs["labels"]  # already shifted and split: this rank's targets

    prepare.sophia = True
    SequenceParallel.prepare, SequenceParallel.prepare_inputs = prepare, prepare_inputs


__all__ = ["active_group", "attach", "gather_token_loss", "apply"]
