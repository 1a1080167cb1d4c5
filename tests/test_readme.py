"""The README's commands table and the documentation's links stay true.

* Every row of README.md's commands table whose first cell is a ``kedit ...`` command names
  real subcommands, and every option written in the row (``--out``, ``-n``) is one that
  subcommand's ``--help`` lists; the table lists every subcommand the CLI has.
* Every relative link in README.md and docs/*.md points to a file that exists, and a
  ``#fragment`` to a heading of that file (GitHub's anchors).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))

HELP_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1", "TERM": "dumb"}
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?![\w-])")


# --- the commands table ---------------------------------------------------------------------

def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; ``\\|`` inside a cell is a literal bar."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [p.strip().replace("\\|", "|") for p in parts[1:-1]]


def command_rows() -> list[tuple[list[str], str]]:
    """(subcommands, row text) for each table row whose first cell starts with `kedit `."""
    rows = []
    for line in README.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = split_row(line)
        if not cells or not cells[0].lstrip("`").startswith("kedit "):
            continue
        subs = re.findall(r"`kedit ([a-z][a-z-]*)", cells[0])
        rows.append((subs, " | ".join(cells)))
    return rows


def help_text(sub: str) -> str:
    from typer.testing import CliRunner

    from kedit.cli import app

    result = CliRunner().invoke(app, [sub, "--help"], env=HELP_ENV, terminal_width=200)
    assert result.exit_code == 0, f"kedit {sub} --help exited {result.exit_code}:\n{result.output}"
    return result.output


def help_options(text: str) -> set[str]:
    """The option names a help screen lists: the leading ``-x`` / ``--xx`` tokens of its lines
    (rich's boxed panels or click's plain layout; ``--flag/--no-flag`` counts as both)."""
    names: set[str] = set()
    for line in text.splitlines():
        tokens = line.replace("│", " ").replace("┃", " ").split()
        while tokens and tokens[0] == "*":          # rich marks required options with '*'
            tokens.pop(0)
        for tok in tokens:
            if not tok.startswith("-"):
                break
            for name in tok.rstrip(",").split("/"):
                if OPTION.fullmatch(name):
                    names.add(name)
    return names


ROWS = command_rows()


def test_the_commands_table_is_there():
    assert len(ROWS) >= 8, "README.md's commands table (rows starting with `kedit `) not found"
    assert all(subs for subs, _ in ROWS)


def test_the_table_lists_every_subcommand():
    import typer.main

    from kedit.cli import app

    cli = set(typer.main.get_command(app).commands)
    table = {s for subs, _ in ROWS for s in subs}
    assert table <= cli, f"README names subcommands the CLI lacks: {sorted(table - cli)}"
    assert cli <= table, f"README's commands table misses: {sorted(cli - table)}"


@pytest.mark.parametrize("subs,row", ROWS, ids=["/".join(s) for s, _ in ROWS])
def test_row_options_are_in_help(subs, row):
    listed: set[str] = set()
    for sub in subs:
        listed |= help_options(help_text(sub))
    assert "--help" in listed, f"could not read the option list of kedit {'/'.join(subs)} --help"
    written = set(OPTION.findall(row))
    missing = sorted(written - listed)
    assert not missing, f"README row for kedit {'/'.join(subs)} writes {missing}, which --help does not list"


# --- links ----------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced blocks and code spans (where '](' is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]       # http:, https:, mailto:


PAGES = [README, *DOCS]


def test_docs_pages_exist():
    names = {p.name for p in DOCS}
    for page in ("methods.md", "benchmarks.md", "results.md", "tracing.md", "runs.md", "api.md", "design.md"):
        assert page in names, f"docs/{page} is missing"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    assert all(p.resolve() in linked for p in DOCS), "README.md's Documentation list misses a docs/ page"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
