"""The sbatch launchers on a real SLURM (``launch/slurm_local.sh``): run, preempt + requeue, fail once, finetune,
and the srun flags seen on running tasks.

Six jobs of the tiny demo recipes share the cluster at once (one module fixture,
so the whole file costs about one job's restart cycle), each submitted with
``sbatch --wait`` and each in its own run directory:

* ``debug``: partition ``debug``, 1 node x 2 tasks, uninterrupted;
* ``multi``: partition ``multi``, 2 nodes x 1 task, uninterrupted;
* ``preempt``: like ``multi``, sent ``scancel --signal=USR1 --batch`` once a
  checkpoint is complete; it must save, requeue itself, restart with
  ``SLURM_RESTART_COUNT=1``, resume and reach the same final step, and every
  step must appear exactly once with the loss the uninterrupted run logged;
* ``broken``: a data path that does not exist; the trainer exits 2 and the job
  must fail once, with the error in its log, and never restart;
* ``finetune``: ``launch/finetune.sh`` from the ``debug`` run (``--dependency=afterok``);
* ``killed``: like ``multi`` but with ``--cpus-per-task=2``; once it trains, the test reads each
  task's CPU affinity (it must be 2: srun got ``--cpus-per-task``, which it no longer inherits from
  sbatch) and SIGKILLs rank 1; srun must then end the whole step (``--kill-on-bad-exit=1``) and the
  job must fail at once, never requeued.

Apart from those, ``launch/convert.sh`` converts a tiny ImageFolder as a 3-task array plus
the merge job its first task submits, and, with one part left out, the merge must fail naming
that part's shards until the part is rerun (``PARTS=3 --array=2``) and its own merge succeeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import webdataset as wds

from pretrain.checkpoint import CheckpointDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "launch" / "slurm_local.sh"
PRETRAIN = (REPO / "launch" / "pretrain.sh", REPO / "configs" / "pretrain" / "demo.yaml")
FINETUNE = (REPO / "launch" / "finetune.sh", REPO / "configs" / "finetune" / "demo.yaml")
CONVERT = REPO / "launch" / "convert.sh"
STEPS = 24
CHECKPOINT_EVERY = 8
FINETUNE_STEPS = 6
JOB_TIMEOUT_S = 900
STEP_LINE = re.compile(r"\[rank 0\] step (\d+)/(\d+) loss ([0-9.]+)")
START_LINE = re.compile(r"vitscale (?:pretrain|finetune): job (\d+), restart (\d+)")
KILLED_STEPS = 10_000
"""Far more than the ``killed`` job can run before the test kills a rank (it must not finish on its own)."""
KILLED_CPUS = 2
"""``--cpus-per-task`` of the ``killed`` job: all CPUs of a node of the local cluster, and more than the 1 CPU
per task that srun gives without the flag, so the affinity shows whether srun got it."""
PROMPT_END_S = 300
"""A step whose rank died must end within this (seen: 8 s on a loaded 2-core machine); the alternative is
blocking until the 30-minute collective timeout (pretrain/distributed.py)."""
LOSS_TOLERANCE = 2e-3
"""Resumed and uninterrupted runs agree to float-summation noise; a shifted or repeated batch
moves the loss by far more (consecutive demo losses differ by 0.01-0.1)."""


def _steps(log: str) -> list[tuple[int, float]]:
    """(step, loss) of every rank-0 step line in a log."""
    return [(int(step), float(loss)) for step, _, loss in STEP_LINE.findall(log)]


def _sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    partitions = _sh("sinfo", "-h", "-o", "%R")
    return partitions.returncode == 0 and {"debug", "multi"} <= set(partitions.stdout.split())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A local SLURM with partitions ``debug`` (1 node) and ``multi`` (2 nodes), started if needed.

    Skipped when it cannot be started (not root, no apt-get), unless ``VITSCALE_REQUIRE_SLURM=1``
    (CI), where that is a failure. A cluster this fixture started is stopped afterwards.
    """
    def unavailable(reason: str) -> None:
        if os.environ.get("VITSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason} (VITSCALE_REQUIRE_SLURM=1 demands the SLURM tests)")
        pytest.skip(reason)

    started = False
    if not _cluster_answers():
        if os.geteuid() != 0:
            unavailable("no local SLURM answers and starting one (launch/slurm_local.sh start) needs root")
        proc = _sh("bash", str(SLURM_LOCAL), "start", timeout=900)
        if proc.returncode != 0:
            unavailable(f"launch/slurm_local.sh start failed: {(proc.stderr or proc.stdout)[-2000:]}")
        started = True
    yield
    if started:
        _sh("bash", str(SLURM_LOCAL), "stop")


