"""`sdsctl sweep` and the executors of `compare` and `sweep`: grids, ranking, retries, failures,
Ray against the local executor, reuse, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sdsctl.errors import SdsctlError
from sdsctl.experiments.ranking import parse_rank_by, rank, ranked_table
from sdsctl.experiments.sweep import parse_grid, parse_grids, settings

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SDSCTL = [sys.executable, "-c", "from sdsctl.cli import main; main()"]


def finals(out: Path) -> dict[str, bytes]:
    """Every run's final.png under a comparison folder, by its path there (keyed by content)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "runs").rglob("final.png"))}


# ----------------------------------------------------------------------------- grids

def test_grid_values_are_parsed_as_set_parses_them():
    g = parse_grid("guidance.guidance_scale=7.5, 20")
    assert (g.key, g.values, g.sets()) == ("guidance.guidance_scale", (7.5, 20),
                                            ["guidance.guidance_scale=7.5", "guidance.guidance_scale=20"])
    assert parse_grid("compile=1,true").values == (1, True)  # equal in Python, two values here
    listed = parse_grid('negative_prompt=["blurry, dark", ""]')
    assert listed.values == ("blurry, dark", "")
    assert listed.sets() == ['negative_prompt="blurry, dark"', 'negative_prompt=""']


def test_the_plan_is_the_product_of_grids_prompts_and_seeds(recipe_file, tmp_path):
    from sdsctl.experiments.plan import entries, plan

    grids = parse_grids(["guidance.guidance_scale=7.5,20", "schedule.t_max=500,800,980"], [])
    points = settings(str(recipe_file()), grids)
    assert [p.label for p in points][:4] == ["guidance_scale=7.5 t_max=500", "guidance_scale=7.5 t_max=800",
                                             "guidance_scale=7.5 t_max=980", "guidance_scale=20 t_max=500"]
    pairs = [("a red circle on a blue background", 0), ("a red circle on a blue background", 1),
             ("a green square on a white background", 0)]
    specs = plan(entries(points, {}, tmp_path), pairs, {})
    assert len(specs) == 2 * 3 * 3 and len({s.path for s in specs}) == 18
    assert {s.state for s in specs} == {"new"}
    assert specs[-1].loaded.recipe.guidance.guidance_scale == 20 and specs[-1].loaded.recipe.schedule.t_max == 980


