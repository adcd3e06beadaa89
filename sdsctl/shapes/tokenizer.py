"""A CLIP byte-pair tokenizer whose merges turn every word of the shapes world into one token.

Stable Diffusion's tokenizer is a ``CLIPTokenizer`` read from ``vocab.json`` and
``merges.txt``; writing the same two files keeps the shipped prior a standard pipeline
folder that old and new ``transformers`` both load. Words outside the world fall back to
byte-level pieces (they never crash), and :func:`unknown_words` (``sdsctl.modelinfo``'s, for any
CLIP vocabulary) names them so sdsctl can warn that the prior has never seen them.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from sdsctl.modelinfo import unknown_words  # noqa: F401 -- the shapes world's checks use it from here
from sdsctl.shapes import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE on the word list until every word is a single ``</w>``-terminated token."""
    split = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(p) > 1 for p in split.values()):
        counts = collections.Counter(
            (p[i], p[i + 1]) for p in split.values() for i in range(len(p) - 1)
        )
        best = max(counts, key=lambda pair: (counts[pair], pair))
        merges.append(best)
        for w, p in split.items():
            out, i = [], 0
            while i < len(p):
                if i < len(p) - 1 and (p[i], p[i + 1]) == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            split[w] = tuple(out)
    return merges


def write_tokenizer_files(folder: Path) -> None:
    """Write ``vocab.json``, ``merges.txt`` and the configs of a CLIP tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    words = [w for w in world.vocabulary() if re.fullmatch(r"[a-z]+", w)]
    merges = _learn_merges(words)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
    }, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }, indent=2) + "\n")
