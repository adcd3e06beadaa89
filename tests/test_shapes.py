"""The shapes world (rules, determinism, captions), its judge, and its tokenizer."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from sdsctl.shapes import judge, tokenizer, world

N_SCENES = 400
QUALITY_WORDS = {w for words in world.DEGRADATION_WORDS.values() for w in words} | set(world.GENERIC_NEGATIVE_WORDS)


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    rng = np.random.default_rng(20240501)
    return [world.sample_scene(rng) for _ in range(N_SCENES)]


# ----------------------------------------------------------------------------- world


def test_world_is_a_pure_function_of_the_seed():
    a_img, a_scenes = world.sample_batch(17, 12)
    b_img, b_scenes = world.sample_batch(17, 12)
    c_img, c_scenes = world.sample_batch(18, 12)
    assert a_img.dtype == np.float32 and a_img.shape == (12, 64, 64, 3)
    assert np.array_equal(a_img, b_img) and a_scenes == b_scenes
    assert not np.array_equal(a_img, c_img) and a_scenes != c_scenes
    assert 0 <= a_img.min() and a_img.max() <= 1


def test_shape_colour_differs_from_the_background(scenes):
    assert all(s.color != s.background for s in scenes)
    assert all(s.color in world.COLORS and s.background in world.COLORS and s.shape in world.SHAPES for s in scenes)
    # every colour, background and shape occurs
    assert {s.color for s in scenes} == set(world.COLORS) == {s.background for s in scenes}
    assert {s.shape for s in scenes} == set(world.SHAPES)


def test_bounding_box_size_and_margin(scenes):
    for s in scenes:
        assert 0.4 * world.IMAGE_SIZE <= s.size <= 0.7 * world.IMAGE_SIZE
        half = s.size / 2
        assert s.cx - half >= world.MARGIN and s.cx + half <= world.IMAGE_SIZE - world.MARGIN
        assert s.cy - half >= world.MARGIN and s.cy + half <= world.IMAGE_SIZE - world.MARGIN


def test_clean_renders_use_exact_palette_colours(scenes):
    for s in scenes[:200]:
        clean = dataclasses.replace(s, degradation=None)
        img = world.render(clean)  # no pixel noise
        bg, fg = world.palette(s.background), world.palette(s.color)
        # the outer two pixels are pure background (the judge reads its colour there)
        border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                                 img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
        assert (border == bg).all(), s
        # the shape's centre has exactly its palette colour
        assert (img[int(s.cy), int(s.cx)] == fg).all(), s
        # anti-aliased edge pixels are blends of the two colours, nothing else
        t = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
        blend = bg + t[..., None] * (fg - bg)
        assert np.abs(img - blend).max() < 1e-5 and t.min() > -1e-6 and t.max() < 1 + 1e-6
        inside = (img == fg).all(-1).mean()
        assert 0.05 < inside < 0.7  # the shape covers a real part of the image


def test_palette_colours_are_the_documented_ones():
    assert np.array_equal(world.palette("red"), np.array([215, 40, 40], dtype=np.float32) / 255)
    assert len(world.COLORS) == 8 and len(set(world.COLORS.values())) == 8


def test_captions_follow_the_template(scenes):
    colors, shapes = "|".join(world.COLORS), "|".join(world.SHAPES)
    words = "|".join(re.escape(w) for w in sorted(QUALITY_WORDS | set(world.POSITIVE_WORDS), key=len, reverse=True))
    pattern = re.compile(rf"a (?:({words}) )?({colors}) ({shapes}) on a ({colors}) background((?:, (?:{words}))*)")
    for s in scenes:
        m = pattern.fullmatch(s.caption)
        assert m, s.caption
        assert (m.group(2), m.group(3), m.group(4)) == (s.color, s.shape, s.background)
        extra = ([m.group(1)] if m.group(1) else []) + [w for w in m.group(5).split(", ") if w]
        if s.degradation is None:
            assert not QUALITY_WORDS & set(extra), s.caption  # quality words only on degraded images
            assert len(extra) <= 1 and set(extra) <= set(world.POSITIVE_WORDS)
        else:
            assert extra[0] in world.DEGRADATION_WORDS[s.degradation], s.caption
            assert set(extra[1:]) <= set(world.GENERIC_NEGATIVE_WORDS), s.caption
            assert not set(extra) & set(world.POSITIVE_WORDS)
        assert world.parse_prompt(s.caption) == {"color": s.color, "shape": s.shape, "background": s.background}


def test_about_a_fifth_of_the_world_is_degraded():
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng) for _ in range(2000)]
    share = sum(s.degradation is not None for s in scenes) / len(scenes)
    assert 0.17 <= share <= 0.23
    assert {s.degradation for s in scenes} - {None} == set(world.DEGRADATION_WORDS)
    rng = np.random.default_rng(7)
    assert all(world.sample_scene(rng, degradation=False).degradation is None for _ in range(200))
    assert world.sample_scene(rng, degradation="dark").degradation == "dark"


# ----------------------------------------------------------------------------- judge


def test_judge_recovers_attributes_of_fresh_clean_renders():
    images, scenes = world.sample_batch(987_654_321, 320, degradation=False)
    right = total = 0
    palette_errors = []
    for img, s in zip(images, scenes):
        j = judge.judge(img, s.plain_caption)
        right += (j.color == s.color) + (j.shape == s.shape) + (j.background == s.background)
        total += 3
        palette_errors.append(j.palette_error)
    assert right / total >= 0.99
    assert float(np.mean(palette_errors)) < 0.02  # only the 1/255 pixel noise and anti-aliasing


@pytest.mark.parametrize("kind", ["noise", "blur", "dark", "lowcontrast", "oversaturated"])
def test_judge_recognizes_the_shape_of_degraded_renders(kind):
    """Quality-word samples are judged on their shape too, so degraded images must be readable."""
    images, scenes = world.sample_batch(4242, 120, degradation=kind)
    right = np.mean([judge.judge(img).shape == s.shape for img, s in zip(images, scenes)])
    assert right >= 0.88, (kind, right)


def test_judge_reads_tensors_and_other_sizes():
    import torch

    images, scenes = world.sample_batch(5, 4, degradation=False)
    for img, s in zip(images, scenes):
        big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # 128x128
        tensor = torch.from_numpy(img).permute(2, 0, 1)
        for view in (big, tensor):
            j = judge.judge(view)
            assert (j.color, j.shape, j.background) == (s.color, s.shape, s.background)


def test_judge_match_and_palette_error_against_a_prompt():
    images, scenes = world.sample_batch(3, 1, degradation=False)
    img, s = images[0], scenes[0]
    j = judge.judge(img, s.plain_caption)
    assert j.matches(s.plain_caption)["match"]
    other = next(c for c in world.COLORS if c not in (s.color, s.background))
    wrong = f"a {other} {s.shape} on a {s.background} background"
    result = judge.judge(img, wrong).to_dict(wrong)
    assert result["match_color"] is False and result["match_shape"] and result["match"] is False
    assert result["palette_error"] > j.palette_error + 0.01  # the shape is far from the asked colour


def test_judge_of_a_flat_image_finds_no_shape():
    flat = np.broadcast_to(world.palette("green"), (64, 64, 3)).copy()
    j = judge.judge(flat)
    assert (j.background, j.color, j.shape) == ("green", None, None)


# figure, direction (+1 up, -1 down)
EFFECTS = {
    "blur": ("sharpness", -1),
    "lowres": ("sharpness", -1),
    "noise": ("noise", +1),
    "oversaturated": ("saturation", +1),
    "lowcontrast": ("contrast", -1),
    "dark": ("brightness", -1),
}
GREYS = {"white", "black"}


@pytest.mark.parametrize("kind", list(EFFECTS))
def test_each_degradation_moves_its_figure_the_right_way(kind):
    figure, sign = EFFECTS[kind]
    rng = np.random.default_rng(31)
    checked = 0
    for i in range(20):
        s = world.sample_scene(rng, degradation=False)
        for strength in (0.0, s.strength, 1.0):
            clean = judge.judge(world.render(s, np.random.default_rng(i)), s.plain_caption)
            bad_scene = dataclasses.replace(s, degradation=kind, strength=strength)
            bad = judge.judge(world.render(bad_scene, np.random.default_rng(i)), s.plain_caption)
            change = sign * (getattr(bad, figure) - getattr(clean, figure))
            if kind == "oversaturated" and {s.color, s.background} <= GREYS:
                assert change >= 0  # two greys have no saturation to raise
                continue
            assert change > 0, (kind, figure, s, strength, getattr(clean, figure), getattr(bad, figure))
            checked += 1
    assert checked >= 45


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.write_tokenizer_files(folder)
    return folder, CLIPTokenizer.from_pretrained(str(folder))


def test_tokenizer_files_exist(shapes_tokenizer, tiny_prior):
    folder, _ = shapes_tokenizer
    for where in (folder, tiny_prior / "tokenizer"):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (where / name).is_file() and (where / name).stat().st_size > 0, where / name
        assert (where / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert (folder / "vocab.json").read_bytes() == (tiny_prior / "tokenizer" / "vocab.json").read_bytes()


def test_every_world_word_is_one_token(shapes_tokenizer):
    _, tok = shapes_tokenizer
    vocab = tok.get_vocab()
    words = world.vocabulary()
    assert {"red", "triangle", "background", "blurry", "low", "contrast", "resolution"} <= set(words)
    for word in words:
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
        if word.isalpha():
            assert ids[1] == vocab[word + "</w>"]


def test_captions_tokenize_word_by_word(shapes_tokenizer, scenes):
    _, tok = shapes_tokenizer
    for s in scenes[:50]:
        pieces = re.findall(r"[a-z]+|[^\sa-z]", s.caption)
        ids = tok(s.caption).input_ids
        assert len(ids) == len(pieces) + 2 <= tokenizer.MAX_LENGTH, s.caption
        assert tokenizer.unknown_words(tok, s.caption) == []


def test_unknown_words_do_not_crash_and_are_reported(shapes_tokenizer):
    _, tok = shapes_tokenizer
    prompt = "a red zebra on the moon, 4k photograph"
    ids = tok(prompt).input_ids
    assert len(ids) > 2 + 8  # unknown words fall back to several pieces each
    assert tokenizer.unknown_words(tok, prompt) == ["zebra", "the", "moon", "4", "k", "photograph"]
    assert tokenizer.unknown_words(tok, "a red circle on a blue background, low-resolution") == []
    assert tokenizer.unknown_words(tok, "Red CIRCLE") == []  # lower-cased like the tokenizer


def test_model_description_reports_unknown_words(tiny_prior):
    from sdsctl.prior import describe

    info = describe(str(tiny_prior))
    assert info.unknown_words("a purple square on a cyan background, grainy") == []
    assert info.unknown_words("a purple giraffe") == ["giraffe"]
