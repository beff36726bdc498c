"""Train state, model construction, UniMatch's optimiser, the device mesh and shardings.

Two trainer families (``model.family``): ``deeplab`` (this module) and ``unimatch_v2`` (UniMatch V2's
DINOv2 + DPT segmenter, its AdamW and EMA teacher: ``zsp_jax.train.v2_state``). The run's jobs
(``model_config``, ``build_model``, ``pretrained_safetensors``, ``make_optimizer``, ``init_state``) are one
function each that dispatches on the family; the mesh and shardings are shared.

* ``TrainState``: everything a step changes (a pytree): the step count, the fp32 master
  parameters, the BatchNorm running statistics and the optimiser state. The model's graph
  (``nnx.GraphDef``) is static, and the model holds no RNG stream of its own: the train step
  derives every random draw from its ``rng`` argument folded with the step.
* ``build_model``: DeepLabV3+ for ``config.model`` (``backbone`` r50 / r101 / xception65 /
  tiny_resnet / tiny_xception), random or with an ImageNet backbone from ``model.pretrained``
  (a ``.safetensors`` from ``tools/convert_backbone.py``, or a ``.pth`` converted on first use
  and cached in ``<workdir>/converted/``, converted again when the source changes).
* ``make_optimizer``: UniMatch's SGD as optax: weight decay added to the gradient before the
  momentum (``torch.optim.SGD(weight_decay=...)``), momentum 0.9 without dampening, the poly
  schedule per iteration, and the head (ASPP, decoder, classifier) at ``head_lr_multiplier``
  times the backbone's rate through ``optax.multi_transform`` with ``param_group_labels``.
* ``make_mesh`` / ``shardings``: a ("data", "fsdp") mesh; the batch is split over both axes,
  parameters and optimiser state are replicated (``fsdp`` = 1, the default) or split
  FSDP-style over ``fsdp`` along their largest divisible axis.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsp_jax.models.deeplab import DeepLabConfig, DeepLabV3Plus, param_group_labels
from zsp_jax.models.deeplab import convert as deeplab_convert
from zsp_jax.models.deeplab.layers import ChannelDropout
from zsp_jax.train.schedule import poly_schedule
from zsp_jax.utils.converted_files import convert_once, converted_path
from zsp_jax.utils.weights import build_initialised, initialisation_key

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch is split over every device
BACKBONES = ("r50", "r101", "xception65", "tiny_resnet", "tiny_xception")
FAMILIES = ("deeplab", "unimatch_v2")
ENCODERS = ("s", "b", "l", "g", "tiny")  # model.encoder of the unimatch_v2 family
V2_PATCH = 14  # DINOv2's patch: V2's crops and evaluation sizes are multiples of it
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """What one train step reads and writes.

    Attributes:
      step: () int32, optimiser steps taken so far.
      params: ``nnx.State`` of the model's ``nnx.Param`` (fp32 master weights, also under bf16 compute).
      batch_stats: ``nnx.State`` of the BatchNorm running mean / variance (fp32).
      opt_state: the optax state (momentum buffers, schedule counts).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ----------------------------------------------------------------------------------------- model


def family(config: ml_collections.ConfigDict) -> str:
    """``model.family``: ``deeplab`` (also for configs without the field or the section) or ``unimatch_v2``."""
    name = config.model.get("family", "deeplab") if "model" in config else "deeplab"
    if name not in FAMILIES:
        raise ValueError(f"config field model.family={name!r}: expected one of {list(FAMILIES)}")
    return name


def model_config(config: ml_collections.ConfigDict) -> Any:
    """The model's config for ``config.model`` with ``data.num_classes`` classes: a ``DeepLabConfig``, or for
    ``unimatch_v2`` a ``DptConfig`` (``v2_state.model_config_v2``)."""
    if family(config) == "unimatch_v2":
        from zsp_jax.train import v2_state

        return v2_state.model_config_v2(config)
    m = config.model
    kw: dict[str, Any] = {"num_classes": config.data.num_classes, "output_stride": m.get("output_stride", 16)}
    stem = m.get("stem", "deep")
    if m.backbone == "r50":
        return DeepLabConfig.resnet50(stem=stem, **kw)
    if m.backbone == "r101":
        return DeepLabConfig.resnet101(stem=stem, **kw)
    if m.backbone == "xception65":
        return DeepLabConfig.xception65(**kw)
    if m.backbone == "tiny_resnet":
        return DeepLabConfig.tiny_resnet(resnet_stem=stem, **kw)
    if m.backbone == "tiny_xception":
        return DeepLabConfig.tiny_xception(**kw)
    raise ValueError(f"config field model.backbone={m.backbone!r}: expected one of {list(BACKBONES)}")


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    name = config.model.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"config field model.dtype={name!r}: expected one of {list(DTYPES)}")
    return DTYPES[name]


def strip_rng_streams(model: DeepLabV3Plus) -> DeepLabV3Plus:
    """Removes the model's own dropout RNG stream: every draw must then come from the step's ``rng``
    (a model call with ``need_fp=True`` and no ``rngs=`` / ``fp_masks=`` raises)."""
    model.perturb = ChannelDropout(model.perturb.rate, rngs=None)
    return model


def random_model(dl_config: DeepLabConfig, seed: int, *, dtype: Any = None) -> DeepLabV3Plus:
    """DeepLabV3+ with UniMatch's random initialisation (kaiming fan-out backbone, PyTorch-default head),
    built in one jitted call, without an RNG stream."""
    return strip_rng_streams(build_initialised(
        lambda key: DeepLabV3Plus(dl_config, dtype=dtype, rngs=nnx.Rngs(params=key, dropout=key)), seed))


