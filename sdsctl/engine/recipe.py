"""Recipes: the YAML files that say everything about a run, validated before any model loads.

A recipe merges in one visible order: its ``extends:`` parent (recursively), then the file,
then ``--set a.b=c`` overrides (values parsed as YAML), then the run command's shortcut
options (``--prompt``, ``--seed``, ...). Mappings merge key by key; a component section
that names a different component than the section below it replaces that section instead
of merging (options of one guidance mean nothing to another).

Each component section (``model``, ``parameterization``, ``guidance``, ``schedule``,
``weighting``) is validated by the ``Config`` of the class registered under its ``name``;
the rest by :class:`Recipe`. Every problem is reported with its file, key path and YAML
line:column (or the option it came from), unknown keys with the closest valid key.
Parsing has no side effects: nothing is created or loaded here except the model's
configuration files and tokenizer (:func:`check_model`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sdsctl import plugins
from sdsctl.components import Guidance
from sdsctl.diffusion import true_cfg_note
from sdsctl.errors import InvalidConfig, Location, PluginError, Problem, RecipeError, SdsctlError
from sdsctl.modelinfo import ModelInfo
from sdsctl.schema import ComponentConfig, OptimizerConfig, OutputConfig, Recipe  # noqa: F401 -- the sections' types, re-exported

#: recipe section -> registry kind
SECTIONS = {
    "model": "models",
    "parameterization": "parameterizations",
    "guidance": "guidances",
    "schedule": "schedules",
    "weighting": "weightings",
    "cameras": "cameras",  # 3D parameterizations only
}
#: the component a section selects when it names none
DEFAULT_NAMES = {
    "model": "diffusers",
    "parameterization": "latent-pixels",
    "guidance": "sds",
    "schedule": "uniform",
    "weighting": "one-minus-alpha-bar",
    "cameras": "orbit",
}


@dataclasses.dataclass
class LoadedRecipe:
    """A recipe ready to run: validated, its components looked up, checked against the model."""

    recipe: Recipe
    components: dict[str, plugins.Registered]  # section -> registered component
    model_info: ModelInfo
    warnings: list[str]
    name: str  # the recipe file's stem (names the run directory)
    origin: str  # where it came from, for recipe.yaml's header


# ----------------------------------------------------------------------------- files

KeyPath = tuple  # ("guidance", "guidance_scale"), ("optimizer", "betas", 1)


@dataclasses.dataclass
class Layer:
    """Recipe data and, for every key path in it, where its key and value were written."""

    data: dict[str, Any]
    locs: dict[KeyPath, tuple[Location, Location]]


def bundled_dir() -> Path:
    """The folder of the recipes shipped with sdsctl (``recipes/``, package ``sdsctl_recipes``)."""
    try:
        from importlib.resources import files

        return Path(str(files("sdsctl_recipes")))
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parent.parent / "recipes"


def description(path: Path) -> str:
    """A recipe's first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def bundled_recipes() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every recipe found by name: sdsctl's own, then every
    plugin's (hook ``register_recipes``)."""
    return [(name, path, description(path)) for name, path in _named_recipes()]


def _plugin_recipes(taken: set[str]) -> list[tuple[str, Path]]:
    """(name, path) of every plugin's recipe (hook ``register_recipes``); a name in ``taken``
    or registered before keeps its first owner (a warning)."""
    found: list[tuple[str, Path]] = []
    owners = {name: "sdsctl" for name in taken}
    for plugin, _dist, call in plugins.each_plugin("register_recipes"):

        def register(name: str, path, _plugin: str = plugin) -> None:
            file = Path(path)
            if not isinstance(name, str) or not name or "/" in name:
                raise PluginError(f"plugin {_plugin!r} registered a recipe with the name {name!r}; names are "
                                  "non-empty strings without '/'")
            if not file.is_file():
                raise PluginError(f"plugin {_plugin!r} registered recipe {name!r} as {file}, which is not a file")
            if name in owners:
                plugins.warn_once(f"recipe {name!r} of plugin {_plugin!r} is ignored: the name is taken by "
                                  f"{owners[name]!r}")
                return
            owners[name] = _plugin
            found.append((name, file))

        plugins.call_plugin(plugin, "register_recipes", call, register=register)
    return found


