"""Help that tells the truth (issue 23 item 4): every command's help fits 80 columns, every option
says what it does and which default it gets, and every `binarize ...` example in README.md, in
docs/ and in the help texts parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from binarize.cli import app, main

COMMANDS = typer.main.get_command(app).commands
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # README and the reference pages it links


def _help(name: str, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_fits_80_columns_and_every_option_says_its_default(name, monkeypatch, capsys):
    out = _help(name, monkeypatch, capsys)
    assert all(len(line) <= 80 for line in out.splitlines()) and "…" not in out and "<bool>" not in out, out
    for p in COMMANDS[name].params:
        if not isinstance(p, click.Option) or "--help" in p.opts:
            continue
        flag = p.opts[0]
        assert p.help and p.help.strip(), f"binarize {name} {flag}: no help text"
        assert flag in out, f"binarize {name} {flag}: not in the rendered help"
        if not (p.required or p.is_flag or p.default is not None):  # no default for click to show
            assert re.search(r"default|recipe|none|unless|only|otherwise", p.help, re.I), \
                f"binarize {name} {flag}: the help does not say what it is when not given"


def _examples(text: str) -> list[list[str]]:
    """`binarize ...` command lines in text (continuations joined, && chains split, comments dropped)."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        for part in line.split("&&"):
            part = part.split("  #")[0].strip().strip("`")
            if part.startswith("binarize ") and not part.startswith("binarize/"):
                found.append(shlex.split(part)[1:])
    return found


def _parses(argv: list[str]) -> None:
    name, args = argv[0], argv[1:]
    assert name in COMMANDS, f"unknown command in example: binarize {' '.join(argv)}"
    COMMANDS[name].make_context(name, [a for a in args if not a.startswith(("[", "<"))])


def test_every_readme_example_parses():
    blocks = [b for doc in DOCS for b in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S)]
    examples = [argv for block in blocks for argv in _examples(block)]
    assert len(examples) >= 10
    for argv in examples:
        _parses(argv)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_example_in_help_parses(name, monkeypatch, capsys):
    for argv in _examples(_help(name, monkeypatch, capsys)):
        _parses(argv)


def test_readme_links_resolve_and_its_main_command_is_short():
    """README is read in five minutes: its links point at files that exist, and the main job is
    one line of at most three options after the install steps (issue 43 item 4)."""
    readme = (ROOT / "README.md").read_text()
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if not target.startswith(("http:", "https:")):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
    main_job = re.findall(r"```bash\n(.*?)```", readme, re.S)[0].strip()
    converts = [c for c in main_job.split("&&") if c.strip().startswith("binarize convert")]
    assert len(converts) == 1 and "\n" not in main_job
    assert sum(1 for a in shlex.split(converts[0]) if a.startswith("--")) <= 3
