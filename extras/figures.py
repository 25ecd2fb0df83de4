"""
extras/figures.py -- draw the README's architecture figure with matplotlib (no model is built or run).

    python -m extras.figures                       # writes docs/architecture.png
    python -m extras.figures --out=/tmp/arch.png

Three panels, left to right, with the names model.py uses:
  1. one transformer block (`Block`): x + MLA(RMSNorm(x)), then h + MoE(RMSNorm(h))      (V3 §2.1)
  2. inside MLA and MoE: the low-rank query and KV compression with the decoupled rotary key
     (V2 §2.1.2-2.1.3, eq. 9-19) and DeepSeekMoE's shared + routed experts with sigmoid routing and the
     load-balancing bias that only selects experts (V3 eq. 12-16)
  3. one Multi-Token Prediction module (`MTPModule`, V3 §2.2, eq. 21-25): the main model's hidden state
     and the embedding of the next token, normed, concatenated, projected, one block, the shared head.
The drawing is boxes and arrows at fixed coordinates, so it runs in about a second.
"""

from dataclasses import dataclass, field
from pathlib import Path

# no pyplot: no global backend switch for whoever imports this module
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from cli import parse_config

ROOT = Path(__file__).resolve().parent.parent

# One colour per kind of part, the same in every panel.
COLORS = {"norm": "#e8e8e8", "attn": "#f9d9a6", "moe": "#b9dcf2", "cache": "#f5b3b3", "io": "#ffffff",
          "mtp": "#cfe8c4", "op": "#ffffff"}


@dataclass
class FigureConfig:
    """Where the architecture figure goes (each field is a --flag)."""
    out: str = field(default="docs/architecture.png", metadata={"help": "PNG file to write (relative to the "
                                                                        "repository root unless absolute)"})
    dpi: int = field(default=130, metadata={"help": "resolution of the PNG"})

    def __post_init__(self):
        """Reject a resolution matplotlib cannot use, and a file name that is not a PNG."""
        if self.dpi <= 0:
            raise ValueError(f"--dpi={self.dpi} is invalid: use a positive resolution, e.g. --dpi=130")
        if not self.out.endswith(".png"):
            raise ValueError(f"--out={self.out!r} is invalid: the figure is written as PNG; end the name in .png")


def box(ax, x: float, y: float, text: str, kind: str, w: float = 2.6, h: float = 0.6, size: float = 8.5):
    """A rounded box centred at (x, y) in data units, filled by the colour of `kind`; returns its centre."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=COLORS[kind], edgecolor="#333333", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)
    return x, y


def arrow(ax, start: tuple, end: tuple, label: str = "", rad: float = 0.0):
    """An arrow from `start` to `end` (points in data units), with an optional label beside its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, linewidth=1.0,
                                 color="#333333", connectionstyle=f"arc3,rad={rad}"))
    if label:
        ax.text((start[0] + end[0]) / 2 + 0.1, (start[1] + end[1]) / 2, label, fontsize=7.5, va="center",
                color="#555555")


def panel(ax, title: str, height: float = 12.0):
    """Prepare an axis as an empty canvas 8 units wide and `height` tall with a title."""
    ax.set_xlim(0, 8)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    ax.set_title(title, fontsize=11, fontweight="bold")


def draw_block(ax):
    """Panel 1: a Block, two pre-norm residual sublayers (model.py §7)."""
    panel(ax, "One block (Block)")
    x = 4.0
    box(ax, x, 0.7, "h  (B, T, dim)", "io")
    box(ax, x, 2.3, "RMSNorm", "norm")
    box(ax, x, 3.8, "MLA\nlatent attention", "attn", h=0.9)
    box(ax, x, 5.3, "+", "op", w=0.6)
    box(ax, x, 6.8, "RMSNorm", "norm")
    box(ax, x, 8.3, "MoE  (dense SwiGLU MLP\nin the first n_dense_layers)", "moe", h=0.9, w=3.4)
    box(ax, x, 9.8, "+", "op", w=0.6)
    box(ax, x, 11.3, "to the next block", "io")
    for a, b in [(1.0, 2.0), (2.6, 3.35), (4.25, 5.0), (5.6, 6.5), (7.1, 7.85), (8.75, 9.5), (10.1, 11.0)]:
        arrow(ax, (x, a), (x, b))
    for y0, y1 in [(1.6, 5.3), (5.95, 9.8)]:                  # skip connections, drawn left of the column
        ax.plot([x, x - 2.1, x - 2.1], [y0, y0, y1], color="#333333", linewidth=1.0)
        arrow(ax, (x - 2.1, y1), (x - 0.32, y1))
        ax.text(x - 2.0, (y0 + y1) / 2, "residual", fontsize=7.5, color="#555555", rotation=90, va="center")
    ax.text(0.2, -0.2, "decoding caches only MLA's latent c^KV and k^R", fontsize=7.5, color="#555555")


