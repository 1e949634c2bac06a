#!/usr/bin/env python3
"""Style gates on the llama.cpp series: what llama.cpp's maintainers would ask of each patch before review.

    python build/series_style.py            # the committed series against the applied vendor tree

Per patch (from the patch files):
- the subject is llama.cpp's ``<module> : <title>``;
- the message has a paragraph saying why (3 lines or more) and a ``Forwarded:`` line;
- no added line ends in whitespace or holds a tab (llama.cpp indents with spaces);
- no added comment is commented-out code;
- ``ggml/src/ggml-backend.cpp`` is touched only by a patch whose message names it (and so argues for it).

On the patched tree:
- at most ``MAX_GUARDS`` lines name ``GGML_USE_CPU_NUMA``;
- the C++ files the series adds compile with ``-Wall -Wextra -Werror`` (syntax and warnings only);
- per patch commit, clang-format (``CLANG_FORMAT_VERSION``, the PyPI wheel the ``test`` extra pins) with
  llama.cpp's own ``.clang-format`` leaves the lines that patch adds to the files the series adds as they are
  (``git clang-format --diff`` between the commit and its parent). ``build/series_format.py`` re-formats a series
  that fails it. Lines added to upstream's own files follow the code around them instead, as llama.cpp's
  CONTRIBUTING.md asks ("follow the existing patterns in the code ... in case of doubt use clang-format to
  format the added code"): those files are not clang-format clean upstream, and formatting the series' lines in
  them re-sorts upstream's include blocks and re-flows whole upstream statements. ``--clang-format-report``
  counts what clang-format would change there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from series import BASE_TAG, git  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches" / "llama.cpp"
TREE = ROOT / "vendor" / "llama.cpp"
MAX_GUARDS = 6
SUBJECT = re.compile(r"^[\w./+-]+(?:, ?[\w./+-]+)* : \S")
CODE_COMMENT = re.compile(
    r"^\s*//\s*(?:(?:if|for|while|return|else|switch)\b.*[;{)]\s*$"
    r"|[\w.>\[\]-]+\s*[-+*/]?=\s*[^=].*;\s*$"
    r"|[\w:]+\([^)]*\)\s*;\s*$)"
)
SOURCE = re.compile(r"\.(c|cc|cpp|h|hpp|cu|m)$")
CLANG_FORMAT_VERSION = "21.1.8"  # formats differ between releases: the gate needs exactly this one
CLANG_FORMAT_EXTENSIONS = ("c", "cc", "cpp", "h", "hpp")


class StyleToolError(RuntimeError):
    """The gate's tool is missing or cannot read llama.cpp's configuration: the gate cannot say yes."""


@dataclass(frozen=True)
class Patch:
    path: Path
    subject: str
    message: str
    files: tuple[str, ...]
    added: tuple[tuple[str, str], ...]  # (file, line) for every added line


def parse_patch(path: Path) -> Patch:
    lines = path.read_text(errors="replace").splitlines()
    subject, i = "", 0
    while i < len(lines) and not lines[i].startswith("Subject: "):
        i += 1
    if i < len(lines):
        subject = lines[i].removeprefix("Subject: ").removeprefix("[PATCH] ")
        i += 1
        while i < len(lines) and lines[i].startswith(" "):
            subject += lines[i]
            i += 1
    body: list[str] = []
    while i < len(lines) and lines[i] != "---":
        body.append(lines[i])
        i += 1
    files: list[str] = []
    added: list[tuple[str, str]] = []
    current = ""
    for line in lines[i:]:
        if line.startswith("+++ "):
            current = line[4:].removeprefix("b/")
            files.append(current)
        elif line.startswith("+") and current:
            added.append((current, line[1:]))
    return Patch(path, subject, "\n".join(body).strip(), tuple(files), tuple(added))


def patch_problems(p: Patch) -> list[str]:
    out: list[str] = []
    name = p.path.name
    if not SUBJECT.match(p.subject):
        out.append(f"{name}: subject {p.subject!r} is not llama.cpp's '<module> : <title>'")
    paragraphs = [para for para in re.split(r"\n\s*\n", p.message) if para.strip()]
    if not any(len(para.strip().splitlines()) >= 3 and not para.startswith("Forwarded:") for para in paragraphs):
        out.append(f"{name}: no paragraph says why (3 lines or more)")
    if not re.search(r"(?m)^Forwarded: \S", p.message):
        out.append(f"{name}: no 'Forwarded:' line")
    for file, line in p.added:
        if not SOURCE.search(file):
            continue
        if line != line.rstrip():
            out.append(f"{name}: {file}: trailing whitespace: {line.strip()[:60]!r}")
        if "\t" in line:
            out.append(f"{name}: {file}: a tab: {line.strip()[:60]!r}")
        if CODE_COMMENT.match(line):
            out.append(f"{name}: {file}: commented-out code: {line.strip()[:60]!r}")
    if "ggml/src/ggml-backend.cpp" in p.files and "ggml-backend.cpp" not in p.message:
        out.append(f"{name}: changes ggml/src/ggml-backend.cpp without saying why in its message")
    return out


def tree_problems(tree: Path) -> list[str]:
    out: list[str] = []
    guards = subprocess.run(
        ["git", "grep", "-n", "GGML_USE_CPU_NUMA"], cwd=tree, capture_output=True, text=True
    ).stdout.splitlines()
    if len(guards) > MAX_GUARDS:
        out.append(f"{len(guards)} lines name GGML_USE_CPU_NUMA (at most {MAX_GUARDS}):\n    " + "\n    ".join(guards))
    new_cpp = [f for f in added_files(tree, "HEAD") if f.endswith(".cpp")]
    print(f"compiling the C++ files the series adds with -Wall -Wextra -Werror: {', '.join(new_cpp)}")
    cxx = shutil.which("c++") or shutil.which("g++")
    for f in new_cpp:
        if cxx is None:
            out.append("no C++ compiler to check the added files with -Werror")
            break
        cmd = [
            cxx,
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-DGGML_USE_CPU_NUMA",
            "-Iggml/include",
            "-Iggml/src",
            "-Iggml/src/ggml-cpu",
            "-Icommon",
            "-Iinclude",
            f,
        ]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if proc.returncode != 0:
            out.append(
                f"{f} does not compile with -Wall -Wextra -Werror:\n    "
                + "\n    ".join(proc.stderr.strip().splitlines()[:10])
            )
    return out


def clang_format_exe() -> str:
    """The pinned clang-format: the one beside this Python (the venv's wheel) first, then PATH."""
    candidates = [Path(sys.executable).parent / "clang-format", shutil.which("clang-format")]
    seen: list[str] = []
    for exe in candidates:
        if exe is None or not Path(exe).exists():
            continue
        version = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip()
        if re.search(rf"version {re.escape(CLANG_FORMAT_VERSION)}\b", version):
            return str(exe)
        seen.append(f"{exe}: {version}")
    raise StyleToolError(
        f"clang-format {CLANG_FORMAT_VERSION} not found ({'; '.join(seen) or 'none installed'}): "
        f"pip install clang-format=={CLANG_FORMAT_VERSION} (the test extra pins it)"
    )


def git_clang_format_env(exe: str) -> dict[str, str]:
    """PATH for ``git clang-format`` with ``exe``: the git-clang-format script beside it (the wheel ships both) first.

    git runs ``git-clang-format`` from PATH; without one, ``git clang-format`` prints "not a git command" and exits
    1, which is also its exit status for "would change something", so a missing script must be refused here, or
    the gate would pass on finding nothing.
    """
    path = f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("git-clang-format", path=path) is None:
        raise StyleToolError(
            f"git-clang-format not found beside {exe} nor on PATH: pip install clang-format=={CLANG_FORMAT_VERSION}"
        )
    return {"PATH": path}


def added_files(tree: Path, commit: str) -> list[str]:
    """Source files that exist at ``commit`` and not in upstream: the series' own files."""
    out = git(tree, "diff", "--name-only", "--diff-filter=A", BASE_TAG, commit).stdout.split()
    return sorted(f for f in out if f.rsplit(".", 1)[-1] in CLANG_FORMAT_EXTENSIONS)


def clang_format_diff(tree: Path, exe: str, old: str, new: str, files: list[str] | None) -> str:
    """What clang-format would change in the lines that differ between ``old`` and ``new`` (all source files, or
    ``files``); empty when nothing."""
    proc = git(
        tree,
        "clang-format",
        "--binary",
        exe,
        "--diff",
        "--extensions",
        ",".join(CLANG_FORMAT_EXTENSIONS),
        old,
        new,
        *(["--", *files] if files else []),
        check=False,
        env_extra=git_clang_format_env(exe),
    )
    if "error:" in proc.stderr or "not a git command" in proc.stderr or proc.returncode not in (0, 1):
        raise StyleToolError(f"git clang-format {old} {new}: {proc.stderr.strip()[:500]}")
    diff = proc.stdout
    return "" if diff.startswith(("no modified files", "clang-format did not modify")) else diff.strip()


def clang_format_problems(tree: Path, names: list[str]) -> list[str]:
    """Per patch commit, the lines it adds to the series' own files that llama.cpp's .clang-format would change."""
    exe = clang_format_exe()
    commits = git(tree, "rev-list", "--reverse", f"{BASE_TAG}..HEAD").stdout.split()
    if len(commits) != len(names):
        return [
            f"{tree}: {len(commits)} commit(s) on {BASE_TAG}, but the series lists {len(names)} patch(es) "
            "(python build/sync.py apply)"
        ]
    out: list[str] = []
    for name, commit in zip(names, commits, strict=True):
        files = added_files(tree, commit)
        diff = clang_format_diff(tree, exe, f"{commit}^", commit, files) if files else ""
        if not diff:
            continue
        hunks = [line for line in diff.splitlines() if line.startswith("@@")]
        files = sorted({line[6:] for line in diff.splitlines() if line.startswith("+++ b/")})
        first = next(
            (line for line in diff.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))),
            "",
        )
        out.append(
            f"{name}: clang-format would change {len(hunks)} place(s) in the lines it adds "
            f"({', '.join(files)}; first: {first.strip()[:70]!r}); python build/series_format.py re-formats"
        )
    return out