def _named_recipes() -> list[tuple[str, Path]]:
    own = [(p.stem, p) for p in sorted(bundled_dir().glob("*.yaml"))]
    return own + _plugin_recipes({name for name, _ in own})


def _bundled(ref: str) -> Path | None:
    """The recipe named ``ref`` (with or without ``.yaml``): sdsctl's own (one file lookup, no
    plugin asked: the common case, once per run of a comparison), else a plugin's."""
    if "/" in ref or "\\" in ref:
        return None
    stem = ref[:-5] if ref.endswith(".yaml") else ref[:-4] if ref.endswith(".yml") else ref
    own = bundled_dir() / f"{stem}.yaml"
    if own.is_file():
        return own
    return next((path for name, path in _plugin_recipes({p.stem for p in bundled_dir().glob("*.yaml")})
                 if name == stem), None)


def find_recipe(ref: str) -> Path:
    """A recipe argument -- a path or a bundled recipe's name -- as a file path."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        hint = " (a run directory? continue it with `sdsctl resume`)" if (path / "recipe.yaml").is_file() else ""
        raise SdsctlError(f"{ref} is a directory, not a recipe file{hint}")
    found = _bundled(ref)
    if found is not None:
        return found
    bundled = [n for n, _, _ in bundled_recipes()]
    as_file = path.suffix.lower() in (".yaml", ".yml") or "/" in ref or "\\" in ref
    folder = path.parent if as_file else None
    names = [p.stem for p in folder.glob("*.y*ml")] if folder is not None and folder.is_dir() else []
    if not as_file or folder == Path("."):
        names += bundled
    key = path.stem.lower().replace("-", "_")
    close = ([n for n in names if n.lower().replace("-", "_") == key]
             or difflib.get_close_matches(key, names, n=1, cutoff=0.75))
    what = "recipe file" if as_file else "recipe"
    if close:
        hint = close[0] if not as_file or close[0] in bundled and not (folder / f"{close[0]}{path.suffix}").is_file() \
            else str(folder / f"{close[0]}{path.suffix}")
        raise SdsctlError(f"{what} {ref} not found; did you mean {hint}? (`sdsctl recipes` lists the bundled ones)")
    if as_file:
        if path.stem in bundled:  # e.g. ``recipes/sds.yaml`` typed outside the repository
            raise SdsctlError(f"recipe file {ref} not found here ({Path.cwd()}); a bundled recipe has that name: "
                              f"give it as {path.stem} (no folder, no .yaml) to use it from any folder")
        raise SdsctlError(f"recipe file {ref} not found")
    raise SdsctlError(f"recipe {ref} not found: neither a file nor a bundled recipe "
                      f"(bundled: {', '.join(bundled) or 'none'})")


def _mark(source: str, mark) -> Location:
    return Location(source, mark.line + 1, mark.column + 1)


def _walk(node, path: KeyPath, source: str, locs: dict, problems: list[Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Location] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            here = _mark(source, key_node.start_mark)
            if key in seen:
                problems.append(Problem(here, ".".join(map(str, path + (key,))),
                                        f"duplicate key (first written at line {seen[key].line})"))
            seen[key] = here
            locs[path + (key,)] = (here, _mark(source, value_node.start_mark))
            _walk(value_node, path + (key,), source, locs, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loc = _mark(source, item.start_mark)
            locs[path + (i,)] = (loc, loc)
            _walk(item, path + (i,), source, locs, problems)


def _normalize(data: dict[str, Any]) -> dict[str, Any]:
    """Component shorthands: ``model: DIR`` = ``{name: diffusers, path: DIR}``, ``guidance: sds``
    = ``{name: sds}``."""
    out = dict(data)
    for section in SECTIONS:
        value = out.get(section)
        if isinstance(value, str):
            out[section] = {"name": "diffusers", "path": value} if section == "model" else {"name": value}
    return out


def _read_yaml(path: Path) -> Layer:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SdsctlError(f"cannot read recipe {path}: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = _mark(source, mark) if mark is not None else Location(source)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([Problem(where, "", f"malformed YAML: {problem}")]) from None
    if node is None:
        raise RecipeError([Problem(Location(source), "", "the recipe is empty")])
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError([Problem(_mark(source, node.start_mark), "",
                                   "a recipe is a mapping of keys (prompt:, steps:, guidance:, ...)")])
    locs: dict[KeyPath, tuple[Location, Location]] = {}
    problems: list[Problem] = []
    _walk(node, (), source, locs, problems)
    if problems:
        raise RecipeError(problems)
    return Layer(_normalize(data), locs)


def read_recipe_file(path: Path, _chain: tuple[Path, ...] = ()) -> Layer:
    """A recipe file with its ``extends:`` chain merged in."""
    layer = _read_yaml(path)
    if "extends" not in layer.data:
        return layer
    ref = layer.data.pop("extends")
    key_loc = layer.locs[("extends",)][0]
    if not isinstance(ref, str) or not ref:
        raise RecipeError([Problem(key_loc, "extends", "expected the path (or bundled name) of another recipe")])
    parent = (path.parent / ref) if (path.parent / ref).is_file() else _bundled(ref)
    if parent is None:
        names = [p.stem for p in path.parent.glob("*.y*ml")] + [n for n, _, _ in bundled_recipes()]
        close = difflib.get_close_matches(Path(ref).stem, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise RecipeError([Problem(key_loc, "extends",
                                   f"{ref} not found (looked in {path.parent} and the bundled recipes){hint}")])
    chain = _chain + (path.resolve(),)
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in chain + (parent.resolve(),))
        raise RecipeError([Problem(key_loc, "extends", f"extends cycle: {cycle}")])
    return merge(read_recipe_file(parent, chain), layer)


def merge(base: Layer, over: Layer) -> Layer:
    """``over`` on top of ``base`` (see the module docstring for the rules)."""
    dropped: list[KeyPath] = []

    def merged(a: dict, b: dict, path: KeyPath) -> dict:
        out = dict(a)
        for key, value in b.items():
            p = path + (key,)
            old = out.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                renamed = path == () and key in SECTIONS and "name" in value and value["name"] != old.get("name")
                if renamed:
                    out[key] = dict(value)
                    dropped.append(p)
                else:
                    out[key] = merged(old, value, p)
            else:
                out[key] = value
                dropped.append(p)
        return out

    data = merged(base.data, over.data, ())
    locs = {k: v for k, v in base.locs.items()
            if not any(k[: len(d)] == d and len(k) > len(d) for d in dropped)}
    locs.update(over.locs)
    return Layer(data, locs)


_SET = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)", re.DOTALL)


def parse_set(expr: str) -> Layer:
    """``a.b=c`` -> a layer ``{a: {b: c}}``, ``c`` parsed as YAML (empty = empty string)."""
    where = Location(f"--set {expr}")
    match = _SET.fullmatch(expr)
    if match is None:
        raise RecipeError([Problem(where, "", "bad --set expression: expected KEY=VALUE with a dotted KEY, "
                                              "e.g. --set guidance.guidance_scale=50")])
    key, raw = match.groups()
    try:
        value = "" if raw == "" else yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(where, key, f"bad --set expression: the value is not valid YAML ({exc})")]) from None
    parts = tuple(key.split("."))
    for part in reversed(parts):
        value = {part: value}
    return Layer(_normalize(value), {parts[:i]: (where, where) for i in range(1, len(parts) + 1)})


def overrides_layer(values: dict[str, Any]) -> Layer:
    """The run command's shortcut options (``--prompt``, ``--seed``, ...), typed as given."""
    data = {k: v for k, v in values.items() if v is not None}
    locs = {(k,): (Location(f"--{k}"), Location(f"--{k}")) for k in data}
    return Layer(_normalize(data), locs)


