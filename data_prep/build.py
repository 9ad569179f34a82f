"""A dataset folder built in pieces that a re-run of the same command resumes: the shard writers here
and `python -m pipeline.features` build this way.

`_progress/plan.json` holds the build's fingerprint (what changes the output: the inputs and the
options); every finished piece leaves a small stats file in `_progress/`; the card is written last,
atomically, and `_progress/` removed, so a folder with a card is a complete dataset. A re-run with
the same fingerprint skips finished pieces; a folder holding another build, finished or not, is
refused rather than mixed in.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import card as cardlib
from .entries import InputError, log
from .fsutil import TMP_MARK, atomic_write_bytes, remove_tree

PROGRESS_DIR = "_progress"


class ResumableBuild:
    def __init__(self, out, fingerprint: str):
        self.out, self.fingerprint = Path(out), fingerprint
        self.progress = self.out / PROGRESS_DIR

    def finished(self) -> dict | None:
        """The card when the folder already holds this very build (nothing to do); refuses another one."""
        if not (self.out / cardlib.CARD_NAME).is_file():
            return None
        card = cardlib.read_card(self.out)
        if card.get("made_with", {}).get("fingerprint") != self.fingerprint:
            raise InputError(f"{self.out} already holds a dataset made from other inputs or options: "
                             "delete it or choose another --out")
        log.info("%s is already complete; nothing to do", self.out)
        return card

    def start(self) -> None:
        """Claim the folder for this build, or resume the partial build of the same inputs in it."""
        plan = self.progress / "plan.json"
        if plan.is_file():
            old = json.loads(plan.read_text()).get("fingerprint")
            if old != self.fingerprint:
                raise InputError(f"{self.out} holds a partial build from other inputs or options "
                                 f"(fingerprint {old}, now {self.fingerprint}): delete it or choose another --out")
            log.info("resuming the partial build in %s", self.out)
        elif self.out.exists() and any(self.out.iterdir()):
            raise InputError(f"{self.out} is not empty and holds no dataset build: choose another --out")
        self.progress.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plan, json.dumps({"fingerprint": self.fingerprint}).encode())
        for stale in [p for p in self.out.iterdir() if TMP_MARK in p.name]:  # what a killed run left
            stale.unlink()

    def _marker(self, piece: str) -> Path:
        return self.progress / f"{piece}.json"

    def is_done(self, piece: str) -> bool:
        return self._marker(piece).is_file()

    def mark_done(self, piece: str, stats: dict) -> None:
        atomic_write_bytes(self._marker(piece), json.dumps(stats).encode())

    def stats(self, piece: str) -> dict:
        return json.loads(self._marker(piece).read_text())

    def finish(self, card: dict) -> dict:
        cardlib.write_card(self.out, card)
        remove_tree(self.progress)
        return card

    def abandon(self) -> None:
        """Nothing worth resuming (every input was skipped): a fixed re-run starts afresh."""
        remove_tree(self.progress)
