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


# --- the README as a user reads it: every command, option, path and test it names exists ---------------------

README = ROOT / "README.md"
# Scripts the README names that belong to the official code (the "Official" column), not to this repository.
OFFICIAL_SCRIPTS = {"generate_images.py"}
# Options the README names as removed (runs that recorded them still resume).
REMOVED_OPTIONS = {"--ddp-overlap"}
# Modules run with `python -m` that come from the environment, not from this repository.
EXTERNAL_MODULES = {"pytest"}


def readme_code() -> list[str]:
    """The README's shell lines (fenced bash blocks, backslash continuations joined) and its inline code spans
    (a span may wrap onto the next line; the wrap is dropped)."""
    text = README.read_text(encoding="utf-8")
    code, block, pending = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block in ("bash", "sh", ""):
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            code.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    code += [re.sub(r"\s*\n\s*", " ", span).replace(":: ", "::") for span in re.findall(r"`([^`]+)`", prose)]
    return code


def readme_invocations() -> list[tuple[str, str, list[str]]]:
    """(text, script or `-m` module, arguments) of every command line the README shows for a Python script."""
    found = []
    for text in readme_code():
        for part in re.split(r"&&|\|\||;", text.split(" #")[0]):
            tokens = part.replace("[", " ").replace("]", " ").split()
            for i, token in enumerate(tokens):
                if token == "-m" and i + 1 < len(tokens) and i > 0 and tokens[i - 1].startswith("python"):
                    found.append((part.strip(), "-m " + tokens[i + 1], tokens[i + 2 :]))
                    break
                # A lone name (`generate.py`) is a name, not a command line.
                commandlike = tokens[0].startswith(("python", "torchrun")) or len(tokens) > 1
                if token.endswith(".py") and not token.startswith("-") and "::" not in token and commandlike:
                    found.append((part.strip(), token.removeprefix("./"), tokens[i + 1 :]))
                    break
    return found


def click_command(module_name: str):
    """The module's click command-line entry: its group if it has one, else its `main`; None without either."""
    import importlib

    import click

    module = importlib.import_module(module_name)
    commands = [v for v in vars(module).values()
                if isinstance(v, click.Command) and getattr(v.callback, "__module__", None) == module.__name__]
    groups = [c for c in commands if isinstance(c, click.Group)]
    if groups:
        return groups[0]
    main = getattr(module, "main", None)
    return main if isinstance(main, click.Command) else None


def command_options(command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} | {"--help"}


def source_options(path: str) -> set[str]:
    """Options a script without a module-level click command parses by hand (argparse, sys.argv, a nested
    click group): every quoted `--name` in its source."""
    return set(re.findall(r"""["'](--[A-Za-z0-9][\w-]*)["']""", (ROOT / path).read_text(encoding="utf-8")))


def script_options(path: str, args: list[str]) -> tuple[set[str], str | None]:
    """The options the command at `path` takes, given its arguments (a group's first word picks the
    subcommand); with an error message instead when the subcommand does not exist."""
    import click

    command = click_command(path[:-3].replace("/", "."))
    if command is None:
        return source_options(path), None
    if isinstance(command, click.Group):
        words = [a for a in args if not a.startswith("-")]
        if words and words[0] in command.commands:
            return command_options(command.commands[words[0]]), None
        if words:
            return set(), f"{path} has no subcommand {words[0]!r} (it has {sorted(command.commands)})"
    return command_options(command), None


def test_readme_commands_name_existing_scripts_modules_and_options() -> None:
    """Every Python command line of the README (code blocks and inline code) runs a script or `python -m` module
    of this repository, and every --option it gives is one that script (or its subcommand) takes."""
    files = set(tracked_files())
    bad = []
    for text, target, args in readme_invocations():
        if target.startswith("-m "):
            module = target[3:]
            if module in EXTERNAL_MODULES:
                continue
            path = module.replace(".", "/") + ".py"
            if path not in files:
                bad.append(f"{text}: no module {module} in the repository")
                continue
        else:
            path = target
            if path in OFFICIAL_SCRIPTS:
                continue
            if path not in files:
                bad.append(f"{text}: no script {path} in the repository")
                continue
        options, error = script_options(path, args)
        if error:
            bad.append(f"{text}: {error}")
            continue
        for arg in args:
            name = arg.split("=", 1)[0]
            if name.startswith("--") and name != "--" and name not in options:
                bad.append(f"{text}: {path} takes no option {name}")
    assert not bad, "README commands that do not run as written:\n" + "\n".join(sorted(set(bad)))


def all_repository_options() -> set[str]:
    """Every option of every command-line script in the repository (click introspection, else quoted strings)."""
    import click

    options = set()
    for path in tracked_files():
        if not path.endswith(".py") or path.startswith("tests/"):
            continue
        source = (ROOT / path).read_text(encoding="utf-8")
        if "__main__" not in source:
            continue
        command = click_command(path[:-3].replace("/", "."))
        if command is None:
            options |= source_options(path)
            continue
        options |= command_options(command)
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                options |= command_options(sub)
    return options


