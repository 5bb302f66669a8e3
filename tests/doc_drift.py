"""What README.md and docs/*.md show must exist in the code (tests/test_docs.py runs these).

The rules, each a function returning one line per problem:
- commands: every `python -m phased_dmd_mp.X` / `torchrun ... -m phased_dmd_mp.X` shown (in a
  code block, or in inline code) names a module that exists, and every `--flag` after it appears
  in that module's `--help` (of its subcommand, for `models.convert to-ours`);
- config keys: every `--set KEY=` names a key of the command's config (DistillConfig for
  pretrain_distill and preflight, ...; outside a command, of any user config), and so do the
  KEY=VALUE arguments of scripts/slurm/*.sbatch and every inline `key: value` (YAML) snippet;
- names: every inline-code snake_case name (`phase_t_ranges`, `check_layout`) occurs in the
  repository's code, so a renamed key or function cannot linger in the docs;
- paths: every repository path named (phased_dmd_mp/..., configs/..., tests/..., and paths
  inside the package such as distill/validate.py) exists, globs match, and every relative link
  resolves, with its #anchor among the target's headings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

from phased_dmd_mp.config_docs import config_class

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "phased_dmd_mp"
# Which config dataclass a CLI's --set keys belong to (module path: import path).
CONFIGS = {
    "pretrain_distill": "phased_dmd_mp.distill.config:DistillConfig",
    "preflight": "phased_dmd_mp.distill.config:DistillConfig",
    "evaluate": "phased_dmd_mp.evaluate:EvalConfig",
    "pretrain_teacher": "phased_dmd_mp.pretrain_teacher:TeacherConfig",
    "toy": "phased_dmd_mp.toy:ToyConfig",
}
SBATCH_CONFIGS = {"distill.sbatch": "pretrain_distill", "teacher.sbatch": "pretrain_teacher"}
TEACHER_SPEC = "phased_dmd_mp.data.teacher:TeacherSpec"  # teacher.yaml's keys
REPOSITORY_ROOTS = ("phased_dmd_mp", "configs", "scripts", "tests", "benchmarks", "results",
                    "docs", "csrc")  # fmt: skip
CODE_SUFFIXES = (".py", ".yaml", ".sh", ".sbatch", ".cpp", ".cu", ".h", ".cuh", ".txt", ".toml")

COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:python|torchrun|sbatch)\b")
MODULE = re.compile(rf"-m\s+({PACKAGE}(?:\.\w+)+)")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
YAML_SNIPPET = re.compile(r"^([a-z][a-z0-9_]*): (?:[^\s\[]+|\[.*\])$")  # one value or a list
PLACEHOLDER_KEYS = {"key", "KEY"}  # --set key=value
SNAKE_NAME = re.compile(r"^[a-z][a-z0-9]+(?:_[a-z0-9]+)+$")
PATH = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(REPOSITORY_ROOTS)})/[\w./*{{}}-]*[\w*/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)


def keys(path: str) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class(path))}


def doc_pages() -> dict[str, str]:
    """README.md and docs/*.md by path relative to the repository."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {str(page.relative_to(ROOT)): page.read_text() for page in pages}


def strip_fences(text: str) -> str:
    """The text without fenced blocks of another language than shell (Python snippets)."""
    return re.sub(r"```(?:python|py)\n.*?```", "", text, flags=re.S)


def shown_commands(text: str) -> list[str]:
    """Each command line shown: indented code lines that start with python, torchrun or sbatch
    (backslash continuations joined), and inline code spans naming a phased_dmd_mp module."""
    text = strip_fences(text)
    commands, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if (line.startswith("    ") or line.startswith("\t")) and COMMAND_START.match(stripped):
            command = stripped
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            commands.append(command)
        i += 1
    for span in INLINE.findall(text):
        span = " ".join(span.split())
        if MODULE.search(span) or span.startswith("sbatch "):
            commands.append(span)
    return commands


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in an inline example
        return command.split()


def parse_command(command: str) -> list[tuple[str, list[str]]]:
    """[(module, its arguments)] for each `-m phased_dmd_mp.X` of a command line (a launcher
    and the module it starts are two)."""
    tokens = _tokens(command)
    starts = [i for i, token in enumerate(tokens[:-1])
              if token == "-m" and tokens[i + 1].startswith(f"{PACKAGE}.")]  # fmt: skip
    parsed = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(tokens)
        module = tokens[start + 1].removeprefix(f"{PACKAGE}.").rstrip("`.,;:)")
        parsed.append((module, tokens[start + 2 : end]))
    return parsed


def flags(arguments: list[str]) -> list[str]:
    found = []
    for token in arguments:
        token = token.strip("[]().,;|`")
        if token.startswith("--") and len(token) > 2:
            found.append(token.split("=")[0].rstrip("]."))
    return found


def set_keys(arguments: list[str]) -> list[str]:
    found = []
    for previous, token in zip(["", *arguments], arguments):
        if previous.strip("[") == "--set" and "=" in token:
            found.append(token.split("=")[0].strip("[\"'"))
    return found


def help_key(module: str, arguments: list[str]) -> str:
    """'module', or 'module subcommand' (models.convert to-ours) when the first positional
    argument is a subcommand: whose --help lists the flags."""
    positional = [a for a in arguments if not a.startswith("-")]
    sub = positional[0] if positional and re.fullmatch(r"to-\w+", positional[0]) else ""
    return f"{module} {sub}".strip()


def help_keys(commands: list[str]) -> set[str]:
    return {help_key(*parsed) for command in commands for parsed in parse_command(command)}


def help_texts(needed: set[str]) -> dict[str, str]:
    """What `python -m phased_dmd_mp.MODULE [SUB] --help` prints, for each 'MODULE [SUB]'.

    Run in this process (runpy, as `python -m` does), so the libraries the CLIs import load
    once: seconds instead of a fresh interpreter importing torch and megatron per module."""
    texts = {}
    for key in sorted(k for k in needed if _module_exists(k.split(" ")[0])):
        module, *sub = key.split(" ")
        out, argv = io.StringIO(), sys.argv
        sys.argv = [f"{PACKAGE}.{module}", *sub, "--help"]
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(out):  # fmt: skip
                warnings.simplefilter("ignore")  # runpy: "found in sys.modules" when imported
                runpy.run_module(f"{PACKAGE}.{module}", run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        finally:
            sys.argv = argv
        texts[key] = out.getvalue()
    return texts


def _module_exists(module: str) -> bool:
    parts = module.split(".")
    base = ROOT / PACKAGE / Path(*parts)
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def command_problems(page: str, text: str, helps: dict[str, str]) -> list[str]:
    problems = []
    for command in shown_commands(text):
        tokens = _tokens(command)
        if tokens[:1] == ["sbatch"]:
            script = next((t for t in tokens if t.endswith(".sbatch")), "")
            cli = SBATCH_CONFIGS.get(Path(script).name)
            if cli in CONFIGS:
                known = keys(CONFIGS[cli])
                for token in tokens[tokens.index(script) + 1 :]:
                    key = token.split("=")[0]
                    if "=" in token and not token.startswith("-") and key not in known:
                        problems.append(
                            f"{page}: `{script} ... {token}`: no {cli} config key {key!r}"
                        )
        for module, arguments in parse_command(command):
            if not _module_exists(module):
                problems.append(f"{page}: `python -m {PACKAGE}.{module}`: no such module")
                continue
            help_text = helps[help_key(module, arguments)]
            for flag in flags(arguments):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                    problems.append(f"{page}: `{module}` does not accept {flag} (not in --help)")
            if module in CONFIGS:
                known = keys(CONFIGS[module]) | PLACEHOLDER_KEYS
                for key in set_keys(arguments):
                    if key not in known:
                        problems.append(f"{page}: `{module} --set {key}=`: no such config key")
    return problems


def key_problems(page: str, text: str) -> list[str]:
    """--set keys outside a recognised command and inline `key: value` snippets must be keys of
    some user config (or teacher.yaml)."""
    known = set().union(*(keys(path) for path in {*CONFIGS.values(), TEACHER_SPEC}))
    known |= PLACEHOLDER_KEYS
    text = strip_fences(text)
    in_commands = {key for command in shown_commands(text)
                   for module, arguments in parse_command(command) if module in CONFIGS
                   for key in set_keys(arguments)}  # fmt: skip (command_problems checks these)
    problems = []
    for key in re.findall(r"--set\s+[\"']?([A-Za-z_]\w*)=", text):
        if key not in known and key not in in_commands:
            problems.append(f"{page}: --set {key}=: no config has this key")
    for span in INLINE.findall(text):
        match = YAML_SNIPPET.match(" ".join(span.split()))
        if match and match.group(1) not in known:
            problems.append(f"{page}: `{span}`: no config has the key {match.group(1)!r}")
    return problems


def code_corpus() -> str:
    """The repository's code (not these docs tests, which quote names that do not exist)."""
    skip = {Path(__file__).name, "test_docs.py"}
    ignored = ("build", "runs")
    files = [p for p in ROOT.glob("**/*") if p.suffix in CODE_SUFFIXES and p.is_file()
             and p.name not in skip
             and not any(part.startswith(".") or part in ignored for part in p.parts)]  # fmt: skip
    return "\n".join(p.read_text(errors="replace") for p in files)


