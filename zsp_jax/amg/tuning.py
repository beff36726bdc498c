"""Throughput settings of the mask generator and the labeller, and their limits per device kind.

None of them changes the algorithm; they change how the work is cut into XLA operations, and so
the speed and memory (and, through the blocking of matrix products, the last bits of float
results: fix them when comparing runs bit for bit).

* ``images_per_device``: images one device processes in one program step. The SAM encoder and
  the prompt decoder then run on batches of that many images.
* ``decoder_group``: prompts of an image decoded by one decoder call (values above
  ``points_per_batch`` decode the whole point batch at once).
* ``mask_chunk``: kept masks upsampled to full resolution at once; the float32 logits of one
  chunk, (chunk, H, W) per image, are the largest temporary of the final step.

Each is an int or ``"auto"``: the largest value, up to the device kind's limit (``LIMITS``), whose
compiled program fits the device's memory (``zsp_jax.amg.programs`` chooses, per size bucket).
The limits are where larger stops paying: on the CPU one image per step is as fast as several
(the encoder already keeps the cores busy), groups of 4 prompts keep each prompt's 4096 x 256
image tokens in cache between the decoder's layers, and chunks of 4 masks keep a chunk's
full-resolution logits in cache (the measurements are in docs/benchmarks.md); accelerators take
the widest batches that fit. The GPU / TPU limits are starting points no measurement here has
tuned yet (no accelerator so far).

``BUCKET_MIN_IMAGES`` is the fewest images a compiled program should serve in a folder of mixed
sizes (``zsp_jax.amg.geometry.folder_buckets``): on the CPU a program compiles in about the time
of one or two images, on an accelerator in the time of a hundred.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

AUTO = "auto"
FIELDS = ("images_per_device", "decoder_group", "mask_chunk")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Concrete throughput settings of one compiled program."""

    images_per_device: int
    decoder_group: int
    mask_chunk: int

    def __post_init__(self) -> None:
        for name in FIELDS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")

    def describe(self) -> str:
        """e.g. ``"4 images x group 64 x chunk 64"``."""
        n = self.images_per_device
        return f"{n} image{'s' if n != 1 else ''} x group {self.decoder_group} x chunk {self.mask_chunk}"


LIMITS = {
    "cpu": Sizes(images_per_device=1, decoder_group=4, mask_chunk=4),
    "gpu": Sizes(images_per_device=8, decoder_group=64, mask_chunk=64),
    "tpu": Sizes(images_per_device=8, decoder_group=64, mask_chunk=64),
}
BUCKET_MIN_IMAGES = {"cpu": 8, "gpu": 64, "tpu": 64}


def platform_of(devices: Any = None) -> str:
    """'cpu', 'gpu' or 'tpu' for the given devices (default: the local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    name = devices[0].platform.lower()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def limits_for(platform: str) -> Sizes:
    """The largest sizes ``"auto"`` tries on a device kind (unknown kinds: the GPU's)."""
    return LIMITS.get(platform, LIMITS["gpu"])


def parse_size(name: str, value: Any) -> int | str:
    """A config value of one size field -> an int >= 1 or ``"auto"`` (``None`` and ``0`` mean ``"auto"``; digit
    strings, as a command-line override of a string field gives them, are ints). Errors name ``name``."""
    if value is None or value == AUTO:
        return AUTO
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise ValueError(f"config field {name}={value!r}: expected 'auto' or a positive integer")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 4096:
        raise ValueError(f"config field {name}={value!r}: expected 'auto' or an integer in 1..4096")
    return AUTO if value == 0 else value


@dataclasses.dataclass(frozen=True)
class SizeRequest:
    """Requested sizes: each an int >= 1 (used as given) or ``"auto"`` (searched, see ``candidates``)."""

    images_per_device: int | str = AUTO
    decoder_group: int | str = AUTO
    mask_chunk: int | str = AUTO

    @classmethod
    def of(cls, prefix: str = "", **values: Any) -> "SizeRequest":
        """From config-style values (see ``parse_size``); errors name ``<prefix><field>``."""
        return cls(**{name: parse_size(prefix + name, values.get(name)) for name in FIELDS})

    @property
    def is_fixed(self) -> bool:
        return all(getattr(self, name) != AUTO for name in FIELDS)

    def largest(self, limits: Sizes) -> Sizes:
        """Every ``"auto"`` at its limit."""
        return Sizes(**{name: limits_value(getattr(self, name), getattr(limits, name)) for name in FIELDS})

    def candidates(self, limits: Sizes) -> list[Sizes]:
        """The sizes ``"auto"`` tries, largest first: each candidate halves one automatic field of the one before.

        Images per device are halved first (every buffer of the program grows with them, and on
        one image the decoder groups and mask chunks already fill a device), then the larger of
        decoder group and mask chunk (the chunk on a tie), down to 1 each. Explicit values stay.
        """
        current = self.largest(limits)
        out = [current]
        auto = [name for name in FIELDS if getattr(self, name) == AUTO]
        while True:
            shrinkable = [name for name in auto if getattr(current, name) > 1]
            if not shrinkable:
                return out
            if "images_per_device" in shrinkable:
                name = "images_per_device"
            else:
                name = max(shrinkable, key=lambda n: (getattr(current, n), n == "mask_chunk"))
            current = dataclasses.replace(current, **{name: getattr(current, name) // 2})
            out.append(current)


def limits_value(requested: int | str, limit: int) -> int:
    return limit if requested == AUTO else int(requested)
