"""``numa-llama tools``: llama.cpp's llama-server, llama-cli and llama-bench from the patched tree, each run with
``--numa migrate`` on 127.0.0.1. A stock build refuses ``--numa migrate`` (upstream's parser knows distribute,
isolate and numactl), so each run that accepts it is running the series."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, free_port

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once (minutes the first time, seconds with the build directory kept) and installed in a temp bin."""
    bin_dir = tmp_path_factory.mktemp("bin")
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", "tools", "--bin-dir", str(bin_dir), "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    assert set(out) == {"numa-llama-server", "numa-llama-cli", "numa-llama-bench"}
    return {name: Path(path) for name, path in out.items()}


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_they_are_installed_under_their_names_and_say_their_build(tools: dict[str, Path]) -> None:
    for name, path in tools.items():
        assert path.name == name and os.access(path, os.X_OK)
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "version:" in proc.stderr + proc.stdout


@contextmanager
def llama_server(tools: dict[str, Path], model_path: Path, *extra: str) -> Iterator[str]:
    """llama-server --numa migrate on 127.0.0.1, healthy; yields its URL and checks it exits 0 on SIGTERM."""
    port = free_port()
    cmd = [str(tools["numa-llama-server"]), "-m", str(model_path), "--numa", "migrate", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "-t", "1", "-c", "512", "--no-webui", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"llama-server exited {proc.returncode}: {proc.stdout.read()[-3000:]}"  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy within 300 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.returncode == 0, log[-3000:]


def test_llama_server_with_numa_migrate_answers_a_completion(tools: dict[str, Path], model_path: Path) -> None:
    with llama_server(tools, model_path) as url:
        native = post(f"{url}/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0})
        oai = post(f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert native["content"].strip()
    assert oai["choices"][0]["text"] == native["content"]  # both greedy, the same model and settings


def test_llama_server_rpc_spreads_the_model_to_a_numa_llama_worker(
    tools: dict[str, Path], model_path: Path, tmp_path: Path
) -> None:
    """llama-server --rpc with a numa-llama rpc-server (two virtual nodes): the worker computes the weights'
    products by node, which it does only for buffers the client marked as weights (patch 0007). The text is the
    wheel's Llama() text: the worker multiplies with the wheel's CPU variant, not the tools' own build."""
    from test_rpc import generate, start_worker

    body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0}
    local = generate(model_path, tokens=8)["text"]
    worker = start_worker(tmp_path, 2, env={"GGML_CPU_NUMA_VIRTUAL": "2"})
    try:
        # -fa off: Llama()'s default; llama-server's "auto" turns flash attention on, another sum order
        with llama_server(tools, model_path, "--rpc", worker.endpoint, "-ngl", "99", "-fa", "off") as url:
            remote = post(f"{url}/completion", body)["content"]
            rep = worker.report()
    finally:
        code = worker.stop()
    assert code == 0
    assert remote == local
    assert rep["stats"]["products_local"] > 0, rep["stats"]


def test_llama_cli_with_numa_migrate_generates(tools: dict[str, Path], model_path: Path) -> None:
    cmd = [str(tools["numa-llama-cli"]), "-m", str(model_path), "--numa", "migrate", "-t", "1", "-c", "512"]
    cmd += ["-p", PROMPT, "-n", "8", "--temp", "0", "-st", "--simple-io"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"> {PROMPT}" in proc.stdout and "Generation:" in proc.stdout, proc.stdout[-2000:]  # it generated


def test_llama_bench_with_numa_migrate_measures(tools: dict[str, Path], model_path: Path) -> None:
    cmd = [str(tools["numa-llama-bench"]), "-m", str(model_path), "--numa", "migrate", "-t", "1"]
    cmd += ["-p", "0", "-n", "4", "-r", "1", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(proc.stdout)
    assert record["n_gen"] == 4 and record["avg_ts"] > 0


def test_outside_a_source_checkout_it_says_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMA_LLAMA_SOURCE"}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "numa_llama", "tools", "--bin-dir", str(tmp_path / "bin")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "source checkout" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "bin").exists()  # nothing half-installed
