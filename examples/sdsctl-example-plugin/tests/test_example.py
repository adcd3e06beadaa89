"""The example plugin's own tests: how a plugin tests itself against an installed sdsctl.

Components are looked up through sdsctl's registry (so the entry point is exercised), their
formulas checked on fixed inputs, and a short run goes through ``sdsctl.cli`` with
``typer.testing.CliRunner``.
"""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from sdsctl import plugins
from sdsctl.cli import create_app
from sdsctl_example_plugin import BrightnessContrast, LinearDecay, SDSRescaled


def test_the_family_is_registered_and_loads_a_tiny_pipeline(tmp_path):
    from sdsctl.models import Prior
    from sdsctl_example_plugin.family import ExamplePrior, build_tiny

    reg = plugins.lookup("families", "example-tiny")
    assert reg.obj is ExamplePrior and reg.distribution == "sdsctl-example-plugin"
    assert plugins.families()["ExamplePipeline"] is ExamplePrior
    prior = Prior.load(str(build_tiny(tmp_path / "tiny")), torch.device("cpu"), torch.float32,
                       families=plugins.families())
    assert isinstance(prior, ExamplePrior) and prior.latent_shape() == (1, 4, 8, 8)
    z = torch.randn(prior.latent_shape(), generator=torch.Generator().manual_seed(0))
    eps = prior.predict_noise(prior.add_noise(z, torch.zeros_like(z), 500), 500, prior.encode_prompts(["a red circle"]))
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def test_the_components_are_registered_by_this_distribution():
    for kind, name, cls in (("guidances", "sds-rescaled", SDSRescaled), ("schedules", "linear-decay", LinearDecay),
                            ("metrics", "brightness-contrast", BrightnessContrast)):
        reg = plugins.lookup(kind, name)
        assert reg.obj is cls and reg.distribution == "sdsctl-example-plugin"


def test_linear_decay_goes_from_t_max_to_t_min():
    class Ctx:
        steps = 5

    schedule = LinearDecay(LinearDecay.Config(t_min=100, t_max=900), Ctx())
    assert [schedule(k).t for k in range(5)] == [900, 700, 500, 300, 100]


def test_image_stats():
    image = torch.zeros(3, 4, 4)
    image[:, :2] = 1.0
    stats = BrightnessContrast(BrightnessContrast.Config(), None)(image, "a prompt")
    assert stats["brightness"] == 0.5 and abs(stats["contrast"] - 0.5164) < 1e-3


def test_a_short_run_uses_all_three(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("extends: sds\nsteps: 3\ndevice: cpu\nguidance: sds-rescaled\n"
                      "schedule: {name: linear-decay, t_min: 100, t_max: 900}\n")
    result = CliRunner().invoke(create_app(), ["run", str(recipe), "--out", str(tmp_path / "run"), "--no-live"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["t"] for r in records] == [900, 500, 100]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["metrics"]["brightness-contrast"]) == {"brightness", "contrast"}
