"""The run log of a distillation: one row per iteration, in train.csv and per-loss plot files.

train.csv sits beside the checkpoints (it survives a crash; a resume keeps its rows up to the
checkpoint) and, row by row, its live copy under logs/<method>/ that people watch during the
run, plus one `plots/<loss>.tsv` per loss (iteration and value; the layout DVCLive writes),
which `dvc plots show` draws.
"""

from __future__ import annotations

import csv
from pathlib import Path

LOG_COLUMNS = [
    "iteration", "student_step", "loss_ca", "loss_dm", "loss_cdm", "loss_fake",
    "w_ca", "w_dm", "w_cdm", "grad_norm_student", "grad_norm_fake", "K", "anchor_sigma",
    "n_student_evals", "n_teacher_evals", "n_fake_evals", "n_nonfinite", "seconds",
    "lr_student", "lr_fake",
]  # fmt: skip
LOSSES = [c for c in LOG_COLUMNS if c.startswith("loss_")]


def loss_summary(row: dict[str, float]) -> dict[str, str]:
    """The row's losses for the progress bar: {"ca": "0.1234", ...}."""
    return {k[5:]: f"{row[k]:.4g}" for k in LOSSES if k in row}


class RunLog:
    """train.csv, its live copy and the per-loss plot files, one row at a time."""

    def __init__(self, path: Path, start: int, live: Path | None = None):
        rows = []
        if start and path.is_file():  # keep the rows up to the checkpoint we resume from
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if int(r[0]) <= start]
        self.files = []
        for target in [path] + ([live] if live is not None else []):
            self.files.append(self._open(target, LOG_COLUMNS, rows, ","))
        self.plots = {}
        if live is not None:
            for loss in LOSSES:
                i = LOG_COLUMNS.index(loss)
                kept = [[r[0], r[i]] for r in rows if r[i] != ""]
                target = live.parent / "plots" / f"{loss}.tsv"
                self.plots[i] = self._open(target, ["iteration", loss], kept, "\t")

    @staticmethod
    def _open(path: Path, header: list[str], rows: list[list[str]], sep: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "w", newline="")
        writer = csv.writer(file, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
        file.flush()
        return file, writer

    def write(self, row: dict[str, float]) -> None:
        """One iteration's row; a column it lacks (a loss the method skips) is left empty."""
        values = [row.get(c, "") for c in LOG_COLUMNS]
        for file, writer in self.files:
            writer.writerow(values)
            file.flush()
        for i, (file, writer) in self.plots.items():
            if values[i] != "":
                writer.writerow([values[0], values[i]])
                file.flush()
