"""Repository hygiene: citations stay inside the repository, tracked source lines fit the column limit and the
README's layout table matches the tree."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"


# Built from parts so that this file does not match itself.
OUTSIDE_CITATION = re.compile(r"\b" + "SP" + r"EC\b|\.\./" + "shared")
DESIGN_CITATION = re.compile(r"design\.md (§\d+(?:, §\d+)*)")
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


def tracked_files() -> list[str]:
    """The repository's tracked files (POSIX paths relative to the root): `git ls-files`, or, without git or
    outside a checkout, every file under the root except caches and build outputs."""
    try:
        proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
        if proc.returncode == 0 and proc.stdout:
            return sorted(p for p in proc.stdout.decode().split("\0") if p and (ROOT / p).is_file())
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            files.append((pathlib.Path(dirpath) / name).relative_to(ROOT).as_posix())
    return sorted(files)


def text_lines(path: str) -> list[str] | None:
    """The lines of a text file; None for a binary one."""
    data = (ROOT / path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None


def test_tracked_files_found(monkeypatch) -> None:
    files = tracked_files()
    assert "README.md" in files and "docs/design.md" in files and "networks/unet.py" in files

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)  # without git: the walk of the tree finds them too
    walked = tracked_files()
    assert set(files) <= set(walked) and not any(p.startswith(".git/") or "__pycache__" in p for p in walked)


def test_no_citation_outside_repository() -> None:
    """The code cites the paper or docs/design.md, never a file that only exists outside the repository."""
    bad = []
    for path in tracked_files():
        if path.startswith("tests/data/"):
            continue
        for number, line in enumerate(text_lines(path) or [], 1):
            if OUTSIDE_CITATION.search(line):
                bad.append(f"{path}:{number}: {line.strip()}")
    assert not bad, "citations of files outside the repository:\n" + "\n".join(bad)


def test_design_citations_exist() -> None:
    """Every `docs/design.md §N` cited in the repository names a section that docs/design.md has."""
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), flags=re.MULTILINE))
    assert {"1", "12"} <= sections
    bad = []
    for path in tracked_files():
        for number, line in enumerate(text_lines(path) or [], 1):
            for cited in DESIGN_CITATION.findall(line):
                for section in re.findall(r"\d+", cited):
                    if section not in sections:
                        bad.append(f"{path}:{number}: §{section}")
    assert not bad, "citations of sections docs/design.md does not have:\n" + "\n".join(bad)


# The limit the project's linter is configured with (pyproject.toml, [tool.ruff] line-length).
MAX_COLUMNS = int(re.search(r"^line-length\s*=\s*(\d+)", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1])
SCRIPTS = (".ci/run",)  # shell scripts without a .sh suffix


def test_line_length() -> None:
    """Every tracked .py, .sh and .toml line (and the CI script) fits in the project's column limit."""
    bad = []
    for path in tracked_files():
        if path.startswith("tests/data/"):
            continue
        if not (path.endswith((".py", ".sh", ".toml")) or path in SCRIPTS):
            continue
        for number, line in enumerate(text_lines(path) or [], 1):
            if len(line) > MAX_COLUMNS:
                bad.append(f"{path}:{number}: {len(line)} columns")
    assert not bad, f"lines over {MAX_COLUMNS} columns:\n" + "\n".join(bad)


def test_readme_layout_table_matches_tree() -> None:
    """The README's layout table names every top-level folder and script, and every path it names exists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Layout and specification", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    named = set(re.findall(r"`([^`\s]+)`", table))
    files = tracked_files()
    top = {p.split("/", 1)[0] + "/" if "/" in p else p for p in files}
    wanted = {t for t in top if t.endswith("/") and not t.startswith(".")} | {t for t in top if t.endswith(".py")}
    assert not wanted - named, f"missing from the README's layout table: {sorted(wanted - named)}"
    folders = {p.rsplit("/", 1)[0] + "/" for p in files if "/" in p}
    folders |= {"/".join(p.split("/")[:k]) + "/" for p in files for k in range(1, p.count("/") + 1)}
    for name in named:
        if "/" in name and not name.endswith("/"):
            assert name in files, f"the README's layout table names {name}, which is not in the repository"
        elif name.endswith("/"):
            assert name in folders, f"the README's layout table names {name}, which is not a folder here"
        elif name.endswith((".py", ".md", ".toml", ".yml")):
            assert any(p == name or p.endswith("/" + name) for p in files), f"{name} is not in the repository"
