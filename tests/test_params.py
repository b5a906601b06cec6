import subprocess

import pytest
import yaml

from cdm import params as P
from tests.conftest import PYTHON, ROOT


def test_default_params_file_validates():
    loaded = P.load(ROOT / "params.yaml")
    assert loaded.teacher.backend == "shapes"
    assert loaded.prepare_teacher.n_pairs == 512


def test_unknown_key_is_named_with_the_allowed_ones():
    with pytest.raises(P.ParamsError) as err:
        P.parse({"prepare_teacher": {"n_pair": 5}})
    msg = str(err.value)
    assert "prepare_teacher.n_pair" in msg and "n_pairs" in msg and "\n" not in msg


def test_wrong_type_is_named():
    with pytest.raises(P.ParamsError, match=r"teacher\.steps: .*integer"):
        P.parse({"teacher": {"steps": "many"}})


@pytest.mark.parametrize("text", ["2e-5", "2e-05", "1E-4", "3.0e5", "1.0e-5"])
def test_every_float_spelling_is_a_number(tmp_path, text):
    """DVC writes `dvc exp run -S distill.lr_student=2e-5` as 2e-05; YAML 1.1 (PyYAML) would
    read that as text. The params file is read as YAML 1.2, where it is a float."""
    path = tmp_path / "params.yaml"
    path.write_text(
        (ROOT / "params.yaml").read_text().replace("lr_student: 0.00001", f"lr_student: {text}")
    )
    assert P.load(path).distill.lr_student == pytest.approx(float(text))


def test_negative_step_count_is_rejected():
    with pytest.raises(P.ParamsError, match=r"teacher\.steps: .*greater than 0 \(got -3\)"):
        P.parse({"teacher": {"steps": -3}})


def test_unknown_backend_lists_choices():
    with pytest.raises(
        P.ParamsError, match="'shapes', 'sd3', 'longcat', 'qwen-image' or 'flux2-klein'"
    ):
        P.parse({"teacher": {"backend": "sdxl"}})


def test_cli_exits_non_zero_with_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["world_teacher"]["steps"] = -1
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([PYTHON, "-m", "cdm.params", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "world_teacher.steps" in proc.stderr


def test_the_schema_defaults_are_the_committed_params():
    """One source of truth: a key left out of a params file means its params.yaml value."""
    assert P.Params().model_dump() == P.load(ROOT / "params.yaml").model_dump()


def test_a_method_name_the_rules_cannot_match_is_refused():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["methods"]["cdm-v2"] = {"schedule": "dynamic", "ca": True, "dm": True, "cdm": True}
    data["distill"]["methods"] = ["cdm-v2"]
    with pytest.raises(P.ParamsError, match="'cdm-v2' is not usable.*cdm_v2") as err:
        P.parse(data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("compare", "backend", "message"),
    [
        ({"x": {"steps": 4, "lora": {"path": "a/b", "bogus": 1}}}, "sd3",
         "unknown key 'compare.x.lora.bogus'; allowed keys here: path, file, format, scale, fuse"),
        ({"x": {"steps": 4, "vae": {"class": "AutoencoderTiny"}}}, "sd3",
         "compare.x: a compare vae needs `path`"),
        ({"cdm": {"steps": 4}}, "sd3", "the name 'cdm' is already a method or teacher sample set"),
        ({"teacher_cfg": {"steps": 4}}, "sd3", "already a method or teacher sample set"),
        ({"a-b": {"steps": 4}}, "sd3", "the name 'a-b' is not usable in file and rule names"),
        ({"x": {"guidance": 1.0}}, "sd3", "compare.x.steps: field required"),
        ({"x": {"steps": 4}}, "longcat", "sampled with the sd3 pipeline only"),
    ],
)  # fmt: skip
def test_a_bad_compare_entry_is_one_line_naming_it(compare, backend, message):
    data = {
        "teacher": {"backend": backend},
        "prompts": {"train_file": "t.txt", "eval_file": "e.txt"},
        "compare": compare,
    }
    with pytest.raises(P.ParamsError) as err:
        P.parse(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_compare_entry_keeps_its_recipe():
    data = {
        "teacher": {"backend": "sd3"},
        "prompts": {"train_file": "t.txt", "eval_file": "e.txt"},
        "compare": {"tdm": {"steps": 4, "vae": {"class": "AutoencoderTiny", "path": "m/t",
                                                "kwargs": {"shift_factor": 0.0}}}},
    }  # fmt: skip
    tdm = P.parse(data).compare["tdm"]
    assert (tdm.vae.cls, tdm.vae.kwargs, tdm.guidance, tdm.lora) == (
        "AutoencoderTiny",
        {"shift_factor": 0.0},
        1.0,
        None,
    )
    assert P.parse({}).compare == {}  # the embedded world compares nothing


def test_accumulation_enters_the_fingerprint_and_one_keeps_the_old_one():
    """One micro-batch per process is the run as before (its checkpoints, the committed
    ablation's inputs); two is another run, and zero is refused."""
    plain = P.student_inputs(P.parse({}), "cdm")
    assert "accumulation" not in plain["distill"]
    assert P.student_inputs(P.parse({"distill": {"accumulation": 1}}), "cdm") == plain
    two = P.student_inputs(P.parse({"distill": {"accumulation": 2}}), "cdm")
    assert two["distill"]["accumulation"] == 2 and two != plain
    with pytest.raises(P.ParamsError, match="distill.accumulation"):
        P.parse({"distill": {"accumulation": 0}})
