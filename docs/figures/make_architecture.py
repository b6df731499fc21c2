"""Draw docs/figures/architecture.svg, the MambaClinix U-Net diagram, with matplotlib.

    python docs/figures/make_architecture.py              # writes architecture.svg next to this file
    python docs/figures/make_architecture.py --png x.png  # also a PNG preview

The paper default: 6 stages of min(32·2^s, 320) channels, stride 1 then 2; HGCN blocks (order s + 2)
in stages 0-2 and residual Mamba layers in stages 3-5 (the stage-wise rule: HGCN for s < ceil(n/2)).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

N_STAGES = 6
CHANNELS = [min(32 * 2**s, 320) for s in range(N_STAGES)]
N_HGCN = (N_STAGES + 1) // 2  # ceil(n / 2)

FILL = {"hgcn": "#d8efe9", "mamba": "#fde3c8", "conv": "#eceff4"}
EDGE = {"hgcn": "#2a8c72", "mamba": "#c8690e", "conv": "#6b7280"}
ENC_X, ENC_W = 0.0, 4.4
DEC_X, DEC_W = 6.6, 3.9
HEAD_X, HEAD_W = 11.3, 1.5
BOX_H, ROW_H = 0.78, 1.05


def _box(ax, x, y, w, h, kind, title, subtitle=None):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.1",
                                facecolor=FILL[kind], edgecolor=EDGE[kind], linewidth=1.4))  # fmt: skip
    if subtitle is None:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=10, fontweight="bold")
    else:
        ax.text(x + w / 2, y + h * 0.68, title, ha="center", va="center", fontsize=10, fontweight="bold")
        ax.text(x + w / 2, y + h * 0.28, subtitle, ha="center", va="center", fontsize=8.6)


def _arrow(ax, start, end, dashed=False, label=None, label_dy=0.12):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, color="#374151",
                                 linewidth=1.2, linestyle=(0, (4, 3)) if dashed else "-",
                                 shrinkA=0, shrinkB=0))  # fmt: skip
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + label_dy, label, ha="center",
                va="bottom", fontsize=8, color="#4b5563")  # fmt: skip


def draw() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(12.8, 8.4))
    ax.set_xlim(-0.1, HEAD_X + HEAD_W + 0.1)
    top = 0.0
    rows = [top - 1.35 - s * ROW_H for s in range(N_STAGES)]  # bottom edge of each stage's box
    ax.set_ylim(rows[-1] - 1.25, top + 0.45)
    ax.axis("off")
    for x, w, text in ((ENC_X, ENC_W, "Encoder"), (DEC_X, DEC_W, "Decoder"), (HEAD_X, HEAD_W, "Outputs")):
        ax.text(x + w / 2, top + 0.25, text, ha="center", fontsize=12, fontweight="bold")

    stem_y = top - 0.45
    _box(ax, ENC_X + 0.5, stem_y - 0.05, ENC_W - 1.0, 0.42, "conv", None)
    ax.text(ENC_X + ENC_W / 2, stem_y + 0.16, "stem: Conv 3³ → IN → LReLU,  C_in → 32", ha="center",
            va="center", fontsize=9)  # fmt: skip
    _arrow(ax, (ENC_X + ENC_W / 2, stem_y - 0.05), (ENC_X + ENC_W / 2, rows[0] + BOX_H))

    for s, y in enumerate(rows):
        kind = "hgcn" if s < N_HGCN else "mamba"
        scale = "S" if s == 0 else f"S/{2**s}"
        stride = "stride 1" if s == 0 else "stride 2"
        if kind == "hgcn":
            layer = f"HGCN block (order {s + 2})"
            if s == N_HGCN - 1:
                layer = f"channel LN → {layer}"
        else:
            layer = "residual Mamba layer"
        _box(ax, ENC_X, y, ENC_W, BOX_H, kind, f"stage {s}  ·  {CHANNELS[s]} ch  ·  {scale}",
             f"BasicBlockD ({stride}) → {layer}")  # fmt: skip
        if s + 1 < N_STAGES:
            _arrow(ax, (ENC_X + ENC_W / 2, y), (ENC_X + ENC_W / 2, rows[s + 1] + BOX_H))

    yb = rows[-1]
    _box(ax, DEC_X, yb, DEC_W, BOX_H, "conv", f"bottleneck  ·  {CHANNELS[-1]} ch  ·  S/{2 ** (N_STAGES - 1)}",
         "BasicBlockD (stride 1)")  # fmt: skip
    _arrow(ax, (ENC_X + ENC_W, yb + BOX_H / 2), (DEC_X, yb + BOX_H / 2))
    for t in range(N_STAGES - 2, -1, -1):
        y = rows[t]
        scale = "S" if t == 0 else f"S/{2**t}"
        _box(ax, DEC_X, y, DEC_W, BOX_H, "conv", f"level {t}  ·  {CHANNELS[t]} ch  ·  {scale}",
             "cat[up, skip] → residual block")  # fmt: skip
        _arrow(ax, (DEC_X + DEC_W / 2, rows[t + 1] + BOX_H), (DEC_X + DEC_W / 2, y))
        ax.text(DEC_X + DEC_W / 2 + 0.1, (rows[t + 1] + BOX_H + y) / 2, "nearest ×2, 1×1 conv", fontsize=7.5,
                color="#4b5563", va="center")  # fmt: skip
        _arrow(ax, (ENC_X + ENC_W, y + BOX_H / 2), (DEC_X, y + BOX_H / 2), dashed=True,
               label="skip → BasicBlockD")  # fmt: skip
        _box(ax, HEAD_X, y + 0.12, HEAD_W, BOX_H - 0.24, "conv", f"logits {t}")
        _arrow(ax, (DEC_X + DEC_W, y + BOX_H / 2), (HEAD_X, y + BOX_H / 2), label="1×1 conv")

    ly = rows[-1] - 0.55
    x = ENC_X
    for kind, text in (("hgcn", "HGCN block (hierarchical gated convolution)"),
                       ("mamba", "residual Mamba layer (L = D·H·W tokens)"),
                       ("conv", "convolution blocks (InstanceNorm, LeakyReLU)")):  # fmt: skip
        ax.add_patch(FancyBboxPatch((x, ly - 0.12), 0.25, 0.25, boxstyle="round,pad=0,rounding_size=0.04",
                                    facecolor=FILL[kind], edgecolor=EDGE[kind], linewidth=1.4))  # fmt: skip
        ax.text(x + 0.35, ly, text, va="center", fontsize=9)
        x += 4.3
    ax.text(ENC_X, ly - 0.5, "Input (B, C_in, D, H, W), every axis a multiple of 32. Deep supervision returns"
            " logits 0-4, finest first; without it, logits 0 only.", fontsize=9, color="#4b5563")  # fmt: skip
    fig.tight_layout(pad=0.3)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--png", type=Path, default=None, help="also write a PNG preview here")
    args = parser.parse_args()
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "mambaclinix", "font.family": "DejaVu Sans"})
    fig = draw()
    fig.savefig(Path(__file__).with_name("architecture.svg"), metadata={"Date": None})
    if args.png:
        fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
