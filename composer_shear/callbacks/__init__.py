"""Composer callbacks of composer_shear.

* :class:`~composer_shear.callbacks.dynamic_batch_loading.DynamicBatchLoading` -- the
  Sheared-LLaMA dynamic batch loading rule (registered as ``dynamic_batch_loading``).

The registry entry points name the defining modules directly, so this package stays light.
"""

from composer_shear.callbacks.dynamic_batch_loading import (
    DynamicBatchLoading,
    doremi_update,
    find_domain_dataset,
)

__all__ = ["DynamicBatchLoading", "doremi_update", "find_domain_dataset"]
