"""SAM under jax.jit with the batch sharded over a device mesh (8 simulated CPU devices) equals one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zsp_jax.references import sam as sam_refs
from zsp_jax.utils.bench import relative_error


def test_embed_and_decode_sharded_over_eight_devices(tiny_config, tiny_pair, num_devices):
    _, model = tiny_pair
    s = tiny_config.image_size
    b = num_devices
    rng = np.random.default_rng(0)
    images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    coords, labels, boxes, _ = sam_refs.random_prompts(rng, b, 4, 2, s)
    graphdef, state = nnx.split(model)

    def run(state, images, coords, labels, boxes):
        m = nnx.merge(graphdef, state)
        return m.decode(m.embed(images), coords, labels, boxes, multimask_output=True)

    single = jax.jit(run)(state, images, coords, labels, boxes)
    mesh = Mesh(np.array(jax.devices()).reshape(b), ("data",))
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(run, in_shardings=(replicated, data, data, data, data), out_shardings=data)
    args = [jax.device_put(x, data) for x in (images, coords, labels, boxes)]
    sharded = fn(jax.device_put(state, replicated), *args)
    assert len(sharded[0].sharding.device_set) == b
    for x, y in zip(sharded, single):
        assert x.shape == y.shape
        assert relative_error(x, y) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(sharded[0])))
