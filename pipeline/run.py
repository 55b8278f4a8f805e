#!/usr/bin/env python
"""Entry point: `python pipeline/run.py --help`.

`ray submit` copies this file alone to the head node, so it imports only the
installed `pipeline` package, never sibling files by path.
"""

import os
import sys

# `python pipeline/run.py` puts this file's folder first on sys.path, where
# `config.py` etc. would shadow real packages; drop it and import the package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
