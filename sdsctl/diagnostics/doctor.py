"""``sdsctl doctor``: the study's checklist applied to a run directory, with evidence and knobs.

The study ("Investigation of the optimization") reads a failed run this way: look at the
previews; the warm-up must build a reasonable global structure (fewer warm-up steps if it
over-saturates, more if nothing shows up); the result must converge; the correction term's
weight is raised if the result is over-saturated and lowered if it is over-smooth. NFSD adds
why: a high guidance scale over-saturates, a low one (7.5) over-smooths, because the
unconditional term smooths the image. Each check below reads the run's files
(``sdsctl.engine.runread``), states its evidence in numbers and steps, and names the recipe key
to turn.

Thresholds, calibrated on the shapes prior (three prompts and seeds each: plain SDS at CFG
100 over 500 steps, SDS at CFG 7.5, robust NFSD; figures in ``docs/compare.md``):

* over-saturated: ≥ 25 % of pixels with a channel at 0 or 1 (SDS at CFG 100: 29-49 %;
  SDS at 7.5 and robust NFSD: 0-19 %, the upper end a white background);
* over-smooth: edge sharpness < 0.295 (SDS at 7.5: 0.275-0.280; robust NFSD 0.31-0.34;
  clean renders 0.34-0.50) on an image that is not over-saturated;
* not converged: the image changed by more than 0.025 (mean absolute difference, RGB in
  [0, 1]) over the last tenth of the run (finished 500-600-step runs: 0.010-0.017);
* warm-up without structure: two-tone share < 0.5 at the warm-up's end (the decoded
  Gaussian start: about 0.27; robust NFSD after 300 warm-up steps: 0.70). Its end is
  saturated even in healthy runs (robust NFSD: 44 % clipped at step 300, 0 % at 600); fewer
  warm-up steps are named only when the final image is over-saturated too;
* score norm exploded or vanished: the median ‖g‖ over the last tenth of the steps above
  10× or below 1/20 of its median over the first tenth.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from sdsctl import plugins
from sdsctl.diagnostics.scene_checks import scene_findings
from sdsctl.engine import imagestats
from sdsctl.engine.runread import RunData

OVERSATURATED_CLIPPED = 0.25
OVERSMOOTH_SHARPNESS = 0.295
CONVERGED_CHANGE = 0.025
WARMUP_TWO_TONE = 0.5
NORM_EXPLODED, NORM_VANISHED = 10.0, 1 / 20


@dataclasses.dataclass
class Finding:
    check: str  # status, phase, warmup, saturation, smoothness, convergence, score-norm
    ok: bool | None  # None: does not apply to this run
    title: str
    evidence: str
    knob: str = ""


#: a guidance scale from which raising it is no advice for smoothness (DreamFusion's SDS: 100)
HIGH_CFG = 30.0


def _ended_in_warmup(run: RunData) -> bool:
    """Whether the run's last step was a warm-up step: its main phase never ran."""
    return bool(run.records) and run.records[-1].get("phase") == "warmup"


def _knobs(recipe: dict[str, Any], in_warmup: bool = False) -> dict[str, str]:
    """What to turn, in this recipe's own keys; ``in_warmup``: the run never left its warm-up,
    so the main phase's keys (robust NFSD's ``ratio``) did nothing and more steps come first."""
    g, sched = recipe.get("guidance", {}), recipe.get("schedule", {})
    scale = g.get("guidance_scale")
    weight = "guidance.ratio" if "ratio" in g else "guidance.correction_scale" if "correction_scale" in g else None
    warm = f"schedule.warmup_steps (now {sched['warmup_steps']})" if "warmup_steps" in sched else None
    out = {}
    if in_warmup:
        main = (f"more steps: the run ended inside its warm-up ({warm}); raise steps "
                f"(now {recipe.get('steps')}) above it so that the main phase runs")
        return {"more_correction": main, "less_correction": main, "fewer_warmup": "", "more_warmup": main}
    if weight:
        out["more_correction"] = f"a larger correction weight: {weight} (now {g[weight.split('.')[1]]})"
        out["less_correction"] = f"a smaller correction weight: {weight} (now {g[weight.split('.')[1]]})"
    else:
        out["more_correction"] = (f"a lower guidance.guidance_scale (now {scale}), or a guidance with a correction "
                                  "term (robust-nfsd, nfsd) whose weight balances it")
        if scale is not None and scale >= HIGH_CFG:  # raising it further over-saturates
            out["less_correction"] = (f"nfsd / robust-nfsd, which leave the smoothing unconditional term out "
                                      f"(guidance.guidance_scale is already {scale}: higher over-saturates)")
        else:
            out["less_correction"] = (f"a higher guidance.guidance_scale (now {scale}; NFSD: at 7.5 the "
                                      "unconditional term smooths the image), or nfsd / robust-nfsd, which leave "
                                      "that term out")
    out["fewer_warmup"] = f"fewer warm-up steps: {warm}" if warm else ""
    out["more_warmup"] = f"more warm-up steps: {warm}" if warm else ""
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def diagnose(path: Path) -> dict[str, Any]:
    """Every check on the run in ``path``; ``healthy`` when none found a problem."""
    run = RunData.read(path)
    recipe, summary = run.recipe, run.summary
    steps = recipe.get("steps") or summary.get("steps") or 0
    knobs = _knobs(recipe, in_warmup=_ended_in_warmup(run))
    findings = _status_findings(path, run, steps)
    warm, warm_saturated = _warmup_finding(run, knobs)
    findings.append(warm)
    if warm.ok is False:  # the warm-up wants to be longer: no advice to shorten it
        warm_saturated = False
    findings += _final_image_findings(run, knobs, steps, warm_saturated, scene=bool(summary.get("views")))
    findings += _score_norm_findings(run.records)
    findings += scene_findings(path, summary, recipe, Finding)  # a 3D run's views and mesh
    healthy = all(f.ok is not False for f in findings)
    return {
        "run_dir": str(path), "status": summary.get("status", "unknown"), "steps_done": run.steps_done,
        "steps": steps, "guidance": recipe.get("guidance", {}).get("name"), "healthy": healthy,
        "findings": [dataclasses.asdict(f) for f in findings],
    }


