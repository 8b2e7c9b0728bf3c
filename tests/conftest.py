"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
