"""zsp_jax: zero-shot pseudo labels (SAM + CLIP/GEM) and UniMatch semi-supervised segmentation in JAX."""

__version__ = "0.1.0"
