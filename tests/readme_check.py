"""Extract README.md's code and run its shell commands top to bottom, as a new user would.

``python tests/readme_check.py --demo DEMO_OUT --work DIR`` runs every ``moeclip`` command of
the README's bash blocks in one folder (``DIR``), in the README's order, after substituting what a
machine without pretrained weights or benchmarks cannot have: the demo's checkpoint for trained
checkpoints and ``runs/*``, the demo's synthetic data for benchmark folders, the tiny CLIP of the
demo for ``ViT-L``. Commands that need a cluster, a GPU, the network or a long training are listed
as skipped with the reason. A collision (a run refused because an earlier example wrote its
``--out``) fails the check. The fast parts (code extraction, the ``--out`` folders) are tests in
``tests/test_readme.py``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(lang: str, text: str | None = None) -> List[Tuple[str, str]]:
    """(section heading, block text) of every fenced block in ``lang``, in README order."""
    text = README.read_text() if text is None else text
    out, section = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.strip() == f"```{lang}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((section, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def shell_commands(block: str) -> List[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    cmds, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1].rstrip() + " "
            continue
        cur += line
        cmds.append(re.sub(r"\s+#.*$", "", cur).strip())  # trailing comment
        cur = ""
    return cmds


def out_folder(cmd: str) -> str | None:
    m = re.search(r"--out\s+(\S+)", cmd)
    return m.group(1).rstrip("/") if m else None


def readme_commands() -> List[Tuple[str, str]]:
    """(section, command) of every command of the README's bash blocks, in order."""
    return [(sec, c) for sec, block in code_blocks("bash") for c in shell_commands(block)]


def out_collisions(cmds: List[Tuple[str, str]]) -> Dict[str, List[str]]:
    """``--out`` folders used by more than one command that writes a new run there.

    A rerun of the same command with ``--resume`` (or ``reproduce``, which continues by design) is
    not a collision; neither is the same ``--out`` of commands that the README presents as
    alternatives for the same cluster (they never run on one machine).
    """
    seen: Dict[str, List[str]] = {}
    for _, cmd in cmds:
        folder = out_folder(cmd)
        if folder is None or "--resume" in cmd or "--dry-run" in cmd:
            continue
        if cmd.startswith("moeclip reproduce") and any(c == cmd for c in seen.get(folder, [])):
            continue  # "again: continues"
        seen.setdefault(folder, []).append(cmd)
    return {k: v for k, v in seen.items() if len(v) > 1}
