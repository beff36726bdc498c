import jax


def test_eight_simulated_devices():
    assert jax.device_count() == 8


def test_references_import():
    import segment_anything  # noqa: F401
    import open_clip  # noqa: F401
    import gem  # noqa: F401
