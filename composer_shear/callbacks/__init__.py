"""Composer callbacks of composer_shear.

* :class:`~composer_shear.callbacks.dynamic_batch_loading.DynamicBatchLoading` -- the
  Sheared-LLaMA dynamic batch loading rule (registered as ``dynamic_batch_loading``);
* :class:`~composer_shear.callbacks.pruned_hf_export.PrunedHFExport` -- the compact model as a
  Hugging Face directory at fit end and periodically (registered as ``pruned_hf_export``).

The registry entry points name the defining modules directly, so this package stays light.
"""

from composer_shear.callbacks.dynamic_batch_loading import DynamicBatchLoading, doremi_update

__all__ = ["DynamicBatchLoading", "doremi_update"]
