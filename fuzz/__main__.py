"""``python -m fuzz TARGET [libFuzzer options] [corpus dirs]``: run one target under atheris.

TARGET is ``pgwire`` or ``analyze`` (see fuzz/targets.py). Everything after it goes to libFuzzer,
e.g. ``-max_total_time=600 -dict=fuzz/analyze.dict fuzz/work/analyze fuzz/corpus/analyze``.
``python -m fuzz TARGET FILE...`` without options replays the files (a crash reproduces).
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("pgwire", "analyze"):
        sys.exit("usage: python -m fuzz {pgwire,analyze} [libFuzzer options] [corpus dirs or files]")
    import atheris  # only here: the targets themselves run without it

    with atheris.instrument_imports(include=["dbguard", "fuzz"]):
        from fuzz import targets
    atheris.Setup([sys.argv[0], *sys.argv[2:]], targets.TARGETS[sys.argv[1]])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
