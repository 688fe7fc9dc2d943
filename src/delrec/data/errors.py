"""The exception types of the data package."""

from __future__ import annotations


class DataError(Exception):
    """A data set cannot be used as it is; the message names the file or setting and the fix."""


class DownloadError(DataError):
    """Fetching the official files failed (no network, a broken transfer, a wrong checksum, an
    archive that does not extract); the message says how to retry or fetch them by hand."""
