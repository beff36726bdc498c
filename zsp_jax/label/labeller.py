"""The zero-shot labeller as a library: SAM + GEM-CLIP models, class prompts, compiled programs.

``Labeller(sam, clip, tokenizer, options)`` embeds the class prompts once, then labels images:

* ``buckets_for(sizes)``: the size bucket of every image of a folder (``folder_buckets``: the
  padded sizes, merged so that each compiled program serves at least ``bucket_min_images``
  images); images keep their own size, a bucket only pads them;
* ``prepare(image, bucket)`` (host, thread-safe): the size the image is labelled at
  (``max_side`` / ``letterbox``), the uint8 SAM crops and the uint8 GEM input (PIL resizes, as
  the references);
* ``program(bucket)``: the bucket's compiled program, with its sizes chosen to fit the device's
  memory (``zsp_jax.amg.programs``); ``prefetch(bucket)`` compiles it in the background;
* ``dispatch(prepared)``: up to the program's batch size of prepared images of one bucket,
  padded to a full batch, sharded over the mesh and started on the devices (returns at once);
* ``results(outputs, prepared)``: waits, and turns one batch's device outputs into
  ``ImageResult``s at each image's original size;
* ``label(images)``: all of that for a list of images (tests, notebooks).

Each program works on ``images_per_device`` images per device at a time, so results do not
depend on the number of devices (``zsp_jax.utils.sharding``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from zsp_jax.amg import tuning
from zsp_jax.amg.generator import check_outputs
from zsp_jax.amg.geometry import Bucket, folder_buckets
from zsp_jax.amg.inputs import AmgInputs, abstract_inputs, prepare_inputs
from zsp_jax.amg.plan import Plan
from zsp_jax.amg.programs import BucketPrograms, Program
from zsp_jax.utils.memory import MemoryBudget
from zsp_jax.label.options import LabelOptions
from zsp_jax.label.program import LabelInputs, LabelOutputs, LabelPlan, label_group
from zsp_jax.models.sam.transforms import resize_longest_side_shape
from zsp_jax.utils.resize import resize_nearest
from zsp_jax.utils.sharding import data_mesh


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
    amg: AmgInputs
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
      masks_survived: masks that survived the generator's filters and NMS before the
        ``max_masks`` cap (``AmgOutputs.num_survived``); more than ``num_segments`` when capped.
    """

    label: np.ndarray
    confidence: np.ndarray | None
    segments: list[dict[str, Any]]
    num_segments: int
    warnings: list[str]
    masks_survived: int = 0


