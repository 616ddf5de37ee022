"""``synthetic-shapes``: a tiny deterministic image–text task drawn with PIL.

Every image holds 1–3 copies of one shape kind in one colour, grouped in one region.
Captions name count, colour, kind and position; VQA asks for each attribute.  Image
``i`` of split ``s`` is a pure function of ``(seed, s, i)`` (``random.Random`` seeded
with a string is stable across processes and Python runs), so nothing is stored.

``synthetic-text`` (:func:`make_text_records`) is the text-only variant for text-only
models: the same scenes and VQA questions, with the scene's caption written into the
question ("two red circles on the left . how many shapes are there ?"), so every answer can
be read from the prompt.
"""
from __future__ import annotations

import random
from functools import partial

from PIL import Image, ImageDraw

from .records import DataError, Record

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200),
}
KINDS = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom")
CAPTION_TEMPLATES = (
    "{count} {color} {kinds} on the {pos}",
    "a picture of {count} {color} {kinds} on the {pos}",
    "there are {count} {color} {kinds} on the {pos} side",
)
QUESTIONS = {
    "color": "what color are the shapes ?",
    "kind": "what shape are they ?",
    "count": "how many shapes are there ?",
    "position": "where are the shapes ?",
}
DEFAULT_SIZES = {"train": 2000, "val": 200, "test": 200}


def vocabulary() -> list[str]:
    """Every word the captions, questions and answers use (for the word-level tokenizer)."""
    words: set[str] = set()
    for t in CAPTION_TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    for q in QUESTIONS.values():
        words.update(q.split())
    words.update(COLORS)
    words.update(KINDS)
    words.update(k + "s" for k in KINDS)
    words.update(COUNT_WORDS.values())
    words.update(str(c) for c in COUNT_WORDS)
    words.update(POSITIONS)
    # words a user prompt template is likely to use
    words.update(["question", "answer", ":", "?", ".", ",", "the", "a", "describe", "image", "shapes"])
    return sorted(words)


def _attributes(seed: int, split: str, i: int) -> dict:
    rng = random.Random(f"synthetic-shapes/{seed}/{split}/{i}")
    return {
        "color": rng.choice(sorted(COLORS)),
        "kind": rng.choice(KINDS),
        "count": rng.randint(1, 3),
        "position": rng.choice(POSITIONS),
        "layout_seed": rng.getrandbits(32),
    }


def render(attrs: dict, size: int = 32) -> Image.Image:
    """Draw the image for ``attrs`` (deterministic given ``attrs['layout_seed']``)."""
    rng = random.Random(attrs["layout_seed"])
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    half = size // 2
    region = {"left": (0, 0, half, size), "right": (half, 0, size, size),
              "top": (0, 0, size, half), "bottom": (0, half, size, size)}[attrs["position"]]
    x0, y0, x1, y1 = region
    r = max(2, size // 10)
    n = attrs["count"]
    # lay the shapes along the region's long side so they never overlap
    long_x = (x1 - x0) >= (y1 - y0)
    span = (x1 - x0) if long_x else (y1 - y0)
    cell = span / n
    color = COLORS[attrs["color"]]
    for k in range(n):
        jit = rng.uniform(-1, 1)
        if long_x:
            cx = x0 + cell * (k + 0.5) + jit
            cy = (y0 + y1) / 2 + rng.uniform(-(y1 - y0) / 4, (y1 - y0) / 4)
        else:
            cy = y0 + cell * (k + 0.5) + jit
            cx = (x0 + x1) / 2 + rng.uniform(-(x1 - x0) / 4, (x1 - x0) / 4)
        box = (cx - r, cy - r, cx + r, cy + r)
        if attrs["kind"] == "circle":
            d.ellipse(box, fill=color)
        elif attrs["kind"] == "square":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def captions(attrs: dict) -> list[str]:
    """The reference captions of one image (one per template)."""
    kind = attrs["kind"] + ("s" if attrs["count"] > 1 else "")
    return [t.format(count=COUNT_WORDS[attrs["count"]], color=attrs["color"], kinds=kind,
                     pos=attrs["position"]) for t in CAPTION_TEMPLATES]


def answers(attrs: dict) -> dict[str, str]:
    """The answer to each question type (counts as digits, as VQAv2 normalises them)."""
    return {"color": attrs["color"], "kind": attrs["kind"], "count": str(attrs["count"]),
            "position": attrs["position"]}


def make_records(task: str, split: str, n: int | None = None, seed: int = 0,
                 image_size: int = 32) -> list[Record]:
    """Records for ``split`` ("train" / "val" / "test"); VQA gives 4 questions per image."""
    if split not in DEFAULT_SIZES:
        raise ValueError(f"synthetic-shapes has splits {sorted(DEFAULT_SIZES)}, not {split!r}")
    n = DEFAULT_SIZES[split] if n is None else int(n)
    out: list[Record] = []
    src = f"synthetic-shapes(seed={seed})/{split}"
    for i in range(n):
        attrs = _attributes(seed, split, i)
        img = partial(render, attrs, image_size)
        iid = f"{split}-{i}"
        if task == "caption":
            out.append(Record(iid, img, "", captions(attrs), iid, src, {"attrs": attrs}))
        else:
            ans = answers(attrs)
            for qt, q in QUESTIONS.items():
                # VQAv2 has 10 human answers per question; synthetic humans agree
                out.append(Record(f"{iid}-{qt}", img, q, [ans[qt]] * 10, iid, src,
                                  {"attrs": attrs, "qtype": qt}))
    return out


def make_text_records(task: str, split: str, n: int | None = None, seed: int = 0) -> list[Record]:
    """Text-only VQA records (``image=None``): the question of :func:`make_records` preceded
    by one reference caption of the scene (template ``i mod 3``), same ids and answers."""
    if task != "vqa":
        raise DataError(f"data.format 'synthetic-text' is a VQA format (the caption is in the prompt), "
                        f"not {task!r}; set data.task=vqa")
    out = []
    for r in make_records("vqa", split, n, seed):
        i = int(r.image_id.rsplit("-", 1)[1])
        cap = captions(r.meta["attrs"])[i % len(CAPTION_TEMPLATES)]
        out.append(Record(r.id, None, f"{cap} . {r.question}", r.targets, r.image_id,
                          r.source.replace("synthetic-shapes", "synthetic-text"), r.meta))
    return out
