"""Shared backbones: loading Hugging Face encoders, LoRA wrapping, and calling any module with a batch."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

logger = logging.getLogger(__name__)

NON_INPUT_KEYS = frozenset({"labels", "label_mask"})
"""Batch keys that hold targets, never backbone inputs."""


class LoraSpec(BaseModel):
    """LoRA adapters for the backbone (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021), applied with ``peft``.

    Args:
        r: rank of the update matrices (default 8).
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (default 16).
        dropout: dropout on the adapter input (default 0.05).
        target_modules: names (or suffixes) of the modules to adapt, e.g. ``["query", "value"]``;
            ``None`` uses peft's default for the model type, which exists for common Hugging Face
            architectures only.
        bias: which biases train: ``"none"`` (default), ``"all"`` or ``"lora_only"``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


def load_hf_backbone(name_or_path: str, **hf_kwargs: Any) -> nn.Module:
    """Load a Hugging Face encoder with ``transformers.AutoModel.from_pretrained`` (a local folder or a hub name)."""
    from transformers import AutoModel

    logger.info("loading backbone %s", name_or_path)
    return AutoModel.from_pretrained(name_or_path, **hf_kwargs)


def apply_lora(backbone: nn.Module, spec: LoraSpec) -> nn.Module:
    """Return ``backbone`` wrapped by ``peft.get_peft_model``: its own weights frozen, LoRA adapters trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias=spec.bias,
    )
    try:
        wrapped = get_peft_model(backbone, config)
    except ValueError as error:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, nn.Linear)})
        raise ValueError(f"LoRA could not wrap the backbone ({error}). Set lora.target_modules to some of its linear modules: {linear_names}") from error

    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA r=%d on %s: %d of %d backbone parameters trainable", spec.r, spec.target_modules or "peft defaults", trainable, total)
    return wrapped


def base_model(backbone: nn.Module) -> nn.Module:
    """Return the module that a ``peft`` wrapper adapts, or ``backbone`` itself."""
    get_base_model = getattr(backbone, "get_base_model", None)
    if callable(get_base_model) and "peft" in sys.modules:
        from peft import PeftModel

        if isinstance(backbone, PeftModel):
            return get_base_model()
    return backbone


def is_transformers_model(module: nn.Module) -> bool:
    """Return whether ``module`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def freeze_pooler(backbone: nn.Module) -> list[str]:
    """Freeze the pooler of a Hugging Face model and return the names of the frozen parameters.

    BERT-like models compute a pooled output (a dense layer on the CLS state) that the task heads
    never read, because pooling happens on ``last_hidden_state``. Its parameters would get no
    gradient and would wrongly look like the layer closest to the output.
    """
    if not is_transformers_model(backbone):
        return []
    pooler = getattr(backbone, "pooler", None)
    if not isinstance(pooler, nn.Module):
        return []

    names = [f"pooler.{name}" for name, parameter in pooler.named_parameters() if parameter.requires_grad]
    pooler.requires_grad_(False)
    if names:
        logger.info("froze the backbone's pooler (%d tensors): the heads pool last_hidden_state instead", len(names))
    return names


def infer_hidden_size(backbone: nn.Module) -> int | None:
    """Return the width of the backbone's output features: ``config.hidden_size``, a ``hidden_size`` attribute, or the last linear layer's ``out_features``."""
    config = getattr(backbone, "config", None)
    size = getattr(config, "hidden_size", None) if config is not None else None
    if isinstance(size, int):
        return size

    size = getattr(backbone, "hidden_size", None)
    if isinstance(size, int):
        return size

    linear_layers = [module for module in backbone.modules() if isinstance(module, nn.Linear)]
    if linear_layers:
        size = linear_layers[-1].out_features
        logger.info("hidden_size not given: using %d, the out_features of the backbone's last nn.Linear", size)
        return size
    return None


@dataclass(frozen=True)
class BackboneCall:
    """Mapping from a batch to the arguments of a backbone's ``forward``.

    Batch entries whose key names an argument of ``forward`` are passed by keyword; other entries
    are dropped. A batch with one input entry (besides ``labels`` and ``label_mask``) whose key
    names no argument is passed positionally, so ``nn.Sequential`` works with ``input_values``.
    """

    module_name: str
    argument_names: frozenset[str]
    takes_positional: bool

    @classmethod
    def inspect(cls, backbone: nn.Module) -> BackboneCall:
        forward = base_model(backbone).forward
        parameters = inspect.signature(forward).parameters.values()
        named_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        return cls(
            module_name=type(base_model(backbone)).__name__,
            argument_names=frozenset(p.name for p in parameters if p.kind in named_kinds),
            takes_positional=any(p.kind in positional_kinds for p in parameters),
        )

    def arguments(self, batch: Mapping[str, Any]) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
        """Return the positional and keyword arguments of ``forward`` for ``batch``."""
        inputs = {key: value for key, value in batch.items() if key not in NON_INPUT_KEYS}
        keyword = {key: value for key, value in inputs.items() if key in self.argument_names}
        if keyword:
            return (), keyword
        if len(inputs) == 1 and self.takes_positional:
            return (next(iter(inputs.values())),), {}
        raise ValueError(
            f"none of the batch keys {sorted(inputs)} is an argument of {self.module_name}.forward "
            f"(arguments: {sorted(self.argument_names)}); rename the batch inputs or wrap the backbone in a module whose forward takes them"
        )


def hidden_states(output: Any) -> Tensor:
    """Return the features of a backbone's output: a tensor, ``last_hidden_state``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    last_hidden_state = getattr(output, "last_hidden_state", None)
    if isinstance(last_hidden_state, Tensor):
        return last_hidden_state
    if isinstance(output, Mapping) and isinstance(output.get("last_hidden_state"), Tensor):
        return output["last_hidden_state"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the backbone returned {type(output).__name__}; expected a tensor [B, H] or [B, L, H], or an output with last_hidden_state")
