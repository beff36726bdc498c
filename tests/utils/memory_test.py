"""``zsp_jax.utils.memory``: the one-line fit report the trainer prints before its first step (the budget's
sources are tested with the labeller's sizes, tests/label/sizes_test.py)."""

import jax
import jax.numpy as jnp

from zsp_jax.train import loop
from zsp_jax.utils.memory import GIB, MemoryBudget, describe_fit, estimated_bytes


def test_estimate_and_fit_lines_of_a_compiled_program():
    compiled = jax.jit(lambda x: (x @ x).sum()).lower(jnp.ones((256, 256), jnp.float32)).compile()
    estimate = estimated_bytes(compiled)
    assert estimate is not None and estimate >= 256 * 256 * 4  # at least its argument
    roomy = MemoryBudget(64 * GIB, 0.9, "a test", "train.batch_size")
    assert describe_fit("the step", estimate, roomy, "advice").startswith("memory: the step fits")
    tight = MemoryBudget(estimate, 0.5, "a test", "train.batch_size")
    line = describe_fit("the step", estimate, tight, "try a smaller train.batch_size")
    assert "may not fit" in line and line.endswith("try a smaller train.batch_size") and "\n" not in line
    assert "no XLA estimate" in describe_fit("the step", None, roomy, "advice")


def test_the_trainers_advice_names_only_fields_that_can_still_shrink_memory():
    from tests.train.conftest import smoke_config  # noqa: PLC0415

    config = smoke_config("/tmp/unused", "/tmp/unused", "/tmp/unused", split="1_4")
    advice = loop.memory_advice(config)
    assert "train.batch_size" in advice and "model.dtype=bfloat16" in advice and "train.fsdp" in advice
    config.model.dtype = "bfloat16"
    assert "model.dtype" not in loop.memory_advice(config)
