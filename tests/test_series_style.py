"""build/series_style.py: the style gates pass on the committed series and catch what they are for."""

from __future__ import annotations

from pathlib import Path

import pytest
import series_style

GOOD_MESSAGE = """A paragraph that says why this change is needed,
over three lines, as llama.cpp's reviewers ask of every
pull request.

Forwarded: no"""


def patch_text(subject: str, message: str, file: str, added: list[str]) -> str:
    body = "\n".join("+" + line for line in added)
    return (f"From 0 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.invalid>\nSubject: [PATCH] {subject}\n\n"
            f"{message}\n---\n {file} | 1 +\n\ndiff --git a/{file} b/{file}\n--- a/{file}\n+++ b/{file}\n"
            f"@@ -1,0 +1,{len(added)} @@\n{body}\n")


def problems(tmp_path: Path, subject: str = "ggml-cpu : a change", message: str = GOOD_MESSAGE,
             file: str = "ggml/src/ggml-cpu/numa.cpp", added: list[str] | None = None) -> list[str]:
    p = tmp_path / "0001-x.patch"
    p.write_text(patch_text(subject, message, file, added or ["int x = 1;"]))
    return series_style.patch_problems(series_style.parse_patch(p))


def test_a_clean_patch_passes(tmp_path: Path) -> None:
    assert problems(tmp_path) == []


@pytest.mark.parametrize("kwargs,expected", [
    ({"subject": "Add a change"}, "is not llama.cpp's '<module> : <title>'"),
    ({"message": "Too short.\n\nForwarded: no"}, "no paragraph says why"),
    ({"message": GOOD_MESSAGE.replace("Forwarded: no", "")}, "no 'Forwarded:' line"),
    ({"added": ["int x = 1;   "]}, "trailing whitespace"),
    ({"added": ["\tint x = 1;"]}, "a tab"),
    ({"added": ["    // ggml_barrier(params->threadpool);"]}, "commented-out code"),
    ({"added": ["    // x = compute(a, b);"]}, "commented-out code"),
    ({"file": "ggml/src/ggml-backend.cpp"}, "changes ggml/src/ggml-backend.cpp without saying why"),
])
def test_each_gate_catches_its_problem(tmp_path: Path, kwargs: dict, expected: str) -> None:
    found = problems(tmp_path, **kwargs)
    assert any(expected in p for p in found), found


def test_prose_comments_are_not_taken_for_code(tmp_path: Path) -> None:
    assert problems(tmp_path, added=["// read-only file mappings alone, and mbind policy does not govern them);",
                                     "// the index (into nodes) of thread ith's node"]) == []


def test_the_committed_series_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """Subjects, why paragraphs, Forwarded, whitespace, guards (<= 6) and -Werror on the added C++ files."""
    assert series_style.main([]) == 0, capsys.readouterr().err
    assert "numa.cpp" in capsys.readouterr().out
