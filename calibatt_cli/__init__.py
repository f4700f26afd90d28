"""calibatt: calibrated block-sparse attention for video diffusion transformers."""

__version__ = "0.1.0"
