"""Softmax attention for SAM and CLIP/GEM, one entry point with a choice of implementation.

``dot_product_attention(q, k, v, attention=..., ...)`` computes softmax(scale * q k^T + bias,
masked) v with float32 logits and softmax whatever the compute dtype. Its operands have the
layout of ``jax.nn.dot_product_attention``, queries (B, T, N, H) and keys/values (B, S, N, H) (a
projection's output reshaped, no transpose), or heads first, (B, N, T, H), with
``heads_first=True``: the einsum form's own layout, which callers choose where
``heads_first(attention)`` says so, so that neither layout is transposed into the other around
every attention. ``attention`` selects how:

* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``.
* ``"cudnn"``: the same call with ``implementation="cudnn"``: cuDNN's fused (flash) attention
  on NVIDIA GPUs. It takes float16/bfloat16 inputs only and head dims that are a multiple of 8
  and at most 128 (256 from Hopper on); asked for explicitly where it cannot run, it raises a
  ``ValueError`` that names the option.
* ``"einsum"``: two einsums around a float32 softmax on heads-first operands. Kept because it
  is the fastest form on CPU, where XLA runs the batched matmuls of
  ``jax.nn.dot_product_attention``'s (B, T, N, H) layout with relayouts around each of them
  (see ``CPU_DEFAULT``).
* ``"auto"``: by backend (``resolve_attention``): cuDNN on CUDA GPUs, wherever it applies, and
  XLA where it does not (float32 compute, an unsupported head dim, or any refusal of JAX's
  cuDNN path while tracing); XLA on TPU; ``CPU_DEFAULT`` on CPU.

Per-example scales (GEM's inverse temperatures, shape (B,)) are multiplied into the queries
before ``jax.nn.dot_product_attention``, whose ``scale`` is a Python number; the einsum form
multiplies the logits, as before. Both agree to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum")

# "auto" on CPU: the einsum form measured faster there than jax.nn.dot_product_attention(implementation=
# "xla") on whole SAM and CLIP/GEM forwards (fp32, same inputs; docs/benchmarks.md).
CPU_DEFAULT = "einsum"

_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def check_attention(attention: str, name: str = "attention") -> str:
    """Raises a ``ValueError`` naming ``name`` unless ``attention`` is one of ``ATTENTION_CHOICES``."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"{name}={attention!r}: expected one of {list(ATTENTION_CHOICES)}")
    return attention


def resolve_attention(attention: str, backend: str | None = None) -> str:
    """The implementation an ``attention`` option selects on a backend: ``"xla"``, ``"cudnn"`` or ``"einsum"``.

    Args:
      attention: one of ``ATTENTION_CHOICES``.
      backend: a JAX platform name (``"cpu"``, ``"gpu"``/``"cuda"``, ``"rocm"``, ``"tpu"``);
        None = ``jax.default_backend()``.

    ``"auto"`` gives ``"cudnn"`` on NVIDIA GPUs (``dot_product_attention`` still falls back to
    XLA per call where cuDNN does not apply), ``"xla"`` on TPU and other backends, and
    ``CPU_DEFAULT`` on CPU. Other values are returned as they are.
    """
    check_attention(attention)
    if attention != "auto":
        return attention
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda"):
        return "cudnn"
    if backend == "cpu":
        return CPU_DEFAULT
    return "xla"


def heads_first(attention: str) -> bool:
    """Whether ``attention`` resolves, on this process's backend, to the einsum form, whose operands are heads first."""
    return resolve_attention(attention) == "einsum"


def _cuda_max_head_dim() -> int | None:
    """cuDNN's largest head dim on this process's GPU (256 from Hopper on, else 128); None without a CUDA GPU."""
    try:
        backend = jax.extend.backend.get_backend()
        if "cuda" not in backend.platform_version:
            return None
        capability = getattr(jax.local_devices(backend="gpu")[0], "compute_capability", "0.0")
    except RuntimeError:  # no GPU backend in this process
        return None
    major = int(str(capability).split(".")[0])
    return 256 if major >= 9 else 128


