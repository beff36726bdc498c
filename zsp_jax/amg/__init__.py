"""Static-shape automatic mask generation (segment-anything's SamAutomaticMaskGenerator) in JAX."""

from zsp_jax.amg.device import AmgInputs, AmgOutputs, Plan, generate_padded
from zsp_jax.amg.generator import AutomaticMaskGenerator, data_mesh, prepare_inputs, records_from_outputs, shard_work
from zsp_jax.amg.geometry import Bucket
from zsp_jax.amg.options import AmgOptions

__all__ = ["AmgInputs", "AmgOptions", "AmgOutputs", "AutomaticMaskGenerator", "Bucket", "Plan", "data_mesh",
           "generate_padded", "prepare_inputs", "records_from_outputs", "shard_work"]
