"""Shared set-up of the UniMatch V2 trainer tests: one persistent XLA compilation cache for the session and its
subprocesses (as ``tests/train/conftest.py``; the same directory when both run), and the environment of the
subprocess runs."""

from __future__ import annotations

import os
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="zsp_jax_test_cache_"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# XLA:CPU at -O0 (the same programs, LLVM unoptimised): compilation dominates these runs of tiny models, and it
# halves; every run a test compares with another uses the same flags, so bit-exact comparisons still hold.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a ``python -m zsp_jax...`` run: ``devices`` CPU devices, fast compilation, the shared
    compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_XLA_FLAGS}"
    return env
