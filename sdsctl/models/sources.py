"""Where a model's files come from, and what can be read from them without loading weights.

A recipe's ``model.path`` is ``shapes`` (the prior shipped in ``sdsctl/shapes/prior/``), a
local diffusers pipeline folder, or a Hugging Face Hub id. A hub id is resolved from the
local Hugging Face cache only, unless the user opts in to downloading
(``model.allow_download: true`` / ``--allow-download``): a run never reaches the network
by surprise.

Parameter counts and the dtype on disk come from the safetensors headers (8 bytes of
length, then a JSON table of every tensor's dtype and shape) and from sharded checkpoints'
``*.safetensors.index.json``: no tensor is read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from sdsctl.errors import InvalidConfig, SdsctlError

SHAPES_PRIOR = Path(__file__).resolve().parent.parent / "shapes" / "prior"
#: single-file checkpoints as model sites share them (the original, non-diffusers layout)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: the configuration files describe() reads (and, for a hub id, takes from the cache)
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/*_config.json", "scheduler/*.json", "tokenizer*/*",
                   "*/*.safetensors.index.json"]
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def single_file(path: str) -> Path | None:
    """``path`` as a single-file checkpoint, or None when it is not one."""
    file = Path(path).expanduser()
    return file if file.suffix in SINGLE_FILE_SUFFIXES and file.is_file() else None


#: key prefixes of a diffusers-layout component file, and what such a file holds
_DIFFUSERS_LAYOUT = (
    (("encoder.conv_in.", "decoder.conv_in.", "quant_conv."), "a diffusers VAE's weights"),
    (("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "time_embedding."), "a diffusers UNet's weights"),
    (("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "pos_embed."),
     "a diffusers transformer's weights"),
    (("text_model.", "embeddings.", "encoder.layers.", "encoder.block.", "shared."), "a text encoder's weights"),
)
#: prefixes of the denoiser in the original layout (SD 1.x/2.x/XL/3: ``model.diffusion_model.``;
#: FLUX's published files: the bare transformer, ``double_blocks.``)
_ORIGINAL_DENOISER = ("model.diffusion_model.", "double_blocks.")


def check_single_file(file: Path) -> None:
    """Refuse a ``.safetensors`` file that is not an original-layout checkpoint (its keys are
    read from the header, no tensor loads): a diffusers component file (a UNet's
    ``diffusion_pytorch_model.safetensors``) would otherwise be taken for a whole model and fail
    only when the run loads it. A ``.ckpt`` (a pickle) is left to diffusers' loader."""
    if file.suffix != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # not a safetensors file at all
        raise InvalidConfig(f"{file} cannot be read as a safetensors file ({type(exc).__name__}: {exc})",
                            field="path") from exc
    if any(k.startswith(_ORIGINAL_DENOISER) for k in keys):
        return
    holds = next((what for prefixes, what in _DIFFUSERS_LAYOUT if any(k.startswith(prefixes) for k in keys)),
                 f"{len(keys)} tensors, none of a denoiser in the original layout (model.diffusion_model.*)")
    raise InvalidConfig(f"{file} is not an original-layout checkpoint: it holds only {holds} (keys such as "
                        f"{', '.join(keys[:2])}). A model site's single file holds the whole model; for a "
                        "diffusers component file, use the pipeline folder it belongs to (--model DIR)",
                        field="path")


def resolve_source(path: str) -> tuple[str, str]:
    """``("folder", path)`` or ``("hub", id)`` for a recipe's ``model.path``."""
    if path == "shapes":
        if not (SHAPES_PRIOR / "model_index.json").is_file():
            raise InvalidConfig(
                f"the shapes prior is not installed (expected in {SHAPES_PRIOR}); it is the product "
                "of the shapes training (`sdsctl train-shapes`) -- until it is there, use a diffusers "
                "pipeline folder: --model DIR (or model: DIR in the recipe)",
                field="path",
            )
        return "folder", str(SHAPES_PRIOR)
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise InvalidConfig(
                f"{path} is not a diffusers pipeline folder: it has no model_index.json (save a pipeline "
                "with `pipe.save_pretrained(DIR)`, or download one with `hf download OWNER/NAME --local-dir DIR`)",
                field="path",
            )
        return "folder", str(folder)
    if folder.exists():
        raise InvalidConfig(f"{path} is a file; the model is a diffusers folder, a hub id, or a single-file "
                            f"checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}) with model.config", field="path")
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return "hub", path
    raise InvalidConfig(f"model folder {path} not found (nor is it a hub id like 'owner/name')", field="path")


