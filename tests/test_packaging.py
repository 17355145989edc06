"""A user's install: build the wheel, install it (no editable link to this checkout) into a fresh
virtual environment whose only third-party packages are the core dependencies (lm-eval,
datasets and matplotlib, the extras, are absent), and run the core commands on a bundled model
from a directory outside the source tree."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the extras' top-level import names and distributions: left out of the fresh environment
EXTRA_PREFIXES = ("lm_eval", "datasets", "matplotlib", "mpl_toolkits", "pylab")
OWN_PREFIXES = ("moecore", "__editable__")


def _run(cmd, cwd, env=None, check=True):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """(bin dir, environment variables, work dir) of a fresh venv holding the built moecore wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src], cwd=tmp)
    wheel = next((tmp / "dist").glob("moecore-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    # the core dependencies: every package of this test's environment except the extras and
    # moecore itself, linked into one folder that the fresh venv puts on its path
    deps = tmp / "core-deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(EXTRA_PREFIXES + OWN_PREFIXES) and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    (site / "core-deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", env, work


def test_installed_wheel_is_not_the_checkout_and_has_no_extras(user_env):
    bindir, env, work = user_env
    code = ("import importlib.util, moecore, moecore.data as d; print(moecore.__file__); "
            "print([m for m in ('lm_eval', 'datasets', 'matplotlib') if importlib.util.find_spec(m)]); "
            "print(len(d.load_split('calib')), len(d.load_split('heldout')))")
    out = _run([bindir / "python", "-c", code], cwd=work, env=env).stdout.splitlines()
    assert str(ROOT / "src") not in out[0] and "site-packages" in out[0]
    assert out[1] == "[]"
    n_calib, n_heldout = map(int, out[2].split())  # the bundled corpus, read as package data
    assert (n_calib, n_heldout) == (47, 206)


def test_core_commands_run_from_the_wheel_without_extras(user_env):
    bindir, env, work = user_env
    moecore = bindir / "moecore"
    plan = _run([moecore, "plan", ROOT / "models" / "tiny-mixtral" / "config.json", "--json"], cwd=work, env=env)
    assert json.loads(plan.stdout)
    out = work / "mix-25"
    _run([moecore, "compress", "--no-calib", ROOT / "models" / "tiny-mixtral", "-o", out, "--target-ratio", "0.25"], cwd=work, env=env)
    assert (out / "config.json").is_file() and (out / "compression_statistics.yaml").is_file()
    _run([moecore, "stats", out], cwd=work, env=env)
    ppl = _run([moecore, "eval", out, "--max-tokens", "2048", "--json"], cwd=work, env=env)
    assert json.loads(ppl.stdout)["ppl"] > 1
    # a feature that needs an extra says which one, in one line, and exits 2
    r = _run([moecore, "eval", out, "--tasks", "moecore_heldout_ppl", "--limit", "2"], cwd=work, env=env, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "moecore eval: error: lm-eval evaluation needs lm_eval, which is not installed: pip install 'moecore[eval]'")
    assert "Traceback" not in r.stderr
