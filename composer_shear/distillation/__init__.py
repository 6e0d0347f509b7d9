"""Knowledge distillation from the source model while pruning or continuing pre-training.

* :mod:`~composer_shear.distillation.algorithm` -- the ``knowledge_distillation`` Composer
  algorithm (the KD loss mixed into ``state.loss``);
* :mod:`~composer_shear.distillation.teacher` -- building, loading and placing the frozen
  teacher (sharded beside the student under FSDP).
"""

from composer_shear.distillation.algorithm import KnowledgeDistillation

__all__ = ["KnowledgeDistillation"]
