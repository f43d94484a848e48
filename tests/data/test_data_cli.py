"""scripts/prepare_data.py: one-line errors without tracebacks, summary output, config defaults."""
import os
import subprocess
import sys

from data_helpers import write_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prepare_data  # noqa: E402


def test_error_is_one_line_without_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "a", "path": str(tmp_path / "missing")}])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--recipe", recipe,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: source 'a': path ") and "does not exist" in last
    assert not os.path.exists(tmp_path / "out")


def test_summary_and_config_defaults(prepared, small_recipe, capsys):
    out, m = prepared
    assert prepare_data.main(["--recipe", small_recipe, "--out", out]) == 0
    text = capsys.readouterr().out
    assert f"{m['splits']['train']['tokens']:,d} tokens" in text and "vocab 400" in text
    assert prepare_data.main(["--set", f"data.dir={out}", "--set", f"data.recipe={small_recipe}"]) == 0
    assert prepare_data.main(["--set", "data.nope=1"]) == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err
