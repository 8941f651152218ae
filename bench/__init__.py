"""
chatterd's benchmark suite (issue 7): ``python -m bench``; see ``bench/README.md``.
"""

from __future__ import annotations

__all__ = ["smoke"]


def smoke() -> int:
    """
    Run every scenario at toy sizes (< 30 s, no results file) and return an
    exit status: 0 when every stream and request passed its checks.
    """
    from bench.runner import smoke as run_smoke

    return run_smoke()
