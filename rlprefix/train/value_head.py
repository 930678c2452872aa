"""The critic of PPO with GAE: a small head on the frozen model's final hidden states (the prefix is the policy)."""
from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """V(s_t) from the final hidden state that predicts token t (gae only)."""

    def __init__(self, hidden_size: int, value_hidden: int = 256):
        super().__init__()
        if value_hidden:
            self.net = nn.Sequential(nn.Linear(hidden_size, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)
