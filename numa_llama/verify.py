"""``numa-llama verify``: load a model, run a prompt and one decode step, and check placement with the kernel."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from numa_llama import api, png
from numa_llama.plan import ModelPlan

PROMPT = "The capital of France is"


@dataclass
class Report:
    model: str
    numa: str
    threads: int
    nodes: tuple[int, ...]
    tensors: list[api.TensorPlacement]
    locality: api.Locality | None
    locality_error: str | None
    stats: api.Stats
    text: str

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    def pages(self) -> Counter:
        """Pages per kernel node over every weight (negative: -errno, e.g. -2 = never touched)."""
        out: Counter = Counter()
        for t in self.tensors:
            out.update(t.actual)
        return out

    def as_dict(self) -> dict:
        loc = self.locality
        st = self.stats
        return {
            "model": self.model,
            "numa": self.numa,
            "threads": self.threads,
            "nodes": list(self.nodes),
            "text": self.text,
            "weights": len(self.tensors),
            "pages": sum(t.pages for t in self.tensors),
            "pages_per_node": {str(k): v for k, v in sorted(self.pages().items())},
            "pages_off_plan": sum(t.pages_off_plan for t in self.tensors),
            "pages_not_present": sum(t.pages_not_present for t in self.tensors),
            "pages_boundary": sum(t.pages_boundary for t in self.tensors),
            "placed_weights": sum(bool(t.slabs) for t in self.tensors),
            "locality": None
            if loc is None
            else {"overall": loc.overall, "per_thread": list(loc.per_thread), "thread_node": list(loc.thread_node)},
            "locality_error": self.locality_error,
            "moved": {
                "tensors": st.tensors,
                "pages": st.pages,
                "in_place": st.pages_in_place,
                "moved": st.pages_moved,
                "failed": st.pages_failed,
                "failed_by_reason": st.failed,
                "boundary": st.pages_boundary,
                "huge_pages_split": st.huge_pages_split,
                "seconds": st.place_seconds,
                "pages_per_second": st.pages_per_second,
                "not_placed": st.not_placed,
                "not_node_local": [{"name": n, "buffer_type": b} for n, b in st.not_node_local],
            },
            "barrier": {"waits": list(st.barrier_waits), "wait_ns": list(st.barrier_wait_ns)},
            "tensors": [
                {
                    "name": t.name,
                    "bytes": t.nbytes,
                    "pages": t.pages,
                    "off_plan": t.pages_off_plan,
                    "not_present": t.pages_not_present,
                    "boundary": t.pages_boundary,
                    "per_node": {str(k): v for k, v in t.pages_per_node().items()},
                    "slabs": [[s.node, s.row_begin, s.row_end, s.nbytes] for s in t.slabs],
                }
                for t in self.tensors
            ],
        }


def verify(model: Path, numa: str | bool | int, threads: int | None, use_mmap: bool = True) -> Report:
    from llama_cpp import Llama  # noqa: PLC0415

    llm = Llama(str(model), numa=numa, n_threads=threads, n_ctx=128, use_mmap=use_mmap, verbose=False)
    try:
        out = llm.create_completion(PROMPT, max_tokens=2, temperature=0.0, top_k=1)  # the prompt, then a decode
        assert isinstance(out, dict)  # not streamed: one response
        n_threads = int(llm.context_params.n_threads)
        tensors = api.placement(llm)
        try:
            loc, err = api.locality(llm), None
        except ValueError as e:
            loc, err = None, str(e)
        stats = api.stats(llm)
        nodes = api.topology().node_ids
        name = api._strategy_name(llm)
    finally:
        llm.close()
    return Report(str(model), name, n_threads, nodes, tensors, loc, err, stats, out["choices"][0]["text"])


def draw_pages(tensors: list[api.TensorPlacement], path: str | Path, width: int = 1024) -> png.Canvas:
    """Two strips per weight: the plan's node per page (grey: boundary), then the kernel's (dark: no node)."""
    strip, gap = 4, 3
    canvas = png.Canvas(width, max(1, len(tensors) * (2 * strip + gap)))
    for row, t in enumerate(tensors):
        y = row * (2 * strip + gap)
        for k, nodes in enumerate((t.intended if t.slabs else None, t.actual)):
            if nodes is None:
                continue
            for x in range(width):
                lo, hi = x * len(nodes) // width, max(x * len(nodes) // width + 1, (x + 1) * len(nodes) // width)
                node = Counter(nodes[lo:hi]).most_common(1)[0][0] if lo < len(nodes) else None
                if node is None:
                    continue
                colour = png.BOUNDARY if (k == 0 and node == api.BOUNDARY) else png.node_colour(node)
                canvas.rect(x, y + k * strip, 1, strip, colour)
    canvas.save(path)
    return canvas


def draw_plan(plan: ModelPlan, path: str | Path, width: int = 800) -> png.Canvas:
    """One bar per layer, its length the layer's bytes, split into each node's share in the node's colour."""
    layers = plan.layers()
    bar, gap = 8, 3
    biggest = max((sum(v.values()) for v in layers.values()), default=1) or 1
    canvas = png.Canvas(width, max(1, len(layers) * (bar + gap)))
    for row, per in enumerate(layers.values()):
        x = 0
        for node in sorted(per):
            w = round(per[node] * width / biggest)
            canvas.rect(x, row * (bar + gap), w, bar, png.node_colour(node))
            x += w
    canvas.save(path)
    return canvas
