"""The README and the docs/ pages stay true to the repository: every relative link resolves to a
file and heading, every repository path, `python -m cdm.<module>`, `module.name` and `make
<target>` they name exists, and the README's two commands are what the Makefile runs."""

import ast
import itertools
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("src/", "bench/", "configs/", "workflow/", "tests/", "docs/", "slurm/")
FILE_SUFFIXES = {"py", "md", "yaml", "json", "csv", "txt", "html", "png", "parquet", "safetensors"}


def prose_and_code(text: str) -> tuple[str, str]:
    """The page split into its prose and its fenced code blocks (a `#` in code is no heading)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    return "\n".join(prose), "\n".join(code)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    ids, seen = set(), dict[str, int]()
    for line in prose_and_code(page.read_text())[0].splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return ids


def broken_links(page: Path) -> list[str]:
    """Every relative link of `page` whose file or `#heading` does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose_and_code(page.read_text())[0]):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not this repository's
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {path or page.name}")
    return broken


def spans(page: Path) -> list[str]:
    """The page's inline code spans and its code blocks' lines: where paths and commands live."""
    prose, code = prose_and_code(page.read_text())
    return re.findall(r"`([^`\n]+)`", prose) + code.splitlines()


def named_paths(page: Path) -> set[str]:
    """Repository paths a page names (brace sets expanded); placeholders and outputs skipped."""
    paths = set()
    for span in spans(page):
        words = span.split()
        for before, word in zip(
            ["", *words], words, strict=False
        ):  # each word with the one before it
            word = word.rstrip(",;:)")
            if not word.startswith(REPO_DIRS) or re.search(r"[<*]", word) or before == "--out":
                continue
            parts = re.split(r"\{([^}]*)\}", word)  # a{b,c}d -> ad, bd
            choices = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
            paths.update("".join(c) for c in itertools.product(*choices))
    return paths


def module_file(name: str) -> Path | None:
    """The source file of `cdm.a.b` (a module or a package's __main__), if it exists."""
    base = ROOT / "src" / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def makefile_recipes() -> dict[str, str]:
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        rule = re.match(r"([\w-]+):(?!=)", line)
        if rule:
            target = rule.group(1)
            recipes[target] = ""
        elif target and line.startswith("\t"):
            recipes[target] += line + "\n"
    return recipes


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_repository_path_exists(page):
    assert sorted(p for p in named_paths(page) if not (ROOT / p).exists()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_m_command_names_a_runnable_module(page):
    modules = re.findall(r"python -m (cdm(?:\.\w+)+)", page.read_text())
    for name in modules:
        file = module_file(name)
        assert file is not None, f"{page.name}: python -m {name}: no such module"
        assert file.name == "__main__.py" or '__name__ == "__main__"' in file.read_text(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_dot_name_is_defined_there(page):
    # `engine.train`, `cdm.cache.StreamedCondition`: the name must still live in that module.
    missing = []
    for span in re.findall(r"`([^`\n]+)`", prose_and_code(page.read_text())[0]):
        ref = re.fullmatch(r"(?:cdm\.)?([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)", span)
        if not ref or ref.group(2) in FILE_SUFFIXES:
            continue
        file = module_file("cdm." + ref.group(1))
        if file is not None and file.name != "__main__.py":
            if ref.group(2) not in top_level_names(file):
                missing.append(span)
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_exists(page):
    targets = {m for s in spans(page) for m in re.findall(r"(?:^|\s)make ([\w-]+)", s)}
    assert targets - set(makefile_recipes()) == set()


def test_readme_two_commands_are_what_the_makefile_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## The two commands\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "README.md: no '## The two commands' section with a bash block"
    commands = dict(re.findall(r"^make (\w+)\s+#(.*)$", block.group(1), re.M))
    assert sorted(commands) == ["run", "test"]
    recipes = makefile_recipes()
    assert (
        "snakemake --cores all" in commands["run"] and "snakemake --cores all\n" in recipes["run"]
    )
    assert "cdm.validate" in readme and "-m cdm.validate params.yaml" in recipes["run"]
    assert "pytest" in commands["test"] and "-m pytest $(XDIST)\n" in recipes["test"]
    assert "make test" in (ROOT / ".ci/run").read_text().splitlines()


def test_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {
        (readme.parent / t).resolve()
        for t in re.findall(r"\]\((docs/[^)#\s]+)", readme.read_text())
    }
    assert linked == {p.resolve() for p in PAGES[1:]}


def test_the_checks_catch_a_broken_link_path_and_module(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.md").write_text("# A page\n\n## Its `second` part (here)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n```bash\n# not a heading\n```\n\n"
        "[ok](docs/a.md#its-second-part-here) [ok](#top) [web](https://example.org/x)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#not-a-heading) [own](#not-a-heading)\n"
        "`src/cdm/engine.py` `src/cdm/nowhere.py` `configs/accelerate/zero{2,3}-8gpu.yaml`\n"
    )
    assert broken_links(page) == [
        "docs/b.md: no file docs/b.md",
        "docs/a.md#not-a-heading: no heading #not-a-heading in docs/a.md",
        "#not-a-heading: no heading #not-a-heading in README.md",
    ]
    paths = named_paths(page)
    assert "configs/accelerate/zero3-8gpu.yaml" in paths
    assert sorted(p for p in paths if not (ROOT / p).exists()) == ["src/cdm/nowhere.py"]
    assert module_file("cdm.nowhere") is None and module_file("cdm.engine") is not None
