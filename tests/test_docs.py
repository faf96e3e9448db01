"""The documentation points at things that exist (issue 13, item 6).

In every Markdown file of the repository (README.md, docs/, infra/):
- each relative link or image resolves to a file or folder of the repository (not to an output that
  git ignores), and each ``#anchor`` to a heading of the linked file;
- each code reference in backticks resolves: a repository path (``pipeline/train.py``, ``infra/``,
  ``notes.md``), the names after it (``ddgm/schedules.py: cosine_betas``), a test
  (``tests/test_elbo.py::test_x``) or a dotted name inside a sub-module (``ddgm.training.progress.f``).
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
SOURCE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt", ".cfg"}
NOT_A_PATH = set("*?{}<>$~ ,()=|'\"")


@cache
def repository_files() -> frozenset[str]:
    """Paths (POSIX, relative to the root) of the files git would commit: tracked or untracked but not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode()
    return frozenset(name for name in listed.split("\0") if name and (ROOT / name).exists())


@cache
def repository_entries() -> frozenset[str]:
    """The files of repository_files() and every folder above them."""
    entries = set(repository_files())
    for name in repository_files():
        entries.update(parent.as_posix() for parent in Path(name).parents if parent != Path("."))
    return frozenset(entries)


def markdown_files() -> list[str]:
    return sorted(name for name in repository_files() if name.endswith(".md"))


def prose(path: Path) -> str:
    """The file's text without fenced code blocks (commands, not references)."""
    return FENCE.sub("", path.read_text())


def in_repository(path: Path) -> str | None:
    """``path`` relative to the root when it is a file or folder of the repository, else None."""
    try:
        name = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return None
    return name if name in repository_entries() else None


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to hyphens; -1, -2, ... on
    repeats."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in anchors:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        anchors.add(candidate)
    return anchors


