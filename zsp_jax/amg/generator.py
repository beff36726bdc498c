"""Host-side automatic mask generator: images in, segment-anything's mask records out.

``AutomaticMaskGenerator`` is the drop-in counterpart of ``SamAutomaticMaskGenerator``:

* ``generate(image)`` returns the same list of records (segmentation, area, bbox XYWH,
  predicted_iou, point_coords, stability_score, crop_box) in the same order;
* ``generate_batch(images)`` / ``generate_iter(images)`` run many images per compiled call,
  data-parallel over every local device (a ``jax.sharding.Mesh`` with one "data" axis; the batch
  axis of every input is sharded, the weights replicated), each device working on
  ``images_per_device`` images at a time (``zsp_jax.amg.tuning``: limits per device kind; one
  compiled program per size bucket, ``zsp_jax.amg.programs``);
  the input is consumed as a stream (at most one batch per size bucket is held), and the host
  prepares and converts one batch while the device computes the next;
* ``generate_padded(images)`` stops before the host conversion and returns the device arrays
  (``AmgOutputs``) for callers that only need masks and scores.

Host work per image is the crop preprocessing (PIL resize, as the reference; uint8 crops are
sent and normalised on device), and at the end the RLE / COCO encodings and the optional
small-region clean-up, both vectorised or threaded. Images are grouped by size bucket; each
bucket and option set compiles once.

Across hosts, give each process its share of the work list with ``shard_work`` and run a
generator per process on its local devices: AMG needs no communication between images.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from zsp_jax.amg import tuning
from zsp_jax.amg.decoder import PromptDecoder, model_decoder, point_decoder
from zsp_jax.amg.generate import AmgOutputs, generate_padded
from zsp_jax.amg.geometry import Bucket
from zsp_jax.amg.inputs import abstract_inputs, prepare_inputs
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.plan import Plan
from zsp_jax.amg.programs import BucketPrograms, Program
from zsp_jax.utils.memory import MemoryBudget
from zsp_jax.amg.regions import postprocess_small_regions
from zsp_jax.amg.rle import masks_to_coco_rle, masks_to_rle
from zsp_jax.utils.sharding import data_mesh


def shard_work(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None
               ) -> list[Any]:
    """This process's share of a work list (round robin by ``jax.process_index()``)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])


