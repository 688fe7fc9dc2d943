"""The documentation holds together: every relative link and anchor in README.md and docs/
resolves, every ``docs/<page>.md#<anchor>`` cited by the code exists, the README stays short,
and nothing refers to a design document outside the repository."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = [
    path
    for folder in ("src", "tests", "benchmarks", "configs")
    for path in sorted((ROOT / folder).rglob("*"))
    if path.suffix in {".py", ".cpp", ".h", ".toml"}
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"docs/([\w/-]+\.md)(?:#([\w-]+))?")
OUTSIDE_DOCUMENT = re.compile(r"D[E]SIGN\s*§")  # sections of a design file outside the repo


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` … for repeated headings); code blocks are skipped."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.+)", line)
        if heading and not fenced:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    text = re.sub(
        r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S
    )  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_anchor_rule_follows_github():
    page = ROOT / "docs" / "design.md"
    assert {"conventions", "gradients-at-the-kinks", "the-papers-networks"} <= anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_section_cited_by_the_code_exists():
    broken = []
    for path in CODE:
        for page, anchor in CITATION.findall(path.read_text()):
            file = ROOT / "docs" / page
            if not file.exists() or (anchor and anchor not in anchors(file)):
                broken.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor}")
    assert not broken, "citations of missing pages or sections: " + ", ".join(broken)


def test_no_reference_to_a_design_document_outside_the_repository():
    for path in [*PAGES, *CODE]:
        cited = OUTSIDE_DOCUMENT.search(path.read_text())
        assert not cited, f"{path.relative_to(ROOT)} cites {cited.group()}: use docs/design.md#…"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


GENERATED = re.compile(r"<!-- generated: (\S+) -->\n(.*?)<!-- end generated -->", re.S)


def test_embedded_tables_are_the_files_the_commands_wrote():
    """A block between ``<!-- generated: PATH -->`` and ``<!-- end generated -->`` is a copy of
    the file PATH (relative to the page) that a command wrote, e.g. a ``delrec compare`` table:
    regenerate the file, then copy it into the page."""
    blocks = [(page, *match) for page in PAGES for match in GENERATED.findall(page.read_text())]
    assert blocks, "docs/results.md embeds the generated tables"
    for page, path, block in blocks:
        source = page.parent / path
        assert source.is_file(), f"{page.relative_to(ROOT)} embeds {path}, which does not exist"
        assert block.strip() == source.read_text().strip(), (
            f"{page.relative_to(ROOT)}: the copy of {path} differs from the file; copy it again"
        )


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _given_names(tmp_path, monkeypatch) -> dict:
    """What the examples say the reader already has: ``x`` (T, B, 256) for the layer page,
    ``net`` (the SHD preset network), ``live_frames``, ``chunk``, ``x`` and ``loader`` for
    deployment, and an SHD folder (tiny files in the real layout) for the data page."""
    from delrec.data import heidelberg
    from delrec.models import build_network, preset_network

    rng = np.random.default_rng(0)
    shd = tmp_path / "data" / "shd"
    shd.mkdir(parents=True)
    for split in ("train", "test"):
        samples = [(np.sort(rng.uniform(0, 0.5, 20)), rng.integers(0, 700, 20)) for _ in range(6)]
        heidelberg.write_heidelberg(shd / f"shd_{split}.h5", samples, list(range(6)))
    monkeypatch.setenv("DELREC_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # where the examples write model.nir and out/
    torch.manual_seed(0)
    return {
        "README.md": {},
        "docs/layer.md": {"x": torch.randn(130, 2, 256)},
        "docs/data.md": {},
        "docs/deployment.md": {
            "net": build_network(preset_network("shd", "delrec"), seed=0),
            "live_frames": torch.rand(3, 140),
            "chunk": torch.rand(4, 1, 140),
            "x": torch.rand(6, 2, 140),
            "loader": [(torch.rand(6, 2, 140), torch.tensor([6, 4]), torch.tensor([1, 2]))],
        },
    }


EXAMPLE_PAGES = [p for p in PAGES if PYTHON_BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(page, tmp_path, monkeypatch):
    """Every ```python block of a page runs, in order, in one namespace (a later block may use
    an earlier one's names), given only the names its text says the reader has."""
    name = str(page.relative_to(ROOT))
    given = _given_names(tmp_path, monkeypatch)
    assert name in given, f"{name} has Python examples: say in _given_names what they assume"
    namespace = dict(given[name])
    for number, code in enumerate(PYTHON_BLOCK.findall(page.read_text())):
        exec(compile(code, f"{name} example {number + 1}", "exec"), namespace)


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_help_descriptions_drawn_from_docstrings_carry_no_markup(command, capsys):
    """`delrec sweep --help` showed ``models`` and :func:`…` as written in the docstring."""
    from delrec.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert "``" not in shown and ":func:" not in shown and ":class:" not in shown
    assert len(shown.splitlines()) > 10