def library_detail(exc: BaseException) -> str:
    """``(Type: message)`` of a library's exception for the line under sdsctl's own message,
    without the library's advice about its own keywords (Hugging Face's "pass
    'local_files_only=False'"): sdsctl's message says what to do in sdsctl's terms."""
    import re

    sentences = re.split(r"(?<=\.)\s+", str(exc).strip())
    kept = [s for s in sentences if "local_files_only" not in s and "HF_HUB_OFFLINE" not in s]
    return f"({type(exc).__name__}: {' '.join(kept) or type(exc).__name__})"


def hub_hint(repo_id: str, allow_download: bool = False) -> str:
    """What to do when a hub model is not available."""
    if allow_download:
        where = "could not download it (no network, a private or gated repository, or a wrong id?)"
    else:
        where = ("it is not in the local Hugging Face cache, and sdsctl does not download unless asked "
                 "(--allow-download, or model.allow_download: true in the recipe)")
    return (
        f"could not get model {repo_id!r} from the Hugging Face Hub: {where}. To use a local copy, "
        f"download it on a machine with network: `hf download {repo_id} --local-dir DIR` (older "
        f"huggingface_hub: `huggingface-cli download {repo_id} --local-dir DIR`), then pass --model DIR"
    )


def config_folder(kind: str, source: str, allow_download: bool = False) -> Path:
    """A local folder holding the model's configuration files (for a hub id: the cache's snapshot)."""
    if kind == "folder":
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=CONFIG_PATTERNS, local_files_only=not allow_download))
    except Exception as exc:
        raise SdsctlError(f"{hub_hint(source, allow_download)}\n  {library_detail(exc)}") from exc


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdsctlError(f"cannot read the model's configuration {path}: {exc}") from exc


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files a ``from_pretrained(..., variant=variant)`` would read in ``folder``."""

    def variant_of(name: str) -> str | None:
        """model.safetensors -> None, model.fp16.safetensors -> fp16; a sharded component's index:
        model.safetensors.index.json -> None, model.safetensors.index.fp16.json -> fp16 (diffusers'
        and transformers' ``_add_variant``; its shards are model.fp16-00001-of-00002.safetensors)."""
        if ".safetensors.index" in name:
            return name.removesuffix(".json").split(".safetensors.index")[1].lstrip(".") or None
        parts = name.split(".")
        return parts[-2] if len(parts) > 2 else None

    for pattern in ("*.safetensors.index*.json", "*.safetensors"):
        found = sorted(p for p in folder.glob(pattern) if variant_of(p.name) == variant)
        if not found:
            continue
        if pattern.endswith(".json"):
            shards = sorted(set(read_json(found[0]).get("weight_map", {}).values()))
            return [folder / s for s in shards]
        return found
    return []


def weights_summary(folder: Path, variant: str | None = None) -> dict:
    """``{"parameters": n, "dtype": "float16"}`` of a component's weights, from headers alone
    (``None`` for both where no safetensors files are there, e.g. a hub cache holding only configs)."""
    files = _weight_files(folder, variant)
    if not files or not all(f.is_file() for f in files):
        return {"parameters": None, "dtype": None}
    count, dtypes = 0, set()
    for f in files:
        for name, entry in _header(f).items():
            if name == "__metadata__":
                continue
            count += math.prod(entry["shape"])
            dtypes.add(_SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]))
    return {"parameters": count, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed: " + ", ".join(sorted(dtypes))}
