"""Every document the code, configs and READMEs point to exists in the repository (docstrings
used to cite a METHOD.md the repository did not have)."""

import re
from pathlib import Path

import doc_drift
import pytest

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
    from phased_dmd_mp.config_docs import SECTIONS, config_class

    undocumented = [
        f"{path}: {doc.name}"
        for _, path, _, _ in SECTIONS
        for doc in field_docs(config_class(path))
        if len(doc.comment) < 8
    ]
    assert undocumented == []


@pytest.fixture(scope="module")
def drift_context():
    """The pages, the --help of every module they (and the planted drift below) show, and the
    repository's code: each gathered once."""
    pages = doc_drift.doc_pages()
    commands = [command for text in pages.values() for command in doc_drift.shown_commands(text)]
    helps = doc_drift.help_texts(doc_drift.help_keys(commands) | {"pretrain_distill", "sample"})
    return pages, helps, doc_drift.code_corpus()


def test_docs_do_not_drift_from_the_code(drift_context):
    """Every command, flag, config key, code name, path and link shown in README.md and docs/
    exists (tests/doc_drift.py has the rules)."""
    pages, helps, corpus = drift_context
    assert doc_drift.all_problems(pages, helps, corpus) == []


PLANTED = """
    python -m phased_dmd_mp.no_such_module --out X
    python -m phased_dmd_mp.sample --checkpoint RUN --no-such-flag 3
    torchrun --nproc_per_node=2 -m phased_dmd_mp.pretrain_distill --out R \\
        --set no_such_key=1
    sbatch scripts/slurm/distill.sbatch configs/digits_phased_dmd.yaml RUN not_a_key=2

Prose with `--set phase_t_rangez=[[0, 1]]`, `fake_update: 5`, `removed_function_name`,
`configs/no_such_recipe.yaml`, `distill/no_such_module.py`, [a link](no-such-page.md) and
[an anchor](recipes.md#no-such-heading); `--set key=value`, `phase_order: alternating`,
`phase_t_ranges` and `configs/digits_phased_dmd.yaml` are fine.
"""


def test_a_planted_drift_is_found(drift_context):
    _, helps, corpus = drift_context
    problems = "\n".join(doc_drift.all_problems({"docs/planted.md": PLANTED}, helps, corpus))
    for expected in (
        "phased_dmd_mp.no_such_module`: no such module",
        "`sample` does not accept --no-such-flag (not in --help)",
        "`pretrain_distill --set no_such_key=`: no such config key",
        "not_a_key=2`: no pretrain_distill config key 'not_a_key'",
        "--set phase_t_rangez=: no config has this key",
        "no config has the key 'fake_update'",
        "`removed_function_name` occurs nowhere in the code",
        "configs/no_such_recipe.yaml does not exist",
        "distill/no_such_module.py (in phased_dmd_mp/) does not exist",
        "link no-such-page.md: no-such-page.md does not exist",
        "link recipes.md#no-such-heading: no heading with that anchor",
    ):
        assert expected in problems, expected
    assert len(problems.splitlines()) == 11, problems  # and nothing that is fine
