"""Rank bookkeeping of the tensor-parallel voice: how many ranks, which GPUs each sees and uses, memory merged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.voice import ranks
from shared.config.schema import parse_config
from shared.models.base import BackendError
from shared.wire.messages import MemoryReading
from tests.stackproc import fake_config, to_toml


def voice(**fields: object):
    return parse_config({"router": {}, "specialists": {"pragmatist": {}}, "voice": fields}).voice


def unset(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset `names` for the test; whatever the code under test sets in their place is undone after it."""
    for name in names:
        monkeypatch.setenv(name, "")  # recorded first: a bare delenv of an unset variable records nothing
        monkeypatch.delenv(name)


RANK_VARIABLES = (ranks.GPUS_VARIABLE, ranks.RANK_GPU_ENV, "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES")


def test_tensor_ranks_are_one_per_gpu_unless_set_for_the_cpu() -> None:
    assert ranks.world_size(voice(parallel="tensor"), [0, 1]) == 2
    assert ranks.world_size(voice(parallel="tensor", ranks=2), []) == 2
    assert ranks.world_size(voice(parallel="pipeline"), [0, 1]) == 1
    with pytest.raises(BackendError, match="one rank per GPU"):
        ranks.world_size(voice(parallel="tensor", ranks=4), [0, 1])


@pytest.mark.parametrize("parallel, own, pinned", [("tensor", [2], "2,3"), ("pipeline", [2, 3], None)])
def test_rank0_uses_only_its_gpu_sees_all_and_still_knows_the_voices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      parallel: str, own: list[int],
                                                                      pinned: str | None) -> None:
    from shared.runtime.process import physical_gpus

    config = fake_config(tmp_path / "run")
    config["voice"]["parallel"] = parallel
    (tmp_path / "c.toml").write_text(to_toml(config))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    unset(monkeypatch, *RANK_VARIABLES)
    ranks.pin_rank0_to_its_gpu(["--config", str(tmp_path / "c.toml")])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # peer memory needs the other GPU visible
    assert os.environ.get(ranks.GPUS_VARIABLE) == pinned
    assert physical_gpus(parse_config(config), "voice") == own
    assert ranks.voice_gpus(own) == [2, 3]


def test_rank0_started_by_hand_takes_the_voices_gpus_from_the_config(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = fake_config(tmp_path / "run")
    config["voice"]["parallel"] = "tensor"
    assert config["services"]["voice"]["gpus"] == [0, 1]
    (tmp_path / "c.toml").write_text(to_toml(config))
    unset(monkeypatch, "CUDA_VISIBLE_DEVICES", *RANK_VARIABLES)
    ranks.pin_rank0_to_its_gpu(["--config", str(tmp_path / "c.toml")])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and os.environ[ranks.RANK_GPU_ENV] == "0"
    assert os.environ[ranks.GPUS_VARIABLE] == "0,1"


def test_a_follower_sees_every_gpu_of_the_voice_its_own_first() -> None:
    env = ranks.rank_environment([2, 3, 5], 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5,2" and env[ranks.RANK_GPU_ENV] == "3"
    assert env["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] == "1"  # every rank's own GPU is its device 0
    assert ranks.rank_environment([2, 3], 0)["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cpu_ranks_add_up_and_gpu_ranks_stay_apart() -> None:
    readings = [MemoryReading(device="cpu", allocated_bytes=5, reserved_bytes=5),
                MemoryReading(device="cpu", allocated_bytes=7, reserved_bytes=7),
                MemoryReading(device="gpu:0", allocated_bytes=3, reserved_bytes=4, nvml_used_bytes=6),
                MemoryReading(device="gpu:1", allocated_bytes=3, reserved_bytes=4)]
    merged = {r.device: r for r in ranks.merged(readings)}
    assert merged["cpu"].allocated_bytes == 12 and merged["cpu"].reserved_bytes == 12
    assert merged["gpu:0"].nvml_used_bytes == 6 and merged["gpu:1"].nvml_used_bytes is None


def test_followers_start_with_every_voice_gpu_visible_their_own_first(monkeypatch: pytest.MonkeyPatch) -> None:
    started = []

    class Process:
        pid = 4242

    def popen(command: list[str], env: dict[str, str]) -> Process:
        started.append((command, env))
        return Process()

    monkeypatch.setattr(ranks.subprocess, "Popen", popen)
    monkeypatch.setenv(ranks.GPUS_VARIABLE, "2,3")  # rank 0's own bookkeeping: never passed on
    monkeypatch.setenv(ranks.RANK_GPU_ENV, "2")
    followers = ranks.Followers("stack.toml", [2, 3], 2)
    followers._spawn(1, 1234)
    (command, env), = started
    assert command[-6:] == ["--rank", "1", "--world", "2", "--store", "127.0.0.1:1234"]
    assert env["CUDA_VISIBLE_DEVICES"] == "3,2" and env[ranks.RANK_GPU_ENV] == "3"
    assert ranks.GPUS_VARIABLE not in env
