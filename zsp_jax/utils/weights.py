"""Weight conversion from PyTorch state_dicts to Flax NNX models, and the converted file format.

Every converter in zsp_jax (SAM, CLIP, DINOv2, UniMatch V2's DPT head, DeepLab) is a table of ``Rule``s applied by
``convert_state_dict``, which enforces three guards taken from the Flax NNX ViT conversion
example and bonsai's ``params.py``:

1. every source tensor is consumed by exactly one rule (or listed as deliberately dropped),
2. every target weight of the model is produced exactly once,
3. every shape equals the shape the model expects.

All violations are collected and raised together in one ``ConversionError`` that names the
file, so a wrong variant, a truncated file or a foreign checkpoint reads as such.

Converted weights are stored as **safetensors** (flat ``"a.b.0.c"`` keys that are the NNX state
paths, plus string metadata such as ``{"zsp_jax.model": "sam", "zsp_jax.variant": "vit_b"}``).
We chose safetensors over Orbax for weights because the file is a single self-describing blob
that loads with numpy alone (no torch, no TensorStore), can be memory-mapped, and is what
users already exchange; Orbax is used for training checkpoints, which need sharding and
iterator state.

The readers every family shares live here too: PyTorch files (``load_torch_checkpoint``,
``unwrap_state_dict``), transformers directories (``read_hf_state_dict``, lazily through
``SafetensorsDict``), converted files (``load_weights``, ``read_metadata``, ``read_stored_config``), and
``build_with_random_weights`` for models whose values do not matter (random checkpoints, device checks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zsp_jax.utils.io import atomic_path

Array = np.ndarray
Transform = Callable[[Array], Array | tuple[Array, ...]]

FORMAT_KEY = "zsp_jax.format"
FORMAT_VERSION = "1"
_MAX_LISTED = 12


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is converted to, or cannot be read."""


# ----------------------------------------------------------------------------- transforms


def identity(w: Array) -> Array:
    return w


def linear(w: Array) -> Array:
    """torch Linear (out, in) -> Flax kernel (in, out)."""
    return w.T


