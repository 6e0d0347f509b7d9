"""Shared fixtures: a tiny tokenizer and tiny HF checkpoints, all built offline."""

from __future__ import annotations

import atexit
import gc
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_tokenizer

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Directory holding a 512-token byte-level BPE tokenizer trained on stdlib text."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face checkpoint (built once, then cached)."""
    from composer_shear.weights.smollm2 import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """The real Gemma-3-270M (base) as a Hugging Face checkpoint (built once, then cached)."""
    from composer_shear.weights.gemma3 import materialize_gemma3_270m

    return materialize_gemma3_270m()


@pytest.fixture(scope="module", autouse=True)
def _release_finished_trainings():
    """Frees what each test module's in-process trainings hold, once the module is done.

    Composer's ``Engine`` registers an ``atexit`` hook holding the training state (model,
    data loaders, Streaming datasets and their shared-memory descriptors) until the process
    exits, even after ``trainer.close()``. Closing the engines and dropping those hooks lets the
    garbage collector free them, so that a test session does not accumulate descriptors and
    passes under ``ulimit -n 1024``.
    """
    yield
    from composer.core.engine import Engine

    for obj in gc.get_objects():
        if type(obj) is Engine:  # not isinstance: proxies in the heap warn on __class__
            obj.close()
    # The hook is one static function registered with each engine's state: unregistering
    # it drops every pending registration, also those of engines that were closed and freed
    # before this sweep (their __del__ leaves the hook behind once they are closed, and it
    # would log into closed streams at exit).
    atexit.unregister(Engine._close)
    gc.collect()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket ``shear``.

    boto3, Composer's object stores and Streaming reach it through ``S3_ENDPOINT_URL`` and
    dummy credentials, exactly as they would reach S3. Yields the endpoint URL.
    """
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    code = server.poll()
                    raise RuntimeError(f"moto_server did not start (exit {code})") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shear")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
