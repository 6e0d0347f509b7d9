"""Reference losses: scaling-law fit, per-domain evaluation on MDS shards, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml

from composer_shear.data.calibration import read_mds_token_samples
from composer_shear.data.reference_loss import (
    _domain_sums,
    evaluate_domain_losses,
    fit_scaling_law,
    predict_loss,
    register_cli,
    target_loss_snippet,
)
from tests.pruning_helpers import REPO, VENV_BIN, composer_launch, free_port
from tests.tiny_models import save_tiny_checkpoint, tiny_model

# ----------------------------------------------------------------------------- scaling law


@pytest.mark.parametrize(
    ("a", "b", "c", "sizes"),
    [
        (400.0, 0.3, 1.6, [7e9, 13e9, 70e9]),  # Llama-2-like sizes, exactly determined
        (25.0, 0.2, 0.8, [1.35e8, 3.6e8, 1.7e9, 7e9, 13e9, 70e9]),
        (3.0, 1.1, 0.0, [1.0, 2.0, 4.0, 8.0]),  # c at its bound
    ],
)
def test_fit_recovers_known_law(a, b, c, sizes):
    losses = [a * n**-b + c for n in sizes]
    params = fit_scaling_law(sizes, losses)
    fit_a, fit_b, fit_c = params
    assert fit_b == pytest.approx(b, rel=1e-3)
    assert fit_a == pytest.approx(a, rel=1e-2)
    assert fit_c == pytest.approx(c, abs=1e-3)
    target = 2.7e9 if sizes[0] > 100 else 3.0
    assert predict_loss(params, target) == pytest.approx(a * target**-b + c, rel=1e-4)
    np.testing.assert_allclose(predict_loss(params, np.array(sizes)), losses, rtol=1e-5)


def test_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e8, 1e11, 12)
    clean = 50.0 * sizes**-0.25 + 1.7
    params = fit_scaling_law(sizes, clean + rng.normal(0, 0.002, sizes.size))
    assert predict_loss(params, 2.7e9) == pytest.approx(50.0 * 2.7e9**-0.25 + 1.7, abs=0.01)


def test_fit_needs_three_sizes():
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_scaling_law([7e9, 13e9], [2.0, 1.9])
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_scaling_law([7e9, 7e9, 13e9], [2.0, 2.0, 1.9])
    with pytest.raises(ValueError, match="differ in length"):
        fit_scaling_law([1, 2, 3], [2.0, 1.9])


# ----------------------------------------------------------------------------- evaluation


def _write_mds(out_dir, samples, layout="input_ids"):
    from streaming import MDSWriter

    if layout == "input_ids":
        columns = {"input_ids": "ndarray:int32"}
        rows = [{"input_ids": np.asarray(s, dtype=np.int32)} for s in samples]
        compression = None
    else:  # llm-foundry's legacy bytes layout, compressed
        columns = {"tokens": "bytes"}
        rows = [{"tokens": np.asarray(s, dtype=np.int64).tobytes()} for s in samples]
        compression = "zstd"
    with MDSWriter(out=str(out_dir), columns=columns, compression=compression) as writer:
        for row in rows:
            writer.write(row)


@pytest.fixture(scope="module")
def tiny_domain_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("domains")
    samples = {
        # A repetitive domain (low loss after training would tell them apart; here just distinct).
        "alpha": [rng.integers(3, 40, size=n).tolist() for n in (24, 17, 24, 9, 24)],
        "beta": [rng.integers(3, 500, size=24).tolist() for _ in range(3)],
    }
    _write_mds(root / "alpha" / "eval", samples["alpha"], "input_ids")
    _write_mds(root / "beta" / "eval", samples["beta"], "tokens")
    return root, samples


def _direct_loss(model, samples, max_seq_len):
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor(s[:max_seq_len]).unsqueeze(0)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        n = ids.size(1) - 1
        total += float(out.loss) * n
        count += n
    return total / count


def test_read_mds_layouts(tiny_domain_data):
    root, samples = tiny_domain_data
    got = [x.tolist() for x in read_mds_token_samples(root / "alpha" / "eval")]
    assert got == samples["alpha"]
    got = [x.tolist() for x in read_mds_token_samples(root / "beta" / "eval", max_samples=2)]
    assert got == samples["beta"][:2]
    # Decompression did not write into the data directory.
    assert not list((root / "beta" / "eval").glob("*.mds"))


def test_evaluate_matches_direct_hf(tiny_domain_data, tiny_tokenizer_dir, tmp_path):
    root, samples = tiny_domain_data
    model = tiny_model("llama_gqa")
    model_dir = save_tiny_checkpoint(model, tiny_tokenizer_dir, tmp_path / "model")
    losses = evaluate_domain_losses(model_dir, root, max_seq_len=20, batch_size=2)
    assert list(losses) == ["alpha", "beta"]
    for domain, value in losses.items():
        assert np.isfinite(value)
        assert value == pytest.approx(_direct_loss(model, samples[domain], 20), rel=1e-5)
    # Explicit order, sample cap.
    capped = evaluate_domain_losses(
        model_dir, root, domains=["beta", "alpha"], max_seq_len=20, max_samples=2
    )
    assert list(capped) == ["beta", "alpha"]
    assert capped["alpha"] == pytest.approx(_direct_loss(model, samples["alpha"][:2], 20))


def test_evaluate_in_bfloat16(tiny_domain_data, tiny_tokenizer_dir, tmp_path):
    """``dtype``: the weights load in bfloat16; the loss is the bfloat16 model's, near fp32's."""
    root, samples = tiny_domain_data
    model = tiny_model("llama_gqa")
    model_dir = save_tiny_checkpoint(model, tiny_tokenizer_dir, tmp_path / "model")
    full = evaluate_domain_losses(model_dir, root, max_seq_len=20, batch_size=2)
    half = evaluate_domain_losses(model_dir, root, max_seq_len=20, batch_size=2, dtype="bfloat16")
    bf16 = model.to(torch.bfloat16)
    for domain, value in half.items():
        assert value != full[domain]  # not silently fp32
        assert value == pytest.approx(_direct_loss(bf16, samples[domain], 20), rel=1e-3)
        assert value == pytest.approx(full[domain], rel=2e-2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        evaluate_domain_losses(model_dir, root, dtype="int8")


# ----------------------------------------------------------------------------- CLI


def _parser():
    parser = argparse.ArgumentParser(prog="composer-shear")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_snippet_is_valid_yaml():
    snippet = target_loss_snippet({"cc": 1.87123, "github": 0.6883})
    parsed = yaml.safe_load(snippet)
    cfg = parsed["callbacks"]["dynamic_batch_loading"]
    assert cfg == {"update_type": "doremi", "target_loss": {"cc": 1.8712, "github": 0.6883}}
    assert list(cfg["target_loss"]) == ["cc", "github"]


def test_cli_fit(tmp_path, capsys):
    sizes = [7e9, 13e9, 70e9]
    spec = {
        "sizes": sizes,
        "losses": {
            "cc": [400.0 * n**-0.3 + 1.6 for n in sizes],
            "github": [30.0 * n**-0.2 + 0.5 for n in sizes],
        },
    }
    fit_file = tmp_path / "losses.json"
    fit_file.write_text(json.dumps(spec))
    out = tmp_path / "snippet.yaml"
    args = _parser().parse_args(
        ["reference-loss", "--fit", str(fit_file), "--target-params", "2.7e9", "--out", str(out)]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "dynamic_batch_loading" in printed
    target = yaml.safe_load(out.read_text())["callbacks"]["dynamic_batch_loading"]["target_loss"]
    assert list(target) == ["cc", "github"]
    assert target["cc"] == pytest.approx(400.0 * 2.7e9**-0.3 + 1.6, abs=1e-4)
    assert target["github"] == pytest.approx(30.0 * 2.7e9**-0.2 + 0.5, abs=1e-4)
    # The recipe's domain order (RedPajama's: cc before github), and a domain it lacks.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "variables: {domains: [github, cc]}\n"
        "train_loader: {name: multi_domain, dataset: {domains: '${variables.domains}'}}\n"
    )
    common = ["reference-loss", "--fit", str(fit_file), "--target-params", "2.7e9"]
    args = _parser().parse_args([*common, "--recipe", str(recipe), "--out", str(out)])
    assert args.func(args) == 0
    target = yaml.safe_load(out.read_text())["callbacks"]["dynamic_batch_loading"]["target_loss"]
    assert list(target) == ["github", "cc"]
    capsys.readouterr()
    # The command line is well formed; the data lacks the domain: a failed command (exit 1).
    args = _parser().parse_args([*common, "--domains", "cc", "book"])
    assert args.func(args) == 1
    assert "no domain(s) ['book']" in capsys.readouterr().err


def test_cli_evaluate(tiny_domain_data, tiny_tokenizer_dir, tmp_path, capsys):
    root, _ = tiny_domain_data
    model_dir = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, tmp_path / "m")
    args = _parser().parse_args(
        ["reference-loss", "--model", str(model_dir), "--data", str(root), "--domains", "beta"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed[printed.index("# target_loss") :])
    assert list(cfg["callbacks"]["dynamic_batch_loading"]["target_loss"]) == ["beta"]
    # A domain without an eval split: a clear error naming it and the ones there are.
    args = _parser().parse_args(
        ["reference-loss", "--model", str(model_dir), "--data", str(root), "--domains", "gamma"]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "no domain(s) ['gamma']" in err and "'beta'" in err


def test_cli_needs_a_mode(capsys):
    from composer_shear.cli import main

    for argv in (
        ["reference-loss"],
        ["reference-loss", "--model", "m"],
        ["reference-loss", "--fit", "f"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2  # a usage error, like argparse's own
    err = capsys.readouterr().err
    assert "error: give either --model and --data, or --fit and --target-params" in err
    assert "error: --fit needs --target-params" in err
    assert "error: --model needs --data" in err


def test_evaluate_on_prepared_shards(tiny_tokenizer_dir, tmp_path):
    from tests.mds_helpers import write_domain_shards

    data = write_domain_shards(tmp_path / "data", str(tiny_tokenizer_dir), max_seq_len=32)
    model = tiny_model("llama_gqa", num_hidden_layers=1)
    model_dir = save_tiny_checkpoint(model, tiny_tokenizer_dir, tmp_path / "model")
    losses = evaluate_domain_losses(model_dir, data, max_seq_len=32, batch_size=8)
    assert sorted(losses) == ["books", "code", "docs"]
    for domain, value in losses.items():
        samples = [x.tolist() for x in read_mds_token_samples(data / domain / "eval")]
        assert samples and all(len(s) == 32 for s in samples)
        assert value == pytest.approx(_direct_loss(model, samples, 32), rel=1e-5)


# ----------------------------------------------------------------------------- several ranks

# Imported by every launched process (first on PYTHONPATH): test instrumentation through
# Python's audit hooks, not a change to the code under test. It logs each file this rank opens
# for writing, or renames, under WATCH_DIR; and on RANK 1 opening a path containing
# FAIL_ON_RANK1 raises, as a disk error on one rank would.
_SITECUSTOMIZE = """
import os
import sys