def conv2d(w: Array) -> Array:
    """torch Conv2d (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return w.transpose(2, 3, 1, 0)


def conv_transpose2d(w: Array) -> Array:
    """torch ConvTranspose2d (in, out, kh, kw) -> Flax ConvTranspose kernel (kh, kw, in, out).

    Flax's ``ConvTranspose`` (with ``transpose_kernel=False``) is a dilated convolution with the
    kernel applied unflipped; torch's is the gradient of a convolution, i.e. the flipped kernel.
    Callers that use ``nnx.ConvTranspose(transpose_kernel=True)`` want ``conv2d`` instead.
    """
    return w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


def split(n: int, axis: int = 0, then: Transform = identity) -> Transform:
    """Splits a fused tensor (e.g. torch's ``in_proj_weight`` (3D, D)) into ``n`` parts."""

    def fn(w: Array) -> tuple[Array, ...]:
        return tuple(then(p) for p in np.split(w, n, axis=axis))

    return fn


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps source keys matching ``pattern`` (full match) to one or more target keys.

    ``target`` is a ``re`` replacement template (``\\1`` refers to groups of ``pattern``); a
    tuple of templates means ``transform`` returns that many arrays, in order.
    """

    pattern: str
    target: str | tuple[str, ...]
    transform: Transform = identity

    def targets(self, match: re.Match) -> tuple[str, ...]:
        templates = self.target if isinstance(self.target, tuple) else (self.target,)
        return tuple(match.expand(t) for t in templates)


# ----------------------------------------------------------------------------- model state


def _path_key(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def weight_filter() -> Any:
    """The NNX variable types stored in converted files: parameters and batch statistics."""
    return nnx.Any(nnx.Param, nnx.BatchStat)


def flat_shapes(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """``{"a.b.0.c": ShapeDtypeStruct}`` of a model's weights (works on ``nnx.eval_shape`` models)."""
    state = nnx.state(model, weight_filter())
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var
        out[_path_key(path)] = jax.ShapeDtypeStruct(value.shape, value.dtype)
    return out


def flat_weights(model: nnx.Module) -> dict[str, Array]:
    """The model's weights as host numpy arrays keyed like ``flat_shapes``."""
    state = nnx.state(model, weight_filter())
    return {_path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------- conversion


def to_numpy(t: Any) -> Array:
    """A torch tensor (any float dtype, possibly mmap-backed) or array -> numpy, floats as fp32."""
    if hasattr(t, "detach"):
        import torch

        t = t.detach()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        return t.cpu().numpy()
    a = np.asarray(t)
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


class _Errors:
    def __init__(self) -> None:
        self.groups: dict[str, list[str]] = {}

    def add(self, kind: str, msg: str) -> None:
        self.groups.setdefault(kind, []).append(msg)

    def raise_if_any(self, source_name: str) -> None:
        if not self.groups:
            return
        lines = [f"cannot convert {source_name}:"]
        for kind, msgs in self.groups.items():
            lines.append(f"  {len(msgs)} {kind}:")
            lines += [f"    {m}" for m in msgs[:_MAX_LISTED]]
            if len(msgs) > _MAX_LISTED:
                lines.append(f"    ... and {len(msgs) - _MAX_LISTED} more")
        raise ConversionError("\n".join(lines))


def convert_state_dict(
    source: Mapping[str, Any],
    rules: Sequence[Rule],
    expected: Mapping[str, jax.ShapeDtypeStruct | tuple[int, ...]],
    *,
    source_name: str,
    drop: Sequence[str] = (),
    dtype: Any = np.float32,
) -> dict[str, Array]:
    """Applies ``rules`` to ``source`` and checks the result against ``expected``.

    Args:
      source: source key -> tensor (torch tensors are converted one at a time, so a
        memory-mapped checkpoint is never held twice in memory).
      rules: the conversion table; each source key must fully match exactly one rule.
      expected: target key -> shape (e.g. ``flat_shapes(nnx.eval_shape(ctor))``).
      source_name: what to call the source in error messages (usually its path).
      drop: regexes of source keys that are deliberately not converted (e.g. an
        optimizer's state stored beside the weights).
      dtype: floating dtype of the output arrays.

    Returns:
      target key -> numpy array, exactly the keys of ``expected``.

    Raises:
      ConversionError: listing every unmapped or ambiguous source key, missing or
        duplicated target and shape mismatch.
    """
    compiled = [(re.compile(r.pattern), r) for r in rules]
    dropped = [re.compile(p) for p in drop]
    errors = _Errors()
    out: dict[str, Array] = {}
    origin: dict[str, str] = {}
    mismatched: set[str] = set()
    for key in source:
        if any(d.fullmatch(key) for d in dropped):
            continue
        hits = [(m, r) for rx, r in compiled if (m := rx.fullmatch(key))]
        if not hits:
            errors.add("source tensors that match no rule (not a checkpoint of this model?)", key)
            continue
        if len(hits) > 1:
            errors.add("source tensors matched by several rules (a bug in the rule table)",
                       f"{key}: {[r.pattern for _, r in hits]}")
            continue
        match, rule = hits[0]
        targets = rule.targets(match)
        raw = to_numpy(source[key])
        values = rule.transform(raw)
        if not isinstance(values, tuple):
            values = (values,)
        if len(values) != len(targets):
            errors.add("rules whose transform returned the wrong number of arrays", key)
            continue
        for target, value in zip(targets, values):
            if target not in expected:
                errors.add("targets the model does not have", f"{key} -> {target}")
                continue
            if target in out:
                errors.add("targets produced twice", f"{target} from {origin[target]} and {key}")
                continue
            want = tuple(getattr(expected[target], "shape", expected[target]))
            if tuple(value.shape) != want:
                errors.add("shape mismatches (source shape -> converted shape, expected)",
                           f"{key} {tuple(raw.shape)} -> {target} {tuple(value.shape)}, expected {want}")
                mismatched.add(target)
                continue
            if value.dtype.kind == "f":
                value = value.astype(dtype, copy=False)
            out[target] = np.require(value, requirements="C")  # keeps 0-d scalars 0-d
            origin[target] = key
    missing = [k for k in expected if k not in out and k not in mismatched]
    for k in missing:
        errors.add("model weights that the source does not provide (truncated or other variant?)", k)
    errors.raise_if_any(source_name)
    return out


# ----------------------------------------------------------------------------- reading sources


def load_torch_checkpoint(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    ``mmap=True`` leaves tensor data on disk until each tensor is touched, so a 2.5 GB
    vit_h checkpoint converts without a second copy in memory.
    """
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        if mmap and "mmap" in str(e):
            return load_torch_checkpoint(path, mmap=False)  # legacy (non-zip) format
        # torch's own message for a file that is not plain tensors runs over many lines of advice about
        # weights_only; what was found is on one of them.
        import re

        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # a pickle of other objects: refused by the safe loader, not broken
            raise ConversionError(f"{path}: holds an object of type {found.group(1)}, which torch does not load "
                                  f"safely (weights_only=True); is it a model checkpoint? (a state_dict of tensors "
                                  f"is)") from e
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)
        first = (" ".join(detail.group(1).split()[:12]) if detail
                 else next((line.strip() for line in text.splitlines() if line.strip()), ""))
        raise ConversionError(
            f"{path}: not a readable PyTorch checkpoint (truncated or not a torch.save file?): "
            f"{type(e).__name__}: {first[:300]}") from e


def unwrap_state_dict(obj: Any, *, path: str, nested_keys: Sequence[str] = ("state_dict", "model"),
                      strip_prefixes: Sequence[str] = ("module.",)) -> dict[str, Any]:
    """Finds the tensor dict inside a loaded checkpoint and strips DDP-style prefixes."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in nested_keys if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise ConversionError(f"{path}: does not contain a state_dict (found {type(obj).__name__}"
                              f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, Mapping) else ''})")
    out = {}
    for k, v in obj.items():
        for p in strip_prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _is_tensor_dict(d: Mapping) -> bool:
    return len(d) > 0 and all(hasattr(v, "shape") for v in d.values())


class SafetensorsDict(Mapping):
    """A lazy ``{key: array}`` view over one or more safetensors files (tensors read on access).

    Tensors are read with numpy; bfloat16 ones (numpy has no such dtype) through torch.
    """

    def __init__(self, files: Sequence[str]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        for file in files:
            try:
                handle = safe_open(file, framework="np")
                keys = list(handle.keys())
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise ConversionError(f"{file}: not a readable safetensors file (truncated?): {e}") from e
            self._handles[(file, "np")] = handle
            for key in keys:
                self._where[key] = file

    def _handle(self, file: str, framework: str) -> Any:
        if (file, framework) not in self._handles:
            from safetensors import safe_open

            self._handles[(file, framework)] = safe_open(file, framework=framework)
        return self._handles[(file, framework)]

    def __getitem__(self, key: str) -> Any:
        file = self._where[key]
        try:
            return self._handle(file, "np").get_tensor(key)
        except Exception as np_error:  # noqa: BLE001
            try:
                return self._handle(file, "pt").get_tensor(key)
            except Exception:  # noqa: BLE001
                raise ConversionError(f"{file}: tensor {key} cannot be read (truncated file?): {np_error}") \
                    from np_error

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_state_dict(directory: str, model_class: str) -> Mapping[str, Any]:
    """The state_dict of a transformers model directory (``model.safetensors``, ``pytorch_model.bin`` or their
    sharded ``.index.json`` forms); safetensors tensors are read lazily. ``model_class`` (e.g. ``"CLIPModel"``)
    names what the directory should hold in the error for a directory without weights."""
    files, kind = None, None
    for index, index_kind in (("model.safetensors.index.json", "safetensors"),
                              ("pytorch_model.bin.index.json", "bin")):
        index_path = os.path.join(directory, index)
        if os.path.exists(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files, kind = [os.path.join(directory, shard) for shard in shards], index_kind
            break
    else:
        for name, file_kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
            if os.path.exists(os.path.join(directory, name)):
                files, kind = [os.path.join(directory, name)], file_kind
                break
    if files is None:
        raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (a transformers "
                                f"{model_class} directory holds config.json and one of these)")
    if kind == "safetensors":
        return SafetensorsDict(files)
    state_dict: dict[str, Any] = {}
    for file in files:
        state_dict.update(unwrap_state_dict(load_torch_checkpoint(file), path=file))
    return state_dict


# ----------------------------------------------------------------------------- converted files


def save_weights(path: str | os.PathLike, weights: Mapping[str, Array], metadata: Mapping[str, str]) -> None:
    """Writes converted weights as safetensors, atomically (a partial file is never visible)."""
    from safetensors.numpy import save_file

    meta = {FORMAT_KEY: FORMAT_VERSION, **{k: str(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        try:
            save_file({k: np.require(v, requirements="C") for k, v in weights.items()}, tmp, metadata=meta)
        except Exception as e:  # safetensors reports a failed write as its own error type, errno in the text
            found = re.search(r"os error (\d+)", str(e))
            if found:
                code = int(found.group(1))
                raise OSError(code, os.strerror(code), os.fspath(path)) from e
            raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ConversionError(f"{path}: not a readable safetensors file: {e}") from None


def read_stored_config(path: str | os.PathLike, model_name: str, config_type: Any) -> Any:
    """The model config a converted file stores (``config_type.from_json`` of its ``zsp_jax.config``), after
    checking that its ``zsp_jax.model`` is ``model_name``; no tensor is read."""
    meta = read_metadata(path)
    if meta.get("zsp_jax.model") != model_name:
        raise ConversionError(f"{path}: zsp_jax.model is {meta.get('zsp_jax.model')!r}, expected {model_name!r} "
                              f"(not a converted zsp_jax {model_name} file)")
    return config_type.from_json(meta["zsp_jax.config"])


def load_weights(path: str | os.PathLike, *, expect: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, Array], dict[str, str]]:
    """Reads a file written by ``save_weights``. Needs neither torch nor a model.

    Args:
      path: the ``.safetensors`` file.
      expect: metadata entries that must be present with these values (e.g.
        ``{"zsp_jax.model": "sam"}``); a mismatch raises and names both values.

    Returns:
      (weights, metadata).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file (truncated?): {e}") from e
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ConversionError(f"{path}: not a zsp_jax weights file (metadata {FORMAT_KEY}="
                              f"{metadata.get(FORMAT_KEY)!r}); convert it with the tools/convert_*.py scripts")
    for k, v in (expect or {}).items():
        if metadata.get(k) != v:
            raise ConversionError(f"{path}: {k} is {metadata.get(k)!r}, expected {v!r}")
    return weights, metadata


def assign_weights(model: nnx.Module, weights: Mapping[str, Array], *, source_name: str,
                   dtype: Any = None) -> nnx.Module:
    """Loads ``weights`` into ``model`` in place, strictly (same keys, same shapes).

    Args:
      model: a concrete NNX model.
      weights: as returned by ``load_weights`` or ``convert_state_dict``.
      source_name: for error messages.
      dtype: if given, floating parameters are cast to it (e.g. ``jnp.bfloat16``); batch
        statistics stay in float32.
    """
    expected = flat_shapes(model)
    errors = _Errors()
    for k in expected:
        if k not in weights:
            errors.add("model weights missing from the file", k)
        elif tuple(weights[k].shape) != tuple(expected[k].shape):
            errors.add("shape mismatches (file, model)", f"{k}: {tuple(weights[k].shape)} vs {expected[k].shape}")
    for k in weights:
        if k not in expected:
            errors.add("weights in the file that the model does not have", k)
    errors.raise_if_any(source_name)
    state = nnx.state(model, weight_filter())
    for path, var in nnx.to_flat_state(state):
        value = weights[_path_key(path)]
        is_param = isinstance(var, nnx.Param) or getattr(var, "type", None) is nnx.Param
        target = dtype if (dtype is not None and is_param and np.asarray(value).dtype.kind == "f") \
            else var.get_value().dtype
        var.set_value(jnp.asarray(value, dtype=target))
    nnx.update(model, state)
    return model


def build_with_weights(ctor: Callable[[], nnx.Module], weights: Mapping[str, Array], *, source_name: str,
                       dtype: Any = None) -> nnx.Module:
    """Constructs ``ctor()`` without running its random initialisers, then loads ``weights``.

    Non-weight state (RNG streams of dropout layers, counters) is still initialised, inside a
    ``jax.jit`` whose unused parameter initialisers XLA prunes.
    """
    abstract = nnx.eval_shape(ctor)
    graphdef, params, rest = nnx.split(abstract, weight_filter(), ...)
    if jax.tree.leaves(rest):
        rest = jax.jit(lambda: nnx.split(ctor(), weight_filter(), ...)[2])()
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    model = nnx.merge(graphdef, params, rest)
    return assign_weights(model, weights, source_name=source_name, dtype=dtype)


def initialisation_key(seed: int) -> jax.Array:
    """The key a model's own initialisers draw from. XLA:CPU compiles the threefry generator slowly (one
    program per parameter shape); an "rbg" key makes a jitted initialisation a few seconds, and any generator
    gives a valid random initialisation."""
    return jax.random.key(seed, impl="rbg")


def build_initialised(ctor: Callable[[jax.Array], nnx.Module], seed: int) -> nnx.Module:
    """``ctor(key)`` with its own initialisers, run as one jitted program (not one per parameter shape).

    Args:
      ctor: builds the model from an initialisation key (its ``nnx.Rngs`` streams drawn from it).
      seed: the key's seed (``initialisation_key``).
    """
    key = initialisation_key(seed)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ctor(key)))
    return nnx.merge(graphdef, jax.jit(lambda k: nnx.state(ctor(k)))(key))


def build_with_random_weights(ctor: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
    """``ctor()`` with random float32 weights drawn by numpy instead of its own initialisers.

    Arrays of 2 or more axes from N(0, 1 / fan_in) (fan_in: the product of all but the last axis), 1-axis
    ``scale``s from 1 + N(0, 0.1^2), BatchNorm ``var``s from 1 + |N(0, 0.1^2)| (positive), other vectors and
    scalars from N(0, 0.02^2): finite weights of a sensible scale, for programs whose cost or plumbing, not
    whose values, matter (random checkpoints, device checks).
    The models' own initialisers are not used because, run as JAX programs, they cost XLA:CPU about half a
    minute of compilation for the tiny SAM and CLIP (one program per parameter shape eagerly, one large
    program jitted); numpy draws them in well under a second.
    """
    rng = np.random.default_rng(seed)
    drawn = {}
    for key, shape in flat_shapes(nnx.eval_shape(ctor)).items():
        noise = rng.standard_normal(shape.shape, dtype=np.float32)
        if len(shape.shape) >= 2:
            drawn[key] = noise / np.float32(np.sqrt(np.prod(shape.shape[:-1])))
        elif key.endswith("scale"):
            drawn[key] = 1 + np.float32(0.1) * noise
        elif key.endswith("var"):
            drawn[key] = 1 + np.float32(0.1) * np.abs(noise)
        else:
            drawn[key] = np.float32(0.02) * noise
    return build_with_weights(ctor, drawn, source_name="random weights")
