"""build/series_style.py: the style gates pass on the committed series and catch what they are for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import series_format
import series_style

GOOD_MESSAGE = """A paragraph that says why this change is needed,
over three lines, as llama.cpp's reviewers ask of every
pull request.

Forwarded: no"""


def patch_text(subject: str, message: str, file: str, added: list[str]) -> str:
    body = "\n".join("+" + line for line in added)
    return (
        f"From 0 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.invalid>\nSubject: [PATCH] {subject}\n\n"
        f"{message}\n---\n {file} | 1 +\n\ndiff --git a/{file} b/{file}\n--- a/{file}\n+++ b/{file}\n"
        f"@@ -1,0 +1,{len(added)} @@\n{body}\n"
    )


def problems(
    tmp_path: Path,
    subject: str = "ggml-cpu : a change",
    message: str = GOOD_MESSAGE,
    file: str = "ggml/src/ggml-cpu/numa.cpp",
    added: list[str] | None = None,
) -> list[str]:
    p = tmp_path / "0001-x.patch"
    p.write_text(patch_text(subject, message, file, added or ["int x = 1;"]))
    return series_style.patch_problems(series_style.parse_patch(p))


def test_a_clean_patch_passes(tmp_path: Path) -> None:
    assert problems(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"subject": "Add a change"}, "is not llama.cpp's '<module> : <title>'"),
        ({"message": "Too short.\n\nForwarded: no"}, "no paragraph says why"),
        ({"message": GOOD_MESSAGE.replace("Forwarded: no", "")}, "no 'Forwarded:' line"),
        ({"added": ["int x = 1;   "]}, "trailing whitespace"),
        ({"added": ["\tint x = 1;"]}, "a tab"),
        ({"added": ["    // ggml_barrier(params->threadpool);"]}, "commented-out code"),
        ({"added": ["    // x = compute(a, b);"]}, "commented-out code"),
        ({"file": "ggml/src/ggml-backend.cpp"}, "changes ggml/src/ggml-backend.cpp without saying why"),
    ],
)
def test_each_gate_catches_its_problem(tmp_path: Path, kwargs: dict, expected: str) -> None:
    found = problems(tmp_path, **kwargs)
    assert any(expected in p for p in found), found


def test_prose_comments_are_not_taken_for_code(tmp_path: Path) -> None:
    assert (
        problems(
            tmp_path,
            added=[
                "// read-only file mappings alone, and mbind policy does not govern them);",
                "// the index (into nodes) of thread ith's node",
            ],
        )
        == []
    )


def test_the_committed_series_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """Subjects, why paragraphs, Forwarded, whitespace, guards (<= 6), -Werror on the added C++ files, and
    clang-format on the lines each patch adds to the series' own files."""
    assert series_style.main([]) == 0, capsys.readouterr().err
    assert "numa.cpp" in capsys.readouterr().out


# -- clang-format, per patch commit, on the files the series adds ----------------------------------------------------


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def toy_tree(tmp_path: Path) -> Path:
    """A git tree like vendor/llama.cpp: llama.cpp's .clang-format and an upstream file at the tag 'upstream'."""
    tree = tmp_path / "tree"
    tree.mkdir()
    git(tree, "init", "-q")
    (tree / ".clang-format").write_text((series_style.TREE / ".clang-format").read_text())
    (tree / "old.c").write_text("int  upstream_style=1;\n")  # upstream's own file, not clang-format clean
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "upstream")
    git(tree, "tag", "upstream")
    return tree


def commit_file(tree: Path, name: str, text: str) -> None:
    (tree / name).write_text(text)
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", f"ggml-cpu : {name}")


def test_clang_format_gate_names_the_patch_whose_new_file_is_unformatted(toy_tree: Path) -> None:
    commit_file(toy_tree, "numa.cpp", "int x = 1;\n")
    commit_file(toy_tree, "numa.h", "int  f(int a);\nint g( int b );\n")
    found = series_style.clang_format_problems(toy_tree, ["0001-a.patch", "0002-b.patch"])
    assert len(found) == 1 and found[0].startswith("0002-b.patch: clang-format would change"), found
    assert "numa.h" in found[0]


def test_lines_added_to_upstream_files_follow_their_code_and_are_not_gated(toy_tree: Path) -> None:
    commit_file(toy_tree, "old.c", "int  upstream_style=1;\nint  added_here=2;\n")
    assert series_style.clang_format_problems(toy_tree, ["0001-a.patch"]) == []
    assert "1 place(s)" in series_style.clang_format_report(toy_tree)


def test_series_format_makes_every_prefix_pass(toy_tree: Path, tmp_path: Path) -> None:
    commit_file(toy_tree, "numa.h", "int  f(int a);\n")
    commit_file(toy_tree, "numa.cpp", '#include "numa.h"\nint f(int a){return a;}\n')
    assert len(series_style.clang_format_problems(toy_tree, ["1", "2"])) == 2
    head, changed = series_format.format_series(
        toy_tree, tmp_path / "scratch", series_style.clang_format_exe(), log=lambda _: None
    )
    git(toy_tree, "reset", "-q", "--hard", head)
    assert changed == ["ggml-cpu : numa.h", "ggml-cpu : numa.cpp"]
    assert series_style.clang_format_problems(toy_tree, ["1", "2"]) == []
    assert git(toy_tree, "log", "--format=%s", "upstream..HEAD").splitlines() == changed[::-1]
    assert "int f(int a) {\n    return a;\n}" in (toy_tree / "numa.cpp").read_text()


def test_the_gate_refuses_another_clang_format_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(series_style, "CLANG_FORMAT_VERSION", "1.2.3")
    with pytest.raises(series_style.StyleToolError, match="clang-format 1.2.3 not found"):
        series_style.clang_format_exe()


def test_a_missing_git_clang_format_is_refused_not_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without git-clang-format, `git clang-format` exits 1 ("not a git command"), its status for "would change":
    the gate must say so, not report a clean series (it did, when run outside an activated venv)."""
    exe = tmp_path / "clang-format"
    exe.symlink_to(series_style.clang_format_exe())
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if shutil.which("git-clang-format", path="/usr/bin:/bin"):
        pytest.skip("a system git-clang-format is installed: nothing is missing here")
    with pytest.raises(series_style.StyleToolError, match="git-clang-format not found"):
        series_style.git_clang_format_env(str(exe))
    assert "PATH" in series_style.git_clang_format_env(series_style.clang_format_exe())  # beside the wheel's binary
