"""Physical axis order: on one volume stored as the authors' (z, y, x) arrays and as TorchIO's (x, y, z)
arrays, the Mamba layers scan the same physical voxels in the same order (x fastest) and the L_TRS cells
(8 along z, 8 along y, 14 along x) hold the same physical voxels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix import create_model
from mambaclinix.layers import MambaLayer
from mambaclinix.losses import PAPER_GRID, PAPER_GRID_XYZ, RegionSpecificTverskyLoss
from mambaclinix.training import SegmentationModule

X, Y, Z = 5, 3, 4  # distinct extents, so that a wrong axis cannot pass


def _zyx_to_xyz(t: torch.Tensor) -> torch.Tensor:
    """(B, C, z, y, x) -> (B, C, x, y, z): the same volume in the other array order."""
    return t.permute(0, 1, 4, 3, 2)


def _coordinate_volume() -> torch.Tensor:
    """(1, 3, Z, Y, X) whose channels at voxel (z, y, x) hold its physical coordinates (x, y, z)."""
    z, y, x = torch.meshgrid(torch.arange(Z), torch.arange(Y), torch.arange(X), indexing="ij")
    return torch.stack([x, y, z]).unsqueeze(0).double()


def _tokens(layer: MambaLayer, volume: torch.Tensor) -> torch.Tensor:
    """The token sequence (L, C) the layer feeds its Mamba block (the first LayerNorm's input)."""
    seen = []
    handle = layer.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        layer(volume)
    handle.remove()
    return seen[0][0]


def test_scan_order_f_on_xyz_arrays_scans_as_c_on_zyx_arrays_x_fastest():
    torch.manual_seed(0)
    c_layer = MambaLayer(3, d_state=4, scan_order="C").double()
    f_layer = MambaLayer(3, d_state=4, scan_order="F").double()
    f_layer.load_state_dict(c_layer.state_dict())  # the order has no parameters
    zyx = _coordinate_volume()
    xyz = _zyx_to_xyz(zyx)
    authors = _tokens(c_layer, zyx)  # the authors' layer: SimpleITK arrays, row-major flatten
    ours = _tokens(f_layer, xyz)
    # by hand: token t is the voxel x = t % X, y = (t // X) % Y, z = t // (X·Y)
    t = torch.arange(X * Y * Z)
    expected = torch.stack([t % X, (t // X) % Y, t // (X * Y)], dim=1).double()
    torch.testing.assert_close(authors, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # row-major on (x, y, z) arrays would scan z fastest instead
    assert not torch.equal(_tokens(c_layer, xyz), expected)
    # and the whole layer is the same function of the physical volume
    volume = torch.randn(2, 3, Z, Y, X, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(f_layer(_zyx_to_xyz(volume)), _zyx_to_xyz(c_layer(volume)))


def test_scan_order_f_in_two_dimensions_and_bad_values():
    layer = MambaLayer(2, d_state=2, scan_order="F").double()
    h, w = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    tokens = _tokens(layer, torch.stack([h, w]).unsqueeze(0).double())
    t = torch.arange(12)
    torch.testing.assert_close(tokens, torch.stack([t % 3, t // 3], dim=1).double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"scan_order must be 'C' .* or 'F' .* got 'z'"):
        MambaLayer(4, scan_order="z")


def _cell_membership(shape: tuple[int, ...], grid: tuple[int, ...]) -> np.ndarray:
    """(voxels, cells) boolean: which voxel (row-major in ``shape``) lies in which cell (row-major in
    ``grid``) of the loss's cell pooling (adaptive average pooling of a per-voxel indicator)."""
    n = int(np.prod(shape))
    indicators = torch.eye(n, dtype=torch.float64).reshape(1, n, *shape)
    pooled = F.adaptive_avg_pool3d(indicators, grid)
    return (pooled[0].reshape(n, -1) > 0).numpy()


def test_region_cells_cover_the_same_physical_voxels():
    zyx_shape = (9, 10, 17)  # (z, y, x)
    grid_zyx, grid_xyz = PAPER_GRID, PAPER_GRID_XYZ
    assert grid_zyx == (8, 8, 14) and grid_xyz == (14, 8, 8)  # 14 cells along x in both orders
    authors = _cell_membership(zyx_shape, grid_zyx)  # voxel (z, y, x), cell (cz, cy, cx)
    ours = _cell_membership(zyx_shape[::-1], grid_xyz)  # voxel (x, y, z), cell (cx, cy, cz)
    # re-index ours by (z, y, x) voxels and (cz, cy, cx) cells
    ours = ours.reshape(*zyx_shape[::-1], *grid_xyz).transpose(2, 1, 0, 5, 4, 3)
    np.testing.assert_array_equal(ours.reshape(authors.shape), authors)
    # by hand along x: cell i of n covers [floor(i·L/n), ceil((i+1)·L/n)) (adaptive pooling boundaries)
    length, n = zyx_shape[2], grid_zyx[2]
    along_x = authors.reshape(*zyx_shape, *grid_zyx)[0, 0, :, 0, 0, :]
    for i in range(n):
        start, stop = (i * length) // n, -((-(i + 1) * length) // n)
        assert along_x[:, i].nonzero()[0].tolist() == list(range(start, stop))


def test_region_tversky_loss_is_the_same_on_both_array_orders():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 16, 16, 28, generator=g, dtype=torch.float64)  # (z, y, x)
    labels = torch.randint(0, 3, (2, 16, 16, 28), generator=g)
    authors = RegionSpecificTverskyLoss(num_regions=PAPER_GRID)(logits, labels)
    ours = RegionSpecificTverskyLoss(num_regions=PAPER_GRID_XYZ)(
        _zyx_to_xyz(logits), labels.permute(0, 3, 2, 1)
    )
    torch.testing.assert_close(ours, authors, rtol=1e-12, atol=0)
    # the paper's grid laid over the wrong axes is another loss
    wrong = RegionSpecificTverskyLoss(num_regions=PAPER_GRID)(_zyx_to_xyz(logits), labels.permute(0, 3, 2, 1))
    assert not torch.isclose(wrong, authors, rtol=1e-6, atol=0)


def _mamba_orders(net: nn.Module) -> set[str]:
    return {m.scan_order for m in net.modules() if isinstance(m, MambaLayer)}


@pytest.mark.parametrize(("axes", "order", "grid"), [("xyz", "F", (14, 8, 8)), ("zyx", "C", (8, 8, 14))])
def test_segmentation_module_array_axes_sets_scan_order_and_grid(axes, order, grid):
    module = SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), array_axes=axes)
    assert _mamba_orders(module.net) == {order}
    assert module.loss.loss.trs.num_regions == grid
    custom = SegmentationModule(create_model("mambaclinix_tiny"), patch_size=(16, 16, 16), array_axes=axes)
    assert _mamba_orders(custom.net) == {order}
    # explicit choices win
    explicit = SegmentationModule(
        "mambaclinix_tiny", patch_size=(16, 16, 16), array_axes=axes,
        net_kwargs={"mamba_scan_order": "C"}, loss_kwargs={"num_regions": (2, 2, 2)},
    )  # fmt: skip
    assert _mamba_orders(explicit.net) == {"C"} and explicit.loss.loss.trs.num_regions == (2, 2, 2)


def test_bad_array_axes_is_refused():
    with pytest.raises(ValueError, match=r"array_axes must be 'xyz' .* or 'zyx' .*got 'xzy'"):
        SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), array_axes="xzy")


def test_whole_network_is_the_same_function_of_the_physical_volume():
    """The tiny U-Net with array_axes="xyz" on (x, y, z) arrays equals the one with "zyx" on (z, y, x)
    arrays once its convolution kernels are transposed likewise (every other layer is per channel or
    axis-symmetric)."""
    torch.manual_seed(0)
    authors = SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), array_axes="zyx")
    ours = SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16), array_axes="xyz")
    state = {
        k: (_zyx_to_xyz(v) if v.ndim == 5 else v) for k, v in authors.state_dict().items()
    }  # conv kernels (out, in, kz, ky, kx) -> (out, in, kx, ky, kz)
    ours.load_state_dict(state)
    authors, ours = authors.double().eval(), ours.double().eval()
    volume = torch.randn(1, 1, 16, 24, 32, dtype=torch.float64)  # (z, y, x)
    with torch.no_grad():
        expected = authors.net(volume)[0]
        got = ours.net(_zyx_to_xyz(volume))[0]
    torch.testing.assert_close(got, _zyx_to_xyz(expected), rtol=1e-9, atol=1e-9)


def test_a_checkpoint_saved_before_array_axes_keeps_its_scan_order(tmp_path):
    module = SegmentationModule("mambaclinix_tiny", patch_size=(16, 16, 16))
    hparams = {k: v for k, v in module.hparams.items() if k != "array_axes"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    old = SegmentationModule.load_from_checkpoint(path, weights_only=False)
    assert _mamba_orders(old.net) == {"C"}
    path = tmp_path / "new.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    assert _mamba_orders(SegmentationModule.load_from_checkpoint(path, weights_only=False).net) == {"F"}
