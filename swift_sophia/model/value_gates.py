"""Stage 3's straight-through gates on the attention values of the kept frames.

In training the pruner's gate of a kept shot is exactly 1 in the forward pass; its gradient should say how much the
loss wants the sequence to read from that shot: the sum, over every decoder layer and every token of the shot, of
``<dL/dv, v>`` for the token's attention values ``v`` (the derivative of scaling those values by the gate at 1).
Multiplying the values by the gate inside each layer computes exactly that, but the gate is then a tensor with a
gradient path that every layer reads from a keyword argument, and reentrant gradient checkpointing (ms-swift's
default on one process and under DeepSpeed) neither differentiates keyword arguments nor lets every layer's
recomputation run backward through the same pruner graph.

So the values are left alone. :class:`ValueGateGradient` goes into the decoder as the keyword argument
``sophia_value_gate``; the attention router calls :meth:`ValueGateGradient.watch` on the values each layer hands to
the kernel, and a hook adds ``<dL/dv, v>`` per token to one ``[B, N]`` buffer when that gradient is computed (in a
reentrant checkpoint's recomputation as well). :meth:`ValueGateGradient.attach` ties the decoder's input to the
per-token gates through an identity whose backward runs only once the gradient of that input is complete, that is
after every layer's backward, and hands the buffer to the gates."""
from __future__ import annotations

import torch


class ValueGateGradient:
    """The gradient of the loss with respect to every token's value gate, gathered while the decoder runs backward."""

    def __init__(self, batch: int, length: int, device):
        self.buffer = torch.zeros(batch, length, dtype=torch.float32, device=device)

    def watch(self, value: torch.Tensor) -> None:
        """``value`` ``[B, H, N, D]`` (N may extend past the gated tokens: padding); no-op without a gradient."""
        if not value.requires_grad:
            return
        length = min(value.shape[2], self.buffer.shape[1])

        def add(grad: torch.Tensor) -> None:
            self.buffer[:, :length] += (grad[:, :, :length].float() * value[:, :, :length].float()).sum(dim=(1, 3))

        value.register_hook(add)

    def attach(self, inputs_embeds: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` unchanged, now also a function of ``gates`` ``[B, N]``, whose gradient is the buffer."""
        return _HandOver.apply(inputs_embeds, gates, self)


class _HandOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs_embeds, gates, probe):
        ctx.probe, ctx.dtype = probe, gates.dtype
        return inputs_embeds.view_as(inputs_embeds)

    @staticmethod
    def backward(ctx, grad):
        return grad, ctx.probe.buffer.to(ctx.dtype), None
