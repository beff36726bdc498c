"""Data layer: dataset readers, splits, TFDS builders, Grain pipelines and augmentations.

Modules, each with one job:

* ``decode``          image/mask bytes -> uint8 arrays, with the bad-input checks
* ``bad_input``       ``BadInputError``, the skip/error policy and the report of skipped files
* ``readers``         VOC 2012 (+ SegmentationClassAug), COCO 2017 semantic, plain image folders
* ``splits``          UniMatch-format split files: read, write, make seeded splits
* ``scan``            validate a list of examples once (parallel, cached)
* ``sources``         Grain random-access sources: straight from files, or from a TFDS build
* ``tfds_builders``   ArrayRecord TFDS builders for VOC-aug and COCO-semantic
* ``augment``         UniMatch's augmentations on the host (PIL, exact reference semantics)
* ``device_augment``  the strong augmentations and normalisation as a batched JAX function
* ``pipeline``        the training input pipeline (labelled + unlabelled streams) and eval reads
* ``synthetic``       a small generated dataset in the VOC layout
* ``inputs``          a config's training and evaluation sources and its training pipeline
* ``preview``         the data stage of ``zsp_jax.main``: the pipeline run for a few batches, drawn
"""