def defined_names(path: Path) -> set[str]:
    """Every function, class and assigned name anywhere in a Python file (methods and attributes included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@cache
def ignored_by_git(path: Path) -> bool:
    """Whether git ignores ``path`` (an output the pipeline or a tool writes, e.g. ``models/``, ``.dvc/tmp/``)."""
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", str(path)], cwd=ROOT).returncode == 0


def resolve_path(token: str, folder: Path) -> str | None:
    """A path as the docs write it: relative to the Markdown file's folder or to the root; a bare file name
    (``launch.sh``) may name a file anywhere in the repository."""
    for base in (folder, ROOT):
        found = in_repository(base / token.rstrip("/"))
        if found is not None:
            return found
    if "/" not in token:
        return next((name for name in sorted(repository_files()) if Path(name).name == token), None)
    return None


def looks_like_a_path(token: str, folder: Path) -> bool:
    """A repository path, not an output (``models/run.json``), a metric name (``val/total_bpd``), a URL or a pattern."""
    if NOT_A_PATH & set(token) or "://" in token or token.startswith(("-", "/")):
        return False
    top = token.split("/")[0]
    tops = {Path(name).parts[0] for name in repository_entries()}
    beside = {p.name for p in folder.iterdir()} if folder != ROOT else set()
    suffix = Path(token.rstrip("/")).suffix
    if "/" in token.rstrip("/") or token.endswith("/"):
        return (top in tops or top in beside) and (suffix in SOURCE_SUFFIXES or suffix == "")
    return suffix in SOURCE_SUFFIXES


def code_reference_problem(span: str, folder: Path) -> str | None:
    """What is wrong with one backticked span (None when it is fine or is not a reference)."""
    if "::" in span:  # tests/test_x.py::test_name
        file, _, name = span.partition("::")
        found = resolve_path(file, folder) if looks_like_a_path(file, folder) else None
        if found is None:
            return f"no file {file}"
        return None if name.split("[")[0] in defined_names(ROOT / found) else f"{name} is not defined in {found}"
    file, colon, names = span.partition(": ")
    if looks_like_a_path(file, folder) and not any(ignored_by_git(base / file) for base in (folder, ROOT)):
        found = resolve_path(file, folder)
        if found is None:
            return f"no file or folder {file}"
        if colon and found.endswith(".py"):
            defined = defined_names(ROOT / found)
            missing = [name for item in names.split(",") for name in item.strip().split("(")[0].split(".")
                       if name and name not in defined]
            return f"{', '.join(missing)} not defined in {found}" if missing else None
        return None
    if re.fullmatch(r"(ddgm|pipeline)(\.\w+)+", span):  # a dotted name inside a sub-module
        parts = span.split(".")
        for cut in range(len(parts), 1, -1):
            module = ROOT.joinpath(*parts[:cut])
            file = module.with_suffix(".py") if module.with_suffix(".py").is_file() else module / "__init__.py"
            if file.is_file():
                rest = [name for name in parts[cut:] if name not in defined_names(file)]
                return f"{'.'.join(rest)} not defined in {file.relative_to(ROOT)}" if rest else None
        return None  # not a module path (e.g. the tag name ``ddgm.train_run_id``)
    return None


@pytest.mark.parametrize("doc", markdown_files())
def test_relative_links_resolve(doc):
    path = ROOT / doc
    text = prose(path)
    broken = []
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = path if not file else path.parent / file
        name = in_repository(linked)
        if name is None:
            broken.append(f"{target}: no such file or folder in the repository")
        elif anchor and name.endswith(".md") and anchor not in github_anchors((ROOT / name).read_text()):
            broken.append(f"{target}: no heading #{anchor} in {name}")
    assert not broken, f"{doc}: {broken}"


@pytest.mark.parametrize("doc", markdown_files())
def test_code_references_resolve(doc):
    path = ROOT / doc
    broken = [f"`{span}`: {problem}" for span in CODE_SPAN.findall(prose(path))
              if (problem := code_reference_problem(span.strip(), path.parent))]
    assert not broken, f"{doc}: {broken}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The helpers find a missing file, a missing name, a missing test and a missing anchor (so that the
    tests above can fail), and pass what exists."""
    assert code_reference_problem("notes.md", ROOT / "docs") == "no file or folder notes.md"
    assert code_reference_problem("ddgm/schedules.py: cosine_betas, no_such_schedule", ROOT) == (
        "no_such_schedule not defined in ddgm/schedules.py")
    assert code_reference_problem("tests/test_docs.py::test_no_such_test", ROOT) == (
        "test_no_such_test is not defined in tests/test_docs.py")
    assert code_reference_problem("tests/test_docs.py::test_relative_links_resolve", ROOT) is None
    assert code_reference_problem("slurm/train.sbatch", ROOT / "infra") is None
    assert code_reference_problem("launch.sh", ROOT / "infra" / "mlflow") is None
    for output in ("models/run.json", ".dvc/tmp/exps/", "val/total_bpd", "data/shards", "infra/k8s/*.yaml",
                   "s3://bucket/x"):
        assert code_reference_problem(output, ROOT) is None, output
    assert github_anchors("# Two commands\n## Results on digits (8×8, 17 levels)\n# Two commands\n") == {
        "two-commands", "results-on-digits-88-17-levels", "two-commands-1"}
    assert in_repository(ROOT / "docs" / "math.md") == "docs/math.md"
    assert in_repository(ROOT / "models" / "model.json") is None  # a pipeline output: ignored by git


def test_readme_layout_table_names_every_module_and_package():
    """Every module of ddgm/ (top level), every ddgm sub-package, pipeline/ and benchmarks/ has a row."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Library layout"):]
    expected = [f"`ddgm/{p.name}`" for p in sorted((ROOT / "ddgm").glob("*.py")) if p.name != "__init__.py"]
    expected += [f"`ddgm/{p.name}/`" for p in sorted((ROOT / "ddgm").iterdir()) if (p / "__init__.py").is_file()]
    expected += ["`pipeline/`", "`benchmarks/`"]
    missing = [name for name in expected if name not in table]
    assert not missing, f"README's layout table lacks {missing}"
