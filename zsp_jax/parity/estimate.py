"""A rough time estimate of a parity run, printed before it starts.

The rule: count the floating-point work of every forward pass each side makes, from the model
sizes in the files' tensor shapes (no weights are read) and the image count, and divide it by 40 %
of this machine's measured dense matmul rate (torch on the CPU for the originals, JAX on its first
device for ours; ``zsp_jax.utils.bench``); add 10 s per compiled program of ours.

* a transformer pass costs 2 x weights x tokens (each weight is one multiply-add per token), plus
  4 x tokens^2 x width per global-attention block of SAM's encoder;
* one SAM mask-decoder prompt costs about 3 GFLOP at a 64 x 64 embedding grid (its two-way
  transformer and upscaling, counted by hand), scaled with the grid's area;
* DeepLabV3+ costs 3 x weights x (side / 16)^2 (most weights run at stride 16; the decoder at
  stride 4 adds about half).

Passes: the originals embed each image twice (predictor, mask generator) and decode 16 + every
AMG point; GEM runs once per image for the CLIP rows and once in the reference labeller; DeepLab once.
Each run of ours embeds three times (predictor, generator, labeller) and decodes 16 + twice the
AMG points. The candidate fallback of random weights adds a pass. On the tiny test models on the
2-core development machine, runs took 0.5 to 2 times the estimate; it has not been checked on
real-size models.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from zsp_jax.parity.inputs import Setup

EFFICIENCY = 0.4  # share of the peak matmul rate a whole model reaches
DECODER_FLOPS_64 = 3e9  # one SAM decoder prompt at a 64 x 64 grid
COMPILE_SECONDS = 10.0  # per compiled program of ours
PROGRAMS_PER_RUN = {"sam": 2, "amg": 1, "clip": 2, "label": 1, "deeplab": 1}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds and the figures they come from."""

    seconds: float
    reference_flops: float
    ours_flops: float
    torch_rate: float
    jax_rate: float

    def line(self) -> str:
        about = f"{self.seconds:.0f} s" if self.seconds < 90 else f"{self.seconds / 60:.0f} min"
        return (f"estimate: about {about}: originals "
                f"{self.reference_flops / 1e12:.2f} TFLOP at 40% of torch's measured {self.torch_rate / 1e9:.0f} "
                f"GFLOP/s, ours {self.ours_flops / 1e12:.2f} TFLOP at 40% of JAX's measured "
                f"{self.jax_rate / 1e9:.0f} GFLOP/s, + {COMPILE_SECONDS:.0f} s per compiled program "
                "(a rough rule, see zsp_jax/parity/estimate.py)")


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint (safetensors headers, a torch file or a transformers
    directory), without keeping the weights."""
    from zsp_jax.models.clip.convert import read_torch_file

    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if f.endswith((".safetensors", ".bin"))]
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="numpy") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})  # noqa: SIM118
        else:
            shapes.update({k: tuple(v.shape) for k, v in read_torch_file(f).items() if hasattr(v, "shape")})
    return shapes


def _weights(shapes: dict[str, tuple[int, ...]], prefixes: tuple[str, ...]) -> int:
    return int(sum(np.prod(s) for k, s in shapes.items() if k.startswith(prefixes)))


def sam_flops(shapes: dict[str, tuple[int, ...]]) -> tuple[float, float]:
    """(one image-encoder pass, one decoder prompt) FLOPs of a segment-anything state_dict's shapes."""
    grid = shapes["image_encoder.pos_embed"][1]
    width = shapes["image_encoder.pos_embed"][3]
    tokens = grid * grid
    globals_ = sum(1 for k, s in shapes.items() if k.endswith("attn.rel_pos_h") and s[0] == 2 * grid - 1)
    encoder = 2 * _weights(shapes, ("image_encoder.",)) * tokens + 4 * tokens**2 * width * globals_
    return float(encoder), DECODER_FLOPS_64 * tokens / 64**2


def clip_flops(shapes: dict[str, tuple[int, ...]], clip_size: int) -> float:
    """One GEM pass (vision tower at ``clip_size``) of a CLIP checkpoint's shapes (any of the three layouts)."""
    patch = shapes[next(k for k in shapes if k.endswith(("visual.conv1.weight", "patch_embedding.weight")))][-1]
    tokens = (clip_size // patch) ** 2 + 1
    return float(2 * _weights(shapes, ("visual.", "vision_model.")) * tokens)


def deeplab_flops(shapes: dict[str, tuple[int, ...]], side: int) -> float:
    return float(3 * sum(int(np.prod(s)) for s in shapes.values()) * (side / 16) ** 2)


def estimate(setup: Setup, *, torch_rate: float | None = None, jax_rate: float | None = None) -> Estimate:
    """The estimate for ``setup`` (rates measured here unless given)."""
    from zsp_jax.utils import bench

    n = len(setup.images)
    comps = set(setup.components)
    ref = per_run = 0.0
    if setup.sam is not None:
        encoder, prompt = sam_flops(tensor_shapes(setup.sam[1]))
        amg = setup.options.amg
        amg_prompts = sum(len(grid) * 4**layer for layer, grid in enumerate(amg.layer_grids()))
        if "sam" in comps:
            ref += n * (encoder + 16 * prompt)
            per_run += n * (encoder + 16 * prompt)
        if {"amg", "label"} & comps:
            ref += n * (encoder + amg_prompts * prompt)
        for group in ("amg", "label"):
            if group in comps:
                per_run += n * (encoder + amg_prompts * prompt)
    if setup.clip is not None:
        gem = clip_flops(tensor_shapes(setup.clip[1]), setup.options.clip_size)
        ref += n * gem * (("clip" in comps) + ("label" in comps))
        per_run += n * gem * (("clip" in comps) + ("label" in comps))
    if setup.deeplab is not None:
        dl = deeplab_flops(tensor_shapes(setup.deeplab[1]), setup.deeplab_size)
        ref += n * dl
        per_run += n * dl
    programs = sum(PROGRAMS_PER_RUN[c] for c in comps if c != "deeplab" or setup.deeplab is not None)
    torch_rate = torch_rate or bench.torch_matmul_rate(1024)
    jax_rate = jax_rate or bench.matmul_rate(n=1024)
    runs = len(setup.runs)
    seconds = (ref / (EFFICIENCY * torch_rate) + runs * per_run / (EFFICIENCY * jax_rate)
               + runs * programs * COMPILE_SECONDS)
    return Estimate(seconds, ref, runs * per_run, torch_rate, jax_rate)


def describe_models(setup: Setup) -> list[str]:
    """Lines naming what is compared (for the console before the run)."""
    out = [f"{len(setup.images)} image(s): " + ", ".join(f"{name} {im.shape[1]}x{im.shape[0]}"
                                                        for name, im in setup.images)]
    for label, files in (("SAM", setup.sam), ("CLIP", setup.clip), ("DeepLab", setup.deeplab)):
        if files is not None:
            out.append(f"{label}: ours {files[0]}" + ("" if files[0] == files[1] else f", original {files[1]}"))
    out.append("runs: " + ", ".join(r.name + (" (judged)" if r.judged else "") for r in setup.runs))
    return out
