"""``python -m bench [--quick | --smoke] [--scenarios a,b,...] [--rounds N]``"""

from __future__ import annotations

from bench.runner import main

raise SystemExit(main())
