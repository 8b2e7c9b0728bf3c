"""Shards on object storage, against real servers on localhost: an S3-compatible endpoint (moto's server,
reached through the standard ``AWS_ENDPOINT_URL``, as MinIO/Ceph users connect) and an HTTP server with
Range support (what ``https://`` prefixes get).

Shown: pretraining from ``s3://`` is SIGKILLed and resumed with the keys of every step those of the same
data on local disk; one epoch fetches each shard once into a node cache smaller than the dataset
(bytes fetched against bytes trained); ``data_tools index`` and ``verify`` read remote prefixes; every
spec that cannot work exits 2 before launch with one line.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fork_server import run_module, torchrun

from pretrain.config import ConfigError, DataConfig, load_config
from pretrain.data.keylog import read_step_keys
from pretrain.data.train_stream import build_train_stream
from pretrain.preflight import preflight

pytest.importorskip("s3fs")
pytest.importorskip("moto")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "vitscale-test"
STEPS = 8
TINY = ["--config", "configs/pretrain/demo.yaml", "data.eval_shards=", "model.depth=1", "model.embed_dim=48",
        "model.num_heads=2", "model.mlp_dim=96", "model.pre_logits=48", "data.global_batch_size=16",
        "data.micro_batch_size=4", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
        "logging.every_steps=1", "data.mixup=0.0", "data.streams=4", "data.window_samples=64"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, "the S3 server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("the S3 server did not listen within 60 s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A boto3 client of a moto S3 server on localhost, with the environment every process inherits set to it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for(port, proc)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _upload(client, directory: Path, prefix: str, skip: str = "") -> str:
    for path in sorted(directory.iterdir()):
        if path.is_file() and not (skip and re.search(skip, path.name)):
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    from data_tools import storage

    storage.filesystem("s3://x").invalidate_cache()
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def s3_demo(s3, demo_shards: Path) -> str:
    return _upload(s3, demo_shards, "demo")


# ------------------------------------------------------------ train, kill, resume


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(run_dir: Path, shards: str, cache: Path, *extra: str) -> list[str]:
    """What follows ``-m pretrain``."""
    return [*TINY, f"run.dir={run_dir}", f"data.train_shards={shards}", f"data.cache_dir={cache}", "data.log_keys=true",
            f"schedule.total_steps={STEPS}", *extra]


@pytest.mark.slow
def test_pretrain_from_s3_killed_and_resumed_logs_the_keys_of_local_disk(
        s3_demo: str, demo_shards: Path, tmp_path: Path) -> None:
    order = run_module("pretrain.data.order", *TINY, f"data.train_shards={demo_shards}",
                       f"data.cache_dir={tmp_path / 'local-cache'}", "--steps", f"1:{STEPS + 1}", timeout=120)
    assert order.returncode == 0, order.stderr
    expected = {row["step"]: row["keys"] for row in map(json.loads, order.stdout.splitlines())}
    assert sorted(expected) == list(range(1, STEPS + 1))

    run, cache = tmp_path / "run", tmp_path / "cache"
    latest = run / "checkpoints" / "latest"
    proc = subprocess.Popen(torchrun(2, "-m", "pretrain", *_args(run, s3_demo, cache, "data.num_workers=1")),
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (latest.is_file() and latest.read_text() == "step_00000002"):
            assert proc.poll() is None and time.time() < deadline, "the run ended or hung before the kill"
            time.sleep(0.02)
        os.killpg(proc.pid, 9)  # SIGKILL, every process of the run at once
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert latest.read_text() in ("step_00000002", "step_00000004")
    result = run_module("pretrain", *_args(run, s3_demo, cache, "data.num_workers=2"), env=_env(), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_step_keys(run) == expected
    assert list((cache / "shards").glob("*-train-*.tar")), "the shards were read from the node's cache"


# ------------------------------------------------------------ bytes fetched per epoch


def _epoch(cfg: DataConfig):
    stream = build_train_stream(cfg, img_size=16, seed=0, rank=0, world_size=1)
    steps = stream.order.steps_per_epoch * stream.grad_accum
    keys = [key for _ in range(steps) for key in (next(stream), stream.last_keys)[1]]
    return stream, keys


def test_one_epoch_from_s3_fetches_each_shard_once_into_a_cache_smaller_than_the_data(
        s3, st_make_shards, tmp_path: Path) -> None:
    """40 shards of 25 samples, 2 streams in windows of 8: a worker reads at most 8 shards at a time, so a
    cache limit of 2 workers x 8 shards holds the rank (the two workers read different steps: with 8 the
    cache went over its limit in 1 of 3 runs); each shard is fetched once, bytes fetched <= 1.1x trained."""
    local = st_make_shards([25] * 40)
    prefix = _upload(s3, local, "many")
    sizes = sorted(p.stat().st_size for p in local.glob("*.tar"))
    base = dict(train_shards=prefix, eval_shards="", global_batch_size=16, micro_batch_size=4, num_workers=2,
                streams=2, window_samples=8, cache_dir=str(tmp_path / "cache"), cache_limit_bytes=16 * sizes[-1])
    stream, keys = _epoch(DataConfig(**base))
    assert stream.order.rank_shard_bound(1) == 8
    _, local_keys = _epoch(DataConfig(**{**base, "train_shards": str(local), "cache_dir": str(tmp_path / "c2")}))
    assert keys == local_keys
    ratio, per_shard = stream.bytes_fetched / stream.bytes_read, stream.bytes_fetched / sum(sizes)
    print(f"one epoch from s3: fetched {stream.bytes_fetched:,} bytes, trained on {stream.bytes_read:,} "
          f"({ratio:.3f}x); {per_shard:.3f}x the shards' bytes")
    assert per_shard == 1.0 and ratio <= 1.1
    print(f"opens of a cached shard by one worker: at most {max(stream.shard_opens.values())}")
    assert max(stream.shard_opens.values()) <= 2
    cached = sum(p.stat().st_size for p in (tmp_path / "cache" / "shards").glob("*.tar"))
    assert cached <= 16 * sizes[-1] < sum(sizes)


def _fetch_in_child(root: str, url: str, version: str, size: int, queue) -> None:
    from pretrain.data.shard_cache import ShardCache

    cache = ShardCache(Path(root), 1 << 30)
    os.close(cache.open(url, version, size))
    queue.put(cache.bytes_fetched)


def test_the_shard_cache_fetches_once_per_node_and_never_evicts_a_shard_in_use(
        s3, s3_demo: str, tmp_path: Path, caplog) -> None:
    import multiprocessing

    from data_tools import storage
    from pretrain.data.shard_cache import ShardCache

    urls = [f"{s3_demo}/train-00000{i}.tar" for i in range(3)]
    versions = storage.versions(urls)
    ctx = multiprocessing.get_context("fork")  # as DataLoader workers start
    queue = ctx.Queue()
    children = [ctx.Process(target=_fetch_in_child, args=(str(tmp_path), urls[0], versions[urls[0]][1],
                                                          versions[urls[0]][0], queue)) for _ in range(3)]
    for child in children:
        child.start()
    fetched = sorted(queue.get(timeout=120) for _ in children)
    assert fetched == [0, 0, versions[urls[0]][0]]  # three processes, one download
    one_shard = max(size for size, _ in versions.values())
    cache = ShardCache(tmp_path, one_shard)
    held = cache.open(urls[0], versions[urls[0]][1], versions[urls[0]][0])
    os.close(cache.open(urls[1], versions[urls[1]][1], versions[urls[1]][0]))  # over the limit: shard 0 is in use
    assert cache.path(urls[0], versions[urls[0]][1]).is_file() and "over data.cache_limit_bytes" in caplog.text
    os.close(held)
    os.close(cache.open(urls[2], versions[urls[2]][1], versions[urls[2]][0]))  # now 0 and 1 go, oldest first
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "shards").glob("*.tar")] == ["train-000002.tar"]
    assert not list((tmp_path / "shards").glob(".*.tmp"))


# ------------------------------------------------------------ data_tools on remote prefixes


def test_data_tools_index_and_verify_read_s3_prefixes(s3, demo_shards: Path, tmp_path: Path, capsys) -> None:
    from data_tools.__main__ import main

    prefix = _upload(s3, demo_shards, "noidx", skip=r"\.idx$")
    assert main(["index", prefix, "--out", str(tmp_path / "idx")]) == 0
    assert "10 shard indexes written" in capsys.readouterr().out  # 8 train, 2 val
    for built in (tmp_path / "idx").glob("*.idx"):
        assert built.read_text() == (demo_shards / built.name).read_text()
    assert main(["index", prefix]) == 1 and "give --out DIR" in capsys.readouterr().err
    assert main(["verify", prefix]) == 0
    s3.put_object(Bucket=BUCKET, Key="noidx/train-000003.tar",
                  Body=(demo_shards / "train-000004.tar").read_bytes())
    from data_tools import storage

    storage.filesystem(prefix).invalidate_cache()
    assert main(["verify", prefix]) == 1
    out = capsys.readouterr().out
    assert "train-000003.tar: sha256 differs from _info.json" in out


def test_training_without_uploaded_indexes_builds_them_into_the_cache(s3, demo_shards: Path, tmp_path: Path) -> None:
    prefix = _upload(s3, demo_shards, "bare", skip=r"\.idx$")
    cfg = DataConfig(train_shards=prefix, eval_shards="", global_batch_size=16, micro_batch_size=16, num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    stream = build_train_stream(cfg, img_size=16, seed=0, rank=0, world_size=1)
    next(stream)
    assert len(list((tmp_path / "cache" / "indexes").glob("*.idx"))) == 8


# ------------------------------------------------------------ https:// (a Range-capable HTTP server)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered 206 (what object stores and CDNs do)."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        import io

        return io.BytesIO(data[start:end + 1])

    def log_message(self, *args) -> None:
        pass


def test_http_prefix_trains_and_evaluates_like_local_disk(demo_shards: Path, tmp_path: Path) -> None:
    from pretrain.data.eval_stream import build_eval_stream

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(demo_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        base = dict(eval_shards="", global_batch_size=16, micro_batch_size=8, num_workers=0, window_samples=32,
                    eval_split="val", streams=4)
        remote = build_train_stream(DataConfig(train_shards=url, cache_dir=str(tmp_path / "c1"), **base),
                                    img_size=16, seed=0, rank=0, world_size=1)
        local = build_train_stream(DataConfig(train_shards=str(demo_shards), cache_dir=str(tmp_path / "c2"), **base),
                                   img_size=16, seed=0, rank=0, world_size=1)
        for _ in range(4):
            (a, la), (b, lb) = next(remote), next(local)
            assert remote.last_keys == local.last_keys and np.array_equal(a, b) and np.array_equal(la, lb)
        assert remote.bytes_fetched > 0
        evaluated = build_eval_stream(DataConfig(**{**base, "eval_shards": url}), img_size=16,
                                      rank=0, world_size=1)
        assert sum(labels.numel() for _, labels in evaluated) == 300
    finally:
        server.shutdown()


# ------------------------------------------------------------ early errors


def _cfg(shards: str, *overrides: str):
    return load_config(REPO / "configs" / "pretrain" / "demo.yaml",
                       [f"data.train_shards={shards}", "data.eval_shards=", *overrides])


def _error(cfg, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unsupported_specs_fail_before_launch_with_one_line(s3, s3_demo: str, monkeypatch, tmp_path) -> None:
    assert _error(_cfg(f"s3://{BUCKET}/nothing-here")).startswith(
        f"data.train_shards=s3://{BUCKET}/nothing-here: s3://{BUCKET}/nothing-here/_info.json does not exist")
    assert "pipe: URLs are read front to back" in _error(_cfg("pipe:aws s3 cp s3://b/train-000000.tar -"))
    assert _error(_cfg("ftp://host/shards")).startswith("data.train_shards='ftp://host/shards': the scheme ftp://")
    assert "raise it, or set data.window_samples" in _error(_cfg(s3_demo, "data.cache_limit_bytes=1000000",
                                                                 f"data.cache_dir={tmp_path}"))
    preflight(_cfg(s3_demo, f"data.cache_dir={tmp_path}", "data.window_samples=64", "data.streams=4"), 1)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    assert _error(_cfg(s3_demo)) == (f"data.train_shards='{s3_demo}' needs s3fs for s3:// (not installed): "
                                     "pip install 'vitscale[s3]'")


def test_a_rank_lists_a_remote_prefix_once_in_preflight_and_once_for_its_stream(s3, s3_demo: str, tmp_path,
                                                                                 monkeypatch) -> None:
    """Every rank runs preflight, then builds its stream's sample table: one listing each (a listing of 14,000
    shards is 14 paged requests; 512 ranks made six each, for the shards and their indexes apart, before)."""
    from data_tools import storage
    from pretrain.data.sample_table import sample_table

    fs = storage.filesystem(s3_demo)
    listed: list[str] = []
    real_ls = fs.ls
    monkeypatch.setattr(fs, "ls", lambda path, *a, **k: listed.append(path) or real_ls(path, *a, **k))
    manifests = preflight(_cfg(s3_demo, f"data.cache_dir={tmp_path}", "data.window_samples=64", "data.streams=4"), 1)
    assert len(listed) == 1, listed
    train = manifests.train
    table = sample_table([str(url) for url in train.shards], train.lengths, str(tmp_path))
    assert len(listed) == 2, listed
    assert table.versions == train.versions and len(table.versions) == 2 * len(train.shards)  # shards + indexes


@pytest.mark.skipif(__import__("importlib").util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_scheme_without_its_extra_exits_2_from_the_command(tmp_path: Path) -> None:
    result = run_module("pretrain", "--config", "configs/pretrain/demo.yaml", "data.train_shards=gs://bucket/shards",
                        "data.eval_shards=", f"run.dir={tmp_path / 'r'}", timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "config error: data.train_shards='gs://bucket/shards' needs gcsfs for gs:// (not installed): "
        "pip install 'vitscale[gcs]'"], result.stderr
    assert not (tmp_path / "r").exists()


def test_object_storage_refusing_the_manifest_read_is_one_line_naming_what_to_check(monkeypatch) -> None:
    """No credentials (botocore's NoCredentialsError is no OSError) or a refused read: exit 2 before launch with
    the URL and what to set, not a traceback from the back end."""
    from botocore.exceptions import NoCredentialsError

    from data_tools import storage

    class Refusing:
        def cat_file(self, url, *args, **kwargs):
            raise NoCredentialsError()

    monkeypatch.setattr(storage, "filesystem", lambda url: Refusing())
    assert _error(_cfg("s3://bucket/prefix")) == (
        "data.train_shards=s3://bucket/prefix: could not read s3://bucket/prefix/_info.json: NoCredentialsError: "
        "Unable to locate credentials; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and "
        "AWS_ENDPOINT_URL for an S3-compatible store, and the network")


def test_a_remote_eval_pattern_without_its_extra_fails_before_launch(s3_demo: str, demo_shards: Path,
                                                                      monkeypatch) -> None:
    """A brace pattern of s3:// eval shards is checked like a prefix: without s3fs, one line before launch, not an
    evaluation that skips every shard and reports 0 of 0."""
    import importlib.util

    pattern = f"{s3_demo}/val-{{000000..000001}}.tar"
    cfg = load_config(REPO / "configs" / "pretrain" / "demo.yaml",
                      [f"data.train_shards={demo_shards}", f"data.eval_shards={pattern}"])
    preflight(cfg, 1)  # with s3fs: fine
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "s3fs" else real(name, *a))
    assert _error(cfg) == (f"data.eval_shards='{s3_demo}/val-000000.tar' needs s3fs for s3:// (not installed): "
                           "pip install 'vitscale[s3]'")
