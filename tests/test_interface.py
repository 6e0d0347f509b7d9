"""The command line's conventions: help and defaults, exit codes, progress bars, model paths.

Exit codes and bars are checked on the real ``composer-shear`` console script in
subprocesses (bars on a real pseudo-terminal); the subprocesses of a test start together,
because each spends its ~10 s importing torch and transformers.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from composer_shear.cli import build_parser
from composer_shear.interface import ModelPathError, model_path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "composer-shear")


def _parsers(parser: argparse.ArgumentParser, prog: str = "composer-shear"):
    """``(name, parser)`` of ``parser`` and every subcommand below it."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_option_has_help_and_shows_its_default():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10  # the walk reached the subcommands
    missing, no_default = [], []
    for prog, parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{prog} {name}")
                continue
            shown = formatter._expand_help(action) if action.help else ""
            meaningful = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
            if action.option_strings and meaningful and "default" not in shown.lower():
                no_default.append(f"{prog} {name} (default {action.default!r}): {shown}")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help hides the default: {no_default}"


def test_help_shows_the_defaults_the_issue_named():
    helps = {prog: parser.format_help() for prog, parser in _parsers(build_parser())}
    tokenize = " ".join(helps["composer-shear tokenize"].split())
    assert "(default: 0.05)" in tokenize and "(default: 17)" in tokenize
    assert "(default: uint16 if the vocabulary fits, else uint32)" in tokenize
    oneshot = " ".join(helps["composer-shear prune-oneshot"].split())
    assert "(default: 65536)" in oneshot and "(default: activation)" in oneshot
    assert "(default: 0)" in oneshot  # --seed 0: shown although 0 == False
    assert "(default: cpu)" in " ".join(helps["composer-shear reference-loss"].split())


