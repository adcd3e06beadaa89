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
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

import sdsctl
from sdsctl import plugins
from sdsctl.devices import ACCEPTED
from sdsctl.errors import RunFailed, SdsctlError

CORE_COMMANDS = ("run", "resume", "validate", "recipes", "plugins")
#: what `resume --set` may change besides output.*: the rest of a run's recipe is its identity
RESUMABLE_KEYS = ("steps", "device", "dtype", "threads")
KIND_ORDER = ("models", "families", "parameterizations", "guidances", "schedules", "weightings", "cameras", "metrics",
              "loggers", "commands")


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


# ----------------------------------------------------------------------------- help

_TYPE_METAVARS = {"Path": "PATH", "int": "N", "float": "NUMBER", "str": "TEXT"}


def _metavar(param) -> str | None:
    """A readable metavar for an option that names none: PATH, N, NUMBER, TEXT."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = getattr(annotation, "__args__", None)
    if args and getattr(annotation, "__origin__", None) is list:
        annotation = args[0]
    return _TYPE_METAVARS.get(getattr(annotation, "__name__", ""), None)


class SdsctlCommand(TyperCommand):
    """Help as people read it: ``RECIPE`` / ``RECIPE...`` / ``[RUN_DIR]`` in the usage line and
    ``--out PATH``, ``--seed N`` in the options, instead of Typer's ``{RECIPE}`` and
    ``<list[str]>``."""

    def _readable(self) -> None:
        for param in self.params:
            if param.param_type_name == "option" and not param.is_flag and param.metavar is None:
                param.metavar = _metavar(param)
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()

    @staticmethod
    def _usage_name(param) -> str:
        name = param.metavar
        if param.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if param.required else f"[{name}]"

    def collect_usage_pieces(self, ctx) -> list[str]:
        self._readable()
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [self._usage_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx, formatter) -> None:
        self._readable()
        args, opts = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                extra = "" if param.required else "  [optional]"
                args.append((param.metavar, (param.help or "") + extra))
            else:
                record = param.get_help_record(ctx)
                if record is not None:
                    opts.append(record)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


def _describe_commands(app: typer.Typer) -> None:
    """Every command (plugins' too) with readable help and its whole first line in `sdsctl --help`."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = SdsctlCommand
        doc = info.help or (info.callback.__doc__ if info.callback else "") or ""
        if info.short_help is None and doc.strip():
            info.short_help = doc.strip().splitlines()[0]


def _quiet_libraries(verbose: bool) -> None:
    """transformers' and diffusers' own warnings and progress bars: shown with -v only."""
    if verbose:
        os.environ["SDSCTL_VERBOSE"] = "1"  # the models layer leaves the libraries' output alone
        return
    os.environ.pop("SDSCTL_VERBOSE", None)
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module=r"(transformers|diffusers|huggingface_hub|accelerate)(\.|$)")
    for name in ("transformers", "diffusers"):  # already imported (in-process tests): set directly
        module = sys.modules.get(f"{name}.utils.logging")
        if module is not None:
            module.set_verbosity_error()


# ----------------------------------------------------------------------------- completion

def _complete_recipe(incomplete: str) -> list[str]:
    from sdsctl.engine.recipe import bundled_recipes

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
ThreadsOption = Annotated[int | None, typer.Option(
    metavar="N", help="CPU threads (shortcut for --set threads=...; default: one per core, or OMP_NUM_THREADS); "
                      "on a busy machine fewer can be faster")]
ModelOption = Annotated[str | None, typer.Option(
    metavar="MODEL", help="Model: 'shapes', a diffusers folder, a hub id, or a single .safetensors/.ckpt file "
                          "with --set model.config=DIR (shortcut for --set model=...)")]
DeviceOption = Annotated[str | None, typer.Option(
    metavar="DEVICE", help=f"{ACCEPTED} (shortcut for --set device=...); auto picks CUDA when there is a GPU")]
AllowDownloadOption = Annotated[bool, typer.Option(
    "--allow-download",
    help="Download a hub model missing from the local cache (shortcut for --set model.allow_download=true).")]
LogOption = Annotated[list[str], typer.Option(
    "--log", metavar="LOGGER",
    help="Also send the run to a logger: tensorboard, wandb (offline), or a plugin's (see `sdsctl plugins`). "
         "Repeatable.")]
NoLiveOption = Annotated[bool, typer.Option("--no-live", help="Plain log lines instead of the live panel.")]
ViewSizeOption = Annotated[int | None, typer.Option(
    "--view-size", metavar="PX",
    help="Also write the final image and the previews enlarged to PX for viewing (shortcut for --set "
         "output.view_size=PX; 0: none).")]
