"""Schedules: HiFA's decreasing timestep, the warm-up schedule's phases, their validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdsctl.components import RunContext
from sdsctl.engine.recipe import load_recipe
from sdsctl.errors import RecipeError
from sdsctl_plugins.hifa_schedule import HiFASchedule
from sdsctl_plugins.uniform_schedule import UniformSchedule
from sdsctl_plugins.warmup_schedule import WarmupSchedule


def make_ctx(steps: int, seed: int = 0) -> RunContext:
    # A schedule needs only the step count and the generator.
    return RunContext(prior=None, recipe=None, device=torch.device("cpu"), dtype=torch.float32,
                      generator=torch.Generator().manual_seed(seed), steps=steps)


# ----------------------------------------------------------------------------- HiFA


@pytest.mark.parametrize("t_min, t_max, steps", [(20, 980, 100), (200, 800, 37), (0, 999, 1000)])
def test_hifa_follows_its_formula(t_min, t_max, steps):
    hifa = HiFASchedule(HiFASchedule.Config(t_min=t_min, t_max=t_max), make_ctx(steps))
    for step in (0, 1, 2, steps // 4, steps // 2, steps - 1):
        expected = t_max - (t_max - t_min) * math.sqrt(step / steps)
        times = hifa(step)
        assert times.t == round(expected), step
        assert times.phase == "main"
    assert hifa(0).t == t_max
    assert hifa(steps).t == t_min  # the formula's end point, one past the last step


def test_hifa_decreases():
    steps = 100
    hifa = HiFASchedule(HiFASchedule.Config(t_min=20, t_max=980), make_ctx(steps))
    ts = [hifa(k).t for k in range(steps)]
    assert all(a > b for a, b in zip(ts, ts[1:]))  # strictly: the steps here are > 1 timestep apart
    assert ts[0] == 980 and 20 <= ts[-1] < 120
    # front-loaded: sqrt makes the first half of the steps cover most of the range
    assert ts[steps // 2] < (980 + 20) / 2


def test_hifa_ignores_the_generator():
    a = HiFASchedule(HiFASchedule.Config(), make_ctx(50, seed=0))
    b = HiFASchedule(HiFASchedule.Config(), make_ctx(50, seed=1))
    assert [a(k).t for k in range(50)] == [b(k).t for k in range(50)]


def test_hifa_in_a_run(cli, recipe_file, tmp_path):
    out = tmp_path / "run"
    result = cli("run", recipe_file({"steps": 4, "schedule": {"name": "hifa", "t_min": 100, "t_max": 900}}),
                 "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    ts = [json.loads(x)["t"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ts == [round(900 - 800 * math.sqrt(k / 4)) for k in range(4)] == [900, 500, 334, 207]


# ----------------------------------------------------------------------------- warm-up


def test_warmup_phases_and_ranges():
    cfg = WarmupSchedule.Config(warmup_steps=40, warmup_t_min=600, warmup_t_max=603, t_min=20, t_max=23)
    schedule = WarmupSchedule(cfg, make_ctx(80))
    warm = [schedule(k) for k in range(40)]
    main = [schedule(k) for k in range(40, 80)]
    assert all(s.phase == "warmup" for s in warm) and all(s.phase == "main" for s in main)
    # both bounds are inclusive and every value is drawn
    assert {s.t for s in warm} == {600, 601, 602, 603}
    assert {s.t for s in main} == {20, 21, 22, 23}


def test_warmup_defaults_are_the_studys():
    cfg = WarmupSchedule.Config()
    assert (cfg.warmup_steps, cfg.warmup_t_min, cfg.warmup_t_max, cfg.t_min, cfg.t_max) == (300, 200, 980, 200, 980)
    schedule = WarmupSchedule(cfg, make_ctx(400))
    times = [schedule(k) for k in range(400)]
    assert [s.phase for s in times] == ["warmup"] * 300 + ["main"] * 100
    assert all(200 <= s.t <= 980 for s in times)


def test_warmup_zero_steps_is_main_only():
    schedule = WarmupSchedule(WarmupSchedule.Config(warmup_steps=0, t_min=50, t_max=60), make_ctx(10))
    assert all(schedule(k).phase == "main" and 50 <= schedule(k).t <= 60 for k in range(10))


def test_warmup_is_deterministic_per_seed():
    cfg = WarmupSchedule.Config(warmup_steps=5)
    a, b, c = (WarmupSchedule(cfg, make_ctx(10, seed=s)) for s in (3, 3, 4))
    ta, tb, tc = ([s(k).t for k in range(10)] for s in (a, b, c))
    assert ta == tb and ta != tc


def test_uniform_bounds_are_inclusive():
    schedule = UniformSchedule(UniformSchedule.Config(t_min=5, t_max=7), make_ctx(30))
    assert {schedule(k).t for k in range(30)} == {5, 6, 7}


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("schedule, key, message", [
    ({"name": "hifa", "t_min": 500, "t_max": 500}, "schedule.t_max", "must be greater than t_min (500)"),
    ({"name": "hifa", "t_min": 600, "t_max": 400}, "schedule.t_max", "must be greater than t_min (600)"),
    ({"name": "hifa", "t_max": 1000}, "schedule.t_max", "outside the model's timesteps 0..999"),
    ({"name": "warmup", "warmup_t_min": 900, "warmup_t_max": 900}, "schedule",
     "warmup_t_min (900) must be below warmup_t_max (900)"),
    ({"name": "warmup", "warmup_t_max": 1200}, "schedule.warmup_t_max", "outside the model's timesteps 0..999"),
    ({"name": "warmup", "t_min": 300, "t_max": 250}, "schedule.t_max", "must be greater than t_min (300)"),
    ({"name": "warmup", "warmup_steps": -1}, "schedule.warmup_steps", "greater than or equal to 0"),
    ({"name": "hifa", "t_mx": 900}, "schedule.t_mx", "did you mean 't_max'"),
])
def test_schedule_validation_errors(recipe_file, schedule, key, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe_file({"schedule": schedule}))
    text = str(err.value)
    assert key in text and message in text, text


def test_valid_schedules_load(recipe_file):
    r = load_recipe(recipe_file({"schedule": {"name": "warmup", "warmup_steps": 10, "t_min": 20}})).recipe
    assert (r.schedule.name, r.schedule.warmup_steps, r.schedule.t_min, r.schedule.t_max) == ("warmup", 10, 20, 980)
    r = load_recipe(recipe_file({"schedule": {"name": "hifa", "t_min": 20, "t_max": 999}})).recipe
    assert (r.schedule.name, r.schedule.t_max) == ("hifa", 999)


# ----------------------------------------------------------------------------- warm-up longer than the run


@pytest.mark.parametrize("steps, warned", [(150, True), (300, True), (301, False)])
def test_a_run_that_cannot_leave_its_warmup_is_warned_about(cli, recipe_file, steps, warned):
    path = recipe_file({"steps": steps, "schedule": {"name": "warmup", "warmup_steps": 300}})
    result = cli("validate", path)
    assert result.exit_code == 0
    said = f"steps ({steps}) <= schedule.warmup_steps (300): the run never leaves its warm-up" in result.stderr
    assert said == warned, result.stderr
    assert ("raise steps above 300" in result.stderr) == warned


def test_compare_warns_about_a_run_that_stays_in_its_warmup(cli, recipe_file, tmp_path):
    path = recipe_file({"steps": 2, "schedule": {"name": "warmup", "warmup_steps": 5}})
    result = cli("compare", path, "--prompt", "a red circle on a blue background", "--out", tmp_path / "c",
                 "--no-live")
    assert result.exit_code == 0, result.output
    assert "the run never leaves its warm-up" in result.stderr


# ----------------------------------------------------------------------------- anneal and linear


def test_anneal_reads_its_ramps_at_the_runs_progress():
    from sdsctl_plugins.anneal_schedules import AnnealSchedule

    config = AnnealSchedule.Config(t_min={"start": 500, "end": 20}, t_max={"start": 980, "end": 500, "until": 0.5})
    schedule = AnnealSchedule(config, make_ctx(100))
    assert schedule.range(0.0) == (500, 980) and schedule.range(0.5) == (260, 500) and schedule.range(1.0) == (20, 500)
    for k in range(100):
        times = schedule(k)
        lo, hi = schedule.range(k / 100)
        assert lo <= times.t <= hi and times.t_min == lo


def test_anneal_with_constant_ends_is_uniform_draw_for_draw():
    from sdsctl_plugins.anneal_schedules import AnnealSchedule

    anneal = AnnealSchedule(AnnealSchedule.Config(t_min=20, t_max=980), make_ctx(50))
    uniform = UniformSchedule(UniformSchedule.Config(t_min=20, t_max=980), make_ctx(50))
    assert [anneal(k).t for k in range(50)] == [uniform(k).t for k in range(50)]


def test_linear_is_threestudios_t_anneal():
    from sdsctl_plugins.anneal_schedules import LinearSchedule

    ctx = make_ctx(10)
    ctx.prior = type("P", (), {"num_train_timesteps": 1000})()
    schedule = LinearSchedule(LinearSchedule.Config(start=0.98, end=0.25), ctx)
    assert [schedule(k).t for k in range(10)] == [int(1000 * ((0.98 - 0.25) * (1 - k / 10) + 0.25)) for k in range(10)]
    assert schedule(0).t == 980 and schedule(5).t == 615


@pytest.mark.parametrize("schedule, key, message", [
    ({"name": "linear", "start": 0.25, "end": 0.98}, "schedule.end", "must not exceed start"),
    ({"name": "linear", "start": 1.2}, "schedule.start", "less than 1"),
    ({"name": "anneal", "t_min": {"start": 600, "end": 20}, "t_max": 500}, "schedule", "must not exceed t_max"),
    ({"name": "anneal", "t_max": {"start": 1200, "end": 500}}, "schedule.t_max", "outside the model's timesteps"),
    ({"name": "anneal", "t_max": {"start": 980, "end": 500, "begin": 0.6, "until": 0.4}}, "schedule.t_max",
     "must not come before begin"),
])
def test_anneal_and_linear_validation(recipe_file, schedule, key, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe_file({"schedule": schedule}))
    text = str(err.value)
    assert key in text and message in text, text
