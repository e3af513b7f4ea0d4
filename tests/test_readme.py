"""README.md stays true: its layout block lists exactly the modules in geoclip/; every geoclip name it cites exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PACKAGE = REPO / "geoclip"


def layout_block(text: str) -> str:
    """The first fenced code block after the ``## Layout`` heading."""
    found = re.search(r"^## Layout\b.*?^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert found, "README.md: no '## Layout' section with a fenced code block"
    return found.group(1)


def named_modules(text: str) -> set[str]:
    """Modules the layout block lists under its ``geoclip/`` line: each indented line's first word ending in .py."""
    names, inside = set(), False
    for line in layout_block(text).splitlines():
        if line and not line[0].isspace():  # a top-level folder: geoclip/, flows/, tests/, ...
            inside = line.startswith("geoclip/")
        elif inside and line.split() and line.split()[0].endswith(".py"):
            names.add(line.split()[0])
    return names


def modules_on_disk() -> set[str]:
    """Every module under geoclip/ except __init__.py, as a path relative to geoclip/."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def layout_problems(text: str, on_disk: set[str]) -> list[str]:
    """One line per module that is on disk but not in the layout block, or in the block but not on disk."""
    named = named_modules(text)
    return ([f"geoclip/{m} exists but README.md's layout block does not list it" for m in sorted(on_disk - named)]
            + [f"README.md's layout block lists geoclip/{m}, which does not exist" for m in sorted(named - on_disk)])


def resolve(dotted: str) -> object:
    """Import the longest importable prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not dotted.startswith(exc.name):
                raise  # a real module failed to import: let the error say why
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_layout_lists_exactly_the_modules_on_disk():
    problems = layout_problems(README.read_text(), modules_on_disk())
    assert not problems, "\n".join(problems)


def test_layout_check_names_a_missing_and_an_extra_module():
    text = README.read_text()
    renamed = text.replace("\n  data/ingest.py ", "\n  data/ingest_old.py ", 1)
    assert renamed != text, "README.md's layout block has no '  data/ingest.py' line to rename"
    assert layout_problems(renamed, named_modules(text)) == [
        "geoclip/data/ingest.py exists but README.md's layout block does not list it",
        "README.md's layout block lists geoclip/data/ingest_old.py, which does not exist"]


def test_every_geoclip_name_in_the_readme_exists():
    text = README.read_text()
    dotted = sorted(set(re.findall(r"\bgeoclip(?:\.[A-Za-z_]\w*)+", text)))
    missing = []
    for name in dotted:
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    paths = sorted(set(re.findall(r"\bgeoclip/[\w/]+\.py\b", text)))
    missing += [f"{p}: no such file" for p in paths if not (REPO / p).is_file()]
    assert dotted and not missing, "README.md names what does not exist:\n" + "\n".join(missing)
