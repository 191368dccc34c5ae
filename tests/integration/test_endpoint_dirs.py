"""An ipc endpoint's directory: created private when missing, never re-moded when it exists, refused when every
user may write to it (the coordinator as root once made /tmp 0700)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.cli.stack import StackError, up
from shared.config.schema import parse_config
from shared.wire import transport
from tests.stackproc import fake_config


def shared_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)  # like /tmp
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_coordinator_refuses_an_endpoint_in_a_world_writable_directory_and_leaves_it_alone(
        make_stack, tmp_path: Path) -> None:
    directory = shared_dir(tmp_path)
    stack = make_stack(start=False, runtime__client_endpoint=f"ipc://{directory}/client.sock")
    stack.start("coordinator")
    assert stack.procs["coordinator"].wait(timeout=20) == 2
    log = (stack.dir / "coordinator.log").read_text()
    refusals = [line for line in log.splitlines() if "CRITICAL" in line]
    assert len(refusals) == 1 and "writable by every user" in refusals[0] and str(directory) in refusals[0], log
    assert mode(directory) == 0o1777 and list(directory.iterdir()) == []


def test_lyra_up_refuses_it_before_starting_anything(tmp_path: Path) -> None:
    directory = shared_dir(tmp_path)
    config = parse_config(fake_config(tmp_path / "run", runtime__worker_endpoint=f"ipc://{directory}/w.sock"))
    with pytest.raises(StackError, match="writable by every user"):
        up(config, timeout_s=5, progress=print)
    assert not (tmp_path / "run").exists() and mode(directory) == 0o1777


def test_missing_directories_are_created_private_and_existing_ones_keep_their_mode(tmp_path: Path) -> None:
    transport.prepare_endpoint(f"ipc://{tmp_path}/a/b/c.sock")
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    existing = tmp_path / "open"
    existing.mkdir()
    existing.chmod(0o755)
    (existing / "stale.sock").write_text("")
    transport.prepare_endpoint(f"ipc://{existing}/stale.sock")
    assert mode(existing) == 0o755 and not (existing / "stale.sock").exists()
    with pytest.raises(transport.EndpointError, match="writable by every user"):
        transport.prepare_endpoint(f"ipc://{shared_dir(tmp_path)}/x.sock")
    transport.prepare_endpoint("tcp://127.0.0.1:5555")  # nothing to prepare
