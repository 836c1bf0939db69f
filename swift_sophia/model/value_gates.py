"""Stage 3's straight-through gates on the attention values of the kept frames.

In training the pruner's gate of a kept shot is exactly 1 in the forward pass; its gradient should say how much the
loss wants the sequence to read from that shot: the sum, over every decoder layer and every token of the shot, of
``<dL/dv, v>`` for the token's attention values ``v`` (the derivative of scaling those values by the gate at 1).
Multiplying the values by the gate inside each layer computes exactly that, but the gate is then a tensor with a
gradient path that every layer reads from a keyword argument, and reentrant gradient checkpointing (ms-swift's
default on one process and under DeepSpeed) neither differentiates keyword arguments nor lets every layer's
recomputation run backward through the same pruner graph.

So the values pass unchanged. :class:`ValueGateGradient` goes into the decoder as the keyword argument
``sophia_value_gate``; the attention router hands the values of each layer through :meth:`ValueGateGradient.watch`,
an identity whose backward adds ``<dL/dv, v>`` per token to one ``[B, N]`` buffer (the values are saved like any
other activation: freed after the backward, recomputed under checkpointing). :meth:`ValueGateGradient.attach` ties
the decoder's input to the per-token gates through an identity whose backward runs only once the gradient of that
input is complete, that is after every layer's backward, and hands the buffer to the gates."""
from __future__ import annotations

import torch


class ValueGateGradient:
    """The gradient of the loss with respect to every token's value gate, gathered while the decoder runs backward."""

    def __init__(self, batch: int, length: int, device):
        self.buffer = torch.zeros(batch, length, dtype=torch.float32, device=device)

    def watch(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` ``[B, H, N, D]`` unchanged (N may extend past the gated tokens: padding); its backward adds to
        the buffer. Returns ``value`` itself when it has no gradient."""
        return _AddValueGrad.apply(value, self) if value.requires_grad else value

    def attach(self, inputs_embeds: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` unchanged, now also a function of ``gates`` ``[B, N]``, whose gradient is the buffer."""
        return _HandOver.apply(inputs_embeds, gates, self)


class _AddValueGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, probe):
        ctx.save_for_backward(value)
        ctx.probe = probe
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        buffer = ctx.probe.buffer
        length = min(value.shape[2], buffer.shape[1])
        for head in range(value.shape[1]):  # one head at a time: float32 temporaries of [B, N, D], not [B, H, N, D]
            buffer[:, :length] += (grad[:, head, :length].float() * value[:, head, :length].float()).sum(dim=-1)
        return grad, None


class _HandOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs_embeds, gates, probe):
        ctx.probe, ctx.dtype = probe, gates.dtype
        return inputs_embeds.view_as(inputs_embeds)

    @staticmethod
    def backward(ctx, grad):
        return grad, ctx.probe.buffer.to(ctx.dtype), None
