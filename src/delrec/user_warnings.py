"""Warnings attributed to the user's line: the first frame outside delrec and torch, so that a
warning raised inside a layer's forward (through ``Module.__call__`` and delrec's wrappers)
names the line that called the layer, whatever the depth of the call."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INSIDE = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` at the nearest caller outside delrec and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
