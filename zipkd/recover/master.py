"""Mixed precision with bf16 weights: the model computes with bf16 copies of its weights and the optimizer steps
fp32 master copies (the scheme of Megatron-LM's and DeepSpeed's bf16 optimizers). Under autocast alone, fp32
weights and an fp32 residual stream are cast to bf16 at every matrix product and back around every norm; with bf16
weights those casts are gone. In the training loop that is worth little on a CPU (2.5-3% a step on a 2-core
AVX512-BF16 EPYC, where the allocator already keeps the casts' memory; BENCHMARKS.md "Recovery throughput with bf16
weights"), with development-text quality tied with autocast.

`TrainWeights` is what the loop and its checkpoints see as the trainable weights: the model's own parameters
when it computes in fp32, else the fp32 masters; `restore()` (or leaving its `with` block, an error included) puts
fp32 weights back into the model."""

from __future__ import annotations

from typing import Any

import torch


class TrainWeights:
    """The trainable weights of `model` by name, in fp32. With `bf16`, every fp32 parameter of the model (frozen
    ones too: the activations must be bf16 throughout) is replaced by a bf16 copy; the trainable ones keep their
    fp32 tensor as the master the optimizer steps, the frozen ones keep theirs for `restore()`. Buffers (rotary
    frequencies) stay as they are."""

    def __init__(self, model: Any, bf16: bool):
        self.model, self.bf16 = model, bf16
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._fp32: dict[str, torch.Tensor] = {}
        if not bf16:
            self.named = dict(self._params)
            return
        for n, p in model.named_parameters():
            if p.dtype == torch.float32:
                self._fp32[n] = p.data
                p.data = p.data.to(torch.bfloat16)
        # a weight that was not fp32 to begin with (a bf16 model passed in) gets an fp32 master of its own
        self.named = {
            n: torch.nn.Parameter(self._fp32[n] if n in self._fp32 else p.data.float())
            for n, p in self._params.items()
        }

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.named.values())

    def take_grads(self) -> None:
        """After the backward pass: the model's (bf16) gradients become the masters' (fp32) ones."""
        if not self.bf16:
            return
        for n, p in self._params.items():
            if p.grad is not None:
                self.named[n].grad = p.grad.float()
                p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """After an optimizer step (or a checkpoint load): the model's bf16 weights follow the masters."""
        if not self.bf16:
            return
        for n, p in self._params.items():
            p.data.copy_(self.named[n])

    def __enter__(self) -> TrainWeights:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """The model back in its own dtypes (fp32): the masters for the trained weights, the kept originals for
        the rest (a weight that came in bf16 stays bf16, holding its master's rounding, as `push` left it)."""
        if not self.bf16:
            return
        for n, p in self.model.named_parameters():
            if n in self._fp32:
                p.data = self._fp32[n]
        self.bf16 = False
