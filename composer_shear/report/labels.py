"""Names and labels shared by the report's plots and Markdown."""

from __future__ import annotations

MODEL_ORDER = ("source", "pruned", "cpt")
STEP_LABEL = "training step (batches)"
MODEL_LABELS = {"source": "source", "pruned": "pruned (before CPT)", "cpt": "after CPT"}
LOSS_COLUMNS = ("source", "pruned", "cpt", "reference")
LOSS_LABELS = {**MODEL_LABELS, "reference": "reference"}
PRUNING_DIMS = ("layers", "kv_heads", "heads", "intermediate", "hidden")
DIM_LABELS = {
    "layers": "layers",
    "kv_heads": "kv heads",
    "heads": "attention heads",
    "intermediate": "MLP intermediate",
    "hidden": "hidden size",
}
