"""Run-directory checkpoints: ``<run>/checkpoints/step_{N:08d}/``, atomic from the reader's view.

Layout and protocol (engine-agnostic; ``finetune`` uses it with Accelerate):

* Every rank writes its files into ``step_N/`` (a stale, never-completed ``step_N/``
  from a crashed attempt is removed first).
* Ranks agree that all writes succeeded (one all-reduce); only then rank 0 writes
  ``step_N/complete.json`` (step, world size, parameter shapes, ...) atomically
  (temp file + ``os.replace``) and then moves ``checkpoints/latest`` the same way.
  ``latest`` holds the tag, as DeepSpeed's own ``latest`` file does.
* ``find_latest`` trusts ``latest`` only if its directory is complete, else falls
  back to the newest complete directory: a run killed mid-write (or a full disk)
  is never resumed from a half-written checkpoint.
* The last ``keep_last`` complete checkpoints are kept; older ones are purged.

A failed save (``OSError``: full disk, quota, file-size limit) removes its own partial
directory, leaves ``latest`` and the previous checkpoint untouched, and says in one line
which file failed and why; the train loops then stop with exit status 1.

DeepSpeed part: ``save_checkpoint(..., save_latest=False)`` under the tag, per-rank
RNG state next to it (DeepSpeed keeps ``client_state`` of rank 0 only), loading
with an up-front shape check, and on-demand conversion to a universal checkpoint
when the world size changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from data_tools.manifest import write_text_atomic
from pretrain import collective
from pretrain.optim import place_step_counts

log = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
UNIVERSAL = "universal"
_TAG = re.compile(r"^step_(\d{8})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its marker's metadata."""

    step: int
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def world_size(self) -> Optional[int]:
        return self.meta.get("world_size")


class DamagedCheckpointError(RuntimeError):
    """A complete checkpoint whose files no longer have the sizes written: the trainers exit 2 with its one line."""


class CheckpointDir:
    """The ``checkpoints/`` folder of a run; the write-side methods are called on rank 0 only."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, step: int) -> Path:
        return self.root / step_tag(step)

    def read(self, path: Path) -> Optional[Checkpoint]:
        """The checkpoint in ``path`` if it is complete, else None."""
        match = _TAG.match(path.name)
        marker = path / MARKER
        if not match or not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return Checkpoint(int(match.group(1)), path, meta)

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = (self.read(p) for p in self.root.iterdir() if p.is_dir())
        return sorted((c for c in found if c is not None), key=lambda c: c.step)

    def find(self, step: Optional[int] = None) -> Optional[Checkpoint]:
        """Checkpoint ``step`` (None if absent or incomplete), or the latest complete one if ``step`` is None."""
        if step is not None:
            return self.read(self.path(step))
        latest = self.root / LATEST
        if latest.is_file():
            pointed = self.read(self.root / latest.read_text().strip())
            if pointed is not None:
                return pointed
        done = self.complete()
        return done[-1] if done else None

    def begin(self, step: int) -> Path:
        """Make ``step_N/`` ready for writing: a leftover incomplete one is removed."""
        path = self.path(step)
        if path.exists() and self.read(path) is None:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, step: int, meta: dict[str, Any]) -> Checkpoint:
        """Mark ``step_N/`` complete with the size of every file in it, then point ``latest`` at it."""
        path = self.path(step)
        meta = {"step": step, **meta, "files": {str(f.relative_to(path)): f.stat().st_size
                                                for f in sorted(path.rglob("*")) if f.is_file()}}
        write_text_atomic(path / MARKER, json.dumps(meta, indent=1))
        write_text_atomic(self.root / LATEST, path.name)
        return Checkpoint(step, path, meta)

    def check(self, checkpoint: Checkpoint) -> None:
        """Raise naming the first file of ``checkpoint`` whose size differs from the size committed, and the way back.

        Why before loading: a file damaged after its checkpoint completed (truncated by a
        crashed copy or a full disk during a sync, deleted by a clean-up) otherwise fails
        deep in ``torch.load`` with an unpickling error that names neither the file nor
        what to do, on the ranks that read it only, while the others wait in a collective.
        Every rank checks every file, so all ranks stop at once with the same message.
        Checkpoints committed before sizes were recorded pass unchecked.
        """
        for name, size in checkpoint.meta.get("files", {}).items():
            path = checkpoint.path / name
            found = path.stat().st_size if path.is_file() else None
            if found == size:
                continue
            earlier = [c for c in self.complete() if c.step < checkpoint.step]
            back = (f"to resume from {earlier[-1].path} (step {earlier[-1].step}), move the damaged one aside: "
                    f"mv {checkpoint.path} {checkpoint.path}.damaged" if earlier else
                    "there is no earlier checkpoint: start over with a new run.dir or checkpoint.resume=false")
            raise DamagedCheckpointError(f"checkpoint {checkpoint.path} is damaged: {name} has "
                                         f"{'no file' if found is None else f'{found} bytes'}, {size} bytes were "
                                         f"written; {back}")

    def abort(self, step: int) -> None:
        """Remove the partial ``step_N/`` of a failed save (it was never marked complete)."""
        path = self.path(step)
        if path.exists() and self.read(path) is None:
            shutil.rmtree(path, ignore_errors=True)

    def purge(self, keep_last: int) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than them."""
        done = self.complete()
        if keep_last <= 0 or len(done) <= keep_last:
            return []
        oldest_kept = done[-keep_last].step
        removed = []
        for path in sorted(self.root.iterdir()):
            match = _TAG.match(path.name)
            if path.is_dir() and match and int(match.group(1)) < oldest_kept:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed


