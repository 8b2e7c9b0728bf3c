"""Fixtures shared by the whole suite, the session's own inductor cache and the environment's extension folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Give torch.compile's inductor a cache folder of this session's own (subprocesses inherit it).

    Why: inductor keeps compiled C++ kernels in one folder per user by default and reuses them
    across runs; a run under ``ATEN_CPU_CAPABILITY=default`` right after a native one on the same
    machine picked up the native run's artefacts and failed to compile (``'at::vec' has not been
    declared``). A fresh folder costs the compile tests their compile, which they measure anyway.
    """
    cache = tempfile.mkdtemp(prefix="vitscale-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    # DeepSpeed JIT-builds its CPU communication op (deepspeed_shm_comm) into torch's extension folder,
    # one per user by default; two environments (a CI venv beside a developer's) each find the other's
    # build stale and rebuild it, 1-3 minutes each time, which pushed a 240 s start-up test past its
    # limit. A folder per environment keeps one build per DeepSpeed install, kept across sessions.
    # DeepSpeed picks its accelerator once per process and keeps it: picked while a test fakes a GPU
    # (torch.cuda.is_available patched, tests/fake_devices.py, test_distributed.py), every later engine
    # of the session tried CUDA ("Found no NVIDIA driver"). Picked here, on the real devices, first.
    from deepspeed.accelerator import get_accelerator

    get_accelerator()
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / environment))


LONGEST_FILES = ("test_slurm.py", "test_pretrain_multiproc.py", "test_order_e2e.py", "test_launch.py",
                 "test_finetune_e2e.py", "test_pretrain_engine.py", "test_fewshot_e2e.py", "test_remote.py")
