"""The main job's XLA:CPU flags: added once, never over the user's own setting, and switched off by
ZSP_JAX_CPU_XLA_FLAGS=0."""

from zsp_jax import runtime


def test_cpu_flags_are_added_once_and_respect_the_user(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv(runtime.CPU_XLA_FLAGS_ENV, raising=False)
    added = runtime.set_cpu_xla_flags()
    assert added == " ".join(runtime.CPU_XLA_FLAGS)
    import os

    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=2 ") and runtime.CPU_XLA_FLAGS[0] in flags
    assert runtime.set_cpu_xla_flags() == "" and os.environ["XLA_FLAGS"] == flags  # not twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=all")
    assert runtime.set_cpu_xla_flags() == "" and os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=all"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(runtime.CPU_XLA_FLAGS_ENV, "0")
    assert runtime.set_cpu_xla_flags() == "" and os.environ["XLA_FLAGS"] == ""
