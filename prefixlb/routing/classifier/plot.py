"""The cost–quality curve as a PNG (matplotlib, imported lazily; Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curve"]


def plot_curve(result: dict, path: str | Path, title: str = "") -> Path | None:
    """Quality against the strong-call (cost) fraction, with the all-cheapest / all-strongest
    lines, the random router's diagonal and the CPT(50%) / CPT(80%) points. Returns the path,
    or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curve = result["_curve"]
    tiers = result["tiers"]
    x = [p.call_fraction * 100 for p in curve]
    y = [p.quality for p in curve]
    q_lo, q_hi = curve[0].quality, curve[-1].quality
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(x, y, color="tab:blue", lw=1.6, label=f"classifier (APGR {result['apgr']:.3f})")
    ax.plot([0, 100], [q_lo, q_hi], color="grey", lw=1, ls=":", label="random router (APGR 0.5)")
    ax.axhline(q_lo, color="tab:green", lw=1, ls="--", label=f"all {tiers[0]} ({q_lo:.3f})")
    ax.axhline(q_hi, color="tab:red", lw=1, ls="--", label=f"all {tiers[-1]} ({q_hi:.3f})")
    for key, pct in (("cpt50", 0.5), ("cpt80", 0.8)):
        c = result.get(key)
        if c is not None:
            ax.plot([c * 100], [q_lo + pct * (q_hi - q_lo)], "o", color="tab:orange")
            ax.annotate(f"CPT({int(pct * 100)}%) {c * 100:.1f}%", (c * 100, q_lo + pct * (q_hi - q_lo)),
                        textcoords="offset points", xytext=(6, -12), fontsize=8)
    label = "strong-model calls (%)" if len(tiers) == 2 else "cost-weighted calls above the cheapest tier (%)"
    ax.set_xlabel(label)
    ax.set_ylabel("quality (fraction correct)")
    ax.set_xlim(0, 100)
    ax.set_title(title or "cost–quality curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
