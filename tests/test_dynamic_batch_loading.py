"""Dynamic batch loading: the update rule, the callback's validation, history and resumption."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from composer.core import Event

from composer_shear.callbacks import DynamicBatchLoading, doremi_update
from composer_shear.callbacks.dynamic_batch_loading import target_losses_in_order
from composer_shear.data.mixer import find_multi_domain_dataset

DOMAINS = ["code", "prose", "math"]


class FakeMixture:
    """The interface of ``composer_shear.data.mixer.MultiDomainDataset`` the callback uses."""

    def __init__(self, domains=DOMAINS, weights=None):
        self.domains = list(domains)
        k = len(self.domains)
        self.initial_weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights)
        self.weights = self.initial_weights.copy()
        self.domain_counts = np.zeros(k, dtype=np.int64)
        self.set_calls = 0

    def set_weights(self, weights):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.set_calls += 1


class FakeMetric:
    def __init__(self, value):
        self.value = value

    def compute(self):
        return self.value


class FakeLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))


def fake_state(dataset, labels=None, metric="LanguageCrossEntropy"):
    labels = [f"eval/{d}" for d in dataset.domains] if labels is None else labels
    loader = SimpleNamespace(dataset=dataset)  # a DataLoader-like wrapper
    return SimpleNamespace(
        train_dataloader=loader,
        evaluators=[SimpleNamespace(label=label) for label in labels],
        eval_metrics={label: {metric: FakeMetric(float("nan"))} for label in labels},
        dataloader_label=None,
        timestamp=SimpleNamespace(batch=0),
    )


def eval_round(callback, state, logger, losses, batch):
    """Replays the events Composer fires for one evaluation round."""
    state.timestamp.batch = batch
    callback.run_event(Event.EVAL_BEFORE_ALL, state, logger)
    for domain, loss in losses.items():
        label = f"eval/{domain}"
        state.eval_metrics[label]["LanguageCrossEntropy"].value = loss
        state.dataloader_label = label
        callback.run_event(Event.EVAL_END, state, logger)
    state.dataloader_label = "train"
    callback.run_event(Event.EVAL_AFTER_ALL, state, logger)


# ----------------------------------------------------------------------------- update rule


def test_doremi_moves_weight_to_largest_excess():
    w = np.array([0.5, 0.3, 0.2])
    new = doremi_update(w, losses=[2.0, 3.0, 1.0], target_loss=[1.9, 2.0, 1.5], smoothing=0.0)
    assert math.isclose(new.sum(), 1.0)
    # Excess: 0.1, 1.0, 0 (clamped). Exactly w * exp(delta), normalised.
    expected = w * np.exp([0.1, 1.0, 0.0])
    np.testing.assert_allclose(new, expected / expected.sum())
    assert new[1] > w[1]
    assert np.argmax(new / w) == 1


def test_doremi_clamps_negative_excess():
    w = np.array([0.25, 0.25, 0.5])
    # Domain 2 is far below its reference: it must not gain, and the others must not lose
    # relative to each other.
    new = doremi_update(w, losses=[2.0, 2.0, 0.1], target_loss=[2.0, 2.0, 5.0], smoothing=0.0)
    np.testing.assert_allclose(new, w)
    new = doremi_update(w, losses=[2.5, 2.0, 0.1], target_loss=[2.0, 2.0, 5.0], smoothing=0.0)
    assert new[2] < w[2]
    assert new[0] > w[0]


def test_doremi_smoothing_mixes_uniform():
    w = np.array([1.0, 0.0, 0.0])
    new = doremi_update(w, [1.0, 9.0, 9.0], [1.0, 1.0, 1.0], smoothing=0.1)
    # The zero weights stay zero before smoothing; smoothing gives each c / k.
    np.testing.assert_allclose(new, [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert math.isclose(new.sum(), 1.0)
    default = doremi_update([0.5, 0.5], [3.0, 1.0], [1.0, 1.0])
    raw = np.array([np.exp(2.0), 1.0]) / (np.exp(2.0) + 1.0)
    np.testing.assert_allclose(default, (1 - 1e-4) * raw + 1e-4 / 2)


def test_doremi_is_stable_for_large_excess_and_tiny_weights():
    new = doremi_update([1e-300, 1.0 - 1e-300], [1000.0, 1.0], [0.0, 1.0], smoothing=0.0)
    assert np.all(np.isfinite(new))
    assert math.isclose(new.sum(), 1.0)
    assert new[0] > 0.99


def test_doremi_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="Shape mismatch"):
        doremi_update([0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- callback


def test_callback_updates_and_logs():
    dataset = FakeMixture()
    callback = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0], smoothing=1e-4)
    state, logger = fake_state(dataset), FakeLogger()
    callback.run_event(Event.FIT_START, state, logger)
    for step in (5, 10, 15):
        eval_round(callback, state, logger, {"code": 1.0, "prose": 2.0, "math": 0.5}, step)
    weights = np.array([r["weights"] for r in callback.history])
    assert [r["step"] for r in callback.history] == [5, 10, 15]
    assert np.all(np.diff(weights[:, 1]) > 0)  # prose (excess 1.0) keeps gaining
    assert np.all(np.diff(weights[:, 2]) < 0)  # math under its reference keeps losing
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(dataset.weights, weights[-1])
    assert callback.history[0]["excess_loss"] == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(callback.history[1]["weights_before"], weights[0])
    assert len(logger.logged) == 3
    last = logger.logged[-1]
    for domain, i in zip(DOMAINS, range(3), strict=True):
        assert last[f"dynamic_batch_loading/weight/{domain}"] == pytest.approx(weights[-1, i])
        assert f"dynamic_batch_loading/eval_loss/{domain}" in last
        assert f"dynamic_batch_loading/excess_loss/{domain}" in last
    assert not any(math.isnan(v) for v in last.values())


def test_constant_keeps_weights_but_logs():
    dataset = FakeMixture(weights=[0.6, 0.3, 0.1])
    callback = DynamicBatchLoading(update_type="constant")
    state, logger = fake_state(dataset), FakeLogger()
    callback.run_event(Event.FIT_START, state, logger)
    eval_round(callback, state, logger, {"code": 9.0, "prose": 2.0, "math": 0.5}, 4)
    np.testing.assert_allclose(dataset.weights, [0.6, 0.3, 0.1])
    assert dataset.set_calls == 0
    assert callback.history[0]["weights"] == pytest.approx([0.6, 0.3, 0.1])
    assert "dynamic_batch_loading/weight/code" in logger.logged[0]
    assert not any("excess" in key for key in logger.logged[0])


def test_incomplete_round_is_skipped_and_nan_raises():
    dataset = FakeMixture()
    callback = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0])
    state, logger = fake_state(dataset), FakeLogger()
    callback.run_event(Event.FIT_START, state, logger)
    eval_round(callback, state, logger, {"code": 2.0}, 3)
    assert callback.history == []
    # Evaluators that are not domains (e.g. a mixed `eval/all`) are ignored.
    with pytest.raises(RuntimeError, match="Non-finite eval loss for domains \\['prose'\\]"):
        eval_round(callback, state, logger, {"code": 2.0, "prose": math.nan, "math": 1.0}, 6)


@pytest.mark.parametrize(
    ("kwargs", "labels", "error"),
    [
        (dict(target_loss=[1.0, 2.0]), None, "target_loss has 2 values but .* 3 domains"),
        (
            dict(target_loss=[1.0, 2.0, 3.0]),
            ["eval/code", "eval"],
            r"\['eval/prose', 'eval/math'\]",
        ),
    ],
)
def test_validation_errors(kwargs, labels, error):
    callback = DynamicBatchLoading(**kwargs)
    state = fake_state(FakeMixture(), labels=labels)
    with pytest.raises(ValueError, match=error):
        callback.run_event(Event.FIT_START, state, FakeLogger())


def test_target_loss_by_name_in_any_order():
    domains = ["cc", "github", "book"]
    by_name = target_losses_in_order({"book": 2.03, "cc": 1.87, "github": 0.69}, domains)
    assert by_name == [1.87, 0.69, 2.03]
    # The callback matches a reordered mapping by name: the same update as in order.
    histories = []
    for target in (
        {"code": 1.0, "prose": 3.0, "math": 0.1},
        {"math": 0.1, "prose": 3.0, "code": 1.0},
    ):
        callback = DynamicBatchLoading(target_loss=target)
        state, logger = fake_state(FakeMixture()), FakeLogger()
        callback.run_event(Event.FIT_START, state, logger)
        eval_round(callback, state, logger, {"code": 2.0, "prose": 2.0, "math": 0.5}, 5)
        histories.append(callback.history[0]["excess_loss"])
        assert callback.state_dict()["target_loss"] == {"code": 1.0, "prose": 3.0, "math": 0.1}
    assert histories[0] == histories[1] == pytest.approx([1.0, 0.0, 0.4])


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ({"cc": 1.0, "github": 1.0}, r"no reference loss for \['book'\]"),
        (
            {"cc": 1.0, "github": 1.0, "book": 1.0, "c4": 2.0},
            r"reference loss for unknown domain\(s\) \['c4'\]",
        ),
        ({"cc": 1.0, "book": 1.0, "wiki": 1.0}, r"\['github'\]; .* \['wiki'\]"),
        ({"cc": 1.0, "github": math.nan, "book": 1.0}, "finite"),
        ([1.0, 2.0], "2 values but .* 3 domains"),
    ],
)
def test_target_loss_names_the_wrong_domain(target, error):
    with pytest.raises(ValueError, match=error):
        target_losses_in_order(target, ["cc", "github", "book"])


def test_list_target_loss_warns_with_the_mapping_it_means(caplog):
    with caplog.at_level(logging.WARNING):
        values = target_losses_in_order([1.5, 0.5], ["cc", "github"])
    assert values == [1.5, 0.5]
    assert "{cc: 1.5, github: 0.5}" in caplog.text


def test_validation_needs_multi_domain_dataset():
    callback = DynamicBatchLoading(target_loss=[1.0])
    state = fake_state(FakeMixture(domains=["a"]))
    state.train_dataloader = SimpleNamespace(dataset=object())
    with pytest.raises(ValueError, match="multi-domain train dataset"):
        callback.run_event(Event.FIT_START, state, FakeLogger())


def test_constructor_errors():
    with pytest.raises(ValueError, match="update_type"):
        DynamicBatchLoading(update_type="doremi2", target_loss=[1.0])
    with pytest.raises(ValueError, match="needs target_loss"):
        DynamicBatchLoading()
    with pytest.raises(ValueError, match="finite"):
        DynamicBatchLoading(target_loss=[1.0, math.inf])
    with pytest.raises(ValueError, match="smoothing"):
        DynamicBatchLoading(target_loss=[1.0], smoothing=2.0)


def test_find_domain_dataset_unwraps():
    dataset = FakeMixture()
    spec = SimpleNamespace(dataloader=SimpleNamespace(dataset=dataset))
    assert find_multi_domain_dataset(spec) is dataset
    assert find_multi_domain_dataset(SimpleNamespace(dataset=[1, 2])) is None


def test_state_dict_round_trip_and_resume():
    losses = [{"code": 1.5, "prose": 2.5, "math": 1.0}, {"code": 1.2, "prose": 2.4, "math": 1.1}]
    straight_ds = FakeMixture()
    straight = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0])
    state, logger = fake_state(straight_ds), FakeLogger()
    straight.run_event(Event.FIT_START, state, logger)
    eval_round(straight, state, logger, losses[0], 2)
    saved = straight.state_dict()
    eval_round(straight, state, logger, losses[1], 4)

    # A fresh process: new callback, new dataset whose checkpointed weights did not come back.
    resumed_ds = FakeMixture()
    resumed = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0])
    resumed.load_state_dict(saved)
    state2 = fake_state(resumed_ds)
    resumed.run_event(Event.FIT_START, state2, logger)
    np.testing.assert_allclose(resumed_ds.weights, saved["history"][-1]["weights"])
    eval_round(resumed, state2, logger, losses[1], 4)
    assert resumed.history == straight.history
    np.testing.assert_array_equal(resumed_ds.weights, straight_ds.weights)

    # A dataset that restored its own weights is left alone.
    agreeing = FakeMixture(weights=saved["history"][-1]["weights"])
    again = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0])
    again.load_state_dict(saved)
    again.run_event(Event.FIT_START, fake_state(agreeing), logger)
    assert agreeing.set_calls == 0

    # The saved history is a copy, not a view of the live one.
    assert len(saved["history"]) == 1


def test_resume_with_other_domains_fails():
    callback = DynamicBatchLoading(target_loss=[1.0, 1.0, 1.0])
    callback.load_state_dict({"history": [], "domains": ["x", "y", "z"]})
    with pytest.raises(ValueError, match="differ"):
        callback.run_event(Event.FIT_START, fake_state(FakeMixture()), FakeLogger())


# ----------------------------------------------------------------------------- Composer Trainer


class LiveMixtureDataset:
    """A map-style stand-in for the ``multi_domain`` dataset: sample i's domain is drawn from
    the live weights with a generator seeded by i; domain d's tokens come from its own range."""

    def __init__(self, domains, seq_len=16, size=4096):
        self.domains = list(domains)
        self.initial_weights = np.full(len(self.domains), 1.0 / len(self.domains))
        self.weights = self.initial_weights.copy()
        self.domain_counts = np.zeros(len(self.domains), dtype=np.int64)
        self.seq_len, self.size = seq_len, size

    def set_weights(self, weights):
        self.weights = np.asarray(weights, dtype=np.float64)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        d = int(rng.choice(len(self.domains), p=self.weights))
        self.domain_counts[d] += 1
        return domain_sample(d, rng, self.seq_len)


