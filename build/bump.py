#!/usr/bin/env python3
"""Move the series to another llama-cpp-python release in one command.

    python build/bump.py --to 0.3.37            # try it: a scratch tree, nothing here changes
    python build/bump.py --to 0.3.37 --apply    # and, if every patch applies, make it the pin

1. fetch the release's sdist with pip (which checks the index's hash) and
   record its sha256;
2. unpack it into a scratch ``vendor/`` (``_build/bump/VERSION``) and
   ``git am -3`` both series onto it;
3. on a conflict, stop and print the exact recovery steps (in the scratch
   tree, where the conflict is);
4. on success, export the series from the scratch trees, run ``check`` on
   them, and print which patches changed (only their context and line
   numbers, or their content). With ``--apply``, the pin, ``vendor/`` and
   ``patches/`` then move to the new release.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync  # noqa: E402
from series import Series, SeriesError  # noqa: E402
from upstream import PIN_FILE, ROOT, FetchError, Pin, cache_dir, download, fetch, sha256_of  # noqa: E402


def release_pin(version: str, log=print) -> Pin:
    """The pin of another release: its sdist fetched by pip (hash-checked against the index), then hashed here."""
    name = f"llama_cpp_python-{version}.tar.gz"
    sdist = download(Pin(version, name, "", "", ""), cache_dir(), log=log, check=False)
    commit, date = llama_cpp_commit(sdist)
    return Pin(version, name, sha256_of(sdist), commit, date)


def llama_cpp_commit(sdist: Path) -> tuple[str, str]:
    """The llama.cpp commit the sdist's vendor/llama.cpp was cut from: the submodule's HEAD in the stray .git
    directory the sdist ships, where it has one ('unknown' where it has not; the date is not recorded there)."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".git/modules/vendor/llama.cpp/HEAD"):
                text = tar.extractfile(member).read().decode(errors="replace")  # type: ignore[union-attr]
                m = re.search(r"\b([0-9a-f]{40})\b", text)
                if m:
                    return m[1][:9], "unknown"
    return "unknown", "unknown"


def write_pin(pin: Pin, path: Path = PIN_FILE) -> None:
    text = path.read_text()
    for key, value in (
        ("version", pin.version),
        ("sdist", pin.sdist),
        ("sha256", pin.sha256),
        ("commit", pin.llama_cpp_commit),
        ("date", pin.llama_cpp_date),
    ):
        text = re.sub(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text, count=1)
    path.write_text(text)


def try_series(pin: Pin, scratch: Path, log=print) -> dict[str, list[str]]:
    """Unpack pin into scratch/vendor, apply every series, export to scratch/patches; {series: changed patches}."""
    vendor = scratch / "vendor"
    fetch(vendor, pin, log=log)
    changed: dict[str, list[str]] = {}
    for name in sync.NAMES:
        ours = ROOT / "patches" / name
        theirs = scratch / "patches" / name
        if theirs.exists():
            shutil.rmtree(theirs)
        shutil.copytree(ours, theirs)
        s = Series(theirs, vendor / name, display=str(vendor / name), log=log)
        s.apply(force=True)  # raises SeriesError with the recovery steps on a conflict
        s.export()
        problems = s.check()
        if problems:
            raise SeriesError(f"{name}: the moved series fails check:\n  " + "\n  ".join(problems))
        changed[name] = [
            p.name
            for p in s.patches()
            if not (ours / p.name).exists() or not filecmp.cmp(ours / p.name, p, shallow=False)
        ]
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="build/bump.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--to", required=True, metavar="VERSION", help="the llama-cpp-python release to move to")
    ap.add_argument("--apply", action="store_true", help="on success, make it the pin (pin.toml, vendor/, patches/)")
    ap.add_argument("--scratch", type=Path, help="where to try it (default: _build/bump/VERSION)")
    args = ap.parse_args(argv)
    current = Pin.load()
    scratch = args.scratch or ROOT / "_build" / "bump" / args.to
    try:
        pin = release_pin(args.to)
        print(
            f"llama-cpp-python {pin.version}: sdist sha256 {pin.sha256}, llama.cpp {pin.llama_cpp_commit} "
            f"(now pinned: {current.version}, llama.cpp {current.llama_cpp_commit})"
        )
        changed = try_series(pin, scratch)
    except (FetchError, SeriesError) as e:
        print(f"bump to {args.to}: {e}", file=sys.stderr)
        return 1
    for name, patches in changed.items():
        moved = len(list((scratch / "patches" / name).glob("*.patch")))
        print(
            f"{name}: all {moved} patch(es) apply to {pin.version}; "
            + (f"{len(patches)} changed in context or content: {', '.join(patches)}" if patches else "none changed")
        )
    if not args.apply:
        print(
            f"nothing here changed (the moved series is in {scratch / 'patches'}); --apply makes {pin.version} the pin"
        )
        return 0
    write_pin(pin)
    for name in sync.NAMES:
        shutil.rmtree(ROOT / "patches" / name)
        shutil.copytree(scratch / "patches" / name, ROOT / "patches" / name)
    fetch(sync.VENDOR, Pin.load())
    for s in sync.all_series():
        s.apply(force=True)
    sync.PROVENANCE.write_text(sync.provenance(Pin.load()))
    print(
        f"build/pin.toml, vendor/ and patches/ now follow llama-cpp-python {pin.version}; "
        "run python build/sync.py check and the tests, then commit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