_rank = os.environ.get("RANK", "0")
_watch = os.environ.get("WATCH_DIR")
_fail_on = os.environ.get("FAIL_ON_RANK1") if _rank == "1" else None
_written = os.O_WRONLY | os.O_RDWR | os.O_CREAT
_log = None
if _watch:
    _log = os.open(
        os.path.join(os.environ["WATCH_LOG_DIR"], "writes.rank" + _rank),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    )


def _name(path):
    return os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""


def _hook(event, args):
    if event == "open":
        path, mode, flags = _name(args[0]), args[1], args[2] or 0
        if _fail_on and _fail_on in path:
            raise PermissionError("injected failure opening " + path)
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & _written
        if _log is not None and writes and path.startswith(_watch):
            os.write(_log, (path + "\\n").encode())
    elif event in ("os.rename", "os.replace") and _log is not None:
        if _name(args[1]).startswith(_watch):
            os.write(_log, (_name(args[1]) + "\\n").encode())


if _watch or _fail_on:
    sys.addaudithook(_hook)
"""


@pytest.mark.parametrize(("n_samples", "world"), [(5, 2), (7, 3), (1, 2), (8, 2)])
def test_batches_split_over_ranks(n_samples, world):
    """Each rank forwards every world-th batch of the one-process batches; none twice or lost."""
    samples = [np.arange(i, i + 3 + i % 4) for i in range(n_samples)]
    samples.insert(2, np.array([7]))  # nothing to predict: skipped by every rank alike

    def run(rank, world):
        seen = []

        def forward(batch):
            seen.append([x.tolist() for x in batch])
            return float(len(seen)), sum(len(x) - 1 for x in batch)

        return _domain_sums(forward, iter(samples), 5, 2, rank, world), seen

    (_, one_tokens), one_batches = run(0, 1)
    parts = [run(rank, world) for rank in range(world)]
    assert [batch for (_, batches) in parts for batch in batches] != []
    for rank, (_, batches) in enumerate(parts):
        assert batches == one_batches[rank::world]
    assert sum(tokens for (_, tokens), _ in parts) == one_tokens


@pytest.fixture(scope="module")
def multirank_inputs(tiny_tokenizer_dir, tmp_path_factory):
    """A tiny model; 3 domains of 5, 3 and 1 samples (3, 2 and 1 batches of 2); the hook."""
    root = tmp_path_factory.mktemp("multirank")
    rng = np.random.default_rng(1)
    for name, lengths in (("alpha", (24, 17, 24, 9, 24)), ("beta", (20,) * 3), ("gamma", (12,))):
        samples = [rng.integers(3, 500, size=n).tolist() for n in lengths]
        _write_mds(
            root / "data" / name / "eval", samples, "tokens" if name == "beta" else "input_ids"
        )
    model_dir = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, root / "model")
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return model_dir, root / "data", hook_dir


def _reference_loss_args(model_dir, data_dir, out_dir):
    return [
        "reference-loss",
        "--model", str(model_dir),
        "--data", str(data_dir),
        "--max-seq-len", "20",
        "--batch-size", "2",
        "--out", str(out_dir / "snippet.yaml"),
        "--json", str(out_dir / "losses.json"),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_match_one_process(multirank_inputs, tmp_path):
    """``composer -n 2 composer-shear reference-loss``: one process's losses, rank 0 writes."""
    model_dir, data_dir, hook_dir = multirank_inputs
    cli = VENV_BIN / "composer-shear"
    one, two, logs = tmp_path / "one", tmp_path / "two", tmp_path / "logs"
    for folder in (one, two, logs):
        folder.mkdir()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    single = subprocess.run(
        [str(cli), *_reference_loss_args(model_dir, data_dir, one)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    single_s = time.perf_counter() - started
    assert single.returncode == 0, single.stderr[-3000:]
    started = time.perf_counter()
    proc = composer_launch(
        2,
        cli,
        *_reference_loss_args(model_dir, data_dir, two),
        timeout=300,
        env={
            "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO}",
            "WATCH_DIR": str(two),
            "WATCH_LOG_DIR": str(logs),
        },
        launcher_args=[
            "--stdout",
            f"{logs}/rank{{rank}}.out",
            "--stderr",
            f"{logs}/rank{{rank}}.err",
        ],
    )
    double_s = time.perf_counter() - started
    print(f"reference-loss wall time: 1 process {single_s:.1f} s, composer -n 2 {double_s:.1f} s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    expected = json.loads((one / "losses.json").read_text())
    got = json.loads((two / "losses.json").read_text())
    assert list(expected) == list(got) == ["alpha", "beta", "gamma"]
    for domain, value in expected.items():
        assert np.isfinite(value)
        assert got[domain] == pytest.approx(value, rel=1e-6)
    assert (two / "snippet.yaml").read_text() == (one / "snippet.yaml").read_text()
    # Rank 0 printed the table and wrote both files; rank 1 printed and wrote nothing.
    assert proc.stdout.count("target_loss:") == 1
    rank0_writes = (logs / "writes.rank0").read_text().split()
    assert {str(two / "snippet.yaml"), str(two / "losses.json")} <= set(rank0_writes)
    assert not (logs / "writes.rank1").exists() or not (logs / "writes.rank1").read_text()
    assert "target_loss" not in (logs / "rank1.out").read_text()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_failing_rank_fails_every_rank(multirank_inputs, tmp_path):
    """Rank 1 cannot read a domain: both ranks exit 1, each naming rank 1's error.

    Launched by hand, without a launcher that stops the other ranks when one exits. Without the
    error flag, rank 0 would only see gloo's "Connection reset by peer" when rank 1 died (and
    under NCCL wait for the collective timeout).
    """
    model_dir, data_dir, hook_dir = multirank_inputs
    out = tmp_path / "out"
    out.mkdir()
    base = {
        **os.environ,
        "PYTHONPATH": f"{hook_dir}{os.pathsep}{REPO}",
        "OMP_NUM_THREADS": "1",
        "FAIL_ON_RANK1": str(data_dir / "beta" / "eval" / "shard."),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    command = [str(VENV_BIN / "composer-shear"), *_reference_loss_args(model_dir, data_dir, out)]
    ranks = [
        subprocess.Popen(
            command,
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [rank.communicate(timeout=240) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [1, 1]
    for _, err in outputs:
        assert "evaluating domain 'beta' failed on 1 of 2 ranks (rank 1: PermissionError" in err
        assert "injected failure opening" in err
    assert "target_loss" not in outputs[0][0]
    assert not list(out.iterdir())  # nothing written