@pytest.mark.parametrize("args, message", [
    (["--grid", "guidance.guidance_scale"], "expected KEY=V1,V2"),
    (["--grid", "guidance.guidance_scale="], "no values"),
    (["--grid", "guidance.guidance_scale=1,,2"], "value 2 is empty"),
    (["--grid", "guidance.guidance_scale=7.5,7.5"], "listed twice"),
    (["--grid", "guidance.guidanse_scale=1,2"], "guidance_scale"),  # the suggestion
    (["--grid", "steps=4,lots"], "--grid steps=4,lots"),
    (["--grid", "steps=2", "--grid", "steps=4"], "given twice"),
    (["--grid", "steps=2,4", "--set", "steps=3"], "give it once"),
    (["--grid", "steps=2,4", "--steps", "3"], "--grid steps and --steps both set steps"),
    ([], "at least one --grid"),
    (["--grid", "steps=2", "--rank-by", "x:best"], "--rank-by x:best"),
    (["--grid", "steps=2", "--executor", "dask"], "--executor dask"),
    (["--grid", "steps=2", "--jobs", "2", "--executor", "ray"], "--jobs is for --executor local"),
    (["--grid", "steps=2", "--address", "auto"], "--address is for --executor ray"),
])
def test_bad_input_is_one_message_and_nothing_is_written(args, message, cli, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = cli("sweep", recipe_file(), *args, "--seeds", "1", "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(cli, recipe_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "sweep"
    result = cli("sweep", recipe_file(), "--grid", "steps=2", "--executor", "ray", "--out", out)
    assert result.exit_code == 2 and 'pip install "sdsctl[ray]"' in result.output
    assert not out.exists()


# ----------------------------------------------------------------------------- ranking

def _run(seed: int, match: bool | None, error: float, prompt: str = "p", **extra) -> dict:
    judged = {"palette_error": error} | ({"match": match} if match is not None else {})
    return {"prompt": prompt, "seed": seed, "seconds": 1.0, "status": "completed",
            "metrics": {"shapes-judge": judged, **extra}, "figures": {}}


def _failed(seed: int, error: str) -> dict:
    return {"prompt": "p", "seed": seed, "seconds": 0.5, "status": "failed", "error": error, "attempts": 2,
            "metrics": {}, "figures": {}}


def test_ranking_by_the_judge_with_the_spread_over_seeds():
    results = {
        # seed 0: both prompts match (1.0), seed 1: one of two (0.5) -> 0.75 ± 0.354
        "a": {"runs": [_run(0, True, 0.2, "p"), _run(0, True, 0.2, "q"),
                       _run(1, True, 0.3, "p"), _run(1, False, 0.3, "q")]},
        "b": {"runs": [_run(0, True, 0.1, "p"), _run(0, True, 0.1, "q"),
                       _run(1, True, 0.1, "p"), _run(1, True, 0.1, "q")]},
        "c": {"runs": [_run(0, True, 0.05, "p"), _run(0, True, 0.05, "q"),
                       _run(1, True, 0.05, "p"), _run(1, False, 0.05, "q")]},
        "d": {"runs": [_failed(0, "RunFailed: non-finite"), _failed(1, "RunFailed: non-finite")]},
    }
    by = parse_rank_by(None)
    rows = rank(results, by)
    # c beats a on palette error
    assert [(r.label, r.rank) for r in rows] == [("b", 1), ("c", 2), ("a", 3), ("d", None)]
    a = rows[2]
    assert a.seeds == {0: 1.0, 1: 0.5} and a.value["mean"] == pytest.approx(0.75)
    assert a.value["std"] == pytest.approx(0.35355, abs=1e-4)
    text = ranked_table(rows, by)
    assert "| 3 | a | 75% ± 35% | 0.25 ± 0.0707 | 4/4 | 1.0 |" in text
    assert "| – | d | failed | n/a | 0/2, 2 failed | n/a |" in text
    assert "- d: 'p' seed 1: RunFailed: non-finite (2 attempts)" in text


def test_ranking_by_a_chosen_number_and_by_clip_score():
    results = {"lo": {"runs": [_run(0, True, 0.1, clip={"score": 20.0}), _run(1, True, 0.1, clip={"score": 22.0})]},
               "hi": {"runs": [_run(0, True, 0.3, clip={"score": 30.0}), _failed(1, "boom")]}}
    assert [r.label for r in rank(results, parse_rank_by(None, clip=True))] == ["hi", "lo"]
    by_error = parse_rank_by("shapes-judge.palette_error")
    assert by_error.lower and [r.label for r in rank(results, by_error)] == ["lo", "hi"]
    assert [r.label for r in rank(results, parse_rank_by("shapes-judge.palette_error:max"))] == ["hi", "lo"]
    rows = rank(results, parse_rank_by("no.such"))
    assert all(r.rank is None for r in rows)
    assert "no run has a number named no.such" in ranked_table(rows, parse_rank_by("no.such"))
    with pytest.raises(SdsctlError, match="expected judge"):
        parse_rank_by("clip.score:up")


# ----------------------------------------------------------------------------- local executor

def test_a_sweep_end_to_end_then_every_run_reused(cli, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    args = ("sweep", recipe_file(), "--grid", "guidance.guidance_scale=7.5,20", "--seeds", "2", "--steps", "2",
            "--no-live", "--out", out)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["guidance_scale=7.5", "guidance_scale=20"]
    for res, scale in zip(results.values(), (7.5, 20)):
        assert res["grid"] == {"guidance.guidance_scale": scale}
        assert res["resolved"]["guidance"]["guidance_scale"] == scale
        assert [r["seed"] for r in res["runs"]] == [0, 1] and {r["status"] for r in res["runs"]} == {"completed"}
        assert res["summary"]["rank"]["rank"] in (1, 2) and set(res["summary"]["rank"]["per_seed"]) == {"0", "1"}
    md = (out / "compare.md").read_text()
    assert md.startswith("Ranked by the judge's match rate") and "| setting | judge match |" in md
    assert "Ranking" in (out / "report.html").read_text() and (out / "grid.png").is_file()
    assert len(finals(out)) == 4
    again = cli(*args)
    assert again.exit_code == 0 and "reused 4 of 4 runs" in again.output and "model loaded 0 time(s)" in again.output


class Flaky:
    """A guidance plugin for tests: SDS whose first ``failures`` runs in this process raise mid-run."""

    seen: dict[int, int] = {}

    @classmethod
    def component(cls):
        from sdsctl_plugins.sds import SDS as sds

        class FlakySDS(sds):
            class Config(sds.Config):
                name: str = "flaky"
                failures: int = 0

            def score(self, z, times):
                n = cls.seen.get(self.config.failures, 0)
                if n < self.config.failures:
                    cls.seen[self.config.failures] = n + 1
                    raise RuntimeError(f"flaky failure {n + 1} of {self.config.failures}")
                return super().score(z, times)

        return FlakySDS


@pytest.fixture
def flaky(register_plugin):
    import sdsctl

    Flaky.seen = {}

    class Plugin:
        @sdsctl.hookimpl
        def register_guidances(self, register):
            register("flaky", Flaky.component())

    register_plugin(Plugin(), "flaky-guidance")
    return Flaky


def test_a_failed_run_is_retried_once_then_reported(cli, recipe_file, tmp_path, flaky):
    recipe = recipe_file({"guidance": {"name": "flaky", "guidance_scale": 20}})
    out = tmp_path / "sweep"
    args = ("sweep", recipe, "--grid", "guidance.failures=0,1,5", "--seeds", "1", "--steps", "2", "--no-live",
            "--out", out)
    result = cli(*args)
    assert result.exit_code == 1, result.output  # a run failed twice: all outputs written, then exit 1
    runs = {label: res["runs"][0] for label, res in json.loads((out / "compare.json").read_text()).items()}
    assert (runs["failures=0"]["status"], runs["failures=0"]["attempts"]) == ("completed", 1)
    assert (runs["failures=1"]["status"], runs["failures=1"]["attempts"]) == ("completed", 2)
    assert (runs["failures=5"]["status"], runs["failures=5"]["attempts"]) == ("failed", 2)
    assert "flaky failure 2 of 5" in runs["failures=5"]["error"]
    assert "flaky failure 1 of 1" in result.output and "trying once more" in result.output
    md = (out / "compare.md").read_text()
    assert "| – | failures=5 | failed |" in md and "flaky failure 2 of 5" in md
    assert "failed" in (out / "report.html").read_text() and (out / "grid.png").is_file()
    assert "1 run(s) failed twice" in result.output
    # again: the finished runs are reused, the failed one is tried again (twice more)
    again = cli(*args)
    assert again.exit_code == 1 and "reused 2 of 3 runs" in again.output and "flaky failure 4 of 5" in again.output


def test_worker_processes_pin_one_gpu_each_and_share_the_cores(monkeypatch):
    from sdsctl.experiments.executors import worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    envs = [worker_env(slot, ["2", "5"], jobs=3) for slot in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"5"}
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(0, [], jobs=2)  # no GPUs: nothing to pin


def test_jobs_workers_give_the_same_images_as_one_process(cli, recipe_file, tmp_path):
    recipe = recipe_file()
    args = ("sweep", recipe, "--grid", "guidance.guidance_scale=7.5,20", "--seeds", "1", "--steps", "3", "--no-live")
    assert cli(*args, "--out", tmp_path / "one").exit_code == 0
    result = cli(*args, "--jobs", "2", "--out", tmp_path / "two")
    assert result.exit_code == 0, result.output
    assert "2 worker processes" in result.output
    one, two = finals(tmp_path / "one"), finals(tmp_path / "two")
    assert len(one) == 2 and one == two


def _ctrl_c_after_the_first_run(args: list[str]) -> tuple[int, str]:
    """Run ``sdsctl ARGS`` in its own process, press Ctrl-C when its first run is reported
    finished, and return its exit code and stderr."""
    driver = subprocess.Popen([*SDSCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in driver.stdout:
            if "[1/3]" in line:
                driver.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail(f"no run finished: {driver.stderr.read()}")
        _, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    return driver.returncode, err


def test_ctrl_c_stops_the_worker_processes_and_keeps_every_finished_run(cli, recipe_file, tmp_path):
    recipe = recipe_file({"output": {"preview_every": 100, "checkpoint_every": 100}})
    out = tmp_path / "sweep"
    # three runs on two workers: the short one ends first, the long one is then mid-run, the last waits
    args = ["sweep", str(recipe), "--grid", "steps=20,300,301", "--seeds", "1", "--out", str(out)]
    returncode, err = _ctrl_c_after_the_first_run([*args, "--jobs", "2"])
    assert returncode == 130, err
    assert "run the same command again" in err
    states = []
    for folder in (out / "runs").glob("*/*"):
        assert not (folder / ".lock").exists(), f"a worker still holds {folder}"  # every worker has ended
        summary = json.loads((folder / "summary.json").read_text())
        states.append(summary["status"])
        assert summary["status"] in ("completed", "interrupted")
        if summary["status"] == "interrupted":
            assert (folder / "state.pt").is_file() and summary["steps_done"] < 300
    assert 1 <= states.count("completed") < 3
    again = cli(*args, "--no-live")
    assert again.exit_code == 0, again.output
    done, interrupted = states.count("completed"), states.count("interrupted")
    assert f"reused {done} of 3 runs, continued {interrupted} interrupted, ran {3 - done - interrupted}" in again.output


def test_ctrl_c_while_a_worker_starts_still_stops_and_waits_for_it(monkeypatch):
    """A Ctrl-C that lands while a worker process is being started (inside its Popen) is held
    until the pool knows the worker: the worker is then asked to stop and waited for, instead
    of running on, unknown, after the driver has exited."""
    import threading

    from sdsctl.experiments import executors
    from sdsctl.experiments.runtask import Outcome

    started = []
    child = ("import json, signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: (print(json.dumps({'status': 'interrupted'})), sys.exit(0)))\n"
             "sys.stdin.read()\n"
             "time.sleep(60)\n")

    class StartingWorker:
        def __init__(self, spec, mode, attempt, slot, env, done):
            self.spec, self.attempt, self.slot = spec, attempt, slot
            self.reported = threading.Event()
            self.proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, start_new_session=True)
            started.append(self)
            threading.Thread(target=self._wait, args=(done,), daemon=True).start()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while the worker is still being started

        def _wait(self, done):
            out, _ = self.proc.communicate("{}")
            lines = out.strip().splitlines()  # none when the signal came before the child's handler
            done.put((self, Outcome(**json.loads(lines[-1])) if lines else Outcome("failed")))
            self.reported.set()

        def interrupt(self):
            self.proc.send_signal(signal.SIGINT)

    monkeypatch.setattr(executors, "_Worker", StartingWorker)
    monkeypatch.setattr(executors, "visible_gpus", lambda: [])
    try:
        with pytest.raises(executors.Interrupted, match="stopped 1 running run"):
            spec = type("Spec", (), {"state": "new"})()
            executors.LocalExecutor(jobs=2)._pool([spec], executors.Events())
        assert len(started) == 1 and started[0].proc.poll() is not None  # asked to stop, and ended
    finally:
        for worker in started:
            if worker.proc.poll() is None:
                worker.proc.kill()


# ----------------------------------------------------------------------------- Ray

def test_ray_gives_the_local_images_and_either_executor_reuses_the_other_s_runs(cli, recipe_file, tmp_path,
                                                                                 ray_session):
    args = ("sweep", recipe_file(), "--grid", "guidance.guidance_scale=7.5,20", "--seeds", "2", "--steps", "2",
            "--no-live")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert cli(*args, "--out", local).exit_code == 0
    result = cli(*args, "--executor", "ray", "--out", on_ray)
    assert result.exit_code == 0, result.output
    assert "Ray tasks on a local Ray instance" in result.output and "ran 4" in result.output
    assert len(finals(local)) == 4 and finals(local) == finals(on_ray)  # byte-identical, same folders
    ray_results = json.loads((on_ray / "compare.json").read_text())
    assert all(str(on_ray) in r["run_dir"] for res in ray_results.values() for r in res["runs"])
    assert cli(*args, "--executor", "ray", "--out", local).output.count("(reused)") == 4
    assert "reused 4 of 4 runs" in cli(*args, "--out", on_ray).output


def test_ray_continues_an_interrupted_run_from_the_files_it_ships(cli, recipe_file, tmp_path, ray_session):
    r = recipe_file()
    assert cli("compare", r, "--seeds", "1", "--steps", "2", "--out", tmp_path / "short").exit_code == 0
    out = tmp_path / "cmp"
    assert cli("compare", r, "--seeds", "1", "--steps", "4", "--out", out).exit_code == 0
    short_runs = json.loads((tmp_path / "short" / "compare.json").read_text())["recipe"]["runs"]
    (short,) = [Path(x["run_dir"]) for x in short_runs]
    (run,) = [Path(x["run_dir"]) for x in json.loads((out / "compare.json").read_text())["recipe"]["runs"]]
    final = (run / "final.png").read_bytes()
    shutil.copy(short / "state.pt", run / "state.pt")  # the 4-step run, as if interrupted after step 2
    (run / "metrics.jsonl").write_text("\n".join((run / "metrics.jsonl").read_text().splitlines()[:2]) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "steps_done": 2}))
    again = cli("compare", r, "--seeds", "1", "--steps", "4", "--executor", "ray", "--out", out)
    assert again.exit_code == 0 and "continued 1 interrupted" in again.output, again.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "final.png").read_bytes() == final


def _faulty_task(marker_dir: Path, fault: str):
    """A Ray task function: the real one (``run_shipped``), whose run meets ``fault`` at its first
    step -- ``raise`` or ``kill`` (its worker process) -- for the first N attempts, N being the
    run's guidance scale (0, 1 or 5: never, once, always). Attempts are counted in files."""

    def task_fn(task):
        import hashlib
        import os
        import signal
        from pathlib import Path

        import yaml

        from sdsctl.experiments.runtask import Quiet, run_shipped

        failures = int(yaml.safe_load(task.recipe_yaml)["guidance"]["guidance_scale"])
        key = hashlib.sha256(task.recipe_yaml.encode()).hexdigest()[:12]
        attempt = len(list(Path(marker_dir).glob(f"{key}.*"))) + 1
        (Path(marker_dir) / f"{key}.{attempt}").touch()

        class Fault(Quiet):
            def step(self, record):
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure, attempt {attempt}")

        return run_shipped(task, reporter=Fault() if attempt <= failures else None)

    return task_fn


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_ray_retries_a_failed_or_lost_run_and_reports_one_that_keeps_failing(fault, recipe_file, tmp_path, ray_session):
    from sdsctl.experiments.compare import run_settings
    from sdsctl.experiments.executors import RayExecutor

    recipe = recipe_file({"steps": 2})
    markers = tmp_path / "markers"
    markers.mkdir()
    lines: list[str] = []
    executor = RayExecutor(task_fn=_faulty_task(markers, fault))
    grids = parse_grids(["guidance.guidance_scale=0,1,5"], [])
    out = tmp_path / "sweep"
    results = run_settings(settings(str(recipe), grids), [("a red circle on a blue background", 0)], out,
                           echo=lines.append, executor=executor, kind="sweep")
    runs = {label: res["runs"][0] for label, res in results.items()}
    assert runs["guidance_scale=0"]["status"] == "completed"
    assert runs["guidance_scale=1"]["status"] == "completed"  # retried (raise) or rescheduled (kill)
    assert runs["guidance_scale=5"]["status"] == "failed"
    error = runs["guidance_scale=5"]["error"]
    assert ("injected failure, attempt 2" in error) if fault == "raise" else ("died" in error)
    assert len(list(markers.glob("*"))) == 1 + 2 + 2  # attempts: 1 (never), 2 (once), 2 (always, then reported)
    assert (Path(runs["guidance_scale=1"]["run_dir"]) / "final.png").is_file()  # installed on the driver
    md = (out / "compare.md").read_text()
    assert "| – | guidance_scale=5 | failed |" in md and "1 failed" in md


def test_ray_refuses_more_cpus_per_run_than_any_node_has(recipe_file, tmp_path, ray_session):
    from sdsctl.experiments.compare import compare
    from sdsctl.experiments.executors import RayExecutor

    with pytest.raises(SdsctlError, match="--cpus-per-run 64: no node of the Ray cluster has that many CPUs"):
        compare([str(recipe_file())], [("a red circle on a blue background", 0)], tmp_path / "cmp",
                echo=lambda *_: None, executor=RayExecutor(cpus_per_run=64))
    assert not (tmp_path / "cmp" / "runs").exists()  # refused before any run



def test_ctrl_c_on_ray_cancels_the_outstanding_tasks_and_keeps_every_finished_run(cli, recipe_file, tmp_path,
                                                                                  ray_session):
    """The driver in its own process, with its own local Ray instance: Ctrl-C after the first
    run cancels the two outstanding tasks (a cancelled run ran in a scratch folder of its
    worker: nothing of it is left half-written), exits 130, and the same command again reuses
    the finished run and runs the other two."""
    recipe = recipe_file({"output": {"preview_every": 100, "checkpoint_every": 100}})
    out = tmp_path / "sweep"
    args = ["sweep", str(recipe), "--grid", "steps=20,300,301", "--seeds", "1", "--out", str(out), "--executor", "ray"]
    returncode, err = _ctrl_c_after_the_first_run([*args, "--no-live"])
    assert returncode == 130, err
    assert "cancelled 2 outstanding Ray task(s)" in err and "run the same command again" in err
    folders = list((out / "runs").glob("*/*"))
    assert [json.loads((f / "summary.json").read_text())["status"] for f in folders] == ["completed"]
    assert not (folders[0] / ".lock").exists()
    again = cli(*args, "--no-live")
    assert again.exit_code == 0, again.output
    assert "reused 1 of 3 runs, continued 0 interrupted, ran 2" in again.output


def test_a_misspelled_rank_by_is_refused_before_any_run(cli, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = cli("sweep", recipe_file(), "--grid", "guidance.guidance_scale=7.5,30", "--seeds", "1",
                 "--rank-by", "shapes-judge.iou", "--out", out, "--no-live")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--rank-by shapes-judge.iou: no run will have a number by that name" in result.stderr
    assert "did you mean 'shapes-judge.shape_iou'?" in result.stderr
    assert not out.exists()
    clip = cli("sweep", recipe_file(), "--grid", "guidance.guidance_scale=7.5,30", "--seeds", "1",
               "--rank-by", "clip.score", "--out", out, "--no-live")
    assert clip.exit_code == 2 and "clip.score needs --clip DIR" in clip.stderr and not out.exists()


def test_the_first_party_metrics_declare_the_numbers_they_report():
    """``Metric.keys`` (what --rank-by is checked against) is what the metric's reading holds."""
    import torch

    from sdsctl import plugins

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name in ("shapes-judge", "image-stats"):
        cls = plugins.components("metrics")[name].obj
        reading = cls.__call__(object.__new__(cls), image, "a red circle on a blue background")
        numbers = {k for k, v in reading.items() if isinstance(v, (int, float)) and not isinstance(v, str)}
        assert set(cls.keys) == numbers, name


@pytest.mark.parametrize("verbose", [False, True])
def test_rays_own_notices_are_shown_with_v_only(monkeypatch, verbose):
    """Ray's "Token authentication is enabled" warning comes from its logger at WARNING: the
    executor starts Ray at ERROR unless ``sdsctl -v`` (SDSCTL_VERBOSE) asks for the libraries' output."""
    import logging

    pytest.importorskip("ray")
    from sdsctl.experiments.executors import RayExecutor

    executor = RayExecutor()
    seen = []
    monkeypatch.setattr(executor.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(executor.ray, "init", lambda **kwargs: seen.append(kwargs["logging_level"]))
    monkeypatch.delenv("SDSCTL_VERBOSE", raising=False)
    if verbose:
        monkeypatch.setenv("SDSCTL_VERBOSE", "1")
    assert executor._connect() is True
    assert seen == [logging.WARNING if verbose else logging.ERROR]
