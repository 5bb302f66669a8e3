"""Every document the code, configs and READMEs point to exists in the repository (docstrings
used to cite a METHOD.md the repository did not have)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*ROOT.glob("phased_dmd_mp/**/*.py"), *ROOT.glob("configs/**/*.yaml"),
           *ROOT.glob("scripts/**/*"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("*.md"),
           *ROOT.glob("*/README.md"), *ROOT.glob("docs/*.md"), ROOT / "pyproject.toml"]  # fmt: skip
# A repository document: a path under docs/, benchmarks/ or results/, or an upper-case name
# such as README.md (lower-case bare names like results.md are files the CLIs write).
DOCUMENT = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|results)/[\w./-]+\.md|[A-Z][A-Z_]*\.md)\b")


def test_every_referenced_document_exists():
    missing = []
    for source in SOURCES:
        if not source.is_file():
            continue
        for name in DOCUMENT.findall(source.read_text(errors="replace")):
            if not ((ROOT / name).is_file() or (ROOT / "docs" / name).is_file()):
                missing.append(f"{source.relative_to(ROOT)}: {name}")
    assert missing == []


def test_the_method_notes_are_referenced_and_cover_the_equations():
    method = (ROOT / "docs" / "method.md").read_text()
    for topic in ("Eq. 4", "Eq. 11", "Eq. 12", "Eq. 13", "alpha_{t|s}", "sigma_{t|s}", "SGTS",
                  "reverse nested", "boundary", "guidance", "shift"):  # fmt: skip
        assert topic in method, topic
    assert "docs/method.md" in (ROOT / "phased_dmd_mp" / "losses.py").read_text()


def test_configuration_page_is_what_the_generator_writes():
    """docs/configuration.md is generated from the config dataclasses' comments; after changing
    a key or its comment, rerun the command at the top of the page."""
    from phased_dmd_mp.config_docs import COMMAND, render

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_every_config_key_has_a_comment():
    from phased_dmd_mp.config import field_docs
    from phased_dmd_mp.config_docs import SECTIONS, _load

    undocumented = [
        f"{path}: {doc.name}"
        for _, path, _, _ in SECTIONS
        for doc in field_docs(_load(path))
        if len(doc.comment) < 8
    ]
    assert undocumented == []