def _status_findings(path: Path, run: RunData, steps: int) -> list[Finding]:
    """A failed run, or one stopped before its last step."""
    status, done = run.summary.get("status", "unknown"), run.steps_done
    if status == "failed":
        error = run.summary.get("error", "see error.log")
        if "out of memory" in error:  # resume may change the dtype and the device
            knob = (f"resume with less memory: sdsctl resume {path} --set dtype=bfloat16 (or --device cpu); "
                    "the error lists the other ways")
        else:  # resume keeps the recipe: the same step would fail again
            knob = (f"the error names the knob: change it in a new run (sdsctl run {path / 'recipe.yaml'} "
                    "--set KEY=VALUE --out NEW_DIR); `sdsctl resume` keeps the recipe and would fail again")
        return [Finding("status", False, "the run failed", error, knob)]
    if done < steps:
        return [Finding("status", False, f"the run stopped at step {done} of {steps} ({status})",
                        "the checks below read the run so far", f"continue it: sdsctl resume {path}")]
    if _ended_in_warmup(run):
        warm = run.recipe.get("schedule", {}).get("warmup_steps")
        return [Finding("phase", False, "the run never left its warm-up",
                        f"all {done} steps are warm-up steps (schedule.warmup_steps {warm}): the main phase "
                        "never ran", f"more steps: sdsctl resume {path} --set steps=N with N above {warm}")]
    return []


def _warmup_finding(run: RunData, knobs: dict[str, str]) -> tuple[Finding, bool]:
    """The warm-up: a global structure at its end; and whether it left the image saturated."""
    recipe = run.recipe
    warm = [r["step"] for r in run.records if r.get("phase") == "warmup"]
    if not (warm and (at := run.image_at(warm[-1]))):
        return Finding("warmup", None, "no warm-up phase",
                       f"schedule {recipe.get('schedule', {}).get('name')!r} has no warm-up phase"), False
    step, image = at
    st = imagestats.stats(image)
    start = run.image_at(min(run.previews)) if run.previews else None
    start_tt = imagestats.stats(start[1])["two_tone"] if start else None
    evidence = (f"two-tone share {st['two_tone']:.2f} at step {step}, the warm-up's end"
                + (f" ({start_tt:.2f} at step {start[0]})" if start else "")
                + f"; clipped pixels {st['clipped']:.0%}" + _judged(image, recipe.get("prompt", "")))
    # A warm-up at large t leaves the image saturated (robust NFSD's: 44 % clipped at step 300);
    # that is a problem only if the main phase does not remove it (the saturation check).
    warm_saturated = st["clipped"] >= OVERSATURATED_CLIPPED
    if st["two_tone"] < WARMUP_TWO_TONE:
        return Finding("warmup", False, "the warm-up built no global structure", evidence,
                       knobs["more_warmup"]), warm_saturated
    return Finding("warmup", True, "the warm-up built a global structure", evidence), warm_saturated


