"""The documentation cannot drift from the code.

- docs/config.md has one row per key of every config dataclass, with its real type and default;
- README.md stays small, links docs/index.md, and README + index link every docs page;
  every relative link (and #anchor) in README.md and docs/*.md resolves;
- no heading carries an issue number;
- every command quoted in README.md and docs/*.md still runs: `--help` of each
  `python -m MODULE [SUBCOMMAND]` of this repository, and `--print-config` of each
  `--config NAME`; file paths quoted in backticks exist.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from gpt2_jax.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # where commands and links are checked
README_MAX_BYTES = 12_288

FENCE = re.compile(r"^(`{3,}|~{3,})(.*?)$\n(.*?)^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _prose(text: str) -> str:
    """The text with fenced code blocks blanked out (their lines kept, empty)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _bash_blocks(text: str) -> list[str]:
    return [m.group(3) for m in FENCE.finditer(text) if m.group(2).strip() in ("bash", "sh")]


def _inline_code(text: str) -> list[str]:
    """Inline code spans (which may wrap onto the next line), each on one line."""
    return [" ".join(code.split()) for code in re.findall(r"`([^`]+)`", _prose(text))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# -- 1. docs/config.md against the dataclasses -----------------------------------------------


def _config_tables() -> dict[str, dict[str, tuple[str, str, str]]]:
    """{section: {key: (type, default, meaning)}} from the `## `section`` tables of
    docs/config.md (the meaning with its links reduced to their text)."""
    tables: dict[str, dict[str, tuple[str, str, str]]] = {}
    section = None
    for line in _prose((ROOT / "docs" / "config.md").read_text()).splitlines():
        heading = re.match(r"^##\s+(.*)$", line)
        if heading:
            named = re.fullmatch(r"`(\w+)`", heading.group(1).strip())
            section = named.group(1) if named else None
            if section is not None:
                assert section not in tables, f"docs/config.md: section {section} twice"
                tables[section] = {}
            continue
        if section is None or not re.match(r"^\|\s*`\w+`\s*\|", line):
            continue
        cells = [c.strip().replace("\\|", "|") for c in CELL_SPLIT.split(line.strip())[1:-1]]
        assert len(cells) == 4, f"docs/config.md: row needs 4 cells: {line}"
        key, typ, default = (c.strip("`") for c in cells[:3])
        assert key not in tables[section], f"docs/config.md: {section}.{key} twice"
        tables[section][key] = (typ, default, re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", cells[3]))
    return tables


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _type_text(tp: typing.Any) -> str:
    if isinstance(tp, str):  # `from __future__ import annotations`: the annotation as written
        return tp
    return getattr(tp, "__name__", str(tp)).replace("typing.", "").replace("NoneType", "None")


def _default_of(f: dataclasses.Field) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{f.name} has no default"
    return f.default_factory()


def _same_default(cell: str, value: typing.Any) -> bool:
    """Whether the documented default (a YAML scalar, as an override would give it) is `value`."""
    parsed = yaml.safe_load(cell) if cell else None
    if value is None or isinstance(value, bool):
        return parsed is value
    if isinstance(value, int):
        return isinstance(parsed, int) and not isinstance(parsed, bool) and parsed == value
    if isinstance(value, float):
        try:
            return float(parsed) == value  # YAML 1.1 reads 1e-5 (no dot) as a string
        except (TypeError, ValueError):
            return False
    if isinstance(value, str):
        return str(parsed) == value
    return parsed == value


def test_config_reference_matches_the_dataclasses():
    tables = _config_tables()
    sections = _sections()
    assert set(tables) == set(sections), (
        f"docs/config.md sections {sorted(tables)} != Config sections {sorted(sections)}"
    )
    problems = []
    for section, cls in sections.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        rows = tables[section]
        for key in fields.keys() - rows.keys():
            problems.append(f"{section}.{key}: not documented")
        for key in rows.keys() - fields.keys():
            problems.append(f"{section}.{key}: documented, but no such key")
        for key in fields.keys() & rows.keys():
            typ, default, meaning = rows[key]
            if not meaning.startswith(fields[key].metadata["help"]):
                problems.append(f"{section}.{key}: the meaning does not start with its --help line")
            want_type = _type_text(fields[key].type)
            if typ != want_type:
                problems.append(f"{section}.{key}: type {typ!r}, the dataclass says {want_type!r}")
            value = _default_of(fields[key])
            if not _same_default(default, value):
                problems.append(
                    f"{section}.{key}: default {default!r}, the dataclass has {value!r}"
                )
    assert not problems, "docs/config.md is out of date:\n" + "\n".join(problems)


# -- 2. size and links -----------------------------------------------------------------------


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def test_readme_is_small():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}"


def test_every_docs_page_is_linked():
    def targets(page: Path) -> set[Path]:
        out = set()
        for link in _links(page):
            path = link.split("#", 1)[0]
            if path and not re.match(r"^[a-z][a-z0-9+.-]*:", link):
                out.add((page.parent / path).resolve())
        return out

    index = ROOT / "docs" / "index.md"
    readme_targets = targets(README)
    assert index.resolve() in readme_targets, "README.md must link docs/index.md"
    linked = readme_targets | targets(index)
    unlinked = [p.name for p in DOCS if p != index and p.resolve() not in linked]
    assert not unlinked, f"docs pages linked from neither README.md nor docs/index.md: {unlinked}"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for link in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {link}"
            if not target.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# -- 3. headings -------------------------------------------------------------------------------


def test_no_issue_numbers_in_headings():
    bad = []
    for page in [README, ROOT / "BENCHMARKS.md", *DOCS]:
        for n, line in enumerate(_prose(page.read_text()).splitlines(), 1):
            if re.match(r"^#{1,6}\s", line) and re.search(r"issues?\s*#?\s*\d", line, re.I):
                bad.append(f"{page.relative_to(ROOT)}:{n}: {line}")
    assert not bad, "headings with issue numbers:\n" + "\n".join(bad)


# -- 4. commands and paths ---------------------------------------------------------------------

# Top-level packages of this checkout: the modules a quoted `python -m` may name here.
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
PYTHON_M = re.compile(r"(?:^|[\s;&|(\"'])python3?\s+-m\s+([\w.]+)((?:[ \t]+\S+)*)")
WORD = re.compile(r"^[a-z][a-z0-9_-]*$")  # a subcommand, not a flag, override or placeholder
CONFIG_NAME = re.compile(r"--config[ =]([a-z0-9][a-z0-9._/-]*)(?=[\s\"'`]|$)")


def _command_texts() -> list[str]:
    """Shell text quoted in README.md and docs/*.md: bash blocks (continuations joined) and
    inline code."""
    texts = []
    for page in PAGES:
        text = page.read_text()
        texts += [block.replace("\\\n", " ") for block in _bash_blocks(text)]
        texts += _inline_code(text)
    return texts


def _quoted_commands() -> tuple[dict[str, set[str]], set[str]]:
    """({module: {subcommands}}, {config names}) quoted in README.md and docs/*.md; a console
    script `gpt2-jax ...` counts as module "gpt2-jax"."""
    modules: dict[str, set[str]] = {}
    configs: set[str] = set()
    for text in _command_texts():
        for line in text.splitlines():
            for m in PYTHON_M.finditer(line):
                module, rest = m.group(1), m.group(2).split()
                if module.split(".")[0] not in PACKAGES:
                    continue  # pip, venv, pytest, ...
                subs = modules.setdefault(module, set())
                if rest and WORD.match(rest[0]):
                    subs.add(rest[0])
            configs.update(CONFIG_NAME.findall(line))
    for page in PAGES:  # console scripts: lines of bash blocks only
        for block in _bash_blocks(page.read_text()):
            for script in re.finditer(r"^\s*gpt2-jax(?:[ \t]+(\S+))?", block, re.M):
                subs = modules.setdefault("gpt2-jax", set())
                if script.group(1) and WORD.match(script.group(1)):
                    subs.add(script.group(1))
    return modules, configs


# One interpreter per module: each argv runs as `python -m MODULE ARGV` would (runpy); the exit
# code and the tail of the output of each run come back as the last line of stdout.
RUNNER = """
import contextlib, io, json, runpy, sys, traceback
module, runs = sys.argv[1], json.loads(sys.argv[2])
results = []
for argv in runs:
    sys.argv = [module, *argv]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = "exception"
    results.append([code, out.getvalue()[-2000:]])
print("\\nRESULTS " + json.dumps(results))
"""


def _run_module(module: str, runs: list[list[str]]) -> list[tuple[list[str], object, str]]:
    """The runs of `python -m module` that failed: (argv, exit code, output tail)."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, module, json.dumps(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not last:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return [(["(all)"], f"interpreter exit {proc.returncode}", tail)]
    results = json.loads(last[-1].split(" ", 1)[1])
    return [(argv, code, out) for argv, (code, out) in zip(runs, results, strict=True) if code != 0]


def test_quoted_commands_run():
    modules, configs = _quoted_commands()
    assert "gpt2_jax.train" in modules and "benchmarks" in modules, modules
    configs.discard("default")  # the implicit one: still checked below, once
    failures = []
    script = modules.pop("gpt2-jax", None)
    if script is not None:
        exe = shutil.which("gpt2-jax")
        assert exe, "the docs quote a `gpt2-jax` command, but no such script is installed"
        for argv in [["--help"]] + [[sub, "--help"] for sub in sorted(script)]:
            proc = subprocess.run([exe, *argv], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                failures.append(f"gpt2-jax {' '.join(argv)}: exit {proc.returncode}")
    for module in sorted(modules):
        runs = [["--help"]] + [[sub, "--help"] for sub in sorted(modules[module])]
        if module == "gpt2_jax.train":
            # init_from=null: a fine-tune config names weights this machine may not hold.
            runs += [
                ["--config", name, "--print-config", "train.init_from=null"]
                for name in ["default", *sorted(configs)]
            ]
        for argv, code, out in _run_module(module, runs):
            failures.append(f"python -m {module} {' '.join(argv)}: exit {code}\n{out}")
    assert not failures, "quoted commands that fail:\n" + "\n\n".join(failures)


PATH_IN_CODE = re.compile(
    r"^(?:gpt2_jax|benchmarks|gpt2_torch_ref|parity_tests|tests|configs|docs)/[\w./*-]*$"
)


def test_quoted_paths_exist():
    missing = []
    for page in [*PAGES, ROOT / "BENCHMARKS.md"]:
        for code in _inline_code(page.read_text()):
            for token in code.split():
                token = token.strip("(),;:")
                if not PATH_IN_CODE.match(token):
                    continue
                if not glob.glob(str(ROOT / token)):
                    missing.append(f"{page.relative_to(ROOT)}: {token}")
    assert not missing, "quoted paths that do not exist:\n" + "\n".join(missing)
