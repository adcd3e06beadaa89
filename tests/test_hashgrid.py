"""Tests of sdsctl.hashgrid: the torch backend against a slow reference written from tcnn's definition."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from pydantic import ValidationError

from sdsctl.hashgrid import (
    HashGridConfig,
    HashGridEncoding,
    HashGridField,
    TcnnUnavailableError,
    level_layout,
    pixel_coordinates,
    resolve_backend,
)

MASK = 0xFFFFFFFF


def f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def reference_lookups(cfg: HashGridConfig, u: float, v: float):
    """Per level, per corner: (level, absolute table row, weight), straight from tcnn's definition.

    Float32 arithmetic where tcnn uses it: the level scale, ``pos = fmaf(scale, x, 0.5)`` and the
    products of the per-axis weights.
    """
    log2_scale = f32(math.log2(f32(cfg.per_level_scale)))
    offset = 0
    for level in range(cfg.n_levels):
        scale = f32(f32(f32(2.0 ** f32(level * log2_scale)) * cfg.base_resolution) - 1.0)
        resolution = math.ceil(scale) + 1
        size = min((resolution**2 + 7) // 8 * 8, 2**cfg.log2_hashmap_size)
        hashed = size < resolution**2
        pos = [f32(scale * f32(c) + 0.5) for c in (u, v)]
        cell = [math.floor(p) for p in pos]
        frac = [p - c for p, c in zip(pos, cell)]
        for dy in (0, 1):
            for dx in (0, 1):
                x, y = cell[0] + dx, cell[1] + dy
                wx = frac[0] if dx else f32(1.0 - frac[0])
                wy = frac[1] if dy else f32(1.0 - frac[1])
                if hashed:
                    index = (x * 1 ^ y * 2654435761) & MASK
                else:
                    index = x + y * resolution
                yield level, offset + index % size, f32(wx * wy)
        offset += size


def reference_encode(cfg: HashGridConfig, params: list[float], points: list[tuple[float, float]]) -> torch.Tensor:
    n_f = cfg.n_features_per_level
    out = torch.zeros(len(points), cfg.n_levels * n_f, dtype=torch.float64)
    for i, (u, v) in enumerate(points):
        for level, row, weight in reference_lookups(cfg, u, v):
            for f in range(n_f):
                out[i, level * n_f + f] += weight * params[row * n_f + f]
    return out


def random_points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.25]])
    return torch.cat([edges, torch.rand(n, 2, generator=g)])


def torch_encoding(cfg: HashGridConfig, seed: int = 0) -> HashGridEncoding:
    enc = HashGridEncoding(cfg.model_copy(update={"backend": "torch"}), device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # parameters of order 1 so that a wrong index shows
        enc.params.copy_(torch.rand(enc.n_params, generator=g) * 2 - 1)
    return enc


CONFIGS = [
    HashGridConfig(),
    # small tables: most levels hashed, with collisions; one feature per level
    HashGridConfig(n_levels=6, n_features_per_level=1, log2_hashmap_size=6, base_resolution=3, per_level_scale=1.7),
    # per_level_scale 2 (tcnn's default), 4 features, dense levels up to 2**10 entries
    HashGridConfig(n_levels=5, n_features_per_level=4, log2_hashmap_size=10, base_resolution=2, per_level_scale=2.0),
]


def test_default_config_and_layout():
    cfg = HashGridConfig()
    assert (cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size) == (12, 2, 12)
    assert (cfg.base_resolution, cfg.per_level_scale, cfg.backend) == (4, 1.5, "auto")
    levels = level_layout(cfg)
    # by hand: s_l = 4 * 1.5**l - 1, resolution = ceil(s_l) + 1, size = min(4096, next8(res**2))
    assert [lv.resolution for lv in levels] == [4, 6, 9, 14, 21, 31, 46, 69, 103, 154, 231, 346]
    assert [lv.scale for lv in levels[:5]] == [3.0, 5.0, 8.0, 12.5, 19.25]
    assert [lv.scale for lv in levels] == pytest.approx([4 * 1.5**lv - 1 for lv in range(12)], rel=1e-6)
    assert [lv.size for lv in levels] == [16, 40, 88, 200, 448, 968, 2120] + [4096] * 5
    assert [lv.offset for lv in levels] == [0, 16, 56, 144, 344, 792, 1760, 3880, 7976, 12072, 16168, 20264]
    assert [lv.hashed for lv in levels] == [False] * 7 + [True] * 5
    enc = HashGridEncoding(cfg, device="cpu")
    assert enc.backend == "torch"
    assert enc.n_params == enc.params.numel() == 24360 * 2
    assert enc.n_output_dims == 24
    assert enc.params.abs().max() <= 1e-4 and enc.params.std() > 1e-5  # tcnn's U(-1e-4, 1e-4)
    assert list(enc.state_dict()) == ["params"]


def test_config_validation_and_tcnn_dict():
    with pytest.raises(ValidationError):
        HashGridConfig(backend="cuda")
    with pytest.raises(ValidationError):
        HashGridConfig(n_features_per_level=3)
    with pytest.raises(ValidationError):
        HashGridConfig(levels=4)  # unknown keys are errors (typos in recipes)
    assert HashGridConfig(log2_hashmap_size=15).tcnn_encoding_config() == {
        "otype": "HashGrid",
        "n_levels": 12,
        "n_features_per_level": 2,
        "log2_hashmap_size": 15,
        "base_resolution": 4,
        "per_level_scale": 1.5,
        "interpolation": "Linear",
        "hash": "CoherentPrime",
    }


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "small-hashed", "scale2-f4"])
def test_torch_backend_matches_reference(cfg):
    enc = torch_encoding(cfg)
    x = random_points(40)
    expected = reference_encode(cfg, enc.params.tolist(), x.tolist())
    with torch.no_grad():
        direct = enc(x)
        fixed = enc(x, enc.precompute(x))
    assert direct.shape == fixed.shape == (len(x), cfg.n_levels * cfg.n_features_per_level)
    torch.testing.assert_close(direct.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_precompute", [False, True])
def test_gradients_reach_only_touched_entries(use_precompute):
    cfg = HashGridConfig()
    enc = torch_encoding(cfg)
    x = random_points(10, seed=1)[6:]  # interior random points: every corner has a positive weight
    out = enc(x, enc.precompute(x) if use_precompute else None)
    out.sum().backward()
    expected = torch.zeros(enc.n_params // 2, dtype=torch.float64)
    for u, v in x.tolist():
        for _, row, weight in reference_lookups(cfg, u, v):
            expected[row] += weight
    grad = enc.params.grad.view(-1, 2).double()
    torch.testing.assert_close(grad, expected[:, None].expand(-1, 2), atol=1e-6, rtol=0)
    touched = expected > 0
    assert touched.sum() > 0
    assert (grad[touched] > 0).all() and (grad[~touched] == 0).all()


def test_tcnn_unavailable_is_a_clear_error(monkeypatch):
    with pytest.raises(TcnnUnavailableError, match="backend: torch") as info:
        HashGridEncoding(HashGridConfig(backend="tcnn"), device="cpu")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    assert "CUDA" in str(info.value)
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TcnnUnavailableError, match="CUDA is not available"):
        resolve_backend("tcnn", "cuda")
    assert resolve_backend("auto", "cuda") == "torch"


def test_input_gradient_is_the_slope_of_the_interpolant():
    enc = torch_encoding(HashGridConfig(n_levels=4))  # coarse levels: the point stays inside its cells
    x = torch.tensor([[0.31, 0.57]], requires_grad=True)
    coeffs = torch.randn(8, generator=torch.Generator().manual_seed(2))
    (enc(x) @ coeffs).sum().backward()
    eps = 1e-4
    with torch.no_grad():
        for dim in range(2):
            step = torch.zeros(1, 2)
            step[0, dim] = eps
            slope = ((enc(x + step) - enc(x - step)) @ coeffs).item() / (2 * eps)
            assert x.grad[0, dim].item() == pytest.approx(slope, rel=1e-2)


@pytest.mark.parametrize("dims", [2, 3])
def test_tcnn_matches_torch(dims):
    # tinycudann raises OSError (not ImportError) at import without CUDA, so check CUDA first
    if not torch.cuda.is_available():
        pytest.skip("tiny-cuda-nn needs CUDA")
    pytest.importorskip("tinycudann")
    for cfg in CONFIGS:
        tcnn_enc = HashGridEncoding(cfg.model_copy(update={"backend": "tcnn"}), device="cuda", n_input_dims=dims)
        assert tcnn_enc.backend == "tcnn"
        torch_enc = HashGridEncoding(cfg.model_copy(update={"backend": "torch"}), device="cuda", n_input_dims=dims)
        with torch.no_grad():  # parameters of order 1 so that a wrong index shows
            torch_enc.params.copy_(torch.rand(torch_enc.n_params, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        tcnn_enc.load_state_dict(torch_enc.state_dict())  # same key, same layout
        x = random_points(1000).cuda() if dims == 2 else torch.rand(1000, 3, generator=torch.Generator()).cuda()
        out_tcnn, out_torch = tcnn_enc(x), torch_enc(x)
        torch.testing.assert_close(out_tcnn, out_torch, atol=1e-4, rtol=0)
        out_tcnn.sum().backward()
        out_torch.sum().backward()
        torch.testing.assert_close(tcnn_enc.params.grad, torch_enc.params.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("size", [8, 64, (8, 12)])
@pytest.mark.parametrize("activation", ["none", "sigmoid", "tanh"])
def test_field_shape_and_pixel_layout(size, activation):
    field = HashGridField(size, out_channels=4, output_activation=activation, device="cpu")
    h, w = (size, size) if isinstance(size, int) else size
    out = field()
    assert out.shape == (1, 4, h, w)
    if activation == "sigmoid":
        assert ((out > 0) & (out < 1)).all()
    # pixel (i, j) is the MLP at ((j + 0.5) / W, (i + 0.5) / H)
    i, j = h - 1, 1
    uv = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h]])
    torch.testing.assert_close(out[0, :, i, j], field.mlp(field.encoding(uv))[0])
    assert list(field.state_dict()) == [  # the lookup buffers are not saved
        "encoding.params", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"
    ]
    other = field(size=(5, 3))
    assert other.shape == (1, 4, 5, 3)
    expected = field.mlp(field.encoding(pixel_coordinates(5, 3)))
    torch.testing.assert_close(other[0].permute(1, 2, 0).reshape(-1, 4), expected)


def test_field_rejects_unknown_activation():
    with pytest.raises(ValueError, match="output_activation"):
        HashGridField(8, output_activation="relu")


def test_field_generator_makes_it_reproducible():
    a = HashGridField(8, generator=torch.Generator().manual_seed(3))
    b = HashGridField(8, generator=torch.Generator().manual_seed(3))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)


def target_image(size: int) -> torch.Tensor:
    """A smooth colour gradient with a hard-edged disc: needs both coarse and fine levels."""
    v, u = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    disc = (((u - 0.6) ** 2 + (v - 0.4) ** 2) < 0.08).float()
    return torch.stack([u, v * (1 - disc), 0.5 + 0.4 * torch.sin(6 * u) * disc])[None]


@pytest.mark.parametrize("size", [8, 64])
def test_field_fits_an_image_with_adam(size):
    generator = torch.Generator().manual_seed(0)
    field = HashGridField(size, out_channels=3, output_activation="sigmoid", generator=generator)
    target = target_image(size)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = (field() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-2  # the start is far from the target ...
    assert losses[-1] < 1e-4  # ... and the end close (about 1e-6 at 8x8, 5e-6 at 64x64 when written)
    assert losses[-1] < losses[100] < losses[0]


# ----------------------------------------------------------------------------- 3-D (nerf)


def reference_lookups_3d(cfg: HashGridConfig, point: tuple[float, float, float]):
    """tcnn's definition in 3-D: resolution³ entries (dense) or the hash x·1 ⊕ y·2654435761 ⊕
    z·805459861, trilinear weights, corner bit d along axis d."""
    log2_scale = f32(math.log2(f32(cfg.per_level_scale)))
    offset = 0
    for level in range(cfg.n_levels):
        scale = f32(f32(f32(2.0 ** f32(level * log2_scale)) * cfg.base_resolution) - 1.0)
        resolution = math.ceil(scale) + 1
        size = min((resolution**3 + 7) // 8 * 8, 2**cfg.log2_hashmap_size)
        hashed = size < resolution**3
        pos = [f32(scale * f32(c) + 0.5) for c in point]
        cell = [math.floor(p) for p in pos]
        frac = [p - c for p, c in zip(pos, cell)]
        for corner in range(8):
            bits = [(corner >> d) & 1 for d in range(3)]
            x, y, z = (cell[d] + bits[d] for d in range(3))
            weight = 1.0
            for d in range(3):
                weight = f32(weight * (frac[d] if bits[d] else f32(1.0 - frac[d])))
            if hashed:
                index = (x ^ (y * 2654435761) ^ (z * 805459861)) & MASK
            else:
                index = x + y * resolution + z * resolution * resolution
            yield level, offset + index % size, weight
        offset += size


@pytest.mark.parametrize("cfg", [HashGridConfig(n_levels=4, log2_hashmap_size=10, base_resolution=4),
                                 HashGridConfig(n_levels=6, n_features_per_level=4, log2_hashmap_size=12,
                                                base_resolution=3, per_level_scale=1.7)])
def test_3d_encoding_matches_tcnn_definition(cfg):
    enc = HashGridEncoding(cfg.model_copy(update={"backend": "torch"}), device="cpu", n_input_dims=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        enc.params.copy_(torch.rand(enc.n_params, generator=g) * 2 - 1)
    levels = level_layout(cfg, 3)
    assert any(level.hashed for level in levels) and any(not level.hashed for level in levels)
    points = torch.cat([torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.25, 1.0]]),
                        torch.rand(20, 3, generator=g)])
    n_f = cfg.n_features_per_level
    params = enc.params.tolist()
    expected = torch.zeros(len(points), cfg.n_levels * n_f, dtype=torch.float64)
    for i, point in enumerate(points.tolist()):
        for level, row, weight in reference_lookups_3d(cfg, point):
            for f in range(n_f):
                expected[i, level * n_f + f] += weight * params[row * n_f + f]
    assert torch.allclose(enc(points).double(), expected, atol=1e-5)
    assert enc.n_params == (levels[-1].offset + levels[-1].size) * n_f


def test_3d_encoding_refuses_2d_points_and_gives_gradients_to_every_level():
    enc = HashGridEncoding(HashGridConfig(n_levels=3, backend="torch"), device="cpu", n_input_dims=3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        enc(torch.rand(4, 2))
    enc(torch.rand(64, 3, generator=torch.Generator().manual_seed(0))).sum().backward()
    for level in enc.levels:
        start, stop = level.offset * 2, (level.offset + level.size) * 2
        assert enc.params.grad[start:stop].abs().sum() > 0
