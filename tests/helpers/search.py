"""The search command as the tests run it: in this process, its JSON lines parsed."""
from __future__ import annotations

import json

from pipeline.inference.search import main as search_cli


def search(capsys, *args) -> list[dict]:
    """`python -m pipeline.search ARGS` (exit status 0 asserted); its output lines as JSON."""
    capsys.readouterr()  # what earlier commands printed
    assert search_cli(list(map(str, args))) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]
