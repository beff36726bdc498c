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
* one persistent XLA compilation cache for the whole session, its workers and the subprocesses they start
  (``JAX_COMPILATION_CACHE_DIR``; a fixed folder under the system's temporary directory unless set): a
  program compiled by one test is loaded, not recompiled, by the next (compilation dominates on a CPU).
* the longest files are collected first (``LONGEST_FIRST``), so that the two workers finish together.
* ``slow``: whole-job runs in subprocesses, kill-and-resume and multi-process tests and real-size models;
  ``make test-fast`` leaves them out (``make test``, what CI runs, runs everything).
"""

import os
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "zsp_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


SLOW_PATHS = ("tests/e2e/", "tests/train/modes_test.py", "tests/train/relabel_test.py", "tests/train/resume_test.py",
              "tests/train_v2/modes_test.py", "tests/train_v2/main_test.py", "tests/tools/device_check_test.py")

# The longest files first (minutes each on the 2-core CI machine), so that no worker is left with one of them
# while the other has finished: pytest-xdist hands out files in collection order
# (with --no-loadscope-reorder, as the Makefile runs it). tests/e2e/main_test.py builds
# the smoke run that tests/e2e/multiprocess_test.py compares with, so the second comes after a long file of the
# other worker's rather than waiting on the first's lock.
LONGEST_FIRST = ("tests/e2e/main_test.py", "tests/train_v2/modes_test.py", "tests/train_v2/main_test.py",
                 "tests/train/train_test.py",
                 "tests/e2e/multiprocess_test.py", "tests/train/modes_test.py",
                 "tests/deeplab/deeplab_parity_test.py", "tests/parity/command_test.py")


def _file_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.nodeid.startswith(SLOW_PATHS) or "sigkill" in item.name or "kill" in item.name.split("_")
                or item.get_closest_marker("full_size")):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_file_rank)  # stable: the order inside a file, and of the other files, is kept
