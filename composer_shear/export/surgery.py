"""Model surgery: deterministic gates -> a compact, standard Hugging Face model.

This is where a model is sliced. The deterministic gates (exactly the target count per row)
say which layers, kv groups, query heads, intermediate units and hidden dims survive; the
surviving gate values are folded into the weights that consume them (``o_proj`` columns and
rows, ``down_proj`` columns and rows), every affected tensor is sliced, removed layers are
dropped, and a new config with the target shape (``head_dim`` explicit) is written. The
result computes what the masked model computes in eval mode.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from composer_shear.families import DecoderFamily, get_family
from composer_shear.pruning.masking import GATES_ATTR, ShearGates, find_gates
from composer_shear.shape import ModelShape

__all__ = [
    "PruningPlan",
    "TensorCut",
    "plan_from_masks",
    "plan_pruning",
    "prune_model",
    "pruned_config",
    "pruned_skeleton",
    "tied_keys",
]


@dataclass
class PruningPlan:
    """What survives, and the gate values to fold in, for every kept layer.

    Attributes:
        kept_layers: Source indices of the kept layers, ascending.
        layer_scale: Per kept layer, the layer gate value.
        kept_heads: Per kept layer, source query-head indices (group-major order).
        head_scale: Per kept layer, the gate value of each kept query head.
        kept_kv: Per kept layer, source kv-head indices.
        kept_intermediate: Per kept layer, source intermediate indices.
        intermediate_scale: Per kept layer, the gate value of each kept intermediate unit.
        kept_hidden: Source hidden indices kept (same for the whole model).
        target: The resulting shape.
    """

    kept_layers: list[int]
    layer_scale: torch.Tensor
    kept_heads: torch.Tensor
    head_scale: torch.Tensor
    kept_kv: torch.Tensor
    kept_intermediate: torch.Tensor
    intermediate_scale: torch.Tensor
    kept_hidden: torch.Tensor
    target: ModelShape

    def kept_units(self) -> dict[str, list]:
        """Source indices of every kept unit as JSON-ready lists (what an export records).

        Per-layer dimensions (``heads``, ``kv_heads``, ``intermediate``) hold one row per kept
        layer, in the order of ``layers``.
        """
        return {
            "layers": list(self.kept_layers),
            "heads": self.kept_heads.tolist(),
            "kv_heads": self.kept_kv.tolist(),
            "intermediate": self.kept_intermediate.tolist(),
            "hidden": self.kept_hidden.tolist(),
        }


def _kept_indices(keep_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the ascending indices where ``keep_mask`` is set (same count in every row)."""
    count = int(keep_mask[0].sum()) if keep_mask.dim() > 1 else int(keep_mask.sum())
    return torch.sort(torch.topk(keep_mask.float(), count, dim=-1).indices, -1).values


