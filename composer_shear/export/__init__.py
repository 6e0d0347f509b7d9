"""From gates (or scores) to a compact, standard Hugging Face checkpoint.

* :mod:`~composer_shear.export.surgery` -- where a model is sliced: keep masks -> a
  :class:`PruningPlan` -> the compact model (gate values folded into the weights);
* :mod:`~composer_shear.export.units` -- the kept-units record, its one owner;
* :mod:`~composer_shear.export.writer` -- the HF directory every export writes;
* :mod:`~composer_shear.export.checkpoint` -- Composer checkpoint (or live gated model) ->
  HF directory (``composer-shear export``);
* :mod:`~composer_shear.export.oneshot` -- the one-shot cut by importance
  (``composer-shear prune-oneshot``), through the same surgery.
"""
