"""Models, inputs and machine details shared by the balancer benchmarks.

- :class:`ToyMLP`: the network of the synthetic regression of Chen et al. (2018), "GradNorm:
  Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks": four shared
  ReLU layers of 100 units on a 250-dimensional input, one linear 100-output head per task.
- :class:`BertMultiTask`: a ``transformers.BertModel`` with a random MiniLM-L6 configuration
  (6 layers, hidden size 384, 12 attention heads, intermediate size 1536; nothing is
  downloaded) and three heads on the [CLS] state: 3-class and 5-class cross-entropy and a
  1-output squared error.
"""

from __future__ import annotations

import os
import platform

import torch
from torch import Tensor, nn


def set_threads(num_threads: int) -> None:
    """Use ``num_threads`` intra-op threads and one inter-op thread, before any parallel work."""
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        # Raised once parallel work has started; the intra-op setting above still applies.
        pass


def machine_summary() -> str:
    """Return the CPU model, the visible cores and the torch version, for benchmark records."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


class ToyMLP(nn.Module):
    """Four shared ReLU layers of ``width`` units and one linear head per task."""

    def __init__(self, num_tasks: int, input_dim: int = 250, width: int = 100, output_dim: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_features = input_dim
        for _ in range(4):
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, output_dim) for _ in range(num_tasks))

    @property
    def last_shared_layer(self) -> nn.Linear:
        return self.trunk[-2]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return the shared features and the output of every head."""
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]


BERT_TASKS = ("topic", "sentiment", "score")


class BertMultiTask(nn.Module):
    """A MiniLM-shaped BERT encoder with 3-class, 5-class and regression heads on the [CLS] state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleDict(
            {"topic": nn.Linear(384, 3), "sentiment": nn.Linear(384, 5), "score": nn.Linear(384, 1)}
        )

    @property
    def last_shared_layer(self) -> nn.Linear:
        """The output projection of the last encoder layer (its LayerNorm follows)."""
        return self.encoder.encoder.layer[-1].output.dense

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the [CLS] features and the task losses."""
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        features = hidden[:, 0]
        losses = {
            "topic": nn.functional.cross_entropy(self.heads["topic"](features), batch["topic"]),
            "sentiment": nn.functional.cross_entropy(self.heads["sentiment"](features), batch["sentiment"]),
            "score": nn.functional.mse_loss(self.heads["score"](features).squeeze(-1), batch["score"]),
        }
        return features, losses


def bert_batch(batch_size: int = 16, seq_len: int = 64, seed: int = 0) -> dict[str, Tensor]:
    """Return random token ids and labels for :class:`BertMultiTask`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "topic": torch.randint(0, 3, (batch_size,), generator=generator),
        "sentiment": torch.randint(0, 5, (batch_size,), generator=generator),
        "score": torch.randn(batch_size, generator=generator),
    }
