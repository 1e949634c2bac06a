"""The seeded synthetic model the guests use, and the fast GGUF header reader the tools use."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from conftest import ROOT

from numa_llama import decode, plan, synthetic


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(tmp_path: Path) -> None:
    a = synthetic.write(tmp_path / "a.gguf")
    b = synthetic.write(tmp_path / "b.gguf")
    c = synthetic.write(tmp_path / "c.gguf", synthetic.Shape(seed=1))
    assert sha(a) == sha(b) != sha(c)


def test_a_shape_whose_rows_cannot_be_page_aligned_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        synthetic.write(tmp_path / "x.gguf", synthetic.Shape(words=100))
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_it_loads_and_decodes_printable_text(synthetic_model: Path) -> None:
    code = (
        "from llama_cpp import Llama\n"
        f"llm = Llama({str(synthetic_model)!r}, n_ctx=64, verbose=False)\n"
        "print(repr(llm.create_completion('Paris is', max_tokens=6, temperature=0.0)['choices'][0]['text']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = eval(proc.stdout.strip().splitlines()[-1])  # the repr printed above
    assert text.strip() and text.isprintable(), text


@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_page_aligned_slabs_leave_nothing_remote_and_32_byte_alignment_does(
    synthetic_model: Path, straddling_model: Path, nodes: int
) -> None:
    """The series' own plan (hooks.plan): with the page-aligned model no slab boundary straddles a page."""
    exact = plan.plan_model(synthetic_model, plan.equal_layout(nodes))
    straddling = plan.plan_model(straddling_model, plan.equal_layout(nodes))
    assert exact.locality == 1.0
    assert 0.95 < straddling.locality < 1.0
    assert len(exact.tensors) == synthetic.matmul_weights()


@pytest.mark.parametrize("which", ["synthetic_model", "straddling_model"])
def test_the_header_reader_agrees_with_gguf_reader(request: pytest.FixtureRequest, which: str) -> None:
    path = request.getfixturevalue(which)
    reader = gguf.GGUFReader(path)
    want = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]
    assert decode.gguf_tensor_infos(path) == want


def test_a_truncated_or_foreign_file_is_a_clear_error(synthetic_model: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(synthetic_model.read_bytes()[:3000])  # inside the vocabulary
    with pytest.raises(decode.GGUFFormatError, match="truncated|past the end"):
        decode.gguf_tensor_infos(cut)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(decode.GGUFFormatError, match="not a little-endian GGUF"):
        decode.gguf_tensor_infos(foreign)


@pytest.mark.parametrize(("experts", "used"), [(1, 1), (8, 0), (8, 9), (-2, 1)])
def test_an_impossible_mixture_of_experts_is_refused(tmp_path: Path, experts: int, used: int) -> None:
    with pytest.raises(ValueError, match="experts"):
        synthetic.write(tmp_path / "x.gguf", synthetic.Shape(experts=experts, experts_used=used))
    assert not list(tmp_path.iterdir())


def test_the_mixture_of_experts_decodes_through_stacks_of_experts(tmp_path: Path) -> None:
    """Real llama.cpp loads the MoE shape and multiplies by 3 expert stacks (MUL_MAT_ID, 8 matrices each) and a
    router per layer, as the graph reports them; and its greedy text is printable."""
    path = synthetic.write(tmp_path / "moe.gguf", synthetic.MOE)
    code = (
        "from llama_cpp import Llama\n"
        "from numa_llama import api\n"
        f"llm = Llama({str(path)!r}, n_ctx=64, n_threads=2, verbose=False)\n"
        "text = llm.create_completion('Paris is', max_tokens=6, temperature=0.0)['choices'][0]['text']\n"
        "print(repr((text, sorted((w.name, w.n_matrices) for w in api.graph_weights(llm)))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text, weights = eval(proc.stdout.strip().splitlines()[-1])
    assert text.strip() and text.isprintable(), text
    assert len(weights) == synthetic.matmul_weights(synthetic.MOE)
    stacks = {n: k for n, k in weights if k > 1}
    assert stacks == {
        f"blk.{i}.ffn_{m}_exps.weight": 8 for i in range(synthetic.MOE.layers) for m in ("gate", "up", "down")
    }
    assert {f"blk.{i}.ffn_gate_inp.weight" for i in range(synthetic.MOE.layers)} <= {n for n, _ in weights}
