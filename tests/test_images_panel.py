"""The image writer, the contact sheet, the half-block preview, the panel and the log lines."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from sdsctl.engine.images import contact_sheet, half_blocks, save_image, to_pil
from sdsctl.engine.panel import LivePanel, PlainLog


def test_save_image_is_deterministic_png(tmp_path):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    save_image(image, tmp_path / "a.png")
    save_image(image, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == (16, 16)
    assert not list(tmp_path.glob(".*tmp"))


def test_to_pil_quantizes_and_clamps():
    image = torch.tensor([0.0, 0.5, 2.0]).reshape(3, 1, 1)
    assert to_pil(image).getpixel((0, 0)) == (0, 128, 255)


def test_contact_sheet_grid(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"step_{i:06d}.png"
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(path)
        paths.append(path)
    sheet = contact_sheet(paths, gap=2)  # 64-pixel images enlarged twice, pixel for pixel, to 128
    assert sheet.size == (3 * 128 + 2 * 2, 2 * 128 + 2)
    assert sheet.getpixel((128 + 2 + 5, 5)) == (40, 0, 0)
    assert contact_sheet([]) is None


def test_contact_sheet_labels_each_preview_with_its_step(tmp_path):
    paths = []
    for step in (10, 20):
        path = tmp_path / f"step_{step:06d}.png"
        Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
        paths.append(path)
    plain, labelled = contact_sheet(paths), contact_sheet(paths, labels=True)
    assert labelled.size == (plain.size[0], plain.size[1] + 16)
    strip = np.asarray(labelled.crop((0, 128, 128, 144)))
    assert (strip < 128).any()  # dark text under the image


def test_view_copy_enlarges_small_images_pixel_for_pixel():
    from sdsctl.engine.images import view_copy

    image = torch.rand(3, 64, 64)
    big = view_copy(image, 512)
    assert big.size == (512, 512)
    small = np.asarray(to_pil(image))
    assert (np.asarray(big)[::8, ::8] == small).all() and (np.asarray(big)[7::8, 7::8] == small).all()


def test_half_blocks_use_upper_and_lower_pixel_colours():
    image = torch.zeros(3, 2, 2)
    image[0, 0] = 1.0  # top row red
    image[2, 1] = 1.0  # bottom row blue
    text = half_blocks(image, width=2)
    assert text.plain == "▀▀"
    style = text.spans[0].style
    assert style.color.triplet == (255, 0, 0) and style.bgcolor.triplet == (0, 0, 255)


RECORD = {"step": 10, "phase": "main", "t": 612, "timesteps": {"t": 612, "t_correction": 40}, "loss": 12.5,
          "norms": {"score": 3.2, "classifier": 2.0}, "lr": 0.01, "weight": 0.8}
INFO = {"title": "sds on latent-pixels", "steps": 20, "start_step": 0, "device": "cpu", "run_dir": "runs/x"}


def test_live_panel_shows_progress_timesteps_norms_preview():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="truecolor", width=120)
    panel = LivePanel(console=console, preview_width=8)
    panel.start(INFO)
    panel.step(RECORD)
    panel.preview(10, torch.rand(3, 64, 64))
    console.print(panel.render())
    panel.close()
    out = buf.getvalue()
    for part in ("10/20", "ETA", "steps/s", "phase main", "t 612", "t_correction 40", "loss 12.5",
                 "classifier 2", "lr 0.01", "device cpu", "MiB", "▀", "sds on latent-pixels"):
        assert part in out, part


def test_plain_log_prints_every_n_steps_and_the_last():
    buf = io.StringIO()
    log = PlainLog(every=5, stream=buf)
    log.start({**INFO, "steps": 12})
    for step in range(1, 13):
        log.step({**RECORD, "step": step})
    lines = buf.getvalue().splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["5/12", "10/12", "12/12"]
    assert "t 612 t_correction 40" in lines[1] and "score 3.2" in lines[1]


def _line_widths(console, renderable) -> set[int]:
    from rich.segment import Segment

    return {Segment.get_line_length(line) for line in console.render_lines(renderable, console.options, pad=False)}


def test_live_panel_says_what_loads_from_the_first_moment_and_keeps_its_width():
    console = Console(file=io.StringIO(), force_terminal=True, width=150, color_system=None)
    panel = LivePanel(console=console)
    try:
        panel.loading("loading model shapes on cpu")
        text = io.StringIO()
        Console(file=text, width=150, color_system=None).print(panel.render())
        assert "loading model shapes on cpu" in text.getvalue()
        widths = _line_widths(console, panel.render())
        panel.start({"title": "sds on latent-pixels · 'a red circle'", "steps": 1000, "start_step": 0,
                     "device": "cpu", "run_dir": "runs/x"})
        for loss, score in ((1.0, 2.0), (123456.789, 1e-9), (0.5, 98765.4321)):
            panel.step({"step": 7, "phase": "main", "t": 500, "timesteps": {"t": 500}, "loss": loss,
                        "norms": {"score": score, "classifier": score / 3}, "lr": 0.01})
            widths |= _line_widths(console, panel.render())
        panel.preview(7, torch.rand(3, 64, 64))
        widths |= _line_widths(console, panel.render())
        assert widths == {panel.width}
    finally:
        panel.close()


def test_without_a_terminal_the_reporter_is_plain_lines():
    from sdsctl.engine.panel import make_reporter

    assert isinstance(make_reporter(True), PlainLog)  # pytest captures stdout: not a terminal
    out = io.StringIO()
    log = PlainLog(5, stream=out)
    log.loading("loading model shapes on cpu")
    assert out.getvalue() == "sdsctl: loading model shapes on cpu ...\n"


def test_the_preview_does_not_move_as_the_numbers_change_or_a_note_appears():
    """The column where the preview starts is the same for short and long figures and with the
    interruption note (docs/runs.md: the panel keeps one width and its layout)."""
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    panel = LivePanel(console=console, preview_width=16)
    columns = set()
    try:
        panel.start({**INFO, "steps": 1000})
        panel.preview(10, torch.ones(3, 64, 64))
        for loss, score, note in ((1.0, 2.0, None), (123456.789, 1e-9, None),
                                  (0.5, 98765.4321, "SIGINT received: finishing the current step, then saving "
                                                    "(Ctrl-C again stops the step at once, back to the last "
                                                    "checked step)")):
            if note:
                panel.note(note)
            panel.step({**RECORD, "loss": loss, "norms": {"score": score, "classifier": score / 3}})
            text = io.StringIO()
            Console(file=text, width=120, color_system=None).print(panel.render())
            for line in text.getvalue().splitlines():
                if "▀" in line or "█" in line:
                    columns.add(min(i for i, ch in enumerate(line) if ch in "▀█▄"))
        assert len(columns) == 1, columns
    finally:
        panel.notes = []
        panel.close()