def domain_sample(d, rng, seq_len):
    import torch

    ids = torch.from_numpy(rng.integers(3 + 100 * d, 3 + 100 * d + 100, size=seq_len))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_trainer(tmp_path, callback, max_duration="4ba", **kwargs):
    import torch
    from composer import Trainer
    from composer.core import Evaluator
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from composer.utils import dist as cdist
    from torch.utils.data import DataLoader

    from tests.tiny_models import tiny_model

    model = HuggingFaceModel(
        tiny_model("llama_gqa", num_hidden_layers=1).train(),
        use_logits=True,
        metrics=[LanguageCrossEntropy()],
        eval_metrics=[LanguageCrossEntropy()],
        shift_labels=True,
    )
    train = LiveMixtureDataset(DOMAINS)
    evaluators = []
    for d, domain in enumerate(DOMAINS):
        rng = np.random.default_rng(1000 + d)
        samples = [domain_sample(d, rng, 16) for _ in range(4)]
        loader = DataLoader(samples, batch_size=2, sampler=cdist.get_sampler(samples))
        evaluators.append(Evaluator(label=f"eval/{domain}", dataloader=loader))
    torch.manual_seed(0)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(train, batch_size=2, sampler=cdist.get_sampler(train)),
        eval_dataloader=evaluators,
        eval_interval="2ba",
        max_duration=max_duration,
        callbacks=[callback],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        device="cpu",
        precision="fp32",
        seed=17,
        progress_bar=False,
        log_to_console=False,
        save_folder=str(tmp_path / "ckpt"),
        save_interval="2ba",
        save_overwrite=True,
        **kwargs,
    ), train


