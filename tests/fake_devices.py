"""Fake GPUs for tests of code whose behaviour depends on them: ``torch.cuda``'s layout, and collectives on a GPU.

Why a fake: the layouts that matter (8 GPUs visible to every task, or one bound to each
task) exist only on GPU nodes, and CI runs on CPUs. The fake keeps real generator-state
tensors per device and rejects a device index beyond the visible count the way torch
does (``IndexError`` from its tuple of default generators), so code that assumes the
writer's layout fails here as it fails on a cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path
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


# ------------------------------------------------------- collectives on a GPU

COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_single", "all_to_all",
    "all_to_all_single", "reduce_scatter_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "irecv", "isend", "monitored_barrier", "recv",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send",
})
"""torch.distributed functions that move tensors (or need a device) on the default group."""

FAKE_GPU = torch.device("cuda", 3)
"""The device ``pretrain.collective`` is told to run on: not the CPU, and not device 0, so that neither
an unplaced tensor nor a guessed device passes."""

REPO = Path(__file__).resolve().parents[1]
COLLECTIVE_MODULE = REPO / "pretrain" / "collective.py"
VITSCALE = tuple(REPO / package for package in ("pretrain", "finetune", "data_tools", "launch", "benchmarks"))
COMM_LAYERS = (str(Path(torch.distributed.__file__).parent), "/deepspeed/comm/", "/accelerate/utils/operations.py")
"""Wrappers between a caller and torch.distributed (DeepSpeed's comm, Accelerate's reduce and gather):
a collective is charged to the first frame outside them."""


class OnFakeGpu(torch.Tensor):
    """A host tensor that reports ``FAKE_GPU`` as its device; what ``.to(FAKE_GPU)`` returns under the fake."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return FAKE_GPU


def _host(value):
    """``value`` with every ``OnFakeGpu`` unwrapped to the host tensor it shares storage with."""
    if isinstance(value, OnFakeGpu):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_host(item) for item in value)
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _issuer() -> Path:
    """The file that issued the collective being called (past torch's, DeepSpeed's and Accelerate's wrappers)."""
    frame = sys._getframe(2)
    while frame is not None and any(layer in frame.f_code.co_filename for layer in COMM_LAYERS):
        frame = frame.f_back
    return Path(frame.f_code.co_filename).resolve() if frame is not None else Path("?")


class CollectivesOnAGpu:
    """torch.distributed as NCCL holds it on a GPU, for a CPU gloo group.

    ``pretrain.collective`` is told its device is ``FAKE_GPU``; ``Tensor.to(FAKE_GPU)`` gives
    a host tensor that reports that device. Every collective vitscale issues must come from
    ``pretrain.collective`` (a call from elsewhere in the repository, directly or through
    DeepSpeed's comm or Accelerate's reduce, fails) with every tensor on ``FAKE_GPU`` and a
    barrier given ``device_ids=[3]``; collectives of DeepSpeed and Accelerate themselves must
    have their tensors on ``engine_device``, as their own placement puts them. Failing calls
    raise ``AssertionError`` naming the function, the device and the caller; ``calls``
    counts the passing ones by name, ``placed`` those of them ``pretrain.collective`` issued.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, engine_device: torch.device) -> None:
        import torch.distributed as dist

        from pretrain import collective

        self.engine_device = engine_device
        self.calls: dict[str, int] = {}
        self.placed: dict[str, int] = {}
        monkeypatch.setattr(collective, "collective_device", lambda: FAKE_GPU)
        monkeypatch.setattr(torch.Tensor, "to", self._to())
        for name in COLLECTIVES:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, self._checked(name, getattr(dist, name)))

    def _to(self):
        """``Tensor.to`` (a function, so that it binds to the tensor) with ``FAKE_GPU`` as a device."""
        real_to = torch.Tensor.to

        def to(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target) == FAKE_GPU:
                return real_to(_host(tensor), copy=True).as_subclass(OnFakeGpu)
            return real_to(_host(tensor), *args, **kwargs)
        return to

    def _checked(self, name: str, real):
        def call(*args, **kwargs):
            issuer = _issuer()
            if issuer == COLLECTIVE_MODULE:
                runs_on = f"pretrain.collective runs on {FAKE_GPU}"
                for tensor in _tensors([*args, *kwargs.values()]):
                    assert tensor.device == FAKE_GPU, \
                        f"torch.distributed.{name} got a tensor on {tensor.device}; {runs_on}"
                if name == "barrier":
                    assert kwargs.pop("device_ids", None) == [FAKE_GPU.index], \
                        f"torch.distributed.barrier without device_ids=[{FAKE_GPU.index}]; {runs_on}"
                self.placed[name] = self.placed.get(name, 0) + 1
            else:
                assert not any(package in issuer.parents for package in VITSCALE), \
                    f"torch.distributed.{name} issued by {issuer.relative_to(REPO)}, not through pretrain.collective"
                for tensor in _tensors([*args, *kwargs.values()]):
                    assert tensor.device == self.engine_device, \
                        f"torch.distributed.{name} (from {issuer.name}) got a tensor on {tensor.device}; " \
                        f"the engine is on {self.engine_device}"
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*_host(args), **{key: _host(value) for key, value in kwargs.items()})
        return call
