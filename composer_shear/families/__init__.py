"""Model families: one module each, one :class:`DecoderFamily` declaration per module.

Llama, Mistral, Qwen2 and Qwen3 share the Llama layout; Gemma 3 adds post-branch norms, an
embedding scale and an index-dependent attention pattern.

The families form a registry keyed by ``config.model_type``, filled two ways:

* the entry-point group ``composer_shear_families`` (as LLM Foundry's registries are): an
  installed package declares, in its packaging metadata,
  ``[project.entry-points.composer_shear_families] my_family = "my_pkg.family:FAMILY"``, where
  ``FAMILY`` is a :class:`DecoderFamily`. Every process that prunes, ``llmfoundry train`` and
  ``composer -n N`` included, then finds it without an edit of this package. Entry points are
  read the first time a model type is not found, so a broken third-party package never gets
  in the way of a built-in family;
* :func:`register_family` in the running process (a script, a test).

The built-in families are declared as entry points in ``setup.py`` too, and also registered
here directly, so an install made before those entry points existed (an editable install that
was not reinstalled) still finds them. Families registered already keep their model types: an
entry point adds model types, it does not replace one.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from composer_shear.families import gemma3, llama, mistral, qwen2, qwen3
from composer_shear.families.base import DecoderFamily, LayerModules, UnsupportedModelError

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "DecoderFamily",
    "LayerModules",
    "UnsupportedModelError",
    "get_family",
    "load_entry_point_families",
    "register_family",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "composer_shear_families"

FAMILIES: dict[str, DecoderFamily] = {}
# Whether the entry points have been read in this process (once is enough: installing a
# package does not change a running interpreter's metadata view).
_entry_points_read = False


def register_family(family: DecoderFamily) -> DecoderFamily:
    """Registers ``family`` for each of its model types (replacing an earlier registration)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _module in (llama, mistral, qwen2, qwen3, gemma3):
    register_family(_module.FAMILY)


def load_entry_point_families() -> list[str]:
    """Registers the families of every installed ``composer_shear_families`` entry point.

    A model type registered already keeps its family (a warning names the entry point that
    wanted it too, unless it is the same declaration, as for the built-ins).

    Returns:
        The model types this call added.

    Raises:
        UnsupportedModelError: An entry point fails to import, or is not a
            :class:`DecoderFamily`; the message names it and its package.
    """
    global _entry_points_read
    added = []
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point.dist, "name", None) or "an unknown package"
        where = (
            f"entry point {entry_point.name} = {entry_point.value} "
            f"({dist}, group {ENTRY_POINT_GROUP})"
        )
        try:
            family = entry_point.load()
        except Exception as error:  # the package's own import error, whatever it is
            raise UnsupportedModelError(f"{where} does not load: {error!r}") from error
        if not isinstance(family, DecoderFamily):
            raise UnsupportedModelError(
                f"{where} is a {type(family).__name__}, not a composer_shear DecoderFamily"
            )
        for model_type in family.model_types:
            registered = FAMILIES.get(model_type)
            if registered is None:
                FAMILIES[model_type] = family
                added.append(model_type)
            elif registered is not family:
                log.warning(
                    "%s declares model_type %r, which is registered already; keeping that one",
                    where,
                    model_type,
                )
    # Only a complete read counts: after a failure the next miss raises the same error again.
    _entry_points_read = True
    return added


def get_family(model_or_config: Any) -> DecoderFamily:
    """Returns the family of a model (or config), or raises a clear error.

    A model type not registered yet is looked up in the ``composer_shear_families`` entry
    points (once per process).

    Raises:
        UnsupportedModelError: The family is not registered; names the registered ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES and not _entry_points_read:
        load_entry_point_families()
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"composer_shear cannot prune model_type={model_type!r} "
            f"({type(model_or_config).__name__}). Supported model types: "
            f"{sorted(FAMILIES)} (Llama-2/3, Mistral, Qwen2, Qwen3, Gemma 3 text and other "
            "GQA models of the Llama layout). A new family with the Llama layout is one "
            "DecoderFamily declaration, registered by a package's "
            f"{ENTRY_POINT_GROUP!r} entry point or by register_family()."
        )
    return FAMILIES[model_type]
