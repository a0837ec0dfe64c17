"""Reference-Based Guidance (paper §3.3): regional mask, DIFT correspondence, energy and schedule."""

from omniportrait.guidance.config import RBGuidanceConfig

__all__ = ["RBGuidanceConfig"]
