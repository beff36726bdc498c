"""Test-suite set-up shared by every test.

* 8 simulated CPU devices (set before jax is imported), so that sharded code is tested on a
  real multi-device mesh and compared with a 1-device mesh in the same process. Measured on
  the 2-core development machine: single-device code runs no slower with 8 devices declared.
* fp32 matmuls at full precision for parity (a no-op on CPU, matters on GPU/TPU).
* absl flags marked parsed: grain's multiprocess workers read absl flags.
* the torchvision stand-in, so that segment-anything, open_clip and gem_torch import.
* no hub access: transformers and huggingface_hub are told to stay offline.
* under pytest-xdist ``make test`` runs 2 workers with ``--dist loadfile``: the tests of one file stay in one
  worker, so its module fixtures are built once. (``loadgroup`` would be the natural choice, but pytest-xdist
  3.8 cannot tag node ids under pytest 9, so its groups silently fall back to per-test scheduling.)
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
flags.FLAGS.mark_as_parsed()

from zsp_jax.references import torchvision_stub  # noqa: E402

torchvision_stub.install()


@pytest.fixture(scope="session")
def num_devices() -> int:
    return jax.device_count()

