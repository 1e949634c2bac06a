"""A patch series over a pinned tree: apply, export, check.

The habits are ollama's (``llama/patches`` + ``Makefile.sync``) and
ungoogled-chromium's (``patches/series`` + ``devutils``):

* the vendor tree becomes a git repository whose first commit, tagged
  ``upstream``, is the pinned tree; the series is ``git am -3``'d onto it on
  the branch ``numa-llama``, so a patch is edited as a commit;
* ``export`` regenerates the patch files from those commits with
  ``git format-patch --zero-commit --no-signature --no-numbered`` under a fixed
  git configuration, so the output does not depend on whose machine ran it;
* ``check`` (for CI) lints the series file, applies every patch with zero fuzz
  to a clean copy of the pin and exports again: the result must be the
  committed files, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BASE_TAG = "upstream"
BRANCH = "numa-llama"
STAMP = "numa-llama-series.json"  # inside the tree's .git/

# Everything that can change what format-patch prints is pinned here, so that
# a developer's ~/.gitconfig cannot leak into the committed patches.
_GIT_CONFIG = [
    "core.abbrev=12",
    "core.autocrlf=false",
    "diff.algorithm=myers",
    "diff.noprefix=false",
    "diff.mnemonicPrefix=false",
    "diff.relative=false",
    "diff.renames=true",
    "diff.suppressBlankEmpty=false",
    "format.signature=",
    "format.coverLetter=false",
    "format.numbered=false",
    "format.useAutoBase=false",
    "commit.gpgSign=false",
    "am.threeWay=false",
    "am.keepcr=false",
    "advice.detachedHead=false",
    "init.defaultBranch=main",
]
FORMAT_PATCH = ["format-patch", "--zero-commit", "--no-signature", "--no-numbered", "--no-cover-letter"]


class SeriesError(RuntimeError):
    """A series operation failed; the message says what to do."""


def git(
    tree: Path,
    *args: str,
    check: bool = True,
    date: str | None = None,
    env_extra: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        GIT_COMMITTER_NAME=env.get("GIT_COMMITTER_NAME", "numa-llama build"),
        GIT_COMMITTER_EMAIL=env.get("GIT_COMMITTER_EMAIL", "build@numa-llama.invalid"),
        GIT_CONFIG_NOSYSTEM="1",
    )
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(key, None)
    if date:
        env.update(
            GIT_AUTHOR_DATE=date,
            GIT_COMMITTER_DATE=date,
            GIT_AUTHOR_NAME="upstream",
            GIT_AUTHOR_EMAIL="upstream@numa-llama.invalid",
        )
    env.update(env_extra or {})
    cfg = [a for c in _GIT_CONFIG for a in ("-c", c)]
    proc = subprocess.run(["git", *cfg, *args], cwd=tree, env=env, capture_output=True, text=True, input=stdin)
    if check and proc.returncode != 0:
        raise SeriesError(f"git {' '.join(args)} failed in {tree}:\n{proc.stdout}{proc.stderr}".rstrip())
    return proc


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass
class Series:
    """``patch_dir`` holds ``series`` and the ``NNNN-slug.patch`` files; ``tree`` is the vendor tree."""

    patch_dir: Path
    tree: Path
    display: str = ""
    log: object = field(default=print, repr=False)

    def __post_init__(self) -> None:
        self.display = self.display or str(self.tree)

    # -- the series file -------------------------------------------------

    @property
    def series_file(self) -> Path:
        return self.patch_dir / "series"

    def listed(self) -> list[str]:
        if not self.series_file.exists():
            return []
        names = []
        for line in self.series_file.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line.split()[0])
        return names

    def patches(self) -> list[Path]:
        return [self.patch_dir / n for n in self.listed()]

    def lint(self) -> list[str]:
        """Problems with the series file and the patch files (empty: fine)."""
        problems: list[str] = []
        if not self.series_file.exists():
            return [f"{self.series_file}: missing"]
        listed = self.listed()
        seen: set[str] = set()
        for name in listed:
            if name in seen:
                problems.append(f"{name}: listed twice in {self.series_file.name}")
            seen.add(name)
            path = self.patch_dir / name
            if not path.is_file():
                problems.append(f"{name}: listed in {self.series_file.name} but does not exist")
                continue
            problems += [f"{name}: {p}" for p in parse_problems(path)]
        for path in sorted(self.patch_dir.glob("*.patch")):
            if path.name not in seen:
                problems.append(f"{path.name}: not listed in {self.series_file.name}")
        return problems

    # -- the tree as a git repository -------------------------------------

    def _stamp_path(self) -> Path:
        return self.tree / ".git" / STAMP

    def init_tree(self, date: str = "2000-01-01T00:00:00Z") -> bool:
        """Turn the unpacked tree into a repository whose root commit, tagged
        ``upstream``, is the pin. Returns False if it already was one."""
        if (self.tree / ".git").exists():
            if git(self.tree, "rev-parse", "-q", "--verify", f"refs/tags/{BASE_TAG}", check=False).returncode == 0:
                return False
            raise SeriesError(
                f"{self.tree} is a git repository without the '{BASE_TAG}' tag: "
                "not made by build/; remove it and fetch again"
            )
        git(self.tree, "init", "-q", "-b", BRANCH)
        exclude = self.tree / ".git" / "info" / "exclude"
        exclude.parent.mkdir(parents=True, exist_ok=True)
        # The bindings' vendor/llama.cpp is a link to the sibling tree.
        exclude.write_text("/vendor/llama.cpp\n" if (self.tree / "vendor" / "llama.cpp").is_symlink() else "")
        git(self.tree, "add", "-A", "-f", ".")
        git(self.tree, "commit", "-q", "--no-verify", "-m", "upstream: the pinned tree, unmodified", date=date)
        git(self.tree, "tag", BASE_TAG)
        return True

    def _state(self) -> dict:
        try:
            return json.loads(self._stamp_path().read_text())
        except (OSError, ValueError):
            return {}

    def _head(self) -> str:
        return git(self.tree, "rev-parse", "HEAD").stdout.strip()

    def _am_in_progress(self) -> bool:
        return (self.tree / ".git" / "rebase-apply").exists()

    def _dirty(self) -> str:
        return git(self.tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()

    def dirty(self) -> bool:
        return bool(self._dirty())

    def commits(self) -> list[str]:
        """Subjects of the tree's commits over the pin, oldest first."""
        out = git(self.tree, "log", "--reverse", "--format=%s", f"{BASE_TAG}..HEAD").stdout
        return out.splitlines()

    def is_applied(self) -> bool:
        state = self._state()
        return (
            state.get("digest") == _digest(self.patches()) and state.get("head") == self._head() and not self._dirty()
        )

    # -- apply / export ----------------------------------------------------

    def apply(self, force: bool = False) -> bool:
        """``git am -3`` the series onto the pin. Returns False if it already was."""
        self.init_tree()
        if self._am_in_progress():
            raise SeriesError(self._recovery("a 'git am' is in progress in the tree"))
        problems = self.lint()
        if problems:
            raise SeriesError(f"{self.series_file}: the series is broken:\n  " + "\n  ".join(problems))
        if self.is_applied():
            self.log(f"{self.display}: series of {len(self.listed())} patch(es) already applied: nothing to do")
            return False
        state = self._state()
        head = self._head()
        base = git(self.tree, "rev-parse", BASE_TAG).stdout.strip()
        if not force:
            if self._dirty():
                raise SeriesError(
                    f"{self.display} has uncommitted changes; commit them and run export, "
                    "or discard them and apply with --force"
                )
            if head not in (base, state.get("head")):
                raise SeriesError(
                    f"{self.display} has commits that are not in the exported series; "
                    "run export to keep them, or apply with --force to drop them"
                )
        git(self.tree, "checkout", "-q", "-f", "-B", BRANCH, BASE_TAG)
        patches = self.patches()
        if patches:
            proc = git(self.tree, "am", "-3", "--keep-cr", *[str(p.resolve()) for p in patches], check=False)
            if proc.returncode != 0:
                current = self._current_patch()
                raise SeriesError(self._recovery(f"patch {current} does not apply", proc.stdout + proc.stderr))
        self._save_state()
        self.log(f"{self.display}: applied {len(patches)} patch(es) onto '{BASE_TAG}'")
        return True

    def _current_patch(self) -> str:
        nxt = self.tree / ".git" / "rebase-apply" / "next"
        try:
            return self.listed()[int(nxt.read_text()) - 1]
        except (OSError, ValueError, IndexError):
            return "(unknown)"

    def _recovery(self, what: str, output: str = "") -> str:
        tail = "\n".join("    " + line for line in output.strip().splitlines()[-8:])
        return (
            f"{self.display}: {what}.\n{tail}\n"
            "To recover, either resolve it:\n"
            f"  cd {self.display} && git am --show-current-patch=diff   # see what failed\n"
            "  (edit the conflicted files) && git add -u && git am --continue\n"
            "  python build/sync.py export                             # write the refreshed series\n"
            "or give up on this attempt:\n"
            f"  cd {self.display} && git am --abort"
        )

    def _save_state(self) -> None:
        state = {"digest": _digest(self.patches()), "head": self._head()}
        self._stamp_path().write_text(json.dumps(state) + "\n")

    def format_patches(self, tree: Path, out: Path) -> list[Path]:
        proc = git(tree, *FORMAT_PATCH, "-o", str(out), f"{BASE_TAG}..HEAD")
        return [Path(line) for line in proc.stdout.split()]

    def export(self) -> list[str]:
        """Write the tree's commits over ``upstream`` back as the series."""
        if self._am_in_progress():
            raise SeriesError(self._recovery("a 'git am' is in progress; finish it before exporting"))
        if self._dirty():
            raise SeriesError(f"{self.display} has uncommitted changes: commit them first (export writes commits)")
        with tempfile.TemporaryDirectory() as tmp:
            new = self.format_patches(self.tree, Path(tmp))
            header = [ln for ln in self._series_header()]
            for old in self.patch_dir.glob("*.patch"):
                old.unlink()
            self.patch_dir.mkdir(parents=True, exist_ok=True)
            for p in new:
                shutil.move(str(p), self.patch_dir / p.name)
        names = [p.name for p in new]
        self.series_file.write_text("".join(f"{ln}\n" for ln in header + names))
        self._save_state()
        self.log(f"{self.display}: exported {len(names)} patch(es) to {self.patch_dir}")
        return names

    def _series_header(self) -> list[str]:
        if not self.series_file.exists():
            return []
        lines = []
        for line in self.series_file.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                lines.append(line)
            else:
                break
        return lines

    # -- check -------------------------------------------------------------

    def check(self) -> list[str]:
        """Everything CI asks of a series; returns the problems (empty: pass)."""
        problems = self.lint()
        if problems:
            return problems
        self.init_tree()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "tree"
            git(self.tree, "worktree", "add", "-q", "--detach", str(work), BASE_TAG)
            try:
                for patch in self.patches():
                    # No -3 here: a patch must apply exactly, not by merging.
                    proc = git(work, "am", "--keep-cr", str(patch.resolve()), check=False)
                    if proc.returncode != 0:
                        git(work, "am", "--abort", check=False)
                        out = (proc.stdout + proc.stderr).strip().splitlines()
                        return [f"{patch.name}: does not apply cleanly to the pin: " + " / ".join(out[-3:])]
                out_dir = Path(tmp) / "export"
                fresh = {p.name: p.read_bytes() for p in self.format_patches(work, out_dir)}
            finally:
                git(self.tree, "worktree", "remove", "--force", str(work), check=False)
                git(self.tree, "worktree", "prune", check=False)
        committed = {p.name: p.read_bytes() for p in self.patches()}
        if list(fresh) != list(committed):
            problems.append(f"apply+export gives {list(fresh)}, but series lists {list(committed)}")
        for name, data in committed.items():
            if name in fresh and fresh[name] != data:
                problems.append(
                    f"{name}: apply+export does not reproduce it byte for byte "
                    "(applied with an offset, or not exported with build/sync.py export)"
                )
        return problems


def parse_problems(path: Path) -> list[str]:
    """Why ``path`` is not a git-format-patch mail carrying a diff (empty: it is)."""
    data = path.read_bytes()
    problems = []
    if not data.startswith(b"From "):
        problems.append("does not start with a 'From ' line (not git format-patch output)")
    head = data.split(b"\n\n", 1)[0]
    if b"\nSubject: " not in head:
        problems.append("has no Subject header")
    if b"\nFrom: " not in head and not head.startswith(b"From: "):
        problems.append("has no From (author) header")
    # Outside any repository: inside one, git apply ignores paths outside the current directory.
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run(["git", "apply", "--numstat", "-"], input=data, capture_output=True, cwd=scratch)
    if proc.returncode != 0:
        problems.append("diff does not parse: " + proc.stderr.decode(errors="replace").strip().splitlines()[0])
    elif not proc.stdout.strip():
        problems.append("carries no diff")
    return problems