# ------------------------------------------------------------- shared helpers


def param_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> full shape (ZeRO-3 partitioned parameters report ``ds_shape``)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def check_shapes(saved: dict[str, list[int]], current: dict[str, list[int]], where: Path) -> None:
    """Raise naming every parameter whose presence or shape differs between checkpoint and model."""
    problems = [f"{k}: checkpoint {saved[k]} vs model {current[k]}"
                for k in saved.keys() & current.keys() if saved[k] != current[k]]
    problems += [f"{k}: only in the checkpoint" for k in saved.keys() - current.keys()]
    problems += [f"{k}: only in the model" for k in current.keys() - saved.keys()]
    if problems:
        shown = "\n  ".join(sorted(problems)[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"checkpoint {where} was saved from a different model ({len(problems)} mismatching parameters):\n  "
            f"{shown}{more}\nuse a new run.dir, or set the model config to the one in {where}/{MARKER}"
        )


def rng_state() -> dict[str, Any]:
    """The host generators and this process' own CUDA device's (the current one), not every visible GPU's.

    Why only its own: a process draws from its own device only, and the set of visible
    GPUs is the launcher's choice, not the run's. A checkpoint that held one state per
    visible GPU (``get_rng_state_all``) written by tasks that each saw 8 could not be
    restored by tasks bound to one GPU each (``set_rng_state_all`` raised ``IndexError``
    on every rank), so the run could never resume on another layout.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def own_cuda_state(saved: Any) -> Optional[torch.Tensor]:
    """This process' CUDA generator state out of a saved ``cuda`` entry; None when there is none to restore.

    ``saved`` is one state (this module's format), or a list with one per visible GPU
    (``get_rng_state_all``: checkpoints written before, and Accelerate's). From a list, the
    entry of the device this process used is taken when it is certain: the only entry (the
    writer saw one GPU, its own), or the current device's when as many GPUs are visible as
    the writer saw (same layout, same device). Otherwise the writer's device is unknown:
    the CUDA generator keeps its seeded state, with a warning, and the run resumes.
    """
    if saved is None or not torch.cuda.is_available():
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    visible = torch.cuda.device_count()
    if len(saved) == 1:
        return saved[0]
    if len(saved) == visible:
        return saved[torch.cuda.current_device()]
    log.warning("the checkpoint holds the CUDA generator states of %d visible GPUs, this process sees %d: which one "
                "it drew from is unknown, so the CUDA generator is not restored (host generators are)",
                len(saved), visible)
    return None


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (or an older per-visible-GPU list, see ``own_cuda_state``)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = own_cuda_state(state.get("cuda"))
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def rng_file(directory: Path) -> Path:
    """This rank's generator states in a checkpoint directory (both stages write one per rank)."""
    return Path(directory) / f"rng_rank{_rank():05d}.pt"


def save_rng(directory: Path) -> None:
    save_file(rng_state(), str(rng_file(directory)))  # a full disk here too is an OSError naming the file


def load_rng(directory: Path) -> bool:
    """Restore this rank's generators from ``directory``; False if it holds none for this rank
    (a rank that did not exist when it was written)."""
    path = rng_file(directory)
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_collective(ckdir: CheckpointDir, step: int, write: Callable[[Path], None], meta: dict[str, Any],
                    keep_last: int) -> Optional[Checkpoint]:
    """Run ``write(step_dir)`` on every rank and commit only if every rank succeeded.

    Returns the new checkpoint, or None if some rank hit an ``OSError`` (the partial
    directory is removed; the previous checkpoint and ``latest`` stay as they were). The
    rank that failed logs one line with the file and the reason, rank 0 one line if it was another rank.
    """
    rank = _rank()
    if rank == 0:
        ckdir.begin(step)
    collective.barrier()
    error: Optional[OSError] = None
    try:
        write(ckdir.path(step))
    except OSError as exn:
        error = exn
    if not collective.all_true(error is None):
        if rank == 0:
            ckdir.abort(step)
        collective.barrier()
        if error is not None or rank == 0:
            previous = ckdir.find()
            kept = (f"{previous.path} is intact and stays latest: fix the cause and rerun, it resumes from there"
                    if previous else "there is no earlier checkpoint: fix the cause and rerun")
            log.error("rank %d: checkpoint %s was NOT saved: %s; %s", rank, step_tag(step),
                      error if error is not None else "another rank failed to write it (see its error)", kept)
        return None
    checkpoint = None
    if rank == 0:
        checkpoint = ckdir.commit(step, meta)
        for path in ckdir.purge(keep_last):
            log.info("removed old checkpoint %s", path)
    collective.barrier()
    return checkpoint or ckdir.read(ckdir.path(step))


def save_file(state: Any, path: str, zipfile: bool = True) -> None:
    """``torch.save`` to ``path`` and sync it to disk; a failed write raises ``OSError`` naming ``path`` and why.

    Why: torch's own writer reports a full disk or a file-size limit as a ``RuntimeError``
    that names neither (``unexpected pos 576 vs 534``, ``write(): fd 3 failed with File too
    large``); ``save_collective`` did not catch it, and the run died with a traceback. Synced
    because ``complete.json`` must not reach the disk before the files it vouches for.
    """
    try:
        with open(path, "wb") as handle:
            torch.save(state, handle, _use_new_zipfile_serialization=zipfile)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as exn:
        raise write_error(path, exn) from exn


def write_error(path: Path | str, exn: BaseException) -> OSError:
    """``exn``, raised while writing ``path``, as an ``OSError`` naming ``path`` and the system's reason where
    ``exn`` carries one (torch's writer raises a ``RuntimeError`` whose context is the ``OSError``, safetensors'
    Rust writer puts ``(os error N)`` in its message)."""
    cause = exn if isinstance(exn, OSError) else exn.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(cause.errno, f"could not write {path}: {cause.strerror}")
    rust = re.search(r"\(os error (\d+)\)", str(exn))
    if rust:
        return OSError(int(rust.group(1)), f"could not write {path}: {os.strerror(int(rust.group(1)))}")
    return OSError(f"could not write {path}: {exn}")


def newest_file(folder: Path) -> Path:
    """The file under ``folder`` written last: the one a writer that names no file was writing when it failed."""
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_mtime_ns, default=folder)


@contextlib.contextmanager
def writes_named(module: Any, name: str = "save") -> Iterator[None]:
    """Within, a failed ``module.<name>(obj, path, ...)`` raises ``write_error(path, ...)``.

    For writers that name no file on a full disk or a file-size limit: torch's (``RuntimeError``) and
    safetensors' (``SafetensorError``, its partial file already removed, so ``newest_file`` cannot find it).
    """
    real = getattr(module, name)

    def save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return real(obj, path, *args, **kwargs)
        except (OSError, RuntimeError, SafetensorError) as exn:
            raise write_error(path, exn) from exn

    setattr(module, name, save)
    try:
        yield
    finally:
        setattr(module, name, real)


# ----------------------------------------------------------------- DeepSpeed


def save_deepspeed(engine: Any, ckdir: CheckpointDir, step: int, client_state: dict[str, Any],
                   meta: dict[str, Any], keep_last: int) -> Optional[Checkpoint]:
    """DeepSpeed checkpoint under ``step_N`` plus this rank's RNG state; see ``save_collective``."""
    writer = engine.checkpoint_engine
    if type(writer).__name__ == "TorchCheckpointEngine":  # DeepSpeed's default writer; others are left as they are
        writer.save = lambda state_dict, path: save_file(state_dict, path, writer.zipfile_serialization)

    def write(path: Path) -> None:
        engine.save_checkpoint(str(ckdir.root), tag=path.name, client_state=client_state, save_latest=False)
        save_rng(path)

    return save_collective(ckdir, step, write, {"world_size": engine.world_size, **meta}, keep_last)


def universal_path(checkpoint: Checkpoint) -> Path:
    return checkpoint.path / UNIVERSAL


POLL_S = 5.0


def convert_to_universal(checkpoint: Checkpoint, rank: int, timeout_s: float, workers: int = 0) -> Path:
    """Rank 0 converts ``step_N`` to a universal checkpoint in ``step_N/universal`` (once); the others wait.

    Needed to resume on a different number of processes: a ZeRO checkpoint's
    optimizer state is partitioned for the world size that wrote it.

    Why the others wait on the file system and not in a collective: the conversion
    reads every partition on one node and grows with the model and the old world
    size (``benchmarks/universal_convert.py`` measures it); inside a barrier the
    waiting ranks would hit the collective timeout. So this needs no process
    group: ``python -m pretrain`` calls it before the group starts, and ranks poll
    for ``universal/complete.json`` every few seconds, up to ``timeout_s``
    (``deepspeed.universal_timeout_min``). If rank 0 fails, the launcher ends the
    others (``srun --kill-on-bad-exit=1``, torchrun). ``workers``: parallel
    extract/merge processes (0: the CPUs this process may use).
    """
    out = universal_path(checkpoint)
    done = out / MARKER
    if done.is_file():
        return out
    if rank == 0:
        _run_conversion(checkpoint, out, workers or len(os.sched_getaffinity(0)))
        return out
    deadline = time.monotonic() + timeout_s
    while not done.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no universal checkpoint in {out} after {timeout_s / 60:.0f} min of waiting for rank 0 "
                               "to convert it: raise deepspeed.universal_timeout_min, or convert it beforehand "
                               "(see pretrain.checkpoint.convert_to_universal)")
        time.sleep(POLL_S)
    return out


def _run_conversion(checkpoint: Checkpoint, out: Path, workers: int) -> None:
    """DeepSpeed's ``ds_to_universal`` in a subprocess, then the marker the waiting ranks look for."""
    if out.exists():
        shutil.rmtree(out)
    start = time.monotonic()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint.path),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {checkpoint.path} to a universal checkpoint failed "
                           f"(exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    seconds = time.monotonic() - start
    log.info("converted %s to a universal checkpoint in %.1f s (%d workers)", checkpoint.path, seconds, workers)
    write_text_atomic(out / MARKER, json.dumps({"source": checkpoint.tag, "seconds": round(seconds, 2)}))


def load_deepspeed(engine: Any, checkpoint: Checkpoint, shapes: dict[str, list[int]],
                   universal: bool = False) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and this rank's RNG; return the client state.

    ``universal``: load ``step_N/universal`` (the engine must have been built with
    ``checkpoint.load_universal``). The parameter shapes are checked first, so a
    checkpoint of another model fails with the mismatching names.
    """
    check_shapes(checkpoint.meta.get("param_shapes", {}), shapes, checkpoint.path)
    load_dir, tag = (checkpoint.path, UNIVERSAL) if universal else (checkpoint.path.parent, checkpoint.tag)
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint to load in {load_dir}/{tag}")
    place_step_counts(getattr(engine.optimizer, "optimizer", engine.optimizer))
    load_rng(checkpoint.path)
    return client_state or {}
