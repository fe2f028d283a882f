"""What the command lines' number flags share (maia-controller's and maia-simnode's)."""

from __future__ import annotations

import argparse
import math


def finite_number(text: str) -> float:
    """An argparse type: a finite number. `float` reads "nan", "inf" and "1e400" too, which no
    flag means: a NaN compares false with everything (`max(0.0, nan)` made --reconcile-interval
    nan a busy loop; it passed maia-simnode's `< 0` checks), and an infinite interval cannot be
    sent as milliseconds (every simulated node died of it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
