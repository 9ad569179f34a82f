"""Captions for a shapes scene: five different sentences that each describe every object.

Variety comes from synonyms (big/large, small/little/tiny, top/upper, ...),
several sentence templates and a shuffled object order, so a model must read
the words rather than memorise one template. Shape and colour words are always
the canonical names (labels are derived from the shape names).
"""
from __future__ import annotations

import random

SIZE_WORDS = {"big": ["big", "large"], "small": ["small", "little", "tiny"]}
ROW_WORDS = [["top", "upper"], ["middle", "center"], ["bottom", "lower"]]
COL_WORDS = ["left", "middle", "right"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]


def position_phrase(cell: tuple[int, int], rng: random.Random) -> str:
    row, col = cell
    if (row, col) == (1, 1):
        return rng.choice(["in the middle", "in the center", "in the centre", "at the center"])
    if row == 1:  # middle row, left or right edge
        side = COL_WORDS[col]
        return rng.choice([f"on the {side}", f"at the {side}", f"in the middle {side}", f"on the {side} side"])
    vert = rng.choice(ROW_WORDS[row])
    if col == 1:  # top or bottom edge, centred
        edge = ROW_WORDS[row][0]  # "at the upper" reads wrong: only "top"/"bottom" here
        return rng.choice([f"at the {edge}", f"in the {vert} middle", f"at the {vert} center"])
    corner = f"{vert} {COL_WORDS[col]}"
    return rng.choice([f"in the {corner}", f"at the {corner}", f"in the {corner} corner"])


def _thing(obj: dict, rng: random.Random) -> str:
    return f"a {rng.choice(SIZE_WORDS[obj['size']])} {obj['colour']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _objects_first(objs, rng):   # "a big red circle in the top left"
    return [f"{_thing(o, rng)} {position_phrase(o['cell'], rng)}" for o in objs]


def _place_first(objs, rng):     # "in the top left a big red circle"
    return [f"{position_phrase(o['cell'], rng)} {_thing(o, rng)}" for o in objs]


def _caption(objs: list[dict], rng: random.Random) -> str:
    objs = rng.sample(objs, len(objs))  # shuffled order
    n = len(objs)
    shapes_word = "shape" if n == 1 else "shapes"
    template = rng.randrange(7)
    if template == 0:
        return _join(_objects_first(objs, rng))
    if template == 1:
        return "there is " + _join(_objects_first(objs, rng))
    if template == 2:
        return rng.choice(["an image with ", "a picture of ", "a drawing of "]) + _join(_objects_first(objs, rng))
    if template == 3:
        return _join(_place_first(objs, rng))
    if template == 4:
        return f"{NUMBER_WORDS[n]} {shapes_word}: " + _join(_objects_first(objs, rng))
    if template == 5:
        return _join(_objects_first(objs, rng)) + " on a light background"
    return "; ".join(f"{p} there is {t}" for p, t in
                     ((position_phrase(o["cell"], rng), _thing(o, rng)) for o in objs))


def captions_for(objs: list[dict], rng: random.Random, count: int = 5) -> list[str]:
    """`count` distinct captions (in generation order, so deterministic given `rng`)."""
    out: list[str] = []
    for _ in range(200 * count):
        text = _caption(objs, rng)
        if text not in out:
            out.append(text)
            if len(out) == count:
                return out
    raise RuntimeError(f"could not make {count} distinct captions for {objs}")
