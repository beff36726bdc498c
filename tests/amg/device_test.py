"""A device-only input path (crops resized on device) + generate_padded under jit, sharded with GSPMD; the
device normalisation of uint8 crops."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from zsp_jax.amg import AmgInputs, AmgOptions, AutomaticMaskGenerator, Bucket, Plan, data_mesh, generate_padded
from zsp_jax.amg.decoder import point_decoder
from zsp_jax.amg.geometry import crop_plan
from zsp_jax.amg.inputs import encoder_input, prepare_inputs
from zsp_jax.models.sam.transforms import normalize_and_pad
from zsp_jax.references.amg import mask_iou_matrix, sample_images

SIZES = [(150, 200), (140, 230), (180, 256), (129, 193), (192, 240), (160, 210), (135, 250), (170, 199)]


def crop_geometry(image_hws, plan):
    """Host: per layer, the (B, C_i, 4) crop boxes and (B, C_i, 2) resized crop sizes of B image sizes."""
    o = plan.options
    per_image = [crop_plan((int(h), int(w)), o.crop_n_layers, o.crop_overlap_ratio, plan.image_size)
                 for h, w in np.asarray(image_hws)]
    boxes = tuple(np.stack([p[i][0] for p in per_image]).astype(np.int32) for i in range(len(plan.layers)))
    sizes = tuple(np.stack([p[i][1] for p in per_image]).astype(np.int32) for i in range(len(plan.layers)))
    return boxes, sizes


def _crop_resize(image, box, in_hw, canvas, plan):
    """One crop of one (Hb, Wb, 3) image -> the normalised, zero-padded (S, S, 3) encoder input."""
    s = plan.image_size
    ch, cw = canvas
    crop_h, crop_w = box[3] - box[1], box[2] - box[0]
    padded = jnp.pad(image.astype(jnp.float32), ((0, ch), (0, cw), (0, 0)), mode="edge")
    region = jax.lax.dynamic_slice(padded, (box[1], box[0], 0), (ch, cw, 3))
    # Replicate the crop's last row / column beyond it, so the filter never reads outside the crop.
    region = region[jnp.minimum(jnp.arange(ch), crop_h - 1)][:, jnp.minimum(jnp.arange(cw), crop_w - 1)]
    scale = jnp.stack([in_hw[0] / crop_h, in_hw[1] / crop_w]).astype(jnp.float32)
    resized = jax.image.scale_and_translate(region, (s, s, 3), (0, 1), scale, jnp.zeros(2, jnp.float32),
                                            method="linear", antialias=True)
    x = normalize_and_pad(jnp.clip(jnp.round(resized), 0, 255), s)
    inside = (jnp.arange(s)[:, None] < in_hw[0]) & (jnp.arange(s)[None, :] < in_hw[1])
    return jnp.where(inside[..., None], x, 0.0)


def device_inputs(images, image_hw, crop_boxes, input_hw, plan):
    """``AmgInputs`` built on device for (B, Hb, Wb, 3) images at the top-left of the bucket canvas.

    Crops are resized with an antialiased triangle filter (``jax.image.scale_and_translate``) in
    float arithmetic instead of PIL's 8-bit fixed point, so the encoder inputs differ from the
    reference's (``prepare_inputs``) by about one grey level on some pixels."""
    layers = []
    for i in range(len(plan.layers)):
        canvas = plan.bucket.layer_canvas(i, plan.options.crop_overlap_ratio)
        fn = jax.vmap(jax.vmap(lambda box, hw, img: _crop_resize(img, box, hw, canvas, plan), (0, 0, None)))
        layers.append(fn(crop_boxes[i], input_hw[i], images))
    return AmgInputs(tuple(layers), tuple(crop_boxes), tuple(input_hw), image_hw)


def test_device_inputs_close_to_pil(tiny_config):
    options = AmgOptions(points_per_side=4, crop_n_layers=1)
    images = sample_images(SIZES[:2])
    plan = Plan.create(options, tiny_config.image_size, Bucket.for_size(SIZES[0], options.bucket))
    host = prepare_inputs(images, plan)
    canvas = np.zeros((2, plan.bucket.height, plan.bucket.width, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    boxes, sizes = crop_geometry(host.image_hw, plan)
    for a, b in zip(boxes + sizes, host.crop_boxes + host.input_hw):
        np.testing.assert_array_equal(a, b)
    dev = jax.jit(device_inputs, static_argnums=4)(jnp.asarray(canvas), jnp.asarray(host.image_hw), boxes, sizes, plan)
    std = np.asarray(tiny_config.pixel_std)
    for d, h in zip(dev.images, host.images):
        grey = np.abs(np.asarray(d) - h) * std  # in 0..255 grey levels
        assert grey.max() <= 1.5 and grey.mean() <= 0.25


def test_jitted_device_pipeline_sharded(sam_pair, tiny_config):
    _, model = sam_pair
    options = AmgOptions(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                         stability_score_offset=0.05, box_nms_thresh=1.0, max_masks=48)
    images = sample_images(SIZES)
    plan = Plan.create(options, tiny_config.image_size, Bucket.for_size(SIZES[0], options.bucket))
    canvas = np.zeros((8, plan.bucket.height, plan.bucket.width, 3), np.uint8)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
    hw = np.asarray(SIZES, np.int32)
    boxes, sizes = crop_geometry(hw, plan)
    mesh = data_mesh(jax.devices()[:8])
    shard = NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, canvas, hw, boxes, sizes):
        m = nnx.merge(graphdef, state)
        inputs = device_inputs(canvas, hw, boxes, sizes, plan)
        return generate_padded(m.embed, point_decoder(m), inputs, plan, return_low_res=True)

    out = run(jax.device_put(state, NamedSharding(mesh, P())), *jax.device_put((canvas, hw, boxes, sizes), shard))
    assert len(out.masks.sharding.device_set) == 8
    assert out.low_res_logits.shape == (8, 48, tiny_config.low_res_size, tiny_config.low_res_size)
    host, _ = AutomaticMaskGenerator(model, options, mesh=mesh, batch_size=8).generate_padded(images)
    out, host = jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, host)
    for b in range(8):
        assert out.valid[b].sum() == host.valid[b].sum() == 48
        iou = mask_iou_matrix(out.masks[b], host.masks[b])
        # Inputs differ by up to a grey level (float resampling vs PIL): nearly the same masks.
        assert np.mean(iou.max(axis=1) >= 0.98) >= 0.9


def test_uint8_inputs_normalised_on_device_equal_host_normalisation(sam_pair, tiny_config):
    """prepare_inputs(as_uint8=True) + inputs.encoder_input gives the float inputs bit for bit."""
    options = AmgOptions(points_per_side=4, crop_n_layers=1)
    images = sample_images(SIZES[:2])
    plan = Plan.create(options, tiny_config.image_size, Bucket.for_size(SIZES[0], options.bucket))
    as_float = prepare_inputs(images, plan)
    as_u8 = prepare_inputs(images, plan, as_uint8=True)
    for f, u, hw in zip(as_float.images, as_u8.images, as_u8.input_hw):
        assert u.dtype == np.uint8
        b, c = u.shape[:2]
        dev = jax.jit(encoder_input, static_argnums=2)(u.reshape((b * c,) + u.shape[2:]), hw.reshape(b * c, 2),
                                                      tiny_config.image_size)
        np.testing.assert_array_equal(np.asarray(dev).reshape(f.shape), f)
