"""The one error type every loader failure is reported as."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model could not be found, parsed or loaded; the message says which and why."""
