"""python -m phased_dmd_mp.config_docs --out docs/configuration.md: the configuration reference,
every key of every user config with its type, default and source comment
(`phased_dmd_mp.config.field_docs`), so the page cannot drift from the code.

Without --out the page goes to stdout. tests/test_docs.py checks that the committed page is what
this writes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from phased_dmd_mp.config import field_docs

COMMAND = "python -m phased_dmd_mp.config_docs --out docs/configuration.md"

HEADER = f"""# Configuration

Every key of the distillation runner and of the other jobs, with its type, default and meaning.
Put keys in a YAML file and pass it with `--config FILE`; override one key with `--set key=value`
(one `--set` per key; the value is read as YAML):

    # writes runs/digits/ (config.yaml: every key's value, defaults filled in; the run)
    python -m phased_dmd_mp.pretrain_distill --out runs/digits \\
        --config configs/digits_phased_dmd.yaml --set teacher=runs/quickstart/teacher \\
        --set iterations_per_phase=50 --set "t_range=[0.05, 0.95]"

Unknown keys (with the closest known one suggested), wrong types, bad ranges and inconsistent
step/phase counts stop the command with one line naming the key. YAML reads a bare `on`, `off`,
`yes` or `no` as a boolean: quote such words (`fp8: 'off'`, `--set fp8="'off'"`). The shipped
configs and what they reproduce: [recipes.md](recipes.md).

This page is generated from the comments of the dataclasses named below; after adding or
changing a key or its comment, rewrite it (`tests/test_docs.py` fails while it differs):

    {COMMAND}   # rewrites this page
"""

# (title, dataclass import path, source file, what reads it)
SECTIONS = [
    (
        "Distillation: `DistillConfig`",
        "phased_dmd_mp.distill.config:DistillConfig",
        "phased_dmd_mp/distill/config.py",
        "Read by `python -m phased_dmd_mp.pretrain_distill` and `python -m phased_dmd_mp.preflight`"
        " (`--config`, `--set`) and written to `RUN/config.yaml`.",
    ),
    (
        "teacher.yaml: `TeacherSpec`",
        "phased_dmd_mp.data.teacher:TeacherSpec",
        "phased_dmd_mp/data/teacher.py",
        "The teacher directory's `teacher.yaml`, written by `python -m phased_dmd_mp.prepare` and"
        " `python -m phased_dmd_mp.pretrain_teacher`, read by the runner and the sampler.",
    ),
    (
        "Evaluation: `EvalConfig`",
        "phased_dmd_mp.evaluate:EvalConfig",
        "phased_dmd_mp/evaluate.py",
        "Read by `python -m phased_dmd_mp.evaluate` (`--config`, `--set`);"
        " [evaluation.md](evaluation.md).",
    ),
    (
        "Embedded teachers: `TeacherConfig`",
        "phased_dmd_mp.pretrain_teacher:TeacherConfig",
        "phased_dmd_mp/pretrain_teacher.py",
        "Read by `python -m phased_dmd_mp.pretrain_teacher` (`--config`, `--set`);"
        " [reproduction.md](reproduction.md).",
    ),
    (
        "The toy: `ToyConfig`",
        "phased_dmd_mp.toy:ToyConfig",
        "phased_dmd_mp/toy.py",
        "Read by `python -m phased_dmd_mp.toy` (`--config`, `--set`);"
        " [reproduction.md](reproduction.md).",
    ),
]


def config_class(path: str) -> type:
    """The class named by "package.module:Name"."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(docs) -> list[str]:
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for doc in docs:
        default = "required" if doc.default is None else f"`{doc.default}`"
        rows.append(
            f"| `{doc.name}` | {_cell(doc.type)} | {default} | {_cell(doc.comment)} |"
        )
    return rows


def render() -> str:
    """The whole page, docs/configuration.md, as markdown."""
    from phased_dmd_mp.distill.config import RESUMABLE_KEYS

    lines = [HEADER]
    for title, path, source, readers in SECTIONS:
        cls = config_class(path)
        lines += [f"## {title}", "", f"`{source}`. {readers}", ""]
        if cls.__name__ == "DistillConfig":
            keys = ", ".join(f"`{key}`" for key in sorted(RESUMABLE_KEYS))
            lines += [
                f"A resumed run (`--resume`) may change only {keys}; any other change is refused,"
                " naming the key ([cluster.md](cluster.md#resume)).",
                "",
            ]
        docs = field_docs(cls)
        sections = list(dict.fromkeys(doc.section for doc in docs))
        for section in sections:
            if section:
                lines += [f"### {section[:1].upper() + section[1:]}", ""]
            lines += _table([doc for doc in docs if doc.section == section]) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phased_dmd_mp.config_docs",
        description="Write the configuration reference (docs/configuration.md) from the config "
        "dataclasses' comments.",
    )
    parser.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    page = render()
    if args.out is None:
        sys.stdout.write(page)
    else:
        args.out.write_text(page)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