def test_composer_trainer_updates_and_resumes(tmp_path):
    # "prose" is the only domain above its reference: it must gain weight at every update.
    target = [100.0, 0.0, 100.0]
    straight_cb = DynamicBatchLoading(target_loss=target, smoothing=1e-4)
    trainer, dataset = build_trainer(tmp_path / "a", straight_cb)
    trainer.fit()
    history = straight_cb.history
    assert [r["step"] for r in history] == [2, 4]
    prose = [r["weights"][1] for r in history]
    assert prose[0] > 1 / 3 and prose[1] > prose[0]
    assert all(math.isfinite(x) for r in history for x in r["eval_loss"])
    np.testing.assert_allclose(dataset.weights, history[-1]["weights"])
    # The losses it used are exactly Composer's eval metrics of that round.
    last = trainer.state.eval_metrics["eval/prose"]["LanguageCrossEntropy"].compute()
    assert history[-1]["eval_loss"][1] == pytest.approx(float(last))
    trainer.close()

    # Resume from the checkpoint at batch 2 with a fresh dataset at its initial weights.
    resumed_cb = DynamicBatchLoading(target_loss=target, smoothing=1e-4)
    ckpt = tmp_path / "a" / "ckpt" / "ep0-ba2-rank0.pt"
    trainer2, dataset2 = build_trainer(tmp_path / "b", resumed_cb, load_path=str(ckpt))
    assert resumed_cb.history == history[:1]
    trainer2.fit()
    assert len(resumed_cb.history) == 2
    np.testing.assert_allclose(resumed_cb.history[1]["weights"], history[1]["weights"], rtol=1e-6)
    np.testing.assert_allclose(
        resumed_cb.history[1]["eval_loss"], history[1]["eval_loss"], rtol=1e-5
    )
    np.testing.assert_allclose(dataset2.weights, history[-1]["weights"], rtol=1e-6)
    trainer2.close()


