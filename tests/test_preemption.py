"""Why a run stops early (cdm.preemption): a signal remembered, the SLURM end time read."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

from cdm import preemption


def test_slurm_end_time_reads_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text(
        "#!/bin/sh\necho 'JobId=7 JobName=x\n   StartTime=2026-11-27T10:00:00 EndTime=2026-11-27T12:30:00 Deadline=N/A'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preemption.slurm_end_time() is None  # not in a job
    expected = datetime.fromisoformat("2026-11-27T12:30:00").timestamp()
    assert preemption.slurm_end_time("7") == expected
    fake.write_text("#!/bin/sh\necho 'JobId=7 EndTime=Unknown'\n")
    assert preemption.slurm_end_time("7") is None


def test_a_signal_is_remembered_and_the_old_handler_restored(monkeypatch):
    monkeypatch.setattr(preemption, "slurm_end_time", lambda: None)
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.Preemption(stop_before_limit=600) as stop:
        assert stop.reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert stop.reason() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_time_limit_stops_only_within_stop_before_limit(monkeypatch):
    monkeypatch.setattr(preemption, "slurm_end_time", lambda: time.time() + 1000)
    with preemption.Preemption(stop_before_limit=600) as stop:
        assert stop.reason() is None  # 1000 s left, 600 s needed
    with preemption.Preemption(stop_before_limit=1200) as stop:
        assert stop.reason() == "the SLURM time limit"
