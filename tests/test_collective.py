"""``pretrain.collective``: the only caller of torch.distributed collectives, on the device NCCL needs.

The runtime check (every collective of a real training run gets its tensors on the
engine's device) is in ``test_pretrain_engine.py``, which owns this process' group.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pretrain import collective

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "finetune", "data_tools", "benchmarks", "launch")
COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_single", "all_to_all",
    "all_to_all_single", "reduce_scatter_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "irecv", "isend", "monitored_barrier", "recv",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send",
})
"""torch.distributed functions that move tensors (or need a device) on the default group."""


def _distributed_aliases(tree: ast.AST) -> set[str]:
    """Names a module binds to ``torch.distributed`` (``import torch.distributed as dist`` -> ``dist``)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" :
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    aliases = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_collective_bypasses_the_helper() -> None:
    """Under NCCL a collective on a CPU tensor raises; the first checkpoint save did exactly that
    (``torch.tensor([...])`` with no device). Only ``pretrain/collective.py`` may call them."""
    offenders = [call for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if path != REPO / "pretrain" / "collective.py" for call in _collective_calls(path)]
    assert offenders == [], "use pretrain.collective instead of torch.distributed directly:\n" + "\n".join(offenders)


def test_the_scan_sees_the_forms_code_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    source = tmp_path / "m.py"
    source.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                      "from torch.distributed import all_reduce\n"
                      "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n    d2.broadcast(t, 0)\n"
                      "    dist.get_rank()\n")
    assert _collective_calls(source) == ["m.py:4 imports all_reduce", "m.py:6 dist.all_reduce",
                                         "m.py:7 torch.distributed.barrier", "m.py:8 d2.broadcast"]


@pytest.mark.parametrize("backend,device_type", [
    ("nccl", "cuda"), ("cuda:nccl", "cuda"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("mpi", "cpu"),
])
def test_device_follows_the_backend(backend: str, device_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    device = collective.device_for_backend(backend)
    assert device.type == device_type and (device_type == "cpu" or device.index == 5)


def test_without_a_group_values_pass_through() -> None:
    assert not collective.active()
    assert collective.sum_values([1.5, 2.0]) == [1.5, 2.0]
    assert collective.any_true(True) and not collective.any_true(False)
    assert collective.all_true(True) and not collective.all_true(False)
    collective.barrier()