# ----------------------------------------------------------------------------- validation

def suggest(word: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


class _Locator:
    def __init__(self, locs: dict, origin: Location):
        self.locs, self.origin = locs, origin

    def __call__(self, path: KeyPath, key: bool = False) -> Location:
        for n in range(len(path), 0, -1):
            if path[:n] in self.locs:
                key_loc, value_loc = self.locs[path[:n]]
                return key_loc if (key or n < len(path)) else value_loc
        return self.origin


def _problems(err: ValidationError, prefix: KeyPath, model: type[BaseModel], where: _Locator) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = prefix + tuple(e["loc"])
        key = ".".join(map(str, loc))
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, tuple(e["loc"])[:-1])
            msg = f"unknown key{suggest(loc[-1], valid)}; valid keys: {', '.join(valid)}"
            out.append(Problem(where(loc, key=True), key, msg))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "missing (required)"
        elif "input" in e and not isinstance(e["input"], (dict, list)) and "got" not in msg:
            msg += f" (got {e['input']!r})"
        out.append(Problem(where(loc), key, msg))
    return out


def _unknown_top_level(key: Any, data: dict[str, Any], fields: list[str]) -> str:
    """The message for an unknown top-level key: where it belongs when it is an option of one of
    the recipe's sections (``guidance_scale`` -> ``guidance.guidance_scale``), else the closest key."""
    homes = []
    for section in fields:
        raw = data.get(section)
        kind = SECTIONS.get(section)
        if kind is not None:
            name = raw.get("name", DEFAULT_NAMES[section]) if isinstance(raw, dict) else DEFAULT_NAMES[section]
            reg = plugins.lookup(kind, name) if isinstance(name, str) else None
            options = list(reg.obj.Config.model_fields) if reg is not None else []
        else:
            options = _fields_at(Recipe, (section,))
        if key in options and key != "name":
            homes.append(f"{section}.{key}")
    hint = f" (did you mean {' or '.join(map(repr, homes))}?)" if homes else suggest(key, fields + ["extends"])
    return f"unknown key{hint}; valid keys: {', '.join(fields)}, extends"


