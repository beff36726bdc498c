"""Shared set-up of the trainer tests.

* One persistent XLA compilation cache for the session (its subprocesses too): the same train step
  is compiled once, not once per test or per process (compilation dominates these tests on a CPU).
* ``smoke_config``: ``configs/smoke.py`` pointed at a generated dataset (plain files, no workers).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import jax
import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="zsp_jax_test_cache_"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def compilation_cache() -> str:
    return _CACHE


def smoke_config(workdir: str, root: str, splits_dir: str, *, split: str, arg: str = "source=folder,workers=0",
                 pseudo_labels: str = "") -> ml_collections.ConfigDict:
    """``configs/smoke.py:<arg>`` on the VOC-layout dataset at ``root`` with its splits in ``splits_dir``
    (already written: the config's ``synthetic`` section is dropped)."""
    spec = importlib.util.spec_from_file_location("smoke_config", os.path.join(REPO, "configs", "smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    del c["synthetic"]
    c.workdir = workdir
    c.data.root, c.data.splits_dir, c.data.split = root, splits_dir, split
    c.data.tfds_dir = os.path.join(workdir, "tfds")
    c.data.pseudo_labels = pseudo_labels
    return c
