"""Prediction heads and small MLPs."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them. x: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def prior_bias(prior_prob: float = 0.01) -> float:
    """Class-logit bias so that sigmoid(bias) = prior_prob (focal-loss initialisation)."""
    return -math.log((1 - prior_prob) / prior_prob)


def make_class_head(d_model: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, prior_bias())
    return head


def make_box_head(d_model: int, refine: bool) -> MLP:
    """3-layer box MLP with its last layer zeroed (and w/h bias -2 when boxes are not refined)."""
    head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    if not refine:
        nn.init.constant_(head.layers[-1].bias[2:], -2.0)
    return head


def repeat_head(head: nn.Module, count: int, share: bool) -> nn.ModuleList:
    """``count`` heads: independent deep copies, or the same module repeated when ``share``."""
    if share:
        return nn.ModuleList([head] * count)
    return nn.ModuleList(copy.deepcopy(head) for _ in range(count))
