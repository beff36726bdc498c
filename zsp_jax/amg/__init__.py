"""Static-shape automatic mask generation (segment-anything's SamAutomaticMaskGenerator) in JAX."""

from zsp_jax.amg.generate import AmgOutputs, generate_padded
from zsp_jax.amg.generator import AutomaticMaskGenerator, records_from_outputs, shard_work
from zsp_jax.amg.geometry import Bucket
from zsp_jax.amg.inputs import AmgInputs, prepare_inputs
from zsp_jax.amg.options import AmgOptions
from zsp_jax.amg.plan import Plan
from zsp_jax.utils.sharding import data_mesh

__all__ = ["AmgInputs", "AmgOptions", "AmgOutputs", "AutomaticMaskGenerator", "Bucket", "Plan", "data_mesh",
           "generate_padded", "prepare_inputs", "records_from_outputs", "shard_work"]
