import shutil

import pytest
import yaml

from cdm import params as P
from cdm.overlay import apply, merge
from tests.conftest import ROOT


def test_merge_is_recursive_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": 4}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}


def test_ablation_overlay_adds_the_methods_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply(ROOT / "configs/ablation.yaml", params)
    text = params.read_text()
    assert P.load(params).distill.methods == ["dmd2", "dynamic", "cdm", "dm_only"]
    assert "# the baseline: inference schedule" in text
    # Everything else is as before.
    before = yaml.safe_load((ROOT / "params.yaml").read_text())
    after = yaml.safe_load(text)
    after["distill"]["methods"] = before["distill"]["methods"]
    assert after == before


def test_invalid_overlay_leaves_params_untouched(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  k_min: 30\n")
    with pytest.raises(P.ParamsError, match=r"k_min \(30\) must be <= k_max \(28\)"):
        apply(bad, params)
    assert params.read_text() == (ROOT / "params.yaml").read_text()