# ----------------------------------------------------------------------------- LLM Foundry


REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "yamls" / "tests" / "dynamic_batch_loading_tiny.yaml"


@pytest.fixture(scope="module")
def foundry_inputs(tmp_path_factory, tiny_tokenizer_dir):
    from tests.mds_helpers import write_domain_shards
    from tests.tiny_models import save_tiny_checkpoint, tiny_model

    root = tmp_path_factory.mktemp("dbl_foundry")
    data = write_domain_shards(root / "data", str(tiny_tokenizer_dir), max_seq_len=32)
    model_dir = save_tiny_checkpoint(
        tiny_model("llama_gqa", num_hidden_layers=2), tiny_tokenizer_dir, root / "model"
    )
    return data, model_dir


def overrides(data, model_dir, *extra):
    return [f"variables.data_local={data}", f"variables.model_dir={model_dir}", *extra]


@pytest.mark.slow
def test_llmfoundry_train_from_yaml(foundry_inputs, tmp_path):
    from llmfoundry.command_utils import train_from_yaml

    data, model_dir = foundry_inputs
    trainer = train_from_yaml(str(TINY_YAML), overrides(data, model_dir))
    callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicBatchLoading))
    dataset = find_multi_domain_dataset(trainer.state.train_dataloader)
    assert dataset.domains == ["code", "books", "docs"]
    history = callback.history
    # eval_interval 2ba over 6ba: updates after batches 2, 4 and 6.
    assert [r["step"] for r in history] == [2, 4, 6]
    books = [1 / 3] + [r["weights"][1] for r in history]
    assert all(b > a for a, b in itertools.pairwise(books))
    for record in history:
        assert all(math.isfinite(x) and x > 0 for x in record["eval_loss"])
        assert sum(record["weights"]) == pytest.approx(1.0)
    np.testing.assert_allclose(dataset.weights, history[-1]["weights"])
    # The losses are Composer's per-domain eval metrics of the last round.
    for i, domain in enumerate(dataset.domains):
        metric = trainer.state.eval_metrics[f"eval/{domain}"]["LanguageCrossEntropy"]
        assert history[-1]["eval_loss"][i] == pytest.approx(float(metric.compute()))
    trainer.close()


