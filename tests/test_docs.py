"""The docs keep up with the code: every hook, every component option, the README commands."""

from __future__ import annotations

import re
import types
from pathlib import Path

from sdsctl import hookspecs, plugins
from sdsctl.engine.recipe import OptimizerConfig, OutputConfig, Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name in vars(hookspecs) if name.startswith("register_"))


def test_every_hook_has_a_docs_entry_and_a_docstring():
    text = (ROOT / "docs" / "plugins.md").read_text()
    documented = re.findall(r"^### `(register_\w+)\(", text, flags=re.M)
    assert sorted(documented) == HOOKS
    for name in HOOKS:
        assert getattr(hookspecs, name).__doc__.strip()


def test_every_recipe_key_and_first_party_option_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for model in (Recipe, OptimizerConfig, OutputConfig):
        for key in model.model_fields:
            assert f"| `{key}` |" in text, key
    for kind in ("models", "parameterizations", "guidances", "schedules", "weightings", "cameras", "metrics"):
        for name, reg in plugins.components(kind).items():
            if reg.distribution != "sdsctl":
                continue
            assert f"`{name}`" in text, name
            for key in reg.obj.Config.model_fields:
                if key != "name":
                    assert f"| `{key}` |" in text, f"{name}.{key}"


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in _code_blocks(quickstart, "bash")]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    run, test = commands
    assert run.startswith("python3 -m venv .venv") and run.endswith("sdsctl run recipes/robust_nfsd.yaml")
    assert test.startswith("python3 -m venv .venv") and test.endswith("pytest") and "'.[test]'" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_changelog_has_an_unreleased_section():
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def _hook_sections(text: str) -> dict[str, str]:
    parts = re.split(r"^### `(register_\w+)\(", text, flags=re.M)
    return {name: body.split("\n## ", 1)[0].split("\n### ", 1)[0] for name, body in zip(parts[1::2], parts[2::2])}


def test_every_hook_section_says_when_it_is_called_and_shows_an_example():
    sections = _hook_sections((ROOT / "docs" / "plugins.md").read_text())
    assert sorted(sections) == HOOKS
    for name, body in sections.items():
        assert "Called" in body, f"{name}: when is it called?"
        examples = _code_blocks(body, "python")
        assert any(f"def {name}(" in code for code in examples), f"{name}: no minimal example"


def test_every_component_kind_has_a_section():
    from sdsctl.components import KINDS

    text = (ROOT / "docs" / "plugins.md").read_text()
    kinds_part = text.split("\n## Component kinds\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^### (\w+)$", kinds_part, flags=re.M)
    expected = [plugins.singular(kind) for kind in KINDS] + ["command"]
    assert sorted(documented) == sorted(expected)
    assert "How a Config is validated" in kinds_part
    for kind in expected[:-1]:
        body = kinds_part.split(f"\n### {kind}\n", 1)[1].split("\n### ", 1)[0]
        assert "`register_" in body, kind


def test_the_docs_show_a_complete_pyproject():
    import tomllib

    text = (ROOT / "docs" / "plugins.md").read_text()
    full = [tomllib.loads(block) for block in _code_blocks(text, "toml") if "[project]" in block]
    assert full, "no complete pyproject.toml"
    (project,) = full
    assert project["build-system"]["build-backend"] and project["project"]["name"]
    assert "sdsctl" in project["project"]["entry-points"]
    assert any(d.startswith("sdsctl") for d in project["project"]["dependencies"])


def test_every_python_example_in_the_plugin_docs_registers(register_plugin, cli):
    text = (ROOT / "docs" / "plugins.md").read_text()
    for i, code in enumerate(_code_blocks(text, "python")):
        module = types.ModuleType(f"docs_example_{i}")
        exec(compile(code, f"docs/plugins.md (example {i + 1})", "exec"), module.__dict__)
        register_plugin(module, f"docs-example-{i}")
    listing = __import__("json").loads(cli("plugins", "--json").stdout)
    names = {(kind, e["name"]) for kind, entries in listing.items() for e in entries}
    assert {("models", "my-shapes"), ("parameterizations", "zero-latents"), ("guidances", "no-guidance"),
            ("guidances", "mine"), ("schedules", "fixed"), ("weightings", "snr"), ("metrics", "brightness"),
            ("loggers", "loss-file"), ("commands", "hello")} <= names
    assert cli("hello", "--name", "docs").stdout == "hello docs\n"


def test_the_plugin_example_in_the_docs_works(register_plugin, recipe_file, tmp_path):
    code = _code_blocks((ROOT / "docs" / "plugins.md").read_text(), "python")[0]
    module = types.ModuleType("docs_example_plugin")
    exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    register_plugin(module, "docs-example")
    from sdsctl.engine.panel import PlainLog
    from sdsctl.engine.run import execute

    loaded = load_recipe(recipe_file({"guidance": {"name": "mine", "guidance_scale": 5}, "steps": 2}))
    assert execute(loaded, tmp_path / "run", PlainLog(100)).status == "completed"
