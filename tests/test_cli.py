"""Each command and its exit codes, through typer's CliRunner."""

from __future__ import annotations

import subprocess
import sys

import sdsctl


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"sdsctl {sdsctl.__version__}\n"


def test_help_short_and_long(cli):
    for flag in ("-h", "--help"):
        result = cli(flag)
        assert result.exit_code == 0
        for command in ("run", "resume", "validate", "recipes", "plugins"):
            assert command in result.stdout


def test_no_arguments_shows_help(cli):
    result = cli()
    assert result.exit_code == 2  # click: a usage error, after printing the help
    assert "Usage:" in result.output and "run" in result.output


def test_unknown_command_is_a_usage_error(cli):
    result = cli("rnu")
    assert result.exit_code == 2 and "run" in result.output


def test_recipes_lists_bundled_recipes_one_line_each(cli):
    result = cli("recipes")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    sds = next(line for line in lines if line.startswith("sds "))
    assert "SDS on latent pixels" in sds


def test_validate_ok_and_show(cli, recipe_file):
    result = cli("validate", recipe_file(), "--show", "--set", "seed=7")
    assert result.exit_code == 0, result.output
    assert "seed: 7" in result.stdout and result.stdout.rstrip().splitlines()[-1].startswith("ok: ")


def test_validate_bundled_recipe_by_name(cli, tiny_prior):
    result = cli("validate", "sds", "--model", tiny_prior)
    assert result.exit_code == 0, result.output


def test_validate_bad_recipe(cli, recipe_file):
    result = cli("validate", recipe_file({"steps": -1}))
    assert result.exit_code == 2 and "steps" in result.stderr and "Traceback" not in result.output


def test_run_ok_prints_where_the_image_is(cli, recipe_file, tmp_path):
    result = cli("run", recipe_file(), "--out", tmp_path / "r", "--no-live", "--steps", "2", "--prompt",
                 "a green square on a white background", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"done: 2 steps -> {tmp_path / 'r' / 'final.png'}" in result.stdout
    assert "prompt: a green square on a white background" in (tmp_path / "r" / "recipe.yaml").read_text()


def test_run_missing_recipe(cli, tmp_path):
    result = cli("run", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "not found" in result.stderr


def test_run_on_a_directory_suggests_resume(cli, recipe_file, tmp_path):
    out = tmp_path / "r"
    cli("run", recipe_file(), "--out", out, "--no-live", "--steps", "1")
    result = cli("run", out)
    assert result.exit_code == 2 and "sdsctl resume" in result.stderr


def test_console_script_main_exit_code(tmp_path):
    code = "import sys; sys.argv = ['sdsctl', 'validate', 'missing.yaml']; from sdsctl.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: recipe file missing.yaml not found") and "Traceback" not in out.stderr
