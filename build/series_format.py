"""Re-format the llama.cpp series with clang-format and llama.cpp's own ``.clang-format``, patch by patch.

    python build/series_format.py            # rewrite the series' commits in vendor/llama.cpp
    python build/sync.py export              # then write patches/ from them

For every prefix k of the series, the tree of patch k is checked out in a
scratch worktree, clang-format re-formats the files the series adds (numa.cpp,
numa.h, test-cpu-numa.cpp: ``git clang-format upstream -- FILES``), and the
result becomes commit k', whose parent is k-1'. Lines the series adds to
upstream's own files follow the code around them (see ``series_style.py``).
So every prefix is formatted, and each patch's diff is what it adds,
formatted, plus what its own lines changed in the alignment of lines an
earlier patch added next to them. Messages, authors and dates are kept.

A rebase with ``--exec "git clang-format"`` would do the same in theory, but a
later patch's context then no longer matches the formatted lines of an earlier
one, and every such patch conflicts. Building each formatted tree from the
original tree avoids the merges altogether.

The gate that checks the result is ``build/series_style.py`` (per patch:
``git clang-format --diff`` between the patch and its parent). The old head is
kept as the branch ``pre-format``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_build import PATCHED_TREE  # noqa: E402
from series import BASE_TAG, SeriesError  # noqa: E402
from series import git as run_git  # noqa: E402
from series_style import CLANG_FORMAT_EXTENSIONS, added_files, clang_format_exe, git_clang_format_env  # noqa: E402


def git(tree: Path, *args: str, env_extra: dict[str, str] | None = None, stdin: str | None = None) -> str:
    return run_git(tree, *args, env_extra=env_extra, stdin=stdin).stdout.strip()


def commit_env(tree: Path, commit: str) -> dict[str, str]:
    """The author and committer of ``commit``, so that the rewritten commit differs only in its tree."""
    fields = git(tree, "log", "-1", "--format=%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd", "--date=raw", commit).split("\0")
    keys = [
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_AUTHOR_DATE",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
        "GIT_COMMITTER_DATE",
    ]
    return dict(zip(keys, fields, strict=True))


def format_series(tree: Path, scratch: Path, exe: str, log=print) -> tuple[str, list[str]]:
    """New head, and the subjects of the patches whose tree clang-format changed."""
    if git(tree, "status", "--porcelain", "--untracked-files=no"):
        raise SystemExit(f"{tree}: uncommitted changes; commit or stash them first")
    commits = git(tree, "rev-list", "--reverse", f"{BASE_TAG}..HEAD").split()
    if not commits:
        raise SystemExit(f"{tree}: no commits on top of {BASE_TAG} (run python build/sync.py apply)")
    if scratch.exists():
        shutil.rmtree(scratch)
    git(tree, "worktree", "prune")
    git(tree, "worktree", "add", "--detach", "-f", str(scratch), commits[0])
    parent = git(tree, "rev-parse", BASE_TAG)
    changed: list[str] = []
    try:
        for commit in commits:
            subject = git(tree, "log", "-1", "--format=%s", commit)
            git(scratch, "checkout", "-q", "--detach", "-f", commit)
            files = added_files(tree, commit)
            # a patch that adds no file is left as it is: with no paths, git clang-format would re-format every line
            # the prefix changes in upstream's files (0001's AMX tile table, say), which follow the code around them
            if files:
                proc = run_git(
                    scratch,
                    "clang-format",
                    "--binary",
                    exe,
                    "--extensions",
                    ",".join(CLANG_FORMAT_EXTENSIONS),
                    "-q",
                    "-f",
                    BASE_TAG,
                    "--",
                    *files,
                    check=False,
                    env_extra=git_clang_format_env(exe),
                )
                if proc.returncode not in (0, 1) or "not a git command" in proc.stderr:  # 1: it changed files
                    raise SystemExit(f"git clang-format on {subject}: {proc.stderr.strip() or proc.stdout.strip()}")
            git(scratch, "add", "-u")
            new_tree = git(scratch, "write-tree")
            if new_tree != git(tree, "rev-parse", f"{commit}^{{tree}}"):
                changed.append(subject)
            message = git(tree, "log", "-1", "--format=%B", commit)
            parent = git(tree, "commit-tree", new_tree, "-p", parent, stdin=message, env_extra=commit_env(tree, commit))
            log(f"{'formatted' if subject in changed else 'unchanged'}  {subject}")
    finally:
        git(tree, "worktree", "remove", "--force", str(scratch))
    return parent, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build/series_format.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tree", type=Path, default=PATCHED_TREE)
    ap.add_argument("--scratch", type=Path, default=HERE.parent / "_build" / "format" / "llama.cpp")
    args = ap.parse_args(argv)
    exe = clang_format_exe()
    try:
        head = git(args.tree, "rev-parse", "HEAD")
        new_head, changed = format_series(args.tree, args.scratch, exe)
    except SeriesError as e:
        print(f"series_format: {e}", file=sys.stderr)
        return 1
    if not changed:
        print("the series is clang-format clean already")
        return 0
    git(args.tree, "branch", "-f", "pre-format", head)
    git(args.tree, "reset", "-q", "--hard", new_head)
    print(
        f"{len(changed)} patch(es) re-formatted; the old head is the branch pre-format. "
        "Now: python build/sync.py export && python build/sync.py check"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
