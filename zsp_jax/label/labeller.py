"""The zero-shot labeller as a library: SAM + GEM-CLIP models, class prompts, compiled programs.

``Labeller(sam, clip, tokenizer, options)`` embeds the class prompts once, then labels images:

* ``prepare(image)`` (host, thread-safe): the size the image is labelled at (``max_side`` /
  ``letterbox``), its bucket, the uint8 SAM crops and the uint8 GEM input (PIL resizes, as the
  references);
* ``dispatch(prepared)``: up to ``batch_size`` prepared images of one bucket, padded to a full
  batch, sharded over the mesh and started on the devices (returns at once);
* ``results(outputs, prepared)``: waits, and turns one batch's device outputs into
  ``ImageResult``s at each image's original size;
* ``label(images)``: all of that for a list of images (tests, notebooks).

Per bucket one program is compiled (``compiled``; ahead of time, with its memory estimate); its
work is ``images_per_device`` images per device at a time, so results do not depend on the
number of devices (``zsp_jax.utils.sharding``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from zsp_jax.amg import device as D
from zsp_jax.amg import tuning
from zsp_jax.amg.generator import check_outputs, prepare_inputs
from zsp_jax.amg.geometry import Bucket
from zsp_jax.label.device import LabelInputs, LabelOutputs, LabelPlan, label_group
from zsp_jax.label.options import LabelOptions
from zsp_jax.models.sam.transforms import resize_longest_side_shape
from zsp_jax.utils import bench
from zsp_jax.utils.sharding import data_mesh, map_groups_per_device


@dataclasses.dataclass
class Prepared:
    """One image ready for the device (host numpy arrays).

    Attributes:
      original_hw: (H, W) of the decoded image; label maps are returned at this size.
      work_hw: (h, w) the image is labelled at (smaller when ``max_side`` caps it, or the
        letterbox size).
      bucket: its size bucket.
      amg: ``AmgInputs`` of this one image (leading axis 1).
      clip_image: (c, c, 3) uint8 GEM input.
      image: the (h, w, 3) uint8 work image (kept for overlays).
    """

    original_hw: tuple[int, int]
    work_hw: tuple[int, int]
    bucket: Bucket
    amg: D.AmgInputs
    clip_image: np.ndarray
    image: np.ndarray


@dataclasses.dataclass
class ImageResult:
    """The labeller's output for one image, at its original size.

    Attributes:
      label: (H, W) uint8, 0 = background, 1..N classes, 255 = ignore (uncovered).
      confidence: (H, W) uint8 winning segment's score x 255, or None.
      segments: per kept segment a dict (``class``, ``best_class``, ``similarity``, ``score``,
        ``predicted_iou``, ``stability_score``, ``bbox`` XYWH, ``area``; ``segmentation`` COCO
        RLE when masks were requested), in the generator's order.
      num_segments: kept segments.
      warnings: e.g. masks dropped because more than ``max_masks`` survived.
    """

    label: np.ndarray
    confidence: np.ndarray | None
    segments: list[dict[str, Any]]
    num_segments: int
    warnings: list[str]


def _resize_nearest(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), Image.NEAREST))


class Labeller:
    """Zero-shot pseudo labels from a SAM and a CLIP model (see the module docstring).

    Args:
      sam: ``zsp_jax.models.sam.Sam`` (converted weights).
      clip: ``zsp_jax.models.clip.ClipModel``.
      tokenizer: its ``ClipTokenizer``.
      options: ``LabelOptions``.
      mesh: device mesh (default: every local device on a "data" axis).
      images_per_device, decoder_group, mask_chunk: throughput settings (None / 0: the device
        kind's defaults, ``zsp_jax.amg.tuning``).
      text_cache_dir: where class embeddings are cached (``ClassEmbedder``).
    """

    def __init__(self, sam: Any, clip: Any, tokenizer: Any, options: LabelOptions, *, mesh: Mesh | None = None,
                 images_per_device: int | None = None, decoder_group: int | None = None,
                 mask_chunk: int | None = None, text_cache_dir: str | None = None):
        from zsp_jax.models.clip import ClassEmbedder
        from zsp_jax.models.clip.preprocess import normalize as clip_normalize
        from zsp_jax.utils.lut import uint8_table

        if options.amg.min_mask_region_area:
            raise ValueError("min_mask_region_area > 0 is not supported by the labeller (a host clean-up per mask)")
        self.options = options
        self.rules = options.rules()
        self.mesh = mesh if mesh is not None else data_mesh()
        self.tuning = tuning.defaults(tuning.platform_of(self.mesh.devices.flat), images_per_device=images_per_device,
                                      decoder_group=decoder_group, mask_chunk=mask_chunk)
        self.batch_size = self.mesh.devices.size * self.tuning.images_per_device
        self.image_size = sam.config.image_size
        texts, _ = options.classes.prompt_rows()
        embedder = ClassEmbedder(clip, tokenizer, cache_dir=text_cache_dir)
        self.text = np.asarray(embedder(texts, options.templates), np.float32)  # (P, D) unit rows
        self.text_checkpoint = embedder.checkpoint_id
        self.clip_table = uint8_table(lambda v: clip_normalize(v.astype(np.float32) / np.float32(255.0)))
        replicated = NamedSharding(self.mesh, P())
        self._sam_graph, sam_state = nnx.split(sam)
        self._clip_graph, clip_state = nnx.split(clip)
        self._replicated = jax.device_put((sam_state, clip_state, self.text, self.clip_table), replicated)
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._compiled: dict[LabelPlan, Any] = {}
        self.compile_seconds: dict[LabelPlan, float] = {}
        self.memory: dict[LabelPlan, str] = {}

    # ------------------------------------------------------------------ sizes and plans

    def work_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) an (H, W) image is labelled at."""
        h, w = int(hw[0]), int(hw[1])
        o = self.options
        if o.letterbox:
            return resize_longest_side_shape(h, w, o.letterbox)
        if o.max_side and max(h, w) > o.max_side:
            return resize_longest_side_shape(h, w, o.max_side)
        return h, w

    def bucket_for(self, hw: tuple[int, int]) -> Bucket:
        """The bucket of an (H, W) image (of its work size)."""
        if self.options.letterbox:
            return Bucket.letterbox(self.options.letterbox)
        return Bucket.for_size(self.work_size(hw), self.options.bucket)

    def plan_for(self, bucket: Bucket) -> LabelPlan:
        amg = D.Plan.create(self.options.amg, self.image_size, bucket, mask_chunk=self.tuning.mask_chunk)
        return LabelPlan(amg, self.rules, self.options.gem, self.options.clip_size,
                         return_confidence=self.options.write_confidence, return_masks=self.options.write_segments)

    # ------------------------------------------------------------------ compiled program

    def _run(self, replicated: Any, inputs: LabelInputs, plan: LabelPlan) -> LabelOutputs:
        from zsp_jax.amg.decoder import point_decoder

        def group(sam_state: Any, clip_state: Any, text: Any, table: Any, x: LabelInputs) -> LabelOutputs:
            sam = nnx.merge(self._sam_graph, sam_state)
            clip = nnx.merge(self._clip_graph, clip_state)
            decode = point_decoder(sam, group=self.tuning.decoder_group)
            return label_group(sam, decode, clip, table, text, x, plan)

        return map_groups_per_device(group, self.mesh, self.tuning.images_per_device, 4)(*replicated, inputs)

    def _abstract_inputs(self, plan: LabelPlan) -> LabelInputs:
        b, s, c = self.batch_size, self.image_size, plan.clip_size
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self._batch_sharding)  # noqa: E731
        amg = D.AmgInputs(tuple(sd((b, l.n_crops, s, s, 3), jnp.uint8) for l in plan.amg.layers),
                          tuple(sd((b, l.n_crops, 4), jnp.int32) for l in plan.amg.layers),
                          tuple(sd((b, l.n_crops, 2), jnp.int32) for l in plan.amg.layers),
                          sd((b, 2), jnp.int32))
        return LabelInputs(amg, sd((b, c, c, 3), jnp.uint8))

    def matmul_precision(self) -> str:
        """The ``jax_default_matmul_precision`` the programs are compiled with ("auto": highest)."""
        p = self.options.matmul_precision
        return "highest" if p == "auto" else p

    def compiled(self, plan: LabelPlan) -> Any:
        """The compiled program of ``plan`` (ahead of time, on first use; timed, memory recorded)."""
        if plan not in self._compiled:
            t0 = time.perf_counter()
            with jax.default_matmul_precision(self.matmul_precision()):
                lowered = jax.jit(self._run, static_argnums=2).lower(self._replicated, self._abstract_inputs(plan),
                                                                     plan)
                self._compiled[plan] = lowered.compile()
            self.compile_seconds[plan] = time.perf_counter() - t0
            self.memory[plan] = bench.memory_summary(self._compiled[plan])
        return self._compiled[plan]

    # ------------------------------------------------------------------ host side

    def prepare(self, image: np.ndarray) -> Prepared:
        """uint8 (H, W, 3) RGB -> ``Prepared`` (host work only; safe to call from several threads)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"expected a non-empty uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        original = (int(image.shape[0]), int(image.shape[1]))
        work_hw = self.work_size(original)
        work = image if work_hw == original else np.asarray(
            Image.fromarray(image).resize((work_hw[1], work_hw[0]), Image.BILINEAR))
        bucket = self.bucket_for(original)
        amg = prepare_inputs([work], self.plan_for(bucket).amg, as_uint8=True)
        c = self.options.clip_size
        clip_image = np.asarray(Image.fromarray(work).resize((c, c), Image.BICUBIC))
        return Prepared(original, work_hw, bucket, amg, clip_image, work)

    def dispatch(self, prepared: Sequence[Prepared]) -> LabelOutputs:
        """Starts one batch (<= ``batch_size`` images of one bucket; padded by repeating the last)."""
        if not 0 < len(prepared) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} prepared images, got {len(prepared)}")
        bucket = prepared[0].bucket
        if any(p.bucket != bucket for p in prepared):
            raise ValueError("a batch must hold images of one bucket")
        plan = self.plan_for(bucket)
        rows = list(prepared) + [prepared[-1]] * (self.batch_size - len(prepared))
        amg = jax.tree.map(lambda *a: np.concatenate(a), *[p.amg for p in rows])
        inputs = LabelInputs(amg, np.stack([p.clip_image for p in rows]))
        inputs = jax.device_put(inputs, self._batch_sharding)
        return self.compiled(plan)(self._replicated, inputs)

    def results(self, outputs: LabelOutputs, prepared: Sequence[Prepared]) -> list[ImageResult]:
        """Waits for a dispatched batch and converts its first ``len(prepared)`` rows."""
        host = jax.tree.map(np.asarray, jax.device_get(outputs))
        check_outputs(host, len(prepared))
        return [self.result_of(host, row, p) for row, p in enumerate(prepared)]

    def result_of(self, host: LabelOutputs, row: int, p: Prepared) -> ImageResult:
        """Row ``row`` of a batch's numpy outputs -> ``ImageResult`` at the original size."""
        from zsp_jax.amg.rle import masks_to_coco_rle

        h, w = p.work_hw
        label = _resize_nearest(np.ascontiguousarray(host.label[row, :h, :w]), p.original_hw)
        confidence = None
        if host.confidence is not None:
            confidence = _resize_nearest(np.ascontiguousarray(host.confidence[row, :h, :w]), p.original_hw)
        k = self.options.amg.max_masks
        warnings = []
        if int(host.num_kept[row]) > k:
            warnings.append(f"more than max_masks={k} segments survived the NMS; the best {k} were kept")
        elif int(host.truncated_crops[row]) > 0:
            warnings.append(f"{int(host.truncated_crops[row])} crop(s) kept more than max_masks={k} masks")
        slots = np.flatnonzero(host.valid[row])
        sy, sx = p.original_hw[0] / h, p.original_hw[1] / w
        segments = []
        for j in slots:
            x0, y0, x1, y1 = (int(v) for v in host.boxes[row, j])
            bbox = [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
            if (sy, sx) != (1.0, 1.0):
                bbox = [round(x0 * sx), round(y0 * sy), round((x1 + 1) * sx) - round(x0 * sx),
                        round((y1 + 1) * sy) - round(y0 * sy)]
            segments.append({
                "class": int(host.seg_label[row, j]), "best_class": int(host.seg_best[row, j]),
                "similarity": float(host.seg_similarity[row, j]), "score": float(host.seg_score[row, j]),
                "predicted_iou": float(host.predicted_iou[row, j]),
                "stability_score": float(host.stability_score[row, j]), "bbox": bbox,
                "area": int(round(int(host.area[row, j]) * sy * sx)),
            })
        if host.packed_masks is not None and len(slots):
            bits = np.unpackbits(host.packed_masks[row, slots], axis=-1)[:, :h, :w].astype(bool)
            if (h, w) != p.original_hw:
                bits = np.stack([_resize_nearest(m.astype(np.uint8), p.original_hw) for m in bits]).astype(bool)
            for seg, rle, m in zip(segments, masks_to_coco_rle(bits), bits):
                seg["segmentation"] = rle
                seg["area"] = int(m.sum())
        return ImageResult(label, confidence, segments, len(slots), warnings)

    def label(self, images: Sequence[np.ndarray]) -> list[ImageResult]:
        """Labels uint8 RGB images of any sizes (bucketed and batched); results in input order."""
        prepared = [self.prepare(im) for im in images]
        out: list[ImageResult | None] = [None] * len(prepared)
        groups: dict[Bucket, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.bucket, []).append(i)
        for idxs in groups.values():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                batch = [prepared[i] for i in chunk]
                for i, r in zip(chunk, self.results(self.dispatch(batch), batch)):
                    out[i] = r
        return out  # type: ignore[return-value]

