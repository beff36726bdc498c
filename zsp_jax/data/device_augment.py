"""UniMatch's strong augmentations and ImageNet normalisation as one batched, jittable JAX function.

The host pipeline delivers uint8 crops (weak views) with a per-element ``seed``; ``finalize``
turns a host batch into the float32 arrays the train step consumes, making the two strong views
of every unlabelled image on the device.

Why on the device (``tools/bench_input.py``; figures with the machine in docs/benchmarks.md's
Benchmarks section): the two PIL strong views cost more host CPU per image than the decode and
weak view together, so moving them off the host halves the host's work per batch, and the host
sends uint8 instead of float32 (4x fewer bytes). On a CPU-only machine XLA runs them slower than
PIL (about 450 ms per batch on 2 cores), so ``config.data.strong_aug="host"`` is the faster
choice there; both give the same distribution. Their cost on an accelerator is not measured yet.

The colour ops reproduce PIL's integer arithmetic (what torchvision runs on PIL images):
``Image.blend`` truncation and clipping, ``convert('L')`` fixed-point luma, ``ImageStat`` mean
rounding, PIL's uint8 RGB<->HSV conversion with torchvision's wrapped uint8 hue shift, and PIL's
Gaussian blur (three passes of its fractional box blur per axis, 24-bit fixed point, edge
replication). Tests compare with PIL on the same draws: brightness, contrast, saturation,
grayscale and blur are bit-identical; hue differs in about 0.05 % of values (by at most a few
levels), where PIL computes in double precision and this code in float32.

Random draws: each element's key is ``fold_in(key(0), seed)``, views 1 and 2 fold in 1 and 2,
so an element's augmentation depends only on its seed (set by the Grain pipeline from the
element's index and the pipeline seed), not on batch composition, device count or worker count.
The CutMix box follows the reference's distribution (area, then (ratio, x, y) resampled until the
box fits) with a fixed-size rejection sampler over the ratio (see ``_cutmix_box``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zsp_jax.data import augment as host_aug

_BOX_CANDIDATES = 64
_BLUR_REACH = 2  # taps each side: the box radius is <= 1.375 for sigma <= 2 (whole part 1, fraction tap at 2)


# ------------------------------------------------------------------------------- PIL-exact colour ops


def _luma(x: jax.Array) -> jax.Array:
    """PIL ``convert('L')``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 on integer-valued float (..., 3)."""
    xi = x.astype(jnp.int32)
    y = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(jnp.float32)


def _blend(degenerate: jax.Array, img: jax.Array, alpha: jax.Array) -> jax.Array:
    """PIL ``Image.blend(degenerate, img, alpha)`` on uint8 values: truncate, clip to [0, 255]."""
    out = degenerate + alpha * (img - degenerate)
    return jnp.floor(jnp.clip(out, 0.0, 255.0))


def _brightness(x: jax.Array, f: jax.Array) -> jax.Array:
    return _blend(jnp.zeros_like(x), x, f)


def _contrast(x: jax.Array, f: jax.Array) -> jax.Array:
    lum = _luma(x).astype(jnp.int32)
    n = lum.size
    mean = (2 * jnp.sum(lum) + n) // (2 * n)  # int(mean + 0.5), exactly
    return _blend(jnp.full_like(x, mean.astype(jnp.float32)), x, f)


def _saturation(x: jax.Array, f: jax.Array) -> jax.Array:
    return _blend(jnp.broadcast_to(_luma(x)[..., None], x.shape), x, f)


def _rgb_to_hsv_u8(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PIL's uint8 RGB -> HSV (Convert.c ``rgb2hsv_row``)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    cr = jnp.where(maxc == minc, 1.0, maxc - minc)
    s = (maxc - minc) / jnp.where(maxc == 0, 1.0, maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h / 6.0 + 1.0
    h = h - jnp.floor(h)
    grey = maxc == minc
    uh = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(h * 255.0), 0, 255))
    us = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(s * 255.0), 0, 255))
    return uh, us, maxc


def _hsv_u8_to_rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """PIL's uint8 HSV -> RGB (Convert.c ``hsv2rgb``); C ``round`` is half away from zero."""
    h6 = h * 6.0 / 255.0
    i = jnp.floor(h6)
    f = h6 - i
    fs = s / 255.0
    p = jnp.clip(jnp.floor(v * (1.0 - fs) + 0.5), 0, 255)
    q = jnp.clip(jnp.floor(v * (1.0 - fs * f) + 0.5), 0, 255)
    t = jnp.clip(jnp.floor(v * (1.0 - fs * (1.0 - f)) + 0.5), 0, 255)
    sector = jnp.mod(i, 6).astype(jnp.int32)
    r = jnp.select([sector == 0, sector == 1, sector == 2, sector == 3, sector == 4], [v, q, p, p, t], v)
    g = jnp.select([sector == 0, sector == 1, sector == 2, sector == 3, sector == 4], [t, v, v, q, p], p)
    b = jnp.select([sector == 0, sector == 1, sector == 2, sector == 3, sector == 4], [p, p, t, v, v], q)
    rgb = jnp.stack([r, g, b], -1)
    return jnp.where((s == 0)[..., None], v[..., None], rgb)


