"""The documentation against the code: docs/REFERENCE.md's settings tables list exactly the
environment variables train_gpt.py reads, the README's code map names what train_gpt.py defines,
and every relative link of README.md and docs/REFERENCE.md reaches a file and heading."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import train_gpt
from conftest import REPO

README = REPO / "README.md"
REFERENCE = REPO / "docs" / "REFERENCE.md"
TORCHRUN_HEADING = "### Set by torchrun"  # its table: variables the script reads directly, not settings


def section(text: str, heading: str) -> str:
    """The text under `heading` (a whole line) up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    match = re.search(rf"^{re.escape(heading)}$(.*?)(?=^#{{1,{len(level)}}} |\Z)", text, re.M | re.S)
    assert match, f"{heading!r} is missing"
    return match.group(1)


def table_variables(text: str) -> list[str]:
    """The variables of markdown table rows whose first cell is one variable in backticks."""
    return re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|", text, re.M)


def documented() -> tuple[list[str], list[str]]:
    """(the settings tables' variables, the torchrun table's), in the order listed."""
    settings = section(REFERENCE.read_text(encoding="utf-8"), "## Settings")
    torchrun = section(settings, TORCHRUN_HEADING)
    return table_variables(settings.replace(torchrun, "")), table_variables(torchrun)


def read_directly() -> set[str]:
    """Variables train_gpt.py reads through os.environ itself, not through Hyperparameters._get."""
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    patterns = (r'os\.environ\.get\(\s*"([A-Z][A-Z0-9_]*)"', r'os\.environ\[\s*"([A-Z][A-Z0-9_]*)"\s*\]',
                r'"([A-Z][A-Z0-9_]*)"\s+(?:not\s+)?in\s+os\.environ', r'os\.getenv\(\s*"([A-Z][A-Z0-9_]*)"')
    return {name for pattern in patterns for name in re.findall(pattern, source)}


def differences(listed: set[str], read: set[str]) -> str:
    return (f"read by train_gpt.py but not in {REFERENCE.relative_to(REPO)}: {sorted(read - listed) or 'none'}; "
            f"listed there but not read: {sorted(listed - read) or 'none'}")


def test_the_settings_tables_list_every_setting_the_script_reads_and_no_other():
    settings, _ = documented()
    twice = sorted({name for name in settings if settings.count(name) > 1})
    assert not twice, f"listed more than once in the settings tables: {twice}"
    assert set(settings) == train_gpt.known_settings(), differences(set(settings), train_gpt.known_settings())


def test_variables_read_outside_hyperparameters_are_in_the_torchrun_table():
    _, torchrun = documented()
    direct = read_directly() - train_gpt.known_settings()
    assert {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= direct  # the search above still finds them
    assert set(torchrun) == direct, f"(the {TORCHRUN_HEADING!r} table) " + differences(set(torchrun), direct)


def code_map_names() -> list[str]:
    """The names in the second column of the code map's table of sections (before its first
    subsection): `Class` (`method`, ...) gives Class.method."""
    table = section(README.read_text(encoding="utf-8"), "## Code map").split("\n### ")[0]
    rows = re.findall(r"^\|[^|\n]*\|([^|\n]*)\|", table, re.M)
    names = []
    for cell in rows:
        owner, depth = None, 0
        for token in re.findall(r"`([^`]+)`|(\()|(\))", cell):
            name, opening, closing = token
            depth += bool(opening) - bool(closing)
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                continue
            if depth == 0:
                owner = name
                names.append(name)
            else:
                names.append(f"{owner}.{name}")
    return names


def defined(name: str) -> bool:
    owner, _, attr = name.partition(".")
    return hasattr(train_gpt, owner) and (not attr or hasattr(getattr(train_gpt, owner), attr))


def test_the_code_map_names_what_train_gpt_defines():
    names = code_map_names()
    assert len(names) > 40 and "Hyperparameters._run" in names  # the table was found and read
    missing = sorted({name for name in names if not defined(name)})
    assert not missing, f"the README's code map names what train_gpt.py does not define: {missing}"


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (outside code blocks)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(path.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


@pytest.mark.parametrize("doc", [README, REFERENCE], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
    text = without_code_blocks(doc.read_text(encoding="utf-8"))
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert links and not broken, f"broken links in {doc.name}: {broken}"
