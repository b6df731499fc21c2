"""Build your own 3D networks from mambaclinix's layers and parts, and train one for a few steps.

    python examples/custom_network.py                          # 3-level U-Net, 32^3 synthetic volumes
    python examples/custom_network.py --steps 100 --size 48 --width 16
    python examples/custom_network.py --network backbone       # a plain conv encoder + MambaClinixDecoder

``--network hybrid`` (default) is a small U-Net written from the layers that follows MambaClinix's
stage-wise rule at a smaller scale: the shallow level uses an HGCN block (hierarchical gated
convolution), the deeper two use residual Mamba layers, every encoder level starts with a ResNet-D basic
block, and the decoder concatenates upsampled features with the skips. ``--network backbone`` puts
MambaClinix's decoder (:class:`~mambaclinix.models.MambaClinixDecoder`) over another backbone's features.
Either is trained with the paper's loss (CE + soft Dice + 0.8 L_TRS) on synthetic volumes (a bright ball
in noise); the script prints the loss and the foreground Dice before and after.

``EncoderClassifier`` shows the other direction: MambaClinix's encoder alone
(:class:`~mambaclinix.models.MambaClinixEncoder`) as the backbone of a volume classifier.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mambaclinix.layers import BasicBlockD, ConvNormAct, DecoderResBlock, HGCNBlock, MambaLayer, UpsampleConv
from mambaclinix.losses import DiceCETverskyLoss
from mambaclinix.metrics import per_class_dice
from mambaclinix.models import MambaClinixDecoder, MambaClinixEncoder


class TinyHybridUNet(nn.Module):
    """Three-level U-Net: HGCN at level 0, Mamba at levels 1 and 2.

    Args:
        in_channels: image channels.
        num_classes: output classes, background included.
        width: channels of level 0; levels 1 and 2 have 2× and 4× as many.
        scan_backend: selective-scan backend of the Mamba layers (``None``: the process default).

    Shapes:
        ``(B, in_channels, D, H, W) -> (B, num_classes, D, H, W)``, every axis divisible by 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 8, scan_backend=None):
        super().__init__()
        c = [width, 2 * width, 4 * width]
        self.stem = ConvNormAct(in_channels, c[0])
        self.enc = nn.ModuleList(
            [
                nn.Sequential(BasicBlockD(c[0], c[0]), HGCNBlock(c[0], order=2)),
                nn.Sequential(BasicBlockD(c[0], c[1], stride=2), MambaLayer(c[1], scan_backend=scan_backend)),
                nn.Sequential(BasicBlockD(c[1], c[2], stride=2), MambaLayer(c[2], scan_backend=scan_backend)),
            ]
        )
        self.up = nn.ModuleList([UpsampleConv(c[1], c[0]), UpsampleConv(c[2], c[1])])
        self.dec = nn.ModuleList([DecoderResBlock(2 * c[0], c[0]), DecoderResBlock(2 * c[1], c[1])])
        self.head = nn.Conv3d(c[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.stem(x)
        for stage in self.enc:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for level in (1, 0):  # coarse -> fine
            x = self.dec[level](torch.cat([self.up[level](x), skips.pop()], dim=1))
        return self.head(x)


class ConvBackbone(nn.Module):
    """A plain encoder standing for any backbone: per level a (strided) conv, InstanceNorm and GELU.

    Shapes:
        ``(B, in_channels, *S) -> [(B, widths[0], *S), (B, widths[1], *S/2), (B, widths[2], *S/4)]``.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.stages = nn.ModuleList()
        for s, c in enumerate(widths):
            conv = nn.Conv3d(
                in_channels if s == 0 else widths[s - 1], c, 3, stride=1 if s == 0 else 2, padding=1
            )
            self.stages.append(nn.Sequential(conv, nn.InstanceNorm3d(c, affine=True), nn.GELU()))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class BackboneUNet(nn.Module):
    """Another backbone's features decoded by MambaClinix's decoder (with GELU, like the backbone).

    Shapes:
        ``(B, in_channels, D, H, W) -> (B, num_classes, D, H, W)``, every axis divisible by 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 8):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.backbone = ConvBackbone(in_channels, widths)
        # strides: the backbone's downsampling per level (the first is not undone)
        self.decoder = MambaClinixDecoder(
            widths, num_classes, strides=(1, 2, 2), act="gelu", deep_supervision=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(x))


class EncoderClassifier(nn.Module):
    """MambaClinix's encoder alone (HGCN at levels 0-1, Mamba at level 2) with a classification head: the
    deepest feature map, averaged over space, through a linear layer.

    Shapes:
        ``(B, in_channels, D, H, W) -> (B, num_classes)``, every axis divisible by 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 8, scan_backend=None):
        super().__init__()
        self.encoder = MambaClinixEncoder(
            in_channels,
            n_stages=3,
            features_per_stage=(width, 2 * width, 4 * width),
            scan_backend=scan_backend,
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deepest = self.encoder(x)[-1]  # (B, 4 * width, D/4, H/4, W/4)
        return self.head(deepest.mean(dim=tuple(range(2, deepest.dim()))))


NETWORKS = {"hybrid": TinyHybridUNet, "backbone": BackboneUNet}


def synthetic_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 1, S, S, S)`` with one bright ball each in Gaussian noise, and labels ``(B, S, S, S)``."""
    axis = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    images, labels = [], []
    for _ in range(batch):
        centre = size / 4 + torch.rand(3, generator=generator) * size / 2
        radius = size / 8 + torch.rand(1, generator=generator).item() * size / 8
        dist2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2
        label = (dist2 <= radius**2).long()
        images.append(label.float() + 0.7 * torch.randn(label.shape, generator=generator))
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)


def foreground_dice(model: nn.Module, image: torch.Tensor, label: torch.Tensor) -> float:
    """Mean foreground Dice of the model's argmax prediction over the batch."""
    model.eval()
    with torch.no_grad():
        pred = model(image).argmax(1)
    model.train()
    return float(per_class_dice(pred, label, num_classes=2).mean())  # (B, 1): background excluded


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--network", choices=sorted(NETWORKS), default="hybrid")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="cube edge, divisible by 4")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = NETWORKS[args.network](width=args.width)
    # The region grid must not be finer than the patch: 4 cells per axis on a 32^3 patch.
    loss_fn = DiceCETverskyLoss(num_regions=(4, 4, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    val_image, val_label = synthetic_batch(2, args.size, gen)
    dice_before = foreground_dice(model, val_image, val_label)

    losses = []
    for step in range(args.steps):
        image, label = synthetic_batch(args.batch, args.size, gen)
        loss = loss_fn(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():+.4f}")

    dice_after = foreground_dice(model, val_image, val_label)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{n_params:,} parameters; foreground Dice on held-out volumes: {dice_before:.3f} -> {dice_after:.3f}"
    )
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "dice_before": dice_before,
        "dice_after": dice_after,
    }


if __name__ == "__main__":
    main()
