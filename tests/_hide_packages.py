"""Runs a script as if some installed packages were absent: ``python _hide_packages.py a,b script.py [args]``
(or ``... a,b -c CODE``).

Every finder on ``sys.meta_path`` answers "not found" for the hidden top-level names, so ``import`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` returns ``None``, as on a machine without them.
"""

from __future__ import annotations

import runpy
import sys


class _Hiding:
    def __init__(self, finder, hidden: set[str]) -> None:
        self.finder, self.hidden = finder, hidden

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, item):
        return getattr(self.finder, item)


def main() -> None:
    hidden = set(filter(None, sys.argv[1].split(",")))
    sys.meta_path[:] = [_Hiding(f, hidden) if hasattr(f, "find_spec") else f for f in sys.meta_path]
    if sys.argv[2] == "-c":
        code = sys.argv[3]
        sys.argv = ["-c", *sys.argv[4:]]
        exec(compile(code, "<code>", "exec"), {"__name__": "__main__"})
        return
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
