"""A reference zero-shot labeller built from the PyTorch reference packages, for parity tests and
``tools/bench_label.py``.

It runs the method literally, one image at a time, with no shared code with ``zsp_jax.label``:

1. segment-anything's ``SamAutomaticMaskGenerator(...).generate(image)`` (binary masks);
2. gem-torch's vision forward on GEM's own image transform (``gem.get_gem_img_transform``), patch
   tokens (class token dropped), optionally L2-normalised;
3. the feature map resized to the image with ``torch.nn.functional.interpolate`` (``bilinear``,
   ``align_corners=False``, or ``nearest-exact`` for area pooling) and, per mask, the paper's
   masked average ``f_k = sum(F * S_k) / sum(S_k)``;
4. cosine similarity to open_clip text embeddings of the prompts, best label per segment, the
   no-class rule;
5. masks sorted by area (descending, stable) and painted in that order onto a map of 255.

Settings come as the same ``Rules`` the labeller uses, so a test states them once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from zsp_jax.references import torchvision_stub


@dataclasses.dataclass
class ReferenceTimings:
    """Seconds per stage, summed over the images of one ``label`` call."""

    amg: float = 0.0
    gem: float = 0.0
    pooling: float = 0.0


def prompt_embeddings(open_clip_model: Any, prompts: list[str], templates: tuple[str, ...]) -> Any:
    """(P, D) torch float32 unit rows: per prompt, the mean of its normalised template embeddings (open_clip's
    tokenizer and text tower), renormalised."""
    torchvision_stub.install()
    import open_clip
    import torch

    with torch.no_grad():
        rows = []
        for p in prompts:
            ids = open_clip.tokenize([t.format(p) for t in templates])
            e = open_clip_model.encode_text(ids).double()
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            rows.append(e / e.norm())
    return torch.stack(rows).float()


class ReferenceLabeller:
    """Args:
      sam: a segment-anything ``Sam`` (eval mode).
      amg_kwargs: ``SamAutomaticMaskGenerator`` keyword arguments (``AmgOptions.reference_kwargs()``).
      open_clip_model: an open_clip ``CLIP`` (its text tower embeds the prompts).
      gem_wrapper: gem-torch's wrapper of the same model (``zsp_jax.references.clip.gem_reference``).
      prompts: the prompt names, one per row; row_labels: (P,) label value of each row.
      rules: ``zsp_jax.label.options.Rules``.
      clip_size, templates: GEM's input size and the prompt templates.
    """

    def __init__(self, sam: Any, amg_kwargs: dict[str, Any], open_clip_model: Any, gem_wrapper: Any,
                 prompts: list[str], rules: Any, *, clip_size: int = 448, templates: tuple[str, ...] = ("a photo of a {}.",)):
        torchvision_stub.install()
        from segment_anything import SamAutomaticMaskGenerator

        self.generator = SamAutomaticMaskGenerator(sam, **amg_kwargs)
        self.gem = gem_wrapper
        self.rules = rules
        self.clip_size = clip_size
        self.text = prompt_embeddings(open_clip_model, prompts, templates)
        self.row_labels = np.asarray(rules.row_labels)
        self.timings = ReferenceTimings()

    def features(self, image: np.ndarray) -> Any:
        """(1, D, gh, gw) torch GEM patch features of one uint8 image."""
        import gem
        import torch
        from PIL import Image

        x = gem.get_gem_img_transform(img_size=(self.clip_size, self.clip_size))(Image.fromarray(image))[None]
        with torch.no_grad():
            feat_gem, _ = self.gem.model.visual(x)
        tokens = feat_gem[0, 1:]
        if self.rules.normalize_tokens:
            tokens = tokens / tokens.norm(dim=-1, keepdim=True)
        g = int(round(tokens.shape[0] ** 0.5))
        return tokens.reshape(g, g, -1).permute(2, 0, 1)[None]

    def classify(self, embeddings: Any) -> tuple[np.ndarray, np.ndarray]:
        """(K, D) torch -> (label (K,), score (K,)) numpy, the rules of ``zsp_jax.label`` written out."""
        import torch

        emb = embeddings / embeddings.norm(dim=-1, keepdim=True)
        sims = (emb @ self.text.T).numpy().astype(np.float64)
        r = self.rules
        scores = np.full((len(sims), r.num_labels), -np.inf)
        for lab in range(r.num_labels):
            cols = sims[:, self.row_labels == lab]
            if cols.shape[1]:
                scores[:, lab] = cols.max(1) if r.synonyms == "max" else cols.mean(1)
        best = scores.argmax(1)
        if r.no_class == "softmax":
            logits = r.temperature * scores
            probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            score = probs[np.arange(len(best)), best]
        else:
            score = scores[np.arange(len(best)), best]
        label = best.copy()
        if r.no_class != "none":
            label[(best != 0) & (score < r.threshold)] = 0
        return label, score

    def label(self, image: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """One uint8 (H, W, 3) image -> (label map (H, W) uint8, records with 'class' and 'score' added)."""
        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            records = self.generator.generate(image)
        self.timings.amg += time.perf_counter() - t0
        return self.label_records(image, records)

    def label_records(self, image: np.ndarray, records: list[dict[str, Any]]
                      ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """``label`` with masks generated earlier: ``records`` are segment-anything's binary-mask records of
        this image (e.g. ``generator.generate(image)``, run once and shared with other comparisons)."""
        import torch
        import torch.nn.functional as F

        t1 = time.perf_counter()
        feats = self.features(image)
        t2 = time.perf_counter()
        h, w = image.shape[:2]
        r = self.rules
        if r.pooling == "bilinear":
            up = F.interpolate(feats, size=(h, w), mode="bilinear", align_corners=False)[0]
        else:
            up = F.interpolate(feats, size=(h, w), mode="nearest-exact")[0]
        up = up.permute(1, 2, 0).double()  # (H, W, D)
        records = [rec for rec in records if rec["area"] > 0]
        if records:
            masks = torch.from_numpy(np.stack([rec["segmentation"] for rec in records])).double()  # (K, H, W)
            emb = torch.einsum("khw,hwd->kd", masks, up) / masks.sum(dim=(1, 2))[:, None]
            labels, scores = self.classify(emb.float())
        else:
            labels, scores = np.zeros(0, np.int64), np.zeros(0)
        out = np.full((h, w), 255 if r.uncovered == "ignore" else 0, np.uint8)
        if r.paint_order == "area_desc":
            order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
        elif r.paint_order == "area_asc":
            order = sorted(range(len(records)), key=lambda i: records[i]["area"])
        else:
            order = sorted(range(len(records)), key=lambda i: records[i]["predicted_iou"])
        for i in order:  # later painting wins
            out[records[i]["segmentation"]] = labels[i]
        for rec, lab, sc in zip(records, labels, scores):
            rec["class"], rec["score"] = int(lab), float(sc)
        t3 = time.perf_counter()
        self.timings.gem += t2 - t1
        self.timings.pooling += t3 - t2
        return out, records
