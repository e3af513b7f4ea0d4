"""geoclip: CLIP-style contrastive learning between Sentinel-2 tiles and ground-cover classes."""

__version__ = "0.1.0"