def _hue(x: jax.Array, f: jax.Array) -> jax.Array:
    h, s, v = _rgb_to_hsv_u8(x)
    shift = jnp.mod(jnp.trunc(f * 255.0), 256.0)  # np.array(f * 255).astype(np.uint8): truncate, wrap
    h = jnp.mod(h + shift, 256.0)
    return _hsv_u8_to_rgb(h, s, v)


def _color_jitter(x: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """torchvision ColorJitter on a PIL image: the four ops in ``order`` with ``factors`` (b, c, s, h)."""
    ops = (_brightness, _contrast, _saturation, _hue)
    branches = [lambda y, i=i: ops[i](y, factors[i]) for i in range(4)]
    # A loop, not 4 unrolled steps: each op is traced once (compile time stays a few seconds).
    return jax.lax.fori_loop(0, 4, lambda k, y: jax.lax.switch(order[k], branches, y), x)


# -------------------------------------------------------------------------------------- PIL blur


def _box_radius(sigma: jax.Array, passes: int = 3) -> jax.Array:
    """PIL ``_gaussian_blur_radius``: the fractional box radius whose ``passes`` passes match sigma."""
    sigma2 = sigma * sigma / passes
    length = jnp.sqrt(12.0 * sigma2 + 1.0)
    lo = jnp.floor((length - 1.0) / 2.0)
    a = (2 * lo + 1) * (lo * (lo + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (lo + 1) * (lo + 1)))
    return lo + a


def _box_pass(x: jax.Array, radius: jax.Array, axis: int) -> jax.Array:
    """One pass of PIL's fractional box blur along ``axis`` of integer-valued (H, W, C) float."""
    r_int = jnp.floor(radius).astype(jnp.int32)
    ww = jnp.floor(jnp.float32(1 << 24) / (radius * 2 + 1)).astype(jnp.uint32)
    fw = ((jnp.uint32(1 << 24) - (2 * r_int + 1).astype(jnp.uint32) * ww) // 2).astype(jnp.uint32)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (_BLUR_REACH, _BLUR_REACH)
    xp = jnp.pad(x.astype(jnp.uint32), pad, mode="edge")
    n = x.shape[axis]
    acc = jnp.zeros(x.shape, jnp.uint32)
    for d in range(-_BLUR_REACH, _BLUR_REACH + 1):
        w = jnp.where(abs(d) <= r_int, ww, jnp.where(abs(d) == r_int + 1, fw, jnp.uint32(0)))
        acc = acc + w * jax.lax.slice_in_dim(xp, _BLUR_REACH + d, _BLUR_REACH + d + n, axis=axis)
    return ((acc + jnp.uint32(1 << 23)) >> 24).astype(jnp.float32)


def _gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """PIL ``ImageFilter.GaussianBlur(radius=sigma)``: 3 box passes along W, then 3 along H."""
    radius = _box_radius(sigma)
    for axis in (1, 0):
        x = jax.lax.fori_loop(0, 3, lambda _, y, axis=axis: _box_pass(y, radius, axis), x)
    return x


# ----------------------------------------------------------------------------------- one strong view


def apply_strong(image: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """ColorJitter / grayscale / blur of one image with explicit draws.

    Args:
      image: (S, S, 3) uint8 or integer-valued float32 in [0, 255].
      params: ``jitter`` bool, ``order`` int32 (4,), ``factors`` float32 (4,) = (b, c, s, h),
        ``gray`` bool, ``blur`` bool, ``sigma`` float32 (the fields of ``augment.StrongParams``).

    Returns:
      (S, S, 3) float32 with integer values in [0, 255].
    """
    x = image.astype(jnp.float32)
    x = jnp.where(params["jitter"], _color_jitter(x, params["order"], params["factors"]), x)
    x = jnp.where(params["gray"], jnp.broadcast_to(_luma(x)[..., None], x.shape), x)
    x = jnp.where(params["blur"], _gaussian_blur(x, params["sigma"]), x)
    return x


def _cutmix_box(u: jax.Array, size: int) -> jax.Array:
    """(y, x, h, w) int32 with the reference's distribution; zeros (no box) with prob 1 - p.

    ``u``: (4 + 2 * 64,) uniforms in [0, 1). Given the area, the accepted (ratio, x, y) of the
    reference's loop are uniform over the fitting triples, so the ratio's density is proportional
    to the number of fitting positions N(r) = (S - w + 1)(S - h + 1). We draw 64 ratios and accept
    each with prob N(r) / M, with M = (S + 2 - sqrt(area))^2 >= N(r) for every r, take the first
    accepted (the square box, which always fits, if none is: probability < 1e-8), then x, y
    uniform over the fitting positions.
    """
    k = _BOX_CANDIDATES
    size_f = jnp.float32(size)
    lo, hi = host_aug.CUTMIX_AREA
    area = (lo + (hi - lo) * u[1]) * size_f * size_f
    rlo, rhi = host_aug.CUTMIX_RATIO
    ratio = rlo + (rhi - rlo) * u[4:4 + k]
    bw = jnp.floor(jnp.sqrt(area / ratio))
    bh = jnp.floor(jnp.sqrt(area * ratio))
    fits = jnp.maximum(size_f - bw + 1, 0) * jnp.maximum(size_f - bh + 1, 0)
    bound = (size_f + 2 - jnp.sqrt(area)) ** 2
    accept = (u[4 + k:4 + 2 * k] * bound < fits) & (bw <= size_f) & (bh <= size_f)
    first = jnp.argmax(accept)
    side = jnp.floor(jnp.sqrt(area))
    bw = jnp.where(accept.any(), bw[first], side)
    bh = jnp.where(accept.any(), bh[first], side)
    x = jnp.minimum(jnp.floor(u[2] * (size_f - bw + 1)), size_f - bw)
    y = jnp.minimum(jnp.floor(u[3] * (size_f - bh + 1)), size_f - bh)
    box = jnp.stack([y, x, bh, bw]).astype(jnp.int32)
    return jnp.where(u[0] < host_aug.CUTMIX_P, box, jnp.zeros(4, jnp.int32))


def sample_strong_params(key: jax.Array, size: int) -> dict[str, jax.Array]:
    """One strong view's draws (``apply_strong`` params plus ``box`` (y, x, h, w) int32).

    One call to the generator for every number (compiles in a fraction of the time of one call
    per draw): the permutation is the argsort of 4 uniforms, the rest are thresholds and affine
    maps of uniforms.
    """
    u = jax.random.uniform(key, (12 + 4 + 2 * _BOX_CANDIDATES,))
    b, c, s, h = host_aug.JITTER
    lo = jnp.array([1 - b, 1 - c, 1 - s, -h], jnp.float32)
    hi = jnp.array([1 + b, 1 + c, 1 + s, h], jnp.float32)
    slo, shi = host_aug.SIGMA_RANGE
    return {
        "jitter": u[0] < host_aug.JITTER_P,
        "order": jnp.argsort(u[1:5]).astype(jnp.int32),
        "factors": lo + (hi - lo) * u[5:9],
        "gray": u[9] < host_aug.GRAY_P,
        "blur": u[10] < host_aug.BLUR_P,
        "sigma": slo + (shi - slo) * u[11],
        "box": _cutmix_box(u[12:], size),
    }


def box_to_mask(box: jax.Array, size: int) -> jax.Array:
    """(..., 4) int32 (y, x, h, w) -> (..., S, S) bool, True inside the box."""
    yy = jnp.arange(size)[:, None]
    xx = jnp.arange(size)[None, :]
    y, x, h, w = (box[..., i, None, None] for i in range(4))
    return (yy >= y) & (yy < y + h) & (xx >= x) & (xx < x + w)


def element_key(seed: jax.Array) -> jax.Array:
    """The augmentation key of one element from its uint32 seed."""
    return jax.random.fold_in(jax.random.key(0), seed)


def strong_view(image: jax.Array, seed: jax.Array, view: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """One strong view of one weak crop.

    Args:
      image: (S, S, 3) uint8 weak view.
      seed: () uint32, the element's augmentation seed.
      view: 1 or 2 (the two views of an element use independent draws).

    Returns:
      (S, S, 3) float32 integer-valued in [0, 255], and the CutMix box (4,) int32 (y, x, h, w),
      zeros for no box.
    """
    params = sample_strong_params(jax.random.fold_in(element_key(seed), view), image.shape[0])
    return apply_strong(image, params), params["box"]


def strong_views(images: jax.Array, seeds: jax.Array) -> dict[str, jax.Array]:
    """Both strong views of a batch of weak crops: images (N, S, S, 3) uint8, seeds (N,) uint32.

    Returns ``image_s1``, ``image_s2`` (N, S, S, 3) float32 in [0, 255] and ``box1``, ``box2`` (N, 4)
    int32. All 2N views go through one vmapped function (one traced copy of the ops).
    """
    n = images.shape[0]
    imgs = jnp.concatenate([images, images])
    views = jnp.concatenate([jnp.full((n,), 1, jnp.int32), jnp.full((n,), 2, jnp.int32)])
    out, boxes = jax.vmap(strong_view)(imgs, jnp.concatenate([seeds, seeds]), views)
    return {"image_s1": out[:n], "image_s2": out[n:], "box1": boxes[:n], "box2": boxes[n:]}


# ------------------------------------------------------------------------------------------ batches


def normalize(x: jax.Array) -> jax.Array:
    """uint8 or float in [0, 255], (..., 3) -> float32 ``(x / 255 - mean) / std`` (ImageNet)."""
    mean = jnp.asarray(host_aug.MEAN)
    std = jnp.asarray(host_aug.STD)
    return (x.astype(jnp.float32) / 255.0 - mean) / std


_UNLABELED_HOST_KEYS = frozenset({"image", "ignore_mask", "pseudo_label", "seed", "image_s1", "image_s2",
                                  "cutmix_box1", "cutmix_box2"})
_LABELED_HOST_KEYS = frozenset({"image", "mask"})


def _check_keys(name: str, got: Any, allowed: frozenset[str]) -> None:
    """Unknown keys are an error, not silently dropped: a new field must be converted on purpose."""
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise ValueError(f"finalize: batch[{name!r}] has keys {unknown} it does not know how to convert "
                         f"(known: {sorted(allowed)})")


def _finalize_unlabeled(streams: list[dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
    size = streams[0]["image"].shape[1]
    on_device = [u for u in streams if "image_s1" not in u]
    made = {}
    if on_device:  # one vmapped call for every stream's views
        views = strong_views(jnp.concatenate([u["image"] for u in on_device]),
                             jnp.concatenate([u["seed"] for u in on_device]))
        start = 0
        for u in on_device:
            n = u["image"].shape[0]
            made[id(u)] = {k: v[start:start + n] for k, v in views.items()}
            start += n
    out = []
    for u in streams:
        if id(u) in made:
            v = made[id(u)]
            s1, s2 = v["image_s1"], v["image_s2"]
            box1, box2 = box_to_mask(v["box1"], size), box_to_mask(v["box2"], size)
        else:  # strong views made on the host
            s1, s2 = u["image_s1"], u["image_s2"]
            box1, box2 = u["cutmix_box1"].astype(bool), u["cutmix_box2"].astype(bool)
        res = {"image_w": normalize(u["image"]), "image_s1": normalize(s1), "image_s2": normalize(s2),
               "ignore_mask": u["ignore_mask"].astype(jnp.int32), "cutmix_box1": box1, "cutmix_box2": box2}
        if "pseudo_label" in u:
            res["pseudo_label"] = u["pseudo_label"].astype(jnp.int32)
        out.append(res)
    return out


def finalize(batch: dict[str, Any]) -> dict[str, Any]:
    """Host batch (uint8) -> the train step's float32 inputs. Jit it; it is shape-static and batched.

    Input (``pipeline.TrainPipeline`` batches; B per process, S the crop size):
      ``labeled``: ``image`` uint8 (B, S, S, 3), ``mask`` uint8 (B, S, S);
      ``unlabeled`` and ``unlabeled_mix`` (absent in supervised runs): ``image`` uint8 (B, S, S, 3)
      weak view, ``ignore_mask`` uint8 (B, S, S) (255 = padding), optionally ``pseudo_label`` uint8
      (B, S, S) (the zero-shot label of the weak view, 255 = uncovered or padding), and either
      ``seed`` uint32 (B,) (strong views made here) or ``image_s1``/``image_s2`` uint8 (B, S, S, 3)
      with ``cutmix_box1``/``cutmix_box2`` uint8 (B, S, S).

    Output:
      ``labeled``: ``image`` float32 (B, S, S, 3) normalised, ``mask`` int32 (B, S, S) (255 = ignore);
      ``unlabeled`` and ``unlabeled_mix``: ``image_w``, ``image_s1``, ``image_s2`` float32 (B, S, S, 3),
      ``ignore_mask`` int32 (B, S, S) (255 on padding, else 0), ``cutmix_box1``, ``cutmix_box2``
      bool (B, S, S), and ``pseudo_label`` int32 (B, S, S) when given. The strong views share the
      weak view's geometry, so the weak view's pseudo label is theirs too.

    Raises:
      ValueError: a key this function does not know (rather than dropping it silently).
    """
    _check_keys("batch", batch, frozenset({"labeled", "unlabeled", "unlabeled_mix"}))
    _check_keys("labeled", batch["labeled"], _LABELED_HOST_KEYS)
    out = {"labeled": {"image": normalize(batch["labeled"]["image"]),
                       "mask": batch["labeled"]["mask"].astype(jnp.int32)}}
    keys = [k for k in ("unlabeled", "unlabeled_mix") if k in batch]
    for k in keys:
        _check_keys(k, batch[k], _UNLABELED_HOST_KEYS)
    if keys:  # supervised batches carry the labelled stream only
        out.update(zip(keys, _finalize_unlabeled([batch[k] for k in keys])))
    return out


def params_from_host(p: host_aug.StrongParams) -> dict[str, np.ndarray]:
    """``augment.StrongParams`` -> the dict ``apply_strong`` takes (for parity tests)."""
    return {"jitter": np.bool_(p.jitter), "order": np.asarray(p.order, np.int32),
            "factors": np.asarray(p.factors, np.float32), "gray": np.bool_(p.gray), "blur": np.bool_(p.blur),
            "sigma": np.float32(p.sigma)}
