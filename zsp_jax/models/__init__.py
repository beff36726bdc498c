"""Flax NNX models: SAM (sam), CLIP with GEM (clip), DeepLabV3+ (deeplab)."""