def draw_mla_moe(ax):
    """Panel 2: MLA's compressions (V2 eq. 9-19) over DeepSeekMoE's routing (V3 eq. 12-16)."""
    panel(ax, "Inside: MLA (top) and MoE (bottom)")
    # MLA, top half
    box(ax, 1.6, 11.2, "queries: W^DQ -> c^Q\n(q_lora_rank) -> W^UQ", "attn", w=3.0, h=0.8, size=7.8)
    box(ax, 5.6, 11.2, "keys/values: W^DKV -> c^KV\n(kv_lora_rank), W^KR -> k^R", "attn", w=3.6, h=0.8, size=7.8)
    box(ax, 5.6, 9.8, "KVCache: c^KV + k^R per token\n(absorb path)", "cache", w=3.6, h=0.8, size=7.8)
    box(ax, 1.6, 9.8, "q = [q^C ; RoPE(q^R)]", "attn", w=3.0, size=7.8)
    box(ax, 3.8, 8.3, "softmax(q k^T / sqrt(d)) v,  k = [W^UK c^KV ; RoPE(k^R)],\nv = W^UV c^KV  ->  W^O",
        "attn", w=7.4, h=0.8, size=7.8)
    arrow(ax, (1.6, 10.8), (1.6, 10.1))
    arrow(ax, (5.6, 10.8), (5.6, 10.2))
    arrow(ax, (1.6, 9.5), (2.4, 8.7))
    arrow(ax, (5.6, 9.4), (5.0, 8.7))
    ax.plot([0.1, 7.9], [7.35, 7.35], color="#999999", linewidth=0.8, linestyle="--")
    # MoE, bottom half
    box(ax, 4.0, 6.5, "router (Gate): s = sigmoid(u e_i)\ntop-K of s + b within top groups",
        "moe", w=5.4, h=0.8, size=7.8)
    box(ax, 1.4, 4.6, "shared\nexpert(s)", "moe", w=2.0, h=0.8, size=7.8)
    for i, xe in enumerate([3.5, 4.8, 6.1, 7.3]):
        box(ax, xe, 4.6, f"E{i + 1}" if i < 3 else "...", "moe", w=1.0, h=0.8, size=7.8)
    box(ax, 4.0, 2.8, "sum: shared(x) + sum_{i in top-K} g_i E_i(x),  g_i = s_i / sum_top-K s_j", "moe", w=7.4, size=7.8)
    arrow(ax, (3.5, 6.1), (3.5, 5.0), "K of N_r")
    arrow(ax, (4.8, 6.1), (4.8, 5.0))
    arrow(ax, (1.4, 4.2), (2.2, 3.1))
    arrow(ax, (4.1, 4.2), (4.1, 3.1))
    box(ax, 4.0, 1.2, "bias b: +gamma if an expert is underloaded, -gamma if over\n"
        "(after each step, no loss term; V3 §2.1.2)", "norm", w=7.4, h=0.8, size=7.6)
    arrow(ax, (6.9, 1.6), (6.9, 6.1), rad=0.3)


def draw_mtp(ax):
    """Panel 3: one MTP module predicting the token after next (V3 eq. 21-25)."""
    panel(ax, "Multi-Token Prediction (MTPModule)")
    box(ax, 2.0, 0.7, "h_i  from the main model", "io", w=3.2, size=7.8)
    box(ax, 6.0, 0.7, "Emb(t_{i+1}), shared", "io", w=3.0, size=7.8)
    box(ax, 2.0, 2.3, "RMSNorm", "norm", w=2.4)
    box(ax, 6.0, 2.3, "RMSNorm", "norm", w=2.4)
    box(ax, 4.0, 3.9, "concat -> M (2 dim -> dim)", "mtp", w=4.4)
    box(ax, 4.0, 5.5, "Block (MLA + MoE)", "mtp", w=4.4)
    box(ax, 4.0, 7.1, "RMSNorm -> output head (shared)", "mtp", w=4.4)
    box(ax, 4.0, 8.7, "predicts t_{i+2}: loss L_MTP, weight lambda", "io", w=5.4)
    box(ax, 4.0, 10.6, "sampling: the same module drafts the next\n"
        "token; the main model verifies it", "norm", w=6.0, h=0.9, size=7.8)
    arrow(ax, (2.0, 1.0), (2.0, 2.0))
    arrow(ax, (6.0, 1.0), (6.0, 2.0))
    arrow(ax, (2.0, 2.6), (3.2, 3.6))
    arrow(ax, (6.0, 2.6), (4.8, 3.6))
    for a, b in [(4.2, 5.2), (5.8, 6.8), (7.4, 8.4)]:
        arrow(ax, (4.0, a), (4.0, b))
    arrow(ax, (4.0, 9.0), (4.0, 10.1))


def draw(out: Path, dpi: int = 130) -> Path:
    """Draw the three panels into one PNG at `out` (its folder is created) and return the path."""
    fig = Figure(figsize=(16, 7.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [0.8, 1.15, 1.0]})
    draw_block(axes[0])
    draw_mla_moe(axes[1])
    draw_mtp(axes[2])
    fig.suptitle("tinyseek = DeepSeek-V3's architecture (model.py): blocks of MLA + MoE, and an MTP module",
                 fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def main(argv: "list[str] | None" = None) -> Path:
    """Parse the flags, draw the figure and say where it went."""
    cfg = parse_config(FigureConfig, argv, description="Draw docs/architecture.png (one block, MLA + MoE, MTP).")
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else ROOT / cfg.out
    path = draw(out, cfg.dpi)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
