"""``python -m zsp_jax.parity``: zsp_jax against the PyTorch originals on the user's own weights and images.

Modules, one job each: ``inputs`` (flags checked before any work -> ``Setup``), ``originals`` (the
PyTorch side), ``ours`` (our side: the one place that touches the labeller and the mask generator),
``comparisons`` (each component, both sides), ``measures`` (relative errors, agreement, mask pairing),
``tolerances`` (the table every figure is judged against), ``estimate`` (the time estimate),
``report`` (console table, JSON, Markdown, pictures), ``run`` (the whole check), ``__main__`` (the CLI).
Needs torch and the reference packages (segment-anything, open_clip, gem-torch).
"""