class Labeller:
    """Zero-shot pseudo labels from a SAM and a CLIP model (see the module docstring).

    Args:
      sam: ``zsp_jax.models.sam.Sam`` (converted weights).
      clip: ``zsp_jax.models.clip.ClipModel``.
      tokenizer: its ``ClipTokenizer``.
      options: ``LabelOptions``.
      mesh: device mesh (default: every local device on a "data" axis).
      images_per_device, decoder_group, mask_chunk: throughput settings (``zsp_jax.amg.tuning``):
        ints, or "auto" / None / 0 for the largest that fits ``options``' memory budget, per bucket.
      text_cache_dir: where class embeddings are cached (``ClassEmbedder``).
      size_limits: what "auto" may go up to (default: the device kind's, ``tuning.LIMITS``).
    """

    def __init__(self, sam: Any, clip: Any, tokenizer: Any, options: LabelOptions, *, mesh: Any = None,
                 images_per_device: int | str | None = None, decoder_group: int | str | None = None,
                 mask_chunk: int | str | None = None, text_cache_dir: str | None = None,
                 size_limits: tuning.Sizes | None = None):
        from zsp_jax.models.clip import ClassEmbedder
        from zsp_jax.models.clip.preprocess import normalize as clip_normalize
        from zsp_jax.utils.lut import uint8_table

        if options.amg.min_mask_region_area:
            raise ValueError("min_mask_region_area > 0 is not supported by the labeller (a host clean-up per mask)")
        self.options = options
        self.rules = options.rules()
        self.mesh = mesh if mesh is not None else data_mesh()
        platform = tuning.platform_of(self.mesh.devices.flat)
        # The requested sizes ("auto" or ints); the chosen ones are per bucket (``program(bucket).sizes``).
        self.tuning = tuning.SizeRequest.of("label.", images_per_device=images_per_device,
                                            decoder_group=decoder_group, mask_chunk=mask_chunk)
        limits = size_limits or tuning.limits_for(platform)
        # Groups wider than a point batch decode the same prompts as the whole batch.
        limits = dataclasses.replace(limits, decoder_group=min(limits.decoder_group, options.amg.points_per_batch))
        budget = None
        if not self.tuning.is_fixed:
            budget = MemoryBudget.of_device(self.mesh.devices.flat[0], memory_gb=options.device_memory_gb,
                                            fraction=options.memory_fraction)
        self.bucket_min_images = (tuning.BUCKET_MIN_IMAGES.get(platform, 64) if options.bucket_min_images == tuning.AUTO
                                  else int(options.bucket_min_images))
        self.image_size = sam.config.image_size
        texts, _ = options.classes.prompt_rows()
        embedder = ClassEmbedder(clip, tokenizer, cache_dir=text_cache_dir)
        text = np.asarray(embedder(texts, options.templates), np.float32)  # (P, D) unit rows
        self.text_checkpoint = embedder.checkpoint_id
        clip_table = uint8_table(lambda v: clip_normalize(v.astype(np.float32) / np.float32(255.0)))
        self._sam_graph, sam_state = nnx.split(sam)
        self._clip_graph, clip_state = nnx.split(clip)
        self.programs = BucketPrograms(self.mesh, (sam_state, clip_state, text, clip_table), self._build,
                                       self._abstract_batch, self.tuning, limits, budget=budget,
                                       matmul_precision=self.matmul_precision())

    # ------------------------------------------------------------------ sizes and plans

    @property
    def batch_size(self) -> int:
        """The most images one call can take (devices x the largest images_per_device "auto" may choose);
        each bucket's own is ``program(bucket).batch_size``."""
        return self.programs.max_batch_size

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
        """The bucket of an (H, W) image on its own (its work size padded to a multiple of ``bucket``)."""
        if self.options.letterbox:
            return Bucket.letterbox(self.options.letterbox)
        return Bucket.for_size(self.work_size(hw), self.options.bucket)

    def buckets_for(self, sizes: Sequence[tuple[int, int]]) -> list[Bucket]:
        """The bucket of each (H, W) of a set of images labelled together (a folder): ``folder_buckets`` of
        their work sizes, so that each compiled program serves at least ``bucket_min_images`` of them."""
        if self.options.letterbox:
            return [Bucket.letterbox(self.options.letterbox)] * len(sizes)
        work = [self.work_size(hw) for hw in sizes]
        table = folder_buckets(work, self.options.bucket, self.bucket_min_images, self.image_size)
        return [table[hw] for hw in work]

    def plan_for(self, bucket: Bucket, sizes: tuning.Sizes) -> LabelPlan:
        """The static plan of ``bucket``'s program at ``sizes``."""
        amg = Plan.create(self.options.amg, self.image_size, bucket, mask_chunk=sizes.mask_chunk)
        return LabelPlan(amg, self.rules, self.options.gem, self.options.clip_size,
                         return_confidence=self.options.write_confidence, return_masks=self.options.write_segments)

    def matmul_precision(self) -> str:
        """The ``jax_default_matmul_precision`` the programs are compiled with ("auto": highest)."""
        p = self.options.matmul_precision
        return "highest" if p == "auto" else p

    # ------------------------------------------------------------------ compiled programs

    def _build(self, bucket: Bucket, sizes: tuning.Sizes) -> Any:
        from zsp_jax.amg.decoder import point_decoder

        plan = self.plan_for(bucket, sizes)

        def group(sam_state: Any, clip_state: Any, text: Any, table: Any, x: LabelInputs) -> LabelOutputs:
            sam = nnx.merge(self._sam_graph, sam_state)
            clip = nnx.merge(self._clip_graph, clip_state)
            return label_group(sam, point_decoder(sam, group=sizes.decoder_group), clip, table, text, x, plan)

        return group

    def _abstract_batch(self, bucket: Bucket, sizes: tuning.Sizes, batch: int) -> LabelInputs:
        c = self.options.clip_size
        return LabelInputs(abstract_inputs(self.plan_for(bucket, sizes).amg, batch),
                           jax.ShapeDtypeStruct((batch, c, c, 3), jnp.uint8))

    def program(self, bucket: Bucket) -> Program:
        """The compiled program of ``bucket`` (sizes chosen and compiled on first use; see ``Program``)."""
        return self.programs.program(bucket)

    def prefetch(self, bucket: Bucket) -> None:
        """Starts compiling ``bucket``'s program in the background (while the devices label another bucket)."""
        self.programs.prefetch(bucket)

    # ------------------------------------------------------------------ host side

    def prepare(self, image: np.ndarray, bucket: Bucket | None = None) -> Prepared:
        """uint8 (H, W, 3) RGB -> ``Prepared`` (host work only; safe to call from several threads).

        ``bucket``: the one ``buckets_for`` gave the image (default: ``bucket_for`` its size); an
        image that does not fit it (its decoded size differs from what the header said) gets its own.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"expected a non-empty uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        original = (int(image.shape[0]), int(image.shape[1]))
        work_hw = self.work_size(original)
        work = image if work_hw == original else np.asarray(
            Image.fromarray(image).resize((work_hw[1], work_hw[0]), Image.BILINEAR))
        if bucket is None or not bucket.contains(work_hw):
            bucket = self.bucket_for(original)
        amg = prepare_inputs([work], Plan.create(self.options.amg, self.image_size, bucket), as_uint8=True)
        c = self.options.clip_size
        clip_image = np.asarray(Image.fromarray(work).resize((c, c), Image.BICUBIC))
        return Prepared(original, work_hw, bucket, amg, clip_image, work)

    def dispatch(self, prepared: Sequence[Prepared]) -> LabelOutputs:
        """Starts one batch (images of one bucket, at most its program's ``batch_size``; padded by repeating
        the last)."""
        if not prepared:
            raise ValueError("expected at least one prepared image")
        bucket = prepared[0].bucket
        if any(p.bucket != bucket for p in prepared):
            raise ValueError("a batch must hold images of one bucket")
        program = self.program(bucket)
        if len(prepared) > program.batch_size:
            raise ValueError(f"expected 1..{program.batch_size} prepared images, got {len(prepared)}")
        amg = jax.tree.map(lambda *a: np.concatenate(a), *[p.amg for p in prepared])
        return self.programs.run(program, LabelInputs(amg, np.stack([p.clip_image for p in prepared])))

    def results(self, outputs: LabelOutputs, prepared: Sequence[Prepared]) -> list[ImageResult]:
        """Waits for a dispatched batch and converts its first ``len(prepared)`` rows."""
        host = jax.tree.map(np.asarray, jax.device_get(outputs))
        check_outputs(host, len(prepared))
        return [self.result_of(host, row, p) for row, p in enumerate(prepared)]

    def result_of(self, host: LabelOutputs, row: int, p: Prepared) -> ImageResult:
        """Row ``row`` of a batch's numpy outputs -> ``ImageResult`` at the original size."""
        from zsp_jax.amg.rle import masks_to_coco_rle

        h, w = p.work_hw
        label = resize_nearest(np.ascontiguousarray(host.label[row, :h, :w]), p.original_hw)
        confidence = None
        if host.confidence is not None:
            confidence = resize_nearest(np.ascontiguousarray(host.confidence[row, :h, :w]), p.original_hw)
        k = self.options.amg.max_masks
        survived = int(host.num_survived[row])
        warnings = []
        if survived > k:
            warnings.append(f"more than max_masks={k} segments survived the NMS ({survived}); the best {k} were kept")
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
                bits = np.stack([resize_nearest(m.astype(np.uint8), p.original_hw) for m in bits]).astype(bool)
            for seg, rle, m in zip(segments, masks_to_coco_rle(bits), bits):
                seg["segmentation"] = rle
                seg["area"] = int(m.sum())
        return ImageResult(label, confidence, segments, len(slots), warnings, survived)

    def label(self, images: Sequence[np.ndarray]) -> list[ImageResult]:
        """Labels uint8 RGB images of any sizes (bucketed together, batched); results in input order."""
        buckets = self.buckets_for([np.asarray(im).shape[:2] for im in images])
        prepared = [self.prepare(im, bucket) for im, bucket in zip(images, buckets)]
        out: list[ImageResult | None] = [None] * len(prepared)
        groups: dict[Bucket, list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(p.bucket, []).append(i)
        for bucket, idxs in groups.items():
            size = self.program(bucket).batch_size
            for start in range(0, len(idxs), size):
                chunk = idxs[start:start + size]
                batch = [prepared[i] for i in chunk]
                for i, r in zip(chunk, self.results(self.dispatch(batch), batch)):
                    out[i] = r
        return out  # type: ignore[return-value]
