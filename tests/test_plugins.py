"""Plugins: every hook, the registry, duplicates, loading rules, ``sdsctl plugins``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest
import typer

import sdsctl
from sdsctl import hookspecs, plugins
from sdsctl.cameras import Camera
from sdsctl.components import (
    Cameras,
    ComponentConfig,
    Guidance,
    Logger,
    Metric,
    Model,
    Parameterization,
    Schedule,
    StepTimes,
    Weighting,
)
from sdsctl.engine.recipe import load_recipe
from sdsctl.errors import PluginError, SdsctlError
from sdsctl_plugins.diffusers_model import DiffusersModel
from sdsctl_plugins.parameterizations.latent_pixels import LatentPixels
from sdsctl_plugins.sds import SDS
from sdsctl_plugins.uniform_schedule import UniformSchedule

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("register_"))
FIRST_PARTY = {
    "models": {"diffusers"},
    "parameterizations": {"latent-pixels"},
    "guidances": {"sds"},
    "schedules": {"uniform"},
    "weightings": {"one-minus-alpha-bar", "uniform", "fantasia3d", "sigma-over-alpha", "rfds"},
    "cameras": {"orbit"},
    "families": {"stable-diffusion", "sdxl", "deepfloyd-if", "sd3", "flux"},
}


def _config(name):
    return type("Config", (ComponentConfig,), {"__annotations__": {"name": str}, "name": name})


class AllHooks:
    """A test plugin implementing every hook once."""

    @sdsctl.hookimpl
    def register_models(self, register):
        register("test-model", type("TestModel", (DiffusersModel,), {"Config": _config("test-model")}))

    @sdsctl.hookimpl
    def register_families(self, register):
        from sdsctl.models.stable_diffusion import StableDiffusionPrior

        register("test-family", type("TestFamilyPrior", (StableDiffusionPrior,),
                                     {"family": "test-family", "pipeline_class": "TestFamilyPipeline"}))

    @sdsctl.hookimpl
    def register_parameterizations(self, register):
        register("test-param", type("TestParam", (LatentPixels,), {}))

    @sdsctl.hookimpl
    def register_guidances(self, register):
        register("test-guidance", type("TestGuidance", (SDS,), {}))

    @sdsctl.hookimpl
    def register_schedules(self, register):
        class Fixed(Schedule):
            Config = _config("test-fixed")

            def __call__(self, step):
                return StepTimes(t=500, phase="fixed")

        register("test-fixed", Fixed)

    @sdsctl.hookimpl
    def register_weightings(self, register):
        class Half(Weighting):
            Config = _config("test-half")

            def __call__(self, t):
                return 0.5

        register("test-half", Half)

    @sdsctl.hookimpl
    def register_metrics(self, register):
        class Size(Metric):
            Config = _config("test-size")

            def __call__(self, image, prompt):
                return {"height": image.shape[1]}

        register("test-size", Size)

    @sdsctl.hookimpl
    def register_cameras(self, register):
        class Still(Cameras):
            Config = _config("test-still")

            def sample(self, step):
                return Camera(azimuth=0, elevation=0, distance=2, fov=50)

            def evaluation(self):
                return [self.sample(0)]

        register("test-still", Still)

    @sdsctl.hookimpl
    def register_loggers(self, register):
        register("test-logger", type("TestLogger", (Logger,), {"Config": _config("test-logger")}))

    @sdsctl.hookimpl
    def register_recipes(self, register):
        pass  # test_a_plugin_ships_recipes_found_by_name registers real files

    @sdsctl.hookimpl
    def register_commands(self, app):
        @app.command("test-hello")
        def hello(name: str = "world"):
            """Say hello (a test command)."""
            if name == "error":
                raise SdsctlError("no such person")
            print(f"hello {name}")


@pytest.fixture
def all_hooks(register_plugin):
    register_plugin(AllHooks(), "test-all-hooks")


def test_the_test_plugin_implements_every_hook():
    assert HOOKS == sorted(n for n in dir(AllHooks) if n.startswith("register_"))
    assert HOOKS == sorted(n for n in vars(hookspecs) if n.startswith("register_"))


def test_first_party_plugins_come_from_entry_points():
    for kind, names in FIRST_PARTY.items():
        found = plugins.components(kind)
        assert names <= set(found)
        for name in names:
            assert found[name].distribution == "sdsctl"
    dist_names = {dist.project_name for _, dist in plugins.pm.list_plugin_distinfo()}
    assert "sdsctl" in dist_names


def test_every_component_hook_registers(all_hooks):
    expected = {"models": "test-model", "families": "test-family", "parameterizations": "test-param",
                "guidances": "test-guidance",
                "schedules": "test-fixed", "weightings": "test-half", "metrics": "test-size", "loggers": "test-logger"}
    for kind, name in expected.items():
        reg = plugins.components(kind)[name]
        assert (reg.plugin, reg.distribution) == ("test-all-hooks", None)


def test_a_family_from_a_plugin_is_detected_and_its_pipeline_class_is_unique(all_hooks, register_plugin, capsys):
    table = plugins.families()
    assert table["TestFamilyPipeline"].family == "test-family"
    assert table["StableDiffusionPipeline"].family == "stable-diffusion"

    class Claims:  # a second family for StableDiffusionPipeline: the first keeps it, with a warning
        @sdsctl.hookimpl
        def register_families(self, register):
            from sdsctl.models.stable_diffusion import StableDiffusionPrior

            register("sd-again", type("Again", (StableDiffusionPrior,), {"family": "sd-again"}))

    register_plugin(Claims(), "test-claims")
    assert plugins.families()["StableDiffusionPipeline"].family == "stable-diffusion"
    assert "family 'sd-again' of plugin 'test-claims' is ignored" in capsys.readouterr().err


def test_a_family_must_be_a_prior(register_plugin):
    class Wrong:
        @sdsctl.hookimpl
        def register_families(self, register):
            register("wrong", int)

    register_plugin(Wrong(), "test-wrong-family")
    with pytest.raises(PluginError, match="not a subclass of sdsctl.models.Prior"):
        plugins.components("families")


def test_unregistered_plugin_components_are_gone():
    plugins.pm.register(AllHooks(), name="test-temporary")
    try:
        assert "test-guidance" in plugins.components("guidances")
    finally:
        plugins.pm.unregister(name="test-temporary")
    assert "test-guidance" not in plugins.components("guidances")


def test_register_commands_adds_a_command(all_hooks, cli):
    result = cli("test-hello", "--name", "you")
    assert result.exit_code == 0 and result.stdout == "hello you\n"
    result = cli("test-hello", "--name", "error")
    assert result.exit_code == 2 and result.stderr == "error: no such person\n"


def test_plugin_components_run_in_a_recipe(all_hooks, cli, recipe_file, tmp_path):
    path = recipe_file({"schedule": "test-fixed", "weighting": "test-half", "guidance": "test-guidance",
                        "parameterization": "test-param", "steps": 2})
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["t"], r["phase"], r["weight"]) for r in records] == [(500, "fixed", 0.5)] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["test-size"] == {"height": 64}


def test_plugins_json_lists_every_kind(all_hooks, cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert list(listing) == ["models", "families", "parameterizations", "guidances", "schedules", "weightings",
                             "cameras", "metrics", "loggers", "commands"]
    assert {"tensorboard", "wandb"} <= {e["name"] for e in listing["loggers"]}
    for kind, names in FIRST_PARTY.items():
        assert names <= {e["name"] for e in listing[kind]}
    for entries in listing.values():
        for e in entries:
            assert {"name", "plugin", "distribution"} <= set(e)
    sds = next(e for e in listing["guidances"] if e["name"] == "sds")
    assert (sds["plugin"], sds["distribution"]) == ("sds", "sdsctl")
    assert {"name": "test-hello", "plugin": "test-all-hooks", "distribution": None} in listing["commands"]


def test_plugins_text_listing(cli):
    result = cli("plugins")
    assert result.exit_code == 0
    assert "guidances:" in result.stdout and "sds" in result.stdout and "plugin sds (sdsctl)" in result.stdout


class Again:
    """A second plugin registering 'sds' (taken by sdsctl's own) and a name of its own."""

    @sdsctl.hookimpl
    def register_guidances(self, register):
        register("sds", type("OtherSDS", (SDS,), {}))
        register("test-own", SDS)


def test_a_name_clash_is_reported_once_and_the_rest_keeps_working(register_plugin, cli, recipe_file, tmp_path):
    register_plugin(Again(), "test-duplicate")
    result = cli("validate", recipe_file({"guidance": {"name": "nfsd", "threshold": 1000}}))
    assert result.exit_code == 0, result.output  # the other components work
    warning = ("warning: guidance 'sds' is registered by 2 plugins: 'sds' (distribution sdsctl) and 'test-duplicate' "
               "(distribution not installed). Neither takes the name 'sds'; choose one in a recipe with "
               "`name: sds:sds` or `name: test-duplicate:sds`, or load one with SDSCTL_LOAD_PLUGINS")
    assert result.stderr.count(warning) == 1  # once, though the registry was asked several times
    found = plugins.components("guidances")
    assert "sds" not in found  # neither takes the bare name...
    assert found["sds:sds"].obj is SDS and found["test-duplicate:sds"].obj.__name__ == "OtherSDS"  # ...both stay usable
    assert {"nfsd", "robust-nfsd", "vsd", "test-own"} <= set(found)
    result = cli("validate", recipe_file())  # the default guidance is sds: ambiguous now
    assert result.exit_code == 2
    assert "guidance 'sds' is registered by several plugins; choose one: sds:sds, test-duplicate:sds" in result.stderr
    out = tmp_path / "run"
    result = cli("run", recipe_file({"guidance": "test-duplicate:sds", "steps": 2}), "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    assert "name: test-duplicate:sds" in (out / "recipe.yaml").read_text()


def test_a_clash_between_distributions_names_them(register_plugin, monkeypatch):
    register_plugin(Again(), "test-duplicate")
    real = plugins.distributions

    def with_other(manager):
        dists = real(manager)
        dists[id(manager.get_plugin("test-duplicate"))] = "sdsctl-other"
        return dists

    monkeypatch.setattr(plugins, "distributions", with_other)
    found = plugins.components("guidances")
    assert {"sdsctl:sds", "sdsctl-other:sds"} <= set(found)
    message = plugins.clash_message("guidances", "sds", [found["sdsctl:sds"], found["sdsctl-other:sds"]])
    assert "`name: sdsctl:sds` or `name: sdsctl-other:sds`, or remove one (`pip uninstall sdsctl-other`)" in message


def test_a_qualified_name_works_without_a_clash(recipe_file):
    loaded = load_recipe(recipe_file({"guidance": "sdsctl:sds"}))
    assert loaded.components["guidance"].obj is SDS and loaded.recipe.guidance.name == "sdsctl:sds"
    assert plugins.lookup("guidances", "sds:sds").obj is SDS  # the plugin's name works too
    assert plugins.lookup("guidances", "nope:sds") is None


def test_a_clashing_command_is_ignored_with_a_warning(register_plugin, cli, capsys):
    class Clash:
        @sdsctl.hookimpl
        def register_commands(self, app):
            @app.command("run")
            def run_again():
                print("the plugin's run")

            @app.command("test-other")
            def other():
                print("other")

    register_plugin(Clash(), "test-clash")
    result = cli("test-other")
    assert result.exit_code == 0 and result.stdout == "other\n"  # the plugin's other command works
    assert ("warning: command 'run' of plugin 'test-clash' (not installed) is ignored: the name is taken by "
            "'sdsctl'; uninstall one of them") in result.stderr + capsys.readouterr().err
    assert "the plugin's run" not in cli("run", "--help").output


@pytest.mark.parametrize("bad", [("sds", object), ("", SDS), ("x", int), ("a:b", SDS)])
def test_registering_something_that_is_not_a_component_fails(register_plugin, bad):
    class Bad:
        @sdsctl.hookimpl
        def register_guidances(self, register):
            register(*bad)

    register_plugin(Bad(), "test-bad")
    with pytest.raises(PluginError, match="test-bad"):
        plugins.components("guidances")


def test_a_crashing_hook_names_its_plugin(register_plugin):
    class Crash:
        @sdsctl.hookimpl
        def register_schedules(self, register):
            raise RuntimeError("oops")

    register_plugin(Crash(), "test-crash")
    with pytest.raises(PluginError, match="plugin 'test-crash' failed in register_schedules: RuntimeError: oops"):
        plugins.components("schedules")


def test_misspelled_hook_fails_check_pending():
    manager = pluggy.PluginManager("sdsctl")
    manager.add_hookspecs(hookspecs)

    class Typo:
        @sdsctl.hookimpl
        def register_guidance(self, register):  # missing "s"
            pass

    manager.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="register_guidance"):
        manager.check_pending()


def _fresh_manager():
    manager = pluggy.PluginManager("sdsctl")
    manager.add_hookspecs(hookspecs)
    return manager


def test_allow_list_loads_only_named_plugins():
    manager = _fresh_manager()
    plugins.load_entrypoints(manager, "sds, weightings")
    assert sorted(name for name, _ in manager.list_name_plugin()) == ["sds", "weightings"]
    manager = _fresh_manager()
    plugins.load_entrypoints(manager, "")
    assert manager.get_plugins() == set()
    manager = _fresh_manager()
    plugins.load_entrypoints(manager, None)
    assert {"sds", "latent_pixels", "diffusers_model", "uniform_schedule", "weightings"} <= {
        name for name, _ in manager.list_name_plugin()}


def test_allow_list_with_unknown_name_is_an_input_error():
    with pytest.raises(SdsctlError, match="'nope'.*installed: .*sds"):
        plugins.load_entrypoints(_fresh_manager(), "sds,nope")


def test_allow_list_in_a_real_process(tmp_path):
    env = {**__import__("os").environ, "SDSCTL_LOAD_PLUGINS": "sds"}
    script = "from sdsctl.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", script, "plugins", "--json"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert [e["name"] for e in listing["guidances"]] == ["sds"] and listing["models"] == []


def test_trace_prints_hook_calls(capsys):
    manager = _fresh_manager()
    plugins.load_entrypoints(manager, "sds")
    plugins.trace(manager)
    manager.hook.register_guidances(register=lambda name, cls: None)
    err = capsys.readouterr().err
    assert "[sdsctl trace] register_guidances(register) -> plugins: sds" in err


def test_no_bare_plugins_package_is_installed():
    import importlib.util

    import sdsctl_plugins

    assert Path(sdsctl_plugins.__file__).parent.name == "plugins"
    spec = importlib.util.find_spec("plugins")
    # Only the source checkout's own folder may be importable as "plugins" (when the current
    # directory is the repository root); nothing of that name is installed.
    assert spec is None or Path(spec.origin).parent == Path(sdsctl_plugins.__file__).parent


def test_hookimpl_is_importable_from_the_package_root():
    assert sdsctl.hookimpl is hookspecs.hookimpl
    assert isinstance(sdsctl.__version__, str) and sdsctl.__version__


def test_base_classes_are_exported():
    for cls in (Model, Parameterization, Guidance, Schedule, Weighting, Metric, Logger):
        assert issubclass(cls.Config, ComponentConfig)
    assert UniformSchedule.Config().t_min == 20


def test_typer_not_click_is_handed_to_plugins(register_plugin):
    from sdsctl.cli import create_app

    seen = []

    class Spy:
        @sdsctl.hookimpl
        def register_commands(self, app):
            seen.append(app)

    register_plugin(Spy(), "test-spy")
    create_app()
    assert len(seen) == 1 and isinstance(seen[0], typer.Typer)


def test_a_plugin_ships_recipes_found_by_name(register_plugin, cli, tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my SDS, shorter\nextends: sds\nsteps: 2\n")
    clash = tmp_path / "sds.yaml"
    clash.write_text("# another sds\nextends: sds\nsteps: 1\n")

    class Ships:
        @sdsctl.hookimpl
        def register_recipes(self, register):
            register("my-sds", mine)
            register("sds", clash)  # taken by sdsctl's own: ignored, with a warning

    register_plugin(Ships(), "test-ships")
    listing = cli("recipes")
    assert listing.exit_code == 0
    (line,) = [x for x in listing.stdout.splitlines() if x.startswith("my-sds ")]
    assert "my SDS, shorter" in line and str(mine) in line
    assert "recipe 'sds' of plugin 'test-ships' is ignored" in listing.stderr + capsys.readouterr().err
    out = tmp_path / "run"
    result = cli("run", "my-sds", "--out", out, "--no-live")
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert cli("validate", "sds").stdout.startswith("ok: sds -- sds on latent-pixels, 500 steps")


def test_a_recipe_registered_with_a_missing_file_names_the_plugin(register_plugin, cli, tmp_path):
    class Broken:
        @sdsctl.hookimpl
        def register_recipes(self, register):
            register("gone", tmp_path / "gone.yaml")

    register_plugin(Broken(), "test-broken-recipes")
    result = cli("recipes")
    assert result.exit_code == 1 and "plugin 'test-broken-recipes' registered recipe 'gone'" in result.stderr
    assert "Traceback" not in result.output