@dataclass
class Job:
    """One ``sbatch --wait`` of a launcher and what it left behind."""

    name: str
    run_dir: Path
    log: Path
    proc: subprocess.Popen
    returncode: Optional[int] = None
    state: str = ""
    """``scontrol show job`` right after the job ended (SLURM forgets jobs a few minutes later)."""
    signalled_at: Optional[float] = None
    """``time.monotonic()`` when the test signalled the job (preempted it or killed a rank)."""
    ended_at: Optional[float] = None
    cpus: dict[int, int] = dataclasses.field(default_factory=dict)
    """Rank -> number of CPUs its process may use, read while the job ran (``killed`` only)."""

    @property
    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def job_id(self) -> Optional[str]:
        match = START_LINE.search(self.text)
        return match.group(1) if match else None

    def field(self, key: str) -> str:
        match = re.search(rf"\b{key}=(\S+)", self.state)
        assert match, f"{key} not in scontrol output of job {self.name}:\n{self.state}"
        return match.group(1)

    def steps(self) -> list[tuple[int, float]]:
        return _steps(self.text)

    def starts(self) -> list[int]:
        return [int(restart) for _, restart in START_LINE.findall(self.text)]


def _job_name(name: str) -> str:
    """SLURM job name, unique to this test session."""
    return f"vitscale-test-{os.getpid()}-{name}"


def _submit(name: str, root: Path, shards: Path, partition: str, nodes: int, tasks_per_node: int,
            extra: tuple[str, ...] = (), stage: tuple[Path, Path] = PRETRAIN, steps: int = STEPS,
            sbatch_args: tuple[str, ...] = (), cpus_per_task: int = 1) -> Job:
    run_dir, log = root / name, root / f"{name}.log"
    overrides = [f"data.train_shards={shards}", f"data.eval_shards={shards}", f"run.dir={run_dir}",
                 f"schedule.total_steps={steps}", "schedule.warmup_steps=2",
                 f"checkpoint.every_steps={CHECKPOINT_EVERY}", "logging.every_steps=1", "eval.every_steps=0",
                 *extra]
    script, config = stage
    command = ["sbatch", "--wait", f"--job-name={_job_name(name)}", f"--partition={partition}",
               f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
               f"--cpus-per-task={cpus_per_task}", f"--output={log}", f"--chdir={root}", *sbatch_args, str(script),
               str(config), *overrides]
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Job(name=name, run_dir=run_dir, log=log, proc=proc)


def _queued_id(name: str) -> str:
    """The id of this session's job ``name`` once the controller has it (before it starts)."""
    for _ in range(120):
        ids = _sh("squeue", "-h", "-o", "%i", f"--name={_job_name(name)}").stdout.split()
        if ids:
            return ids[0]
        time.sleep(0.5)
    raise AssertionError(f"job {name} never showed up in squeue")


def _maybe_preempt(job: Job) -> None:
    """Send USR1 to the batch shell once the run has a complete checkpoint (training is under way)."""
    if job.signalled_at is not None or job.returncode is not None:
        return
    latest = CheckpointDir(job.run_dir / "checkpoints").find()
    job_id = job.job_id()
    if latest is not None and job_id is not None:
        proc = _sh("scancel", "--signal=USR1", "--batch", job_id)
        assert proc.returncode == 0, proc.stderr
        job.signalled_at = time.monotonic()


