"""The plain MLP family of the paper's section 3 (``model_type: deepfuse-mlp``).

Tensors (torch ``nn.Linear`` layout, [out, in]): ``input.{weight,bias}`` from the shared
input features to the hidden space, ``hidden.{i}.{weight,bias}`` between hidden spaces,
``output.{weight,bias}`` to the shared logits. Activation between layers, none after the
last. This module also holds its reference forward pass (there is no transformers class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "identity": lambda x: x,
}


def forward(tensors: Mapping[str, torch.Tensor], config: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every hidden state (after each activation) for inputs ``x`` [batch, in_features]."""
    act = ACTIVATIONS[config.get("activation", "relu")]
    hidden = []
    h = act(x @ tensors["input.weight"].T + tensors["input.bias"])
    hidden.append(h)
    i = 0
    while f"hidden.{i}.weight" in tensors:
        h = act(h @ tensors[f"hidden.{i}.weight"].T + tensors[f"hidden.{i}.bias"])
        hidden.append(h)
        i += 1
    logits = h @ tensors["output.weight"].T + tensors["output.bias"]
    return logits, hidden
