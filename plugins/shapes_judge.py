"""Metric ``shapes-judge``: the shapes world's judge (``sdsctl.shapes.judge``) on a run's image.

It applies to any prior whose tokenizer knows the shapes world's words and whose images
are 64x64 (the shipped prior, or one retrained with ``sdsctl train-shapes``). Its result,
in ``summary.json`` under ``metrics.shapes-judge``: the judged background, colour and shape,
``match`` (and ``match_color``, ``match_shape``, ``match_background``) against the prompt,
the palette error and the realism figures (sharpness, noise, saturation, contrast,
brightness).

For a prompt outside the shapes world (``judge.outside_world``: "a photo of a dog") the
judge has nothing to compare with: the result is ``{"applies": false, "note": "n/a: ..."}``
and no ``match`` key, so comparisons show n/a instead of a match. ``reading`` puts the judgement
in words for ``sdsctl doctor`` ("the shapes judge sees a red circle (shape IoU 0.93)").
"""

from __future__ import annotations

import sdsctl
from sdsctl.components import Metric


class ShapesJudge(Metric):
    keys = ("shape_iou", "palette_error", "sharpness", "noise", "saturation", "contrast", "brightness",
            "match_color", "match_shape", "match_background", "match")
    verdict = "match"  # the prompt's colour, shape and background all seen
    verdict_words = {"column": "judge match", "rate": "the judge's match rate", "yes": "match", "no": "miss",
                     "none": "judge n/a"}
    headline = {"shape_iou": ("shape IoU", ".2f"), "palette_error": ("palette error", ".3f")}
    tie_break = "palette_error"
    lower_is_better = ("palette_error", "noise")

    @classmethod
    def applies_to(cls, prior) -> bool:
        from sdsctl.shapes import world  # numpy: imported when used, not when the plugin loads

        vocab = prior.tokenizer.get_vocab()
        words = [w for w in world.vocabulary() if w.isalpha()]
        return prior.image_size == world.IMAGE_SIZE and all(w + "</w>" in vocab for w in words)

    def __call__(self, image, prompt: str) -> dict:
        from sdsctl.shapes import judge

        reason = judge.outside_world(prompt)
        if reason is not None:
            return {"applies": False, "note": f"n/a: {reason}"}
        return judge.judge(image, prompt).to_dict(prompt)

    @classmethod
    def reading(cls, image, prompt: str) -> str | None:
        from sdsctl.shapes import judge

        if judge.outside_world(prompt):
            return None
        j = judge.judge(image, prompt)
        if j.shape is None:
            return "the shapes judge sees no shape"
        return f"the shapes judge sees a {j.color} {j.shape} (shape IoU {j.shape_iou:.2f})"

    @classmethod
    def prompts(cls) -> list[str]:
        from sdsctl.shapes.evaluate import all_prompts

        return all_prompts()


@sdsctl.hookimpl
def register_metrics(register):
    register("shapes-judge", ShapesJudge)
