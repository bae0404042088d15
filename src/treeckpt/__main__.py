"""``python -m treeckpt``: the ``treeckpt`` command (see ``treeckpt --help``)."""

from treeckpt.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
