"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022) of 2-D points (u, v) in [0, 1]²
and of 3-D points in [0, 1]³ (the scenes of ``nerf``).

Two backends compute the same function from the same flat parameter vector:

* ``tcnn``: tiny-cuda-nn's ``HashGrid`` (``tinycudann.Encoding``), CUDA only. ``tinycudann`` is
  optional and imported lazily, never when this module is imported.
* ``torch``: pure PyTorch, written from tiny-cuda-nn's definition (``include/tiny-cuda-nn/
  encodings/grid.h`` and ``common_device.h``, read at commit ``6ee3546``, April 2026) so that a
  state dict moves between the backends unchanged (both keep one parameter named ``params``).

``auto`` picks ``tcnn`` when it imports and the device is CUDA, else ``torch``.

Matched from tiny-cuda-nn (and tested against a loop-based reference in the tests):

* level scale ``s = exp2(level * log2(per_level_scale)) * base_resolution - 1`` and resolution
  ``ceil(s) + 1``, evaluated in float32 as tcnn does; position ``x * s + 0.5`` (one rounding,
  like ``fmaf``); the cell is ``floor`` of it and the fraction gives (bi)linear weights;
* entries per level: ``min(2**log2_hashmap_size, next_multiple_of_8(resolution**2))``, levels
  concatenated in order; a level is hashed iff its entry count is below ``resolution**2``,
  else it is indexed densely as ``x + y * resolution (+ z * resolution²)`` (tcnn's wrap-around
  at the far edge, e.g. ``x = 1``, included); hash = ``x * 1 XOR y * 2654435761 (XOR z *
  805459861)`` in uint32 arithmetic (tcnn's default ``CoherentPrime`` hash); every index is
  taken modulo the level's entry count; in 3-D the entries per level are
  ``min(2**log2_hashmap_size, next_multiple_of_8(resolution**3))`` and the 8 corners'
  weights are trilinear, corner ``c`` offset by bit ``d`` of ``c`` along axis ``d``;
* parameter layout: one flat vector, level after level, each level ``[entries, features]``
  row-major; output features level-major ``[l0 f0, l0 f1, l1 f0, ...]``;
* initialization uniform in ``[-1e-4, 1e-4]`` (tcnn's distribution, not its pcg32 stream);
* only ``interpolation = "Linear"``; the tcnn backend runs in float32 (``dtype=torch.float32``)
  so that both backends have the same precision. tcnn's other grid options (``Nearest`` /
  ``Smoothstep``, ``stochastic_interpolation``, ``fixed_point_pos``, level masking through
  ``max_level``, the ``Dense``/``Tiled`` types, other hashes) are not implemented.

Speed (torch backend, CPU): the points of an image never move, so :class:`HashGridField` turns
their corners and bilinear weights into a sparse ``[points * levels, entries]`` matrix once; a
step is then one sparse-dense product (gather + weighted sum), its transpose for the backward,
and the MLP: about 2 ms forward + backward for 64x64 on one core.

Not matched / not verified (no CUDA machine was available when this was written):

* the tcnn-vs-torch test has not been run. tcnn builds with ``--use_fast_math``, so the kernel's
  ``exp2f`` may differ from a correctly rounded one (used here, as on tcnn's host side) by an
  ulp or two. Elsewhere that moves positions by about 1e-7 relative, but where a level's scale
  is exactly an integer (default config: levels 1 and 2, scales 5 and 8) one ulp too high makes
  the kernel's resolution one larger than the host's, and its indices (even hashed vs dense)
  differ from this module's. ``test_tcnn_matches_torch`` checks this where tinycudann runs.
* inputs outside [0, 1] follow tcnn's uint32 arithmetic only for moderately negative values.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

__all__ = [
    "GridLevel",
    "HashGridConfig",
    "HashGridEncoding",
    "HashGridField",
    "TcnnUnavailableError",
    "grid_lookup",
    "interpolate",
    "interpolate_fixed",
    "level_layout",
    "lookup_matrices",
    "pixel_coordinates",
    "resolve_backend",
    "tcnn_unavailable_reason",
]

_U32 = 0xFFFFFFFF
_PRIMES = (1, 2654435761, 805459861)  # tcnn's CoherentPrime hash, one prime per axis
_INIT_RANGE = 1e-4


class HashGridConfig(BaseModel):
    """Options of the hash encoding; the names and meanings are tiny-cuda-nn's ``HashGrid``.

    The defaults are sized for small images (up to about 64x64 through a latent/RGB loop):
    12 levels growing by 1.5 from 4 vertices per axis reach 346 vertices per axis, and a 4096-entry
    table per level keeps the 48,720 parameters cheap on a CPU.
    """

    model_config = ConfigDict(extra="forbid")

    n_levels: int = Field(12, ge=1, le=128, description="number of resolutions (tcnn allows at most 128)")
    n_features_per_level: Literal[1, 2, 4, 8] = Field(2, description="features stored per table entry")
    log2_hashmap_size: int = Field(12, ge=1, le=31, description="log2 of the entries of each hashed level")
    base_resolution: int = Field(4, ge=1, description="vertices per axis of the coarsest level")
    per_level_scale: float = Field(1.5, ge=1.0, description="growth of the resolution from one level to the next")
    interpolation: Literal["Linear"] = Field("Linear", description="(bi)linear: the only one implemented")
    backend: Literal["auto", "tcnn", "torch"] = Field(
        "auto", description="tcnn (tiny-cuda-nn, CUDA), torch (pure PyTorch) or auto (tcnn when usable)"
    )

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def tcnn_encoding_config(self) -> dict:
        """The ``encoding_config`` for ``tinycudann.Encoding``, its hash pinned to the one implemented here."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
            "interpolation": self.interpolation,
            "hash": "CoherentPrime",
        }


class TcnnUnavailableError(ImportError, ValueError):
    """``backend: tcnn`` was asked for where tiny-cuda-nn cannot run (an ImportError and a ValueError)."""


# ----------------------------------------------------------------------------------------------
# Level layout (host side of tcnn's GridEncoding constructor)


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32, so host-side formulas follow tcnn's float math."""
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass(frozen=True)
class GridLevel:
    """One level: ``scale`` (float32 value), vertices per axis, table entries, first entry, hashed or dense.

    ``offset`` and ``size`` count table entries (rows of ``n_features_per_level`` values), as tcnn's
    offset table does; the level's parameters are ``params[offset * F:(offset + size) * F]``.
    """

    scale: float
    resolution: int
    size: int
    offset: int
    hashed: bool
    dims: int = 2  # the points' dimensions (2: images, 3: scenes)


def level_layout(config: HashGridConfig, dims: int = 2) -> tuple[GridLevel, ...]:
    """The levels of ``config`` exactly as tcnn lays them out for ``dims``-D inputs (2 or 3)."""
    if dims not in (2, 3):
        raise ValueError(f"hash grids here take 2-D or 3-D points, got {dims}-D")
    log2_scale = _f32(math.log2(_f32(config.per_level_scale)))
    levels, offset = [], 0
    for level in range(config.n_levels):
        scale = _f32(_f32(_f32(2.0 ** _f32(level * log2_scale)) * config.base_resolution) - 1.0)
        resolution = math.ceil(scale) + 1
        dense = 2**31 - 1 if float(resolution) ** dims > 2.0**31 else resolution**dims
        size = min(-(-dense // 8) * 8, 2**config.log2_hashmap_size)
        # tcnn hashes when the table is smaller than the dense stride (which saturates for huge grids).
        stride = min(resolution**dims, _U32)
        levels.append(GridLevel(scale, resolution, size, offset, size < stride, dims))
        offset += size
    return tuple(levels)


# ----------------------------------------------------------------------------------------------
# The torch backend: lookup (indices + weights), then a weighted gather


def _mul_u32(a: Tensor, constant: int) -> Tensor:
    """``a * constant mod 2**32`` for int64 ``a`` in [0, 2**32) without overflowing int64."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _U32


def grid_lookup(x: Tensor, levels: tuple[GridLevel, ...]) -> tuple[Tensor, Tensor]:
    """Table rows and (bi/tri)linear weights of the 2^D corners of every point at every level.

    Returns ``rows`` (int64 ``[N, L, 2^D]``, absolute rows of the ``[entries, F]`` table) and
    ``weights`` (float32 ``[N, L, 2^D]``). Corner ``c`` is offset by bit ``d`` of ``c`` along
    axis ``d`` (in 2-D ``(x + (c & 1), y + (c >> 1))``), tcnn's order. The weights are
    differentiable w.r.t. ``x`` (d/dx = the level's scale, as in tcnn's input gradient); the
    rows are not. Both depend only on ``x``, so fixed points can cache them.
    """
    dims = levels[0].dims
    if x.ndim != 2 or x.shape[1] != dims:
        raise ValueError(f"hash grid inputs must be [N, {dims}], got {tuple(x.shape)}")
    x = x.float()
    device = x.device
    scales = torch.tensor([lv.scale for lv in levels], dtype=torch.float64, device=device)
    # fmaf(scale, x, 0.5f): the float32 product is exact in float64, then a single rounding.
    pos = (x.double()[:, None, :] * scales[None, :, None] + 0.5).float()  # [N, L, D]
    cell = torch.floor(pos).detach()
    frac = pos - cell
    grid = cell.to(torch.int64) & _U32  # tcnn's (uint32_t)(int)floor(pos)
    # Per axis the two corner coordinates (cell, cell + 1), [N, L, 2]; the 2^D corners are their
    # combinations (:func:`_corners`), so the costly integer arithmetic runs on [N, L, 2] per axis.
    step = torch.arange(2, device=device)
    coords = [(grid[..., d, None] + step) & _U32 for d in range(dims)]
    # The resolution grows with the level, so the dense levels come first and the hashed ones after.
    n_dense = sum(not lv.hashed for lv in levels)
    assert all(not lv.hashed for lv in levels[:n_dense]), "dense levels after hashed ones"
    rows = []
    if n_dense:
        dense = levels[:n_dense]
        terms, stride = [], torch.ones(n_dense, 1, dtype=torch.int64, device=device)
        resolution = torch.tensor([[lv.resolution] for lv in dense], device=device)
        for d in range(dims):
            terms.append(coords[d][:, :n_dense] * stride)
            stride = stride * resolution
        index = _corners(terms, torch.add) & _U32
        size, offset = (torch.tensor([[getattr(lv, k)] for lv in dense], device=device) for k in ("size", "offset"))
        rows.append(index % size + offset)
    if n_dense < len(levels):
        hashed = levels[n_dense:]
        terms = [coords[0][:, n_dense:]] + [_mul_u32(coords[d][:, n_dense:], _PRIMES[d]) for d in range(1, dims)]
        index = _corners(terms, torch.bitwise_xor)
        mask, offset = (torch.tensor([[v] for v in values], device=device)
                        for values in ([lv.size - 1 for lv in hashed], [lv.offset for lv in hashed]))
        rows.append((index & mask) + offset)  # a hashed level's size is a power of two: & is its modulo
    rows = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    weights = _corners([torch.stack([1 - frac[..., d], frac[..., d]], dim=-1) for d in range(dims)], torch.mul)
    return rows, weights


def _corners(per_axis: list[Tensor], combine) -> Tensor:
    """``[..., 2]`` values per axis combined into ``[..., 2^D]`` values per corner: corner c takes
    entry ``(c >> d) & 1`` of axis d (axis 0 varies fastest), axis terms combined in axis order."""
    out = per_axis[0]
    for term in per_axis[1:]:
        out = combine(term[..., :, None], out[..., None, :]).flatten(-2)
    return out


def interpolate(params: Tensor, rows: Tensor, weights: Tensor, n_features_per_level: int) -> Tensor:
    """Encoded features ``[N, L * F]`` (level-major) from a flat ``params`` and a :func:`grid_lookup`.

    A gather of the 2^D corners and their weighted sum; differentiable w.r.t. ``params`` and ``weights``.
    """
    n, n_levels, n_corners = rows.shape
    table = params.view(-1, n_features_per_level)
    corners = table.index_select(0, rows.reshape(-1)).view(n, n_levels, n_corners, n_features_per_level)
    out = (corners * weights.unsqueeze(-1).to(table.dtype)).sum(dim=2)
    return out.reshape(n, n_levels * n_features_per_level)


def lookup_matrices(rows: Tensor, weights: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """The lookup as a sparse CSR matrix ``[N * L, n_rows]`` (2^D weights per row) and its transpose.

    For fixed points the whole encoding is the linear map ``features = matrix @ table``; a CSR
    product with a precomputed transpose for the backward is about 4x faster on a CPU than an
    index gather with its scatter-add backward (1.3 ms vs 5 ms for 64x64 points, default config).
    Corners that land on the same entry are summed.
    """
    n, n_levels, n_corners = rows.shape
    row_ids = torch.arange(n * n_levels, device=rows.device).repeat_interleave(n_corners)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta; the two ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(
            torch.stack([row_ids, rows.reshape(-1)]), weights.detach().reshape(-1), (n * n_levels, n_rows),
            check_invariants=True,
        ).coalesce()
        return coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()


class _SparseLookup(torch.autograd.Function):
    """``matrix @ table`` with the gradient ``matrix_t @ grad`` (the transpose is precomputed)."""

    @staticmethod
    def forward(ctx, table: Tensor, matrix: Tensor, matrix_t: Tensor) -> Tensor:
        ctx.matrix_t = matrix_t
        return matrix @ table

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.matrix_t @ grad, None, None


def interpolate_fixed(
    params: Tensor, matrix: Tensor, matrix_t: Tensor, n_levels: int, n_features_per_level: int
) -> Tensor:
    """Features ``[N, L * F]`` of fixed points from :func:`lookup_matrices`; gradients reach ``params`` only."""
    table = params.view(-1, n_features_per_level)
    out = _SparseLookup.apply(table, matrix.to(table.dtype), matrix_t.to(table.dtype))
    return out.view(-1, n_levels * n_features_per_level)  # rows are (point, level): level-major features


# ----------------------------------------------------------------------------------------------
# Backend selection


@functools.lru_cache(maxsize=None)
def _tcnn_import_error() -> str | None:
    try:
        import tinycudann  # noqa: F401  (optional; raises EnvironmentError without CUDA)
    except Exception as error:  # any failure to load the extension means "not available"
        return f"tinycudann could not be imported ({type(error).__name__}: {error})"
    return None


def tcnn_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the tcnn backend cannot run on ``device``, or None when it can."""
    device = _resolve_device(device)
    if device.type != "cuda":
        return f"tiny-cuda-nn runs only on CUDA and the device is {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    return _tcnn_import_error()


def resolve_backend(backend: str, device: torch.device | str | None = None) -> Literal["tcnn", "torch"]:
    """``auto`` -> tcnn where it can run, else torch; ``tcnn`` where it cannot -> :class:`TcnnUnavailableError`."""
    if backend == "torch":
        return "torch"
    reason = tcnn_unavailable_reason(device)
    if backend == "auto":
        return "torch" if reason else "tcnn"
    if backend == "tcnn":
        if reason:
            raise TcnnUnavailableError(
                f"hash grid backend 'tcnn' is unavailable: {reason}; use `backend: torch` (or auto)"
            )
        return "tcnn"
    raise ValueError(f"unknown hash grid backend {backend!r}; expected auto, tcnn or torch")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.empty(0).device if device is None else torch.device(device)


# ----------------------------------------------------------------------------------------------
# Modules


class HashGridEncoding(nn.Module):
    """``[N, D]`` points in [0, 1]^D (D = ``n_input_dims``, 2 or 3) -> ``[N, n_levels *
    n_features_per_level]`` float32 features.

    The only parameter is ``params`` (float32 ``[n_params]``) on either backend, so state dicts
    are interchangeable. ``generator`` seeds the initialization (for tcnn: a seed drawn from it).
    """

    def __init__(
        self,
        config: HashGridConfig | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        n_input_dims: int = 2,
    ):
        super().__init__()
        self.config = config or HashGridConfig()
        self.n_input_dims = n_input_dims
        device = _resolve_device(device)
        self.backend = resolve_backend(self.config.backend, device)
        self.levels = level_layout(self.config, n_input_dims)
        self.n_params = (self.levels[-1].offset + self.levels[-1].size) * self.config.n_features_per_level
        self.n_output_dims = self.config.n_output_dims
        if self.backend == "tcnn":
            self._init_tcnn(device, generator)
        else:
            gen_device = generator.device if generator is not None else "cpu"
            uniform = torch.rand(self.n_params, generator=generator, device=gen_device)
            self.params = nn.Parameter((uniform * (2 * _INIT_RANGE) - _INIT_RANGE).to(device))

    def _init_tcnn(self, device: torch.device, generator: torch.Generator | None) -> None:
        import tinycudann as tcnn

        seed = 1337  # tcnn's default seed
        if generator is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        with torch.cuda.device(device):
            encoding = tcnn.Encoding(self.n_input_dims, self.config.tcnn_encoding_config(), seed=seed,
                                     dtype=torch.float32)
        if encoding.params.numel() != self.n_params or encoding.n_output_dims != self.n_output_dims:
            raise RuntimeError(
                f"tiny-cuda-nn's HashGrid has {encoding.params.numel()} parameters / {encoding.n_output_dims} "
                f"outputs, this module expects {self.n_params} / {self.n_output_dims}: the layouts differ, "
                "use `backend: torch`"
            )
        # The tcnn module is kept out of the module tree so its parameter appears once, as `params`;
        # it is the same Parameter object, which tcnn's forward reads.
        self.__dict__["_tcnn"] = encoding
        self.params = encoding.params

    def precompute(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Sparse lookup matrices of fixed points ``x`` (torch backend; None for tcnn, which is fast as is)."""
        if self.backend != "torch":
            return None
        rows, weights = grid_lookup(x.to(self.params.device), self.levels)
        return lookup_matrices(rows, weights, self.n_params // self.config.n_features_per_level)

    def forward(self, x: Tensor, precomputed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Features of ``x``; with ``precomputed = self.precompute(x)`` only the gather runs."""
        if self.backend == "tcnn":
            return self.__dict__["_tcnn"](x.to(self.params.device)).float()
        if precomputed is not None:
            cfg = self.config
            return interpolate_fixed(self.params, *precomputed, cfg.n_levels, cfg.n_features_per_level)
        rows, weights = grid_lookup(x.to(self.params.device), self.levels)
        return interpolate(self.params, rows, weights, self.config.n_features_per_level)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, n_params={self.n_params}, n_output_dims={self.n_output_dims}"


_ACTIVATIONS = {"none": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def pixel_coordinates(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Pixel-centre (u, v) = ((j + 0.5) / W, (i + 0.5) / H), ``[H * W, 2]`` in row-major pixel order."""
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu.reshape(-1), vv.reshape(-1)], dim=-1)


class HashGridField(nn.Module):
    """An image ``[1, C, H, W]`` as hash encoding + small ReLU MLP of pixel-centre (u, v).

    The pixel grid never changes, so its corners and bilinear weights are computed once, as a
    sparse lookup matrix (buffers, not saved in the state dict); a step is then one gather +
    weighted sum (a sparse product) + the MLP. Other sizes can be rendered with
    ``forward(size=(h, w))``; their lookups are cached on first use. ``generator`` seeds the
    grid and the MLP (nn.Linear's default distribution), so a run's seed fixes the field.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        out_channels: int = 3,
        config: HashGridConfig | None = None,
        *,
        hidden_width: int = 32,
        n_hidden_layers: int = 1,
        output_activation: Literal["none", "sigmoid", "tanh"] = "none",
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if output_activation not in _ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {sorted(_ACTIVATIONS)}, got {output_activation!r}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.out_channels = out_channels
        device = _resolve_device(device)
        self.encoding = HashGridEncoding(config, device=device, generator=generator)
        layers, width = [], self.encoding.n_output_dims
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden_width), nn.ReLU()]
            width = hidden_width
        layers += [nn.Linear(width, out_channels), _ACTIVATIONS[output_activation]()]
        if generator is not None:
            for layer in layers:
                if isinstance(layer, nn.Linear):  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    bound = layer.in_features**-0.5
                    for tensor in (layer.weight, layer.bias):
                        noise = torch.rand(tensor.shape, generator=generator, device=generator.device)
                        tensor.data.copy_(noise * (2 * bound) - bound)
        self.mlp = nn.Sequential(*layers).to(device)
        self.register_buffer("coords", pixel_coordinates(*self.size, device=device), persistent=False)
        matrices = self.encoding.precompute(self.coords) or (None, None)
        self.register_buffer("lookup_matrix", matrices[0], persistent=False)
        self.register_buffer("lookup_matrix_t", matrices[1], persistent=False)
        self._other_sizes: dict[tuple[int, int], tuple[Tensor, tuple[Tensor, Tensor] | None]] = {}

    def forward(self, size: tuple[int, int] | None = None) -> Tensor:
        size = self.size if size is None else tuple(size)
        if size == self.size:
            coords = self.coords
            precomputed = None if self.lookup_matrix is None else (self.lookup_matrix, self.lookup_matrix_t)
        else:
            cached = self._other_sizes.get(size)
            if cached is None or cached[0].device != self.coords.device:
                coords = pixel_coordinates(*size, device=self.coords.device)
                cached = self._other_sizes[size] = (coords, self.encoding.precompute(coords))
            coords, precomputed = cached
        out = self.mlp(self.encoding(coords, precomputed))
        return out.t().reshape(1, self.out_channels, *size)


def fit_to(module: nn.Module, target: Tensor, *, steps: int, lr: float) -> float:
    """Fit ``module()`` to ``target`` by Adam on the mean squared error; returns the final error.

    Used to start a field from a chosen image (the study: "initialize it to fit the decoded
    Gaussian latent code") rather than from its random initialisation.
    """
    target = target.detach()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = (module() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((module() - target).pow(2).mean())
