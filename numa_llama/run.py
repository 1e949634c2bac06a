"""The main job: generate text through ``Llama(..., numa=...)`` and say what the NUMA layer did."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

from numa_llama.sysfs import online_nodes


@dataclass(frozen=True)
class RunResult:
    text: str
    numa: str | bool | int
    strategy: int
    threads: int
    prompt_tokens: int
    prompt_tokens_per_s: float
    generated_tokens: int
    tokens_per_s: float
    load_s: float
    numa_summary: str
    locality: dict[int, float] | None  # per node, from the kernel's page answers (migrate on 2+ nodes)


def numa_summary(
    strategy: int, threads: int, nodes: dict[int, list[int]] | None = None, locality: dict[int, float] | None = None
) -> str:
    """One line on what the NUMA layer did in this process; claims nothing the build does not do."""
    nodes = online_nodes() if nodes is None else nodes
    names = {v: k for k, v in llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_NAMES.items()}
    name = names.get(strategy, "off" if strategy == 0 else str(strategy))
    where = f"{len(nodes)} NUMA node(s) ({', '.join(f'node{n}: {len(c)} CPUs' for n, c in nodes.items())})"
    if strategy == llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_DISABLED:
        return f"numa off; {where}; threads not pinned, pages left where first touched"
    if strategy == llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_MIGRATE:
        from numa_llama import hooks  # noqa: PLC0415

        n_virtual = hooks.stats()["virtual_nodes"]
        if n_virtual:
            return (
                f"numa=migrate under GGML_CPU_NUMA_VIRTUAL={n_virtual}; {where}: {threads} threads laid out over "
                f"{n_virtual} virtual nodes, every CPU matmul multiplied node by node; no page was placed "
                "(virtual nodes own no memory)"
            )
    if len(nodes) < 2:
        return f"numa={name}; {where}: a single node, so threads were not pinned and no page had to move"
    if strategy == llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_MIGRATE:
        from numa_llama import hooks  # noqa: PLC0415

        st = hooks.stats()
        if st["not_placed"]:
            why = hooks.NOT_PLACED.get(st["not_placed"], f"reason {st['not_placed']}")
            return (
                f"numa=migrate; {where}: no weight was moved or bound: {why}; they stay where that puts them, "
                "and results are unchanged"
            )
        failed = ", ".join(f"{k.removeprefix('failed_')} {v}" for k, v in st.items() if k.startswith("failed_") and v)
        return (
            f"numa=migrate; {where}: {threads} threads pinned in contiguous blocks per node; "
            f"{st['tensors']} weights placed: of {st['pages']} pages {st['pages_in_place']} were in place, "
            f"{st['pages_moved']} moved, {st['pages_failed']} failed{f' ({failed})' if failed else ''}, "
            f"{st['pages_boundary']} on slab boundaries; slab bytes on their node: "
            + ", ".join(f"node{n} {f:.2%}" for n, f in (locality or {}).items())
            + "; the generic, repack, tiled, llamafile and mul_mat_id paths multiply their node's rows, from src1 "
            "converted on that node"
            + "".join(f"; {n} not node-local ({b})" for b, n in hooks.not_local_counts(hooks.not_local()).items())
        )
    return f"numa={name}; {where}: llama.cpp's stock {name} strategy"


def generate(
    model: Path,
    prompt: str,
    *,
    numa: str | bool | int = "migrate",
    threads: int | None = None,
    max_tokens: int = 32,
    n_ctx: int = 512,
    use_mmap: bool = True,
    seed: int = 0,
) -> RunResult:
    """Greedy generation (temperature 0), so the text is reproducible."""
    t0 = time.monotonic()
    llm = Llama(str(model), numa=numa, n_threads=threads, n_ctx=n_ctx, seed=seed, use_mmap=use_mmap, verbose=False)
    load_s = time.monotonic() - t0
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        assert isinstance(out, dict)  # not streamed: one response
        perf = llama_cpp.llama_perf_context(llm.ctx)
        n_threads = llm.context_params.n_threads
        strategy = llm.numa
        locality = None
        if strategy == llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_MIGRATE and len(online_nodes()) > 1:
            from numa_llama import hooks  # noqa: PLC0415

            locality = hooks.slab_locality()  # while the weights are still mapped
    finally:
        llm.close()
    p_ms, e_ms = perf.t_p_eval_ms, perf.t_eval_ms
    return RunResult(
        text=out["choices"][0]["text"],
        numa=numa,
        strategy=strategy,
        threads=n_threads,
        prompt_tokens=perf.n_p_eval,
        prompt_tokens_per_s=perf.n_p_eval / (p_ms / 1e3) if p_ms > 0 else 0.0,
        generated_tokens=perf.n_eval,
        tokens_per_s=perf.n_eval / (e_ms / 1e3) if e_ms > 0 else 0.0,
        load_s=load_s,
        numa_summary=numa_summary(strategy, n_threads, locality=locality),
        locality=locality,
    )
