"""``numa-llama rpc-server`` and ``Llama(rpc_servers=...)``: llama.cpp's RPC workers (ggml-rpc), on 127.0.0.1 only.

On the host (one node) the worker runs with ``GGML_CPU_NUMA_VIRTUAL=2``: its CPU backend computes each product of
a weight node by node (teams of two virtual nodes), which it does only for buffers it knows hold weights. So its
``products_local`` count is the evidence that the client told it (the series' RPC_CMD_BUFFER_SET_USAGE): a worker
that never learns the usage counts 0. In a 4-node guest two workers, each bound to two nodes, place what they
receive, and the kernel (``move_pages`` on each worker's pid) says where every page of it is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, free_port

PROMPT = "The capital of France is"
TOKENS = 12


@dataclass
class Worker:
    proc: subprocess.Popen
    port: int
    stats: Path
    stderr: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def report(self) -> dict:
        """The worker's own report, written now (SIGUSR1)."""
        asked = time.time()
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while True:  # written whole (renamed into place), and after the signal
            if self.stats.exists():
                rep = json.loads(self.stats.read_text())
                if rep["written_at"] >= asked:
                    return rep
            assert time.monotonic() < deadline, "the worker wrote no report within 60 s"
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start_worker(tmp: Path, threads: int, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Worker:
    port = free_port()
    stats, err = tmp / f"worker-{port}.json", tmp / f"worker-{port}.err"
    cmd = [*(prefix or []), sys.executable, "-P", "-m", "numa_llama", "rpc-server", "-p", str(port)]
    cmd += ["-t", str(threads), "--stats-json", str(stats)]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, **(env or {})}, cwd=tmp)
    deadline = time.monotonic() + 300
    from llama_cpp import _rpc

    while True:  # ready when it answers ggml-rpc's HELLO
        assert proc.poll() is None, f"rpc-server exited {proc.returncode}: {err.read_text()[-3000:]}"
        try:
            _rpc.hello("127.0.0.1", port, timeout=5)
            return Worker(proc, port, stats, err)
        except _rpc.RpcWorkerError:
            pass
        assert time.monotonic() < deadline, f"rpc-server did not answer within 300 s: {err.read_text()[-3000:]}"
        time.sleep(0.3)


GENERATE = """
import json, sys, time
from llama_cpp import Llama
kw = json.loads(sys.argv[2])
llm = Llama(sys.argv[1], n_ctx=256, verbose=False, **kw)
t = time.perf_counter()
out = llm(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0.0, seed=1)
dt = time.perf_counter() - t
print(json.dumps({"text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"], "seconds": dt}))
if len(sys.argv) > 5:  # hold: the client stays connected (a worker frees a client's buffers when it leaves)
    sys.stdout.flush()
    sys.stdin.readline()
"""


@contextmanager
def generating(model: Path, tokens: int = TOKENS, timeout: float = 900, **kw) -> Iterator[dict]:
    """Generate, and stay connected to the workers until the block ends; yields the result."""
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", GENERATE, str(model), json.dumps(kw), PROMPT, str(tokens), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT / "tests",
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, f"the client exited {proc.wait(timeout)}: {proc.stderr.read()[-3000:]}"  # type: ignore[union-attr]
        yield json.loads(line)
        proc.stdin.close()
        assert proc.wait(timeout) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def generate(model: Path, tokens: int = TOKENS, timeout: float = 900, **kw) -> dict:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", GENERATE, str(model), json.dumps(kw), PROMPT, str(tokens)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT / "tests",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = start_worker(tmp_path_factory.mktemp("rpc"), 2, env={"GGML_CPU_NUMA_VIRTUAL": "2"})
    yield w
    if w.proc.poll() is None:
        w.stop()


def test_a_worker_gives_the_local_text_and_multiplies_the_weights_by_node(worker: Worker, model_path: Path) -> None:
    local = generate(model_path, numa="migrate")
    remote = generate(model_path, rpc_servers=worker.endpoint, n_gpu_layers=-1, numa="migrate")
    assert remote["text"] == local["text"] and remote["tokens"] == TOKENS
    rep = worker.report()
    assert rep["pid"] == worker.proc.pid and rep["numa"] == "migrate" and rep["thread_node"] == [0, 1]
    # told which buffers hold weights, it computes their products by node (and says why it moved no page)
    assert rep["stats"]["products_local"] > 0, rep["stats"]
    assert rep["stats"]["virtual_nodes"] == 2 and rep["stats"]["pages_moved"] == 0