def _environ(pid: str) -> dict[str, str]:
    """The environment of process ``pid`` (empty when it is gone or not readable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _task_pids(job_id: str) -> dict[int, int]:
    """Rank -> pid of the tasks of step 0 of job ``job_id`` on this host (all fake nodes run here).

    A task is the process slurmstepd started with ``SLURM_STEP_ID=0``; its data-loader workers
    inherit the environment but their parent is the task.
    """
    pids: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        env = _environ(proc.name) if proc.name.isdigit() else {}
        if env.get("SLURM_JOB_ID") != job_id or env.get("SLURM_STEP_ID") != "0":
            continue
        try:
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_name = Path(f"/proc/{parent}/comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if parent_name == "slurmstepd":
            pids[int(env["SLURM_PROCID"])] = int(proc.name)
    return pids


def _maybe_kill_rank(job: Job, world: int = 2) -> None:
    """Once the run trains (a step is logged), read every task's CPU affinity and SIGKILL rank 1."""
    if job.signalled_at is not None or job.returncode is not None:
        return
    job_id = job.job_id()
    if job_id is None or not job.steps():
        return
    pids = _task_pids(job_id)
    if len(pids) < world:
        return
    job.cpus = {rank: len(os.sched_getaffinity(pid)) for rank, pid in pids.items()}
    os.kill(pids[1], signal.SIGKILL)
    job.signalled_at = time.monotonic()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("slurm")   # one host: every (fake) node sees it
    submitted = {
        "debug": _submit("debug", root, demo_shards, "debug", 1, 2),
        "multi": _submit("multi", root, demo_shards, "multi", 2, 1),
        "preempt": _submit("preempt", root, demo_shards, "multi", 2, 1),
        "broken": _submit("broken", root, demo_shards, "multi", 1, 1,
                          extra=(f"data.train_shards={root / 'no_such_shards'}",)),
    }
    submitted["finetune"] = _submit("finetune", root, demo_shards, "debug", 1, 2, stage=FINETUNE,
                                    steps=FINETUNE_STEPS, extra=(f"init={root / 'debug'}",),
                                    sbatch_args=(f"--dependency=afterok:{_queued_id('debug')}",))
    submitted["killed"] = _submit("killed", root, demo_shards, "multi", 2, 1, steps=KILLED_STEPS,
                                  cpus_per_task=KILLED_CPUS)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while any(job.returncode is None for job in submitted.values()):
            assert time.monotonic() < deadline, f"SLURM jobs still running after {JOB_TIMEOUT_S} s"
            _maybe_preempt(submitted["preempt"])
            _maybe_kill_rank(submitted["killed"])
            for job in submitted.values():
                if job.returncode is None and job.proc.poll() is not None:
                    job.returncode, job.ended_at = job.proc.returncode, time.monotonic()
                    job.state = _sh("scontrol", "show", "job", job.job_id() or "0").stdout
            time.sleep(0.5)
    finally:
        for name, job in submitted.items():
            if job.returncode is None:
                _sh("scancel", f"--name={_job_name(name)}")
                job.proc.kill()
    return submitted


def _assert_completed(job: Job, steps: int = STEPS) -> None:
    assert job.returncode == 0, f"job {job.name} exited {job.returncode}:\n{job.text[-3000:]}"
    assert job.field("JobState") == "COMPLETED"
    assert job.steps()[-1][0] == steps
    latest = CheckpointDir(job.run_dir / "checkpoints").find()
    assert latest is not None and latest.step == steps, latest


def test_debug_partition_one_node_two_tasks(jobs: dict[str, Job]) -> None:
    job = jobs["debug"]
    _assert_completed(job)
    assert job.field("NumNodes") == "1" and job.field("NumTasks") == "2"
    assert [step for step, _ in job.steps()] == list(range(1, STEPS + 1))
    assert job.starts() == [0] and job.field("Restarts") == "0"


