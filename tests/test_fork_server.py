"""The test launcher of ``tests/fork_server.py`` behaves as the processes it stands for: ``python`` and torchrun."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fork_server import run_python, run_ranks

REPORT = """
import json, os, sys, torch
rank = int(os.environ.get("RANK", "0"))
launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), path0=sys.path[0], threads=torch.get_num_threads(),
                      pgid_is_pid=os.getpgrp() == os.getpid(), **{k: os.environ.get(k) for k in launcher})), flush=True)
if rank == 1 and "fail" in sys.argv:
    sys.exit(3)
if rank == 0 and "fail" in sys.argv:
    time.sleep(120)
"""


def script(tmp_path: Path) -> Path:
    path = tmp_path / "report.py"
    path.write_text("import time\n" + REPORT)
    return path


def test_ranks_get_torchruns_variables_their_own_process_group_and_one_thread(tmp_path: Path) -> None:
    done = run_ranks(2, str(script(tmp_path)), "a", "b", env={"PATH": "/usr/bin", "OMP_NUM_THREADS": "1"},
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = sorted((json.loads(line) for line in done.stdout.splitlines()), key=lambda row: row["RANK"])
    assert [(row["RANK"], row["LOCAL_RANK"], row["WORLD_SIZE"], row["LOCAL_WORLD_SIZE"]) for row in rows] == [
        ("0", "0", "2", "2"), ("1", "1", "2", "2")]
    assert rows[0]["MASTER_PORT"] == rows[1]["MASTER_PORT"] and rows[0]["MASTER_ADDR"] == "127.0.0.1"
    for row in rows:
        assert row["argv"] == ["a", "b"] and row["cwd"] == str(tmp_path) and row["path0"] == str(tmp_path)
        assert row["threads"] == 1 and row["pgid_is_pid"]


def test_the_first_rank_to_fail_ends_the_others_and_gives_the_status(tmp_path: Path) -> None:
    start = time.monotonic()
    done = run_ranks(2, str(script(tmp_path)), "fail", cwd=tmp_path, timeout=60)
    assert done.returncode == 3 and time.monotonic() - start < 30  # rank 0 would sleep 120 s
    assert len(done.stdout.splitlines()) == 2


def test_one_process_is_python_without_launcher_variables(tmp_path: Path) -> None:
    done = run_python(str(script(tmp_path)), env={"PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}, cwd=tmp_path)
    row = json.loads(done.stdout)
    assert done.returncode == 0 and row["RANK"] is None and row["threads"] == 2