def _check_image(image: np.ndarray) -> np.ndarray:
    """Rejects what the reference cannot take either, with a message that says what to do."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}; convert grey-scale "
                         "or RGBA images to RGB first (e.g. PIL's Image.convert('RGB'))")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


@dataclasses.dataclass
class Timings:
    """Seconds spent in the last ``generate_batch`` call, by stage."""

    preprocess: float = 0.0
    device: float = 0.0
    postprocess: float = 0.0
    compile: float = 0.0


class AutomaticMaskGenerator:
    """Automatic mask generation with a zsp_jax ``Sam``: segment-anything's generator, jit-compiled.

    Args:
      model: a ``zsp_jax.models.sam.Sam``.
      options: ``AmgOptions`` (segment-anything's arguments plus mode / max_masks / bucket); or
        pass the same keyword arguments as ``SamAutomaticMaskGenerator`` directly.
      mesh: the device mesh (default: all local devices on a "data" axis).
      batch_size: images per compiled call (default: ``images_per_device`` per device); a
        multiple of the mesh size times ``images_per_device``.
      decoder: "amg" (``zsp_jax.amg.decoder``: the mask decoder with the prompt-independent work
        shared and attention products re-associated, equal to rounding) or "model" (``Sam.decode``).
      images_per_device, decoder_group, mask_chunk: throughput settings (``zsp_jax.amg.tuning``):
        ints; None for the limit of the mesh's device kind; "auto" for the largest that fits the
        memory budget (``memory_gb`` / ``memory_fraction``, ``zsp_jax.amg.programs.MemoryBudget``),
        chosen per size bucket. Results are bitwise identical for any number of devices at the
        same settings.
    """

    def __init__(self, model: Any, options: AmgOptions | None = None, *, mesh: Mesh | None = None,
                 batch_size: int | None = None, decoder: str = "amg", images_per_device: int | str | None = None,
                 decoder_group: int | str | None = None, mask_chunk: int | str | None = None,
                 memory_gb: float = 0.0, memory_fraction: float = 0.8, **kwargs: Any):
        if options is None:
            options = AmgOptions.from_reference_kwargs(**kwargs)
        elif kwargs:
            options = options.replace(**kwargs)
        if decoder not in ("amg", "model"):
            raise ValueError(f"decoder must be 'amg' or 'model', got {decoder!r}")
        self.options = options
        self.image_size = model.config.image_size
        self.mesh = mesh if mesh is not None else data_mesh()
        limits = tuning.limits_for(tuning.platform_of(self.mesh.devices.flat))
        given = {"images_per_device": images_per_device, "decoder_group": decoder_group, "mask_chunk": mask_chunk}
        self.tuning = tuning.SizeRequest(**{name: getattr(limits, name) if value is None
                                            else tuning.parse_size(name, value) for name, value in given.items()})
        budget = None
        if not self.tuning.is_fixed:
            budget = MemoryBudget.of_device(self.mesh.devices.flat[0], memory_gb=memory_gb, fraction=memory_fraction,
                                            field="memory_gb")
        self.decoder = decoder
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        self.programs = BucketPrograms(self.mesh, (state,), self._build, self._abstract_batch, self.tuning, limits,
                                       budget=budget, batch_size=batch_size)
        self.timings = Timings()

    # ------------------------------------------------------------------ compiled program

    @property
    def batch_size(self) -> int:
        """Images per compiled call (the most, when ``images_per_device`` is "auto")."""
        return self.programs.max_batch_size

    def plan_for(self, image_hw: tuple[int, int], sizes: tuning.Sizes | None = None) -> Plan:
        """The static plan (bucket, shapes) for an image of size (H, W) (at ``sizes``; default: its program's)."""
        bucket = Bucket.for_size(image_hw, self.options.bucket)
        sizes = sizes or self.program(bucket).sizes
        return Plan.create(self.options, self.image_size, bucket, mask_chunk=sizes.mask_chunk)

    def decoder_for(self, model: Any, sizes: tuning.Sizes) -> PromptDecoder:
        """The prompt decoder this generator uses for ``model`` (``decoder`` and ``sizes.decoder_group``)."""
        if self.decoder == "amg":
            return point_decoder(model, group=sizes.decoder_group)
        return model_decoder(model)

    def _build(self, key: tuple[Bucket, bool, bool], sizes: tuning.Sizes) -> Any:
        """Each device maps over its own images ``images_per_device`` at a time (``BucketPrograms``).

        Every group of images then runs the same program whatever the number of devices, so
        results are bitwise identical on 1 and on 8 devices for the same ``images_per_device``
        (a different group size changes XLA's blocking of the products and with it the last bits).
        """
        bucket, return_masks, return_low_res = key
        plan = Plan.create(self.options, self.image_size, bucket, mask_chunk=sizes.mask_chunk)

        def group(state: Any, x: Any) -> AmgOutputs:
            model = nnx.merge(self._graphdef, state)
            return generate_padded(model.embed, self.decoder_for(model, sizes), x, plan, return_masks=return_masks,
                                   return_low_res=return_low_res)

        return group

    def _abstract_batch(self, key: tuple[Bucket, bool, bool], sizes: tuning.Sizes, batch: int) -> Any:
        return abstract_inputs(Plan.create(self.options, self.image_size, key[0], mask_chunk=sizes.mask_chunk), batch)

    def program(self, bucket: Bucket, *, return_masks: bool = True, return_low_res: bool = False) -> Program:
        """The compiled program of ``bucket`` (compiled on first use; the time goes to ``timings.compile``)."""
        before = self.programs.compile_seconds
        program = self.programs.program((bucket, return_masks, return_low_res))
        self.timings.compile += self.programs.compile_seconds - before
        return program

    def warmup(self, image_hw: tuple[int, int], **kwargs: Any) -> float:
        """Compiles the program for images of size ``image_hw``; returns the seconds it took."""
        before = self.timings.compile
        self.program(Bucket.for_size(image_hw, self.options.bucket), **kwargs)
        return self.timings.compile - before

    # ------------------------------------------------------------------ device API

    def dispatch(self, images: Sequence[np.ndarray], *, return_masks: bool = True, return_low_res: bool = False
                 ) -> tuple[AmgOutputs, Plan]:
        """Prepares up to ``batch_size`` images of ONE bucket and starts the device work; does not wait.

        Returns (``AmgOutputs`` being computed (jax arrays; reading them waits), the plan). See
        ``generate_padded``; ``check_outputs`` verifies the result once it is ready.
        """
        images = [_check_image(im) for im in images]
        if not images:
            raise ValueError("expected at least one image")
        bucket = Bucket.for_size(images[0].shape[:2], self.options.bucket)
        for im in images:
            if not bucket.contains(im.shape[:2]):
                raise ValueError(f"image of size {im.shape[:2]} is not in the bucket {bucket}")
        if len(images) > self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} images, got {len(images)}")
        program = self.program(bucket, return_masks=return_masks, return_low_res=return_low_res)
        if len(images) > program.batch_size:
            raise ValueError(f"expected 1..{program.batch_size} images, got {len(images)}")
        plan = Plan.create(self.options, self.image_size, bucket, mask_chunk=program.sizes.mask_chunk)
        t0 = time.perf_counter()
        inputs = prepare_inputs(images, plan, as_uint8=True)
        self.timings.preprocess += time.perf_counter() - t0
        return self.programs.run(program, inputs), plan

    def generate_padded(self, images: Sequence[np.ndarray], *, return_masks: bool = True,
                        return_low_res: bool = False) -> tuple[AmgOutputs, Plan]:
        """Runs up to ``batch_size`` images of ONE bucket and returns the padded device outputs.

        Args:
          images: uint8 (H, W, 3) RGB images of the same bucket (``plan_for`` equal).
          return_masks / return_low_res: see ``zsp_jax.amg.generate.generate_padded``.

        Returns:
          (``AmgOutputs`` with a leading axis of the program's batch size (the first ``len(images)``
          rows are the images), the plan).
        """
        out, plan = self.dispatch(images, return_masks=return_masks, return_low_res=return_low_res)
        t0 = time.perf_counter()
        out = jax.block_until_ready(out)
        self.timings.device += time.perf_counter() - t0
        check_outputs(out, len(images))
        return out, plan

    # ------------------------------------------------------------------ records

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of one uint8 (H, W, 3) RGB image, as ``SamAutomaticMaskGenerator.generate``."""
        return self.generate_batch([image])[0]

    def generate_batch(self, images: Iterable[np.ndarray], *, progress: bool = False
                       ) -> list[list[dict[str, Any]]]:
        """Masks of many images: bucketed, batched and sharded over the mesh; records per image, in order.

        Args:
          images: uint8 (H, W, 3) RGB images of any sizes (grouped by bucket; each bucket compiles once).
          progress: show a tqdm progress bar (images done, on stderr).

        Returns:
          One list of records per image, as ``generate``.
        """
        results: dict[int, list[dict[str, Any]]] = {}
        for i, records in self.generate_iter(images, progress=progress):
            results[i] = records
        return [results[i] for i in range(len(results))]

    def generate_iter(self, images: Iterable[np.ndarray], *, progress: bool = False
                      ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """Streams ``(index, records)`` pairs as batches finish (not in input order).

        At most one partly filled batch per size bucket waits for more images, and one batch is
        on the device while the host converts the previous one and prepares the next, so memory
        stays bounded for an input stream of any length.
        """
        self.timings = Timings(compile=0.0)
        pending: dict[Bucket, list[tuple[int, np.ndarray]]] = {}
        in_flight: list[tuple[AmgOutputs, Plan, list[tuple[int, np.ndarray]]]] = []
        bar = None
        if progress:
            import tqdm

            bar = tqdm.tqdm(total=len(images) if hasattr(images, "__len__") else None, desc="automatic masks",
                            unit="img")

        def finish() -> Iterator[tuple[int, list[dict[str, Any]]]]:
            out, plan, chunk = in_flight.pop(0)
            t0 = time.perf_counter()
            out = jax.block_until_ready(out)
            t1 = time.perf_counter()
            check_outputs(out, len(chunk))
            host = jax.tree.map(np.asarray, out)
            done = [(i, records_from_outputs(host, row, im.shape[:2], plan)) for row, (i, im) in enumerate(chunk)]
            self.timings.device += t1 - t0
            self.timings.postprocess += time.perf_counter() - t1
            if bar is not None:
                bar.update(len(chunk))
            yield from done

        def launch(chunk: list[tuple[int, np.ndarray]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
            out, plan = self.dispatch([im for _, im in chunk])
            in_flight.append((out, plan, chunk))
            if len(in_flight) > 1:
                yield from finish()

        try:
            for i, im in enumerate(images):
                im = _check_image(im)
                bucket = Bucket.for_size(im.shape[:2], self.options.bucket)
                group = pending.setdefault(bucket, [])
                group.append((i, im))
                if len(group) == self.program(bucket).batch_size:
                    yield from launch(pending.pop(bucket))
            for chunk in list(pending.values()):
                yield from launch(chunk)
            while in_flight:
                yield from finish()
        finally:
            if bar is not None:
                bar.close()


def check_outputs(out: AmgOutputs, n_images: int) -> None:
    """Raises if an image of a finished batch did not fit its bucket's static resize bands (a bug)."""
    ok = np.asarray(out.resize_ok)[:n_images]
    if not ok.all():
        raise RuntimeError("an image did not fit its bucket's static resize bands (a bug: please report)")


def _warn_truncation(out: AmgOutputs, row: int, k: int) -> None:
    if int(out.num_kept[row]) > k:
        warnings.warn(f"more than max_masks={k} masks survived the NMS ({int(out.num_survived[row])}); only the "
                      f"best {k} are returned (raise AmgOptions.max_masks)", stacklevel=3)
    elif int(out.truncated_crops[row]) > 0:
        warnings.warn(f"{int(out.truncated_crops[row])} crop(s) kept more than max_masks={k} masks before the "
                      "cross-crop NMS; the rest were dropped (raise AmgOptions.max_masks)", stacklevel=3)


def records_from_outputs(out: AmgOutputs, row: int, image_hw: tuple[int, int], plan: Plan
                         ) -> list[dict[str, Any]]:
    """One image's padded outputs (numpy) -> segment-anything's records, in the reference's order.

    Applies the optional small-region clean-up and encodes masks per ``options.output_mode``.
    """
    o = plan.options
    if out.masks is None:
        raise ValueError("records need the full-resolution masks (return_masks=True)")
    _warn_truncation(out, row, o.max_masks)
    h, w = int(image_hw[0]), int(image_hw[1])
    n = int(np.sum(out.valid[row]))
    masks = out.masks[row, :n, :h, :w]
    boxes = out.boxes[row, :n].astype(np.int64)
    order = np.arange(n)
    if o.min_mask_region_area > 0 and n > 0:
        order, masks, boxes = postprocess_small_regions(masks, boxes, o.min_mask_region_area,
                                                        o.postprocess_nms_thresh)
    areas = masks.sum(axis=(1, 2), dtype=np.int64)
    if o.output_mode == "binary_mask":
        # A copy: views would keep the whole padded (B, K, Hb, Wb) batch alive as long as any record.
        segs: list[Any] = list(np.ascontiguousarray(masks))
    elif o.output_mode == "uncompressed_rle":
        segs = masks_to_rle(masks)
    else:
        segs = masks_to_coco_rle(masks)
    grids = o.layer_grids()
    records = []
    for j, src in enumerate(order):
        layer = int(out.layer[row, src])
        x0, y0, x1, y1 = (int(v) for v in out.crop_box[row, src])
        point = grids[layer][int(out.point_index[row, src])] * np.array([x1 - x0, y1 - y0]) + np.array([x0, y0])
        bx = [int(v) for v in boxes[j]]
        records.append({
            "segmentation": segs[j],
            "area": int(areas[j]),
            "bbox": [bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]],
            "predicted_iou": float(out.predicted_iou[row, src]),
            "point_coords": [point.tolist()],
            "stability_score": float(out.stability_score[row, src]),
            "crop_box": [x0, y0, x1 - x0, y1 - y0],
        })
    return records
