"""The prompts of the demo's synthetic world, read into what can be measured: colours, shapes, motion and a title.

The demo's videos live in a small synthetic world (``curation/samples.py``): a red circle (220, 30, 30) and a yellow
square (240, 220, 40) crossing a plain background of one of six palette colours, still cards of stripes in a
palette colour with a grey disc (128, 128, 128), and title cards of white letters on near-black (20, 20, 20). Its
captions are the prompt grammar this module reads::

    a red circle and a yellow square moving quickly across a plain orange background
    a still image of orange stripes and a grey disc, with no motion
    a still title card with the words "OPEN SORA 2024" written in large white letters on black

``parse_prompt`` turns a prompt into a :class:`PromptSpec` (named colours with their role, shapes, motion, a title);
words it does not know are ignored, and a prompt that names nothing measurable gives an empty spec, which
``models.scorers.adherence.score_video`` scores ``None`` with a reason.

Limits: speed words ("slowly", "quickly") are not read (the generator's speed is in pixels per frame at its own
resolution and frame rate); colour words outside ``COLOUR_PROTOTYPES`` are unknown words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# -- vocabulary ---------------------------------------------------------------------------------------------------

# Colour word -> RGB prototypes. The first ones of each word are what curation/samples.py draws: its PALETTE
# backgrounds (dark blue, orange, green, purple, cream, dark grey), the red circle, the yellow square, the grey disc,
# white letters on (20, 20, 20); the others are common renderings of the same word, so that a model's output that
# is plainly "red" but not exactly (220, 30, 30) still counts. Every pixel goes to its single nearest prototype, so
# each prototype also fences its neighbours in: "light grey" exists so that the cream card's stripes (178, 172, 160)
# are not taken for the grey disc they touch, "pink" and "brown" so that washed-out reds are not red.
COLOUR_PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((220, 30, 30), (255, 0, 0), (170, 20, 25)),
    "orange": ((200, 120, 30), (255, 140, 0), (240, 160, 60)),
    "yellow": ((240, 220, 40), (255, 255, 0), (230, 200, 80)),
    "green": ((30, 140, 70), (0, 128, 0), (60, 200, 60), (120, 200, 120)),
    "dark blue": ((22, 60, 140), (0, 0, 139), (25, 35, 90)),
    "blue": ((22, 60, 140), (0, 0, 139), (25, 35, 90), (0, 0, 255), (40, 100, 220), (70, 130, 200)),
    "light blue": ((135, 206, 250), (150, 190, 230)),
    "cyan": ((0, 200, 210), (0, 128, 128)),
    "purple": ((150, 30, 110), (128, 0, 128), (120, 60, 180)),
    "pink": ((255, 170, 190), (240, 110, 160)),
    "brown": ((130, 80, 40), (100, 60, 30)),
    "cream": ((230, 220, 200), (245, 235, 210)),
    "white": ((255, 255, 255), (240, 240, 240)),
    "black": ((0, 0, 0), (20, 20, 20)),
    "dark grey": ((40, 40, 40), (64, 64, 64)),
    "grey": ((128, 128, 128), (105, 105, 105)),
    "light grey": ((190, 190, 190),),
}
COLOUR_ALIASES = {
    "gray": "grey", "dark gray": "dark grey", "light gray": "light grey", "navy": "dark blue", "violet": "purple",
    "magenta": "purple", "beige": "cream", "teal": "cyan", "turquoise": "cyan",
}
# Shape word -> the shape scored. The generator draws circles, squares, a disc, stripes and letters; rectangle,
# ellipse and triangle cost nothing more to measure.
SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle", "disk": "circle",
    "ball": "circle", "dot": "circle", "square": "square", "squares": "square", "rectangle": "rectangle",
    "rectangles": "rectangle", "bar": "rectangle", "ellipse": "ellipse", "oval": "ellipse",
    "triangle": "triangle", "triangles": "triangle", "stripes": "stripes", "stripe": "stripes",
    "striped": "stripes", "letters": "letters", "letter": "letters", "text": "letters",
}
MEASURED_SHAPES = ("circle", "square", "rectangle", "ellipse", "triangle", "stripes")  # "letters": see title
DIFFUSE_SHAPES = ("stripes", "letters")  # many components: presence and tracking use the whole colour mask
BACKGROUND_WORDS = {"background", "backdrop", "backgrounds"}
SIZE_WORDS = {"small", "large", "big", "tiny", "little", "huge", "bright", "plain", "solid", "single", "pale", "vivid"}
MOVING_WORDS = {
    "moving", "moves", "move", "running", "runs", "flying", "flies", "sliding", "slides", "rolling", "rolls",
    "drifting", "drifts", "travelling", "traveling", "travels", "crossing", "crosses", "bouncing", "bounces",
    "rising", "rises", "falling", "falls", "sinking", "sinks",
}
IMPLIED_DIRECTION = {"rising": "up", "rises": "up", "falling": "down", "falls": "down", "sinking": "down",
                     "sinks": "down"}
STILL_WORDS = {"still", "static", "stationary", "motionless", "unmoving", "frozen", "immobile"}
NEGATIONS = {"no", "not", "without", "never"}
DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left", "right": "right", "rightward": "right",
    "rightwards": "right", "up": "up", "upward": "up", "upwards": "up", "down": "down", "downward": "down",
    "downwards": "down",
}
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


# -- the spec -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One thing the prompt names: a colour and/or a shape, with the motion the prompt gives it.

    role: "object" (a blob) or "background" (a colour covering most of the frame: never shape- or motion-scored).
    motion: "moving", "still" or None; direction: "left" / "right" / "up" / "down" or None.
    """

    colour: str | None = None
    shape: str | None = None
    role: str = "object"
    motion: str | None = None
    direction: str | None = None

    @property
    def label(self) -> str:
        words = [w for w in (self.colour, self.shape) if w]
        if self.role == "background":
            words.append("background")
        return " ".join(words) or "object"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for that can be measured. ``scene_motion``: motion words with no object to carry them."""

    text: str
    objects: tuple[ObjectSpec, ...] = ()
    title: str | None = None
    scene_motion: str | None = None
    scene_direction: str | None = None

    @property
    def colours(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.colour for o in self.objects if o.colour))

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.shape for o in self.objects if o.shape))

    @property
    def is_empty(self) -> bool:
        measurable = [o for o in self.objects if o.colour or o.shape in MEASURED_SHAPES or o.motion]
        return not measurable and self.title is None and self.scene_motion is None


_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|(?:(?<=\s)|^)\'([^\']+)\'(?=[\s.,;:!?]|$)')
_UPPER_RUN = re.compile(r"\b[A-Z0-9][A-Z0-9&'-]*(?:[ \t]+[A-Z0-9][A-Z0-9&'-]*)*\b")


def _titles(text: str) -> tuple[str | None, str]:
    """-> (the title, the text without it). Quoted text first; else a run of UPPERCASE words (one of them with at
    least two letters, so that a sentence's leading "A" is not a title), unless the whole prompt is uppercase."""
    match = _QUOTED.search(text)
    if match:
        title = next(g for g in match.groups() if g is not None).strip()
        return (title or None), text[: match.start()] + " " + text[match.end() :]
    if any(ch.islower() for ch in text):
        for run in _UPPER_RUN.finditer(text):
            if any(sum(ch.isalpha() for ch in word) >= 2 for word in run.group().split()):
                return run.group().strip(), text[: run.start()] + " " + text[run.end() :]
    return None, text


def _colour_at(tokens: list[str], i: int) -> tuple[str | None, int]:
    """The colour word starting at token i (two-word names first) and how many tokens it takes."""
    if i + 1 < len(tokens):
        pair = f"{tokens[i]} {tokens[i + 1]}"
        pair = COLOUR_ALIASES.get(pair, pair)
        if pair in COLOUR_PROTOTYPES:
            return pair, 2
    word = COLOUR_ALIASES.get(tokens[i], tokens[i])
    if word in COLOUR_PROTOTYPES:
        return word, 1
    return None, 0


def _direction_after(tokens: list[str], i: int) -> str | None:
    """A direction within the next few words: "right", "to the left", "from left to right" (-> right)."""
    window = tokens[i + 1 : i + 7]
    for k, word in enumerate(window):
        if word in DIRECTION_WORDS:
            if k > 0 and window[k - 1] == "from":  # "from left to right": the origin, not the direction
                continue
            return DIRECTION_WORDS[word]
        if word in {"and", "while", "but"} or word in MOVING_WORDS or word in STILL_WORDS:
            break
    return None


def _read_events(tokens: list[str]) -> tuple[list[dict[str, Any]], list[tuple[int, str, str | None]]]:
    """The objects and the motion phrases a prompt names, in prompt order, each at its token position."""
    objects: list[dict[str, Any]] = []
    motions: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(tokens):
        colour, used = _colour_at(tokens, i)
        if colour:
            j = i + used
            while j < len(tokens) and tokens[j] in SIZE_WORDS:
                j += 1
            nxt = tokens[j] if j < len(tokens) else None
            role, shape = "object", None
            if nxt in BACKGROUND_WORDS:
                role = "background"
            elif nxt in SHAPE_WORDS:
                shape = SHAPE_WORDS[nxt]
                j += 1
            elif nxt is None and i > 0 and tokens[i - 1] == "on":  # "... letters on black"
                role = "background"
            objects.append({"pos": i, "colour": colour, "shape": shape, "role": role})
            i = max(j, i + used)
            continue
        word = tokens[i]
        if word in SHAPE_WORDS and word != "text":
            objects.append({"pos": i, "colour": None, "shape": SHAPE_WORDS[word], "role": "object"})
        elif word in MOVING_WORDS:
            negated = i > 0 and tokens[i - 1] in NEGATIONS or i > 1 and tokens[i - 2] in NEGATIONS
            if negated:
                motions.append((i, "still", None))
            else:
                motions.append((i, "moving", _direction_after(tokens, i) or IMPLIED_DIRECTION.get(word)))
        elif word in STILL_WORDS:
            motions.append((i, "still", None))
        elif word == "motion" and i > 0 and tokens[i - 1] in NEGATIONS:  # "with no motion"
            motions.append((i, "still", None))
        i += 1
    return objects, motions


def _assign_motions(objects: list[dict[str, Any]], motions: list[tuple[int, str, str | None]]) -> bool:
    """Give each object (not background) its motion phrase, in place; -> whether there was any such object.

    A motion phrase belongs to the objects named since the previous one ("a red circle moving right and a blue
    square standing still": right for the circle, still for the square). A phrase before every object describes
    the whole scene ("a still image of orange stripes and a grey disc"); objects after the last phrase take it
    only then ("a red circle moving right and a blue square": the square's motion is not given).
    """
    movers = [o for o in objects if o["role"] == "object"]
    leading = [m for m in motions if movers and m[0] < min(o["pos"] for o in movers)]
    for obj in movers:
        after = [m for m in motions if m[0] > obj["pos"]]
        chosen = after[0] if after else (leading[-1] if leading else None)
        if chosen:
            obj["motion"], obj["direction"] = chosen[1], chosen[2]
    return bool(movers)


def parse_prompt(text: str) -> PromptSpec:
    """Read the colours, shapes, motion and title a prompt names (see the module docstring for the grammar)."""
    title, rest = _titles(text)
    tokens = re.findall(r"[a-z]+", rest.lower())
    objects, motions = _read_events(tokens)
    has_movers = _assign_motions(objects, motions)
    scene_motion = scene_direction = None
    if motions and not has_movers:  # motion words with no object to carry them
        scene_motion, scene_direction = motions[-1][1], motions[-1][2]
    return PromptSpec(
        text=text,
        objects=tuple(
            ObjectSpec(o["colour"], o["shape"], o["role"], o.get("motion"), o.get("direction")) for o in objects
        ),
        title=title,
        scene_motion=scene_motion,
        scene_direction=scene_direction,
    )


__all__ = ["COLOUR_PROTOTYPES", "ObjectSpec", "PromptSpec", "parse_prompt"]
