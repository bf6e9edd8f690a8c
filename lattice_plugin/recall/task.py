"""Multi-query associative recall (MQAR) in the Zoology setting (Arora et al., 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models"), generated on the fly on the training device.

A sequence of ``seq_len`` tokens opens with ``pairs`` key-value pairs (``k_1 v_1 k_2 v_2 ...``: keys distinct within
the sequence, drawn from the lower half of the vocabulary; values from the upper half), followed by filler (token 0)
in which every key of the sequence appears once more, in random order at random positions. At each such query the
model must predict the value that followed the key in the pairs; only those positions are scored (the target is
``IGNORE`` elsewhere), so chance is ``2 / vocab_size``.
"""

from dataclasses import dataclass

import torch

from lattice_plugin.errors import LatticeError

IGNORE = -100
FILLER = 0


@dataclass(frozen=True)
class MQARBatch:
    """``inputs`` and ``targets`` are ``(B, seq_len)`` int64; ``targets`` holds the value at every query position and
    ``IGNORE`` elsewhere."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """The scored positions: exactly the queries."""
        return self.targets != IGNORE


def check_mqar(vocab_size: int, pairs: int, seq_len: int) -> None:
    """Refuse settings with no room: distinct keys need ``pairs < vocab_size / 2``; the queries need ``pairs``
    positions after the ``2 * pairs`` tokens of the pairs."""
    if pairs < 1:
        raise LatticeError(f"the number of key-value pairs must be >= 1, got {pairs}")
    if vocab_size < 4 or pairs > vocab_size // 2 - 1:
        raise LatticeError(f"vocabulary {vocab_size} has too few keys for {pairs} distinct ones (need > 2 * pairs + 2)")
    if seq_len < 3 * pairs:
        raise LatticeError(f"sequence length {seq_len} is too short for {pairs} pairs and their queries (>= 3 * pairs)")


def mqar_batch(
    batch_size: int,
    pairs: int,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> MQARBatch:
    """One batch of independent MQAR sequences, drawn with ``generator`` (which must live on ``device``)."""
    check_mqar(vocab_size, pairs, seq_len)
    B, K, T, half = batch_size, pairs, seq_len, vocab_size // 2

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    keys = uniform(B, half - 1).topk(K, dim=1).indices + 1  # K distinct keys in [1, half), random order
    values = torch.randint(half, vocab_size, (B, K), generator=generator, device=device)
    rows = torch.arange(B, device=device).unsqueeze(1)
    inputs = torch.full((B, T), FILLER, dtype=torch.long, device=device)
    targets = torch.full((B, T), IGNORE, dtype=torch.long, device=device)
    inputs[:, 0 : 2 * K : 2] = keys
    inputs[:, 1 : 2 * K : 2] = values
    positions = uniform(B, T - 2 * K).topk(K, dim=1).indices + 2 * K  # K distinct query positions after the pairs
    order = uniform(B, K).argsort(dim=1)  # which pair each query asks for
    inputs[rows, positions] = keys.gather(1, order)
    targets[rows, positions] = values.gather(1, order)
    return MQARBatch(inputs, targets)