@torch.no_grad()
def plan_from_masks(
    source: ModelShape,
    target: ModelShape,
    keep: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor] | None = None,
) -> PruningPlan:
    """Index lists and scales from per-dimension keep masks: how *any* unit choice is sliced.

    Learned gates (:func:`plan_pruning`) and one-shot importance
    (:mod:`composer_shear.export.oneshot`) both end here, so there is one slicing code path.

    Args:
        source: Shape of the model being sliced.
        target: The shape the masks keep (every row keeps the same count).
        keep: Boolean keep masks shaped like the gates of :class:`ShearGates`: ``layers``
            ``(L,)``, ``kv_heads`` ``(L, n_kv)``, ``heads`` ``(L, n_kv, n_rep)``,
            ``intermediate`` ``(L, I)``, ``hidden`` ``(D,)``; a missing dimension is kept
            whole.
        values: Gate values to fold into the weights, same shapes (zero where not kept);
            None or a missing dimension folds nothing (scale 1).
    """
    values = {name: value.float().cpu() for name, value in (values or {}).items()}
    keep = {name: mask.bool().cpu() for name, mask in keep.items()}
    for name, mask in keep.items():
        if name not in values:
            values[name] = mask.float()
    n_layers, n_kv, n_rep = (
        source.num_hidden_layers,
        source.num_key_value_heads,
        source.heads_per_group,
    )

    if "layers" in keep:
        kept_layers = torch.nonzero(keep["layers"]).flatten().tolist()
        layer_scale = values["layers"][kept_layers]
    else:
        kept_layers, layer_scale = list(range(n_layers)), torch.ones(n_layers)

    head_keep = torch.ones((n_layers, n_kv, n_rep), dtype=torch.bool)
    head_values = torch.ones((n_layers, n_kv, n_rep))
    if "kv_heads" in keep:
        head_keep &= keep["kv_heads"].unsqueeze(-1)
        head_values = head_values * values["kv_heads"].unsqueeze(-1)
    if "heads" in keep:
        head_keep &= keep["heads"]
        head_values = head_values * values["heads"]
    # Query head i belongs to kv group i // n_rep: group-major flattening.
    head_keep, head_values = head_keep.reshape(n_layers, -1), head_values.reshape(n_layers, -1)
    kept_heads = _kept_indices(head_keep)
    head_scale = torch.gather(head_values, 1, kept_heads)
    kv_keep = keep.get("kv_heads", torch.ones((n_layers, n_kv), dtype=torch.bool))
    kept_kv = _kept_indices(kv_keep)

    if "intermediate" in keep:
        kept_inter = _kept_indices(keep["intermediate"])
        inter_scale = torch.gather(values["intermediate"], 1, kept_inter)
    else:
        kept_inter = torch.arange(source.intermediate_size).expand(n_layers, -1)
        inter_scale = torch.ones(kept_inter.shape)
    if "hidden" in keep:
        kept_hidden = torch.nonzero(keep["hidden"]).flatten()
    else:
        kept_hidden = torch.arange(source.hidden_size)

    rows = torch.tensor(kept_layers, dtype=torch.long)
    return PruningPlan(
        kept_layers=kept_layers,
        layer_scale=layer_scale,
        kept_heads=kept_heads[rows],
        head_scale=head_scale[rows],
        kept_kv=kept_kv[rows],
        kept_intermediate=kept_inter[rows],
        intermediate_scale=inter_scale[rows],
        kept_hidden=kept_hidden,
        target=target,
    )


@torch.no_grad()
def plan_pruning(gates: ShearGates) -> PruningPlan:
    """The plan of the deterministic gates at the target (kept units and their values)."""
    values = gates.deterministic_values("target")
    return plan_from_masks(gates.source, gates.target, gates.keep_masks(), values)


def pruned_config(
    config: PretrainedConfig, plan: PruningPlan, family: DecoderFamily
) -> PretrainedConfig:
    """The source config with the target shape; everything else carried over."""
    new = copy.deepcopy(config)
    updates = plan.target.config_updates()
    updates.update(family.layer_fixups(config, plan.kept_layers))
    for key, value in updates.items():
        setattr(new, key, value)
    return new


