"""cdm.launch on one node: the rendezvous port. Accelerate's fixed default (29500) made the
second of two launches on a host fail with EADDRINUSE (two single-GPU jobs on a node; two
tests side by side); a launch that names no port gets a free one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cdm import launch
from tests.conftest import ROOT


@pytest.fixture
def ports(monkeypatch) -> list[int | None]:
    """The rendezvous port each launch's DeepSpeed launcher gets from accelerate, once it has
    read the config file (the launcher then starts nothing)."""
    import accelerate.commands.launch as accelerate_launch

    import cdm.lock

    seen: list[int | None] = []
    monkeypatch.setattr(
        accelerate_launch, "deepspeed_launcher", lambda a: seen.append(a.main_process_port)
    )
    monkeypatch.setattr(cdm.lock, "watch", lambda *a, **k: False)
    monkeypatch.chdir(ROOT)
    return seen


ARGS = ["--config_file", "configs/accelerate/zero2.yaml", "--num_processes", "1", "src/distill.py"]


def _config(path: Path, old: str = "", new: str = "") -> str:
    """configs/accelerate/zero2.yaml copied to `path`, `old` replaced by `new` (no `old`:
    `new` appended), its DeepSpeed file made absolute so the copy reads from anywhere."""
    text = (ROOT / "configs/accelerate/zero2.yaml").read_text()
    text = text.replace(
        "deepspeed_config_file: configs/", f"deepspeed_config_file: {ROOT}/configs/"
    )
    assert old in text
    path.write_text(text.replace(old, new) if old else text + new)
    return str(path)


def test_a_launch_without_a_port_gets_a_free_one_while_29500_is_taken(ports):
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 29500))
            held.listen()
        except OSError:
            pass  # taken already: the point stands
        assert launch.main(ARGS) == 0 and launch.main(ARGS) == 0
    assert all(p is not None and p != 29500 for p in ports), ports
    for port in ports:  # free when chosen: a listener can bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_named_on_the_command_line_or_in_the_config_is_kept(ports, tmp_path: Path):
    assert launch.main(["--main_process_port", "29777", *ARGS]) == 0
    config = _config(tmp_path / "acc.yaml", new="main_process_port: 29888\n")
    assert launch.main(["--config_file", config, *ARGS[2:]]) == 0
    assert ports == [29777, 29888]


def test_one_node_of_a_multi_node_step_keeps_the_shared_default(ports, tmp_path: Path):
    """A node's launcher in cdm.nodes' srun step (--num_machines 2, no port: DVC's distill
    command names none) keeps accelerate's default, the port every node meets at; a free
    port per node hung the two-node run under DVC (tests/test_real_slurm.py)."""
    node = ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
    assert launch.main([*node, *ARGS]) == 0
    config = _config(tmp_path / "two.yaml", "num_machines: 1", "num_machines: 2")
    assert launch.main(["--config_file", config, *node[2:], *ARGS[2:]]) == 0
    assert ports == [None, None]  # left to accelerate: its default, 29500, on every node
