"""Detection of the last shared layer: the trainable backbone parameters closest to the output.

Gradient-based balancers such as GradNorm (Chen et al., "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018) measure each task's gradient norm
on the weights of the last layer that all tasks share.

Detection, in order:

1. Find the stack of repeated blocks: the ``nn.ModuleList`` with at least two children of one type
   and the most parameters (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT, ``h`` in
   GPT-2).
2. From the last block backwards, take the block's last trainable parameter with at least two
   dimensions in registration order (``encoder.layer.5.output.dense.weight`` in a 6-layer BERT; with
   LoRA on query and value, ``...layer.5.attention.self.value.lora_B.default.weight``).
3. Without such a stack (any other module), take the last trainable parameter with at least two
   dimensions in registration order, or else the last trainable parameter.

NOTE: registration order is the order of ``__init__``. It matches the order of ``forward`` in the
transformer blocks above but not in every module, so pass ``last_shared_layer`` when they differ.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection

from torch import nn

NamedParameters = list[tuple[str, nn.Parameter]]


def detect_last_shared_parameters(backbone: nn.Module, *, excluded: Collection[str] = ()) -> NamedParameters:
    """Return the name and tensor of the trainable parameter(s) closest to the backbone's output.

    Args:
        backbone: the shared module.
        excluded: parameter names that the heads never use (such as a frozen pooler).

    Raises:
        ValueError: if the backbone has no trainable parameter.
    """
    trainable = [(name, p) for name, p in backbone.named_parameters() if p.requires_grad and name not in excluded]
    if not trainable:
        raise ValueError("the backbone has no trainable parameter, so there is no shared layer for gradient-based balancing; unfreeze the backbone or use LoRA")

    blocks = _repeated_blocks(backbone)
    if blocks is not None:
        prefix, block_list = blocks
        for index in reversed(range(len(block_list))):
            block_prefix = f"{prefix}.{index}." if prefix else f"{index}."
            in_block = [(name, p) for name, p in trainable if name.startswith(block_prefix) and p.dim() >= 2]
            if in_block:
                return [in_block[-1]]

    matrices = [(name, p) for name, p in trainable if p.dim() >= 2]
    return [matrices[-1]] if matrices else [trainable[-1]]


def resolve_shared_layer(backbone: nn.Module, name: str) -> NamedParameters:
    """Return the trainable parameter called ``name``, or the trainable parameters of the module called ``name``.

    ``name`` is relative to the backbone (``"encoder.layer.5.output.dense.weight"``); a leading
    ``"backbone."`` is accepted, and so is a name without the ``"base_model.model."`` prefix that
    ``peft`` adds.

    Raises:
        ValueError: if nothing has that name (the message lists close names), or it is frozen.
    """
    parameters = dict(backbone.named_parameters())
    modules = dict(backbone.named_modules())

    for candidate in _candidate_names(name):
        if candidate in parameters:
            parameter = parameters[candidate]
            if not parameter.requires_grad:
                raise ValueError(_frozen_message(name, parameters))
            return [(candidate, parameter)]
        if candidate and candidate in modules:
            found = [(f"{candidate}.{sub}", p) for sub, p in modules[candidate].named_parameters() if p.requires_grad]
            if not found:
                raise ValueError(_frozen_message(name, parameters))
            return found

    close = difflib.get_close_matches(name, list(parameters), n=5, cutoff=0.6)
    if not close:
        leaf = name.rsplit(".", 1)[-1]
        close = [candidate for candidate in parameters if candidate.endswith("." + leaf)][-5:]
    raise ValueError(f"last_shared_layer {name!r} is not a parameter or module of the backbone; close names: {close}")


def _candidate_names(name: str) -> list[str]:
    stripped = name.removeprefix("backbone.")
    return [stripped, f"base_model.model.{stripped}"]


def _frozen_message(name: str, parameters: dict[str, nn.Parameter]) -> str:
    trainable = [candidate for candidate, p in parameters.items() if p.requires_grad][-5:]
    return f"last_shared_layer {name!r} is frozen (requires_grad=False), so it gets no gradient; name a trainable parameter, for example one of {trainable}"


def _repeated_blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    best_size = 0
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best