def _rows(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(0, index.to(weight.device))


def _cols(weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return weight.index_select(1, index.to(weight.device))


def _fold(weight: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiplies ``weight`` by ``scale`` along ``dim`` in fp32, keeping its dtype."""
    shape = [1] * weight.dim()
    shape[dim] = -1
    scaled = weight.float() * scale.to(weight.device, torch.float32).reshape(shape)
    return scaled.to(weight.dtype)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of a q/k/v projection for the given heads."""
    return (heads.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()


def _fold_into_norm(weight: torch.Tensor, scale: torch.Tensor, offset: float) -> torch.Tensor:
    """The weight of a norm that scales by ``offset + weight``, with ``scale`` folded in."""
    folded = scale.to(weight.device, torch.float32) * (offset + weight.float()) - offset
    return folded.to(weight.dtype)


@dataclass(frozen=True)
class TensorCut:
    """How one tensor of the compact model is cut from one tensor of the source model.

    Every compact tensor is ``source[rows][:, cols]``, then the folded gate values; the cuts
    of a model (:func:`pruned_skeleton`) are applied to a live model's tensors
    (:func:`prune_model`) or to a checkpoint's, one at a time (the streaming export).

    Attributes:
        source: The source tensor's state-dict key.
        rows: Indices kept along dim 0, None for all.
        cols: Indices kept along dim 1, None for all.
        col_scale: Gate values folded into the kept columns.
        row_scale: Gate values folded along dim 0 (a branch's output bias).
        norm_scale: A layer gate value folded into a norm that scales by ``offset + weight``.
        norm_offset: That norm's weight offset (:attr:`DecoderFamily.norm_weight_offset`).
    """

    source: str
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    norm_scale: torch.Tensor | None = None
    norm_offset: float = 0.0

    @torch.no_grad()
    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The compact tensor cut from ``weight`` (the source tensor), in fresh storage."""
        out = weight
        if self.rows is not None:
            out = _rows(out, self.rows)
        if self.cols is not None:
            out = _cols(out, self.cols)
        if self.col_scale is not None:
            out = _fold(out, self.col_scale, dim=1)
        if self.row_scale is not None:
            out = _fold(out, self.row_scale, dim=0)
        if self.norm_scale is not None:
            out = _fold_into_norm(out, self.norm_scale, self.norm_offset)
        # Fresh storage always (index_select and folding copy already): the compact tensor
        # never pins the source's memory, and a memory-mapped source can be released.
        return weight.detach().clone() if out is weight else out.detach().contiguous()


def _tensor_cuts(
    model: nn.Module, compact: nn.Module, plan: PruningPlan, family: DecoderFamily
) -> dict[str, TensorCut]:
    """The cut of every tensor of ``compact``, keyed like its state dict (tied copies left out).

    Only module names are read, so both models may live on ``meta``. The keys are the names
    of each model's own modules (the family finds the modules in both), so no state-dict key
    is spelled out here.
    """
    names = {module: name for name, module in compact.named_modules()}
    source_names = {module: name for name, module in model.named_modules()}

    def key(module: nn.Module, param: str = "weight") -> str:
        return f"{names[module]}.{param}" if names[module] else param

    def src(module: nn.Module, param: str = "weight") -> str:
        name = source_names[module]
        return f"{name}.{param}" if name else param

    hidden = plan.kept_hidden
    head_dim = plan.target.head_dim
    cuts: dict[str, TensorCut] = {}

    embedding = family.embedding(model)
    cuts[key(family.embedding(compact))] = TensorCut(src(embedding), cols=hidden)
    final_norm = family.final_norm_module(model)
    cuts[key(family.final_norm_module(compact))] = TensorCut(src(final_norm), rows=hidden)
    lm_head, lm_head_c = family.lm_head_module(model), family.lm_head_module(compact)
    if not plan.target.tie_word_embeddings:
        cuts[key(lm_head_c)] = TensorCut(src(lm_head), cols=hidden)
    if getattr(lm_head, "bias", None) is not None:
        cuts[key(lm_head_c, "bias")] = TensorCut(src(lm_head, "bias"))

    layers, layers_c = family.layer_list(model), family.layer_list(compact)
    for new_index, old_index in enumerate(plan.kept_layers):
        mods = family.layer_modules(layers[old_index])
        out = family.layer_modules(layers_c[new_index])
        heads = plan.kept_heads[new_index]
        q_rows = _head_rows(heads, head_dim)
        kv_rows = _head_rows(plan.kept_kv[new_index], head_dim)
        inter = plan.kept_intermediate[new_index]
        layer_scale = plan.layer_scale[new_index]
        # A branch that ends in a norm takes the layer scale after that norm (before it, the
        # norm would undo it); otherwise it is folded into the branch's output projection.
        proj_scale = torch.ones(()) if mods.branch_norms else layer_scale
        head_scale = plan.head_scale[new_index].repeat_interleave(head_dim) * proj_scale
        inter_scale = plan.intermediate_scale[new_index] * proj_scale

        for source, dst, rows in (
            (mods.q_proj, out.q_proj, q_rows),
            (mods.k_proj, out.k_proj, kv_rows),
            (mods.v_proj, out.v_proj, kv_rows),
            (mods.gate_proj, out.gate_proj, inter),
            (mods.up_proj, out.up_proj, inter),
        ):
            cuts[key(dst)] = TensorCut(src(source), rows=rows, cols=hidden)
            if source.bias is not None:
                cuts[key(dst, "bias")] = TensorCut(src(source, "bias"), rows=rows)
        for source, dst, cols, col_scale in (
            (mods.o_proj, out.o_proj, q_rows, head_scale),
            (mods.down_proj, out.down_proj, inter, inter_scale),
        ):
            cuts[key(dst)] = TensorCut(src(source), rows=hidden, cols=cols, col_scale=col_scale)
            if source.bias is not None:
                cuts[key(dst, "bias")] = TensorCut(
                    src(source, "bias"), rows=hidden, row_scale=proj_scale[None]
                )

        for source, dst in zip(mods.stream_norms, out.stream_norms, strict=True):
            cuts[key(dst)] = TensorCut(src(source), rows=hidden)
        for source, dst in zip(mods.branch_norms, out.branch_norms, strict=True):
            folded = not bool(layer_scale == 1)  # no layer gate: exact copy, no rounding
            cuts[key(dst)] = TensorCut(
                src(source),
                rows=hidden,
                norm_scale=layer_scale if folded else None,
                norm_offset=family.norm_weight_offset,
            )
        # Per-head norms act on head_dim, which pruning keeps: copied whole.
        for source, dst in zip(mods.head_norms, out.head_norms, strict=True):
            cuts[key(dst)] = TensorCut(src(source))
    return cuts


def tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys of ``model`` that repeat an earlier key's tensor: tied -> first key.

    What ``save_pretrained`` leaves out of the files (``_tied_weights_keys``, the output
    embedding of a tied model), decided by the tensor identity in ``model``.
    """
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def _empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """A model with parameters on ``meta`` (buffers such as rotary tables stay real)."""
    from accelerate import init_empty_weights
    from transformers.modeling_utils import no_init_weights

    # No random init either: every parameter is replaced by a sliced tensor right after.
    with init_empty_weights(include_buffers=False), no_init_weights():
        return AutoModelForCausalLM.from_config(config)


def pruned_skeleton(
    model: PreTrainedModel, plan: PruningPlan
) -> tuple[PreTrainedModel, dict[str, TensorCut]]:
    """The compact model with its parameters on ``meta``, and how each of its tensors is cut.

    Only ``model``'s config and module names are read (it may live on ``meta`` too): a
    checkpoint's tensors can then be cut one at a time, straight into the output files.

    Args:
        model: The source Hugging Face causal LM.
        plan: What to keep (:func:`plan_pruning` or :func:`plan_from_masks`).

    Returns:
        The compact model (config of the target shape, tied weights tied, the source's
        generation config, eval mode; ``config.torch_dtype`` is the source's, the ``meta``
        parameters are float32 until filled or cast) and its :class:`TensorCut` per state-dict key,
        tied copies left out (:func:`tied_keys`).
    """
    family = get_family(model)
    config = pruned_config(model.config, plan, family)
    dtype = family.embedding(model).weight.dtype
    compact = _empty_model(config)
    if config.tie_word_embeddings:
        compact.tie_weights()
    cuts = _tensor_cuts(model, compact, plan, family)
    compact.config.torch_dtype = dtype
    if getattr(model, "generation_config", None) is not None:
        compact.generation_config = copy.deepcopy(model.generation_config)
    return compact.eval(), cuts


@torch.no_grad()
def prune_model(
    model: PreTrainedModel, gates: ShearGates | None = None, plan: PruningPlan | None = None
) -> PreTrainedModel:
    """Returns the compact model that the masked ``model`` equals in eval mode.

    Args:
        model: A Hugging Face causal LM, not wrapped by FSDP (gather first); it carries gates
            (:func:`composer_shear.pruning.masking.attach_gates`) unless ``plan`` is given.
        gates: The gates; found inside ``model`` when omitted.
        plan: What to keep (:func:`plan_pruning` of the gates, or :func:`plan_from_masks` of
            any unit choice); computed from the gates when omitted.

    Returns:
        A new ``transformers`` model of the target shape, in eval mode, same dtype.
    """
    if plan is None:
        gates = gates if gates is not None else find_gates(model)
        if gates is None:
            raise ValueError("The model carries no pruning gates and no plan; nothing to slice.")
        plan = plan_pruning(gates)
    compact, cuts = pruned_skeleton(model, plan)
    source = model.state_dict()
    # The big matrices are gathered on a thread pool (torch releases the GIL): column gathers
    # are memory-bound and dominate the time.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        gathered = pool.map(lambda cut: cut.apply(source[cut.source]), cuts.values())
        state = dict(zip(cuts, gathered, strict=True))
    for key, tied_to in tied_keys(compact).items():
        state[key] = state[tied_to]
    # Strict: every tensor of the compact model must come from the source model.
    compact.load_state_dict(state, strict=True, assign=True)
    if compact.config.tie_word_embeddings:
        compact.tie_weights()
    assert not hasattr(compact, GATES_ATTR)
    return compact.eval()