def validate(data: dict[str, Any], where: _Locator) -> tuple[Recipe, dict[str, plugins.Registered]]:
    """Typed configs for ``data``, or a :class:`RecipeError` listing every problem."""
    problems: list[Problem] = []
    fields = list(Recipe.model_fields)
    for key in data:
        if key == "extends":
            problems.append(Problem(where((key,), key=True), key, "only a recipe file can extend another (not --set)"))
        elif key not in fields:
            problems.append(Problem(where((key,), key=True), str(key), _unknown_top_level(key, data, fields)))
    configs: dict[str, ComponentConfig] = {}
    found: dict[str, plugins.Registered] = {}
    for section, kind in SECTIONS.items():
        raw = data.get(section)
        if section == "cameras" and not _cameras_wanted(raw, found, where, problems):
            continue
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            problems.append(Problem(where((section,)), section,
                                    f"expected a component name or a mapping {{name: ..., <options>}}, got {raw!r}"))
            continue
        name = raw.get("name", DEFAULT_NAMES[section])
        reg = plugins.lookup(kind, name) if isinstance(name, str) else None
        if reg is None:
            registry = plugins.components(kind)
            choices = plugins.clashing(kind, name) if isinstance(name, str) else []
            if choices:
                message = (f"{plugins.singular(kind)} {name!r} is registered by several plugins; choose one: "
                           f"{', '.join(choices)} (or uninstall all but one)")
            else:
                installed = ", ".join(sorted(registry)) or "none"
                message = (f"unknown {plugins.singular(kind)} {name!r}{suggest(name, list(registry))}; "
                           f"installed {kind}: {installed}")
            problems.append(Problem(where((section, "name")), f"{section}.name", message))
            continue
        try:
            configs[section] = reg.obj.Config.model_validate({**raw, "name": name})
            found[section] = reg
        except ValidationError as err:
            problems += _problems(err, (section,), reg.obj.Config, where)
    rest = {k: v for k, v in data.items() if k in fields and k not in SECTIONS}
    placeholder = {s: configs.get(s, None if s == "cameras" else ComponentConfig(name=DEFAULT_NAMES[s]))
                   for s in SECTIONS}
    recipe = None
    try:
        recipe = Recipe.model_validate({**rest, **placeholder})
    except ValidationError as err:
        problems += _problems(err, (), Recipe, where)
    if problems:
        raise RecipeError(sorted(problems, key=_order))
    assert recipe is not None
    return recipe, found


