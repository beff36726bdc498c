"""Which persistent compilation cache a run uses: the configured one, then JAX's own, then the fallback."""

import os


def test_the_compile_cache_is_the_configured_one_then_jaxs_own_then_the_fallback(tmp_path):
    import subprocess
    import sys

    from zsp_jax.runtime import compile_cache_path

    users_cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # set by tests/conftest.py before JAX started
    assert compile_cache_path(str(tmp_path / "given"), "fallback") == str(tmp_path / "given")
    assert compile_cache_path("", "fallback") == users_cache
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    r = subprocess.run([sys.executable, "-c", "from zsp_jax.runtime import compile_cache_path; "
                        "print(compile_cache_path('', 'fallback'))"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "fallback", r.stderr[-2000:]
