"""The bundled world's language: compound goals <-> actions, canonical step prompts, success criteria.

Boundaries: text only. This module turns "move the red circle left, then make the blue square
green" into ``Action`` records (``scene``) and back, writes each step's canonical prompt (what the
tiny model is trained on) and its success criteria as structured predicates (what the critic checks),
and parses those predicates again. Whether an action can run in a given scene is ``scene.simulate``'s
business, not the parser's.

Grammar (case-insensitive; the canonical form of each clause is given first)::

    goal    := clause (SEP clause)*          SEP: ", then" | "then" | ", and then" | ";" | ". "
    clause  := "move the OBJ DIR"            DIR: left | right | up | down
             | "move the OBJ to the REGION"  REGION: top-left, top, top-right, left, center, right,
                                             bottom-left, bottom, bottom-right ("top left",
                                             "upper left corner", "middle", "centre", ... also read)
             | "make the OBJ COLOUR"         also "turn/paint/colour the OBJ COLOUR",
                                             "change (the colour of) the OBJ to COLOUR"
             | "make the OBJ bigger"         also "grow/enlarge the OBJ", "make the OBJ larger"
             | "make the OBJ smaller"        also "shrink the OBJ"
    OBJ     := [SIZE] COLOUR SHAPE           e.g. "red circle", "small blue square"

Note that "to the left" names the region (the middle of the left column), while "left" alone is a
move by the world's fixed distance.

Success criteria (one predicate per string; ``consistent(scene)`` closes every list)::

    moved(red circle, left)        at(red circle, top-right)       recoloured(blue square, green)
    resized(red circle, bigger)    resized(red circle, smaller)    consistent(scene)
"""

from __future__ import annotations

import difflib
import logging
import re

from ..agents.types import Step
from .scene import DIRECTIONS, PALETTE, REGIONS, SHAPES, SIZES, Action, ObjectRef, WorldConfig

logger = logging.getLogger(__name__)


class GoalParseError(ValueError):
    """A goal (or one of its clauses, or a success criterion) is not in the world's language."""

    def __init__(self, message: str, clause: str | None = None, clause_index: int | None = None):
        self.clause = clause
        """The offending clause text (None when the whole goal is at fault)."""
        self.clause_index = clause_index
        """0-based position of the offending clause."""
        super().__init__(message)


_VERB_PATTERN = r"(?:move|slide|shift|push|drag|bring|send|make|turn|paint|colour|color|recolour|recolor|change|grow|enlarge|expand|shrink|reduce)"
_SEPARATOR = re.compile(r"\s*(?:,?\s*and\s+then\b|\s+and\s+(?=" + _VERB_PATTERN + r"\b)|,\s*then\b|;|\.\s+|,\s*and\s+|\bthen\b|,\s*after\s+that\b|,\s*finally\b)\s*")
_LEADING_FILLER = {"first", "firstly", "then", "and", "finally", "next", "please", "now", "after", "that", "lastly"}
_BETWEEN_FILLER = {"the", "colour", "color", "of", "size"}
_MOVE_VERBS = {"move", "slide", "shift", "push", "drag", "bring", "send"}
_MAKE_VERBS = {"make", "turn", "paint", "colour", "color", "recolour", "recolor", "change"}
_GROW_VERBS = {"grow", "enlarge", "expand", "enlargen"}
_SHRINK_VERBS = {"shrink", "reduce"}
_BIGGER = {"bigger", "larger", "big", "large", "taller"}
_SMALLER = {"smaller", "tinier", "small", "little"}
_COLOUR_ALIASES = {"violet": "purple", "turquoise": "cyan", "aqua": "cyan"}
_REGION_WORDS = {"upper": "top", "lower": "bottom", "centre": "center", "middle": "center", "central": "center"}
_REGION_TRAILERS = {"corner", "side", "edge", "of", "the", "frame", "screen", "image", "area", "region", "part"}


def _colour_word(word: str) -> str | None:
    word = _COLOUR_ALIASES.get(word, word)
    return word if word in PALETTE else None


def _region_from_words(words: list[str]) -> str | None:
    """Read a region name from words such as ["upper", "left", "corner"] or ["top-right"]."""
    parts: list[str] = []
    for w in words:
        for piece in w.split("-"):
            if piece in _REGION_TRAILERS:
                continue
            piece = _REGION_WORDS.get(piece, piece)
            if piece not in ("top", "bottom", "left", "right", "center"):
                return None
            parts.append(piece)
    vertical = [p for p in parts if p in ("top", "bottom")]
    horizontal = [p for p in parts if p in ("left", "right")]
    if len(vertical) > 1 or len(horizontal) > 1 or not parts or len(parts) > 3:
        return None
    if vertical and horizontal:
        return f"{vertical[0]}-{horizontal[0]}"
    return vertical[0] if vertical else horizontal[0] if horizontal else "center"


