"""Model components: the Pivot ID Encoder and the tiny offline builders."""

from omniportrait.models.pivot_encoder import PivotIDEncoder

__all__ = ["PivotIDEncoder"]
