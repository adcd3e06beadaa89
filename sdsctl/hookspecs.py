"""The hook markers and every hook a plugin can implement.

A plugin is a module (or any object) with functions decorated by ``@sdsctl.hookimpl`` and
named after one of the specs below, registered through the ``sdsctl`` entry-point group::

    [project.entry-points.sdsctl]
    my_guidance = "my_package.my_guidance"

Component hooks receive a ``register`` callback and call it once per component:
``register(name, cls)``. Each hook is called once per plugin, lazily, the first time the
registry is asked for that kind of component (see ``sdsctl.plugins``). An implementation
may leave out arguments it does not need. See ``docs/plugins.md`` for the contract of each
kind of component.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sdsctl")
hookimpl = pluggy.HookimplMarker("sdsctl")


@hookspec
def register_models(register):
    """Register model classes (subclasses of ``sdsctl.components.Model``).

    Called when recipes are validated and when ``sdsctl plugins`` lists components.
    Call ``register(name, cls)`` for each model; ``name`` is what a recipe's
    ``model: {name: ...}`` selects. The return value is ignored.
    """


@hookspec
def register_families(register):
    """Register model families (subclasses of ``sdsctl.models.Prior``), one per diffusers pipeline class.

    Called when a model is described or loaded through a recipe (``sdsctl run``, ``validate``,
    ``model``) and by ``sdsctl plugins``. Call ``register(name, cls)`` for each family; ``name``
    is the family's name (``cls.family``), and ``cls.pipeline_class`` the ``_class_name`` of the
    ``model_index.json`` it handles. Import the family's module inside the hook: it imports
    torch, which ``sdsctl --help`` does not. The contract a family fulfils is in
    docs/plugins.md ("model family"). The return value is ignored.
    """


@hookspec
def register_parameterizations(register):
    """Register parameterizations (subclasses of ``sdsctl.components.Parameterization``).

    A parameterization holds the optimized parameters θ and renders latents or RGB.
    Call ``register(name, cls)`` for each; ``name`` is what ``parameterization: {name: ...}``
    selects. The return value is ignored.
    """


@hookspec
def register_guidances(register):
    """Register guidances (subclasses of ``sdsctl.components.Guidance``).

    A guidance turns the current latents into a latent-space score (SDS, NFSD, VSD, ...).
    Call ``register(name, cls)`` for each; ``name`` is what ``guidance: {name: ...}``
    selects. The return value is ignored.
    """


@hookspec
def register_schedules(register):
    """Register timestep schedules (subclasses of ``sdsctl.components.Schedule``).

    A schedule gives each step its timestep and phase. Call ``register(name, cls)`` for
    each; ``name`` is what ``schedule: {name: ...}`` selects. The return value is ignored.
    """


@hookspec
def register_weightings(register):
    """Register weightings w(t) (subclasses of ``sdsctl.components.Weighting``).

    Call ``register(name, cls)`` for each; ``name`` is what ``weighting: {name: ...}``
    selects. The return value is ignored.
    """


@hookspec
def register_cameras(register):
    """Register cameras (subclasses of ``sdsctl.components.Cameras``) for 3D parameterizations.

    Call ``register(name, cls)`` for each; ``name`` is what ``cameras: {name: ...}`` selects
    (the section a 3D recipe has; ``orbit`` when it names none). The return value is ignored.
    """


@hookspec
def register_metrics(register):
    """Register metrics (subclasses of ``sdsctl.components.Metric``).

    After a run completes, every registered metric whose ``applies_to(prior)`` is true is
    computed on the final image with the prompt; its result goes into ``summary.json``
    under ``metrics.<name>``. Call ``register(name, cls)`` for each. The return value is
    ignored.
    """


@hookspec
def register_loggers(register):
    """Register run loggers (subclasses of ``sdsctl.components.Logger``).

    Called when ``sdsctl run``/``resume`` is given ``--log NAME`` and by ``sdsctl plugins``.
    A logger receives every step's record, the preview images and the run's final summary.
    Call ``register(name, cls)`` for each; ``name`` is what ``--log`` selects. The return
    value is ignored.
    """


@hookspec
def register_recipes(register):
    """Ship recipes that ``sdsctl recipes`` lists and ``sdsctl run NAME`` (or ``extends: NAME``) finds.

    Called whenever a recipe is looked up by name and by ``sdsctl recipes``. Call
    ``register(name, path)`` for each recipe, ``path`` a YAML file the package ships (package
    data). sdsctl's own recipes come first; a name already taken is ignored with a warning. The
    return value is ignored.
    """


@hookspec
def register_commands(app):
    """Add commands to the CLI.

    Called once by ``sdsctl.cli.create_app()`` with the Typer app: use ``@app.command()``
    or ``app.add_typer(...)``. Never import ``click``; raise ``sdsctl.errors.SdsctlError``
    for user errors (exit code 2, message without traceback). The return value is ignored.
    """
