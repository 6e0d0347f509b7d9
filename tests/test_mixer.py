"""The live domain mixer: frequencies, weight changes, ranks, passes and exact resumption."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch.utils.data import DataLoader

from composer_shear.data.mixer import MultiDomainDataset, find_multi_domain_dataset
from tests.mds_helpers import synthetic_domains, write_domain_shards

DOMAINS = ["code", "books", "docs"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("mixer") / "mds"
    return write_domain_shards(out, tiny_tokenizer_dir, synthetic_domains(tuple(DOMAINS)), 16)


def make(shards, proportion=(0.5, 0.3, 0.2), **kwargs) -> MultiDomainDataset:
    return MultiDomainDataset(DOMAINS, str(shards), proportion=proportion, max_seq_len=16, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def key(sample) -> tuple:
    return (sample["domain_idx"], *sample["input_ids"].tolist())


def num_samples(shards, domain) -> int:
    return json.loads((shards / domain / "train" / "tokens_meta.json").read_text())["samples"]


def assert_matches_weights(domains_drawn, weights):
    observed = np.bincount(domains_drawn, minlength=len(weights))
    expected = np.asarray(weights) * len(domains_drawn)
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_interface_and_sample_format(shards):
    ds = make(shards)
    assert ds.domains == DOMAINS
    np.testing.assert_allclose(ds.weights, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(ds.initial_weights, [0.5, 0.3, 0.2])
    sample = next(iter(ds))
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (16,)
    assert isinstance(sample["domain_idx"], int)
    assert ds.domain_counts.sum() == 1 and ds.domain_counts[sample["domain_idx"]] == 1
    with pytest.raises(TypeError):
        len(ds)


def test_frequencies_follow_weights_before_and_after_a_change(shards):
    ds = make(shards)
    it = iter(ds)
    first = [s["domain_idx"] for s in take(it, 3000)]
    assert_matches_weights(first, [0.5, 0.3, 0.2])
    ds.set_weights([0.1, 0.1, 0.8])
    np.testing.assert_allclose(ds.weights, [0.1, 0.1, 0.8])
    second = [s["domain_idx"] for s in take(it, 3000)]
    assert_matches_weights(second, [0.1, 0.1, 0.8])
    assert ds.domain_counts.tolist() == np.bincount(first + second, minlength=3).tolist()
    # A zero weight is never drawn.
    ds.set_weights([0.0, 1.0, 0.0])
    assert {s["domain_idx"] for s in take(it, 300)} == {1}


def test_weight_change_takes_effect_at_the_next_draw(shards):
    a, b = make(shards), make(shards)
    ia, ib = iter(a), iter(b)
    take(ia, 37), take(ib, 37)
    a.set_weights([0.0, 0.0, 1.0])
    sa = next(ia)
    assert sa["domain_idx"] == 2
    assert a.domain_counts.sum() == 38
    # The draw at a position depends only on (seed, position) and the current weights.
    b.set_weights([0.0, 0.0, 1.0])
    assert key(next(ib)) == key(sa)


def test_set_weights_validation(shards):
    ds = make(shards)
    for bad, msg in (
        ([0.5, 0.5], "expected 3 weights"),
        ([0.5, 0.6, -0.1], "non-negative"),
        ([0.5, 0.3, 0.3], "sum to 1"),
        ([float("nan"), 0.5, 0.5], "finite"),
    ):
        with pytest.raises(ValueError, match=msg):
            ds.set_weights(bad)
    np.testing.assert_allclose(ds.weights, [0.5, 0.3, 0.2])
    ds.set_weights([0.2, 0.3, 0.5 + 5e-7])  # within 1e-6: renormalised exactly
    assert ds.weights.sum() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="sum to 1"):
        make(shards, proportion=(0.5, 0.5, 0.5))


def test_same_seed_same_sequence_other_seed_other_sequence(shards):
    seq = lambda ds: [key(s) for s in take(iter(ds), 200)]  # noqa: E731
    assert seq(make(shards)) == seq(make(shards))
    assert seq(make(shards)) != seq(make(shards, mix_seed=99))


def test_no_repeat_within_a_pass_and_a_new_pass_on_exhaustion(shards, caplog):
    n = num_samples(shards, "code")
    ds = make(shards, proportion=(1.0, 0.0, 0.0))
    it = iter(ds)
    first = [key(s) for s in take(it, n)]
    assert len(set(first)) == n  # every sample of the domain exactly once
    assert ds.domain_epochs.tolist() == [0, 0, 0]
    with caplog.at_level("INFO", logger="composer_shear.data.mixer"):
        second = [key(s) for s in take(it, n)]
    assert ds.domain_epochs.tolist() == [1, 0, 0]
    assert "pass 0 finished" in caplog.text
    assert set(second) == set(first) and second != first  # same samples, reshuffled
    take(it, 1)
    assert ds.domain_epochs.tolist() == [2, 0, 0]


def test_small_domain_cycles_without_crashing(shards):
    ds = make(shards, proportion=(0.1, 0.1, 0.8))
    take(iter(ds), 3 * num_samples(shards, "docs"))
    assert ds.domain_epochs[2] >= 2


# ----------------------------------------------------------------------------- resumption


def straight_run(shards, total, change_at, new_weights):
    ds = make(shards)
    it = iter(ds)
    out = [key(s) for s in take(it, change_at)]
    ds.set_weights(new_weights)
    out += [key(s) for s in take(it, total - change_at)]
    return out


@pytest.mark.parametrize("k", [0, 150, 420, 1000])
def test_resume_from_state_dict_is_exact(shards, k):
    total, change_at, new_w = 1300, 300, [0.1, 0.2, 0.7]
    expected = straight_run(shards, total, change_at, new_w)

    ds = make(shards)
    it = iter(ds)
    got = [key(s) for s in take(it, min(k, change_at))]
    if k > change_at:
        ds.set_weights(new_w)
        got += [key(s) for s in take(it, k - change_at)]
    state = json.loads(json.dumps(ds.state_dict(k, True)))  # must survive serialisation
    assert state["position"] == k
    del ds, it

    fresh = make(shards)
    fresh.load_state_dict(state)
    assert fresh.position == k
    it = iter(fresh)
    if k <= change_at:
        got += [key(s) for s in take(it, change_at - k)]
        fresh.set_weights(new_w)
        got += [key(s) for s in take(it, total - change_at)]
    else:
        got += [key(s) for s in take(it, total - k)]
    assert got == expected
    # The resumed run crossed pass boundaries of the smaller domains.
    assert fresh.domain_epochs.max() >= 1
    np.testing.assert_array_equal(
        fresh.domain_counts, np.bincount([g[0] for g in expected], minlength=3)
    )


def test_resume_exactly_at_the_end_of_a_pass(shards):
    n = num_samples(shards, "code")
    straight = make(shards, proportion=(1.0, 0.0, 0.0))
    expected = [key(s) for s in take(iter(straight), n + 50)]
    ds = make(shards, proportion=(1.0, 0.0, 0.0))
    take(iter(ds), n)  # the pass is used up, but its end has not been seen yet
    fresh = make(shards, proportion=(1.0, 0.0, 0.0))
    fresh.load_state_dict(ds.state_dict(n, True))
    assert expected[n:] == [key(s) for s in take(iter(fresh), 50)]
    assert fresh.domain_epochs.tolist() == [1, 0, 0]


def test_state_dict_rewinds_to_composers_sample_count(shards):
    """Samples drawn but not yet trained on (and a later weight change) are given back."""
    total, change_at, new_w = 600, 380, [0.05, 0.05, 0.9]
    expected = straight_run(shards, total, change_at, new_w)

    ds = make(shards)
    it = iter(ds)
    take(it, change_at)
    ds.set_weights(new_w)
    take(it, 20)  # drawn up to 400
    state = ds.state_dict(350, True)  # ... but only 350 were trained on
    assert state["position"] == 350
    np.testing.assert_allclose(state["weights"], [0.5, 0.3, 0.2])
    assert [p for p, _ in state["pending_weights"]] == [change_at]

    fresh = make(shards)
    fresh.load_state_dict(state)
    got = expected[:350] + [key(s) for s in take(iter(fresh), total - 350)]
    assert got == expected
    np.testing.assert_allclose(fresh.weights, new_w)


def test_load_state_dict_into_a_used_object_and_mismatch_errors(shards):
    a = make(shards)
    ia = iter(a)
    take(ia, 250)
    state = a.state_dict(250, True)
    expected = [key(s) for s in take(ia, 200)]
    take(ia, 300)  # move on, into later passes
    a.load_state_dict(state)  # rewind the same object
    assert [key(s) for s in take(iter(a), 200)] == expected

    other = MultiDomainDataset(["code", "docs"], str(shards), max_seq_len=16)
    with pytest.raises(ValueError, match="domains"):
        other.load_state_dict(state)


def test_state_of_another_world_size_keeps_the_mixture_and_starts_new_passes(shards, caplog):
    ds = make(shards)
    take(iter(ds), 300)
    ds.set_weights([0.1, 0.2, 0.7])
    take(iter(ds), 100)
    state = ds.state_dict(400, True)
    state["world_size"] = 4  # as if saved by a 4-rank run: 4 x 400 global samples
    fresh = make(shards)
    with caplog.at_level("WARNING", logger="composer_shear.data.mixer"):
        fresh.load_state_dict(state)
    assert "resuming a 4-rank data state on 1 ranks" in caplog.text
    assert fresh.position == 1600  # the global sample count carries over
    np.testing.assert_allclose(fresh.weights, [0.1, 0.2, 0.7])
    assert fresh.domain_epochs.tolist() == [e + 1 for e in state["domain_epochs"]]
    drawn = [s["domain_idx"] for s in take(iter(fresh), 2000)]
    assert_matches_weights(drawn, [0.1, 0.2, 0.7])
    # ... and its own states resume exactly from the new base.
    mid = fresh.state_dict(3600, True)
    assert mid["base"]["position"] == 1600
    expected = [key(s) for s in take(iter(fresh), 300)]
    again = make(shards)
    again.load_state_dict(json.loads(json.dumps(mid)))
    assert [key(s) for s in take(iter(again), 300)] == expected


def test_version_1_state_resumes_its_position_weights_and_passes(shards):
    """A state written before per-rank draws (every rank alike) becomes the replay base."""
    ds = make(shards)
    take(iter(ds), 500)
    v2 = ds.state_dict(500, True)
    v1 = {
        "version": 1,
        "domains": v2["domains"],
        "mix_seed": v2["mix_seed"],
        "world_size": 1,
        "position": 500,
        "weights": [0.3, 0.3, 0.4],
        "initial_weights": v2["initial_weights"],
        "pending_weights": [[600, [0.0, 1.0, 0.0]]],
        "domain_epochs": v2["domain_epochs"],
        "domain_consumed": v2["domain_consumed"],
        "domain_counts": v2["domain_counts"],
        "streaming": [{"epoch": 0, "sample_in_epoch": 0, **s} for s in v2["streaming"]],
    }
    fresh = make(shards)
    fresh.load_state_dict(v1)
    assert fresh.position == 500
    np.testing.assert_allclose(fresh.weights, [0.3, 0.3, 0.4])
    assert fresh.domain_epochs.tolist() == v2["domain_epochs"]
    it = iter(fresh)
    take(it, 100)
    assert {s["domain_idx"] for s in take(it, 50)} == {1}  # the pending change applied at 600
    assert fresh.state_dict()["base"]["position"] == 500


def test_domain_readers_with_workers_give_the_same_stream(shards):
    plain = [key(s) for s in take(iter(make(shards)), 400)]
    workers = make(shards, num_workers=1, domain_batch_size=8)
    assert [key(s) for s in take(iter(workers), 400)] == plain


def test_eval_split_is_one_finite_pass(shards):
    ds = MultiDomainDataset(
        ["code", "docs"], str(shards), split="eval", max_seq_len=16, shuffle=False
    )
    samples = list(ds)
    n_code = json.loads((shards / "code" / "eval" / "tokens_meta.json").read_text())["samples"]
    n_docs = json.loads((shards / "docs" / "eval" / "tokens_meta.json").read_text())["samples"]
    assert len(ds) == len(samples) == n_code + n_docs
    assert [s["domain_idx"] for s in samples] == [0] * n_code + [1] * n_docs
    assert len({key(s) for s in samples}) == len(samples)
    assert [key(s) for s in ds] == [key(s) for s in samples]  # every pass is the same


def test_find_multi_domain_dataset(shards):
    from composer.core import DataSpec

    ds = make(shards)
    loader = DataLoader(ds, batch_size=2, collate_fn=lambda x: x)
    assert find_multi_domain_dataset(ds) is ds
    assert find_multi_domain_dataset(loader) is ds
    assert find_multi_domain_dataset(DataSpec(loader)) is ds
    assert find_multi_domain_dataset(DataLoader(list(range(4)))) is None
    assert find_multi_domain_dataset(None) is None


def test_workers_in_the_outer_loader_are_refused(shards):
    loader = DataLoader(make(shards), batch_size=2, num_workers=1, collate_fn=lambda x: x)
    with pytest.raises(RuntimeError, match="main process"):
        next(iter(loader))


# ----------------------------------------------------------------------------- two ranks


N_RANK, SAVE_AT = 1200, 700  # draws per rank; the checkpoint position (after the change)
CHANGE_AT, NEW_W = 600, [0.2, 0.2, 0.6]


def _rank_main() -> None:
    """Entry of one simulated rank (env vars RANK etc. set by the test).

    ``straight``: draws ``N_RANK`` samples, changing the weights at ``CHANGE_AT`` as the
    callback would on every rank, and saves the state at ``SAVE_AT`` (behind what was drawn,
    as Composer's sample count is). ``resume STATE``: loads that state (rank 0's, as Composer
    gives every rank) and draws the rest.
    """
    shards, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    # One process group for the whole run, as under Composer (otherwise Streaming creates and
    # destroys one per dataset, on the same port, which flakes on a busy machine).
    torch.distributed.init_process_group("gloo")
    ds = MultiDomainDataset(DOMAINS, shards, proportion=[0.5, 0.3, 0.2], max_seq_len=16)
    it = iter(ds)
    out_obj: dict = {}

    def draws(n):
        # (domain, pass of that domain on this rank, tokens...) of each sample.
        out = []
        for _ in range(n):
            s = next(it)
            d = s["domain_idx"]
            out.append([d, int(ds.domain_epochs[d]), *key(s)[1:]])
        return out

    if mode == "straight":
        seq = draws(CHANGE_AT)
        ds.set_weights(NEW_W)
        seq += draws(N_RANK - CHANGE_AT)
        out_obj["state"] = ds.state_dict(2 * SAVE_AT, True)  # global samples, 2 ranks
        out_obj["counts"] = ds.domain_counts.tolist()
    else:
        ds.load_state_dict(json.loads(Path(sys.argv[4]).read_text()))
        seq = draws(N_RANK - SAVE_AT)
    out_obj["seq"] = seq
    Path(out).write_text(json.dumps(out_obj))
    torch.distributed.destroy_process_group()


def _launch_two_ranks(tmp_path, name, *args):
    with socket.socket() as sock:  # Streaming sets up a gloo group from these variables
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(LOCAL_WORLD_SIZE="2", NODE_RANK="0", PYTHONPATH=str(REPO))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = "import sys; from tests.test_mixer import _rank_main; _rank_main()"
        out = tmp_path / f"{name}{rank}.json"
        cmd = [sys.executable, "-c", code, str(tmp_path / "mds"), str(out), *args]
        # Logs go to files: a full pipe would stall one rank and the other at a barrier.
        log = open(tmp_path / f"{name}{rank}.log", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log), log))
    try:
        for rank, (p, log) in enumerate(procs):
            p.wait(timeout=240)
            log.close()
            assert p.returncode == 0, (tmp_path / f"{name}{rank}.log").read_text()[-3000:]
    finally:  # one rank failing leaves the other waiting at a barrier: end both
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    return [json.loads((tmp_path / f"{name}{r}.json").read_text()) for r in range(2)]


def test_two_ranks_draw_independently_and_resume_from_rank0_state(shards, tmp_path):
    # A private copy: Streaming's non-leader ranks find the leader's shared memory by local
    # folder, and would otherwise find the datasets this test process holds on `shards`.
    shutil.copytree(shards, tmp_path / "mds")
    r0, r1 = _launch_two_ranks(tmp_path, "straight", "straight")
    s0, s1 = r0["seq"], r1["seq"]
    d0, d1 = [s[0] for s in s0], [s[0] for s in s1]
    # Independent draws: the ranks agree at about sum(w^2) of the positions (0.38 for the
    # initial weights), not at all of them.
    agree = np.mean(np.equal(d0[:CHANGE_AT], d1[:CHANGE_AT]))
    assert 0.25 < agree < 0.5, agree
    # Every sequence of the global batch is a draw from the current weights.
    assert_matches_weights(d0[:CHANGE_AT] + d1[:CHANGE_AT], [0.5, 0.3, 0.2])
    assert_matches_weights(d0[CHANGE_AT:] + d1[CHANGE_AT:], NEW_W)
    assert r0["counts"] != r1["counts"]
    # Passes are per rank: within one pass of a domain no sample repeats on a rank, and the
    # ranks' parts of a pass are disjoint. (Streaming pads a pass to a multiple of the world
    # size by repeating samples: with 2 ranks, at most one sample of an odd-sized domain.)
    parts = {}
    for rank, seq in enumerate((s0, s1)):
        for d, epoch, *tokens in seq:
            parts.setdefault((rank, d, epoch), []).append(tuple(tokens))
    assert max(e for _, _, e in parts) >= 2  # several passes of the small domains
    for (rank, d, epoch), samples in parts.items():
        assert len(samples) - len(set(samples)) <= 1, (rank, d, epoch)
        if rank == 0 and (1, d, epoch) in parts:
            assert len(set(samples) & set(parts[(1, d, epoch)])) <= 1

    # Rank 0's state, given to both ranks, resumes both exactly (after a weight change,
    # across pass boundaries, at a position behind what was drawn).
    state = tmp_path / "rank0_state.json"
    state.write_text(json.dumps(r0["state"]))
    assert r0["state"]["position"] == SAVE_AT
    resumed = _launch_two_ranks(tmp_path, "resumed", "resume", str(state))
    assert resumed[0]["seq"] == s0[SAVE_AT:]
    assert resumed[1]["seq"] == s1[SAVE_AT:]
