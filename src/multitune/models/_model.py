"""The multi-task model: one shared backbone and one head per task."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import multitune
from multitune.models._backbones import (
    BackboneCall,
    LoraSpec,
    apply_lora,
    base_model,
    freeze_pooler,
    hidden_states,
    infer_hidden_size,
    is_transformers_model,
    load_hf_backbone,
)
from multitune.models._criteria import labelled_count
from multitune.models._heads import HeadSpec, TaskHead, build_head
from multitune.models._pooling import POOLING_MODES, Features, Pooling, pool
from multitune.models._serialization import (
    BACKBONE_CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    atomic_write_text,
    head_spec_from_json,
    head_spec_to_json,
    is_saved_model,
    load_weights,
    read_description,
    save_weights,
    write_description,
)
from multitune.models._shared_layers import NamedParameters, detect_last_shared_parameters, resolve_shared_layer

logger = logging.getLogger(__name__)


class TaskHeads(nn.Module):
    """Container of the task heads, keyed by task name.

    Unlike ``nn.ModuleDict``, it accepts task names that equal ``nn.Module`` attributes (such as
    ``"type"``), because heads are looked up by item, never by attribute.
    """

    def __init__(self, heads: Mapping[str, TaskHead]) -> None:
        super().__init__()
        for name, head in heads.items():
            self._modules[name] = head

    def __getitem__(self, name: str) -> TaskHead:
        head = self._modules.get(name)
        if head is None:
            raise KeyError(f"unknown task {name!r}; the model has heads for {list(self._modules)}")
        return head  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def items(self) -> Iterator[tuple[str, TaskHead]]:
        for name in self._modules:
            yield name, self[name]


class MultiTaskModel(nn.Module):
    """A shared backbone with one head per task.

    The backbone is any ``nn.Module`` called with the batch's input entries (see
    :class:`~multitune.models._backbones.BackboneCall`): a Hugging Face encoder with ``input_ids``
    and ``attention_mask``, or a user module with ``input_values``. It may return a tensor ``[B, H]``
    (one vector per example), a tensor ``[B, L, H]`` or an output with ``last_hidden_state``; per-token
    states are pooled with ``pooling``.

    A training step can run the backbone once per batch and every head on the same features::

        features = model.forward_features(batch)
        outputs = model.head_forward("sentiment", features)
        loss = model.compute_loss("sentiment", outputs, batch)

    Args:
        backbone: the shared module. A Hugging Face model's pooler is frozen, because the heads
            pool ``last_hidden_state`` and never read it.
        heads: a :class:`HeadSpec` (or a dict of its fields) per task name. Task names must be
            non-empty and contain no ``"."``.
        hidden_size: width of the backbone's features; ``None`` reads ``config.hidden_size``, a
            ``hidden_size`` attribute, or the last ``nn.Linear``'s ``out_features``.
        pooling: ``"mean"`` (masked mean over ``attention_mask``, default) or ``"cls"`` (first token).
        last_shared_layer: name of the parameter (or module) that :meth:`last_shared_parameters`
            returns, relative to the backbone, e.g. ``"encoder.layer.5.output.dense.weight"``;
            ``None`` detects it (see :func:`~multitune.models._shared_layers.detect_last_shared_parameters`).
        lora: a :class:`LoraSpec` (or a dict of its fields) to wrap the backbone with LoRA
            adapters via ``peft``; the backbone's own weights are then frozen.
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, HeadSpec | Mapping[str, Any]],
        *,
        hidden_size: int | None = None,
        pooling: Pooling = "mean",
        last_shared_layer: str | None = None,
        lora: LoraSpec | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLING_MODES)}")
        specs = _validate_heads(heads)

        self._frozen_pooler = freeze_pooler(backbone)
        self.lora: LoraSpec | None = None
        if lora is not None:
            self.lora = lora if isinstance(lora, LoraSpec) else LoraSpec.model_validate(dict(lora))
            backbone = apply_lora(backbone, self.lora)
        self.backbone = backbone

        size = hidden_size if hidden_size is not None else infer_hidden_size(base_model(backbone))
        if size is None:
            raise ValueError(f"cannot infer the feature width of {type(backbone).__name__}; pass hidden_size=")
        self.hidden_size = size

        self.pooling: Pooling = pooling
        self.head_specs: dict[str, HeadSpec] = specs
        self.heads = TaskHeads({name: build_head(spec, size) for name, spec in specs.items()})
        self._call = BackboneCall.inspect(backbone)
        self.source: str = type(base_model(backbone)).__name__

        self.last_shared_layer = last_shared_layer
        if last_shared_layer is not None:
            self._last_shared()

    # Construction from files -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        heads: Mapping[str, HeadSpec | Mapping[str, Any]] | None = None,
        *,
        pooling: Pooling | None = None,
        lora: LoraSpec | Mapping[str, Any] | None = None,
        last_shared_layer: str | None = None,
        **hf_kwargs: Any,
    ) -> MultiTaskModel:
        """Build a model on a Hugging Face encoder, or restore one saved with :meth:`save_pretrained`.

        Args:
            name_or_path: a hub name or a local folder of a transformers model, loaded with
                ``transformers.AutoModel.from_pretrained``; or a folder written by
                :meth:`save_pretrained`, which is restored with :meth:`load`.
            heads: the head spec of each task; required for a new model. For a saved model, the
                given tasks replace the saved specs (for example to restore a callable loss).
            pooling: ``"mean"`` (default for a new model) or ``"cls"``. A saved model keeps its own.
            lora: LoRA spec for a new model. A saved model keeps its own.
            last_shared_layer: see :class:`MultiTaskModel`.
            **hf_kwargs: passed to ``AutoModel.from_pretrained`` (``revision``, ``dtype``,
                ``trust_remote_code``, ...), or to ``AutoModel.from_config`` for a saved model.
        """
        if is_saved_model(name_or_path):
            return cls.load(name_or_path, heads=heads, pooling=pooling, lora=lora, last_shared_layer=last_shared_layer, **hf_kwargs)
        if heads is None:
            raise ValueError(f"{name_or_path} is not a saved multitune model, so heads= is required to build one")

        backbone = load_hf_backbone(str(name_or_path), **hf_kwargs)
        model = cls(backbone, heads, pooling=pooling or "mean", lora=lora, last_shared_layer=last_shared_layer)
        model.source = str(name_or_path)
        return model

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        backbone: nn.Module | None = None,
        heads: Mapping[str, HeadSpec | Mapping[str, Any]] | None = None,
        pooling: Pooling | None = None,
        lora: LoraSpec | Mapping[str, Any] | None = None,
        last_shared_layer: str | None = None,
        **hf_kwargs: Any,
    ) -> MultiTaskModel:
        """Restore a model written by :meth:`save_pretrained`.

        A transformers backbone is rebuilt from the saved ``config.json`` (no download); any other
        backbone must be passed as ``backbone``, built the same way as when it was saved. ``pooling``
        and ``lora``, when given, must equal the saved values.
        """
        directory = Path(directory)
        description = read_description(directory)

        for name, requested in (("pooling", pooling), ("lora", lora)):
            saved = description[name]
            if requested is not None and _comparable(requested) != saved:
                raise ValueError(f"{directory} was saved with {name}={saved!r}, which the weights depend on; got {name}={_comparable(requested)!r}")

        specs = {task: head_spec_from_json(task, data) for task, data in description["heads"].items()}
        specs.update(_validate_heads(heads or {}))

        if backbone is None:
            backbone = _rebuild_backbone(directory, description, hf_kwargs)

        model = cls(
            backbone,
            specs,
            hidden_size=description["hidden_size"],
            pooling=description["pooling"],
            last_shared_layer=last_shared_layer if last_shared_layer is not None else description["last_shared_layer"],
            lora=description["lora"],
        )
        model.load_weights(directory)
        model.source = description["backbone"]["source"]
        return model

    def save_pretrained(self, directory: str | os.PathLike[str], *, tokenizer: Any | None = None) -> Path:
        """Write the weights (safetensors), the head specs (JSON) and the backbone's config to ``directory``.

        Every file is written atomically (temporary name, then ``os.replace``). ``tokenizer``, if
        given, is saved with its own ``save_pretrained``, which is not atomic. Returns the folder.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        save_weights(self, directory / WEIGHTS_NAME)

        base = base_model(self.backbone)
        if is_transformers_model(base):
            atomic_write_text(directory / BACKBONE_CONFIG_NAME, base.config.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

        write_description(directory, self._description())
        logger.info("saved the model to %s", directory)
        return directory

    def load_weights(self, path: str | os.PathLike[str], *, strict: bool = True) -> None:
        """Load weights saved by :meth:`save_pretrained` (a folder or its ``model.safetensors``) into this model."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        missing, unexpected = load_weights(self, path, strict=strict)
        if missing or unexpected:
            logger.warning("loaded %s with %d missing and %d unexpected tensors", path, len(missing), len(unexpected))

    # Forward -----------------------------------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.head_specs)

    def task_kind(self, task: str) -> str:
        """Return the kind of ``task``'s head."""
        return self.heads[task].kind

    def forward(self, batch: Mapping[str, Tensor], task: str) -> Tensor:
        """Return the head outputs of ``task`` for ``batch``: logits, or standardised predictions for regression."""
        return self.head_forward(task, self.forward_features(batch))

    def forward_features(self, batch: Mapping[str, Tensor]) -> Features:
        """Run the backbone once on ``batch`` and return pooled and per-token features for every head."""
        args, kwargs = self._call.arguments(batch)
        states = hidden_states(self.backbone(*args, **kwargs))
        attention_mask = batch.get("attention_mask")

        if states.dim() == 2:
            pooled, tokens = states, None
        elif states.dim() == 3:
            pooled, tokens = pool(states, attention_mask, self.pooling), states
        else:
            raise ValueError(f"the backbone returned features of shape {tuple(states.shape)}; expected [B, H] or [B, L, H]")

        if pooled.shape[-1] != self.hidden_size:
            raise ValueError(f"the backbone returned features of width {pooled.shape[-1]} but the heads expect hidden_size={self.hidden_size}; pass hidden_size={pooled.shape[-1]}")
        return Features(pooled=pooled, tokens=tokens, attention_mask=attention_mask)

    def head_forward(self, task: str, features: Features) -> Tensor:
        """Return the outputs of ``task``'s head on features from :meth:`forward_features`."""
        head = self.heads[task]
        if head.kind != "token_classification":
            return head(features.pooled)
        if features.tokens is None:
            raise ValueError(f"task {task!r} is token classification but the backbone returns one vector per example; it needs per-token states [B, L, H]")
        return head(features.tokens)

    def compute_loss(self, task: str, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """Return ``task``'s mean loss over the labelled examples of ``batch``.

        Examples whose ``label_mask`` is False get no loss, nor do ``-100`` class/tag labels or NaN
        regression targets. A batch without any labelled example returns a zero that is connected to
        ``outputs``, so ``backward()`` still runs and yields zero gradients.
        """
        head = self.heads[task]
        if "labels" not in batch:
            raise KeyError(f"task {task!r}: the batch has no 'labels' entry (keys: {sorted(batch)})")
        try:
            return head.loss(outputs, batch["labels"], batch.get("label_mask"))
        except ValueError as error:
            raise ValueError(f"task {task!r}: {error}") from error

    def labelled_count(self, task: str, batch: Mapping[str, Tensor]) -> int:
        """Return the number of labelled elements of ``task``'s ``batch``, which :meth:`compute_loss` averages over."""
        if "labels" not in batch:
            raise KeyError(f"task {task!r}: the batch has no 'labels' entry (keys: {sorted(batch)})")
        return labelled_count(self.heads[task].spec.kind, batch["labels"], batch.get("label_mask"), batch.get("target_mask"))

    def predict(self, task: str, outputs: Tensor) -> Tensor:
        """Convert ``task``'s outputs to predictions: class ids, multi-hot (probability >= 0.5), values in original units, or tag ids."""
        return self.heads[task].predict(outputs)

    # Parameter groups --------------------------------------------------------------------------

    def shared_parameters(self) -> list[nn.Parameter]:
        """Return the trainable parameters of the backbone (with LoRA: the adapters only)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Return the trainable parameters of ``task``'s head."""
        return [p for p in self.heads[task].parameters() if p.requires_grad]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Return the parameters of the last shared layer, on which GradNorm measures gradient norms."""
        return [parameter for _, parameter in self._last_shared()]

    def last_shared_parameter_names(self) -> list[str]:
        """Return the names, as in ``model.named_parameters()``, of :meth:`last_shared_parameters`."""
        return [f"backbone.{name}" for name, _ in self._last_shared()]

    def _last_shared(self) -> NamedParameters:
        if self.last_shared_layer is not None:
            return resolve_shared_layer(self.backbone, self.last_shared_layer)
        excluded = set(self._frozen_pooler) | {f"base_model.model.{name}" for name in self._frozen_pooler}
        return detect_last_shared_parameters(self.backbone, excluded=excluded)

    def _description(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "multitune_version": multitune.__version__,
            "backbone": {
                "class": type(base_model(self.backbone)).__name__,
                "transformers": is_transformers_model(base_model(self.backbone)),
                "source": self.source,
            },
            "hidden_size": self.hidden_size,
            "pooling": self.pooling,
            "lora": self.lora.model_dump(mode="json") if self.lora is not None else None,
            "last_shared_layer": self.last_shared_layer,
            "heads": {task: head_spec_to_json(spec) for task, spec in self.head_specs.items()},
        }

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, hidden_size={self.hidden_size}, lora={self.lora is not None}"


def _validate_heads(heads: Mapping[str, HeadSpec | Mapping[str, Any]]) -> dict[str, HeadSpec]:
    if not isinstance(heads, Mapping):
        raise TypeError(f"heads must map task names to HeadSpec, got {type(heads).__name__}")

    specs: dict[str, HeadSpec] = {}
    for name, spec in heads.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"invalid task name {name!r}: use a non-empty string without '.'")
        specs[name] = spec if isinstance(spec, HeadSpec) else HeadSpec.model_validate(dict(spec))
    return specs


def _comparable(value: Any) -> Any:
    if isinstance(value, LoraSpec):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return LoraSpec.model_validate(dict(value)).model_dump(mode="json")
    return value


def _rebuild_backbone(directory: Path, description: Mapping[str, Any], hf_kwargs: Mapping[str, Any]) -> nn.Module:
    info = description["backbone"]
    if not info.get("transformers"):
        raise ValueError(f"{directory} was saved with a custom backbone ({info['class']}); build it as before and pass it as backbone=")

    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=bool(hf_kwargs.get("trust_remote_code", False)))
    return AutoModel.from_config(config, **hf_kwargs)
