"""LoRA: low-rank adapters on an LLM's linear layers (Hu et al., 2021), minimal and dependency-free.

`add_lora(llm)` wraps each targeted nn.Linear (by default the attention projections q/k/v/o) in a
LoRALinear: y = W x + b + (alpha / r) * B A x, with A (r x in) random and B (out x r) zero, so a
freshly wrapped model computes exactly what it did before. `restrict_to_lora(llm)` freezes
everything in the LLM but the adapters (apply it after a stage has unfrozen the LLM).
`merged_view(llm)` swaps plain merged nn.Linear layers in while saving, so a checkpoint's weights
load into a model without adapters; `merge_lora(llm)` does the same permanently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """A frozen-or-not base nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and peft; B = 0 keeps identity
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + update * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the base weight, scaling included (out x in)."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def merged(self) -> nn.Linear:
        """A new nn.Linear computing what this module computes (new tensors; the base is untouched)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta().to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        out.requires_grad_(base.weight.requires_grad)
        return out


def _lora_slots(module: nn.Module) -> list[tuple[nn.Module, str, LoRALinear]]:
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, LoRALinear)]


def add_lora(module: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS,
             dropout: float = 0.0, seed: int | None = 0) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets`; returns the wrapped module names.

    Raises ValueError when nothing matched (a typo in `targets` would otherwise train nothing) or
    when adapters are already present.
    """
    if _lora_slots(module):
        raise ValueError("this module already has LoRA adapters")
    found = [(parent, pname, name, child) for pname, parent in module.named_modules()
             for name, child in parent.named_children() if name in targets and isinstance(child, nn.Linear)]
    if not found:
        raise ValueError(f"no nn.Linear named any of {', '.join(targets)} in {type(module).__name__}")
    if seed is not None:
        torch.manual_seed(seed)  # adapters initialise the same way whatever ran before
    for parent, _, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
    return [f"{pname}.{name}" if pname else name for _, pname, name, _ in found]


def has_lora(module: nn.Module) -> bool:
    return bool(_lora_slots(module))


def lora_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    for _, _, lora in _lora_slots(module):
        yield lora.lora_a
        yield lora.lora_b


def restrict_to_lora(module: nn.Module) -> int:
    """Freeze every parameter of `module` except the adapters; returns the trainable count."""
    module.requires_grad_(False)
    params = list(lora_parameters(module))
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed by their names in `module` (what resuming a LoRA run needs)."""
    return {k: v for k, v in module.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by lora_state_dict into a model wrapped the same way (keys must match)."""
    expected = set(lora_state_dict(module))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA state does not match the adapters: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        for key, value in state.items():
            params[key].copy_(value)


@contextmanager
def merged_view(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRALinear is replaced by its merged nn.Linear; afterwards the
    adapters are back, bit for bit (the merge makes new tensors). For saving: keys match the
    unwrapped model's, so a checkpoint loads without LoRA."""
    slots = _lora_slots(module)
    for parent, name, lora in slots:
        setattr(parent, name, lora.merged())
    try:
        yield module
    finally:
        for parent, name, lora in slots:
            setattr(parent, name, lora)


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns how many were merged."""
    slots = _lora_slots(module)
    for parent, name, lora in slots:
        setattr(parent, name, lora.merged())
    return len(slots)
