"""What each parity figure is judged against: one table, stated once.

Two kinds of figure:

* ``max_rel``: for real-valued outputs (embeddings, logits, scores). Per image,
  ``|ours - reference| / max|reference|`` element by element (the measure of
  ``zsp_jax.utils.bench.relative_error`` and of every parity test); the figure is its maximum over
  all elements of all images (the "worst" column), with the median beside it. float32 passes at
  <= 1e-4, the bound of the parity tests (they measure 1e-7 .. 1e-5 on random weights).
* ``min_fraction``: for discrete outputs (masks matched at IoU >= 0.99, class decisions,
  label-map pixels, argmax maps). Per image, the fraction that agrees; the figure is the lowest
  over the images, with the median beside it. float32 passes at >= 99 % (98 % for segment
  classes, as the labeller's parity test: a segment whose best cosine lies within rounding of the
  no-class threshold may flip either way).

Only the float32 run at ``highest`` matmul precision is judged; other dtypes / precisions report
the same figures against the float32 PyTorch original without a verdict.
"""

from __future__ import annotations

import dataclasses

from zsp_jax.parity.measures import Figure

MAX_REL = "max_rel"
MIN_FRACTION = "min_fraction"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A bound on one figure.

    Attributes:
      kind: ``max_rel`` (the worst relative error must be <= bound) or ``min_fraction`` (the lowest
        agreement must be >= bound).
      bound: the bound (a relative error, or a fraction in [0, 1]).
      what: what is measured, in words (the report's "what" column).
    """

    kind: str
    bound: float
    what: str
    unit: str = "values"

    def passes(self, worst: float) -> bool:
        """Whether ``worst`` (the worst relative error, or the lowest agreement) is within the bound."""
        return worst <= self.bound if self.kind == MAX_REL else worst >= self.bound

    def describe(self) -> str:
        """``max rel <= 1e-04`` or ``agree >= 99%``."""
        return f"max rel <= {self.bound:.0e}" if self.kind == MAX_REL else f"agree >= {self.bound:.0%}"

    def failure(self, worst: float) -> str:
        """The figure against the bound, for a FAIL line: ``max rel 3.1e-02 > 1e-04``."""
        if self.kind == MAX_REL:
            return f"max rel {worst:.1e} > {self.bound:.0e}"
        return f"agree {worst:.2%} < {self.bound:.0%}"


TOLERANCES: dict[str, Tolerance] = {
    "sam.image_embedding": Tolerance(MAX_REL, 1e-4, "SAM image embeddings (B, 64, 64, 256)"),
    "sam.point_logits": Tolerance(MAX_REL, 1e-4, "low-res mask logits of a grid of point prompts"),
    "sam.iou_predictions": Tolerance(MAX_REL, 1e-4, "predicted IoU of the same prompts"),
    "amg.masks": Tolerance(MIN_FRACTION, 0.99, "automatic masks paired at IoU >= 0.99, both ways", "masks"),
    "clip.text_embeddings": Tolerance(MAX_REL, 1e-4, "class prompt embeddings (templates averaged)"),
    "clip.gem_features": Tolerance(MAX_REL, 1e-4, "GEM dense patch features"),
    "label.segment_scores": Tolerance(MAX_REL, 1e-4, "segment embeddings through their class score"),
    "label.segment_classes": Tolerance(MIN_FRACTION, 0.98, "class decision of each paired segment", "pairs"),
    "label.pixels": Tolerance(MIN_FRACTION, 0.99, "label-map pixels (whole labeller vs reference)", "pixels"),
    "deeplab.logits": Tolerance(MAX_REL, 1e-4, "DeepLabV3+ logits"),
    "deeplab.argmax": Tolerance(MIN_FRACTION, 0.99, "DeepLabV3+ argmax pixels", "pixels"),
}
# Relative error of the reference's own transformers -> open_clip re-layout (only for a transformers
# CLIP directory, whose GEM reference needs an open_clip model): a bound on the reference, not on us.
TOLERANCES["clip.reference_layout"] = Tolerance(MAX_REL, 1e-4,
                                                "reference check: transformers CLIP = its open_clip copy")

COMPONENTS = ("sam", "amg", "clip", "label", "deeplab")  # --components groups, in the order they run


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the report: a component's figures in one run, judged or not.

    Attributes:
      component: e.g. ``sam.image_embedding`` (a key of ``TOLERANCES``).
      run: ``<dtype>/<matmul precision>``, e.g. ``float32/highest``.
      figure: ``zsp_jax.parity.measures.Figure``.
      judged: whether this run is judged (float32 at highest precision) or only reported.
    """

    component: str
    run: str
    figure: Figure
    judged: bool

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.component]

    @property
    def verdict(self) -> str:
        """``pass`` / ``FAIL`` for a judged row, ``EMPTY`` when nothing was compared, ``-`` otherwise."""
        if self.figure.count == 0:
            return "EMPTY"
        if not self.judged:
            return "-"
        return "pass" if self.tolerance.passes(self.figure.worst) else "FAIL"

    @property
    def failed(self) -> bool:
        """A judged row that is out of tolerance or compared nothing (never a vacuous pass)."""
        return self.judged and self.verdict in ("FAIL", "EMPTY")

    def failure_line(self) -> str:
        """``FAIL clip.gem_features: max rel 3.1e-02 > 1e-04`` (or ``...: compared nothing``)."""
        if self.figure.count == 0:
            return f"FAIL {self.component}: compared nothing ({self.figure.note or 'no output on either side'})"
        return f"FAIL {self.component}: {self.tolerance.failure(self.figure.worst)}"
