"""Knowledge distillation from the source model while pruning or continuing pre-training.

* :mod:`~composer_shear.distillation.algorithm` -- the ``knowledge_distillation`` Composer
  algorithm (the KD loss mixed into ``state.loss``);
* :mod:`~composer_shear.distillation.teacher` -- building, loading and placing the frozen
  teacher (sharded beside the student under FSDP).
"""

from typing import Any

__all__ = ["KnowledgeDistillation"]


def __getattr__(name: str) -> Any:
    # Lazy, as composer_shear.pruning: the KD loss helpers are imported by the pruning
    # algorithm (mask-only distillation) without loading the KD algorithm's teacher plumbing.
    if name in __all__:
        from composer_shear.distillation import algorithm

        return getattr(algorithm, name)
    raise AttributeError(name)
