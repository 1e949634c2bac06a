"""Every numa= value Llama and the server accept works; every bad one gets its error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest
from conftest import ROOT, run_json
from hypothesis import given
from hypothesis import strategies as st

NAMES = {"distribute": 1, "isolate": 2, "numactl": 3, "migrate": 5}
ACCEPTED = [
    (True, 1),
    (False, 0),
    (0, 0),
    (1, 1),
    (2, 2),
    (3, 3),
    (5, 5),
    ("distribute", 1),
    ("isolate", 2),
    ("numactl", 3),
    ("migrate", 5),
    (llama_cpp.GGML_NUMA_STRATEGY_MIGRATE, 5),
]


def test_constants() -> None:
    assert llama_cpp.GGML_NUMA_STRATEGY_MIGRATE == 5
    assert llama_cpp.GGML_NUMA_STRATEGY_COUNT == 6
    assert llama_cpp.llama_cpp.GGML_NUMA_STRATEGY_NAMES == NAMES


@given(st.one_of(st.booleans(), st.integers(-10, 20), st.text(max_size=12), st.sampled_from(list(NAMES))))
def test_strategy_mapping(value: object) -> None:
    """Names map to llama.cpp's enum, ints in range are taken as they are, and nothing else is accepted."""
    if isinstance(value, bool):
        assert llama_cpp.llama_cpp.ggml_numa_strategy(value) == int(value)
    elif isinstance(value, int) and 0 <= value < 6 and value != 4 or value in NAMES:
        assert llama_cpp.llama_cpp.ggml_numa_strategy(value) == NAMES.get(value, value)
    else:  # 4 is GGML_NUMA_STRATEGY_MIRROR: reserved upstream, implemented nowhere
        with pytest.raises(ValueError, match="'distribute', 'isolate', 'numactl', 'migrate'"):
            llama_cpp.llama_cpp.ggml_numa_strategy(value)


@pytest.mark.model
@pytest.mark.parametrize("value,expected", ACCEPTED, ids=[repr(v) for v, _ in ACCEPTED])
def test_llama_accepts(model_path, value, expected) -> None:
    """Each value loads the real model and decodes, in its own process (NUMA init is once per process)."""
    out = run_json(f"""
from llama_cpp import Llama
llm = Llama({str(model_path)!r}, numa={value!r}, n_ctx=128, verbose=False)
text = llm.create_completion("Hello", max_tokens=2, temperature=0.0)["choices"][0]["text"]
print(__import__("json").dumps({{"numa": llm.numa, "text": text}}))
""")
    assert out["numa"] == expected
    assert out["text"]


@pytest.mark.parametrize("bad", ["bogus", "Migrate", "mirror ", "", 4, 6, -1, 2.5, None])
def test_llama_rejects(model_path, bad) -> None:
    with pytest.raises(ValueError) as e:
        llama_cpp.Llama(str(model_path), numa=bad, verbose=False)
    assert "'migrate'" in str(e.value) and "'distribute'" in str(e.value)
    if bad == 4:
        assert "GGML_NUMA_STRATEGY_MIRROR" in str(e.value)


@pytest.mark.parametrize("given_,expected", [("migrate", 5), ("true", 1), ("false", 0), ("2", 2), (True, 1), (5, 5)])
def test_server_settings_accept(given_, expected) -> None:
    from llama_cpp.server.settings import ModelSettings

    assert ModelSettings(model="m.gguf", numa=given_).numa == expected


def test_server_settings_reject() -> None:
    from llama_cpp.server.settings import ModelSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown numa strategy 'bogus'.*'migrate'"):
        ModelSettings(model="m.gguf", numa="bogus")


def test_server_cli_parses_numa_names() -> None:
    """`python -m llama_cpp.server --numa migrate` reaches the settings as the strategy."""
    import argparse

    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings

    parser = argparse.ArgumentParser()
    add_args_from_model(parser, ModelSettings)
    args = parser.parse_args(["--model", "m.gguf", "--numa", "migrate"])
    assert parse_model_from_args(ModelSettings, args).numa == 5


def test_the_bindings_own_numa_tests_pass(tmp_path: Path) -> None:
    """The bindings patch carries a test in llama-cpp-python's own style; it passes against this build."""
    test = ROOT / "vendor" / "llama-cpp-python" / "tests" / "test_numa.py"
    assert test.is_file(), "patches/llama-cpp-python/0001 adds tests/test_numa.py"
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
