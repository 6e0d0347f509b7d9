"""Families are a registry: a package registers one through the ``composer_shear_families``
entry-point group, without an edit of composer_shear, in any process that prunes.

The third-party package is a real one as far as ``importlib.metadata`` can tell: a module and
a ``.dist-info`` folder (METADATA, entry_points.txt) on the ``PYTHONPATH`` of a fresh
interpreter, the way an installed wheel is found.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

from composer_shear.families import ENTRY_POINT_GROUP, FAMILIES

REPO = Path(__file__).resolve().parents[1]

PLUGIN = """
from composer_shear.families.base import DecoderFamily, attention_bias_layout

# Llama's layout under another model_type, as a user's own Llama-derived model would be.
FAMILY = DecoderFamily(("renamed_llama",), bias_layout=attention_bias_layout)
NOT_A_FAMILY = "just a string"
"""

# Resolves a tiny Llama whose config says model_type "renamed_llama", then cuts it through the
# one-shot path (gates, scores, surgery), which reaches the family through get_family only.
PROBE = """
import torch
from composer_shear.families import get_family
from composer_shear.export.oneshot import prune_oneshot
from tests.tiny_models import tiny_model

model = tiny_model("llama_gqa")
model.config.model_type = "renamed_llama"
family = get_family(model)
import shear_plugin_family
assert family is shear_plugin_family.FAMILY, family
batches = [torch.randint(0, 512, (2, 16)) for _ in range(2)]
compact = prune_oneshot(model, {"num_hidden_layers": 1, "intermediate_size": 32}, batches)
print("pruned", compact.config.num_hidden_layers, compact.config.intermediate_size)
"""


def _plugin(root: Path, entry: str) -> Path:
    """Writes the package and its dist-info under ``root``; ``entry`` is the object path."""
    (root / "shear_plugin_family").mkdir(parents=True)
    (root / "shear_plugin_family" / "__init__.py").write_text(PLUGIN)
    dist = root / "shear_plugin_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: shear-plugin-family\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nrenamed = {entry}\n")
    return root


def _probe(*extra_path: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([*map(str, extra_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        timeout=600,
    )


def test_a_package_registers_a_family_through_its_entry_point(tmp_path):
    found = _probe(_plugin(tmp_path / "good", "shear_plugin_family:FAMILY"))
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.split() == ["pruned", "1", "32"]
    # The same probe without the package: the model type is unknown, and the error says how
    # a family is added.
    unknown = _probe()
    assert unknown.returncode != 0
    assert "cannot prune model_type='renamed_llama'" in unknown.stderr
    assert ENTRY_POINT_GROUP in unknown.stderr


def test_an_entry_point_that_is_not_a_family_is_named(tmp_path):
    bad = _probe(_plugin(tmp_path / "bad", "shear_plugin_family:NOT_A_FAMILY"))
    assert bad.returncode != 0
    assert (
        "entry point renamed = shear_plugin_family:NOT_A_FAMILY (shear-plugin-family, group "
        f"{ENTRY_POINT_GROUP}) is a str, not a composer_shear DecoderFamily"
    ) in bad.stderr, bad.stderr[-3000:]


def _setup_entry_points(group: str) -> list[str]:
    """The entry points ``setup.py`` declares for ``group`` (read from its source)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == group:
                    return [elt.value for elt in value.elts]
    raise AssertionError(f"setup.py declares no {group} entry points")


def test_setup_declares_every_built_in_family_as_an_entry_point():
    declared = _setup_entry_points(ENTRY_POINT_GROUP)
    modules = {p.stem for p in (REPO / "composer_shear" / "families").glob("*.py")} - {
        "__init__",
        "base",
    }
    assert {spec.split("=")[0] for spec in declared} == modules
    for spec in declared:
        name, target = spec.split("=")
        module, attr = target.split(":")
        family = getattr(importlib.import_module(module), attr)
        # The fallback registration and the entry point are the same declaration.
        assert all(FAMILIES[t] is family for t in family.model_types), name
