"""A fake ``torch.cuda`` for tests of code whose behaviour depends on the GPUs a process sees.

Why a fake: the layouts that matter (8 GPUs visible to every task, or one bound to each
task) exist only on GPU nodes, and CI runs on CPUs. The fake keeps real generator-state
tensors per device and rejects a device index beyond the visible count the way torch
does (``IndexError`` from its tuple of default generators), so code that assumes the
writer's layout fails here as it fails on a cluster.
"""

from __future__ import annotations

from typing import Union

import pytest
import torch

STATE_BYTES = 16
"""Size of a CUDA (Philox) generator state: seed and offset, 8 bytes each."""


class FakeCuda:
    """``count`` visible GPUs, this process on ``current``; each device's generator state is a real uint8 tensor."""

    def __init__(self, count: int, current: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.count, self.current = count, current
        self.states = [torch.randint(0, 256, (STATE_BYTES,), dtype=torch.uint8, generator=generator)
                       for _ in range(count)]

    def index(self, device: Union[int, str, torch.device] = "cuda") -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = self.current if device.index is None else device.index
        if not 0 <= index < self.count:
            raise IndexError(f"tuple index out of range (CUDA device {index}, {self.count} visible)")
        return index

    def get_rng_state(self, device: Union[int, str, torch.device] = "cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set_rng_state(self, new_state: torch.Tensor, device: Union[int, str, torch.device] = "cuda") -> None:
        self.states[self.index(device)] = new_state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, new_states: list[torch.Tensor]) -> None:
        for i, state in enumerate(new_states):
            self.set_rng_state(state, i)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, current: int, seed: int = 0) -> FakeCuda:
    """Make ``torch.cuda`` report ``count`` visible GPUs with this process on ``current`` (undone by monkeypatch).

    Calling it again switches to another layout with fresh device states, as a job
    restarted with other ``srun`` GPU options would.
    """
    fake = FakeCuda(count, current, seed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake
