"""The prompt ensemble: normal and abnormal state sentences for an object description."""
from __future__ import annotations

from typing import List, Tuple

NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")

#: Used when the user gives no object description (object-agnostic prompting).
GENERIC_OBJECT = "object"


def state_prompts(description: str) -> Tuple[List[str], List[str]]:
    """(normal sentences, abnormal sentences): every state in every template, state-major."""

    def sentences(states):
        return [t.format(s.format(description)) for s in states for t in TEMPLATES]

    description = description.strip() or GENERIC_OBJECT
    return sentences(NORMAL_STATES), sentences(ABNORMAL_STATES)
