"""Dense features and text encoding under jit with inputs sharded over an 8-device mesh."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zsp_jax.models.clip import GemConfig, dense_features_fn, encode_text_fn
from zsp_jax.references import clip as clip_refs


def test_dense_features_sharded_equals_single_device(tiny_open_clip, num_devices):
    _, converted = tiny_open_clip
    model = converted.build()
    images = clip_refs.random_images(num_devices, 48, 48, seed=3)
    dense = dense_features_fn(model, GemConfig(depth=3), normalize=True)
    single = jax.device_get(dense(jax.device_put(images, jax.devices()[0])))

    mesh = Mesh(np.array(jax.devices()).reshape(num_devices), ("data",))
    sharded_in = jax.device_put(images, NamedSharding(mesh, P("data")))
    out = dense(sharded_in)
    assert len(out.tokens.sharding.device_set) == num_devices
    for a, b in zip(jax.device_get(out), single):
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # each image is independent of the others in its batch (no cross-batch mixing)
    one = jax.device_get(dense(images[3:4]))
    np.testing.assert_allclose(one.tokens[0], single.tokens[3], rtol=1e-5, atol=1e-6)


def test_encode_text_sharded(tiny_open_clip, tokenizer, num_devices):
    _, converted = tiny_open_clip
    ids = tokenizer([f"a photo of a {c}." for c in clip_refs.VOC_CLASSES[:num_devices]])
    encode = encode_text_fn(converted.build())
    single = np.asarray(encode(ids))
    mesh = Mesh(np.array(jax.devices()).reshape(num_devices), ("data",))
    np.testing.assert_allclose(np.asarray(encode(jax.device_put(ids, NamedSharding(mesh, P("data"))))), single,
                               rtol=1e-5, atol=1e-6)
