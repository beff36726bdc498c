"""Throughput settings of the automatic mask generator that depend on the device kind.

None of them changes the algorithm; they change how the work is cut into XLA operations, and so
the speed and memory (and, through the blocking of matrix products, the last bits of float
results: fix them when comparing runs bit for bit).

* ``images_per_device``: images one device processes in one program step. The SAM encoder and
  the prompt decoder then run on batches of that many images. On the 2-core CPU one image at a
  time is as fast as several (the encoder already keeps both cores busy) and uses the least
  memory; on GPUs and TPUs a batch keeps the matrix units fed.
* ``decoder_group``: prompts of an image decoded by one decoder call (a value >=
  ``points_per_batch`` decodes the whole point batch at once). On the CPU, groups of 4 keep each prompt's 4096 x 256 image tokens in
  cache between layers (about 25 % faster than 64); accelerators prefer the widest batches.
* ``mask_chunk``: kept masks upsampled to full resolution at once; the float32 logits of one
  chunk, (chunk, H, W) per image, are the largest temporary of the final step. On the CPU, 4
  keeps a chunk in cache (measured at 480x640 with 256 kept masks: 4 -> 1.3 s per image for
  upsampling, pooling and painting, 16 -> 3.3 s).

The CPU values were measured on the development machine (README, Benchmarks); the GPU / TPU
values are starting points that no measurement here has tuned yet (no accelerator so far).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Tuning:
    images_per_device: int
    decoder_group: int
    mask_chunk: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")


DEFAULTS = {
    "cpu": Tuning(images_per_device=1, decoder_group=4, mask_chunk=4),
    "gpu": Tuning(images_per_device=4, decoder_group=64, mask_chunk=64),
    "tpu": Tuning(images_per_device=4, decoder_group=64, mask_chunk=64),
}


def platform_of(devices=None) -> str:
    """'cpu', 'gpu' or 'tpu' for the given devices (default: the local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    name = devices[0].platform.lower()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def defaults(platform: str | None = None, **overrides: int | None) -> Tuning:
    """The device kind's defaults with every override that is not None or 0 applied (0 = "the default",
    as the config fields ``label.images_per_device`` etc. write it)."""
    base = DEFAULTS.get(platform or platform_of(), DEFAULTS["gpu"])
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v})
