"""``pretrain.collective``: the only caller of collectives (torch.distributed, deepspeed.comm, Accelerate's),
on the device NCCL needs.

The runtime checks (every collective of a real pretraining and finetuning run, with the
collectives' device faked as a GPU) are in ``test_pretrain_engine.py``, which owns this
process' group.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fake_devices import COLLECTIVES
from pretrain import collective

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "finetune", "data_tools", "benchmarks", "launch")
COMM_MODULES = ("torch.distributed", "deepspeed.comm")
"""Modules whose collectives take tensors as they are: DeepSpeed's comm forwards to torch.distributed."""
ACCELERATE_COLLECTIVES = frozenset({"reduce", "gather", "gather_for_metrics", "pad_across_processes", "broadcast",
                                    "broadcast_object_list"})
"""Accelerate's collectives (``Accelerator`` methods and ``accelerate.utils`` functions): they reduce on the
tensor's own device too."""


def _comm_aliases(tree: ast.AST) -> set[str]:
    """Names a module binds to ``torch.distributed`` or ``deepspeed.comm`` (``import torch.distributed as dist``,
    ``from deepspeed import comm``, ...), the dotted names themselves included."""
    names = set(COMM_MODULES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name in COMM_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in COMM_MODULES}
    return names


def _uses_accelerate(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Import) and any(a.name.split(".")[0] == "accelerate" for a in node.names)
               or isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "accelerate"
               for node in ast.walk(tree))


def _collective_calls(path: Path) -> list[str]:
    """Collectives ``path`` issues itself: torch.distributed's and deepspeed.comm's (called or imported by name),
    and, in a module that uses Accelerate, any call of an Accelerate collective's name."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = _comm_aliases(tree)
    accelerate = _uses_accelerate(tree)
    where = path.relative_to(REPO)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in COMM_MODULES:
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "accelerate":
            found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name in ACCELERATE_COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and owner in aliases or \
                    accelerate and node.func.attr in ACCELERATE_COLLECTIVES:
                found.append(f"{where}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_collective_bypasses_the_helper() -> None:
    """Under NCCL a collective on a CPU tensor raises; the first checkpoint save did exactly that
    (``torch.tensor([...])`` with no device). Only ``pretrain/collective.py`` may call them."""
    offenders = [call for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if path != REPO / "pretrain" / "collective.py" for call in _collective_calls(path)]
    assert offenders == [], "use pretrain.collective instead of torch.distributed, deepspeed.comm or " \
                            "Accelerate's collectives directly:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source,expected", [
    ("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
     "from torch.distributed import all_reduce\n"
     "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n    d2.broadcast(t, 0)\n"
     "    dist.get_rank()\n",
     ["m.py:4 imports all_reduce", "m.py:6 dist.all_reduce", "m.py:7 torch.distributed.barrier",
      "m.py:8 d2.broadcast"]),
    ("import deepspeed\nfrom deepspeed import comm as dist\nimport deepspeed.comm as dc\n"
     "from deepspeed.comm import all_reduce\n"
     "def f(t, g):\n    dist.all_reduce(t, group=g)\n    dc.barrier()\n    deepspeed.comm.broadcast(t, 0)\n"
     "    dist.get_rank()\n",
     ["m.py:4 imports all_reduce", "m.py:6 dist.all_reduce", "m.py:7 dc.barrier",
      "m.py:8 deepspeed.comm.broadcast"]),
    ("from accelerate import Accelerator\nfrom accelerate.utils import gather, set_seed\n"
     "def f(acc, t):\n    acc.reduce(t, 'mean')\n    acc.gather_for_metrics(t)\n    acc.backward(t)\n",
     ["m.py:2 imports gather", "m.py:4 acc.reduce", "m.py:5 acc.gather_for_metrics"]),
    ("from functools import reduce\ndef f(xs):\n    return reduce(max, xs)\n", []),
])
def test_the_scan_sees_the_forms_code_uses(source: str, expected: list[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "m.py").write_text(source)
    assert _collective_calls(tmp_path / "m.py") == expected


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
