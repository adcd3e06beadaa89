"""Each command and its exit codes, through typer's CliRunner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sdsctl

ROOT = Path(__file__).resolve().parent.parent


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"sdsctl {sdsctl.__version__}\n"


def test_help_short_and_long(cli):
    for flag in ("-h", "--help"):
        result = cli(flag)
        assert result.exit_code == 0
        for command in ("run", "resume", "validate", "recipes", "plugins"):
            assert command in result.stdout


def test_help_names_every_command_and_claims_no_subset(cli):
    """The description does not list three commands as if they were all; the listing has every one."""
    app = create_app()
    names = [info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands]
    names += [g.name for g in app.registered_groups if g.name]
    listing = cli("--help").stdout
    commands = listing.split("Commands:")[1]
    assert len(names) >= 14 and all(re.search(rf"^  {re.escape(n)} ", commands, flags=re.M) for n in names), names
    assert "run, resume, validate." not in listing and "Every command is listed below" in listing
    assert "single .safetensors/.ckpt" in cli("run", "--help").stdout


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


# ----------------------------------------------------------------------------- bad input, every command

import re  # noqa: E402

import pytest  # noqa: E402

from sdsctl.cli import create_app  # noqa: E402

NO_DEVICE = "cuda:99"  # well formed, and on no machine this suite runs on
#: (command line, what stderr must say, what it must not say); {recipe} a valid recipe file, {run}
#: a completed run, {tmp} an empty folder, {file} a plain file, {full} a folder with a stray file
BAD_INPUT = [
    ("run robust-nfsd", "did you mean robust_nfsd?", None),
    ("run recipes/robust-nfsd.yaml", "did you mean recipes/robust_nfsd.yaml?", None),
    (f"run {{recipe}} --device {NO_DEVICE}", f"--device: {NO_DEVICE} is not available", None),
    ("run {recipe} --device tpu", "--device: expected auto, cpu, cuda, cuda:N or mps, got 'tpu'", None),
    ("run {recipe} -s seed=-1", "--set seed=-1: ", None),
    ("run {recipe} --view-size -8", "output.view_size=-8: Input should be greater than or equal to 0", None),
    ("run {tmp}", "is a directory, not a recipe file", "resume"),
    ("run {recipe} --out {file}", "is a file, not a folder", None),
    ("run {recipe} --out {full}", "is not empty", "resume"),
    ("run {recipe} --out {run}", "holds a run; continue it with `sdsctl resume", None),
    ("resume {tmp}", "is not a run directory", None),
    ("resume {tmp}/nope", "not found", None),
    ("resume {run}", "--set steps=N", None),
    (f"resume {{run}} --device {NO_DEVICE}", f"{NO_DEVICE} is not available", None),
    ("resume {run} -s prompt=x", "a resumed run keeps its recipe", None),
    (f"validate {{recipe}} --device {NO_DEVICE}", "devices here: ", None),
    ("validate {recipe} -s guidance.guidance_scal=3", "did you mean 'guidance_scale'?", None),
    ("validate nope", "recipe nope not found", "did you mean"),
    ("recipes --json", "No such option", None),
    ("plugins --jsn", "No such option", None),
    (f"compare sds --pairs 1 --device {NO_DEVICE} --out {{tmp}}/cmp", f"{NO_DEVICE} is not available", None),
    ("compare sds --pairs 0", "--pairs 0: must be positive", None),
    ("compare robust-nfsd sds", "did you mean robust_nfsd?", None),
    ("compare sds --pairs 1 --jobs 2 --executor ray --out {tmp}/cmp", "--jobs is for --executor local", None),
    ("sweep {recipe} --grid guidance.guidanse_scale=7.5,20 --seeds 1 --out {tmp}/sw", "did you mean 'guidance_scale'?",
     None),
    ("sweep {recipe} --grid steps=2,,4 --seeds 1 --out {tmp}/sw", "--grid steps=2,,4: value 2 is empty", None),
    ("sweep {recipe} --grid steps=2,4 --executor dask --out {tmp}/sw", "--executor dask: expected one of local, ray",
     None),
    ("doctor {tmp}", "is not a run directory", None),
    ("render {run}", "is a 2D run", None),
    ("render {tmp}", "is not a run directory", None),
    ("render {run} --azimuth 0,left", "--azimuth '0,left': expected numbers", None),
    ("render {run} --elevation 95", "--elevation 95: elevations lie in [-90, 90]", None),
    ("export {run}", "is a 2D run", None),
    ("export {run} --format stl", "--format 'stl': choose one of ply, glb, obj", None),
    ("model nowhere", "model folder nowhere not found", "nowhere: model"),
    (f"train-shapes --out {{tmp}}/ts --device {NO_DEVICE}", f"--device {NO_DEVICE}: {NO_DEVICE} is not available",
     None),
    ("train-shapes --out {tmp}/ts --vae-steps 0", "must be positive", None),
    (f"sample --prompt x --out {{tmp}}/x.png --device {NO_DEVICE}", "devices here: cpu", None),
    ("sample --prompt x --out {tmp}/x.jpg", "written as PNG", None),
    ("sample --prompt x --out {tmp}/x.png --model nowhere", "model folder nowhere not found", None),
    ("evaluate-prior --model nowhere", "model folder nowhere not found", None),
    ("vocabulary extra", "unexpected extra argument", None),
    (f"bench {{recipe}} --device {NO_DEVICE}", f"{NO_DEVICE} is not available", None),
    ("bench robust-nfsd", "did you mean robust_nfsd?", None),
]
DOUBLED = re.compile(r"--([\w-]+)(?: \S+)?: \1:|error: error")


@pytest.fixture(scope="module")
def bad_input_places(tmp_path_factory, tiny_prior):
    import yaml

    from sdsctl.engine.panel import PlainLog
    from sdsctl.engine.recipe import load_recipe
    from sdsctl.engine.run import execute

    root = tmp_path_factory.mktemp("bad")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_prior), "prompt": "a red circle on a blue background",
                                      "steps": 2, "device": "cpu"}))
    execute(load_recipe(recipe), root / "run", PlainLog(100))
    (root / "file.txt").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("mine")
    return {"recipe": recipe, "run": root / "run", "file": root / "file.txt", "full": root / "full"}


def _commands() -> set[str]:
    app = create_app()
    return {i.name or i.callback.__name__.replace("_", "-") for i in app.registered_commands}


def test_the_bad_input_table_covers_every_command():
    covered = {line.split()[0] for line, _, _ in BAD_INPUT}
    assert _commands() <= covered, f"commands without a bad-input row: {_commands() - covered}"


@pytest.mark.parametrize("line, says, not_says", BAD_INPUT,
                         ids=[row[0].split()[0] + ": " + row[0] for row in BAD_INPUT])
def test_bad_input_is_one_clean_message_and_exit_2(line, says, not_says, cli, bad_input_places, tmp_path, monkeypatch):
    command = line.split()[0]
    if command not in _commands():
        pytest.skip(f"no {command} command here")
    monkeypatch.chdir(ROOT)  # recipes/ resolves as the README's commands do
    places = {**{k: str(v) for k, v in bad_input_places.items()}, "tmp": str(tmp_path)}
    result = cli(*line.format(**places).split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and says in result.stderr, result.stderr
    assert not_says is None or not_says not in result.stderr
    assert not DOUBLED.search(result.stderr), result.stderr
    if "Usage:" not in result.stderr:  # our own errors: one message, first line "error: ..."
        assert result.stderr.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "-v"])
def test_library_warnings_are_shown_with_v_only(verbose):
    code = ("import sys, warnings; from sdsctl.cli import _quiet_libraries; _quiet_libraries(sys.argv[1] == '1'); "
            "from transformers.utils import logging; "
            "logging.get_logger('transformers.models.x').warning('library says hi'); "
            "warnings.warn_explicit('an old argument', FutureWarning, 'x.py', 1, module='diffusers.models.x')")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_VERBOSITY")}
    out = subprocess.run([sys.executable, "-c", code, "1" if verbose else "0"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert ("library says hi" in out.stderr) == verbose and ("an old argument" in out.stderr) == verbose


def test_help_is_readable(cli):
    listing = cli("--help").stdout
    assert "..." not in listing.split("Commands:")[1]  # descriptions are whole
    entries = re.findall(r"^  (\S+) +(.+(?:\n {4,}.+)*)", listing.split("Commands:")[1], flags=re.M)
    assert len(entries) >= 10
    for name, text in entries:  # each a whole sentence, not cut at the first line's end
        assert " ".join(text.split()).endswith("."), (name, text)
    for command, expected in (("run", "Usage: sdsctl run [OPTIONS] RECIPE\n"), ("compare", "RECIPE...\n"),
                              ("resume", "RUN_DIR\n")):
        text = cli(command, "--help").stdout
        assert expected in text and "{" not in text.split("Options:")[0], text
        assert not re.search(r"<(str|int|path|float|list)", text), text
    for command in ("run", "resume", "validate", "compare"):
        assert "-s, --set KEY=VALUE" in cli(command, "--help").stdout, command
    assert "mps" in cli("run", "--help").stdout and "mps" in cli("sample", "--help").stdout
