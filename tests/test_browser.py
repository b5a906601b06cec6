"""The report as a reader sees it: rendered by headless Chromium (Debian's `chromium`, which
`make test` installs where it can), its DOM read back with --dump-dom."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cdm import params as P
from cdm.report.findings import findings
from cdm.report.html import write_report
from cdm.report.provenance import provenance, since_committed
from tests.conftest import ROOT
from tests.test_report import _metrics, plots  # noqa: F401

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no chromium on PATH (make test installs Debian's chromium: apt-get)"
)


def dump_dom(page: Path) -> str:
    """The DOM after load (images decoded, scripts run), as Chromium serialises it."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def check_page(dom: str, figures: int) -> None:
    assert '<ul class="provenance">' in dom and "commit" in dom
    assert "<table" in dom and "</table>" in dom
    sizes = re.findall(r'<img [^>]*data-natural="(\d+)x(\d+)"', dom)
    assert len(sizes) == figures == len(re.findall(r"<img ", dom)), sizes
    assert all(int(w) > 0 and int(h) > 0 for w, h in sizes), sizes
    assert re.search(r'<img [^>]*alt="samples"', dom)


def test_report_renders_with_every_figure(plots):  # noqa: F811
    out_dir = next(iter(plots.values())).parent.parent
    params = P.load(ROOT / "params.yaml")
    m = _metrics()
    since = since_committed(m, m, ["alignment", "fd"], 512)
    context = {"provenance": provenance(ROOT / "params.yaml", params, out_dir, {}), "since": since}
    _, page = write_report(out_dir, m, findings(m), plots, context=context)
    check_page(dump_dom(page), figures=len(plots))


def test_a_broken_figure_is_caught(plots, tmp_path):  # noqa: F811
    """The check can fail: an image the browser cannot decode reads 0x0."""
    out_dir = next(iter(plots.values())).parent.parent
    m = _metrics()
    _, page = write_report(out_dir, m, findings(m), plots)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    sizes = re.findall(r'data-natural="(\d+)x(\d+)"', dump_dom(broken))
    assert ("0", "0") in sizes