"""The files that took longest on 2 cores (CI runs of 2026-12-07, ``--durations``), longest first: the SLURM
fixture of six jobs, the multi-process pretraining file, the order chain (one test), the launcher file (benchmark
and decode-check runs), then the end-to-end files; 100-300 s each under the suite's load."""
LONGEST_FIRST = ("slurm", "faults", "slow")
"""Markers that rank the other files: SLURM, fault-injection, then other slow (multi-process) tests."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the longest test files first, each file's tests still together and in their order.

    Why: ``make test`` hands whole files to pytest-xdist workers in collection order; in name
    order a long file came last and kept one worker busy alone for minutes while the others
    idled (the order chain, a single 130 s test, once started last). Longest first, the short
    files fill every worker up to the end. ``LONGEST_FILES`` lead in their order; the rest rank
    by the first ``LONGEST_FIRST`` marker any of their tests carries.
    """
    def rank(item: pytest.Item) -> int:
        if item.path.name in LONGEST_FILES:
            return LONGEST_FILES.index(item.path.name)
        marker = next((i for i, name in enumerate(LONGEST_FIRST) if item.get_closest_marker(name)), len(LONGEST_FIRST))
        return len(LONGEST_FILES) + marker

    by_file: dict[str, int] = {}
    for item in items:
        by_file[item.path.name] = min(by_file.get(item.path.name, len(LONGEST_FILES) + len(LONGEST_FIRST)), rank(item))
    items.sort(key=lambda item: by_file[item.path.name])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo dataset (scikit-learn digits) as shards, written once per session.

    Splits ``train`` and ``val`` live in one ``_info.json`` in the returned directory.
    """
    from data_tools.demo import write_demo

    return Path(write_demo(tmp_path_factory.mktemp("demo")))


def _st_encode(image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=90) if fmt == "JPEG" else image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def st_make_shards(tmp_path: Path):
    """Factory writing tiny webdataset shards plus a timm-layout ``_info.json``.

    ``st_make_shards(sizes, split="train", corrupt=())`` writes one shard per entry of
    ``sizes``; sample ``i`` (global order) has label ``i`` so tests can track every sample.
    Images vary in size (16-40 px), format (JPEG/PNG) and mode (RGB, L, RGBA, CMYK).
    ``corrupt`` maps a global index to ``"bytes"`` (undecodable image), ``"truncated"``
    (JPEG cut in half) or ``"nocls"`` (label missing). Returns the directory.
    """
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    def make(sizes, split="train", corrupt=None, directory=None):
        corrupt = corrupt or {}
        out = Path(directory or tmp_path / "shards")
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(sizes) * 1000 + sum(sizes))
        names, index = [], 0
        for shard, size in enumerate(sizes):
            name = f"{split}-{shard:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for _ in range(size):
                    h, w = int(rng.integers(16, 41)), int(rng.integers(16, 41))
                    mode = ("RGB", "L", "RGBA", "CMYK")[index % 4]
                    pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
                    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
                    fmt, ext = ("PNG", "png") if mode == "RGBA" or (index % 5 == 0 and mode != "CMYK") else ("JPEG", "jpg")
                    data = _st_encode(image, fmt)
                    kind = corrupt.get(index)
                    if kind == "bytes":
                        data = b"not an image at all"
                    elif kind == "truncated":
                        data = data[: len(data) // 2]
                    sample = {"__key__": f"s{index:06d}", ext: data}
                    if kind != "nocls":
                        sample["cls"] = str(index).encode()
                    sink.write(sample)
                    index += 1
            names.append(name)
        info_path = out / "_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {"name": "st", "splits": {}}
        info["splits"][split] = {"name": split, "filenames": names, "shard_lengths": list(sizes),
                                 "num_samples": sum(sizes)}
        info_path.write_text(json.dumps(info))
        return out

    return make


@pytest.fixture(scope="session")
def dt_make_image():
    """Factory: ``dt_make_image(size=(w, h), mode="RGB", fmt="JPEG", seed=0) -> bytes`` of a smooth random image.

    Smooth (upscaled noise) rather than white noise, so JPEG sizes are photo-like.
    """
    import io

    import numpy as np
    from PIL import Image

    def make(size=(20, 14), mode="RGB", fmt="JPEG", seed=0):
        rng = np.random.default_rng(seed)
        bands = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        small = rng.integers(0, 256, (4, 4, bands), dtype=np.uint8)
        image = Image.fromarray(small.squeeze(-1) if bands == 1 else small, mode)
        image = image.resize(size, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return buf.getvalue()

    return make


@pytest.fixture
def dt_imagefolder(tmp_path: Path, dt_make_image):
    """Factory: ``dt_imagefolder(counts={"cat": 5, ...}, name="src") -> root`` of a tiny JPEG ImageFolder.

    Image ``i`` of class ``c`` is ``root/c/img_i.jpg`` with a size and content unique to (c, i).
    """

    def make(counts, name="src"):
        root = tmp_path / name
        for c, (cls, n) in enumerate(sorted(counts.items())):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = dt_make_image((12 + i % 7, 10 + c), seed=1000 * c + i)
                (root / cls / f"img_{i}.jpg").write_bytes(data)
        return root

    return make


@pytest.fixture
def dt_class_tars(tmp_path: Path, dt_imagefolder):
    """Factory: ``dt_class_tars(counts, extra=None, prefix=None) -> root`` of per-class tars, ImageNet-21k style.

    The ``dt_imagefolder(counts)`` images packed as ``root/<class>.tar``, members in file-name
    order; ``extra`` maps a class to ``(name, bytes)`` members appended to its tar, ``prefix``
    a class to a prefix of its member names (e.g. ``"./"``, as some tar tools write).
    """
    import io
    import tarfile

    def make(counts, extra=None, prefix=None):
        folder = dt_imagefolder(counts)
        root = tmp_path / "tars"
        root.mkdir()
        for cls in counts:
            with tarfile.open(root / f"{cls}.tar", "w") as archive:
                for image in sorted((folder / cls).iterdir()):
                    archive.add(image, arcname=(prefix or {}).get(cls, "") + image.name)
                for name, data in (extra or {}).get(cls, []):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        return root

    return make