def _final_image_findings(run: RunData, knobs: dict[str, str], steps: int, warm_saturated: bool,
                          scene: bool = False) -> list[Finding]:
    """Saturation, smoothness and convergence of the final image (a 3D run's front view)."""
    final = run.final
    if final is None:
        return []
    st = imagestats.stats(final)
    sat_evidence = (f"{st['clipped']:.0%} of pixels have a channel at 0 or 1 (limit {OVERSATURATED_CLIPPED:.0%}); "
                    f"saturation {st['saturation']:.2f}, colourfulness {st['colorfulness']:.2f}, "
                    f"two-tone share {st['two_tone']:.2f}")
    over = st["clipped"] >= OVERSATURATED_CLIPPED
    knob = "; or ".join(k for k in (knobs["more_correction"], warm_saturated and knobs["fewer_warmup"]) if k)
    findings = [Finding("saturation", not over, "over-saturated" if over else "not over-saturated",
                        sat_evidence, knob if over else "")]
    smooth = st["sharpness"] < OVERSMOOTH_SHARPNESS and not over
    sharpness = f"edge sharpness {st['sharpness']:.3f} (over-smooth below {OVERSMOOTH_SHARPNESS})"
    rendered = run.recipe.get("parameterization", {}).get("render_size")
    side = max(Image.open(final).size) if scene and rendered else 0
    if over:  # an over-saturated image has hard edges whatever the score did: not judged
        findings.append(Finding("smoothness", None, "smoothness not judged",
                                sharpness + " -- not judged: the image is over-saturated"))
    elif rendered and rendered < side:  # a 3D run's upsampled views are smooth by construction
        findings.append(Finding("smoothness", None, "smoothness not judged",
                                f"{sharpness} -- not judged: the views are rendered at {rendered} px and upsampled "
                                f"to {side} px"))
    else:
        findings.append(Finding("smoothness", not smooth, "over-smooth" if smooth else "not over-smooth",
                                sharpness, knobs["less_correction"] if smooth else ""))
    conv = run.convergence()
    if conv and scene:  # each preview is the training view of its step: another camera every time
        findings.append(Finding("convergence", None, "convergence not judged", "the previews of a 3D run are "
                                "training views from different cameras; compare the turntable with a resumed run's"))
    elif conv:
        moving = conv["change"] > CONVERGED_CHANGE
        findings.append(Finding(
            "convergence", not moving, "not converged" if moving else "converged",
            f"the image changed by {conv['change']:.4f} from step {conv['from_step']} to {conv['to_step']} "
            f"(the last tenth; limit {CONVERGED_CHANGE})",
            f"more steps: steps (now {steps}), e.g. --set steps={int(steps * 1.5)}" if moving else ""))
    return findings


def _score_norm_findings(records: list[dict[str, Any]]) -> list[Finding]:
    """The score norm over the run: exploded, vanished or in range (from ten records on)."""
    norms = [r["norms"]["score"] for r in records if "score" in r.get("norms", {})]
    if len(norms) < 10:
        return []
    k = max(1, len(norms) // 10)
    first, last = _median(norms[:k]), _median(norms[-k:])
    ratio = last / first if first > 0 else math.inf
    evidence = (f"median score norm {first:.3g} over steps 1-{k}, {last:.3g} over steps "
                f"{records[-k]['step']}-{records[-1]['step']} (×{ratio:.2g})")
    if not math.isfinite(last) or ratio > NORM_EXPLODED:
        return [Finding("score-norm", False, "the score norm exploded", evidence,
                        "a lower optimizer.lr or guidance.guidance_scale, or optimizer.score_scale")]
    if ratio < NORM_VANISHED:
        return [Finding("score-norm", False, "the score norm vanished", evidence,
                        "the guidance stopped pulling: check the weighting and the schedule's t range")]
    return [Finding("score-norm", True, "the score norm stayed in range", evidence)]


def _judged(image: Path, prompt: str) -> str:
    """What the installed metrics read in ``image`` (``Metric.reading``: the shapes judge's
    colour and shape, for prompts of its world)."""
    readings = []
    for reg in plugins.components("metrics").values():
        said = reg.obj.reading(image, prompt)
        if said:
            readings.append(said)
    return "".join(f"; {r}" for r in readings)


def text(report: dict[str, Any]) -> str:
    lines = [f"doctor: {report['run_dir']} ({report['guidance']}, {report['steps_done']}/{report['steps']} steps, "
             f"{report['status']})"]
    for f in report["findings"]:
        mark = {True: "ok     ", False: "PROBLEM", None: "n/a    "}[f["ok"]]
        lines.append(f"  {mark} {f['title']}: {f['evidence']}")
        if f["knob"]:
            lines.append(f"          turn: {f['knob']}")
    problems = [f["title"] for f in report["findings"] if f["ok"] is False]
    lines.append("verdict: healthy -- every check passed" if report["healthy"]
                 else f"verdict: {'; '.join(problems)}")
    return "\n".join(lines) + "\n"