def _cameras_wanted(raw: Any, found: dict[str, plugins.Registered], where: _Locator,
                    problems: list[Problem]) -> bool:
    """Whether the ``cameras`` section is validated: always for a 3D parameterization (``orbit``
    when the recipe names none), never for a 2D one, where writing it is a mistake."""
    param = found.get("parameterization")
    if param is None:
        return False
    if getattr(param.obj, "scene", False):
        return True
    if raw is not None:
        problems.append(Problem(where(("cameras",), key=True), "cameras",
                                f"cameras are for 3D parameterizations (nerf, ...); {param.name!r} renders a "
                                "single image: remove the cameras section"))
    return False


def _order(p: Problem):
    loc = p.location
    return (loc.source if loc else "", loc.line or 0 if loc else 0, loc.column or 0 if loc else 0, p.key)


def _true_cfg_notes(guidance: type, recipe: Recipe, info: ModelInfo) -> list[str]:
    """The one warning every guidance term with unconditional or negative rows
    (``Guidance.unconditional_rows``) gets on a guidance-distilled model."""
    note = true_cfg_note(recipe.guidance.name, info) if guidance.unconditional_rows else None
    return [f"guidance: {note}"] if note else []


def _fit_problems(recipe: Recipe, found: dict[str, plugins.Registered], info: ModelInfo,
                  where: _Locator) -> list[Problem]:
    """Combinations of sections that cannot run: a latent parameterization on a pixel model, an
    image fit without RGB, HiFA's target without a denoised estimate, inner steps with a full fit."""
    problems: list[Problem] = []
    param_cls = found["parameterization"].obj
    space = param_cls.space_for(recipe.parameterization)
    if info.space == "pixel" and space != "rgb":
        problems.append(_latent_on_pixels(recipe, param_cls, info, where))
    fit_config = recipe.optimizer
    if fit_config.fit_space != "latent" and space != "rgb":
        problems.append(Problem(where(("optimizer", "fit_space")), "optimizer.fit_space",
                                f"{fit_config.fit_space!r} needs an RGB parameterization; "
                                f"{recipe.parameterization.name!r} renders latents "
                                "(use fit_space: latent, or an rgb-* parameterization)"))
    if (fit_config.fit_space != "latent" and fit_config.image_target == "hifa"
            and not found["guidance"].obj.gives_denoised):
        problems.append(Problem(where(("optimizer", "image_target")), "optimizer.image_target",
                                f"'hifa' needs the guidance's denoised estimate, which {recipe.guidance.name!r} "
                                "does not give (use image_target: decoded-target)"))
    guidance_cls = found["guidance"].obj
    if getattr(recipe.cameras, "view_prompts", False) and guidance_cls.state_dict is not Guidance.state_dict:
        problems.append(Problem(where(("cameras", "view_prompts")), "cameras.view_prompts",
                                f"view_prompts builds one {recipe.guidance.name!r} per view word, but it keeps "
                                "state of its own (a model trained alongside θ) that the views would not share; "
                                "use view_prompts: false with this guidance"))
    if fit_config.fit == "full" and fit_config.inner_steps != 1:
        problems.append(Problem(where(("optimizer", "inner_steps")), "optimizer.inner_steps",
                                "inner_steps is for fit: adam; with fit: full the fit stops at fit_tolerance "
                                "or max_fit_steps"))
    return problems


def _latent_on_pixels(recipe: Recipe, param_cls: type, info: ModelInfo, where: _Locator) -> Problem:
    """A latent parameterization (or ``space: latent``) on a model that denoises pixels."""
    what = f"{info.pipeline} ({info.family}) denoises pixels (it has no VAE)"
    if param_cls.space_for(recipe.parameterization) != param_cls.space:  # an option chose latents
        return Problem(where(("parameterization", "space")), "parameterization.space",
                       f"space: latent renders the model's latents, but {what}; use space: rgb "
                       "(--set parameterization.space=rgb)")
    name, scene = recipe.parameterization.name, getattr(param_cls, "scene", False)
    rgb = {n: r.obj for n, r in plugins.components("parameterizations").items() if r.obj.space == "rgb"}
    # the RGB counterpart first (latent-pixels -> rgb-pixels), then those of the same kind (2D or 3D)
    fits = sorted(rgb, key=lambda n: (n != name.replace("latent", "rgb"), getattr(rgb[n], "scene", False) != scene, n))
    return Problem(where(("parameterization", "name")), "parameterization.name",
                   f"{name!r} renders latents, but {what}; use a parameterization that "
                   f"renders RGB: {', '.join(fits)} (--set parameterization.name={fits[0] if fits else '...'})")


