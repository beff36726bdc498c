"""Host-side automatic mask generator: images in, segment-anything's mask records out.

``AutomaticMaskGenerator`` is the drop-in counterpart of ``SamAutomaticMaskGenerator``:

* ``generate(image)`` returns the same list of records (segmentation, area, bbox XYWH,
  predicted_iou, point_coords, stability_score, crop_box) in the same order;
* ``generate_batch(images)`` runs many images per compiled call, data-parallel over every
  local device (a ``jax.sharding.Mesh`` with one "data" axis; the batch axis of every input is
  sharded, the weights replicated);
* ``generate_padded(images)`` stops before the host conversion and returns the device arrays
  (``AmgOutputs``) for callers that only need masks and scores, e.g. a labeller.

Host work per image is the crop preprocessing (PIL resize, as the reference), and at the end
the RLE / COCO encodings and the optional small-region clean-up, both vectorised or threaded.
Images are grouped by size bucket; each bucket and option set compiles once.

Across hosts, give each process its share of the work list with ``shard_work`` and run a
generator per process on its local devices: AMG needs no communication between images.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsp_jax.amg import device as D
from zsp_jax.amg.geometry import Bucket, crop_boxes, crop_plan
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.regions import postprocess_small_regions
from zsp_jax.amg.rle import masks_to_coco_rle, masks_to_rle


def shard_work(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None
               ) -> list[Any]:
    """This process's share of a work list (round robin by ``jax.process_index()``)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D data-parallel mesh (axis "data") over ``devices`` (default: all local devices)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices).reshape(len(devices)), ("data",))


def prepare_inputs(images: Sequence[np.ndarray], plan: D.Plan) -> D.AmgInputs:
    """Host preprocessing of B images for ``generate_padded``: crops, PIL resize, normalise, pad.

    Args:
      images: B uint8 (H, W, 3) RGB images, all inside ``plan.bucket``.

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
        imgs = np.zeros((len(images), plan.layers[li].n_crops, s, s, 3), np.float32)
        for bi, (im, layers) in enumerate(zip(images, per_image)):
            boxes, sizes = layers[li]
            for ci, (x0, y0, x1, y1) in enumerate(boxes):
                resized = resize_image(np.ascontiguousarray(im[y0:y1, x0:x1]), s)
                if resized.shape[:2] != tuple(sizes[ci]):
                    raise AssertionError("resized crop size differs from ResizeLongestSide's")
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
      batch_size: images per compiled call (default: one per device); a multiple of the mesh size.
      decoder: "amg" (``zsp_jax.amg.decoder``: the mask decoder with the prompt-independent work
        shared and attention products re-associated, equal to rounding) or "model" (``Sam.decode``).
    """

    def __init__(self, model: Any, options: AmgOptions | None = None, *, mesh: Mesh | None = None,
                 batch_size: int | None = None, decoder: str = "amg", **kwargs: Any):
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
        self.batch_size = batch_size or n_dev
        if self.batch_size % n_dev:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of the {n_dev} mesh devices")
        self.decoder = decoder
        self._graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._compiled: dict[Any, Any] = {}
        self.timings = Timings()

    # ------------------------------------------------------------------ compiled program

    def plan_for(self, image_hw: tuple[int, int]) -> D.Plan:
        """The static plan (bucket, shapes) for an image of size (H, W)."""
        return D.Plan.create(self.options, self.image_size, Bucket.for_size(image_hw, self.options.bucket))

    def _run(self, state: Any, inputs: D.AmgInputs, plan: D.Plan, return_masks: bool, return_low_res: bool
             ) -> D.AmgOutputs:
        """Each device maps over its own images one at a time (``shard_map`` + ``lax.map``).

        Every image then runs the same single-image program whatever the number of devices
        and images per device, so results are bitwise identical on 1 and on 8 devices (a
        per-device batch of several images changes XLA's blocking of the products and with it
        the last bits). Each image's prompts are still decoded many at a time.
        """

        def per_device(state: Any, inputs: D.AmgInputs) -> D.AmgOutputs:
            model = nnx.merge(self._graphdef, state)
            if self.decoder == "amg":
                from zsp_jax.amg.decoder import point_decoder

                decode = point_decoder(model)
            else:
                decode = D.model_decoder(model)

            def one(x: D.AmgInputs) -> D.AmgOutputs:
                out = D.generate_padded(model.embed, decode, jax.tree.map(lambda a: a[None], x), plan,
                                        return_masks=return_masks, return_low_res=return_low_res)
                return jax.tree.map(lambda a: a[0], out)

            return jax.lax.map(one, inputs)

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P("data")), out_specs=P("data"),
                             check_vma=False)(state, inputs)

    def _abstract_inputs(self, plan: D.Plan) -> D.AmgInputs:
        b, s = self.batch_size, self.image_size
        sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self._batch_sharding)  # noqa: E731
        return D.AmgInputs(
            tuple(sd((b, l.n_crops, s, s, 3), jnp.float32) for l in plan.layers),
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
        images = [_check_image(im) for im in images]
        if not 0 < len(images) <= self.batch_size:
            raise ValueError(f"expected 1..{self.batch_size} images, got {len(images)}")
        plan = self.plan_for(images[0].shape[:2])
        for im in images:
            if not plan.bucket.contains(im.shape[:2]):
                raise ValueError(f"image of size {im.shape[:2]} is not in the bucket {plan.bucket}")
        padded = list(images) + [images[-1]] * (self.batch_size - len(images))
        t0 = time.perf_counter()
        inputs = prepare_inputs(padded, plan)
        inputs = jax.device_put(inputs, self._batch_sharding)
        t1 = time.perf_counter()
        fn = self.compiled(plan, return_masks=return_masks, return_low_res=return_low_res)
        t2 = time.perf_counter()
        out = jax.block_until_ready(fn(self._state, inputs))
        t3 = time.perf_counter()
        self.timings.preprocess += t1 - t0
        self.timings.device += t3 - t2
        ok = np.asarray(out.resize_ok)[: len(images)]
        if not ok.all():
            raise RuntimeError("an image did not fit its bucket's static resize bands (a bug: please report)")
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
        images = [_check_image(im) for im in images]
        self.timings = Timings(compile=0.0)
        results: list[list[dict[str, Any]] | None] = [None] * len(images)
        groups: dict[Bucket, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(Bucket.for_size(im.shape[:2], self.options.bucket), []).append(i)
        bar = None
        if progress:
            import tqdm

            bar = tqdm.tqdm(total=len(images), desc="automatic masks", unit="img")
        try:
            for idxs in groups.values():
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start:start + self.batch_size]
                    out, plan = self.generate_padded([images[i] for i in chunk])
                    t0 = time.perf_counter()
                    host = jax.tree.map(np.asarray, out)
                    for row, i in enumerate(chunk):
                        results[i] = records_from_outputs(host, row, images[i].shape[:2], plan)
                    self.timings.postprocess += time.perf_counter() - t0
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


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
