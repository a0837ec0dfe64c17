"""The evaluation's own error type (kept apart from the metrics package so any module can import it)."""

from omniportrait.errors import OmniPortraitError


class MetricUnavailable(OmniPortraitError):
    """A metric cannot run here: its weights cannot be loaded or a package is missing (the message says which)."""
