"""UniMatch's poly learning rate, as both trainer families (V1's SGD, V2's AdamW) set it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> optax.Schedule:
    """UniMatch's per-iteration poly learning rate as a function of the optimiser step count k.

    The reference sets ``lr = base (1 - i / total) ** 0.9`` *after* step i, for the next step,
    so steps 0 and 1 both run at ``base`` and step k >= 1 at ``base (1 - (k - 1) / total) ** power``.
    """
    total = float(max(total_steps, 1))

    def schedule(count: jax.Array) -> jax.Array:
        # Weakly typed arithmetic: the rate is float64 under jax_enable_x64 (fp64 parity), else float32.
        done = jnp.maximum(jnp.asarray(count) - 1, 0)
        return base_lr * jnp.maximum(1.0 - done / total, 0.0) ** power

    return schedule
