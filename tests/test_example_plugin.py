"""The example third-party package (``examples/sdsctl-example-plugin``) installs into a fresh
virtual environment, offline, and its components run there.

The fresh environment sees the test environment's packages (sdsctl, torch, ...) through a
``.pth`` file -- "sdsctl installed beside it" -- and gets the example from its local folder
with ``pip install --no-index --no-build-isolation``: nothing is downloaded. About 40 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sdsctl import plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sdsctl-example-plugin"
SDSCTL = "from sdsctl.cli import main; main()"


def _call(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("SDSCTL_LOAD_PLUGINS", None)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A fresh venv that sees this one's packages, with the example package installed into it."""
    tmp = tmp_path_factory.mktemp("example")
    source = tmp / "sdsctl-example-plugin"  # a copy: building writes egg-info beside the sources
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    venv = tmp / "venv"
    _call([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_call([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      tmp).stdout.strip())
    parent = sysconfig.get_paths()["purelib"]
    (site / "sdsctl_parent_env.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    _call([str(python), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--quiet", str(source)], tmp)
    assert (site / "sdsctl_example_plugin").is_dir()  # installed into the fresh venv, not this one
    return python


def test_the_example_is_not_installed_in_the_test_environment():
    assert "sds-rescaled" not in plugins.components("guidances")


def test_plugins_json_lists_its_components_with_their_distribution(venv_python, tmp_path):
    listing = json.loads(_call([str(venv_python), "-c", SDSCTL, "plugins", "--json"], tmp_path).stdout)
    expected = {("guidances", "sds-rescaled"), ("schedules", "linear-decay"), ("metrics", "brightness-contrast"),
                ("families", "example-tiny")}
    found = {(kind, e["name"]): e for kind, entries in listing.items() for e in entries}
    for key in expected:
        assert found[key]["distribution"] == "sdsctl-example-plugin" and found[key]["plugin"] == "example"
    assert found[("guidances", "sds")]["distribution"] == "sdsctl"  # sdsctl's own, beside it
    assert found[("families", "stable-diffusion")]["plugin"] == "model_families"  # the bundled families too


def test_a_short_recipe_runs_with_its_components(venv_python, tmp_path):
    """The package's recipe, found by name (hook ``register_recipes``), listed by ``sdsctl recipes``."""
    listing = _call([str(venv_python), "-c", SDSCTL, "recipes"], tmp_path).stdout
    (line,) = [x for x in listing.splitlines() if x.startswith("example-rescaled ")]
    assert "example.yaml" in line and "sds " in listing  # sdsctl's own beside it
    out = tmp_path / "run"
    _call([str(venv_python), "-c", SDSCTL, "run", "example-rescaled", "--steps", "3", "--device", "cpu",
           "--out", str(out), "--no-live"], tmp_path)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["t"] for r in records] == [980, 500, 20]  # linear-decay over 3 steps
    assert all("guided" in r["norms"] for r in records)  # sds-rescaled's norm
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["metrics"]["brightness-contrast"]) == {"brightness", "contrast"}


def test_a_recipe_runs_on_its_model_family(venv_python, tmp_path):
    """The package's family (``ExamplePipeline``, a pipeline class of its own) is found by
    ``sdsctl model`` and ``sdsctl run`` through its entry point alone."""
    folder = tmp_path / "example-tiny"
    _call([str(venv_python), "-c", "import sys; from pathlib import Path; "
           "from sdsctl_example_plugin.family import build_tiny; build_tiny(Path(sys.argv[1]))", str(folder)], tmp_path)
    info = json.loads(_call([str(venv_python), "-c", SDSCTL, "model", str(folder), "--json"], tmp_path).stdout)
    assert (info["family"], info["pipeline"]) == ("example-tiny", "ExamplePipeline")
    assert info["family_plugin"] == {"plugin": "example", "distribution": "sdsctl-example-plugin"}
    out = tmp_path / "run"
    _call([str(venv_python), "-c", SDSCTL, "run", "sds", "--model", str(folder), "--steps", "3", "--device", "cpu",
           "--out", str(out), "--no-live"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["model"]["family"] == "example-tiny"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_without_the_package_its_pipeline_is_refused_with_the_supported_families(cli, tmp_path):
    folder = tmp_path / "not-a-family"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ExamplePipeline"}))
    result = cli("model", folder)
    assert result.exit_code == 2
    assert "'ExamplePipeline'" in result.stderr and "stable-diffusion (StableDiffusionPipeline)" in result.stderr
    assert "A plugin adds a family" in result.stderr


def test_the_plugins_own_tests_pass_there(venv_python, tmp_path):
    shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    _call([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], tmp_path)
