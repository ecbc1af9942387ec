"""What every figure module shares: matplotlib, imported only when a picture is drawn.

matplotlib is an optional dependency (``pip install -e ".[plot]"``).
"""

from __future__ import annotations

from pathlib import Path


class FigureError(ValueError):
    """An input the figures cannot use (missing log, bad option); the message names it."""


def require_matplotlib() -> None:
    """Fail early, with the command that fixes it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError('attention pictures need matplotlib: pip install -e ".[plot]"') from None


def pyplot():
    """``matplotlib.pyplot``, drawing to files only (no display needed)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
