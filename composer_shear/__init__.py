"""composer_shear: Sheared-LLaMA targeted pruning and dynamic batch loading for LLM Foundry.

Where things live:
    * :mod:`composer_shear.shape` -- model shapes, target validation, parameter counting.
    * :mod:`composer_shear.gates` -- hard-concrete gates: sampling, expected L0, top-k masks.
    * :mod:`composer_shear.families` -- one declaration per model family (paths, norms, terms).
    * :mod:`composer_shear.masking` -- forward hooks that multiply gates into a stock HF model.
    * :mod:`composer_shear.pruning` -- the ``targeted_pruning`` Composer algorithm and penalty.
    * :mod:`composer_shear.surgery` -- deterministic masks -> compact Hugging Face model.
    * :mod:`composer_shear.export` -- Composer checkpoint -> Hugging Face directory.
    * :mod:`composer_shear.data` -- per-domain Streaming datasets, the live mixer, shard checks,
      bounded file descriptors.
    * :mod:`composer_shear.callbacks` -- dynamic batch loading, export at fit end.
    * :mod:`composer_shear.output_paths` -- early checks of the paths a run writes.
    * :mod:`composer_shear.report` -- the ``jsonl_metrics`` logger, plots and the run report.
"""

__version__ = "0.1.0"
