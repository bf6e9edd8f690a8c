"""The fixed-slot cache of a Lattice layer (docs/math.md §5): one ``(B, Hkv, d, m)`` float32 state at any length.

It takes the place of litgpt's ``KVCache`` in ``block.attn.kv_cache``. Positions are Python integers checked before a
forward runs (:meth:`LatticeCache.begin`, called by :meth:`LatticeGPT.begin_positions` once per forward), never read
back from device tensors inside the layers: a decode step stays free of host synchronisation and its shapes static,
so it can be captured in a CUDA graph. A forward starting at 0 is a new prompt and starts from the learned initial
slots; one starting where the last one ended continues the state. Anything else (a rewind, a skip) would need tokens
the state no longer holds, so it is refused.
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
            "state",
            torch.zeros(batch_size, n_kv_heads, head_size, slots, device=device, dtype=torch.float32),
            persistent=False,
        )
        self.next_position = 0
        """The position the next forward must start at to continue (0 always starts a new prompt)."""
        self.continuing = False
        """Whether the forward in progress continues the stored state (set by :meth:`begin`)."""

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def reset_parameters(self) -> None:
        self.state.zero_()
        self.next_position = 0
        self.continuing = False

    def begin(self, start: int, length: int, batch_size: int) -> None:
        """Check a forward of ``length`` tokens from position ``start`` before it runs, and advance the position."""
        if batch_size > self.batch_size:
            raise LatticeCacheError(
                f"batch of {batch_size} sequences but the cache was built for {self.batch_size}; "
                "call set_kv_cache with a larger batch_size"
            )
        if start != 0 and start != self.next_position:
            raise LatticeCacheError(
                f"the Lattice cache holds a fixed-size state and cannot rewind or skip: the forward starts at position "
                f"{start} but the cache is at position {self.next_position}; start a new prompt at position 0 instead"
            )
        self.continuing = start != 0
        self.next_position = start + length

    def seek(self, position: int) -> None:
        """Declare that ``state`` already holds ``position`` tokens (written by the caller, e.g. a benchmark that
        times decoding at a context length without running the prefill)."""
        self.next_position = position

    def state_to_continue(self, batch_size: int) -> torch.Tensor | None:
        """The state the forward in progress continues from, or None for a new prompt."""
        return self.state[:batch_size] if self.continuing else None

    def commit(self, state: torch.Tensor) -> None:
        """Store the state after a forward (a decode step may already have updated it in place)."""
        target = self.state[: state.shape[0]]
        if target.data_ptr() != state.data_ptr():
            target.copy_(state)


def first_position(input_pos: torch.Tensor) -> int:
    """The first position of ``input_pos`` (``(T,)``, or ``(B, T)`` with the same row everywhere), checked to be
    consecutive. This reads the tensor back to the host once: callers that know the position pass it instead."""
    rows = input_pos.tolist()
    rows = rows if input_pos.dim() == 2 else [rows]
    if any(row != rows[0] for row in rows[1:]):
        raise LatticeCacheError("Lattice layers need the same positions for every sequence of a batch")
    positions = rows[0]
    start = positions[0]
    if positions != list(range(start, start + len(positions))):
        raise LatticeCacheError(f"Lattice layers need consecutive positions, got {positions[:8]}...")
    return start
