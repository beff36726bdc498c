"""The PyTorch references our ports are compared with: segment-anything, open_clip / transformers CLIP
with GEM, UniMatch's DeepLabV3+ and train step (re-stated from the published code, which has no
installable package), the reference labeller, and the torchvision stand-in they import through.

Used by the tests, the benchmarks (``tools/bench_*.py``) and the parity command; never by the main,
label or evaluate commands. Each module imports torch when it is imported, so import them only where
torch is installed.
"""