def clang_format_report(tree: Path) -> str:
    """How many places clang-format would change in the lines the series adds to upstream's own files."""
    exe = clang_format_exe()
    new = set(added_files(tree, "HEAD"))
    changed = git(tree, "diff", "--name-only", BASE_TAG, "HEAD").stdout.split()
    upstream_files = [f for f in changed if f not in new and f.rsplit(".", 1)[-1] in CLANG_FORMAT_EXTENSIONS]
    diff = clang_format_diff(tree, exe, BASE_TAG, "HEAD", upstream_files) if upstream_files else ""
    places = sum(line.startswith("@@") for line in diff.splitlines())
    return (
        f"clang-format: {places} place(s) in the series' lines in upstream's own files would change "
        f"({len(upstream_files)} file(s); not gated: they follow the code around them)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build/series_style.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--patches", type=Path, default=PATCHES)
    ap.add_argument("--tree", type=Path, default=TREE, help="the vendor tree with the series applied")
    ap.add_argument(
        "--no-clang-format", action="store_true", help="skip the clang-format gate (the result then says so)"
    )
    ap.add_argument(
        "--clang-format-report",
        action="store_true",
        help="also count clang-format's changes in the series' lines in upstream's own files",
    )
    args = ap.parse_args(argv)
    listed = [
        line.strip()
        for line in (args.patches / "series").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    patches = [parse_patch(args.patches / name) for name in listed]
    problems = [msg for p in patches for msg in patch_problems(p)]
    if (args.tree / ".git").exists():
        problems += tree_problems(args.tree)
        if not args.no_clang_format:
            try:
                problems += clang_format_problems(args.tree, listed)
            except StyleToolError as e:
                problems.append(str(e))
    else:
        problems.append(f"{args.tree} is not the applied vendor tree (python build/sync.py apply)")
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    if args.clang_format_report:
        print(clang_format_report(args.tree))
    skipped = " (clang-format not checked)" if args.no_clang_format else ""
    print(f"{'ok  ' if not problems else 'FAIL'} {len(patches)} patch(es): {len(problems)} style problem(s){skipped}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