def test_multi_partition_two_nodes_one_task_each(jobs: dict[str, Job]) -> None:
    job = jobs["multi"]
    _assert_completed(job)
    assert job.field("NumNodes") == "2" and job.field("NumTasks") == "2"
    assert "rendezvous n1:" in job.text   # MASTER_ADDR = first host of the node list
    # Same world size as the debug job: two fake nodes must train exactly like one node.
    reference = dict(jobs["debug"].steps())
    assert all(abs(loss - reference[step]) <= LOSS_TOLERANCE for step, loss in job.steps()), \
        list(zip(job.steps(), sorted(reference.items())))


def test_preempted_job_saves_requeues_resumes_and_finishes(jobs: dict[str, Job]) -> None:
    job = jobs["preempt"]
    assert job.signalled_at is not None, "the run never wrote a checkpoint, so it was never signalled"
    _assert_completed(job)
    assert "received USR1" in job.text and "requeueing job" in job.text
    assert job.starts() == [0, 1], job.starts()          # restarted once, with SLURM_RESTART_COUNT=1
    assert job.field("Restarts") == "1"

    first_run, second_run = job.text.split("restart 1", 1)
    stopped = _steps(first_run)
    assert stopped, "no step before the signal"
    stop_step = stopped[-1][0]
    assert CHECKPOINT_EVERY <= stop_step < STEPS
    assert f"resumed from {job.run_dir / 'checkpoints' / f'step_{stop_step:08d}'} (step {stop_step}," in second_run

    steps = job.steps()
    assert [step for step, _ in steps] == list(range(1, STEPS + 1))   # none repeated, none skipped
    reference = dict(jobs["multi"].steps())
    diffs = {step: abs(loss - reference[step]) for step, loss in steps}
    assert max(diffs.values()) <= LOSS_TOLERANCE, diffs


def test_failing_job_fails_once_with_the_error_in_its_log(jobs: dict[str, Job]) -> None:
    job = jobs["broken"]
    assert job.returncode == 2, job.text[-3000:]
    assert job.field("JobState") == "FAILED" and job.field("Restarts") == "0"
    assert "no_such_shards does not exist" in job.text
    assert "not requeued" in job.text
    assert job.starts() == [0]


def test_finetune_job_starts_from_the_pretraining_run(jobs: dict[str, Job]) -> None:
    job = jobs["finetune"]
    _assert_completed(job, FINETUNE_STEPS)
    assert str(jobs["debug"].run_dir) in job.text and job.starts() == [0]
    assert [step for step, _ in job.steps()] == list(range(1, FINETUNE_STEPS + 1))


def test_srun_gives_each_task_its_cpus_and_ends_the_step_when_a_rank_dies(jobs: dict[str, Job]) -> None:
    job = jobs["killed"]
    assert job.signalled_at is not None, f"the run never trained, so no rank was killed:\n{job.text[-3000:]}"
    # Only a cluster that binds tasks shows what srun got (without binding every task may use every CPU).
    assert "task/affinity" in _sh("scontrol", "show", "config").stdout, "the cluster does not bind tasks: " \
        "restart it with this checkout's launch/slurm_local.sh start"
    assert job.cpus == {0: KILLED_CPUS, 1: KILLED_CPUS}, job.cpus      # srun --cpus-per-task reached the tasks
    assert f"rank 0 may use {KILLED_CPUS} CPUs" in job.text            # and the trainer reports the same
    # srun itself ended the step because a task died (--kill-on-bad-exit=1). On gloo the survivor may also
    # fail on its own (the dead peer's sockets close), so the srun line is what shows the flag worked.
    assert f"Terminating StepId={job.job_id()}.0" in job.text, job.text[-3000:]
    assert job.ended_at - job.signalled_at < PROMPT_END_S
    assert job.returncode != 0 and job.field("JobState") == "FAILED" and job.field("Restarts") == "0"
    assert "not requeued" in job.text and job.starts() == [0]


def _wait_until_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _sh("squeue", "-h", "-j", job_id).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued or running after {timeout} s"
        time.sleep(0.5)