def _text_warnings(recipe: Recipe, info: ModelInfo) -> list[str]:
    """Settings that run but mean little: a score scale under Adam, words or prompt lengths the
    model does not know."""
    warnings: list[str] = []
    fit_config = recipe.optimizer
    if fit_config.fit == "adam" and fit_config.score_scale != 1:
        warnings.append(f"optimizer.score_scale {fit_config.score_scale:g} has almost no effect with fit: adam (Adam "
                        "normalises the gradient's scale away); amplification needs fit: full")
    for key in ("prompt", "negative_prompt"):
        text = getattr(recipe, key)
        unknown = info.unknown_words(text)
        if unknown:
            warnings.append(f"{key}: the model's tokenizer has no whole-word token for "
                            f"{', '.join(map(repr, unknown))}; the prior has probably never seen "
                            f"{'it' if len(unknown) == 1 else 'them'}")
        if info.tokenizer is not None and text:
            n = len(info.tokenizer(text).input_ids)
            if n > info.max_prompt_tokens:
                warnings.append(f"{key}: {n} tokens, more than the model's {info.max_prompt_tokens}; "
                                "the rest is cut off")
    return warnings


def check_model(recipe: Recipe, found: dict[str, plugins.Registered], where: _Locator) -> tuple[ModelInfo, list[str]]:
    """Read the model's configuration and let every component check its options against it."""
    model_reg = found["model"]
    problems: list[Problem] = []

    def run_check(section: str, fn):
        try:
            return fn()
        except InvalidConfig as exc:
            path = (section, exc.field) if exc.field else (section,)
            problems.append(Problem(where(path), ".".join(path), str(exc)))
        except SdsctlError:
            raise
        except Exception as exc:
            reg = found[section]
            raise PluginError(f"{reg.describe()} failed while checking the recipe: "
                              f"{type(exc).__name__}: {exc}") from exc

    from sdsctl.devices import problem as device_problem

    why = device_problem(recipe.device)
    if why is not None:
        problems.append(Problem(where(("device",)), "device", why))
    info = run_check("model", lambda: model_reg.obj(recipe.model).describe())
    if info is None:
        raise RecipeError(problems)
    notes: list[str] = []  # a check may return warnings: options that mean nothing for this model, costs
    for section, reg in found.items():
        said = run_check(section,
                         lambda reg=reg, section=section: reg.obj.check(getattr(recipe, section), recipe, info))
        notes += [f"{section}: {note}" for note in said or ()]
    notes += _true_cfg_notes(found["guidance"].obj, recipe, info)
    problems += _fit_problems(recipe, found, info, where)
    if problems:
        raise RecipeError(sorted(problems, key=_order))
    return info, notes + _text_warnings(recipe, info)


def load_recipe(ref: str | Path, sets: list[str] | tuple[str, ...] = (),
                overrides: dict[str, Any] | None = None) -> LoadedRecipe:
    """Find, merge, validate and check a recipe -- all before any model weights load."""
    path = find_recipe(str(ref))
    layer = read_recipe_file(path)
    for expr in sets:
        layer = merge(layer, parse_set(expr))
    if overrides:
        layer = merge(layer, overrides_layer(overrides))
    where = _Locator(layer.locs, Location(str(path)))
    recipe, found = validate(layer.data, where)
    info, warnings = check_model(recipe, found, where)
    origin = " ".join([str(path), *(f"--set {s}" for s in sets),
                       *(f"--{k} {v}" for k, v in (overrides or {}).items() if v is not None)])
    return LoadedRecipe(recipe, found, info, warnings, path.stem, origin)


def to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (every default written out) as YAML; ``threads`` only when set
    (a recipe written before it existed reads the same)."""
    data = recipe.model_dump(mode="json")
    for key in ("threads", "cameras"):  # unset: left out (a 2D recipe has no cameras)
        if data.get(key) is None:
            data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