def _start(args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO):
    return subprocess.Popen(
        [CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_usage_errors_exit_2_and_failures_exit_1_on_stderr(tmp_path):
    fit = tmp_path / "fit.yaml"
    fit.write_text("sizes: [1.0e8, 1.0e9]\nlosses: {web: [3.0, 2.5]}\n")
    missing = "./no-such-model"
    runs = {
        # argparse's own check of a value
        "argparse": _start(["tokenize", "in", str(tmp_path / "t"), "--tokenizer", "t",
                            "--max-seq-len", "0"]),
        # an option that needs another
        "needs": _start(["reference-loss", "--fit", str(fit)]),
        # a malformed value the handler parses
        "shape": _start(["prune-oneshot", missing, str(tmp_path / "a"), "--method", "random",
                         "--target-shape", "hidden_size=lots"]),
        "required": _start(["prune-oneshot", missing, str(tmp_path / "b")]),
        # well-formed commands that fail
        "model": _start(["prune-oneshot", missing, str(tmp_path / "c"), "--method", "random",
                         "--target-shape", "hidden_size=32"], cwd=tmp_path),
        "report": _start(["report", str(tmp_path / "no-run")]),
        "fit": _start(["reference-loss", "--fit", str(tmp_path / "none.yaml"),
                       "--target-params", "1e8"]),
    }  # fmt: skip
    done = {name: (p.wait(timeout=600), *p.communicate()) for name, p in runs.items()}
    expected = {
        "argparse": (2, "argument --max-seq-len: must be at least 1, got 0"),
        "needs": (2, "error: --fit needs --target-params"),
        "shape": (2, "error: --target-shape: hidden_size='lots' is not an integer"),
        "required": (2, "error: --target-shape is required unless --target-params or --units"),
        "model": (1, f"error: model directory {missing} does not exist"),
        "report": (1, f"error: no such run folder: {tmp_path / 'no-run'}"),
        "fit": (1, "error: "),
    }
    for name, (code, message) in expected.items():
        returncode, stdout, stderr = done[name]
        assert (returncode, stdout) == (code, ""), (name, returncode, stdout, stderr[-2000:])
        assert message in stderr, (name, stderr[-2000:])
        # Usage errors carry the subcommand's usage line, as argparse's own do.
        assert ("usage: composer-shear" in stderr) == (code == 2), (name, stderr[-2000:])
    assert "Repo id" not in done["model"][2]
    assert not any((tmp_path / d).exists() for d in "abc")


class _OnTerminal:
    """The console script with stderr on a pseudo-terminal of 100 columns, read as it runs."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        leader, follower = pty.openpty()
        # A fresh pty is 0 columns wide, and tqdm draws nothing into 0 columns.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.proc = subprocess.Popen(
            [CLI, *args],
            stdout=subprocess.DEVNULL,
            stderr=follower,
            cwd=REPO,
            env={**os.environ, **env},
        )
        os.close(follower)
        self.chunks: list[bytes] = []
        # Read while it runs: a full pty buffer would block the writer.
        self.reader = threading.Thread(target=self._read, args=(leader,), daemon=True)
        self.reader.start()

    def _read(self, leader: int) -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed its end
                break
            if not chunk:
                break
            self.chunks.append(chunk)
        os.close(leader)

    def result(self) -> tuple[int, str]:
        """(exit code, what the process wrote to stderr)."""
        code = self.proc.wait(timeout=600)
        self.reader.join(timeout=60)
        return code, b"".join(self.chunks).decode("utf-8", "replace")


def test_progress_bars_on_a_terminal_on_rank_0_only(tiny_tokenizer_dir, tmp_path):
    def tokenize(out: str) -> list[str]:
        return [
            "tokenize", str(REPO / "data" / "sample_corpus"), str(tmp_path / out),
            "--tokenizer", str(tiny_tokenizer_dir), "--max-seq-len", "32", "--domains", "code",
        ]  # fmt: skip

    piped = _start(tokenize("piped"))
    terminal = _OnTerminal(tokenize("tty"), {})
    rank1 = _OnTerminal(tokenize("rank1"), {"RANK": "1"})
    piped_out, piped_err = piped.communicate(timeout=600)
    (code, drawn), (code_rank1, drawn_rank1) = terminal.result(), rank1.result()
    assert (code, code_rank1, piped.returncode) == (0, 0, 0), drawn[-2000:] + piped_err[-2000:]
    # A tqdm bar: "code/train:  40%|####      | 2/5 [...]" over documents.
    assert "code/train:" in drawn and "%|" in drawn and "doc/s" in drawn, drawn
    assert "%|" not in drawn_rank1, drawn_rank1
    # Not a terminal: no carriage-return redraws in the log, the plain lines stay.
    assert "%|" not in piped_err and "\r" not in piped_err, piped_err
    assert "code/train:" in piped_out and "wrote" in piped_out


def test_model_path_names_a_missing_directory(tmp_path):
    assert model_path(tmp_path) == str(tmp_path)
    with pytest.raises(ModelPathError, match=r"^model directory \./x does not exist$"):
        model_path("./x")
    with pytest.raises(ModelPathError, match="tokenizer directory runs/a/b does not exist"):
        model_path("runs/a/b", "tokenizer")
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelPathError, match="is a file"):
        model_path(tmp_path / "file")
    # conftest keeps the hub offline: a hub id that is not cached cannot load either.
    with pytest.raises(ModelPathError, match="the hub is offline"):
        model_path("some-org/not-cached-model")


def test_model_path_passes_hub_ids_through_when_online():
    code = (
        "from composer_shear.interface import model_path;"
        "print(model_path('some-org/some-model'), model_path('gpt2'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["some-org/some-model", "gpt2"]


def test_a_missing_teacher_directory_is_named_at_init():
    """A real Composer Trainer: Event.INIT builds the teacher, and names the missing folder."""
    from composer import Trainer
    from composer.models import HuggingFaceModel

    from composer_shear.distillation import KnowledgeDistillation
    from tests.tiny_models import tiny_model

    # Building the algorithm from a YAML does not look at the path (recipes carry
    # placeholders until a run fills them in) ...
    algorithm = KnowledgeDistillation(teacher="./gone")
    model = HuggingFaceModel(tiny_model("llama_gqa"), use_logits=True)
    # ... the run does, before transformers could call it a malformed hub id.
    with pytest.raises(
        ModelPathError,
        match=r"algorithms\.knowledge_distillation\.teacher: teacher model directory "
        r"\./gone does not exist",
    ):
        Trainer(model=model, algorithms=[algorithm], device="cpu", progress_bar=False)