def cudnn_unsupported_reason(dtype: Any, head_dim: int, max_head_dim: int | None) -> str | None:
    """Why cuDNN's fused attention cannot take these inputs, or None when it can.

    Args:
      dtype: the queries' (= keys' and values') dtype.
      head_dim: the operands' last axis.
      max_head_dim: the GPU's limit (``_cuda_max_head_dim``); None = no CUDA GPU.
    """
    if max_head_dim is None:
        return "no CUDA GPU in this process"
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in _CUDNN_DTYPES]:
        return f"it needs float16/bfloat16 inputs, got {jnp.dtype(dtype).name} (set the compute dtype to bfloat16)"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head dim {head_dim} is not a multiple of 8 at most {max_head_dim}"
    return None


def dot_product_attention(query: Array, key: Array, value: Array, *, attention: str, scale: float | Array,
                          bias: Array | None = None, mask: Array | None = None, is_causal: bool = False,
                          heads_first: bool = False) -> Array:
    """softmax(scale * q k^T + bias, masked) v per head, float32 logits and softmax.

    Args:
      query: (B, T, N, H), or (B, N, T, H) with ``heads_first``.
      key, value: (B, S, N, H), or (B, N, S, H) with ``heads_first``; same dtype as ``query``.
      attention: one of ``ATTENTION_CHOICES`` (module docstring).
      scale: a Python number, or a (B,) array of per-example scales (GEM's temperatures).
      bias: optional, broadcastable to (B, N, T, S), added to the scaled logits (SAM's
        relative positions).
      mask: optional boolean, broadcastable to (B, N, T, S); False = masked out.
      is_causal: query t attends to keys 0..t only (T == S).
      heads_first: the layout of the operands and the result (module docstring).

    Returns:
      (B, T, N, H), or (B, N, T, H) with ``heads_first``, in ``value``'s dtype.
    """
    impl = resolve_attention(attention)
    if impl == "cudnn":
        reason = cudnn_unsupported_reason(query.dtype, query.shape[-1], _cuda_max_head_dim())
        if reason is not None:
            if attention == "cudnn":
                raise ValueError(f"attention='cudnn' cannot run here: {reason}; use attention='auto' or 'xla'")
            impl = "xla"
    if impl == "einsum":
        if heads_first:
            return _einsum_attention(query, key, value, scale, bias, mask, is_causal)
        query, key, value = (t.swapaxes(1, 2) for t in (query, key, value))
        return _einsum_attention(query, key, value, scale, bias, mask, is_causal).swapaxes(1, 2)
    if heads_first:
        query, key, value = (t.swapaxes(1, 2) for t in (query, key, value))
        out = dot_product_attention(query, key, value, attention=attention, scale=scale, bias=bias, mask=mask,
                                    is_causal=is_causal)
        return out.swapaxes(1, 2)
    if not isinstance(scale, (int, float)):  # traced or (B,) scales: jax.nn.dot_product_attention wants a number
        per_example = jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1, 1)
        query = (query.astype(jnp.float32) * per_example).astype(query.dtype)
        scale = 1.0
    if impl == "cudnn" and bias is not None:
        bias = bias.astype(query.dtype)  # cuDNN adds the bias in the inputs' dtype

    def call(implementation: str) -> Array:
        return jax.nn.dot_product_attention(query, key, value, bias, mask, scale=float(scale), is_causal=is_causal,
                                            implementation=implementation)

    if impl == "cudnn":
        try:
            return call("cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:  # JAX's own checks while tracing
            if attention == "cudnn":
                raise ValueError(f"attention='cudnn' cannot run this attention: {e}; use attention='auto' or 'xla'"
                                 ) from e
            return call("xla")
    return call("xla")


def _einsum_attention(query: Array, key: Array, value: Array, scale: float | Array, bias: Array | None,
                      mask: Array | None, is_causal: bool) -> Array:
    """The einsum form of ``dot_product_attention`` on heads-first operands, (B, N, T|S, H) -> (B, N, T, H).

    Heads ahead of the tokens: XLA:CPU's batched matmuls want their batch axes leading. The
    softmax normalisation is applied after the value product: one division per output element
    instead of one per logit; the maximum is subtracted first, in float32.
    """
    logits = jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    logits = logits * (scale.reshape(-1, 1, 1, 1) if scale.ndim else scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = np.tril(np.ones((logits.shape[-2], logits.shape[-1]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bnts,bnsh->bnth", weights.astype(value.dtype), value)
    return (out.astype(jnp.float32) / denom).astype(value.dtype)
