"""``data.log_keys`` files across crashed and resumed launches (``pretrain.data.keylog``)."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.keylog import KeyLog, last_line, rank_path, read_step_keys


def _launch(run_dir: Path, world: int, steps: range, tag: str) -> int:
    logs = [KeyLog(run_dir, rank) for rank in range(world)]
    for step in steps:
        for rank, log in enumerate(logs):
            log.write(step, 0, [f"{tag}-{step}-{rank}"])
    attempt = logs[0].attempt
    for log in logs:
        log.close()
    return attempt


def test_each_step_counts_the_last_launch_that_ran_it(tmp_path: Path) -> None:
    """2 ranks crash after step 5 (checkpoint 4), 1 rank resumes 5-6, 4 ranks resume 7-8.

    Rank 1's line for step 5 from the crashed launch is never rewritten (the resumed launch has
    one rank): counting lines per rank would mix it into step 5; the attempt number keeps it out.
    """
    assert _launch(tmp_path, 2, range(1, 6), "a") == 1
    with open(rank_path(tmp_path, 1), "a") as f:
        f.write('{"step": 6, "epoch": 0, "att')  # killed mid-write
    assert _launch(tmp_path, 1, range(5, 7), "b") == 2
    assert _launch(tmp_path, 4, range(7, 9), "c") == 3
    keys = read_step_keys(tmp_path)
    assert keys[4] == ["a-4-0", "a-4-1"]
    assert keys[5] == ["b-5-0"] and keys[6] == ["b-6-0"]
    assert keys[8] == [f"c-8-{r}" for r in range(4)]
    rank1 = rank_path(tmp_path, 1).read_text().splitlines()
    assert json.loads(rank1[-1])["step"] == 8  # the half line was ended, not glued to the next one


def test_last_line_reads_from_the_end_and_skips_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    assert last_line(path) == ""
    path.write_text("first\nsecond\nhalf")
    assert [last_line(path, block) for block in (1, 3, 1 << 16)] == ["second"] * 3
    path.write_text("half")
    assert last_line(path) == ""
