"""Write one `## ...` section of bench/RESULTS.md, keeping every other section as it is."""
from __future__ import annotations

import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(section: str, path: str = RESULTS) -> None:
    """Replace the section whose first line is `section`'s first line (e.g. '## Partial FC'), or append
    it; the file is re-read just before writing so sections written by other benchmarks stay."""
    title = section.splitlines()[0]
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = section.rstrip("\n") + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
