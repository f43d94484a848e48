"""Export works after a plain `pip install -e .`, and a missing package is one line naming
its `pip install`; a missing vLLM venv is one line naming scripts/serving_env.sh."""
import os
import sys

import pytest
from export_helpers import ROOT, export_script

cli = export_script()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_transformers_is_a_base_dependency():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = [d.split(">")[0].split("=")[0].split(";")[0].strip() for d in project["dependencies"]]
    assert "transformers" in names and "protobuf" in names
    assert not any(d.startswith("transformers") and "<" in d for d in project["dependencies"])  # vLLM has its own venv


@pytest.mark.parametrize("module,pip", [("transformers", "pip install 'transformers>=4.46'"),
                                        ("google.protobuf", "pip install 'protobuf>=4'")])
def test_cli_names_the_install_for_a_missing_package(tmp_path, capsys, monkeypatch, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert pip in line and "Traceback" not in line, line
    assert not os.path.exists(tmp_path / "out")


def test_cli_missing_vllm_venv_names_serving_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOETRAIN_VLLM_VENV", str(tmp_path / "no-such-venv"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "out"), "--verify-engine", "vllm"]) == 2
    line = _one_error_line(capsys)
    assert "scripts/serving_env.sh" in line and "no-such-venv" in line, line


def test_missing_vllm_module_points_at_its_venv():
    from moetrain.export.deps import missing_package_line
    line = missing_package_line(ModuleNotFoundError("No module named 'vllm'", name="vllm"))
    assert line.startswith("error: ") and "scripts/serving_env.sh" in line


def test_missing_distribution_found_by_transformers_is_one_line():
    """transformers checks its own requirements with importlib.metadata and raises
    PackageNotFoundError carrying a whole sentence as `name`: the line names the requirement."""
    from importlib.metadata import PackageNotFoundError

    from moetrain.export.deps import missing_package_line
    err = PackageNotFoundError("The 'safetensors>=0.8.0' distribution was not found and is required by this "
                               "application. \nTry: `pip install transformers -U`")
    line = missing_package_line(err)
    assert line == ("error: Python package 'safetensors' is missing; install it with "
                    "`pip install 'safetensors>=0.8.0'` (or `pip install -e .`)"), line
