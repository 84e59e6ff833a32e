"""The front door and the docs: every link resolves, every `layerviz` command they show parses."""

import re
import shlex
from pathlib import Path

import pytest

from layerviz import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", m)]


def _commands(path: Path) -> list[list[str]]:
    """Each `layerviz ...` line of the shell blocks (continuations joined, comments and redirections cut)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0], comments=True)
            cut = next((i for i, w in enumerate(words) if w in ("|", "&&", ">", "2>&1", ";")), len(words))
            words = words[:cut]
            if words and Path(words[0]).name == "layerviz":
                out.append(words[1:])
    return out


def test_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for must in ("make demo", "make test", "configs/demo.yaml", "docs/method.md", "docs/results.md", "Limitations"):
        assert must in text


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(path):
    missing = [link for link in _links(path) if not (path.parent / link.split("#")[0]).exists()]
    assert missing == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_parses(path):
    commands = _commands(path)
    for argv in commands:
        try:
            cli.build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{path.name}: `layerviz {' '.join(argv)}` does not parse ({e})")
    if path == ROOT / "README.md":
        assert len(commands) >= 3


def test_a_bad_command_is_caught():
    """The check can fail: a flag no command has is refused."""
    with pytest.raises(SystemExit):
        cli.build_parser("evaluate").parse_args(["evaluate", "--no-such-flag"])
