"""Recurrent encoders over `nn.RNN` / `nn.GRU` / `nn.LSTM` with packed sequences.

Sequences are packed by their true lengths, so padding never enters a hidden state:
a sequence's outputs and final state are the same however much padding its batch has.
The recurrence runs in its weights' dtype, outside CPU autocast (see `RecurrentEncoder.forward`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentEncoder(nn.Module):
    """A stacked, optionally bidirectional RNN/GRU/LSTM over right-padded (B, T, D) inputs.

    Args:
        kind: "rnn" (tanh), "gru" or "lstm".
        input_size: size of each input vector.
        hidden: hidden size per direction.
        layers: stacked layers.
        bidirectional: run a second, backward layer and concatenate.
        dropout: between stacked layers.
    """

    def __init__(
        self,
        kind: str,
        input_size: int,
        hidden: int,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in _CELLS:
            raise ValueError(f"unknown recurrent kind {kind!r}; choose one of {sorted(_CELLS)}")
        self.kind = kind
        self.layers = layers
        self.directions = 2 if bidirectional else 1
        self.rnn = _CELLS[kind](
            input_size,
            hidden,
            num_layers=layers,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
            batch_first=True,
        )

    @property
    def output_size(self) -> int:
        return self.rnn.hidden_size * self.directions

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, T, D) inputs; `mask` (B, T) bool marks real tokens (right padding).

        Returns:
            outputs (B, T, dirs·H), zeros at padded positions, and the final state (B, dirs·H)
            of the last layer: forward direction at each sequence's last real token,
            backward direction at its first.
        """
        # CPU autocast sends only an LSTM, and only over equal-length rows (one text alone, an
        # unpadded batch), to oneDNN's bf16 kernel, which AVX2-only CPUs lack (it raises);
        # mixed lengths, GRU and RNN run in the weights' dtype. Running every case that way
        # gives a text the same kernel, and the same result, alone and batched, on every CPU.
        with torch.autocast(x.device.type, enabled=False):
            return self._encode(x.to(self.rnn.weight_ih_l0.dtype), mask)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        if mask is None:
            outputs, state = self.rnn(x)
        else:
            # a zero-length row cannot be packed: give it one (padding) step
            lengths = mask.long().sum(dim=1).clamp_min(1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            packed_out, state = self.rnn(packed)
            outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=t)
        h_n = state[0] if self.kind == "lstm" else state  # (layers·dirs, B, H)
        last = h_n.view(self.layers, self.directions, b, -1)[-1]  # (dirs, B, H)
        return outputs, last.transpose(0, 1).reshape(b, -1)  # (B, T, dirs·H), (B, dirs·H)
