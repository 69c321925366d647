"""Packaging: what ``pip install -e .`` does to a user's environment, and the transformers floor the suite runs on.

* A torch the user already has stays: installing the package beside torch 2.13 (the README's install order) or
  beside a newer torch (a GPU user's CUDA build, stood in for by a distribution record of torch 2.15.0) plans no
  other torch. Checked with pip's own resolver (``pip install --dry-run --report``), offline (``--no-index``:
  every requirement must be satisfied by what is installed), in a virtual environment that sees the system's
  packages.
* The wheel holds the ``hf-normsoftmax`` console script, whose ``--help`` imports neither torch nor transformers.
* The transformers floor in pyproject.toml is a release the suite has run on: a virtual environment that sees the
  system's packages gets exactly that release of transformers installed over them, and the model test files run
  there (slow: needs PyPI or pip's cache for that one release).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Run on the floor release: the model test files (construction, flags, stock checkpoints, save/load, Auto API,
# pipelines, generation, Trainer steps), each head with only its fullest flag set, and without torch.compile (a torch
# feature; it alone takes minutes). About 80 tests, 80 s of CPU.
FLOOR_SMOKE_TESTS = ("tests/test_models_vit.py", "tests/test_models_gpt2.py", "tests/test_models_bert.py",
                     "tests/test_models_decoders.py")
# -k also matches marker and module names: the decoders' slow tests (the example's training runs, remote-code
# subprocesses) stay out; the ViT / BERT / GPT-2 selection is unchanged.
FLOOR_SMOKE_SELECTION = ("(not every_flag_combination and not torch_compile or (learnable_gamma and sigma_reparam)) "
                         "and not (test_models_decoders and slow)")

pytestmark = pytest.mark.xdist_group("packaging")  # pip builds the package's metadata in the checkout


def _requirements() -> dict[str, str]:
    """pyproject's dependencies as {name: specifier}."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    result = {}
    for line in project["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", line)
        result[match.group(1).lower().replace("_", "-")] = match.group(2).strip()
    return result


def _system_view_venv(path: Path) -> Path:
    """A virtual environment (no pip of its own) that sees the system's site-packages behind its own."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=os.name != "nt").create(path)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert Path(site).is_relative_to(path), site
    return python


def _fake_distribution(python: Path, name: str, version: str) -> None:
    """A distribution record (metadata only) of ``name==version`` in the venv's own site-packages."""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    info = Path(site) / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    (info / "INSTALLER").write_text("pip\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")


def _pip_env() -> dict[str, str]:
    # no pip configuration: no site constraints or extra indexes (the resolver must make do with what is installed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


@pytest.mark.parametrize("torch_version", [None, "2.15.0"], ids=["installed_torch", "newer_torch"])
def test_editable_install_keeps_the_installed_torch(tmp_path, torch_version):
    python = _system_view_venv(tmp_path / "venv")
    if torch_version is not None:
        _fake_distribution(python, "torch", torch_version)
    expected = torch_version or subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    completed = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet",
         "--report", "-", "-e", str(REPO)],
        capture_output=True, text=True, env=_pip_env(), cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=600,
    )
    assert completed.returncode == 0, (
        f"pip could not install the package beside torch {expected} without another torch (pyproject: torch "
        f"{_requirements()['torch']!r}):\n{completed.stderr[-3000:]}"
    )
    report = json.loads(completed.stdout)
    planned = {re.sub(r"[-_.]+", "-", item["metadata"]["name"].lower()): item["metadata"]["version"]
               for item in report["install"]}
    assert "torch" not in planned, f"pip would replace torch {expected} by torch {planned.get('torch')}"
    assert set(planned) == {"hf-normsoftmax"}, planned


def test_no_upper_bound_on_torch_and_a_stated_transformers_floor():
    requirements = _requirements()
    assert "<" not in requirements["torch"], requirements["torch"]
    floor = re.fullmatch(r">=\s*([0-9.]+)\s*,\s*<\s*6", requirements["transformers"])
    assert floor, requirements["transformers"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"transformers {floor.group(1)}" in readme, "README does not state the transformers floor"


def test_wheel_ships_the_console_script_and_it_starts_light(tmp_path):
    """A regular (not editable) install from the wheel: `hf-normsoftmax --help` works and imports neither torch nor
    transformers nor the package; the package itself still imports with its Auto registration."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hf_normsoftmax_cli.py"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "hf_normsoftmax", source / "hf_normsoftmax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    python = _system_view_venv(tmp_path / "venv")
    wheels = tmp_path / "wheels"
    built = subprocess.run([str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(wheels), str(source)], capture_output=True, text=True,
                           env=_pip_env(), cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("hf_normsoftmax-*.whl")
    # --force-reinstall --no-deps: into the venv itself, beside (and before) the system's editable install
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                "--force-reinstall", str(wheel)], capture_output=True, text=True, env=_pip_env(),
                               cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = python.parent / ("hf-normsoftmax.exe" if os.name == "nt" else "hf-normsoftmax")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's copy, not the checkout
    completed = subprocess.run([str(python), "-X", "importtime", str(script), "--help"], capture_output=True,
                               text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=300)
    assert completed.returncode == 0 and "usage: hf-normsoftmax" in completed.stdout, completed.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines()
                if line.startswith("import time:")}
    assert "hf_normsoftmax_cli" in imported
    assert not imported & {"torch", "transformers", "hf_normsoftmax"}, sorted(imported)
    probe = subprocess.run(
        [str(python), "-c", "import hf_normsoftmax, hf_normsoftmax_cli, transformers as t; "
         "print(hf_normsoftmax.__file__); print(hf_normsoftmax_cli.__file__); "
         "print(type(t.AutoConfig.for_model('normsoftmax_bert')).__name__)"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    package_file, cli_file, config_class = probe.stdout.split()
    assert Path(package_file).is_relative_to(tmp_path / "venv") and Path(cli_file).is_relative_to(tmp_path / "venv")
    assert config_class == "NormSoftmaxBertConfig"


@pytest.mark.slow
def test_model_tests_pass_on_the_transformers_floor(tmp_path):
    floor = re.fullmatch(r">=\s*([0-9.]+)\s*,.*", _requirements()["transformers"]).group(1)
    python = _system_view_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"transformers=={floor}"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=900,
    )
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"transformers=={floor} cannot be downloaded here (no PyPI and not in pip's cache)")
    assert installed.returncode == 0, installed.stderr[-3000:]
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert version == floor, f"the venv imports transformers {version}, not the floor {floor}"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    completed = subprocess.run(
        [str(python), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", FLOOR_SMOKE_SELECTION,
         *FLOOR_SMOKE_TESTS],
        capture_output=True, text=True, env=env, cwd=str(REPO), stdin=subprocess.DEVNULL, timeout=1800,
    )
    assert completed.returncode == 0, f"model tests on transformers {floor}:\n{completed.stdout[-6000:]}"
    assert re.search(r"\b([5-9][0-9]|[1-9][0-9]{2,}) passed", completed.stdout), completed.stdout[-2000:]
