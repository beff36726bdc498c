"""Host-side automatic mask generator: images in, segment-anything's mask records out.

``AutomaticMaskGenerator`` is the drop-in counterpart of ``SamAutomaticMaskGenerator``:

* ``generate(image)`` returns the same list of records (segmentation, area, bbox XYWH,
  predicted_iou, point_coords, stability_score, crop_box) in the same order;
* ``generate_batch(images)`` / ``generate_iter(images)`` run many images per compiled call,
  data-parallel over every local device (a ``jax.sharding.Mesh`` with one "data" axis; the batch
  axis of every input is sharded, the weights replicated), each device working on
  ``images_per_device`` images at a time (``zsp_jax.amg.tuning``: defaults per device kind);
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
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsp_jax.amg import device as D
from zsp_jax.amg import tuning
from zsp_jax.amg.geometry import Bucket, crop_boxes, crop_plan
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.regions import postprocess_small_regions
from zsp_jax.amg.rle import masks_to_coco_rle, masks_to_rle
from zsp_jax.utils.sharding import data_mesh, map_groups_per_device


def shard_work(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None
               ) -> list[Any]:
    """This process's share of a work list (round robin by ``jax.process_index()``)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])


def prepare_inputs(images: Sequence[np.ndarray], plan: D.Plan, *, as_uint8: bool = False) -> D.AmgInputs:
    """Host preprocessing of B images for ``generate_padded``: crops, PIL resize, normalise, pad.

    Args:
      images: B uint8 (H, W, 3) RGB images, all inside ``plan.bucket``.
      as_uint8: leave the resized crops as uint8 on a zero canvas; the device normalises them
        (``device.encoder_input``, bit-identical), which transfers a quarter of the bytes.

    Returns:
      ``AmgInputs`` of numpy arrays.
    """
    from zsp_jax.models.sam.transforms import normalize_and_pad, resize_image

    o = plan.options
    s = plan.image_size
    layers_imgs, layers_boxes, layers_hw = [], [], []
    for im in images:
        boxes = np.asarray(crop_boxes(im.shape[:2], o.crop_n_layers, o.crop_overlap_ratio)[0])
        if np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1]):
            # The reference fails here too (an empty crop cannot be resized).
            raise ValueError(f"image of size {im.shape[:2]} is too small for crop_n_layers={o.crop_n_layers}: "
                             "a crop would be empty")
    per_image = [crop_plan(im.shape[:2], o.crop_n_layers, o.crop_overlap_ratio, s) for im in images]
    for li in range(o.crop_n_layers + 1):
        imgs = np.zeros((len(images), plan.layers[li].n_crops, s, s, 3), np.uint8 if as_uint8 else np.float32)
        for bi, (im, layers) in enumerate(zip(images, per_image)):
            boxes, sizes = layers[li]
            for ci, (x0, y0, x1, y1) in enumerate(boxes):
                resized = resize_image(np.ascontiguousarray(im[y0:y1, x0:x1]), s)
                if resized.shape[:2] != tuple(sizes[ci]):
                    raise AssertionError("resized crop size differs from ResizeLongestSide's")
                if as_uint8:
                    imgs[bi, ci, : resized.shape[0], : resized.shape[1]] = resized
                else:
                    imgs[bi, ci] = normalize_and_pad(resized, s)
        layers_imgs.append(imgs)
        layers_boxes.append(np.stack([layers[li][0] for layers in per_image]).astype(np.int32))
        layers_hw.append(np.stack([layers[li][1] for layers in per_image]).astype(np.int32))
    image_hw = np.asarray([im.shape[:2] for im in images], np.int32)
    return D.AmgInputs(tuple(layers_imgs), tuple(layers_boxes), tuple(layers_hw), image_hw)


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
      images_per_device, decoder_group, mask_chunk: throughput settings (``zsp_jax.amg.tuning``;
        None: the defaults of the mesh's device kind). Results are bitwise identical for any
        number of devices at the same settings.
    """

    def __init__(self, model: Any, options: AmgOptions | None = None, *, mesh: Mesh | None = None,
                 batch_size: int | None = None, decoder: str = "amg", images_per_device: int | None = None,
                 decoder_group: int | None = None, mask_chunk: int | None = None, **kwargs: Any):
        if options is None:
            options = AmgOptions.from_reference_kwargs(**kwargs)
        elif kwargs:
            options = options.replace(**kwargs)
        if decoder not in ("amg", "model"):
            raise ValueError(f"decoder must be 'amg' or 'model', got {decoder!r}")
        self.options = options
        self.image_size = model.config.image_size
        self.mesh = mesh if mesh is not None else data_mesh()
        n_dev = self.mesh.devices.size
        self.tuning = tuning.defaults(tuning.platform_of(self.mesh.devices.flat), images_per_device=images_per_device,
                                      decoder_group=decoder_group, mask_chunk=mask_chunk)
        per_call = n_dev * self.tuning.images_per_device
        self.batch_size = batch_size or per_call
        if self.batch_size % per_call:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the {n_dev} mesh devices x "
                             f"{self.tuning.images_per_device} images per device")
        self.decoder = decoder
        self._graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._compiled: dict[Any, Any] = {}
        self.timings = Timings()

    # ------------------------------------------------------------------ compiled program

    def plan_for(self, image_hw: tuple[int, int]) -> D.Plan:
        """The static plan (bucket, shapes) for an image of size (H, W)."""
        return D.Plan.create(self.options, self.image_size, Bucket.for_size(image_hw, self.options.bucket),
                             mask_chunk=self.tuning.mask_chunk)

    def _run(self, state: Any, inputs: D.AmgInputs, plan: D.Plan, return_masks: bool, return_low_res: bool
             ) -> D.AmgOutputs:
        """Each device maps over its own images ``images_per_device`` at a time (``shard_map`` + ``lax.map``).

        Every group of images then runs the same program whatever the number of devices, so
        results are bitwise identical on 1 and on 8 devices for the same ``images_per_device``
        (a different group size changes XLA's blocking of the products and with it the last bits).
        """
        def group(state: Any, x: D.AmgInputs) -> D.AmgOutputs:
            model = nnx.merge(self._graphdef, state)
            return D.generate_padded(model.embed, self.decoder_for(model), x, plan, return_masks=return_masks,
                                     return_low_res=return_low_res)

        return map_groups_per_device(group, self.mesh, self.tuning.images_per_device, 1)(state, inputs)

    def decoder_for(self, model: Any) -> D.DecodeFn:
        """The prompt decoder this generator uses for ``model`` (``decoder`` and ``decoder_group``)."""
        if self.decoder == "amg":
            from zsp_jax.amg.decoder import point_decoder

            return point_decoder(model, group=self.tuning.decoder_group)
        return D.model_decoder(model)

    def _abstract_inputs(self, plan: D.Plan) -> D.AmgInputs:
        b, s = self.batch_size, self.image_size
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self._batch_sharding)  # noqa: E731
        return D.AmgInputs(
            tuple(sd((b, l.n_crops, s, s, 3), jnp.uint8) for l in plan.layers),
            tuple(sd((b, l.n_crops, 4), jnp.int32) for l in plan.layers),
            tuple(sd((b, l.n_crops, 2), jnp.int32) for l in plan.layers),
            sd((b, 2), jnp.int32))

    def compiled(self, plan: D.Plan, *, return_masks: bool = True, return_low_res: bool = False) -> Any:
        """The compiled program for ``plan`` (compiled on first use; the time goes to ``timings.compile``)."""
        key = (plan, return_masks, return_low_res)
        if key not in self._compiled:
            t0 = time.perf_counter()
            fn = jax.jit(self._run, static_argnums=(2, 3, 4))
            self._compiled[key] = fn.lower(self._state, self._abstract_inputs(plan), plan, return_masks,
                                           return_low_res).compile()
            self.timings.compile += time.perf_counter() - t0
        return self._compiled[key]

    def warmup(self, image_hw: tuple[int, int], **kwargs: Any) -> float:
        """Compiles the program for images of size ``image_hw``; returns the seconds it took."""
        before = self.timings.compile
        self.compiled(self.plan_for(image_hw), **kwargs)
        return self.timings.compile - before

    # ------------------------------------------------------------------ device API

    def dispatch(self, images: Sequence[np.ndarray], *, return_masks: bool = True, return_low_res: bool = False
                 ) -> tuple[D.AmgOutputs, D.Plan]:
        """Prepares up to ``batch_size`` images of ONE bucket and starts the device work; does not wait.

        Returns (``AmgOutputs`` being computed (jax arrays; reading them waits), the plan). See
        ``generate_padded``; ``check_outputs`` verifies the result once it is ready.
        """
        images = [_check_image(im) for im in images]
        if not 0 < len(images) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} images, got {len(images)}")
        plan = self.plan_for(images[0].shape[:2])
        for im in images:
            if not plan.bucket.contains(im.shape[:2]):
                raise ValueError(f"image of size {im.shape[:2]} is not in the bucket {plan.bucket}")
        padded = list(images) + [images[-1]] * (self.batch_size - len(images))
        t0 = time.perf_counter()
        inputs = prepare_inputs(padded, plan, as_uint8=True)
        inputs = jax.device_put(inputs, self._batch_sharding)
        t1 = time.perf_counter()
        fn = self.compiled(plan, return_masks=return_masks, return_low_res=return_low_res)
        self.timings.preprocess += t1 - t0
        return fn(self._state, inputs), plan

    def generate_padded(self, images: Sequence[np.ndarray], *, return_masks: bool = True,
                        return_low_res: bool = False) -> tuple[D.AmgOutputs, D.Plan]:
        """Runs up to ``batch_size`` images of ONE bucket and returns the padded device outputs.

        Args:
          images: uint8 (H, W, 3) RGB images of the same bucket (``plan_for`` equal).
          return_masks / return_low_res: see ``device.generate_padded``.

        Returns:
          (``AmgOutputs`` with a leading axis of ``batch_size`` (the first ``len(images)`` rows
          are the images), the plan).
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
        in_flight: list[tuple[D.AmgOutputs, D.Plan, list[tuple[int, np.ndarray]]]] = []
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
                group = pending.setdefault(Bucket.for_size(im.shape[:2], self.options.bucket), [])
                group.append((i, im))
                if len(group) == self.batch_size:
                    yield from launch(pending.pop(Bucket.for_size(im.shape[:2], self.options.bucket)))
            for chunk in list(pending.values()):
                yield from launch(chunk)
            while in_flight:
                yield from finish()
        finally:
            if bar is not None:
                bar.close()


def check_outputs(out: D.AmgOutputs, n_images: int) -> None:
    """Raises if an image of a finished batch did not fit its bucket's static resize bands (a bug)."""
    ok = np.asarray(out.resize_ok)[:n_images]
    if not ok.all():
        raise RuntimeError("an image did not fit its bucket's static resize bands (a bug: please report)")


def _warn_truncation(out: D.AmgOutputs, row: int, k: int) -> None:
    if int(out.num_kept[row]) > k:
        warnings.warn(f"more than max_masks={k} masks survived the NMS; only the best {k} are returned "
                      "(raise AmgOptions.max_masks)", stacklevel=3)
    elif int(out.truncated_crops[row]) > 0:
        warnings.warn(f"{int(out.truncated_crops[row])} crop(s) kept more than max_masks={k} masks before the "
                      "cross-crop NMS; the rest were dropped (raise AmgOptions.max_masks)", stacklevel=3)


def records_from_outputs(out: D.AmgOutputs, row: int, image_hw: tuple[int, int], plan: D.Plan
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
