"""The command line: ``create_app()`` builds the Typer app, ``main()`` runs it.

Exit codes: 0 success, 2 bad input (recipe, option, missing file), 1 failure while running,
130 interrupted. Errors of the project's own type are printed as one message on stderr,
without a traceback (``SDSCTL_DEBUG=1`` shows it). Plugins add commands through the
``register_commands(app)`` hook.
"""

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

import sdsctl

from . import plugins
from .errors import PluginError, RunFailed, SdsctlError

CORE_COMMANDS = ("run", "resume", "validate", "recipes", "plugins")
KIND_ORDER = ("models", "parameterizations", "guidances", "schedules", "weightings", "metrics", "loggers", "commands")


def _print_error(exc: SdsctlError) -> None:
    if os.environ.get("SDSCTL_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    lines = str(exc).splitlines() or [type(exc).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"error: {line}" if not line.startswith(" ") else line, file=sys.stderr)


def _guard(fn):
    """Wrap a command so that an SdsctlError becomes a message and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdsctlError as exc:
            _print_error(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _guard_all(app: typer.Typer) -> None:
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_sdsctl_guarded", False):
            info.callback = _guard(info.callback)
            info.callback._sdsctl_guarded = True
    for group in app.registered_groups:
        if group.typer_instance is not None:
            _guard_all(group.typer_instance)


def _command_name(info) -> str:
    if info.name:
        return info.name
    return info.callback.__name__.lower().replace("_", "-")


def _group_name(info) -> str:
    return info.name or (info.typer_instance.info.name if info.typer_instance else None) or "?"


def _first_line(cls) -> str:
    """A component's one-line description: its class docstring, else its module's."""
    doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


# ----------------------------------------------------------------------------- completion

def _complete_recipe(incomplete: str) -> list[str]:
    from .recipe import bundled_recipes

    names = [name for name, _, _ in bundled_recipes() if name.startswith(incomplete)]
    try:
        files = [str(p) for p in Path(".").glob(f"{incomplete}*") if p.suffix in (".yaml", ".yml") or p.is_dir()]
    except (NotImplementedError, ValueError, OSError):  # absolute or odd patterns
        files = []
    return names + sorted(files)


# ----------------------------------------------------------------------------- commands

SetOption = Annotated[list[str], typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a recipe value (YAML-typed), e.g. --set guidance.guidance_scale=50. Repeatable.")]
PromptOption = Annotated[str | None, typer.Option(help="Shortcut for --set prompt=...")]
SeedOption = Annotated[int | None, typer.Option(help="Shortcut for --set seed=...")]
StepsOption = Annotated[int | None, typer.Option(help="Shortcut for --set steps=...")]
ModelOption = Annotated[str | None, typer.Option(
    help="Model: 'shapes', a diffusers folder or a hub id (shortcut for --set model=...)")]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (shortcut for --set device=...)")]
AllowDownloadOption = Annotated[bool, typer.Option(
    "--allow-download", help="Download a hub model missing from the local cache (shortcut for --set model.allow_download=true).")]
LogOption = Annotated[list[str], typer.Option(
    "--log", metavar="LOGGER",
    help="Also send the run to a logger: tensorboard, wandb (offline), or a plugin's (see `sdsctl plugins`). Repeatable.")]
RecipeArgument = Annotated[str, typer.Argument(
    metavar="RECIPE", help="A recipe file, or the name of a bundled recipe (see `sdsctl recipes`).",
    autocompletion=_complete_recipe)]


def _overrides(prompt, seed, steps, model, device) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "steps": steps, "model": model, "device": device}


def _sets(sets: list[str], allow_download: bool) -> list[str]:
    return [*sets, "model.allow_download=true"] if allow_download else list(sets)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _run(loaded, path: Path, live: bool, overwrite: bool, resume: bool, log: list[str] = ()) -> None:
    from .loggers import RunLoggers, build
    from .loop import OOM, execute, oom_message
    from .panel import make_reporter

    loggers, skipped = build(list(log), path, loaded.recipe)
    _warn(skipped)
    reporter = RunLoggers(make_reporter(live, loaded.recipe.output.preview_every), loggers)
    try:
        result = execute(loaded, path, reporter, overwrite=overwrite, resume=resume)
    except OOM:
        raise RunFailed(oom_message(None, loaded.recipe.device)) from None
    except KeyboardInterrupt:  # while the model loaded: nothing was written
        print("interrupted before the first step; nothing written", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        reporter.finish(path)
    if result.status == "interrupted":
        print(f"interrupted at step {result.steps_done}/{result.steps}; state saved in {path}. "
              f"Continue with: sdsctl resume {path}", file=sys.stderr)
        raise typer.Exit(130)
    print(f"done: {result.steps_done} steps -> {path / 'final.png'}")


def _version_callback(value: bool) -> None:
    if value:
        print(f"sdsctl {sdsctl.__version__}")
        raise typer.Exit()


def create_app() -> typer.Typer:
    """The sdsctl CLI with the core commands and every plugin's commands."""
    app = typer.Typer(
        name="sdsctl",
        help="Score distillation (SDS, NFSD, VSD, ...) from recipes: run, resume, validate.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    plugin_commands: list[plugins.Registered] = []

    @app.callback()
    def root(
        version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                              help="Show the version and exit.")] = False,
    ) -> None:
        """Score distillation from the command line."""

    @app.command()
    def run(
        recipe: RecipeArgument,
        set_: SetOption = [],  # noqa: B006 - typer reads the default
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: <output.dir>/<recipe>-<timestamp>).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run files in an existing --out directory.")] = False,
        no_live: Annotated[bool, typer.Option("--no-live", help="Plain log lines instead of the live panel.")] = False,
        prompt: PromptOption = None,
        seed: SeedOption = None,
        steps: StepsOption = None,
        model: ModelOption = None,
        device: DeviceOption = None,
        allow_download: AllowDownloadOption = False,
        log: LogOption = [],  # noqa: B006
    ) -> None:
        """Run a recipe: optimize an image and write a run directory."""
        from .recipe import load_recipe
        from .rundir import check_target, default_path

        loaded = load_recipe(recipe, _sets(set_, allow_download), _overrides(prompt, seed, steps, model, device))
        _warn(loaded.warnings)
        path = out if out is not None else default_path(loaded.recipe.output.dir, loaded.name)
        check_target(path, overwrite)
        _run(loaded, path, live=not no_live, overwrite=overwrite, resume=False, log=log)

    @app.command()
    def resume(
        run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The directory of an interrupted or failed run.")],
        no_live: Annotated[bool, typer.Option("--no-live", help="Plain log lines instead of the live panel.")] = False,
        log: LogOption = [],  # noqa: B006
    ) -> None:
        """Continue an interrupted run to its end (on the CPU: bit-identical to an uninterrupted run)."""
        from .recipe import load_recipe
        from .rundir import RunDir

        RunDir.open(run_dir)
        loaded = load_recipe(run_dir / "recipe.yaml")
        _warn(loaded.warnings)
        _run(loaded, run_dir, live=not no_live, overwrite=False, resume=True, log=log)

    @app.command()
    def validate(
        recipe: RecipeArgument,
        set_: SetOption = [],  # noqa: B006
        prompt: PromptOption = None,
        seed: SeedOption = None,
        steps: StepsOption = None,
        model: ModelOption = None,
        device: DeviceOption = None,
        show: Annotated[bool, typer.Option("--show", help="Print the fully resolved recipe.")] = False,
        allow_download: AllowDownloadOption = False,
    ) -> None:
        """Check a recipe without running it (no model weights are loaded)."""
        from .recipe import load_recipe, to_yaml

        loaded = load_recipe(recipe, _sets(set_, allow_download), _overrides(prompt, seed, steps, model, device))
        _warn(loaded.warnings)
        r = loaded.recipe
        if show:
            print(to_yaml(r), end="")
        print(f"ok: {recipe} -- {r.guidance.name} on {r.parameterization.name}, {r.steps} steps, "
              f"model {loaded.model_info.source}")

    @app.command()
    def recipes() -> None:
        """List the bundled recipes (run one by name: `sdsctl run NAME`)."""
        from .recipe import bundled_recipes

        found = bundled_recipes()
        width = max((len(n) for n, _, _ in found), default=0)
        for name, _, desc in found:
            print(f"{name:<{width}}  {desc}")

    @app.command("plugins")
    def list_plugins(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON: an object keyed by kind.")] = False,
    ) -> None:
        """List every registered component by kind, with its plugin and distribution."""
        from .components import KINDS

        listing: dict[str, list[dict[str, Any]]] = {}
        for kind in KINDS:
            listing[kind] = [
                {"name": r.name, "plugin": r.plugin, "distribution": r.distribution,
                 "class": f"{r.obj.__module__}.{r.obj.__qualname__}", "description": _first_line(r.obj)}
                for r in sorted(plugins.components(kind).values(), key=lambda r: r.name)
            ]
        listing["commands"] = [
            {"name": r.name, "plugin": r.plugin, "distribution": r.distribution}
            for r in sorted(plugin_commands, key=lambda r: r.name)
        ]
        listing = {k: listing[k] for k in KIND_ORDER}
        if as_json:
            print(json.dumps(listing, indent=2))
            return
        for kind, entries in listing.items():
            print(f"{kind}:")
            for e in entries:
                print(f"  {e['name']:<22} plugin {e['plugin']} ({e['distribution'] or 'not installed'})")
            if not entries:
                print("  (none)")

    # -- plugin commands
    plugins.load_plugins()
    owners = {name: "sdsctl" for name in CORE_COMMANDS}
    for plugin, dist, call in plugins.each_plugin("register_commands"):
        n_cmds, n_groups = len(app.registered_commands), len(app.registered_groups)
        try:
            call(app=app)
        except SdsctlError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} failed in register_commands: {type(exc).__name__}: {exc}") from exc
        added = [(_command_name(i), app.registered_commands, i) for i in app.registered_commands[n_cmds:]]
        added += [(_group_name(g), app.registered_groups, g) for g in app.registered_groups[n_groups:]]
        for name, registry, info in added:
            if name in owners:  # the first owner keeps it; the rest of the CLI works on
                registry.remove(info)
                plugins.warn_once(f"command {name!r} of plugin {plugin!r} ({dist or 'not installed'}) is ignored: "
                                  f"the name is taken by {owners[name]!r}; uninstall one of them")
                continue
            owners[name] = plugin
            plugin_commands.append(plugins.Registered("commands", name, None, plugin, dist))
    _guard_all(app)
    return app


def main() -> None:
    """The ``sdsctl`` console script."""
    try:
        app = create_app()
    except SdsctlError as exc:
        _print_error(exc)
        sys.exit(exc.exit_code)
    app(prog_name="sdsctl")
