"""``numa-llama rpc-server``: a llama.cpp RPC worker (ggml-rpc) whose CPU backend places what clients upload.

It is llama.cpp's ``rpc-server`` in this process: the patched tree's
``ggml_backend_rpc_start_server`` (ggml-rpc, protocol 7.1 with the series' buffer-usage command), serving the CPU
device of the patched ``llama_cpp`` with ``--numa migrate``. The client tells it which buffers hold weights
(``RPC_CMD_BUFFER_SET_USAGE``), so its CPU backend places each node's rows of them on that node and multiplies them
node-locally, as a local run does. It runs from the wheel, with the CPU variant verified on this machine, so a
worker needs no compiler and no source checkout.

Why not the ``rpc-server`` program: it takes no ``--numa`` (upstream's parser has none), and it would be one more
native build per machine. This is the same server code, started the same way (the CPU device, ``-t`` threads,
``-H``/``-p``), with what the program lacks:

- ``--numa`` (default ``migrate``); a value llama.cpp does not know is one line (exit 2);
- ``--stats-json FILE``: the worker's own placement report (stats, every placed weight and its plan, the node of
  each compute thread), written on SIGUSR1 and at shutdown (SIGTERM: exit 0; Ctrl-C: 130). It lists every weight
  placed since the worker started and counts pages over every client: a worker frees a client's buffers when the
  client leaves, so the addresses are live only while that client is connected; A test checks it against the
  kernel (``move_pages`` on the worker's pid), so the locality does not rest on the worker's word;
- a port in use is one line (exit 2), before anything starts.

ggml-rpc has no authentication and no encryption: never expose a worker beyond a trusted network. Upstream's
README calls RPC a proof of concept.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_PORT = 50052


def report(n_threads: int, endpoint: str, numa: str) -> dict[str, Any]:
    """The worker's placement report: what ``--stats-json`` writes."""
    from numa_llama import hooks  # noqa: PLC0415

    out: dict[str, Any] = {
        "pid": os.getpid(),
        "endpoint": endpoint,
        "numa": numa,
        "n_threads": n_threads,
        "written_at": time.time(),
    }
    try:
        out["thread_node"] = hooks.layout(n_threads)
    except hooks.HookUnavailable as e:
        out["thread_node"] = None
        out["thread_node_error"] = str(e)
    out["stats"] = st = hooks.stats()
    out["not_placed"] = hooks.NOT_PLACED.get(st["not_placed"], f"reason {st['not_placed']}")  # in words
    out["placements"] = [
        {
            "name": p.name,
            "data": p.data,
            "nbytes": p.nbytes,
            "row_bytes": p.row_bytes,
            "matrix_bytes": p.matrix_bytes,
            "n_rows": p.n_rows,
            "n_matrices": p.n_matrices,
            "page_bytes": p.page_bytes,
            "slabs": [[s.node, s.row_begin, s.row_end] for s in p.slabs],
        }
        for p in hooks.placements()
    ]
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def _start_server_fn(lib: ctypes.CDLL) -> Any:
    from llama_cpp import _rpc  # noqa: PLC0415

    fn_t = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
    )
    return fn_t(_rpc.function(lib, "ggml_backend_rpc_start_server"))


def _cpu_device(lib: ctypes.CDLL) -> int:
    by_type = lib.ggml_backend_dev_by_type
    by_type.argtypes = [ctypes.c_int]
    by_type.restype = ctypes.c_void_p
    dev = by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        raise RuntimeError("no CPU device is registered")
    return int(dev)


