"""Helpers for parity against PyTorch reference models."""

from __future__ import annotations

from typing import Any


def randomize_(module: Any, seed: int = 0) -> Any:
    """Fills every floating parameter and buffer of a torch module with random values, in place.

    Random init leaves many tensors constant (LayerNorm/BatchNorm affine at 1/0, BN running
    statistics at 0/1, SAM's relative-position tables and several biases at 0), so a parity
    test on that init never exercises those paths. Here:

    * a tensor whose init is not constant keeps its mean and standard deviation, so that
      activations stay in the range the architecture expects;
    * a constant tensor ``c`` becomes ``c + N(0, 0.1 * max(1, |c|))`` (LayerNorm weights
      around 1, biases and tables around 0);
    * running variances stay positive;
    * tensors holding non-finite values (e.g. a causal-mask buffer of 0 / -inf) are left alone.

    Returns the module.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or t.numel() == 0 or not bool(torch.isfinite(t).all()):
                continue
            flat = t.detach().double().flatten()
            mean, std = float(flat.mean()), float(flat.std()) if t.numel() > 1 else 0.0
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if std > 1e-8:
                new = mean + std * noise
            else:
                new = mean + 0.1 * max(1.0, abs(mean)) * noise
            if name.endswith("running_var"):
                new = new.abs() + 0.05
            t.copy_(new.to(t.dtype))
    return module
