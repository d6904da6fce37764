"""Rows of different LoRA adapters in one pass: the adapters' weights stacked per layer and gathered per row
(the S-LoRA / Punica idea, in plain torch), in place of peft's loop over each adapter's rows.

peft serves a mixed batch (`adapter_names`) by looping, in every LoRA layer, over the adapters present:
select their rows, run that adapter's A and B, add the result back. That is five or six tensor operations
per adapter per layer, and on a CPU a small model's step is dominated by how many operations it runs, not
by their arithmetic. Here each layer keeps every loaded adapter's A and B stacked (slot 0 all zeros, for
rows on the base model; ranks padded with zeros to the largest; B pre-multiplied by the adapter's
scaling), and one step costs the same few operations however many adapters the batch mixes:

    result = base(x) + bmm(bmm(x, A[slots]^T), B[slots]^T)

peft still loads, holds and unloads the adapters (and serves every other path, such as the evaluator's
active adapter); the engine rebuilds the stacks whenever an adapter comes or goes. peft has no batched
path of its own (0.21), hence this module. Adapters it cannot stack exactly (DoRA and other variants, a
bias on B, a LoRA embedding or convolution) leave the engine on peft's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Forward = Callable[..., torch.Tensor]


class BatchedLora:
    """Stacked adapter weights for every LoRA linear layer of one peft model, and the rows' slots of the
    forward pass under way. Build it again after loading or unloading an adapter."""

    def __init__(self, peft_model: Any, adapters: Sequence[str]) -> None:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        self._slot = {name: index + 1 for index, name in enumerate(adapters)}
        self._slots: torch.Tensor | None = None
        # A layer every adapter has left (peft keeps the wrapper) holds nothing to stack or to refuse.
        layers: list[Any] = [
            module
            for module in peft_model.modules()
            if isinstance(module, LoraLayer) and any(name in adapters for name in _adapters_of(module))
        ]
        self.supported = all(isinstance(layer, LoraLinear) and _plain(layer) for layer in layers)
        for module in peft_model.modules():
            if getattr(module.__dict__.get("forward"), "stacked_lora", False):
                del module.forward  # the previous build's: the class's forward again
        if not self.supported:
            return
        for layer in layers:
            # An instance attribute: nn.Module calls it in place of the class's forward, peft's own.
            layer.forward = self._forward(layer, *_stack(layer, adapters))

    @contextlib.contextmanager
    def rows(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, each LoRA layer adds to row i the adapter `adapter_names[i]` (None: the base model)."""
        self._slots = torch.tensor([self._slot.get(name or "", 0) for name in adapter_names], dtype=torch.long)
        try:
            yield
        finally:
            self._slots = None

    def _forward(self, layer: Any, a: torch.Tensor, b: torch.Tensor) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # Outside `rows` (the evaluator running its active adapter, say) peft's own forward serves.
            slots = self._slots
            if slots is None or layer.disable_adapters or layer.merged:
                peft_forward: torch.Tensor = type(layer).forward(layer, x, *args, **kwargs)
                return peft_forward
            result: torch.Tensor = layer.base_layer(x, *args, **kwargs)
            # x [rows, tokens, in] @ A[slot]^T [rows, in, rank] @ B[slot]^T [rows, rank, out]
            low = torch.bmm(x.to(a.dtype), a[slots].transpose(1, 2))
            return result + torch.bmm(low, b[slots].transpose(1, 2)).to(result.dtype)

        forward.stacked_lora = True  # type: ignore[attr-defined]  # how the next build finds its own
        return forward


def _adapters_of(layer: Any) -> list[str]:
    return [*layer.lora_A.keys(), *getattr(layer, "lora_embedding_A", {}).keys()]


def _plain(layer: Any) -> bool:
    """Vanilla LoRA on every adapter of the layer: no variant (DoRA, ...), no bias on B."""
    return not layer.lora_variant and not any(layer.lora_bias.values())


def _stack(layer: Any, adapters: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's A [slots, rank, in] and B [slots, out, rank] (scaled), each adapter in its slot; zeros
    in slot 0 (the base model) and where an adapter does not touch this layer."""
    present = [name for name in adapters if name in layer.lora_A]
    rank = max((layer.lora_A[name].weight.shape[0] for name in present), default=1)
    weight = layer.base_layer.weight
    dtype = layer.lora_A[present[0]].weight.dtype if present else weight.dtype
    a = torch.zeros(len(adapters) + 1, rank, layer.in_features, dtype=dtype, device=weight.device)
    b = torch.zeros(len(adapters) + 1, layer.out_features, rank, dtype=dtype, device=weight.device)
    with torch.no_grad():
        for slot, name in enumerate(adapters, start=1):
            if name in layer.lora_A:
                own = layer.lora_A[name].weight.shape[0]
                a[slot, :own] = layer.lora_A[name].weight
                b[slot, :, :own] = layer.lora_B[name].weight * layer.scaling[name]
    return a, b
