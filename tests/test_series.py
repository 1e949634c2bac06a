"""build/series.py on tiny synthetic trees and patches: apply, export, check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT
from series import Series, SeriesError, git, parse_problems

UPSTREAM = {
    "a.txt": "".join(f"line {i}\n" for i in range(1, 31)),
    "src/b.c": "int b(void) {\n    return 1;\n}\n",
}


def make_tree(where: Path) -> Path:
    for name, text in UPSTREAM.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    return where


def commit(tree: Path, path: str, text: str, subject: str) -> None:
    (tree / path).write_text(text)
    git(tree, "add", "-A")
    env_free = ["-c", "user.name=Dev", "-c", "user.email=dev@example.invalid"]
    subprocess.run(
        ["git", *env_free, "commit", "-q", "-m", subject, "-m", "Why: a test.\n\nForwarded: no"],
        cwd=tree,
        check=True,
        env={
            "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
            "PATH": "/usr/bin:/bin",
            "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
        },
    )


@pytest.fixture
def series(tmp_path: Path) -> Series:
    """A series of two patches, exported from commits over a synthetic upstream."""
    tree = make_tree(tmp_path / "tree")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("# test series\n")
    s = Series(patches, tree, log=lambda *_: None)
    s.apply()
    text = UPSTREAM["a.txt"].replace("line 10\n", "line 10 changed\n")
    commit(tree, "a.txt", text, "a : change line 10")
    commit(tree, "src/b.c", UPSTREAM["src/b.c"].replace("return 1", "return 2"), "b : return 2")
    assert s.export() == ["0001-a-change-line-10.patch", "0002-b-return-2.patch"]
    return s


def fresh_copy(s: Series, tmp_path: Path) -> Series:
    """The same patches against a freshly unpacked upstream, as CI sees them."""
    return Series(s.patch_dir, make_tree(tmp_path / "fresh"), log=lambda *_: None)


def test_export_is_deterministic_and_check_passes(series: Series, tmp_path: Path) -> None:
    """Exporting twice gives the same bytes, and the committed files pass check on a fresh tree."""
    before = {p.name: p.read_bytes() for p in series.patches()}
    series.export()
    assert {p.name: p.read_bytes() for p in series.patches()} == before
    text = before["0001-a-change-line-10.patch"].decode()
    assert text.startswith("From 0000000000000000000000000000000000000000 ")
    assert "Forwarded: no" in text and not text.rstrip().endswith("2.39.5")  # no signature
    assert fresh_copy(series, tmp_path).check() == []


def test_apply_onto_fresh_tree_reproduces_the_commits(series: Series, tmp_path: Path) -> None:
    fresh = fresh_copy(series, tmp_path)
    assert fresh.apply() is True
    assert "line 10 changed" in (fresh.tree / "a.txt").read_text()
    assert "return 2" in (fresh.tree / "src/b.c").read_text()
    assert fresh.apply() is False  # idempotent: nothing to do the second time


def test_check_fails_on_corrupt_patch(series: Series, tmp_path: Path) -> None:
    p = series.patches()[0]
    p.write_text(p.read_text().replace("@@ -7,7 +7,7 @@", "@@ -7,7 +7,9 @@"))
    problems = fresh_copy(series, tmp_path).check()
    assert problems and p.name in problems[0]


def test_check_fails_on_missing_patch(series: Series, tmp_path: Path) -> None:
    series.patches()[1].unlink()
    problems = fresh_copy(series, tmp_path).check()
    assert any("0002-b-return-2.patch" in p and "does not exist" in p for p in problems)


def test_check_fails_on_unlisted_patch(series: Series, tmp_path: Path) -> None:
    shutil.copy(series.patches()[0], series.patch_dir / "0003-extra.patch")
    problems = fresh_copy(series, tmp_path).check()
    assert any("0003-extra.patch" in p and "not listed" in p for p in problems)


def test_check_fails_on_duplicate_listing(series: Series, tmp_path: Path) -> None:
    with series.series_file.open("a") as f:
        f.write("0001-a-change-line-10.patch\n")
    problems = fresh_copy(series, tmp_path).check()
    assert any("listed twice" in p for p in problems)


def test_check_fails_on_fuzzy_patch(series: Series, tmp_path: Path) -> None:
    """A context line that no longer matches needs fuzz: check must refuse, not merge."""
    p = series.patches()[0]
    p.write_text(p.read_text().replace(" line 8\n", " line eight\n"))
    problems = fresh_copy(series, tmp_path).check()
    assert problems and "does not apply cleanly" in problems[0]


def test_check_fails_on_offset_patch(series: Series, tmp_path: Path) -> None:
    """A hunk that only applies at another line applies, but does not export back identically."""
    p = series.patches()[0]
    p.write_text(p.read_text().replace("@@ -7,7 +7,7 @@", "@@ -5,7 +5,7 @@"))
    problems = fresh_copy(series, tmp_path).check()
    assert problems and "byte for byte" in problems[0]


def test_failed_apply_prints_recovery(series: Series, tmp_path: Path) -> None:
    fresh = fresh_copy(series, tmp_path)
    (fresh.tree / "a.txt").write_text("something else entirely\n")  # upstream moved on
    with pytest.raises(SeriesError) as e:
        fresh.apply()
    msg = str(e.value)
    assert "0001-a-change-line-10.patch does not apply" in msg
    for step in ("git am --show-current-patch", "git am --continue", "build/sync.py export", "git am --abort"):
        assert step in msg
    with pytest.raises(SeriesError, match="in progress"):
        fresh.apply()


def test_apply_keeps_unexported_commits(series: Series) -> None:
    commit(series.tree, "a.txt", "local work\n", "local : not exported")
    with pytest.raises(SeriesError, match="not in the exported series"):
        series.apply()
    assert series.apply(force=True) is True
    assert "local work" not in (series.tree / "a.txt").read_text()


def test_parse_problems(tmp_path: Path) -> None:
    bogus = tmp_path / "x.patch"
    bogus.write_text("just some text\n")
    assert parse_problems(bogus)


def test_committed_series_pass_check() -> None:
    """What `python build/sync.py check` checks in CI, for both committed series against the real pin."""
    import sync

    for s in sync.all_series():
        s.log = lambda *_: None
        assert s.check() == [], s.display


def test_provenance_names_the_pin_and_every_patch_with_its_forwarded_state() -> None:
    import sync
    from upstream import Pin

    pin = Pin.load()
    text = sync.provenance(pin)
    assert pin.sha256 in text and pin.llama_cpp_commit in text
    for s in sync.all_series():
        for p in s.patches():
            subject, forwarded = sync.patch_header(p)
            assert f"`{p.name}`: {subject}. Forwarded: {forwarded}" in text
            assert forwarded != "(missing)", p.name  # every patch says where it was sent
    assert (ROOT / "patches" / "README.md").read_text() == text  # the committed file is current


def test_check_fails_when_the_provenance_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sync

    stale = tmp_path / "README.md"
    stale.write_text(sync.provenance(sync.Pin.load()).replace("Forwarded: no", "Forwarded: yes", 1))
    monkeypatch.setattr(sync, "PROVENANCE", stale)
    monkeypatch.setattr(sync, "ROOT", tmp_path)
    assert sync.main(["check", "--series", "llama-cpp-python"]) == 1
    assert "README.md is stale" in capsys.readouterr().err