RecipeArgument = Annotated[str, typer.Argument(
    metavar="RECIPE", help="A recipe file, or the name of a bundled recipe (see `sdsctl recipes`).",
    autocompletion=_complete_recipe)]


def _overrides(prompt, seed, steps, model, device, threads=None) -> dict[str, Any]:
    return {"prompt": prompt, "seed": seed, "steps": steps, "model": model, "device": device, "threads": threads}


def _sets(sets: list[str], allow_download: bool = False, view_size: int | None = None) -> list[str]:
    """The --set expressions with the shortcuts that set nested keys."""
    out = list(sets)
    if allow_download:
        out.append("model.allow_download=true")
    if view_size is not None:
        out.append(f"output.view_size={view_size}")
    return out


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _start(reading: str, recipe, sets: list[str], overrides: dict, target, no_live: bool, *, overwrite: bool,
           resume: bool, log: list[str]) -> None:
    """``run`` and ``resume``: the panel from the first moment (plain logs start with the model),
    the recipe loaded and checked, its run directory (``target(loaded)``), then the run."""
    from sdsctl.engine.panel import LivePanel, make_reporter
    from sdsctl.engine.recipe import load_recipe

    reporter = make_reporter(not no_live)
    try:
        if isinstance(reporter, LivePanel):
            reporter.loading(reading)
        loaded = load_recipe(recipe, sets, overrides)
        path = target(loaded)
    except BaseException:
        reporter.close()
        raise
    _warn(loaded.warnings)
    _run(loaded, path, reporter, overwrite=overwrite, resume=resume, log=log)


def _run(loaded, path: Path, reporter, overwrite: bool, resume: bool, log: list[str] = ()) -> None:
    from sdsctl.engine.loggers import RunLoggers, build
    from sdsctl.engine.loop import OOM
    from sdsctl.engine.run import StopNow, execute, oom_message

    command = f"sdsctl {'resume' if resume else 'run'}"
    loggers, skipped = build(list(log), path, loaded.recipe)
    _warn(skipped)
    reporter = RunLoggers(reporter, loggers)
    try:
        result = execute(loaded, path, reporter, overwrite=overwrite, resume=resume, command=command)
    except OOM:
        raise RunFailed(oom_message(None, loaded.recipe.device)) from None
    except StopNow as stop:  # while the model loaded
        print(f"{stop or 'interrupted'} while the model loaded; nothing written", file=sys.stderr)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # a signal after the run had saved and let go of the signal handlers
        result = _result_from_summary(path)
    finally:
        reporter.finish(path)
    if result.status == "interrupted":
        how = f"{result.signal}: " if result.signal else ""
        why = f" ({result.note})" if result.note else ""
        print(f"{how}interrupted at step {result.steps_done}/{result.steps}{why}; state.pt, final.png and "
              f"progress.png in {path} hold step {result.steps_done}. Continue with: sdsctl resume {path}",
              file=sys.stderr)
        raise typer.Exit(130)
    scene = (path / "turntable.gif").is_file()  # a 3D run's outputs, named where to look
    print(f"done: {result.steps_done} steps -> {path / 'final.png'}"
          + (f" (3D: views.png, turntable.gif, mesh.glb in {path})" if scene else ""))


def _result_from_summary(path: Path):
    from sdsctl.engine.run import RunResult
    from sdsctl.engine.rundir import RunDir

    summary = RunDir(path).read_summary()
    return RunResult(summary.get("status", "interrupted"), summary.get("steps_done", 0), summary.get("steps", 0),
                     path, signal=summary.get("signal", ""), note=summary.get("note"))


def _version_callback(value: bool) -> None:
    if value:
        print(f"sdsctl {sdsctl.__version__}")
        raise typer.Exit()


def root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Show the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show the libraries' own warnings (transformers, diffusers).")] = False,
) -> None:
    """Score distillation from the command line."""
    _quiet_libraries(verbose)


def run(
    recipe: RecipeArgument,
    set_: SetOption = [],  # noqa: B006 - typer reads the default
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="PATH", help="Run directory (default: <output.dir>/<recipe>-<timestamp>).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the run files in an existing --out directory.")] = False,
    no_live: NoLiveOption = False,
    prompt: PromptOption = None,
    seed: SeedOption = None,
    steps: StepsOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    allow_download: AllowDownloadOption = False,
    view_size: ViewSizeOption = None,
    log: LogOption = [],  # noqa: B006
) -> None:
    """Run a recipe: optimize an image and write a run directory."""
    from sdsctl.engine.rundir import check_target, default_path

    def target(loaded) -> Path:
        path = out if out is not None else default_path(loaded.recipe.output.dir, loaded.name)
        check_target(path, overwrite)
        return path

    _start(f"reading recipe {recipe}", recipe, _sets(set_, allow_download, view_size),
           _overrides(prompt, seed, steps, model, device, threads), target, no_live, overwrite=overwrite,
           resume=False, log=log)


