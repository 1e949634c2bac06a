"""The real build and the real model run on a multi-node kernel (the guest, or a NUMA host)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_python

pytestmark = [pytest.mark.numa_guest, pytest.mark.model, pytest.mark.nodes4]


def test_model_runs_with_migrate_on_every_node_count(model_path) -> None:
    """Llama(numa="migrate") loads and decodes; in the TCG guest ggml picks the sse42 variant by itself."""
    proc = run_python(
        f"""
import json, numa_llama
from llama_cpp import Llama
llm = Llama({str(model_path)!r}, numa="migrate", n_ctx=64, verbose=False)
text = llm.create_completion("Paris is", max_tokens=1, temperature=0.0)["choices"][0]["text"]
print(json.dumps({{"numa": llm.numa, "text": text, "loaded": numa_llama.build_info().cpu_backend_loaded}}))
""",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["numa"] == 5 and out["text"].strip()
    if os.environ.get("NUMA_VM"):
        assert out["loaded"] == "libggml-cpu-sse42.so"
