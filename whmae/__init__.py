"""whmae: whole-heart 3D+T masked autoencoder for multi-view cine CMR."""

__version__ = "0.1.0"