def pretrained_safetensors(path: str, workdir: str, model_cfg: Any) -> str:
    """``path`` if it is a ``.safetensors`` file, else the source converted once into
    ``<workdir>/converted/<stem>.safetensors`` (a later run, or a resume, needs no torch): a UniMatch / torchvision
    ``.pth`` for a ``DeepLabConfig``, DINOv2 weights for a ``DptConfig`` (``v2_state.pretrained_safetensors_v2``)."""
    if not isinstance(model_cfg, DeepLabConfig):
        from zsp_jax.train import v2_state

        return v2_state.pretrained_safetensors_v2(path, workdir, model_cfg)
    dl_config = model_cfg
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config field model.pretrained={path!r}: no such file (an ImageNet backbone: "
                                f".safetensors from tools/convert_backbone.py, or UniMatch's/torchvision's .pth)")
    if path.endswith(".safetensors"):
        return path

    def convert(out: str) -> None:
        deeplab_convert.save_converted(out, *deeplab_convert.convert_file(path, dl_config))

    return convert_once(path, converted_path(path, os.path.join(workdir, "converted")), convert, log=log.info)


def build_model(config: ml_collections.ConfigDict, *, workdir: str | None = None) -> tuple[nnx.Module, str]:
    """The model to train: (model without RNG stream, one line saying where its weights come from);
    ``unimatch_v2``: ``v2_state.build_model_v2``."""
    if family(config) == "unimatch_v2":
        from zsp_jax.train import v2_state

        return v2_state.build_model_v2(config, workdir=workdir, dtype=compute_dtype(config))
    dl_config = model_config(config)
    dtype = compute_dtype(config)
    pretrained = config.model.get("pretrained", "")
    if not pretrained:
        return random_model(dl_config, config.seed, dtype=dtype), f"{dl_config.variant}, random initialisation"
    path = pretrained_safetensors(pretrained, workdir or os.path.expanduser(config.workdir), dl_config)
    model, report = deeplab_convert.load_model(path, config=dl_config, dtype=dtype,
                                               rngs=nnx.Rngs(params=initialisation_key(config.seed),
                                                             dropout=initialisation_key(config.seed)))
    return strip_rng_streams(model), f"{dl_config.variant} from {path}: {report.summary()}"


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, batch_stats); raises if the model holds other state (e.g. an RNG stream). A V2
    segmenter has no BatchNorm: its ``batch_stats`` is an empty ``nnx.State``."""
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model holds state other than parameters and BatchNorm statistics: "
                         f"{list(nnx.to_flat_state(rest))[:3]} (call strip_rng_streams)")
    return graphdef, params, stats


# ------------------------------------------------------------------------------------- optimiser


def torch_sgd(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (no dampening, no Nesterov) as an optax chain:
    g += wd * p; buf = momentum * buf + g (buf = g at the first step); p -= lr * buf."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=False))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The family's optimiser for ``params`` (UniMatch's SGD; ``unimatch_v2``: V2's AdamW,
    ``v2_state.make_optimizer_v2``); returns (transformation, backbone schedule)."""
    if family(config) == "unimatch_v2":
        from zsp_jax.train import v2_state

        return v2_state.make_optimizer_v2(v2_state.optimizer_settings(config), params, total_steps,
                                          lock_backbone=config.model.get("lock_backbone", False))
    t = config.train
    schedule = poly_schedule(t.lr, total_steps, t.get("lr_power", 0.9))
    multiplier = t.head_lr_multiplier

    def head_schedule(count: jax.Array) -> jax.Array:
        return schedule(count) * multiplier

    tx = optax.multi_transform({"backbone": torch_sgd(schedule, t.momentum, t.weight_decay),
                                "head": torch_sgd(head_schedule, t.momentum, t.weight_decay)},
                               param_group_labels(params))
    return tx, schedule


def init_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation, *, family: str = "deeplab") -> Any:
    """Step 0 of a run: a ``TrainState``, or for ``unimatch_v2`` a ``v2_state.TrainStateV2`` (its EMA teacher a
    copy of the parameters; V2's segmenter has no ``batch_stats``)."""
    if family == "unimatch_v2":
        from zsp_jax.train import v2_state

        return v2_state.init_state_v2(params, tx)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))


# ----------------------------------------------------------------------------------- mesh, sharding


def make_mesh(fsdp: int = 1, devices: list[Any] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: all, in ``jax.devices()`` order, which groups
    them by process, so each process's batch rows land on its own devices).

    Built with ``jax.sharding.Mesh`` (Auto axis types): ``jax.make_mesh`` defaults to Explicit axes
    in jax 0.10, under which data-parallel weight gradients fail to shard.
    """
    devices = list(devices if devices is not None else jax.devices())
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config field train.fsdp={fsdp}: must divide the number of devices ({len(devices)})")
    return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), (DATA, FSDP))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Replicated, or (``fsdp`` > 1) split over "fsdp" along the largest axis it divides."""
    n = mesh.shape[FSDP]
    if n == 1 or not shape:
        return NamedSharding(mesh, P())
    axes = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
    for i in axes:
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree of ``NamedSharding`` for ``state`` (arrays or ShapeDtypeStructs), decided by each leaf's shape,
    so the optimiser's momentum buffers shard like their parameters."""
    return jax.tree.map(lambda x: leaf_sharding(tuple(x.shape), mesh), state)


def place(tree: Any, shardings: Any) -> Any:
    """Puts a tree of host or single-device arrays (the same on every process) onto ``shardings``.

    ``make_array_from_callback`` works in one process and across processes alike.
    """
    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def global_batch(local: Any, sharding: NamedSharding) -> Any:
    """This process's rows of every array of a batch -> global arrays split over the mesh."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh and the shardings of the state and of batches."""

    mesh: Mesh
    state: Any
    batch: NamedSharding
