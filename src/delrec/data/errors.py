"""The one exception type of the data package."""

from __future__ import annotations


class DataError(Exception):
    """A data set cannot be used as it is; the message names the file or setting and the fix."""
