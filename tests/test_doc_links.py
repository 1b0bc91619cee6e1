"""Every relative link and every repository path named in README.md and documentation/**/*.md exists.

What is checked, per page (text inside fenced code blocks is skipped: it holds commands with example user paths):

1. Markdown links and images, ``[text](target)`` / ``![alt](target)`` and reference definitions ``[ref]: target``.
   External targets (``http://``, ``https://``, ``mailto:``) are skipped. The target is resolved relative to the
   page, as GitHub does (``/x`` from the repository root). A ``#anchor`` on a markdown target (or alone, on the page
   itself) must match one of that page's headings, slugged as GitHub does (lower case, punctuation dropped, spaces
   to hyphens, ``-1``, ``-2`` … for repeats).
2. Inline code spans that look like a repository path: one token without spaces, quotes or placeholder characters
   (``< > $ * { } [ ] … ~ = | , ( )``), not an option (``-x``) nor a URL, that either has a ``/`` between two
   non-empty parts (``nnunet_diffusion/cli.py``, ``benchmarks/results/``) or is a bare file name ending in
   .py/.toml/.md/.json/.cfg/.ini/.txt/.yaml/.yml/.sh. A ``::pytest-id``, ``#anchor`` or ``:line`` suffix is
   dropped. A path is resolved relative to the page first, then relative to the repository root. Allowed without
   being found in the repository:

   - ``../shared/...`` (from the repository root: the project's shared folder with the papers, which lives beside
     the repository and is not part of a clone). Checked when that folder exists, skipped when it does not.
   - paths inside another installed package, whose first part is an importable top-level module that is not a
     folder of this repository (``nnunetv2/utilities/find_objects.py``): checked inside that installed package.
   - outputs our commands create in the repository, i.e. paths under a folder that ``make clean`` removes
     (``nndiff_demo/``, ``bench_table/``, …; read from the Makefile).
   - bare names of files that nnU-Net or our tools write (``dataset.json``, ``summary.json`` …: OUTPUT_FILES), or
     that exist somewhere in the repository under that name (``RESULTS.md``).
   - a single folder name with a trailing slash (``residuals/``) is not a path and is not checked.
3. ``python -m a.b`` in an inline code span, where ``a`` is a folder of this repository: ``a/b.py``, ``a/b/__init__.py``
   or ``a/b/__main__.py`` exists.

Write example user paths with a placeholder (``<output>/samples/``, ``$nnUNet_raw/...``) or in a code block.
"""
from __future__ import annotations

import importlib.util
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
EXTENSIONS = (".py", ".toml", ".md", ".json", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".sh")
PLACEHOLDER_CHARS = set("<>$*{}[]…~=|,()'\"")
# files nnU-Net or our commands write into datasets, result and output folders
OUTPUT_FILES = {"dataset.json", "dataset_fingerprint.json", "plans.json", "nnUNetPlans.json", "splits_final.json",
                "summary.json", "table.md", "conversion_report.json", "inference_instructions.txt",
                "debug.json", "progress.png"}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "documentation").rglob("*.md"))]


def _strip_fences(text: str) -> str:
    """The page with fenced code blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def _code_spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans, outside link labels (``[`x.md`](target)``: the link's target is what is checked)."""
    spans = []
    for i, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"!?\[[^\]]*\]\([^)]*\)", "", line)
        for m in re.finditer(r"(`+)(.+?)\1", line):
            spans.append((i, m.group(2).strip()))
    return spans


