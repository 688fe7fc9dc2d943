"""Execution engines of the recurrent-delay layer: the reference loop and the fast paths."""

from delrec.engine.reference import reference_recurrence

__all__ = ["reference_recurrence"]
