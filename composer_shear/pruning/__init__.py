"""Learned structured pruning: hard-concrete gates injected into a stock Hugging Face model.

* :mod:`~composer_shear.pruning.gates` -- the hard-concrete gate (sampling, expected L0, the
  deterministic top-k cut);
* :mod:`~composer_shear.pruning.mask_ops` -- the masked forward pieces (hidden-dim masked
  norms);
* :mod:`~composer_shear.pruning.masking` -- :class:`ShearGates` and the forward hooks that
  multiply gates into layers, kv groups, heads, MLP units and hidden channels;
* :mod:`~composer_shear.pruning.importance` -- activation importance (the gates' init and the
  one-shot cut);
* :mod:`~composer_shear.pruning.algorithm` -- the ``targeted_pruning`` Composer algorithm: the
  Lagrangian penalty, the gate and multiplier parameter groups, hardening.
"""

from typing import Any

__all__ = ["TargetedPruning", "apply_targeted_pruning"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a submodule (gates, masking) must not pull in the algorithm, which
    # imports the distillation package, whose teacher imports masking again.
    if name in __all__:
        from composer_shear.pruning import algorithm

        return getattr(algorithm, name)
    raise AttributeError(name)
