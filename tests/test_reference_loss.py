"""Reference losses: scaling-law fit, per-domain evaluation on MDS shards, the CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import yaml

from composer_shear.data.calibration import read_mds_token_samples
from composer_shear.data.reference_loss import (
    evaluate_domain_losses,
    fit_scaling_law,
    predict_loss,
    register_cli,
    target_loss_snippet,
)
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
