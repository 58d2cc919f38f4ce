"""Every document the code, the tests, the benchmarks, the Makefile, README.md and docs/ send a reader to is in
the repository, so a student who clones it can follow each reference.

What counts as a reference: a file name ending in `.md`, a path under `docs/`, a markdown link `](target)` in a
`.md` file (with its `#anchor`, checked against the target's headings), and a "docs/NAME.md section N" citation
(the file must have a heading "## N."). A plain reference resolves against the repository root or the citing
file's folder; a markdown link against the citing file's folder, as GitHub renders it. URLs are skipped.
Never allowed: a path into the project's private workspace (a parent folder named `shared`) and references to
issue-tracker entries (an issue number, or "the ... issue"), which a clone does not carry.
"""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

URL = re.compile(r"\b(?:https?|ftp)://\S+|\bmailto:\S+")
MD_NAME = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*[\w][\w./-]*\.md)\b")
DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./*-]*[\w*])")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
SECTION = re.compile(r"(docs/[\w-]+\.md),? sections? (\d+)(?: and (\d+))?")
PRIVATE = re.compile(r"\.\./shared\b|\bshared/spec\b")
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+|\b(?:the|this|that)\s+(?:[\w-]+\s+)?issue(?:'s)?\b", re.IGNORECASE)


def scanned_files() -> list[Path]:
    """The product modules, tests, benchmarks, Makefile and every shipped markdown file but licence texts. Not this
    file: its examples below are broken on purpose."""
    files = [*REPO.glob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py"),
             REPO / "Makefile", *REPO.glob("*.md"), *(REPO / "docs").rglob("*.md"), *(REPO / "benchmarks").glob("*.md"),
             *(p for p in (REPO / "assets").rglob("*.md") if not p.name.startswith("LICENSE"))]
    return sorted(p for p in files if p.is_file() and p != Path(__file__).resolve())


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", path.read_text(), re.MULTILINE)}


def exists(ref: str, folder: Path) -> bool:
    """`ref` names a file (or, for a glob such as the figures a script writes, a folder) inside the repository."""
    ref = ref.rstrip(".,;:")
    for base in (REPO, folder):
        target = (base / ref).resolve()
        if "*" in ref:
            target = target.parent
        if target.is_relative_to(REPO) and target.exists():
            return True
    return False


def problems(path: Path, text: str) -> list[str]:
    """'file:line: what' for every reference in `text` (the contents of `path`) that a clone cannot follow."""
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = URL.sub(" ", line)
        for m in PRIVATE.finditer(line):
            found.append(f"{where}:{lineno}: points into the private workspace: {m.group(0)!r}")
        for m in ISSUE.finditer(line):
            found.append(f"{where}:{lineno}: refers to an issue the repository does not carry: {m.group(0)!r}")
        for ref in dict.fromkeys(m.group(1) for pattern in (MD_NAME, DOCS_PATH) for m in pattern.finditer(line)):
            if not exists(ref, path.parent):
                found.append(f"{where}:{lineno}: no such file in the repository: {ref!r}")
        for m in SECTION.finditer(line):
            doc = REPO / m.group(1)
            for number in filter(None, m.group(2, 3)):
                if doc.is_file() and not re.search(rf"^##\s+{number}\.\s", doc.read_text(), re.MULTILINE):
                    found.append(f"{where}:{lineno}: {m.group(1)} has no section {number}")
        if path.suffix == ".md":
            for m in MD_LINK.finditer(line):
                target, _, anchor = m.group(1).partition("#")
                if target.startswith(("http://", "https://", "mailto:")):
                    continue
                file = (path.parent / target).resolve() if target else path
                if not (file.is_relative_to(REPO) and file.exists()):
                    found.append(f"{where}:{lineno}: broken link: {m.group(1)!r}")
                elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                    found.append(f"{where}:{lineno}: no heading for the anchor: {m.group(1)!r}")
    return found


def test_scans_the_files_it_should():
    names = {p.relative_to(REPO).as_posix() for p in scanned_files()}
    assert {"README.md", "Makefile", "train.py", "losses.py", "tests/test_train.py", "benchmarks/bench_train.py",
            "docs/methods.md", "docs/sd-reference.md"} <= names


def test_every_reference_resolves():
    found = [p for path in scanned_files() for p in problems(path, path.read_text())]
    assert not found, f"{len(found)} references a clone cannot follow:\n" + "\n".join(found)


@pytest.mark.parametrize("text, bad", [
    ("# see methods.md section 2", True),                        # the file is docs/methods.md
    ("# see docs/methods.md section 2", False),
    ("# see docs/methods.md section 9", True),                   # no such section
    ("# sd facts: docs/sd-reference.md section 3", False),
    ("# see docs/nothing.md", True),
    ("# the spec, ../shared/spec/methods.md", True),
    ("# added for issue 5", True),
    ("# scenario (c) of the performance issue", True),
    ("# diffusers issues more small ops per layer", False),      # a verb, not a reference
    ("# https://github.com/google/dreambooth/blob/main/README.md", False),
    ("# figures in docs/toy_claims/*.png", False),
    ("# figures in docs/elsewhere/*.png", True),
])
def test_problems_flags_what_a_clone_lacks(text, bad):
    assert bool(problems(REPO / "example.py", text)) == bad, problems(REPO / "example.py", text)


@pytest.mark.parametrize("text, bad", [
    ("[the syllabus](README.md#reading-order-the-syllabus)", False),
    ("[methods](docs/methods.md)", False),
    ("[methods](methods.md)", True),                             # relative to the README's folder: not there
    ("[nowhere](README.md#no-such-heading)", True),
    ("[paper](https://arxiv.org/abs/2208.12242)", False),
])
def test_markdown_links_resolve_from_their_folder(text, bad):
    assert bool(problems(REPO / "example.md", text)) == bad, problems(REPO / "example.md", text)