TWO = """
import sys
from llama_cpp import Llama
kw = dict(rpc_servers=sys.argv[2], n_gpu_layers=-1, n_ctx=256, verbose=False)
a = Llama(sys.argv[1], **kw)
b = Llama(sys.argv[1], **kw)  # the same worker, while the first holds its connection
for llm in (a, b):
    print(llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"])
"""


def test_two_models_in_one_process_share_a_worker(worker: Worker, model_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", TWO, str(model_path), worker.endpoint],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "tests",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = proc.stdout.splitlines()[-2:]
    assert a == b and a.strip()


def test_sigterm_writes_the_report_and_ends_it(tmp_path: Path) -> None:
    w = start_worker(tmp_path, 1)
    assert w.stop() == 0
    assert json.loads(w.stats.read_text())["pid"] == w.proc.pid
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", w.port))


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def rpc_server(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-P", "-m", "numa_llama", "rpc-server", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT / "tests")


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = rpc_server("-p", str(port))
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_line(proc)


def test_a_host_that_is_not_ipv4_is_one_line() -> None:
    proc = rpc_server("-H", "localhost", "-p", str(free_port()))
    assert proc.returncode == 2
    assert "give an IPv4 address" in one_line(proc)


def test_a_bad_numa_value_is_one_line() -> None:
    proc = rpc_server("--numa", "sideways", "-p", str(free_port()))
    assert proc.returncode == 2
    assert "--numa sideways" in one_line(proc)


CLIENT_ERROR = """
import json, sys
from llama_cpp import Llama
try:
    Llama(sys.argv[1], verbose=False, **json.loads(sys.argv[2]))
except ValueError as e:
    print(e)
    raise SystemExit(3)
"""


def client_error(model: Path, **kw) -> str:
    """The ValueError that Llama(model, **kw) raises, in a process of its own (numa init is process-wide)."""
    proc = subprocess.run(
        [sys.executable, "-P", "-c", CLIENT_ERROR, str(model), json.dumps(kw)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "tests",
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_an_unreachable_worker_is_named_before_ggml_rpc_runs(model_path: Path) -> None:
    port = free_port()  # nothing listens there
    err = client_error(model_path, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1)
    assert err == f"rpc_servers: cannot reach the worker at 127.0.0.1:{port}: Connection refused"
    assert "is not HOST:PORT" in client_error(model_path, rpc_servers="127.0.0.1", n_gpu_layers=-1)
    assert "n_gpu_layers=0" in client_error(model_path, rpc_servers=f"127.0.0.1:{port}")


def hello_server(version: tuple[int, int, int]) -> tuple[int, threading.Thread]:
    """A listener that answers ggml-rpc's HELLO as an rpc-server of ``version`` would (the same bytes), then closes.

    The stand-in for a worker of another build: the client's check reads nothing but this answer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def answer() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            head = b""
            while len(head) < 9:
                head += conn.recv(9 - len(head))
            (size,) = struct.unpack("<Q", head[1:9])
            while size > 0:
                size -= len(conn.recv(size))
            conn.sendall(struct.pack("<Q", 28) + bytes(version) + b"\0" + bytes(24))

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    return srv.getsockname()[1], t


def test_a_worker_without_the_series_is_named_under_migrate(model_path: Path) -> None:
    port, t = hello_server((7, 0, 0))  # the pinned upstream's rpc-server: protocol 7.0.0
    err = client_error(model_path, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1, numa="migrate")
    assert err.startswith(f"rpc_servers: 127.0.0.1:{port} is an rpc-server without numa-llama's series"), err
    t.join(10)
    port, t = hello_server((6, 0, 0))
    err = client_error(model_path, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1)
    assert err.startswith(f"rpc_servers: 127.0.0.1:{port} speaks RPC 6.0.0"), err
    t.join(10)


def test_the_clients_protocol_is_the_trees() -> None:
    """The client's version check is the header's version (vendor/llama.cpp is the series' tree)."""
    from llama_cpp import _rpc

    header = (ROOT / "vendor" / "llama.cpp" / "ggml" / "include" / "ggml-rpc.h").read_text()
    assert f"#define RPC_PROTO_MAJOR_VERSION    {_rpc.RPC_PROTO_MAJOR_VERSION}\n" in header
    assert f"#define RPC_PROTO_MINOR_VERSION    {_rpc.RPC_PROTO_MINOR_VERSION}\n" in header


KILLED = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], rpc_servers=sys.argv[2], n_gpu_layers=-1, n_ctx=512, verbose=False)
for i, _ in enumerate(llm("Once upon a time", max_tokens=400, temperature=0.0, stream=True)):
    if i == 2:
        print("generating", flush=True)
print("finished", flush=True)
"""


def test_a_worker_killed_mid_generation_is_named_and_the_client_ends(model_path: Path, tmp_path: Path) -> None:
    w = start_worker(tmp_path, 1)
    client = subprocess.Popen(
        [sys.executable, "-P", "-c", KILLED, str(model_path), w.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT / "tests",
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "generating"
        w.proc.kill()
        w.proc.wait(30)
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
        if w.proc.poll() is None:
            w.proc.kill()
    assert client.returncode == -signal.SIGABRT and "finished" not in out  # ggml-rpc ends the client
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("llama_kv_cache")]
    assert lines == [lines[-1]] and "Traceback" not in err, err
    assert f"the RPC worker at {w.endpoint} is gone" in lines[-1], err


# --- 4 nodes: two workers, each bound to two nodes, as two 2-socket machines ---


def kernel_locality(rep: dict) -> dict[int, float]:
    """Per node of the worker: the share of its slabs' bytes that the kernel has on that node (its pid's pages)."""
    from numa_llama import kernel

    base = kernel.page_size()
    local: dict[int, int] = {}
    total: dict[int, int] = {}
    for p in rep["placements"]:
        for e in range(p["n_matrices"]):
            start = p["data"] + e * p["matrix_bytes"]
            for node, r0, r1 in p["slabs"]:
                spans = list(kernel.page_spans(start + r0 * p["row_bytes"], start + r1 * p["row_bytes"], base))
                where = kernel.page_nodes_of(rep["pid"], [a for a, _ in spans])
                for (_, nbytes), n in zip(spans, where, strict=True):
                    total[node] = total.get(node, 0) + nbytes
                    local[node] = local.get(node, 0) + (nbytes if n == node else 0)
    return {n: local.get(n, 0) / total[n] for n in sorted(total)}


@pytest.mark.numa_guest
@pytest.mark.guest4
def test_two_workers_on_two_nodes_each_place_what_they_receive(tmp_path: Path) -> None:
    from numa_llama import synthetic
    from numa_llama.sysfs import read_topology

    synthetic_model = synthetic.cached(synthetic.WIDE)  # written on the host first (python -m numa_llama.synthetic)

    cpus = {n.id: n.cpus for n in read_topology().nodes if n.cpus}
    assert len(cpus) >= 4, f"needs 4 nodes with CPUs (the 4-node guest), has {sorted(cpus)}"
    tokens = 8  # TCG: about 2 s a token
    local = generate(synthetic_model, tokens, numa="migrate", n_threads=4, n_threads_batch=4)
    groups = [(0, 1), (2, 3)]
    workers = []
    try:
        for g in groups:
            bind = ["numactl", f"--cpunodebind={g[0]},{g[1]}"]
            workers.append(start_worker(tmp_path, sum(len(cpus[n]) for n in g), prefix=bind))
        endpoints = ",".join(w.endpoint for w in workers)
        kw = {"n_gpu_layers": -1, "numa": "migrate", "n_threads": 4, "n_threads_batch": 4}
        with generating(synthetic_model, tokens, rpc_servers=endpoints, **kw) as remote:  # while it holds them
            assert remote["text"] == local["text"] and remote["tokens"] == tokens
            for w, g in zip(workers, groups, strict=True):
                rep = w.report()
                st = rep["stats"]
                assert st["tensors"] > 0 and st["pages"] > 0 and not st["not_placed"] and not st["pages_failed"], st
                assert set(rep["thread_node"]) == set(g), rep["thread_node"]  # its threads on its own two nodes
                by_kernel = kernel_locality(rep)
                per_thread = [by_kernel[n] for n in rep["thread_node"]]
                print(
                    f"worker {w.endpoint} on nodes {g}: {st['tensors']} weights, {st['pages']} pages, "
                    f"{st['pages_moved']} moved; locality per thread (move_pages on pid {rep['pid']}) {per_thread}"
                )
                assert set(by_kernel) == set(g) and min(per_thread) >= 0.99, by_kernel
        print(
            f"guest speeds (TCG, not real speeds): local {local['tokens'] / local['seconds']:.2f} t/s, "
            f"2 RPC workers {remote['tokens'] / remote['seconds']:.2f} t/s ({tokens} tokens)"
        )
    finally:
        codes = [w.stop() for w in workers if w.proc.poll() is None]  # every worker stopped, then checked
    assert codes == [0, 0], codes
