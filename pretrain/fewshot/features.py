"""Labelled shard directories -> pre-logits features, extracted on every rank and gathered in a fixed order.

Which layer: the input of the model's ``pre_logits`` module, that is the class token
after the final ``norm`` (``pool='token'``) or the mean patch token after ``fc_norm``
(``pool='gap'``): ``forward_head(..., pre_logits=True)``. With the linear head that is
what the classifier reads; with the hidden-layer head (``model.pre_logits: P``) it is the
layer *before* the tanh ``pre_logits.fc``. Why not after the tanh, as big_vision does:
finetuning (``finetune.load``, timm) drops that layer with the classifier, so the
pooled features are the representation every downstream user starts from, and one layer
serves both head variants (after ``reset_classifier`` ``pre_logits`` is an identity and
the same hook reads the same tensor). A forward pre-hook on ``pre_logits`` reads it while
the model runs its ordinary ``__call__``: a DeepSpeed engine, DDP or ZeRO-3 (whose
parameter gathering hangs on module calls) all work unchanged, at the cost of the
classifier's matmul (0.1 % of a B/16 forward at 21k classes).

How the work is shared: the train split's labels come from its tar headers, each rank
scanning every ``world_size``-th shard; the picked images are split into contiguous
runs, one per rank; every rank extracts its run (in eval mode, processes in
``pretrain.evaluate.lockstep``) and a sum all-reduce of the zero-padded (images, D)
matrix gives every rank all rows in the order of the sample index. The figures are
therefore the same for any world size. Only ``pretrain.collective`` is called.
"""

from __future__ import annotations

import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data_tools.index import split_name
from data_tools.manifest import read_split
from pretrain import collective
from pretrain.data.samples import CorruptLog, decode_sample
from pretrain.data.transforms import IMAGE_KEYS, BatchPreprocessor
from pretrain.evaluate import dummy_batch, lockstep
from pretrain.model import VisionTransformer

NO_LABELS = torch.zeros(0, dtype=torch.int64)
"""Passed to ``BatchPreprocessor``: the labels here are carried beside the batch, never turned into targets."""


@dataclass(frozen=True)
class Catalog:
    """Every sample of one split: its label and where its image member's tar header starts, in manifest order."""

    shards: list[Path]
    labels: np.ndarray
    """int64; -1 for a sample without an image or a readable ``cls``."""
    shard: np.ndarray
    offset: np.ndarray

    @property
    def classes(self) -> np.ndarray:
        """The labels present, sorted: row ``i`` of a probe's one-hot targets is ``classes[i]``."""
        return np.unique(self.labels[self.labels >= 0])


def scan_shard(path: Path) -> list[tuple[int, int]]:
    """``(label, image member offset)`` per sample, from tar headers (image data is seeked over, never read)."""
    rows: list[list[int]] = []
    key = None
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            parts = split_name(member.name)
            if not member.isfile() or parts is None:
                continue
            if parts[0] != key:
                key = parts[0]
                rows.append([-1, -1])
            if parts[1] in IMAGE_KEYS and rows[-1][1] < 0:
                rows[-1][1] = member.offset
            elif parts[1] == "cls":
                text = archive.extractfile(member).read()
                rows[-1][0] = int(text) if text.strip().isdigit() else -1
    return [(label if offset >= 0 else -1, offset) for label, offset in rows]


def scan_split(directory: Path, split: str, rank: int, world_size: int) -> Catalog:
    """The catalog of ``split``: rank ``r`` scans shards ``r, r + W, ...``; one all-reduce merges them."""
    files = read_split(directory, split)
    bases = np.concatenate([[0], np.cumsum(files.lengths)]).astype(np.int64)
    table = torch.zeros(int(bases[-1]), 3, dtype=torch.int64)
    problem = None
    for index in range(rank, len(files.shards), world_size):
        rows = scan_shard(files.shards[index])
        if len(rows) != files.lengths[index]:
            problem = (f"{files.shards[index]} holds {len(rows)} samples but {directory}/_info.json lists "
                       f"{files.lengths[index]}: re-run `python -m data_tools convert`")
            break
        start = int(bases[index])
        table[start:start + len(rows), 0] = torch.tensor([label for label, _ in rows], dtype=torch.int64)
        table[start:start + len(rows), 1] = index
        table[start:start + len(rows), 2] = torch.tensor([offset for _, offset in rows], dtype=torch.int64)
    if collective.any_true(problem is not None):
        raise ValueError(problem or f"another rank found a shard of split {split!r} of {directory} that does not "
                                    "match _info.json (its log names it)")
    merged = collective.sum_(table).numpy()
    return Catalog(files.shards, merged[:, 0].copy(), merged[:, 1].copy(), merged[:, 2].copy())


