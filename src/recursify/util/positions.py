"""Per-row unrolled positions, known on the host and mirrored on the device.

A batch of the serving engine holds rows at different depths of one shared slot. Which adapter,
norm and attention type each row uses is a static fact the scheduler decided on the host, so it
travels as Python ints (`values`) that choose what runs, and as one LongTensor on the model's
device (`index`) that gathers per-row weights. Nothing in a forward reads the device copy back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowPositions:
    values: tuple[int, ...]
    index: torch.Tensor = field(compare=False)  # LongTensor [rows] on the model's device
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def make(cls, values, device: torch.device | str) -> "RowPositions":
        values = tuple(int(v) for v in values)
        return cls(values, torch.tensor(values, dtype=torch.long, device=device))

    @classmethod
    def of(cls, position) -> "int | RowPositions":
        """An int stays an int; a LongTensor (the older calling convention) becomes RowPositions
        with one read of its values; RowPositions pass through."""
        if isinstance(position, torch.Tensor):
            return cls(tuple(position.tolist()), position)
        return position

    def __len__(self) -> int:
        return len(self.values)

    def groups(self) -> dict[int, list[int]]:
        """Rows per distinct position, in first-seen order."""
        out: dict[int, list[int]] = {}
        for row, p in enumerate(self.values):
            out.setdefault(p, []).append(row)
        return out

    def group_rows(self) -> list[tuple[int, torch.Tensor]]:
        """(position, its rows as a device LongTensor) per distinct position; built once per
        RowPositions, so every linear of a layer reuses the same index tensors."""
        cached = self._cache.get("groups")
        if cached is None:
            cached = [(p, torch.tensor(rows, dtype=torch.long, device=self.index.device))
                      for p, rows in self.groups().items()]
            self._cache["groups"] = cached
        return cached