def _convert_array(name: str, root: Path, source: Path, array: str, parts: Optional[int] = None,
                   ) -> tuple[subprocess.CompletedProcess, dict[int, str]]:
    """``sbatch --wait --array=ARRAY launch/convert.sh SOURCE out`` in ``root``; its result and task logs."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    command = ["sbatch", "--wait", f"--array={array}", f"--job-name={_job_name(name)}", "--partition=debug",
               "--cpus-per-task=1", f"--output={logs}/%x-%A_%a.out", f"--chdir={root}", str(CONVERT), str(source),
               "out", "--samples-per-shard", "2"]   # relative OUT: taken from the submit directory, merge included
    env = {**os.environ, "PYTHON": sys.executable, **({"PARTS": str(parts)} if parts else {})}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    return proc, {int(p.stem.rsplit("_", 1)[1]): p.read_text() for p in logs.glob(f"{_job_name(name)}-*_*.out")}


def _merge_log(root: Path, name: str, task_log: str) -> str:
    """Wait for the merge job a task log announces; its log."""
    merge = re.search(r"submitted merge job (\d+)", task_log)
    assert merge, task_log
    _wait_until_gone(merge.group(1), JOB_TIMEOUT_S)
    return (root / "logs" / f"{_job_name(name)}-merge-{merge.group(1)}.out").read_text()


def test_convert_array_writes_each_shard_once_and_merges(slurm_cluster, dt_imagefolder, tmp_path: Path) -> None:
    counts = {"ant": 6, "bee": 5, "cow": 4}
    source = dt_imagefolder(counts)
    proc, task_logs = _convert_array("convert", tmp_path, source, "0-2")
    assert proc.returncode == 0, (proc.stdout, proc.stderr, task_logs)
    assert sorted(task_logs) == [0, 1, 2]
    written = {i: re.search(rf"train part {i}/3: \d+ planned samples in (\d+) shards \((\d+) written now\)", text)
               for i, text in task_logs.items()}
    assert all(match and match.group(1) == match.group(2) for match in written.values()), task_logs
    assert not any("submitted merge job" in task_logs[i] for i in (1, 2))
    merge_log = _merge_log(tmp_path, "convert", task_logs[0])
    out = tmp_path / "out"
    entry = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert f"train: 15 samples in {len(entry['filenames'])} shards (0 written now)" in merge_log, merge_log
    assert len(entry["filenames"]) == sum(int(m.group(1)) for m in written.values()) == 8
    paths = [json.loads(sample["json"])["path"] for shard in entry["filenames"]
             for sample in wds.WebDataset(str(out / shard), shardshuffle=False)]
    assert sorted(paths) == sorted(str(p.relative_to(source)) for p in source.rglob("*.jpg"))
    assert len(paths) == entry["num_samples"] == sum(counts.values())
    check = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (out / "_work").exists()


def test_convert_merge_after_a_missing_part_fails_then_the_rerun_part_merges(slurm_cluster, dt_imagefolder,
                                                                              tmp_path: Path) -> None:
    source = dt_imagefolder({"ant": 6, "bee": 5, "cow": 4})   # 8 shards; part 2 of 3 writes 2 and 5
    proc, task_logs = _convert_array("convert-gap", tmp_path, source, "0-1", parts=3)
    assert proc.returncode == 0 and sorted(task_logs) == [0, 1], (proc.stderr, task_logs)
    merge_log = _merge_log(tmp_path, "convert-gap", task_logs[0])   # afterany: it runs, and fails plainly
    assert "2 of 8 planned shards are missing (train-000002.tar, train-000005.tar)" in merge_log, merge_log
    assert not (tmp_path / "out" / "_info.json").exists()

    proc, task_logs = _convert_array("convert-rerun", tmp_path, source, "2", parts=3)
    assert proc.returncode == 0 and "train part 2/3" in task_logs[2], (proc.stderr, task_logs)
    assert "train: 15 samples in 8 shards (0 written now)" in _merge_log(tmp_path, "convert-rerun", task_logs[2])
    check = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(tmp_path / "out")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
