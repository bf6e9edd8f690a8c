"""The fixed-slot cache of a Lattice layer (docs/math.md §5): one ``(B, Hkv, d, m)`` float32 state at any length.

It takes the place of litgpt's ``KVCache`` in ``block.attn.kv_cache``. A forward with ``input_pos`` starting at 0 is
a new prompt and starts from the learned initial slots; one starting where the last one ended continues the state.
Anything else (a rewind, a skip) would need tokens the state no longer holds, so it is refused.
"""

import torch
import torch.nn as nn

from lattice_plugin.errors import LatticeCacheError


class LatticeCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_size: int,
        slots: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer(
            "state", torch.zeros(batch_size, n_kv_heads, head_size, slots, device=device, dtype=torch.float32),
            persistent=False,
        )
        self.next_position = 0
        """The position the next forward must start at to continue (0 always starts a new prompt)."""

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def reset_parameters(self) -> None:
        self.state.zero_()
        self.next_position = 0

    def begin(self, input_pos: torch.Tensor, batch_size: int) -> tuple[torch.Tensor | None, int]:
        """Check a forward's positions; return the state to continue from (None for a new prompt) and the position
        the forward ends before.

        input_pos: ``(T,)``, or ``(B, T)`` with the same positions in every row.
        """
        if batch_size > self.batch_size:
            raise LatticeCacheError(
                f"batch of {batch_size} sequences but the cache was built for {self.batch_size}; "
                "call set_kv_cache with a larger batch_size"
            )
        if input_pos.dim() == 2:
            if input_pos.shape[0] > 1 and not bool((input_pos == input_pos[:1]).all()):
                raise LatticeCacheError("Lattice layers need the same positions for every sequence of a batch")
            input_pos = input_pos[0]
        positions = input_pos.tolist()
        start, length = positions[0], len(positions)
        if positions != list(range(start, start + length)):
            raise LatticeCacheError(f"Lattice layers need consecutive positions, got {positions[:8]}...")
        if start == 0:
            return None, length
        if start != self.next_position:
            raise LatticeCacheError(
                f"the Lattice cache holds a fixed-size state and cannot rewind or skip: the forward starts at position "
                f"{start} but the cache is at position {self.next_position}; start a new prompt at position 0 instead"
            )
        return self.state[:batch_size], start + length

    def commit(self, state: torch.Tensor, end_position: int) -> None:
        """Store the state after a forward that ended just before ``end_position``."""
        target = self.state[: state.shape[0]]
        if target.data_ptr() != state.data_ptr():  # a decode step may already have updated the state in place
            target.copy_(state)
        self.next_position = end_position