def resume(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="The directory of an interrupted, failed or completed run.")],
    set_: Annotated[list[str], typer.Option(
        "--set", "-s", metavar="KEY=VALUE",
        help="Change steps (to continue a completed run) or output.*, e.g. --set steps=1000. Repeatable.")] = [],  # noqa: B006
    steps: StepsOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    no_live: NoLiveOption = False,
    view_size: ViewSizeOption = None,
    log: LogOption = [],  # noqa: B006
) -> None:
    """Continue a run from its state.pt: interrupted, failed, or completed with more --steps."""
    from sdsctl.engine.rundir import RunDir

    RunDir.open(run_dir)
    for expr in set_:
        key = expr.split("=", 1)[0].strip()
        if key not in RESUMABLE_KEYS and not key.startswith("output."):
            raise SdsctlError(f"--set {expr}: a resumed run keeps its recipe; only {', '.join(RESUMABLE_KEYS)} "
                              "and output.* can change (for anything else start a new run: sdsctl run "
                              f"{run_dir / 'recipe.yaml'} --set {expr} --out NEW_DIR)")
    _start(f"reading {run_dir / 'recipe.yaml'}", run_dir / "recipe.yaml", _sets(set_, view_size=view_size),
           {"steps": steps, "device": device, "threads": threads}, lambda loaded: run_dir, no_live, overwrite=False,
           resume=True, log=log)


def validate(
    recipe: RecipeArgument,
    set_: SetOption = [],  # noqa: B006
    prompt: PromptOption = None,
    seed: SeedOption = None,
    steps: StepsOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    show: Annotated[bool, typer.Option("--show", help="Print the fully resolved recipe.")] = False,
    allow_download: AllowDownloadOption = False,
) -> None:
    """Check a recipe and the device without running it (no model weights are loaded)."""
    from sdsctl.engine.recipe import load_recipe, to_yaml

    loaded = load_recipe(recipe, _sets(set_, allow_download), _overrides(prompt, seed, steps, model, device, threads))
    _warn(loaded.warnings)
    r = loaded.recipe
    if show:
        print(to_yaml(r), end="")
    print(f"ok: {recipe} -- {r.guidance.name} on {r.parameterization.name}, {r.steps} steps, "
          f"model {loaded.model_info.source}")


def recipes() -> None:
    """List the recipes sdsctl and its plugins ship (run one by name: `sdsctl run NAME`)."""
    from sdsctl.engine.recipe import bundled_dir, bundled_recipes

    found = bundled_recipes()
    width = max((len(n) for n, _, _ in found), default=0)
    for name, path, desc in found:  # a plugin's recipe says where it is
        print(f"{name:<{width}}  {desc}" + ("" if path.parent == bundled_dir() else f"  [{path}]"))


def _plugins_command(plugin_commands: list[plugins.Registered]):
    """`sdsctl plugins`, seeing the plugin commands the app registered."""

    def list_plugins(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON: an object keyed by kind.")] = False,
    ) -> None:
        """List every registered component by kind, with its plugin and distribution."""
        from sdsctl.components import KINDS

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

    return list_plugins


def _add_plugin_commands(app: typer.Typer, plugin_commands: list[plugins.Registered]) -> None:
    """Every plugin's ``register_commands``; a name already taken keeps its first owner (a warning)."""
    plugins.load_plugins()
    owners = {name: "sdsctl" for name in CORE_COMMANDS}
    for plugin, dist, call in plugins.each_plugin("register_commands"):
        n_cmds, n_groups = len(app.registered_commands), len(app.registered_groups)
        plugins.call_plugin(plugin, "register_commands", call, app=app)
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


def create_app() -> typer.Typer:
    """The sdsctl CLI with the core commands and every plugin's commands."""
    app = typer.Typer(
        name="sdsctl",
        help="Score distillation (SDS, NFSD, robust NFSD, VSD, ISM, CSD, ...) from YAML recipes. Every command is "
             "listed below; `sdsctl COMMAND --help` explains one.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    plugin_commands: list[plugins.Registered] = []
    app.callback()(root)
    for command in (run, resume, validate, recipes):
        app.command()(command)
    app.command("plugins")(_plugins_command(plugin_commands))
    _add_plugin_commands(app, plugin_commands)
    _guard_all(app)
    _describe_commands(app)
    return app


def main() -> None:
    """The ``sdsctl`` console script."""
    try:
        app = create_app()
    except SdsctlError as exc:
        _print_error(exc)
        sys.exit(exc.exit_code)
    app(prog_name="sdsctl")
