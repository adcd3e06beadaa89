"""Recipes: merging (extends, --set, shortcuts), validation, and the table of bad inputs."""

from __future__ import annotations

import pytest
import torch
import yaml

from sdsctl.engine.recipe import bundled_recipes, find_recipe, load_recipe, parse_set, to_yaml
from sdsctl.errors import RecipeError, SdsctlError
from sdsctl.models import Prior, sources

GOOD = """\
model: {model}
prompt: a red circle on a blue background
steps: 6
guidance:
  name: sds
  guidance_scale: 50
schedule: {{name: uniform, t_min: 20, t_max: 980}}
device: cpu
"""

# (id, recipe text or None for the GOOD one, extra CLI arguments, expected message parts)
BAD = [
    ("malformed-yaml", "prompt: [a red circle\nsteps: 3\n", [], ["malformed YAML", "recipe.yaml:2:6"]),
    ("not-a-mapping", "- a\n- b\n", [], ["a recipe is a mapping", "recipe.yaml:1:1"]),
    ("empty-file", "", [], ["the recipe is empty"]),
    ("duplicate-key", "prompt: a\nprompt: b\n", [], ["duplicate key", "recipe.yaml:2:1", "line 1"]),
    ("unknown-top-key", "promt: a red circle\n", [],
     ["promt", "unknown key (did you mean 'prompt'?)", "recipe.yaml:1:1"]),
    ("unknown-component-key", "prompt: x\nguidance:\n  name: sds\n  guidance_scal: 50\n", [],
     ["guidance.guidance_scal", "did you mean 'guidance_scale'?", "recipe.yaml:4:3"]),
    ("unknown-optimizer-key", "prompt: x\noptimizer: {lrr: 0.1}\n", [], ["optimizer.lrr", "did you mean 'lr'?"]),
    ("steps-not-int", "prompt: x\nsteps: many\n", [], ["steps", "valid integer", "'many'", "recipe.yaml:2:8"]),
    ("prompt-not-string", "prompt: 123\n", [], ["prompt", "valid string"]),
    ("steps-zero", "prompt: x\nsteps: 0\n", [], ["steps", "greater than 0"]),
    ("steps-negative", "prompt: x\nsteps: -5\n", [], ["steps", "greater than 0"]),
    ("lr-zero", "prompt: x\noptimizer: {lr: 0}\n", [], ["optimizer.lr", "greater than 0"]),
    ("lr-negative", "prompt: x\noptimizer: {lr: -0.01}\n", [], ["optimizer.lr", "greater than 0"]),
    ("betas-out-of-range", "prompt: x\noptimizer: {betas: [0.9, 1.5]}\n", [], ["optimizer.betas", "[0, 1)"]),
    ("inner-steps-zero", "prompt: x\noptimizer: {inner_steps: 0}\n", [],
     ["optimizer.inner_steps", "greater than or equal to 1"]),
    ("preview-every-zero", "prompt: x\noutput: {preview_every: 0}\n", [], ["output.preview_every"]),
    ("t-min-above-t-max", "prompt: x\nschedule: {name: uniform, t_min: 500, t_max: 400}\n", [],
     ["schedule.t_max", "must be greater than t_min (500)"]),
    ("t-max-outside-model", "prompt: x\nschedule: {name: uniform, t_max: 1000}\n", [],
     ["schedule.t_max", "outside the model's timesteps 0..999"]),
    ("t-min-negative", "prompt: x\nschedule: {name: uniform, t_min: -1}\n", [],
     ["schedule.t_min", "greater than or equal to 0"]),
    ("resolution-vae-factor", "prompt: x\nparameterization: {name: latent-pixels, resolution: 60}\n", [],
     ["parameterization.resolution", "not divisible by the VAE's factor 8"]),
    ("resolution-unet-factor", "prompt: x\nparameterization: {name: latent-pixels, resolution: 72}\n", [],
     ["parameterization.resolution", "multiple of 16"]),
    ("unknown-guidance", "prompt: x\nguidance: sdss\n", [],
     ["unknown guidance 'sdss' (did you mean 'sds'?)", "installed guidances: ", "sds"]),
    ("unknown-parameterization", "prompt: x\nparameterization: {name: voxels}\n", [],
     ["unknown parameterization 'voxels'", "installed parameterizations: ", "latent-pixels"]),
    ("unknown-weighting", "prompt: x\nweighting: {name: sigma}\n", [],
     ["unknown weighting 'sigma'", "one-minus-alpha-bar"]),
    ("component-not-mapping", "prompt: x\nguidance: [1, 2]\n", [],
     ["guidance", "expected a component name or a mapping"]),
    ("empty-prompt", "prompt: ''\n", [], ["prompt", "the prompt is empty"]),
    ("blank-prompt", "prompt: '   '\n", [], ["the prompt is empty"]),
    ("missing-prompt", "steps: 3\n", [], ["prompt: missing"]),
    ("bad-device", "prompt: x\ndevice: gpu\n", [], ["device", "expected auto, cpu, cuda, cuda:N or mps"]),
    ("absent-device", "prompt: x\ndevice: 'cuda:99'\n", [],
     ["recipe.yaml:2:9: device: cuda:99 is not available", "devices here: cpu"]),
    ("absent-device-option", None, ["--device", "cuda:99"], ["--device: cuda:99 is not available", "devices here: "]),
    ("bad-dtype", "prompt: x\ndtype: float64\n", [], ["dtype", "float32"]),
    ("negative-seed", "prompt: x\nseed: -1\n", [], ["seed", "greater than or equal to 0"]),
    ("missing-extends", "extends: nowhere.yaml\nprompt: x\n", [],
     ["extends", "nowhere.yaml not found", "recipe.yaml:1:1"]),
    ("extends-cycle", "extends: recipe.yaml\nprompt: x\n", [], ["extends cycle"]),
    ("missing-model-folder", None, ["--model", "/nonexistent/sd"], ["--model: model folder /nonexistent/sd not found"]),
    ("bad-set-expression", None, ["--set", "steps"], ["bad --set expression", "KEY=VALUE"]),
    ("bad-set-key", None, ["--set", "=3"], ["bad --set expression"]),
    ("set-extends", None, ["--set", "extends=other.yaml"],
     ["--set extends=other.yaml", "only a recipe file can extend"]),
    ("bad-set-yaml", None, ["--set", "prompt=[unclosed"], ["bad --set expression", "not valid YAML"]),
    ("set-unknown-key", None, ["--set", "guidance.guidance_scal=3"],
     ["--set guidance.guidance_scal=3", "did you mean 'guidance_scale'?"]),
    ("set-wrong-type", None, ["--set", "steps=lots"], ["--set steps=lots", "steps", "valid integer"]),
    ("shortcut-out-of-range", None, ["--steps", "0"], ["--steps", "greater than 0"]),
    ("cli-option-type", None, ["--seed", "abc"], ["Invalid value for '--seed'"]),
    ("missing-recipe-file", "__missing__", [], ["recipe file", "missing.yaml not found"]),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """All validation happens before any model loads: loading fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(Prior, "load", classmethod(forbidden))


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exits_2_with_message(case, cli, tmp_path, tiny_prior, no_model_load):
    name, text, args, expected = case
    path = tmp_path / "recipe.yaml"
    if text == "__missing__":
        ref = str(tmp_path / "missing.yaml")
    else:
        path.write_text(GOOD.format(model=tiny_prior) if text is None else text)
        ref = str(path)
        if text is not None and "model:" not in text:
            args = ["--model", str(tiny_prior), *args]
    out = tmp_path / "run"
    result = cli("run", ref, "--out", out, "--no-live", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for part in expected:
        assert part in result.stderr, f"{part!r} not in:\n{result.stderr}"
    assert not out.exists()


def test_table_has_at_least_25_cases():
    assert len(BAD) >= 25


def test_bad_recipe_writes_nothing_into_an_existing_run(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    assert cli("run", recipe_file(), "--out", out, "--no-live").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    bad = recipe_file({"steps": 0}, name="bad.yaml")
    result = cli("run", bad, "--out", out, "--overwrite", "--no-live")
    assert result.exit_code == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_several_problems_are_reported_together(cli, recipe_file):
    path = recipe_file({"steps": 0, "optimizer": {"lr": -1}, "guidance": {"name": "sds", "scale": 3}})
    result = cli("validate", path)
    assert result.exit_code == 2
    for key in ("steps", "optimizer.lr", "guidance.scale"):
        assert key in result.stderr


def test_unknown_words_warn_but_pass(cli, recipe_file):
    result = cli("validate", recipe_file({"prompt": "a red unicorn on a blue background"}))
    assert result.exit_code == 0, result.output
    assert "warning: prompt:" in result.stderr and "'unicorn'" in result.stderr


def test_extends_merges_and_a_new_component_name_replaces_the_section(recipe_file, tiny_prior):
    recipe_file({"guidance": {"name": "sds", "guidance_scale": 7.5}, "seed": 4,
                 "weighting": {"name": "fantasia3d"}}, name="parent.yaml")
    child = recipe_file({"extends": "parent.yaml", "steps": 9, "weighting": {"name": "uniform"},
                         "guidance": {"guidance_scale": 30}}, name="child.yaml", base=False)
    r = load_recipe(child).recipe
    assert (r.steps, r.seed, r.guidance.guidance_scale, r.weighting.name) == (9, 4, 30, "uniform")
    assert r.model.path == str(tiny_prior)


def test_child_section_with_other_name_drops_parent_options(recipe_file, register_plugin):
    import sdsctl
    from sdsctl.components import ComponentConfig
    from sdsctl_plugins.sds import SDS

    class Other(SDS):
        class Config(ComponentConfig):
            name: str = "other"
            strength: float = 1.0

    class Plugin:
        @sdsctl.hookimpl
        def register_guidances(self, register):
            register("other", Other)

    register_plugin(Plugin(), "test-other-guidance")
    recipe_file({"guidance": {"name": "sds", "guidance_scale": 7.5}}, name="parent.yaml")
    child = recipe_file({"extends": "parent.yaml", "guidance": {"name": "other", "strength": 2}},
                        name="child.yaml", base=False)
    g = load_recipe(child).recipe.guidance
    assert g.name == "other" and g.strength == 2 and not hasattr(g, "guidance_scale")


def test_set_overrides_are_yaml_typed_and_applied_last(recipe_file):
    path = recipe_file({"seed": 1})
    loaded = load_recipe(path, ["seed=3", "prompt=a green square on a white background",
                                "guidance.guidance_scale=12.5", "negative_prompt="],
                         {"steps": 4, "seed": None})
    r = loaded.recipe
    assert (r.seed, r.steps, r.guidance.guidance_scale, r.negative_prompt) == (3, 4, 12.5, "")
    assert r.prompt == "a green square on a white background"


def test_set_can_switch_component_then_set_its_options(recipe_file):
    r = load_recipe(recipe_file(), ["weighting=fantasia3d", "schedule.t_min=100"]).recipe
    assert r.weighting.name == "fantasia3d" and r.schedule.t_min == 100 and r.schedule.t_max == 980


def test_parse_set_rejects_malformed():
    with pytest.raises(RecipeError, match="bad --set"):
        parse_set("a..b=1")
    assert parse_set("a.b=[1, 2]").data == {"a": {"b": [1, 2]}}


def test_model_string_shorthand(recipe_file, tiny_prior):
    r = load_recipe(recipe_file()).recipe
    assert r.model.name == "diffusers" and r.model.path == str(tiny_prior)


def test_resolved_recipe_round_trips(recipe_file, tmp_path):
    r = load_recipe(recipe_file({"seed": 5})).recipe
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(r))
    assert load_recipe(again).recipe == r
    data = yaml.safe_load(to_yaml(r))
    assert data["guidance"] == {"name": "sds", "guidance_scale": 100.0}
    assert data["optimizer"]["inner_steps"] == 1


def test_bundled_recipes_have_descriptions_and_validate(tiny_prior):
    found = bundled_recipes()
    assert "sds" in [name for name, _, _ in found]
    for name, path, desc in found:
        assert desc, f"{path} has no description comment"
        assert find_recipe(name) == path
        load_recipe(name, overrides={"model": str(tiny_prior)})


def test_sds_recipe_is_the_study_setting(tiny_prior):
    r = load_recipe("sds", overrides={"model": str(tiny_prior)}).recipe
    assert r.prompt == "a red circle on a blue background" and r.steps == 500
    assert r.parameterization.name == "latent-pixels" and r.parameterization.init == "gaussian"
    assert r.guidance.name == "sds" and r.guidance.guidance_scale == 100
    assert (r.schedule.name, r.schedule.t_min, r.schedule.t_max) == ("uniform", 20, 980)
    assert r.weighting.name == "one-minus-alpha-bar"
    assert (r.optimizer.name, r.optimizer.lr) == ("adam", 0.01)


def test_shapes_model_missing_is_a_clear_error(monkeypatch, recipe_file, tmp_path):
    monkeypatch.setattr(sources, "SHAPES_PRIOR", tmp_path / "absent")
    with pytest.raises(RecipeError, match="the shapes prior is not installed"):
        load_recipe(recipe_file({"model": "shapes"}))


def test_hub_model_offline_names_the_id_and_the_fix(monkeypatch, recipe_file):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SdsctlError) as err:
        load_recipe(recipe_file({"model": "someone/some-model"}))
    message = str(err.value)
    assert "'someone/some-model'" in message and "--local-dir DIR" in message and "--model DIR" in message


def test_cuda_requested_without_cuda_is_input_error(cli, recipe_file, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("run", recipe_file({"device": "cuda"}), "--out", tmp_path / "r", "--no-live")
    assert result.exit_code == 2 and "no CUDA device" in result.stderr
    assert not (tmp_path / "r").exists()


def test_cuisine_recipes_encode_the_studys_settings(tiny_prior):
    """Recipe names and their defaults are contracts (issue 4)."""
    load = lambda name: load_recipe(name, overrides={"model": str(tiny_prior)}).recipe  # noqa: E731
    epl, ehl = load("robust_nfsd"), load("robust_nfsd_ehl")
    ehc, study = load("robust_nfsd_ehc"), load("robust_nfsd_ehc_latent")
    assert epl.steps == 600 and epl.guidance.name == "robust-nfsd" and epl.guidance.ratio == 2.0
    assert (epl.schedule.name, epl.schedule.warmup_steps, epl.schedule.warmup_t_min,
            epl.schedule.warmup_t_max) == ("warmup", 300, 200, 980)
    assert epl.optimizer.lr == 0.01 and epl.parameterization.name == "latent-pixels"
    assert ehl.parameterization.name == "latent-hashgrid" and ehl.optimizer.lr == 0.003
    assert ehc.parameterization.name == "rgb-hashgrid" and ehc.optimizer.lr == 0.003
    assert (ehc.optimizer.fit_space, ehc.optimizer.image_target, ehc.optimizer.image_weight) == ("both", "hifa", 0.1)
    assert load("robust_nfsd_ehc_decoded").optimizer.image_target == "decoded-target"
    assert study.optimizer.fit_space == "latent" and study.parameterization == ehc.parameterization
    assert epl.guidance.warmup_correction_scale == 1.0  # the study's warm-up is NFSD, its correction included
    assert load("robust_nfsd_classifier_warmup").guidance.warmup_correction_scale == 0.0
    hifa = load("nfsd_hifa")  # cuisine 1: "fully optimize theta to match the score"
    assert hifa.steps == 1000 and hifa.schedule.name == "hifa" and hifa.guidance.name == "nfsd"
    assert (hifa.optimizer.fit, hifa.guidance.correction_scale) == ("full", 0.1)
    assert all(load(n).optimizer.fit == "full" for n in ("nfsd_hifa_ehl", "nfsd_hifa_ehc", "nfsd_hifa_fast"))
    fast = load("nfsd_hifa_fast")  # "amplify the NFSD score" to need fewer iterations
    assert (fast.steps, fast.optimizer.score_scale) == (250, 4.0)
    for name in ("nfsd", "nfsd_hifa", "robust_nfsd"):
        assert load(name).negative_prompt.startswith("unrealistic, blurry")


def test_missing_recipe_path_outside_the_repository_points_to_the_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SdsctlError) as info:
        find_recipe("recipes/sds.yaml")
    message = str(info.value)
    assert "not found here" in message and "give it as sds" in message
    assert find_recipe("sds").name == "sds.yaml"


@pytest.mark.parametrize("expr, hint", [
    ("guidance_scale=30", "did you mean 'guidance.guidance_scale'?"),
    ("lr=0.1", "did you mean 'optimizer.lr'?"),
    ("t_max=900", "did you mean 'schedule.t_max'?"),
    ("stepz=3", "did you mean 'steps'?"),
])
def test_an_option_set_at_the_top_level_names_its_section(cli, expr, hint):
    result = cli("validate", "sds", "--set", expr)
    assert result.exit_code == 2 and hint in result.stderr and "Traceback" not in result.stderr


def test_extends_a_misspelled_recipe_suggests_the_name(recipe_file, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: sdss\nsteps: 10\n")
    with pytest.raises(RecipeError, match="extends: sdss not found .*; did you mean sds\\?"):
        load_recipe(path)
