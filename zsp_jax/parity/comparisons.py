"""The comparisons of ``python -m zsp_jax.parity``: each component of ours against the PyTorch original.

``Comparer`` holds the PyTorch side (``zsp_jax.parity.originals``): its models are loaded and its
outputs computed once, in float32, and every run of ours (each dtype / matmul precision) is compared
with them. One method per component group returns ``Row``s:

* ``sam``: the image embedding (as ``SamPredictor.set_image``); a fixed 4 x 4 grid of single
  positive points through the prompt encoder and mask decoder (multimask): low-res logits and
  predicted IoUs. Each side decodes its own embedding, as a user's predictor would.
* ``amg``: the automatic masks with the label settings' AMG options, paired one-to-one at
  IoU >= 0.99 (``zsp_jax.references.amg.match_records``); the figure per image is the number of
  pairs over the larger of the two mask counts (so every mask of either side must find a partner).
* ``clip``: the class prompt embeddings, and GEM's dense features of the same normalised input
  (the reference's own GEM transform of the image).
* ``label``: the whole labeller against the reference labeller (segment-anything's generator,
  gem-torch, torch pooling; ``zsp_jax.references.label_reference``) on the same AMG settings:
  label-map pixels; segments paired by mask (IoU >= 0.99) and their class decisions; the segment
  embeddings seen through their class score (the labeller returns scores, not embeddings), over the
  pairs whose masks are identical, so that a mask differing by a few pixels does not blur the
  figure.
* ``deeplab``: logits and argmax of the same ImageNet-normalised image resized to a square.

The random-weight trap (with random weights the default AMG filters keep nothing): when the label
settings leave no mask on either side in any image, the ``amg`` and ``label`` groups compare the
candidates before the filters instead: predicted-IoU and stability filters off, NMS off, at most an
8 x 8 grid (3 masks per point), and say so in the row. That choice is made once, in the first run,
and kept for every run so that the runs stay comparable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from zsp_jax.parity import measures, ours
from zsp_jax.parity.inputs import RunSpec, Setup
from zsp_jax.parity.tolerances import Row

POINTS_PER_SIDE = 4  # the fixed grid of point prompts: 16 single-point prompts per image
CANDIDATE_POINTS = 8  # the candidate fallback's grid is at most 8 x 8 (192 masks per image and crop)
MATCH_IOU = 0.99


def point_grid(image_hw: tuple[int, int], n: int = POINTS_PER_SIDE) -> np.ndarray:
    """(n*n, 2) float64 (x, y) cell centres of an n x n grid over an (H, W) image."""
    h, w = image_hw
    centres = (np.arange(n) + 0.5) / n
    xs, ys = np.meshgrid(centres * w, centres * h)
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def candidate_amg(amg: Any) -> Any:
    """AMG options that keep every candidate mask: no IoU / stability filter, no NMS, a grid of at most
    ``CANDIDATE_POINTS`` per side, ``max_masks`` large enough for all of them."""
    changes: dict[str, Any] = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0,
                               "crop_nms_thresh": 1.0}
    if amg.points_per_side is not None and amg.points_per_side > CANDIDATE_POINTS:
        changes["points_per_side"] = CANDIDATE_POINTS
    candidates = amg.replace(**changes)
    return candidates.replace(max_masks=max(candidates.max_masks, ours.candidate_count(candidates)))


@dataclasses.dataclass
class LabelPicture:
    """One image's label maps where ours and the reference differ (for the report's pictures)."""

    name: str
    image: np.ndarray
    ours: np.ndarray
    reference: np.ndarray
    agreement: float


class Comparer:
    """Compares our runs with the PyTorch originals of ``setup``.

    Args:
      setup: the checked inputs.
      tick: called with a number of finished steps (the progress bar): one per image and component group of
        each run of ours, and of the reference.
      log: where notes go (e.g. the AMG fallback) as they are found.
      more_steps: called with the number of steps the AMG fallback adds (its second reference pass).
    """

    def __init__(self, setup: Setup, tick: Callable[[int], None] = lambda n: None, log: Callable[[str], None] = print,
                 more_steps: Callable[[int], None] = lambda n: None):
        self.setup = setup
        self.tick = tick
        self.log = log
        self.more_steps = more_steps
        self.notes: dict[str, str] = {}
        self.pictures: list[LabelPicture] = []
        self.amg_fallback: bool | None = None  # decided once, by the first run that compares masks
        self._cache: dict[tuple[str, bool], Any] = {}

    @property
    def images(self) -> list[np.ndarray]:
        return [image for _, image in self.setup.images]

    # ------------------------------------------------------------------ the PyTorch side (once)

    def _reference(self, flag: str, load: Callable[[], Any]) -> Any:
        """``load()``; an original that does not load into its PyTorch package is a mistake in the inputs."""
        from zsp_jax import cli

        try:
            return load()
        except (ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise cli.UsageError(f"{flag}: the original does not load into its PyTorch package: {first[:300]}") from e

    @functools.cached_property
    def reference_sam(self) -> Any:
        from zsp_jax.parity import originals

        sam, config = self._reference("--sam", lambda: originals.load_sam(self.setup.sam[1]))
        self.notes["sam"] = f"SAM {config.name} from {self.setup.sam[1]} (segment-anything)"
        return sam

    @functools.cached_property
    def reference_clip(self) -> Any:
        from zsp_jax.parity import originals

        ref = self._reference("--clip", lambda: originals.load_clip(self.setup.clip[1],
                                                                     self.setup.clip_reference_model_name))
        self.notes["clip"] = f"CLIP from {self.setup.clip[1]}: {ref.source}"
        return ref

    @functools.cached_property
    def reference_gem(self) -> Any:
        """gem-torch's wrapper of the reference CLIP, with the label settings' GEM options."""
        from zsp_jax.parity import originals

        return originals.gem_wrapper(self.reference_clip.model, self.setup.options.gem)

    @functools.cached_property
    def reference_text(self) -> np.ndarray:
        """(P, D) the reference's prompt embeddings (open_clip's tokenizer and text tower)."""
        from zsp_jax.references.label_reference import prompt_embeddings

        o = self.setup.options
        texts, _ = o.classes.prompt_rows()
        return prompt_embeddings(self.reference_clip.model, texts, ours.template_strings(o.templates)).numpy()

    @functools.cached_property
    def reference_labeller(self) -> Any:
        from zsp_jax.parity import originals

        o = self.setup.options
        return originals.reference_labeller(self.reference_sam, o.amg.reference_kwargs(), self.reference_clip.model,
                                            self.reference_gem, o, ours.template_strings(o.templates))

    @functools.cached_property
    def reference_sam_outputs(self) -> list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (torch embedding, numpy embedding (g, g, C), point logits, point IoUs)."""
        from zsp_jax.parity import originals

        out = []
        for image in self.images:
            emb, emb_np = originals.sam_embedding(self.reference_sam, image)
            low, iou = originals.sam_point_prompts(self.reference_sam, emb, point_grid(image.shape[:2]),
                                                   image.shape[:2])
            out.append((emb, emb_np, low, iou))
            self.tick(1)
        return out

    def reference_records(self, fallback: bool) -> list[list[dict[str, Any]]]:
        """segment-anything's AMG records of every image at the label settings or the candidate settings."""
        from zsp_jax.parity import originals

        key = ("records", fallback)
        if key not in self._cache:
            amg = self.amg_options(fallback)
            self._cache[key] = originals.amg_records(self.reference_sam, amg.reference_kwargs(), self.images,
                                                     self.tick)
        return self._cache[key]

    def amg_options(self, fallback: bool) -> Any:
        amg = self.setup.options.amg
        return candidate_amg(amg) if fallback else amg

    def decide_fallback(self, our_counts: list[int]) -> bool:
        """Whether the masks are compared before the filters: the label settings left nothing on either
        side in every image (``our_counts``: our masks per image at the label settings)."""
        if self.amg_fallback is None:
            ref_counts = [len(r) for r in self.reference_records(False)]
            self.amg_fallback = sum(ref_counts) == 0 and sum(our_counts) == 0
            if self.amg_fallback:
                n = self.amg_options(True).points_per_side
                grid = f"a {n}x{n} grid" if n else "the explicit point grids"
                self.notes["amg"] = (
                    "the label settings' AMG filters kept no mask on either side in any image (random weights?): "
                    f"masks compared BEFORE the filters instead: the candidates of {grid} with pred_iou_thresh=0, "
                    "stability_score_thresh=0 and NMS off")
                self.log(f"note: {self.notes['amg']}")
                self.more_steps(len(self.images))
        return self.amg_fallback

    @functools.cached_property
    def reference_gem_inputs(self) -> list[np.ndarray]:
        from zsp_jax.parity import originals

        return [originals.gem_input(image, self.setup.options.clip_size) for image in self.images]

    @functools.cached_property
    def reference_gem_tokens(self) -> list[np.ndarray]:
        from zsp_jax.parity import originals

        wrapper = self.reference_gem
        out = []
        for x in self.reference_gem_inputs:
            out.append(originals.gem_tokens(wrapper, x))
            self.tick(1)
        return out

    def reference_labels(self, fallback: bool) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        """Per image: (the reference label map, its segment records with ``class`` and ``score``)."""
        key = ("labels", fallback)
        if key not in self._cache:
            records = self.reference_records(fallback)
            out = []
            for image, recs in zip(self.images, records):
                out.append(self.reference_labeller.label_records(image, [dict(r) for r in recs]))
                self.tick(1)
            self._cache[key] = out
        return self._cache[key]

    @functools.cached_property
    def deeplab_inputs(self) -> list[np.ndarray]:
        """Each image resized (PIL bilinear) to ``deeplab_size`` squared and ImageNet-normalised."""
        from PIL import Image

        from zsp_jax.data.augment import normalize

        s = self.setup.deeplab_size
        return [normalize(np.asarray(Image.fromarray(im).resize((s, s), Image.BILINEAR))) for im in self.images]

    @functools.cached_property
    def reference_deeplab_logits(self) -> list[np.ndarray]:
        from zsp_jax.parity import originals

        model, config = self._reference("--deeplab", lambda: originals.load_deeplab(self.setup.deeplab[1],
                                                                                    self.setup.deeplab_geometry))
        self.notes["deeplab"] = (f"DeepLabV3+ from {self.setup.deeplab[1]} ({config.variant}, output stride "
                                 f"{config.output_stride}, ASPP rates {config.aspp_rates}) at "
                                 f"{self.setup.deeplab_size}x{self.setup.deeplab_size}")
        out = []
        for x in self.deeplab_inputs:
            out.append(originals.deeplab_logits(model, x))
            self.tick(1)
        return out

    # ------------------------------------------------------------------ our runs

    def sam_rows(self, run: RunSpec, sam: Any) -> list[Row]:
        """sam.image_embedding, sam.point_logits, sam.iou_predictions."""
        refs = self.reference_sam_outputs
        runner = ours.SamRunner(sam)
        emb, low, iou = [], [], []
        for image in self.images:
            e = runner.embedding(image)
            lo, io = runner.point_prompts(e, point_grid(image.shape[:2]), image.shape[:2])
            emb.append(np.asarray(e[0], np.float32))
            low.append(lo)
            iou.append(io)
            self.tick(1)
        n = POINTS_PER_SIDE ** 2
        return [Row("sam.image_embedding", run.name, measures.tensor_figure(emb, [r[1] for r in refs]), run.judged),
                Row("sam.point_logits", run.name,
                    measures.tensor_figure(low, [r[2] for r in refs], f"{n} points x 3 masks per image"), run.judged),
                Row("sam.iou_predictions", run.name,
                    measures.tensor_figure(iou, [r[3] for r in refs], f"{n} points x 3 masks per image"), run.judged)]

    def amg_rows(self, run: RunSpec, sam: Any) -> list[Row]:
        """amg.masks: masks paired at IoU >= 0.99 over the larger count, per image."""
        from zsp_jax.references.amg import match_records

        fallback = self.amg_fallback
        our_records = ours.mask_records(sam, self.amg_options(bool(fallback)), self.images)
        if fallback is None:
            fallback = self.decide_fallback([len(r) for r in our_records])
            if fallback:
                our_records = ours.mask_records(sam, self.amg_options(True), self.images)
        ref_records = self.reference_records(fallback)
        agreeing, totals, iou_diff, stability_diff = [], [], 0.0, 0.0
        for ref, mine in zip(ref_records, our_records):
            match = match_records(ref, mine, min_iou=MATCH_IOU)
            agreeing.append(len(match.pairs))
            totals.append(max(len(ref), len(mine)))
            for i, j in match.pairs:
                iou_diff = max(iou_diff, abs(ref[i]["predicted_iou"] - mine[j]["predicted_iou"]))
                stability_diff = max(stability_diff, abs(ref[i]["stability_score"] - mine[j]["stability_score"]))
            self.tick(1)
        what = "candidates before the filters" if fallback else "label settings"
        note = (f"{what}: {sum(len(r) for r in ref_records)} reference / {sum(len(r) for r in our_records)} our masks; "
                f"paired masks differ by at most {iou_diff:.1e} in predicted IoU, {stability_diff:.1e} in stability"
                f" score")
        return [Row("amg.masks", run.name, measures.fraction_figure(agreeing, totals, note), run.judged)]

    def clip_rows(self, run: RunSpec, clip: Any, tokenizer: Any) -> list[Row]:
        """clip.text_embeddings, clip.gem_features (and clip.reference_layout for a transformers CLIP)."""
        o = self.setup.options
        texts, _ = o.classes.prompt_rows()
        ref_text = self.reference_text
        our_text = ours.text_embeddings(clip, tokenizer, texts, o.templates, run.name)
        ref_tokens = self.reference_gem_tokens
        tokens = []
        for x in self.reference_gem_inputs:
            tokens.append(ours.gem_tokens(clip, o.gem, x))
            self.tick(1)
        rows = [Row("clip.text_embeddings", run.name,
                    measures.tensor_figure([our_text], [ref_text], f"{len(texts)} prompts"), run.judged),
                Row("clip.gem_features", run.name,
                    measures.tensor_figure(tokens, ref_tokens, f"{o.clip_size}x{o.clip_size} input, GEM depth "
                                                               f"{o.gem.depth}"), run.judged)]
        check = self.reference_clip.layout_check
        if check is not None and run.judged:
            rows.append(Row("clip.reference_layout", run.name, measures.tensor_figure(*check, "image and text "
                                                                                      "embeddings"), True))
        return rows

    def label_rows(self, run: RunSpec, sam: Any, clip: Any, tokenizer: Any) -> list[Row]:
        """label.pixels, label.segment_classes, label.segment_scores."""
        options = ours.for_run(self.setup.options, run.dtype, run.precision)
        fallback = self.amg_fallback
        results = ours.label_images(sam, clip, tokenizer, ours.with_amg(options, self.amg_options(bool(fallback))),
                                    self.images)
        if fallback is None:
            fallback = self.decide_fallback([r.num_segments for r in results])
            if fallback:
                results = ours.label_images(sam, clip, tokenizer, ours.with_amg(options, self.amg_options(True)),
                                            self.images)
        refs = self.reference_labels(fallback)
        same_pixels, pixels, same_class, pairs_n, score_ours, score_ref = [], [], [], [], [], []
        identical, paired, segments = 0, 0, 0
        for (name, image), result, (ref_map, ref_records) in zip(self.setup.images, results, refs):
            equal = result.label == ref_map
            same_pixels.append(int(equal.sum()))
            pixels.append(int(equal.size))
            if run.judged and not equal.all():
                self.pictures.append(LabelPicture(name, image, result.label, ref_map, float(equal.mean())))
            ref_masks = (np.stack([r["segmentation"] for r in ref_records]) if ref_records
                         else np.zeros((0,) + image.shape[:2], bool))
            pairs = measures.pair_masks(ref_masks, ours.segment_masks(result, image.shape[:2]), min_iou=MATCH_IOU)
            segments += max(len(ref_records), result.num_segments)
            paired += len(pairs.pairs)
            same_class.append(sum(ref_records[i]["class"] == result.segments[j]["class"] for i, j in pairs.pairs))
            pairs_n.append(len(pairs.pairs))
            exact = [(i, j) for (i, j), iou in zip(pairs.pairs, pairs.ious) if iou >= 1.0]
            identical += len(exact)
            score_ref.append(np.array([ref_records[i]["score"] for i, _ in exact], np.float64))
            score_ours.append(np.array([result.segments[j]["score"] for _, j in exact], np.float64))
            self.tick(1)
        what = "candidates before the filters" if fallback else "label settings"
        return [
            Row("label.pixels", run.name, measures.fraction_figure(same_pixels, pixels, what), run.judged),
            Row("label.segment_classes", run.name, measures.fraction_figure(
                same_class, pairs_n, f"{paired} of {segments} segments paired at IoU >= {MATCH_IOU}"), run.judged),
            Row("label.segment_scores", run.name, measures.tensor_figure(
                score_ours, score_ref, f"{identical} segments with identical masks"), run.judged)]

    def deeplab_rows(self, run: RunSpec, model: Any) -> list[Row]:
        """deeplab.logits, deeplab.argmax."""
        refs = self.reference_deeplab_logits
        runner = ours.deeplab_runner(model)
        logits = []
        for x in self.deeplab_inputs:
            logits.append(runner(x))
            self.tick(1)
        same = [int(np.sum(a.argmax(-1) == b.argmax(-1))) for a, b in zip(logits, refs)]
        sizes = [int(np.prod(b.shape[:2])) for b in refs]
        s = self.setup.deeplab_size
        return [Row("deeplab.logits", run.name, measures.tensor_figure(logits, refs, f"{s}x{s} input"), run.judged),
                Row("deeplab.argmax", run.name, measures.fraction_figure(same, sizes, f"{s}x{s} input"), run.judged)]