def test_readme_inline_options_exist() -> None:
    """Every `--option` the README's prose names (alone in backticks, e.g. `--no-cudnn-benchmark`) is an option
    of some script here, so that a renamed option cannot stay behind in the text."""
    options = all_repository_options()
    named = set()
    commands = {text for text, _, _ in readme_invocations()}
    for text in readme_code():
        # Command lines are checked option by option above; torchrun's and pytest's own options are theirs.
        if text.split(" #")[0].strip() in commands or text.startswith(("python", "torchrun")):
            continue
        for token in text.replace("[", " ").replace("]", " ").split():
            if token.startswith("--") and len(token) > 2:
                named.add(token.split("=", 1)[0])
    named -= REMOVED_OPTIONS
    assert not named - options, f"options the README names that no script takes: {sorted(named - options)}"


def test_readme_links_and_paths_exist() -> None:
    """The README's links and images, and every repository path in its inline code (a top-level folder of the
    repository followed by a path), exist; every test it cites by name exists."""
    text = README.read_text(encoding="utf-8")
    files = set(tracked_files())
    folders = {"/".join(p.split("/")[:k]) for p in files for k in range(1, p.count("/") + 1)}
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" not in target and not target.startswith("#"):
            target = target.split("#", 1)[0]
            if target not in files and target.rstrip("/") not in folders:
                bad.append(f"link {target}")
    top = {p.split("/", 1)[0] for p in files if "/" in p}
    tests_source = "\n".join((ROOT / p).read_text(encoding="utf-8") for p in files if p.startswith("tests/")
                             and p.endswith(".py"))
    for text_ in readme_code():
        for token in text_.split():
            token = token.strip("`,;()").split("::", 1)
            path = token[0]
            if "/" in path and path.split("/", 1)[0] in top and "{" not in path and "*" not in path:
                if path not in files and path.rstrip("/") not in folders:
                    bad.append(f"path {path}")
            if len(token) == 2 and f"def {token[1]}(" not in (ROOT / path).read_text(encoding="utf-8"):
                bad.append(f"test {token[0]}::{token[1]}")
        for name in re.findall(r"^(test_\w+)$", text_.strip()):
            if f"def {name}(" not in tests_source:
                bad.append(f"test {name}")
    assert not bad, "README names what the repository does not have:\n" + "\n".join(bad)


def test_readme_python_api_names_exist() -> None:
    """Every `edm2.NAME` (and `edm2.NAME.ATTR`) the README's Python examples use is in the public API."""
    import edm2

    text = README.read_text(encoding="utf-8")
    blocks = "\n".join(re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE))
    assert "edm2.load_network" in blocks
    missing = []
    for name, attr in set(re.findall(r"\bedm2\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", blocks)):
        value = getattr(edm2, name, None)
        if value is None or (attr and not hasattr(value, attr)):
            missing.append(f"edm2.{name}" + (f".{attr}" if attr else ""))
    assert not missing, f"names the README's Python examples use that edm2 does not have: {sorted(missing)}"


# (script, subcommand, option, its default in the code, the README's words for that default)
README_DEFAULTS = [
    ("generate", None, "--sampler", "heun", "| `heun` (default:"),
    ("generate", None, "--schedule", "karras", "`--rho`; the default)"),
    ("generate", None, "--steps", 32, "with 32 Heun steps (63 network evaluations each"),
    ("generate", None, "--noise-device", None, "(`--noise-device cpu|cuda`, default the compute device"),
    ("sweep_solvers", None, "--baseline-steps", 32, "scored against Heun with `--baseline-steps` (32)"),
    ("sweep_solvers", None, "--reference-steps", 128, "those of a 128-step Heun run"),
    ("sweep_solvers", None, "--metric", "rms_to_reference", "without a reference (the default"),
    ("train_edm2", None, "--ema-stds", "0.050,0.100", "(std 0.050 and 0.100 by default, `--ema-stds`)"),
    ("dataset_tool", "convert", "--transform", None, "default none = plain resize, as the official tool"),
    ("phema_sweep", None, "--metric", "val-loss", "validation loss by default"),
]


def test_readme_stated_defaults_match_the_code() -> None:
    """The defaults the README states are the command-line defaults (the README's words and the code's value)."""
    import importlib

    readme = " ".join(README.read_text(encoding="utf-8").split())
    bad = []
    for script, sub, option, default, words in README_DEFAULTS:
        command = importlib.import_module(script).main
        command = command.commands[sub] if sub else command
        (param,) = [p for p in command.params if option in p.opts]
        if param.default != default:
            bad.append(f"{script} {option}: default {param.default!r} in the code, {default!r} expected")
        if words not in readme:
            bad.append(f"{script} {option}: the README no longer says {words!r}")
    assert not bad, "\n".join(bad)
    # dataset_tool's own summary (dataset_tool.py --help) states convert's default too; it once named another one.
    import dataset_tool

    summary = " ".join(dataset_tool.main.help.split())
    assert "a plain resize by default" in summary and "dhariwal by default" not in summary