def run(args: argparse.Namespace) -> int:
    from numa_llama.serve import _port_free  # noqa: PLC0415

    err = sys.stderr
    import ipaddress  # noqa: PLC0415

    try:
        ipaddress.IPv4Address(args.host)
    except ValueError:
        print(
            f"numa-llama: rpc-server: -H {args.host}: give an IPv4 address (ggml-rpc listens on IPv4 only; "
            "127.0.0.1 for this machine)",
            file=err,
        )
        return 2
    if not 0 < args.port < 65536:
        print(f"numa-llama: rpc-server: port {args.port} is out of range (1-65535)", file=err)
        return 2
    if args.threads is not None and args.threads <= 0:
        print(f"numa-llama: rpc-server: --threads {args.threads}: must be 1 or more", file=err)
        return 2
    import llama_cpp  # noqa: PLC0415
    import llama_cpp.llama_cpp as bindings  # noqa: PLC0415

    try:
        strategy = llama_cpp.ggml_numa_strategy(args.numa)
    except ValueError as e:
        print(f"numa-llama: rpc-server: --numa {args.numa}: {str(e).splitlines()[0]}", file=err)
        return 2
    from numa_llama import hooks  # noqa: PLC0415  (cli.main has refused a stock llama_cpp: exit 3)

    busy = _port_free(args.host, args.port)
    if busy is not None:
        print(f"numa-llama: rpc-server: cannot listen on {args.host}:{args.port}: {busy}", file=err)
        return 2
    stats_path = Path(args.stats_json).resolve() if args.stats_json else None
    if stats_path is not None and not stats_path.parent.is_dir():
        print(f"numa-llama: rpc-server: --stats-json {args.stats_json}: no directory {stats_path.parent}", file=err)
        return 2
    n_threads = args.threads or len(os.sched_getaffinity(0))
    llama_cpp.llama_backend_init()
    if strategy != llama_cpp.GGML_NUMA_STRATEGY_DISABLED:
        llama_cpp.llama_numa_init(strategy)
    lib = bindings._lib
    from llama_cpp import _rpc  # noqa: PLC0415

    try:
        start_server = _start_server_fn(lib)
        cpu = _cpu_device(lib)
    except (RuntimeError, _rpc.RpcWorkerError) as e:
        print(f"numa-llama: rpc-server: {e}", file=err)
        return 2
    endpoint = f"{args.host}:{args.port}"
    if not ipaddress.IPv4Address(args.host).is_loopback:
        print(
            f"numa-llama: rpc-server: listening on {args.host}: ggml-rpc has no authentication and no encryption; "
            "keep it inside a trusted network",
            file=err,
        )
    devices = (ctypes.c_void_p * 1)(cpu)
    ended = threading.Event()

    def serve() -> None:
        # ggml's loop: accept a client, serve it to the end, accept the next; it returns only if it cannot listen
        start_server(endpoint.encode(), None, n_threads, 1, devices)
        ended.set()

    stop: list[int] = []

    writing = threading.Lock()

    def write_stats() -> None:
        if stats_path is None or not writing.acquire(blocking=False):  # a SIGUSR1 during a write: that write
            return
        try:
            _write_json(stats_path, report(n_threads, endpoint, args.numa))
        except OSError as e:  # a full disk, a removed directory: said, and the worker serves on
            print(f"numa-llama: rpc-server: cannot write {stats_path}: {e.strerror or e}", file=err, flush=True)
        finally:
            writing.release()

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGUSR1:
            write_stats()
        else:
            stop.append(signum)
            ended.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    nodes = sorted(set(hooks.layout(n_threads))) if strategy == llama_cpp.GGML_NUMA_STRATEGY_MIGRATE else []
    print(
        f"numa-llama rpc-server: {endpoint}, numa={args.numa}, {n_threads} threads"
        + (f" on node(s) {','.join(map(str, nodes))}" if nodes else "")
        + f", pid {os.getpid()}"
        + (f", stats to {stats_path} (SIGUSR1, and at exit)" if stats_path else ""),
        file=err,
        flush=True,
    )
    threading.Thread(target=serve, name="ggml-rpc", daemon=True).start()
    while not ended.wait(0.5):  # the main thread stays in Python, so the signal handlers run
        pass
    if not stop:
        print(f"numa-llama: rpc-server: ggml-rpc stopped serving {endpoint} (see its message above)", file=err)
        return 1
    write_stats()
    sys.stdout.flush()
    sys.stderr.flush()
    # ggml's thread is blocked in accept() or serving a client, and cannot be joined: end here, as rpc-server ends
    os._exit(130 if signal.SIGINT in stop else 0)


def add_parser(sub: Any) -> None:
    rp = sub.add_parser(
        "rpc-server",
        help="a llama.cpp RPC worker (ggml-rpc) that places the weights clients upload (--numa migrate)",
        description="llama.cpp's RPC server (ggml-rpc) on this machine's CPU with --numa migrate: clients "
        "(Llama(rpc_servers=...), llama-server --rpc) upload weights, and this worker places each node's rows "
        "on that node. One per machine, not per node. No authentication: a trusted network only.",
    )
    rp.add_argument("--numa", default="migrate", help="distribute|isolate|numactl|migrate|off (default: migrate)")
    rp.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    rp.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    rp.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: the CPUs it may use)")
    rp.add_argument(
        "--stats-json", default=None, metavar="FILE", help="write the placement report here on SIGUSR1 and at exit"
    )
