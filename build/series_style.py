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
- the C++ files the series adds compile with ``-Wall -Wextra -Werror`` (syntax and warnings only).

clang-format with llama.cpp's ``.clang-format`` is *reported* (``--clang-format``), not gated yet: the series'
lines are not formatted with it (see the README).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches" / "llama.cpp"
TREE = ROOT / "vendor" / "llama.cpp"
MAX_GUARDS = 6
SUBJECT = re.compile(r"^[\w./+-]+(?:, ?[\w./+-]+)* : \S")
CODE_COMMENT = re.compile(r"^\s*//\s*(?:(?:if|for|while|return|else|switch)\b.*[;{)]\s*$"
                          r"|[\w.>\[\]-]+\s*[-+*/]?=\s*[^=].*;\s*$"
                          r"|[\w:]+\([^)]*\)\s*;\s*$)")
SOURCE = re.compile(r"\.(c|cc|cpp|h|hpp|cu|m)$")


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


def tree_problems(tree: Path, patches: list[Patch]) -> list[str]:
    out: list[str] = []
    guards = subprocess.run(["git", "grep", "-n", "GGML_USE_CPU_NUMA"], cwd=tree, capture_output=True,
                            text=True).stdout.splitlines()
    if len(guards) > MAX_GUARDS:
        out.append(f"{len(guards)} lines name GGML_USE_CPU_NUMA (at most {MAX_GUARDS}):\n    " + "\n    ".join(guards))
    added_files = sorted({f for p in patches for f in p.files if f.endswith(".cpp") and _is_new(tree, f)})
    print(f"compiling the C++ files the series adds with -Wall -Wextra -Werror: {', '.join(added_files)}")
    cxx = shutil.which("c++") or shutil.which("g++")
    for f in added_files:
        if cxx is None:
            out.append("no C++ compiler to check the added files with -Werror")
            break
        cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DGGML_USE_CPU_NUMA",
               "-Iggml/include", "-Iggml/src", "-Iggml/src/ggml-cpu", "-Icommon", "-Iinclude", f]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if proc.returncode != 0:
            out.append(f"{f} does not compile with -Wall -Wextra -Werror:\n    "
                       + "\n    ".join(proc.stderr.strip().splitlines()[:10]))
    return out


def _is_new(tree: Path, file: str) -> bool:
    """Added by the series: absent from the tree's 'upstream' tag."""
    proc = subprocess.run(["git", "cat-file", "-e", f"upstream:{file}"], cwd=tree, capture_output=True)
    return proc.returncode != 0 and (tree / file).exists()


def clang_format_report(tree: Path) -> str:
    """How many lines the series adds that llama.cpp's .clang-format would change (report only)."""
    exe = shutil.which("clang-format")
    if exe is None:
        return "clang-format: not installed (pip install clang-format); not checked"
    diff = subprocess.run(["git", "diff", "-U0", "upstream", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout
    ranges: dict[str, list[str]] = {}
    current = ""
    for line in diff.splitlines():
        if line.startswith("+++ "):
            current = line[4:].removeprefix("b/")
        m = re.match(r"@@ -\S+ \+(\d+)(?:,(\d+))? @@", line)
        if m and SOURCE.search(current) and int(m[2] or 1) > 0:
            start = int(m[1])
            ranges.setdefault(current, []).append(f"--lines={start}:{start + int(m[2] or 1) - 1}")
    total = 0
    for file, lines in ranges.items():
        proc = subprocess.run([exe, "--dry-run", *lines, file], cwd=tree, capture_output=True, text=True)
        total += proc.stderr.count("warning:")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    return f"clang-format ({version}): {total} place(s) in the series' added lines would change (not gated yet)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build/series_style.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=Path, default=PATCHES)
    ap.add_argument("--tree", type=Path, default=TREE, help="the vendor tree with the series applied")
    ap.add_argument("--clang-format", action="store_true", help="also report clang-format's view")
    args = ap.parse_args(argv)
    listed = [line.strip() for line in (args.patches / "series").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    patches = [parse_patch(args.patches / name) for name in listed]
    problems = [msg for p in patches for msg in patch_problems(p)]
    if (args.tree / ".git").exists():
        problems += tree_problems(args.tree, patches)
    else:
        problems.append(f"{args.tree} is not the applied vendor tree (python build/sync.py apply)")
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    if args.clang_format:
        print(clang_format_report(args.tree))
    print(f"{'ok  ' if not problems else 'FAIL'} {len(patches)} patch(es): {len(problems)} style problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