@pytest.mark.slow
def test_llmfoundry_resume_continues_exactly(foundry_inputs, tmp_path, caplog):
    from llmfoundry.command_utils import train_from_yaml

    data, model_dir = foundry_inputs
    save = [f"save_folder={tmp_path / 'ckpt'}", "save_interval=2ba", "save_overwrite=true"]
    straight = train_from_yaml(str(TINY_YAML), overrides(data, model_dir, *save))
    history = next(
        c for c in straight.state.callbacks if isinstance(c, DynamicBatchLoading)
    ).history
    straight.close()
    (ckpt,) = (tmp_path / "ckpt").glob("*ba4-rank0.pt")

    caplog.set_level("WARNING", logger="composer_shear.callbacks.dynamic_batch_loading")
    resumed = train_from_yaml(str(TINY_YAML), overrides(data, model_dir, f"load_path={ckpt}"))
    callback = next(c for c in resumed.state.callbacks if isinstance(c, DynamicBatchLoading))
    # The mixer restored its own weights, equal to the callback's: no reconciliation needed.
    assert "differ from the last" not in caplog.text
    assert [r["step"] for r in callback.history] == [2, 4, 6]
    assert callback.history[:2] == history[:2]
    np.testing.assert_allclose(callback.history[2]["weights"], history[2]["weights"], rtol=1e-6)
    np.testing.assert_allclose(callback.history[2]["eval_loss"], history[2]["eval_loss"], rtol=1e-5)
    dataset = find_multi_domain_dataset(resumed.state.train_dataloader)
    np.testing.assert_allclose(dataset.weights, history[2]["weights"], rtol=1e-6)
    resumed.close()


