"""Deployment: integer-delay streaming inference, NIR export/import, hardware report."""

from delrec.deploy.nir_format import NIRExportError, NIRImportError, export_nir, import_nir, to_nir
from delrec.deploy.streaming import DelayedSynapses, StreamingLayer, StreamingNetwork, StreamState

__all__ = [
    "DelayedSynapses",
    "NIRExportError",
    "NIRImportError",
    "StreamState",
    "StreamingLayer",
    "StreamingNetwork",
    "export_nir",
    "import_nir",
    "to_nir",
]
