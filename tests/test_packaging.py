"""Both install modes expose `moetrain.kernels` (mapped from kernels/) and every
subpackage, and never a top-level `kernels` (Hugging Face's package has that name)."""
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import importlib.util, moetrain.config, moetrain.kernels, moetrain.kernels.moe_permute\n"
         "print(moetrain.kernels.__file__)\n"
         "print(moetrain.config.load_config.__module__)\n")


def _probe(cwd, env=None):
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_editable_install_maps_kernels(tmp_path):
    kernels_file, loader = _probe(tmp_path)  # outside the repo: only the install can resolve it
    assert kernels_file == os.path.join(ROOT, "kernels", "__init__.py")
    assert loader == "moetrain.config"


def test_wheel_holds_every_package_and_installs(tmp_path):
    # Built from a copy: a build/ left in the checkout would go stale and leak old modules into wheels.
    src = tmp_path / "src"
    top_level = {".git", ".venv", "runs", "data", "build", "wandb", ".cache", ".pytest_cache"}

    def skip(folder, names):
        own = top_level if os.path.samefile(folder, ROOT) else set()
        return [n for n in names if n in own or n == "__pycache__" or n.endswith(".egg-info")]

    shutil.copytree(ROOT, src, ignore=skip)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").iterdir()
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("moetrain/config/schema.py", "moetrain/kernels/__init__.py",
                   "moetrain/kernels/sparse_attention/triton_bwd.py", "moetrain/kernels/moe_permute/__init__.py",
                   "moetrain/model/transformer.py", "moetrain/eval/passkey.py"):
        assert module in names, module
    assert not any(n.startswith("kernels/") for n in names)
    # Every source package made it in: each folder with an __init__.py has its wheel twin.
    for base, prefix in (("moetrain", "moetrain"), ("kernels", "moetrain/kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, base))
                want = prefix if rel == "." else f"{prefix}/{rel}"
                assert f"{want}/__init__.py" in names, want
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    # -I is not usable (it drops PYTHONPATH); -c with cwd outside the repo and the target first on
    # sys.path makes the installed copy win over the editable one.
    kernels_file, _ = _probe(tmp_path, env)
    assert kernels_file == str(target / "moetrain" / "kernels" / "__init__.py")