def read_member(path: Path, offset: int, with_data: bool = True) -> tuple[str, str, bytes]:
    """``(key, extension, bytes)`` of the tar member whose header starts at ``offset`` (long names included)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        with tarfile.open(fileobj=handle, mode="r:") as archive:
            member = archive.next()
            key, ext = split_name(member.name)
            return key, ext, archive.extractfile(member).read() if with_data else b""


class PickedImages(Dataset):
    """Decoded eval-transformed images of chosen catalog rows: ``(uint8 image, row position, readable)``."""

    def __init__(self, catalog: Catalog, rows: np.ndarray, positions: np.ndarray, transform, img_size: int):
        self.catalog, self.rows, self.positions = catalog, rows, positions
        self.transform, self.img_size = transform, img_size
        self.corrupt = CorruptLog()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, bool]:
        row = int(self.rows[item])
        shard = self.catalog.shards[int(self.catalog.shard[row])]
        key, ext, data = read_member(shard, int(self.catalog.offset[row]))
        sample = {"__key__": key, "__url__": str(shard), ext: data, "cls": str(int(self.catalog.labels[row]))}
        decoded = decode_sample(sample, self.transform, self.corrupt)
        if decoded is None:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), int(self.positions[item]), False
        return decoded[0], int(self.positions[item]), True


def _vit(model: nn.Module) -> VisionTransformer:
    """The ``VisionTransformer`` inside a DeepSpeed engine, DDP or ``torch.compile`` wrapper."""
    inner = model
    while not isinstance(inner, VisionTransformer):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod")
    return inner


def feature_dim(model: nn.Module) -> int:
    return _vit(model).embed_dim


@contextmanager
def pre_logits_hook(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the input of ``pre_logits`` (the features; module docstring) of every forward in the block."""
    captured: list[torch.Tensor] = []
    handle = _vit(model).pre_logits.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().float()))
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def extract(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], preprocess: BatchPreprocessor,
            device: torch.device, dtype: torch.dtype, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process' features (float32, host) and the payload carried with each batch (labels or positions).

    In eval mode (restored after); processes run in ``lockstep`` so that ZeRO-3 forwards pair up.
    """
    was_training = model.training
    model.eval()
    features, payloads = [], []
    with pre_logits_hook(model) as captured:
        for images, payload, real in lockstep(batches, dummy_batch(img_size)):
            model(preprocess(images, NO_LABELS, device, dtype, train=False)[0])
            if real:
                features.append(captured[-1].cpu())
                payloads.append(payload)
            captured.clear()
    model.train(was_training)
    dim = feature_dim(model)
    return (torch.cat(features) if features else torch.zeros(0, dim),
            torch.cat(payloads) if payloads else torch.zeros(0, dtype=torch.int64))


def extract_rows(model: nn.Module, catalog: Catalog, rows: np.ndarray, transform, preprocess: BatchPreprocessor,
                 device: torch.device, dtype: torch.dtype, img_size: int, batch_size: int, num_workers: int,
                 rank: int, world_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Features of catalog ``rows`` on every rank, ``(len(rows), D)`` in the order given, and which were readable.

    Rank ``r`` reads the ``r``-th contiguous run of ``rows`` (sorted rows: few shards per rank).
    """
    bounds = np.linspace(0, len(rows), world_size + 1).astype(np.int64)
    mine = np.arange(bounds[rank], bounds[rank + 1])
    images = PickedImages(catalog, rows[mine], mine, transform, img_size)
    batches = ((image, torch.stack([position, ok.long()], dim=1)) for image, position, ok in
               DataLoader(images, batch_size=batch_size, num_workers=num_workers))
    features, payload = extract(model, batches, preprocess, device, dtype, img_size)
    gathered = torch.zeros(len(rows), features.shape[1] + 1)
    gathered[payload[:, 0], :-1] = features
    gathered[payload[:, 0], -1] = payload[:, 1].float()
    gathered = collective.sum_(gathered)
    return gathered[:, :-1], gathered[:, -1].numpy() > 0


def share_from_main(values: Optional[torch.Tensor], size: int, is_main: bool) -> torch.Tensor:
    """Rank 0's float64 ``values`` (host) on every rank (a sum all-reduce where the other ranks add zeros)."""
    buffer = torch.zeros(size, dtype=torch.float64)
    if is_main:
        buffer[:] = values
    return collective.sum_(buffer)