MULTIPROCESS_SCRIPT = """
import json, sys
import numpy as np
from composer import Callback
from composer.utils import dist
from llmfoundry import registry
from llmfoundry.command_utils import train_from_yaml
from composer_shear.callbacks import DynamicBatchLoading
from composer_shear.data.mixer import find_multi_domain_dataset

yaml_path, out_dir, ckpt_dir, *args = sys.argv[1:]
batches = []


class RecordBatches(Callback):
    def after_dataloader(self, state, logger):
        b = state.batch
        batches.append([b["domain_idx"].tolist(), b["input_ids"].sum(dim=1).tolist()])


registry.callbacks.register("record_batches", func=RecordBatches)
save = [f"save_folder={ckpt_dir}", "save_interval=2ba", "save_overwrite=true"]
trainer = train_from_yaml(yaml_path, [*args, *save, "callbacks.record_batches={}"])
callback = next(c for c in trainer.state.callbacks if isinstance(c, DynamicBatchLoading))
dataset = find_multi_domain_dataset(trainer.state.train_dataloader)
result = {
    "world_size": dist.get_world_size(),
    "history": callback.history,
    "disagreements": callback.rank_disagreements,
    "weights": dataset.weights.tolist(),
    "counts": dataset.domain_counts.tolist(),
    "batches": list(batches),
}
trainer.close()

# Resume from rank 0's checkpoint at batch 4 (Composer gives every rank rank 0's data state).
batches.clear()
load = [f"load_path={ckpt_dir}/ep0-ba4-rank0.pt", "callbacks.record_batches={}"]
resumed = train_from_yaml(yaml_path, [*args, *load])
callback = next(c for c in resumed.state.callbacks if isinstance(c, DynamicBatchLoading))
result["resumed_batches"] = list(batches)
result["resumed_history"] = callback.history
resumed_dataset = find_multi_domain_dataset(resumed.state.train_dataloader)
result["resumed_counts"] = resumed_dataset.domain_counts.tolist()
resumed.close()

# Many draws from the same (real) loader: every rank's domain sequence, before and after a
# weight change that every rank makes at the same position.
it = iter(dataset)
draws = [next(it)["domain_idx"] for _ in range(1500)]
dataset.set_weights([0.6, 0.3, 0.1])
draws += [next(it)["domain_idx"] for _ in range(1500)]
result["draws"] = draws
with open(f"{out_dir}/rank{dist.get_global_rank()}.json", "w") as f:
    json.dump(result, f)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ranks_agree_on_weights_and_draw_independently(foundry_inputs, tmp_path):
    """`composer -n 2`: identical weights, independent per-rank domain draws whose pooled
    frequencies follow the weights, and an exact resume of both ranks from rank 0's state."""
    import os
    import subprocess
    import sys

    from scipy.stats import chisquare

    data, model_dir = foundry_inputs
    script = tmp_path / "run_dbl.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    composer = Path(sys.executable).parent / "composer"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [str(composer), "-n", "2", "--stdout", str(tmp_path / "rank{rank}.out")]
    cmd += ["--stderr", str(tmp_path / "rank{rank}.err"), str(script), str(TINY_YAML), str(out)]
    cmd += [str(tmp_path / "ckpt")]
    # Global batch 4 = 2 samples per rank per step; the YAML's microbatch sizes are per rank.
    cmd += overrides(data, model_dir, "device_train_microbatch_size=2", "device_eval_batch_size=2")
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("rank*.err")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["history"]) == 3
    # Identical weights (and losses) after every update, and no rank had to be overruled.
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["disagreements"] == ranks[1]["disagreements"] == 0
    books = [r["weights"][1] for r in ranks[0]["history"]]
    assert books[0] > 1 / 3 and books[-1] > books[0]
    # Each rank drew its own domains: 6 batches x 2 sequences, each rank 12 draws.
    domains = [[d for b in r["batches"] for d in b[0]] for r in ranks]
    assert len(domains[0]) == len(domains[1]) == 12
    assert domains[0] != domains[1]
    assert sum(ranks[0]["counts"]) == sum(ranks[1]["counts"]) == 12

    # Resumed from rank 0's checkpoint at batch 4: both ranks see exactly batches 5 and 6 again.
    for r in ranks:
        assert r["resumed_batches"] == r["batches"][4:]
        assert r["resumed_counts"] == r["counts"]
        assert r["resumed_history"][:2] == r["history"][:2]
        np.testing.assert_allclose(
            r["resumed_history"][2]["weights"], r["history"][2]["weights"], rtol=1e-6
        )

    # 3,000 draws per rank: the ranks agree about as often as independent draws do (sum of
    # w^2: identical draws would agree always), and the pooled frequencies follow the weights,
    # before and after a change.
    d0, d1 = (np.asarray(r["draws"]) for r in ranks)
    for part, weights in (
        (slice(0, 1500), ranks[0]["weights"]),
        (slice(1500, 3000), [0.6, 0.3, 0.1]),
    ):
        agree = float(np.mean(d0[part] == d1[part]))
        assert abs(agree - float(np.sum(np.square(weights)))) < 0.06, (agree, weights)
        pooled = np.concatenate([d0[part], d1[part]])
        observed = np.bincount(pooled, minlength=3)
        expected = np.asarray(weights) * len(pooled)
        assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
