#!/usr/bin/env python3
"""Keep the patch series and the pinned upstream in step (cf. ollama's Makefile.sync).

    python build/sync.py fetch        # download + verify the pinned sdist into vendor/
    python build/sync.py apply        # vendor trees -> git repos at the pin, git am -3 the series
    python build/sync.py export       # commits in vendor trees -> patches/*/ (deterministic)
    python build/sync.py check        # CI: lint, zero-fuzz apply, apply+export == committed
    python build/sync.py print-base   # the pin
    python build/sync.py clean        # remove vendor/

Edit a patch: ``apply``, then commit (or ``git commit --amend`` / ``git rebase -i
upstream``) inside ``vendor/llama.cpp``, then ``export``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from series import Series, SeriesError  # noqa: E402
from upstream import ROOT, FetchError, Pin, fetch  # noqa: E402, F401 (fetch: setup.py)

VENDOR = ROOT / "vendor"
NAMES = ("llama.cpp", "llama-cpp-python")


def all_series(names: tuple[str, ...] = NAMES) -> list[Series]:
    return [Series(ROOT / "patches" / n, VENDOR / n, display=f"vendor/{n}") for n in names]


def prepare(force: bool = False, log=print) -> list[Series]:
    """fetch + apply: what setup.py needs before it builds."""
    pin = Pin.load()
    fetch(VENDOR, pin, log=log)
    series = all_series()
    for s in series:
        s.log = log
        s.apply(force=force)
    return series


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build/sync.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["fetch", "apply", "export", "refresh", "check", "print-base", "clean"])
    ap.add_argument("--series", choices=NAMES, action="append", help="limit to this series (repeatable)")
    ap.add_argument("--force", action="store_true", help="apply: discard local commits/changes in vendor trees")
    args = ap.parse_args(argv)
    names = tuple(args.series or NAMES)
    pin = Pin.load()
    try:
        if args.command == "print-base":
            print(f"llama-cpp-python {pin.version}  sha256 {pin.sha256}")
            print(f"llama.cpp        {pin.llama_cpp_commit} ({pin.llama_cpp_date})")
            return 0
        if args.command == "clean":
            shutil.rmtree(VENDOR, ignore_errors=True)
            print("removed vendor/")
            return 0
        fetch(VENDOR, pin)
        if args.command == "fetch":
            return 0
        failed = False
        for s in all_series(names):
            if args.command == "apply":
                s.apply(force=args.force)
            elif args.command in ("export", "refresh"):
                s.export()
            elif args.command == "check":
                problems = s.check()
                for p in problems:
                    print(f"FAIL {s.display}: {p}", file=sys.stderr)
                if not problems:
                    n = len(s.listed())
                    print(f"ok   {s.display}: {n} patch(es) apply with zero fuzz and export byte-identical")
                failed |= bool(problems)
        return 1 if failed else 0
    except (FetchError, SeriesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