def _links(text: str) -> list[tuple[int, str]]:
    links = []
    for i, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(`+).+?\1", "", line)  # a link inside a code span is code, not a link
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            links.append((i, m.group(1)))
        m = re.match(r"\s*\[[^\]]+\]:\s*<?(\S+?)>?(\s|$)", line)
        if m:
            links.append((i, m.group(1)))
    return links


def github_slug(heading: str) -> str:
    s = re.sub(r"(`+)(.+?)\1", r"\2", heading.strip())          # code spans keep their text
    s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", s)             # links keep their text
    s = s.lower()
    s = "".join(ch for ch in s if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return s.replace(" ", "-")


def anchors(page: Path, text: str | None = None) -> set[str]:
    found, seen = set(), {}
    text = page.read_text(encoding="utf-8") if text is None else text
    for line in _strip_fences(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        found.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return found


@lru_cache(maxsize=None)
def _generated_roots() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(r"^clean:.*?\n\trm -rf ([^\n]+)", text, re.M)
    return frozenset(p.strip("/") for p in m.group(1).split() if "*" not in p and not p.startswith(".")) if m \
        else frozenset()


@lru_cache(maxsize=None)
def _repo_file_names() -> frozenset[str]:
    """Names of the files in the repository, outside hidden folders and the outputs ``make clean`` removes."""
    skip = _generated_roots()
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (Path(folder) == ROOT and d in skip)]
        names.update(files)
    return frozenset(names)


def looks_like_path(token: str) -> bool:
    if not token or any(c.isspace() for c in token) or PLACEHOLDER_CHARS & set(token):
        return False
    if token.startswith("-") or "://" in token or token.startswith(("http", "mailto:")):
        return False
    parts = [p for p in token.strip("/").split("/") if p not in ("", ".")]
    if "/" in token.strip("/"):
        return len(parts) >= 2
    return token.endswith(EXTENSIONS) and not token.startswith(".")


def _installed_package_file(rel: str) -> Path | None:
    """``rel`` inside another installed top-level package (e.g. nnunetv2/...), or None if that is not one."""
    top = rel.split("/")[0]
    if (ROOT / top).exists() or not top.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent / rel


def path_problem(token: str, page: Path, generated: frozenset[str], repo_names: frozenset[str]) -> str | None:
    """Why ``token`` (a path written in ``page``) does not resolve, or None when it does or is allowed."""
    rel = re.sub(r"(::.*|#.*|:\d+(-\d+)?)$", "", token).rstrip("/")
    if not rel:
        return None
    for base in (page.parent, ROOT):
        if (base / rel).exists():
            return None
    if rel.startswith("../shared/"):
        if not SHARED.is_dir() or (ROOT / rel).exists():
            return None
        return f"{token}: not in the shared folder {SHARED}"
    if "/" not in rel:
        if rel in OUTPUT_FILES or rel in repo_names:
            return None
        return f"{token}: no file of that name in the repository (nor a known output file)"
    if rel.split("/")[0] in generated:
        return None
    installed = _installed_package_file(rel)
    if installed is not None:
        return None if installed.exists() else f"{token}: not in the installed package ({installed})"
    return f"{token}: neither relative to {page.relative_to(ROOT)} nor to the repository root"


def module_problem(span: str) -> str | None:
    m = re.search(r"python -m ([\w.]+)", span)
    if not m:
        return None
    parts = m.group(1).split(".")
    if not (ROOT / parts[0]).is_dir():
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file():
        return None
    return f"`python -m {m.group(1)}`: no module {'/'.join(parts)}.py in the repository"


def link_problem(target: str, page: Path, own_anchors: set[str]) -> str | None:
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto: …
        return None
    path, _, anchor = target.partition("#")
    if not path:
        return None if not anchor or anchor in own_anchors else f"link {target}: no heading with that anchor here"
    dest = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    if not SHARED.is_dir() and os.path.normpath(dest).startswith(str(SHARED) + os.sep):
        return None  # the shared folder beside the repository is not part of a clone
    if not dest.exists():
        return f"link {target}: {dest} does not exist"
    if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"link {target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def problems_of(page: Path, text: str | None = None) -> list[str]:
    """The problems of ``page``; ``text``: check this text as if it were the page's (the file need not exist)."""
    generated, repo_names = _generated_roots(), _repo_file_names()
    raw = page.read_text(encoding="utf-8") if text is None else text
    own, text = anchors(page, raw), _strip_fences(raw)
    out = []
    for line, target in _links(text):
        p = link_problem(target, page, own)
        if p:
            out.append(f"{page.relative_to(ROOT)}:{line}: {p}")
    for line, span in _code_spans(text):
        p = module_problem(span)
        if p is None and looks_like_path(span):
            p = path_problem(span, page, generated, repo_names)
        if p:
            out.append(f"{page.relative_to(ROOT)}:{line}: {p}")
    return out


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_exist(page):
    problems = problems_of(page)
    assert not problems, "broken links or paths:\n" + "\n".join(problems)


def test_the_check_can_fail():
    """A made-up page with a broken link, anchor, path and module: each is reported, the good ones are not.
    The page is checked as if it were documentation/_made_up.md; nothing is written."""
    page = ROOT / "documentation" / "_made_up.md"
    text = ("# Title\n\nA [good link](README.md), a [broken one](how_to/no_such_page.md), a "
            "[bad anchor](getting_started.md#no-such-heading), a [good anchor](#title), [bad](#nope).\n"
            "Paths: `nnunet_diffusion/cli.py`, `nnunet_diffusion/no_such_file.py`, "
            "`nnunetv2/no_such_module.py`, `../shared/papers/NO_SUCH_PAPER.md`, `dataset.json`, "
            "`no_such_name.toml`, `<output>/samples/`, `nndiff_demo/compare/`, `residuals/`.\n"
            "Module: `python -m benchmarks.no_such_script`, `python -m benchmarks`.\n"
            "```bash\nls nnunet_diffusion/in_a_code_block.py\n```\n")
    problems = "\n".join(problems_of(page, text))
    assert "how_to/no_such_page.md" in problems
    assert "#no-such-heading" in problems
    assert "#nope" in problems
    assert "nnunet_diffusion/no_such_file.py" in problems
    assert "nnunetv2/no_such_module.py" in problems
    assert "no_such_name.toml" in problems
    assert "benchmarks.no_such_script" in problems
    if SHARED.is_dir():
        assert "NO_SUCH_PAPER.md" in problems
    for fine in ("README.md)", "#title", "nnunet_diffusion/cli.py", "dataset.json", "<output>", "nndiff_demo",
                 "residuals/", "in_a_code_block", "`python -m benchmarks`"):
        assert fine not in problems, fine
    assert len(problems.splitlines()) == 7 + SHARED.is_dir(), problems


def unlisted_pages(index: Path, text: str, docs: list[Path]) -> list[str]:
    """The pages of ``docs`` that the index page (``text`` at ``index``) does not link to."""
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in _links(_strip_fences(text))
              if t.partition("#")[0] and not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", t)}
    return [str(d.relative_to(ROOT)) for d in docs if d.resolve() not in linked and d != index]


def test_the_index_lists_every_page():
    index = ROOT / "documentation" / "README.md"
    docs = sorted((ROOT / "documentation").rglob("*.md"))
    missing = unlisted_pages(index, index.read_text(encoding="utf-8"), docs)
    assert not missing, f"documentation/README.md does not link to: {', '.join(missing)}"
    # and the check can fail: an index without its how-to links misses those pages
    text = "\n".join(line for line in index.read_text(encoding="utf-8").splitlines() if "how_to/" not in line)
    assert "documentation/how_to/run_grid.md" in unlisted_pages(index, text, docs)


def test_github_slugs():
    assert github_slug("Run the grid on a cluster or one machine") == "run-the-grid-on-a-cluster-or-one-machine"
    assert github_slug("Why torch and torchvision must be a matching pair") == \
        "why-torch-and-torchvision-must-be-a-matching-pair"
    assert github_slug("Phantoms: semi-synthetic BraTS-like cases") == "phantoms-semi-synthetic-brats-like-cases"
    assert github_slug("ReCoSeg's residual maps") == "recosegs-residual-maps"
    assert github_slug("The `nndiff` command") == "the-nndiff-command"
    assert github_slug("Let nnU-Net find the trainers") == "let-nnu-net-find-the-trainers"
