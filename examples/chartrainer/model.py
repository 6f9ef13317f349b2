"""The model: a character MLP language model (Bengio et al. 2003) over a fixed context window.

Each position sees the previous `context` characters; their embeddings are concatenated and
go through a hidden layer to the next character's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int, embed: int, hidden: int, dropout: float):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, embed)
        self.fc1 = nn.Linear(context * embed, hidden)
        self.fc2 = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(dropout)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden layer's nonlinearity."""
        return torch.tanh(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the next character, from `x` of shape (batch, context)."""
        e = self.embed(x).flatten(1)
        h = self.dropout(self.act(self.fc1(e)))
        return self.fc2(h)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per character."""
    return F.cross_entropy(logits, targets)
