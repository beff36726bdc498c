"""The attention dispatch (``zsp_jax.models.attention``): choice per backend, cuDNN limits and fallback,
numerics of every CPU-runnable implementation against a float64 NumPy softmax attention, and the
``label.attention`` option's validation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from zsp_jax.models import attention as attention_lib
from zsp_jax.models.attention import (
    ATTENTION_CHOICES,
    CPU_DEFAULT,
    cudnn_unsupported_reason,
    dot_product_attention,
    heads_first,
    resolve_attention,
)


def numpy_attention(q, k, v, scale, bias=None, mask=None, is_causal=False):
    """float64 softmax(scale q k^T + bias, masked) v in the (B, T, N, H) layout."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool)
    if mask is not None:
        keep &= np.broadcast_to(mask, logits.shape)
    if is_causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(keep, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("backend,expected", [("cpu", CPU_DEFAULT), ("gpu", "cudnn"), ("cuda", "cudnn"),
                                              ("rocm", "xla"), ("tpu", "xla")])
def test_auto_resolves_per_backend(backend, expected):
    assert resolve_attention("auto", backend=backend) == expected
    for explicit in ("xla", "cudnn", "einsum"):
        assert resolve_attention(explicit, backend=backend) == explicit


def test_auto_on_this_process_is_the_cpu_choice():
    assert resolve_attention("auto") == CPU_DEFAULT  # CI and the development machine have CPUs only
    assert CPU_DEFAULT in ("xla", "einsum")
    assert heads_first("auto") == (CPU_DEFAULT == "einsum")
    assert heads_first("einsum") and not heads_first("xla") and not heads_first("cudnn")


def test_invalid_value_names_the_option():
    with pytest.raises(ValueError, match=r"attention='flash': expected one of"):
        resolve_attention("flash")


def test_label_option_is_validated():
    from zsp_jax.label.classes import load_classes
    from zsp_jax.label.options import LabelOptions, default_label_config

    config = default_label_config()
    assert config.attention == "auto"
    LabelOptions.from_config(config, load_classes("voc"))
    for value in ATTENTION_CHOICES:
        config.attention = value
        LabelOptions.from_config(config, load_classes("voc"))
    config.attention = "flash"
    with pytest.raises(ValueError, match=r"label\.attention='flash'"):
        LabelOptions.from_config(config, load_classes("voc"))


@pytest.mark.parametrize("dtype,head_dim,max_head_dim,applies", [
    (jnp.bfloat16, 64, 128, True), (jnp.float16, 80, 128, True), (jnp.float32, 64, 128, False),
    (jnp.bfloat16, 12, 128, False), (jnp.bfloat16, 192, 128, False), (jnp.bfloat16, 192, 256, True),
    (jnp.bfloat16, 64, None, False)])
def test_cudnn_limits(dtype, head_dim, max_head_dim, applies):
    reason = cudnn_unsupported_reason(dtype, head_dim, max_head_dim)
    assert (reason is None) == applies


def _inputs(dtype=jnp.float32, b=2, t=6, s=6, n=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s, n, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, n, h)), dtype)
    return q, k, v


@pytest.mark.parametrize("layout", ["tokens-first", "heads-first"])
@pytest.mark.parametrize("impl", ["xla", "einsum", "auto"])
@pytest.mark.parametrize("case", ["plain", "bias", "mask", "causal", "per-example-scale", "cross"])
def test_numerics_against_float64(impl, case, layout):
    """Every CPU-runnable implementation, in both operand layouts, equals a float64 softmax attention to
    float32 rounding."""
    q, k, v = _inputs(s=9 if case == "cross" else 6)
    rng = np.random.default_rng(1)
    kwargs = {"scale": 0.35}
    if case == "bias":
        kwargs["bias"] = jnp.asarray(rng.normal(size=(2, 2, 6, 6)), jnp.float32)
    if case == "mask":  # (B, 1, 1, S): per-example key masks, as CLIP's end-of-text query uses
        kwargs["mask"] = jnp.asarray(np.arange(6)[None, None, None, :] <= np.array([2, 4])[:, None, None, None])
    if case == "causal":
        kwargs["is_causal"] = True
    if case == "per-example-scale":
        kwargs["scale"] = jnp.asarray([0.2, 1.7], jnp.float32)
    want = numpy_attention(q, k, v, **kwargs)
    if layout == "heads-first":
        got = dot_product_attention(*(t.swapaxes(1, 2) for t in (q, k, v)), attention=impl, heads_first=True,
                                    **kwargs).swapaxes(1, 2)
    else:
        got = dot_product_attention(q, k, v, attention=impl, **kwargs)
    assert got.shape == q.shape and got.dtype == jnp.float32
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def test_explicit_cudnn_fails_clearly_without_a_gpu():
    q, k, v = _inputs(jnp.bfloat16)
    with pytest.raises(ValueError, match="attention='cudnn'"):
        dot_product_attention(q, k, v, attention="cudnn", scale=0.35)


def test_auto_falls_back_to_xla_where_cudnn_does_not_apply(monkeypatch):
    """'auto' on a (pretended) GPU: float32 inputs skip cuDNN; bfloat16 inputs try it, and JAX's refusal while
    tracing (no cuDNN in this CPU process) falls back to XLA instead of failing."""
    monkeypatch.setattr(attention_lib, "resolve_attention",
                        lambda attention, backend=None: "cudnn" if attention == "auto" else attention)
    monkeypatch.setattr(attention_lib, "_cuda_max_head_dim", lambda: 128)
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = _inputs(dtype)
        got = dot_product_attention(q, k, v, attention="auto", scale=0.35, is_causal=True)
        want = dot_product_attention(q, k, v, attention="xla", scale=0.35, is_causal=True)
        assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="attention='cudnn'"):
        dot_product_attention(q, k, v, attention="cudnn", scale=0.35)
