"""The shell commands the docs tell a user to run, read from README.md and docs/*.md.

A command is a line of a ```bash, ```sh or ```shell block (continuation lines joined), with the
markers that apply to it: a comment line ``# needs: GPU, Hub`` (or ``# tested: <test file>``)
marks the commands after it up to the next blank line or marker line, and the same words in a
command's own trailing comment (``cmd   # QLoRA; needs: GPU``) mark that command alone.
``tests/package/test_doc_commands.py`` runs or checks every one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = ("bash", "sh", "shell")
MARKER = re.compile(r"\b(needs|tested):\s*([^;#]+)")
TRAILING_COMMENT = re.compile(r"\s+#\s.*$")


@dataclass
class DocCommand:
    """One command line of a doc.

    Args:
        path (`str`): The doc, relative to the repository root.
        line (`int`): The 1-based line where the command starts.
        text (`str`): The command, continuation lines joined, its trailing comment dropped.
        needs (`set[str]`): What it needs (``GPU``, ``Hub``, ``network``, ``minutes``, ``hours``).
        tested (`list[str]`): Test files that run it.
    """

    path: str
    line: int
    text: str
    needs: set[str] = field(default_factory=set)
    tested: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _markers(text: str) -> tuple[set[str], list[str]]:
    needs, tested = set(), []
    for kind, value in MARKER.findall(text):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if kind == "needs":
            needs.update(items)
        else:
            tested.extend(items)
    return needs, tested


def shell_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(line of the block's first line, its lines) of every shell block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if current is None and fence.startswith("```") and fence[3:].strip() in SHELL_LANGS:
            current, start = [], number + 1
        elif current is not None and fence.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def block_commands(path: Path) -> list[DocCommand]:
    """Every command of every shell block of ``path``, with its markers."""
    rel = str(path.relative_to(ROOT))
    commands = []
    for start, lines in shell_blocks(path):
        needs, tested = set(), []
        pending, first = "", 0
        for offset, raw in enumerate(lines):
            stripped = raw.strip()
            if not stripped:
                needs, tested = set(), []
                continue
            if stripped.startswith("#") and not pending:
                if MARKER.search(stripped):
                    needs, tested = _markers(stripped)
                continue
            if not pending:
                first = start + offset
            if stripped.endswith("\\"):
                pending += stripped[:-1].strip() + " "
                continue
            text = pending + stripped
            pending = ""
            comment = TRAILING_COMMENT.search(text)
            own_needs, own_tested = _markers(comment.group(0)) if comment else (set(), [])
            text = TRAILING_COMMENT.sub("", text).strip()
            commands.append(DocCommand(rel, first, text, needs | own_needs, tested + own_tested))
    return commands


def all_commands() -> list[DocCommand]:
    return [c for path in doc_files() for c in block_commands(path)]