def name_problems(page: str, text: str, corpus: str) -> list[str]:
    problems = []
    for span in INLINE.findall(strip_fences(text)):
        if SNAKE_NAME.match(span) and not re.search(rf"\b{span}\b", corpus):
            problems.append(f"{page}: `{span}` occurs nowhere in the code")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def path_problems(page: str, text: str) -> list[str]:
    problems, here = [], (ROOT / page).parent
    subpackages = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir()}
    outputs = [token for command in shown_commands(text)
               for previous, token in zip(_tokens(command), _tokens(command)[1:])
               if previous == "--out"]  # fmt: skip
    for name in set(PATH.findall(text)):
        if "..." in name or "{" in name or any(name.startswith(out) for out in outputs):
            continue
        if not glob.glob(str(ROOT / name)):
            problems.append(f"{page}: {name} does not exist")
    for span in INLINE.findall(text):
        for word in span.split():
            word = word.strip("(),;:`'\"")
            first = word.split("/")[0]
            if "/" in word and first in subpackages and not glob.glob(str(ROOT / PACKAGE / word)):
                problems.append(f"{page}: {word} (in {PACKAGE}/) does not exist")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (here / file) if file else ROOT / page
        if not path.exists():
            problems.append(f"{page}: link {target}: {file} does not exist")
        elif anchor and path.suffix == ".md":
            anchors = {slug(h) for h in HEADING.findall(strip_fences(path.read_text()))}
            if anchor not in anchors:
                problems.append(f"{page}: link {target}: no heading with that anchor")
    return problems


def all_problems(pages: dict[str, str], helps: dict[str, str], corpus: str) -> list[str]:
    problems = []
    for page, text in pages.items():
        problems += command_problems(page, text, helps)
        problems += key_problems(page, text)
        problems += name_problems(page, text, corpus)
        problems += path_problems(page, text)
    return list(dict.fromkeys(problems))
