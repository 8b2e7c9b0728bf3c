"""Run the few-shot probe and the kNN monitor on one model, for every configured dataset.

Per dataset, once: the train split's catalog (labels and image offsets, ``features.scan_split``),
the few-shot picks of every seed (``probe.pick_shots``: ``max(shots)`` images a class,
nested) and the kNN bank (``bank_per_class`` images a class, seed 0). Per evaluation:

1. the union of picked and bank images is extracted once, spread over the ranks and
   gathered on all of them (``features.extract_rows``);
2. every rank extracts its share of the val split (the eval stream: each sample once);
3. rank 0 fits one probe per (seed, shots) in float64, choosing L2 on held-out shots
   when a grid is set, and ``share_from_main`` gives all ranks the weights;
4. every rank scores its val share with each probe and with the kNN bank; one sum
   all-reduce of the counts gives the accuracies.

The result is one ``Record``: scalars for TensorBoard, a JSON line for the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pretrain import collective
from pretrain.config import DataConfig, FewShotConfig, KnnConfig, ProbeDataset
from pretrain.data.eval_stream import build_eval_stream
from pretrain.data.transforms import BatchPreprocessor, build_eval_transform
from pretrain.fewshot.features import Catalog, extract, extract_rows, read_member, scan_split, share_from_main
from pretrain.fewshot.knn import knn_predict
from pretrain.fewshot.probe import LinearProbe, pick_shots, ridge_cache, select_l2

log = logging.getLogger(__name__)

RESULTS_FILE = "fewshot.jsonl"
"""One JSON line per evaluation, in the run directory."""
PICKS_FILE = "fewshot_picks.json"
"""The images each seed picked, per dataset: class -> keys in draw order (``s`` shots are the first ``s``)."""
KNN_SEED = 0


@dataclass
class DatasetState:
    """What a dataset needs across evaluations (built at its first one)."""

    name: str
    spec: ProbeDataset
    shots: list[int]
    catalog: Catalog
    picks: list[np.ndarray]
    """Per seed, (classes, max shots) catalog rows; empty without the few-shot probe."""
    bank: np.ndarray
    """Catalog rows of the kNN bank; empty without the kNN monitor."""


@dataclass
class Record:
    """One evaluation of the monitors."""

    step: int
    fewshot: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    knn: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0
    """Images forwarded over all ranks (picked, bank and val)."""

    def scalars(self) -> dict[str, float]:
        """TensorBoard tags: ``fewshot/<dataset>/<shots>shot`` (mean over seeds) and ``..._std``, ``knn/<dataset>/top1``."""
        out = {}
        for name, by_shots in self.fewshot.items():
            for shots, figures in by_shots.items():
                out[f"fewshot/{name}/{shots}"] = figures["mean"]
                out[f"fewshot/{name}/{shots}_std"] = figures["std"]
        out.update({f"knn/{name}/top1": figures["top1"] for name, figures in self.knn.items()})
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """A plain-text table: one row per dataset, one column per shot count, then kNN top-1."""
        names = sorted(set(self.fewshot) | set(self.knn))
        columns = sorted({shots for by in self.fewshot.values() for shots in by}, key=lambda s: int(s[:-4]))
        lines = ["dataset".ljust(16) + "".join(c.rjust(16) for c in columns) + "knn top-1".rjust(12)]
        for name in names:
            cells = [(f"{f['mean']:.4f}±{f['std']:.4f}" if (f := self.fewshot.get(name, {}).get(c)) else "-").rjust(16)
                     for c in columns]
            knn = self.knn.get(name)
            lines.append(name.ljust(16) + "".join(cells) + (f"{knn['top1']:.4f}" if knn else "-").rjust(12))
        return "\n".join(lines)


class Monitor:
    """Few-shot probe and kNN monitor over the datasets of ``fewshot`` and ``knn`` (rank 0 writes the logs)."""

    def __init__(self, fewshot: FewShotConfig, knn: KnnConfig, data: DataConfig, img_size: int, rank: int,
                 world_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 run_dir: Optional[Path] = None):
        self.fewshot, self.knn = fewshot, knn
        self.fewshot_sets, self.knn_sets = fewshot.parsed(), knn.parsed()
        self.data = dataclasses.replace(data, mixup=0.0, cutmix=0.0)
        self.img_size, self.rank, self.world_size = img_size, rank, world_size
        self.device, self.dtype, self.run_dir = device, dtype, run_dir
        self.batch_size = fewshot.batch_size or data.eval_batch_size or data.micro_batch_size
        self.transform = build_eval_transform(self.data, img_size)
        self.preprocess = BatchPreprocessor(self.data, 1)
        self.states: dict[str, DatasetState] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.fewshot_sets or self.knn_sets)

    def due(self, step: int, final: bool = False) -> tuple[bool, bool]:
        """Whether (the few-shot probe, the kNN monitor) run at ``step``.

        ``final=False``: at multiples of their ``every_steps``. ``final=True`` (after the last
        step): where that step was not already one of them, so a run always ends with figures.
        """
        def on(every: int, sets: dict) -> bool:
            periodic = bool(every and step % every == 0)
            return bool(sets) and (not periodic if final else periodic)

        return on(self.fewshot.every_steps, self.fewshot_sets), on(self.knn.every_steps, self.knn_sets)

    def write(self, record: Record) -> None:
        """Append the record to ``RESULTS_FILE`` in the run directory (rank 0)."""
        if self.rank == 0 and self.run_dir is not None:
            with open(self.run_dir / RESULTS_FILE, "a") as out:
                out.write(record.to_json() + "\n")

    # ----------------------------------------------------------- datasets

    def _state(self, name: str) -> DatasetState:
        if name in self.states:
            return self.states[name]
        spec = self.fewshot_sets.get(name) or self.knn_sets[name]
        catalog = scan_split(Path(spec.shards), spec.train_split, self.rank, self.world_size)
        shots = sorted(spec.shots or self.fewshot.shots) if name in self.fewshot_sets else []
        picks = [pick_shots(catalog.labels, max(shots), seed, name) for seed in range(self.fewshot.seeds)] \
            if shots else []
        bank = np.zeros(0, dtype=np.int64)
        if name in self.knn_sets:
            drawn = pick_shots(catalog.labels, self.knn.bank_per_class, KNN_SEED, f"{name}/knn", exact=False)
            bank = np.sort(drawn[drawn >= 0])
        state = self.states[name] = DatasetState(name, spec, shots, catalog, picks, bank)
        if picks and self.rank == 0 and self.run_dir is not None:
            self._log_picks(state)
        return state

    def _log_picks(self, state: DatasetState) -> None:
        """Add this dataset's picks (keys from the tar headers) to ``PICKS_FILE``."""
        path = self.run_dir / PICKS_FILE
        logged = json.loads(path.read_text()) if path.is_file() else {}
        catalog = state.catalog

        def key(row: int) -> str:
            return read_member(catalog.shards[int(catalog.shard[row])], int(catalog.offset[row]), False)[0]

        logged[state.name] = {f"seed {seed}": {str(int(catalog.labels[rows[0]])): [key(r) for r in rows]
                                               for rows in picks}
                              for seed, picks in enumerate(state.picks)}
        path.write_text(json.dumps(logged, indent=1))

    # ---------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module, step: int, fewshot: bool = True, knn: bool = True) -> Record:
        """Run the due monitors on ``model`` (every rank calls this); returns the same record on every rank."""
        start = time.perf_counter()
        record = Record(step)
        names = sorted((set(self.fewshot_sets) if fewshot else set()) | (set(self.knn_sets) if knn else set()))
        for name in names:
            images = self._evaluate_dataset(model, self._state(name), record, fewshot, knn)
            record.images += images
        record.seconds = time.perf_counter() - start
        return record

    def _evaluate_dataset(self, model: nn.Module, state: DatasetState, record: Record, fewshot: bool,
                          knn: bool) -> int:
        use_probe, use_knn = fewshot and bool(state.picks), knn and len(state.bank) > 0
        picked = np.concatenate([p.ravel() for p in state.picks]) if use_probe else np.zeros(0, dtype=np.int64)
        rows = np.unique(np.concatenate([picked, state.bank if use_knn else picked[:0]]))
        features, readable = extract_rows(model, state.catalog, rows, self.transform, self.preprocess, self.device,
                                          self.dtype, self.img_size, self.batch_size, self.data.num_workers,
                                          self.rank, self.world_size)
        val_features, val_labels = extract(model, self._val_stream(state.spec), self.preprocess, self.device,
                                           self.dtype, self.img_size)
        classes = state.catalog.classes
        probes = self._fit_probes(state, rows, features, readable, classes) if use_probe else []
        correct = [int((classes[probe.predict(val_features).cpu().numpy()] == val_labels.numpy()).sum())
                   for probe in probes]
        if use_knn:
            in_bank = np.searchsorted(rows, state.bank)
            in_bank = in_bank[readable[in_bank]]
            labels = torch.from_numpy(np.searchsorted(classes, state.catalog.labels[rows[in_bank]]))
            predicted = knn_predict(features[in_bank].to(self.device), labels.to(self.device),
                                    val_features.to(self.device), len(classes), self.knn.k, self.knn.temperature)
            correct.append(int((torch.from_numpy(classes)[predicted.cpu()] == val_labels).sum()))
        totals = collective.sum_values([*correct, len(val_labels)])
        val_total = totals[-1]
        accuracies = [c / max(val_total, 1) for c in totals[:-1]]
        if use_probe:
            seeds = self.fewshot.seeds
            record.fewshot[state.name] = {
                f"{shots}shot": {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)),
                                 "min": float(min(per_seed)), "max": float(max(per_seed)), "seeds": per_seed,
                                 "l2": [probes[i * seeds + s].l2 for s in range(seeds)]}
                for i, shots in enumerate(state.shots)
                for per_seed in [accuracies[i * seeds:(i + 1) * seeds]]}
        if use_knn:
            record.knn[state.name] = {"top1": accuracies[-1], "k": self.knn.k, "bank": int(len(state.bank))}
        return len(rows) + int(val_total)

    def _val_stream(self, spec: ProbeDataset):
        """This rank's share of the val split, built per evaluation: its loader workers end with it instead of
        idling between evaluations next to the training loader's (one set per dataset and rank)."""
        data = dataclasses.replace(self.data, eval_shards=spec.shards, eval_split=spec.val_split,
                                   eval_batch_size=self.batch_size)
        return build_eval_stream(data, img_size=self.img_size, rank=self.rank, world_size=self.world_size)

    def _fit_probes(self, state: DatasetState, rows: np.ndarray, features: torch.Tensor, readable: np.ndarray,
                    classes: np.ndarray) -> list["FittedProbe"]:
        """One probe per (shots, seed), shots-major, fitted on rank 0 (on its device) and shared with every rank."""
        dim, count = features.shape[1], len(classes)
        size = 2 * dim + (dim + 1) * count
        jobs = [(shots, seed) for shots in state.shots for seed in range(self.fewshot.seeds)]
        packed = None
        if self.rank == 0:
            on_device = features.to(self.device, torch.float64)
            fitted, l2s = [], []
            for shots, seed in jobs:
                where = np.searchsorted(rows, state.picks[seed][:, :shots].ravel())
                where = where[readable[where]]
                x = on_device[torch.from_numpy(where).to(self.device)]
                y = torch.from_numpy(np.searchsorted(classes, state.catalog.labels[rows[where]]))
                l2s.append(select_l2(x, y, count, shots, self.fewshot.l2_grid, self.fewshot.l2))
                fitted.append(ridge_cache(x, y, count).probe(l2s[-1]).pack().cpu())
            packed = torch.cat([*fitted, torch.tensor(l2s, dtype=torch.float64)])
        flat = share_from_main(packed, len(jobs) * size + len(jobs), self.rank == 0).to(self.device)
        return [FittedProbe.of(LinearProbe.unpack(flat[i * size:(i + 1) * size], dim, count), flat[-len(jobs) + i])
                for i in range(len(jobs))]


@dataclass(frozen=True)
class FittedProbe(LinearProbe):
    """A probe with the L2 it was fitted with (logged per seed)."""

    l2: float = 0.0

    @classmethod
    def of(cls, probe: LinearProbe, l2: float) -> "FittedProbe":
        return cls(probe.mean, probe.std, probe.weights, float(l2))

