"""``DistEnv.from_env``: one reader for torchrun / DeepSpeed-launcher and SLURM variables."""

from __future__ import annotations

import pytest

from pretrain.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN, DistEnv, first_host


def test_torchrun_variables() -> None:
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                            "MASTER_PORT": "29600", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(rank=3, world_size=8, local_rank=1, master_addr="node7", master_port=29600, source="env")
    assert not env.is_main


def test_slurm_variables_derive_host_and_port() -> None:
    env = DistEnv.from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu-[007-010,12],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu-007"
    assert env.master_port == SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN
    # A user-set MASTER_PORT / MASTER_ADDR wins.
    env = DistEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1",
                            "MASTER_PORT": "4242", "MASTER_ADDR": "login"})
    assert (env.master_addr, env.master_port) == ("login", 4242)


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node[1-4]", "node1"), ("gpu-[003-005,9],cpu1", "gpu-003"), ("n[12,3]x", "n12x"),
    ("a,b", "a"), ("rack1-[09]", "rack1-09"),
])
def test_first_host(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_single_process_gets_a_free_port() -> None:
    env = DistEnv.from_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single") and 0 < env.master_port < 65536


@pytest.mark.parametrize("environ,match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "outside world size"),
])
def test_bad_values_name_the_variable(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistEnv.from_env(environ)
