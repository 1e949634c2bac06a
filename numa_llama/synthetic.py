"""A seeded synthetic GGUF model: a few layers of a Llama, small enough to decode in a TCG guest.

The multi-node guests run llama.cpp 25 to 800 times slower than the host, and
the real model costs minutes there. Placement, binding and the fault cases do
not need a real model: they need weights that llama.cpp loads, multiplies and
places as a model's. This one is a Llama (``general.architecture = llama``)
with a byte-fallback SentencePiece vocabulary, so any text tokenizes, and
with every matrix in F16 and every norm in F32.

It is built so that placement has an exact answer:

- ``general.alignment`` is the page size, so with mmap every tensor starts on
  a page;
- every row is a whole fraction of a page (F16 rows of 256 or 1024 values,
  512 or 2048 bytes) and every weight has a multiple of ``ROW_QUANTUM`` rows.

So a split plan whose slab boundaries fall on the page-aligned rows leaves no
page straddling two slabs, and every thread's weight bytes can be on its own
node: 100%, where the real model loses the straddling pages.

With ``experts`` set, each layer's feed-forward is a mixture of experts, as
Mixtral's (llama.cpp's ``llama`` architecture with ``expert_count``): a router
``ffn_gate_inp`` (F32, one row per expert, the one weight whose rows are not a
whole number of pages) and the experts' ``ffn_gate_exps``, ``ffn_up_exps`` and
``ffn_down_exps`` stacked in one 3-D tensor each, which ggml multiplies with
``MUL_MAT_ID`` for the ``experts_used`` experts the router picks per token.

The weights come from ``numpy.random.default_rng(seed)``, so the same seed
gives the same bytes. The rows of ``output.weight`` for the control and byte
tokens are zero, so greedy decoding always picks a printable word piece.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
ROW_QUANTUM = 64  # rows per weight are a multiple of this: 64 F16 rows of 256 values are 8 pages


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    embd: int = 256
    heads: int = 4
    heads_kv: int = 2
    ff: int = 1024
    words: int = 125  # word pieces after <unk>, <s>, </s> and the 256 byte tokens: a vocabulary of 384 rows
    ctx: int = 256
    seed: int = 0
    page_aligned: bool = True  # False: gguf's default 32-byte alignment, so slab boundaries straddle pages
    quant: str = "f16"  # or "q4_0": the matmul weights quantized, which CPU_REPACK repacks (AVX2 and up)
    experts: int = 0  # 0: a dense feed-forward; 2 or more: a mixture of that many experts per layer
    experts_used: int = 2  # with experts: how many the router picks per token

    @property
    def vocab(self) -> int:
        return 3 + 256 + self.words

    def check(self) -> None:
        if self.quant not in ("f16", "q4_0"):
            raise ValueError(f"synthetic model: quant {self.quant!r} is not f16 or q4_0")
        if self.experts and not 1 <= self.experts_used <= self.experts or self.experts == 1 or self.experts < 0:
            raise ValueError(
                f"synthetic model: {self.experts} experts with {self.experts_used} used per token; "
                "give 0 experts (dense) or 2 or more, and 1 to that many used"
            )
        head = self.embd // self.heads
        rows = {
            "attn_q": self.embd,
            "attn_k": head * self.heads_kv,
            "attn_output": self.embd,
            "ffn_up": self.ff,
            "ffn_down": self.embd,
            "output": self.vocab,
        }
        bad = {k: v for k, v in rows.items() if v % ROW_QUANTUM}
        if bad or self.embd % self.heads or self.heads % self.heads_kv or self.layers < 1:
            raise ValueError(f"synthetic model shape {self}: rows not a multiple of {ROW_QUANTUM}: {bad}")


MOE = Shape(experts=8, experts_used=2)  # the scenario matrix's mixture of experts: 8 per layer, 2 used per token
# wide rows in many pages: weights uploaded to an RPC worker start wherever its buffer allocator puts them (64-byte
# alignment), so each slab boundary shares a page with the next slab; with 256 to 1024 pages a weight that page is
# under 0.5% of a slab, where the default shape's 32 make it 3%
WIDE = Shape(layers=4, embd=1024, heads=8, heads_kv=4, ff=2048)

WORDS = (
    [f"\u2581{w}" for w in "the of and to in is was for on as by with at from it an be or are this".split()]
    + [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["\u2581", ".", ",", "\u2581Paris", "\u2581France", "\u2581city", "\u2581capital", "\u2581model"]
)


def _vocab(shape: Shape) -> tuple[list[str], list[float], list[int]]:
    from gguf import TokenType  # noqa: PLC0415

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    words = list(dict.fromkeys(WORDS))
    k = 0
    while len(words) < shape.words:  # more pieces, deterministically: two letters
        a, b = divmod(k, 26)
        piece = f"\u2581{chr(97 + a % 26)}{chr(97 + b)}"
        if piece not in words:
            words.append(piece)
        k += 1
    words = words[: shape.words]
    tokens += words
    types += [TokenType.NORMAL] * len(words)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(words))]  # longer/commoner first, as SPM wants
    return tokens, scores, [int(t) for t in types]


def write(path: str | os.PathLike[str], shape: Shape = Shape()) -> Path:
    """Write the model to ``path`` (atomically) and return it."""
    import numpy as np  # noqa: PLC0415
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, quants  # noqa: PLC0415

    shape.check()
    path = Path(path)
    rng = np.random.default_rng(shape.seed)
    head = shape.embd // shape.heads

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        # ggml's ne0 is the row length: numpy shape (rows, cols) is a weight of `rows` rows of `cols` values
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float16)

    def add_weight(w, name: str, values: np.ndarray) -> None:
        """A matmul weight: f16, or quantized (gguf-py's reference quantizer) for shape.quant q4_0."""
        if shape.quant == "f16":
            w.add_tensor(name, values)
        else:
            q = quants.quantize(values.astype(np.float32), GGMLQuantizationType.Q4_0)
            w.add_tensor(name, q, raw_dtype=GGMLQuantizationType.Q4_0)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        w = GGUFWriter(tmp, "llama")
        w.add_name(f"numa-llama synthetic llama {shape.layers}x{shape.embd} seed {shape.seed}")
        if shape.page_aligned:
            w.add_custom_alignment(PAGE)
        w.add_file_type(LlamaFileType.MOSTLY_F16 if shape.quant == "f16" else LlamaFileType.MOSTLY_Q4_0)
        w.add_context_length(shape.ctx)
        w.add_embedding_length(shape.embd)
        w.add_block_count(shape.layers)
        w.add_feed_forward_length(shape.ff)
        w.add_head_count(shape.heads)
        w.add_head_count_kv(shape.heads_kv)
        if shape.experts:
            w.add_expert_count(shape.experts)
            w.add_expert_used_count(shape.experts_used)
        w.add_rope_dimension_count(head)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(shape.vocab)
        tokens, scores, types = _vocab(shape)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)

        norm = np.ones(shape.embd, dtype=np.float32)
        w.add_tensor("token_embd.weight", mat(shape.vocab, shape.embd, 1.0))
        for i in range(shape.layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
            add_weight(w, f"blk.{i}.attn_q.weight", mat(shape.embd, shape.embd, 0.06))
            add_weight(w, f"blk.{i}.attn_k.weight", mat(head * shape.heads_kv, shape.embd, 0.06))
            add_weight(w, f"blk.{i}.attn_v.weight", mat(head * shape.heads_kv, shape.embd, 0.06))
            add_weight(w, f"blk.{i}.attn_output.weight", mat(shape.embd, shape.embd, 0.06))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
            if shape.experts:
                # the router in F32, as converted Mixtrals have it; each expert stack is (experts, rows, cols)
                w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", mat(shape.experts, shape.embd, 0.5).astype(np.float32))
                for name, rows, cols, scale in (
                    ("ffn_gate_exps", shape.ff, shape.embd, 0.06),
                    ("ffn_up_exps", shape.ff, shape.embd, 0.06),
                    ("ffn_down_exps", shape.embd, shape.ff, 0.03),
                ):
                    stack = np.stack([mat(rows, cols, scale) for _ in range(shape.experts)])
                    add_weight(w, f"blk.{i}.{name}.weight", stack)
                continue
            add_weight(w, f"blk.{i}.ffn_gate.weight", mat(shape.ff, shape.embd, 0.06))
            add_weight(w, f"blk.{i}.ffn_up.weight", mat(shape.ff, shape.embd, 0.06))
            add_weight(w, f"blk.{i}.ffn_down.weight", mat(shape.embd, shape.ff, 0.03))
        w.add_tensor("output_norm.weight", norm)
        out = mat(shape.vocab, shape.embd, 0.2)
        out[: 3 + 256] = 0  # control and byte tokens never win a greedy pick: the text is printable
        add_weight(w, "output.weight", out)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def matmul_weights(shape: Shape = Shape()) -> int:
    """How many weights a forward pass multiplies by (7 per layer, 8 with experts: the router; and the output)."""
    return (8 if shape.experts else 7) * shape.layers + 1


def cached(shape: Shape = Shape()) -> Path:
    """The model for ``shape`` in numa-llama's cache (``$NUMA_LLAMA_CACHE``, else ``~/.cache/numa-llama``),
    written on first use. The name carries a digest of the shape and of this file, so a change makes a new one."""
    env = os.environ.get("NUMA_LLAMA_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numa-llama"
    digest = hashlib.sha256(repr(shape).encode() + Path(__file__).read_bytes()).hexdigest()[:16]
    kind = ("" if shape.page_aligned else "-straddling") + ("" if shape.quant == "f16" else f"-{shape.quant}")
    kind += f"-moe{shape.experts}x{shape.experts_used}" if shape.experts else ""
    path = base / "models" / f"synthetic-llama-{shape.layers}x{shape.embd}-seed{shape.seed}{kind}-{digest}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, shape)
    return path


if __name__ == "__main__":
    print(cached())
    print(cached(Shape(page_aligned=False)))
    print(cached(Shape(quant="q4_0")))
    print(cached(WIDE))
    print(cached(MOE))