def split_clauses(text: str) -> list[str]:
    """Split a compound goal into its clause strings (empty clauses dropped)."""
    if not isinstance(text, str):
        raise ValueError(f"split_clauses: argument 'text' must be a str, got {type(text).__name__}")
    body = text.strip().rstrip(".!").strip()
    return [c.strip(" ,.") for c in _SEPARATOR.split(body) if c and c.strip(" ,.")]


def parse_clause(clause: str) -> Action:
    """One clause -> Action; GoalParseError (a ValueError) saying what in the clause is not understood."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", clause.lower())
    while words and words[0] in _LEADING_FILLER:
        words = words[1:]

    def fail(why: str) -> GoalParseError:
        return GoalParseError(f"clause {clause!r} is not understood: {why}", clause=clause)

    if not words:
        raise fail("it is empty")
    verb = words[0]
    known_verbs = _MOVE_VERBS | _MAKE_VERBS | _GROW_VERBS | _SHRINK_VERBS
    if verb not in known_verbs:
        raise fail(f"unknown verb {verb!r} (use move, make, turn, change, grow or shrink)")
    shape_at = next((i for i, w in enumerate(words) if w.rstrip("s") in SHAPES or w in SHAPES), None)
    if shape_at is None:
        near = [m for w in words for m in difflib.get_close_matches(w, SHAPES, n=1, cutoff=0.7)]
        if near:
            raise fail(f"no object named: did you mean {near[0]!r}? (shapes: {', '.join(SHAPES)})")
        raise fail(f"no object named: expected '[size] <colour> <shape>' with a shape among {', '.join(SHAPES)}")
    shape = words[shape_at] if words[shape_at] in SHAPES else words[shape_at].rstrip("s")
    if shape_at < 2 or _colour_word(words[shape_at - 1]) is None:
        got = words[shape_at - 1] if shape_at >= 1 else ""
        raise fail(f"expected a colour before {shape!r} (one of {', '.join(PALETTE)}), got {got!r}")
    colour = _colour_word(words[shape_at - 1])
    size = None
    lead_end = shape_at - 1
    if lead_end >= 2 and words[lead_end - 1] in SIZES:
        size = words[lead_end - 1]
        lead_end -= 1
    between = words[1:lead_end]
    if any(w not in _BETWEEN_FILLER for w in between):
        raise fail(f"unexpected words {' '.join(between)!r} between the verb and the object")
    target = ObjectRef(colour=colour, shape=shape, size=size)
    rest = words[shape_at + 1:]

    if verb in _GROW_VERBS or verb in _SHRINK_VERBS:
        if rest:
            raise fail(f"unexpected words after the object: {' '.join(rest)!r}")
        return Action("grow" if verb in _GROW_VERBS else "shrink", target)
    if verb in _MOVE_VERBS:
        if len(rest) == 1 and rest[0] in DIRECTIONS:
            return Action("move", target, rest[0])
        if rest and rest[0] in ("to", "towards", "into", "in"):
            region = _region_from_words(rest[1:])
            if region is None:
                raise fail(f"unknown region {' '.join(rest[1:])!r} (regions: {', '.join(REGIONS)})")
            return Action("move_to", target, region)
        if not rest:
            raise fail("a move needs a direction (left, right, up, down) or 'to the <region>'")
        raise fail(f"unknown direction {' '.join(rest)!r} (directions: {', '.join(DIRECTIONS)}; "
                   f"or 'to the <region>' with regions {', '.join(REGIONS)})")
    # make / turn / paint / change
    if rest and rest[0] in ("to", "into"):
        rest = rest[1:]
    if len(rest) == 1 and _colour_word(rest[0]) is not None:
        return Action("recolour", target, _colour_word(rest[0]))
    if len(rest) == 1 and rest[0] in _BIGGER:
        return Action("grow", target)
    if len(rest) == 1 and rest[0] in _SMALLER:
        return Action("shrink", target)
    if not rest:
        raise fail(f"'{verb}' needs a new colour ({', '.join(PALETTE)}) or 'bigger'/'smaller'")
    raise fail(f"unknown colour or size change {' '.join(rest)!r} (colours: {', '.join(PALETTE)}; or bigger, smaller)")


def parse_goal(text: str) -> list[Action]:
    """A compound goal -> its actions, in order. GoalParseError names the first bad clause."""
    if not isinstance(text, str) or not text.strip():
        raise GoalParseError(f"parse_goal: argument 'text' must be a non-empty str, got {text!r}")
    clauses = split_clauses(text)
    if not clauses:
        raise GoalParseError(f"parse_goal: argument 'text' holds no clause: {text!r}")
    actions = []
    for k, clause in enumerate(clauses):
        try:
            actions.append(parse_clause(clause))
        except GoalParseError as err:
            raise GoalParseError(f"parse_goal: argument 'text', clause {k + 1} of {len(clauses)}: {err}",
                                 clause=clause, clause_index=k) from None
    return actions


def canonical_prompt(action: Action) -> str:
    """The step prompt in canonical form ("move the red circle to the top-right")."""
    obj = str(action.target)
    if action.kind == "move":
        return f"move the {obj} {action.arg}"
    if action.kind == "move_to":
        return f"move the {obj} to the {action.arg}"
    if action.kind == "recolour":
        return f"make the {obj} {action.arg}"
    return f"make the {obj} {'bigger' if action.kind == 'grow' else 'smaller'}"


def goal_text(actions: list[Action]) -> str:
    """Canonical compound goal text: the canonical prompts joined with ", then "."""
    if not actions:
        raise ValueError("goal_text: argument 'actions' must not be empty")
    return ", then ".join(canonical_prompt(a) for a in actions)


CONSISTENT = "consistent(scene)"
"""The criterion every step carries: no object appears or vanishes, untouched attributes persist."""

_PREDICATE = re.compile(r"^\s*(moved|at|recoloured|resized)\(\s*([a-z ]+?)\s*,\s*([a-z-]+)\s*\)\s*$")


def success_criteria(action: Action) -> list[str]:
    """Structured predicates the critic checks at the end of the step."""
    obj = str(action.target)
    if action.kind == "move":
        main = f"moved({obj}, {action.arg})"
    elif action.kind == "move_to":
        main = f"at({obj}, {action.arg})"
    elif action.kind == "recolour":
        main = f"recoloured({obj}, {action.arg})"
    else:
        main = f"resized({obj}, {'bigger' if action.kind == 'grow' else 'smaller'})"
    return [main, CONSISTENT]


def action_from_criteria(criteria: list[str]) -> Action:
    """The action whose ``success_criteria`` are ``criteria`` (the inverse of ``success_criteria``)."""
    mains = [c for c in criteria if c.strip() != CONSISTENT]
    if len(mains) != 1:
        raise GoalParseError(f"action_from_criteria: argument 'criteria' must hold exactly one action predicate "
                             f"besides {CONSISTENT}, got {criteria!r}")
    m = _PREDICATE.match(mains[0])
    if m is None:
        raise GoalParseError(f"action_from_criteria: argument 'criteria' has an unknown predicate {mains[0]!r}")
    kind, obj, arg = m.groups()
    words = obj.split()
    if len(words) not in (2, 3) or words[-1] not in SHAPES or words[-2] not in PALETTE or (len(words) == 3 and words[0] not in SIZES):
        raise GoalParseError(f"action_from_criteria: argument 'criteria' names an unknown object {obj!r}")
    target = ObjectRef(colour=words[-2], shape=words[-1], size=words[0] if len(words) == 3 else None)
    try:
        if kind == "moved":
            return Action("move", target, arg)
        if kind == "at":
            return Action("move_to", target, arg)
        if kind == "recoloured":
            return Action("recolour", target, arg)
        if arg not in ("bigger", "smaller"):
            raise ValueError(f"resized takes bigger or smaller, got {arg!r}")
        return Action("grow" if arg == "bigger" else "shrink", target)
    except ValueError as err:
        raise GoalParseError(f"action_from_criteria: argument 'criteria' predicate {mains[0]!r}: {err}") from None


def action_of_step(step: Step) -> Action:
    """The action a Step asks for: from its success criteria when present, else from its prompt."""
    if step.success_criteria:
        try:
            return action_from_criteria(step.success_criteria)
        except GoalParseError:
            logger.debug("step %d: criteria %r unreadable, parsing the prompt", step.index, step.success_criteria)
    actions = parse_goal(step.prompt)
    if len(actions) != 1:
        raise GoalParseError(f"action_of_step: argument 'step' prompt {step.prompt!r} holds {len(actions)} actions, expected one")
    return actions[0]


def make_step(action: Action, index: int, config: WorldConfig) -> Step:
    """The Step of ``action``: canonical prompt, span from ``config``, success criteria."""
    return Step(prompt=canonical_prompt(action), span_chunks=config.span_chunks[action.kind],
                success_criteria=success_criteria(action), index=index)


def goal_to_steps(text: str, config: WorldConfig, start_index: int = 0) -> list[Step]:
    """Parse a compound goal into Steps (canonical prompts, spans, criteria)."""
    return [make_step(a, start_index + k, config) for k, a in enumerate(parse_goal(text))]

