"""Every relative link and every repository path named in README.md and documentation/**/*.md exists, and no
code, config or page points at a repository file that does not exist or at a folder outside the repository.

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

   - paths inside another installed package, whose first part is an importable top-level module that is not a
     folder of this repository (``nnunetv2/utilities/find_objects.py``): checked inside that installed package.
   - outputs our commands create in the repository, i.e. paths under a folder that ``make clean`` removes
     (``nndiff_demo/``, ``bench_table/``, …; read from the Makefile).
   - bare names of files that nnU-Net or our tools write (``dataset.json``, ``summary.json`` …: OUTPUT_FILES), or
     that exist somewhere in the repository under that name (``RESULTS.md``).
   - a single folder name with a trailing slash (``residuals/``) is not a path and is not checked.

   A path or link outside the repository (``../shared/...``, ``../x/``) is reported: a reader of a clone cannot
   follow it. Cite a paper by authors, title, venue and arXiv id or DOI instead.
3. ``python -m a.b`` in an inline code span, where ``a`` is a folder of this repository: ``a/b.py``, ``a/b/__init__.py``
   or ``a/b/__main__.py`` exists.

Write example user paths with a placeholder (``<output>/samples/``, ``$nnUNet_raw/...``) or in a code block.

A second check (:func:`test_no_pointer_to_a_missing_file`) reads every file git tracks or would track (``git ls-files
--cached --others --exclude-standard``) that is a ``.py``, ``.md`` or ``.toml`` file or the Makefile, whole (code,
docstrings, comments, prose and code blocks alike), and reports:

- any mention of the papers' folder beside the repository (``shared`` + ``/papers``): it is not part of a clone;
- a repository path that does not exist. A token counts as a repository path when it is made of ``/``-separated
  names, ends in a file extension (.py/.md/.toml/.json/.cfg/.ini/.txt/.yaml/.yml/.sh) or in ``/`` (a folder), and its
  first name (after any leading ``./`` or ``../``) is a folder found relative to the repository root, to the package
  ``nnunet_diffusion/`` (docstrings write ``trainers/nndm.py``) or to the file's own folder (the ``../../`` links
  of the pages); it must then exist relative to one of those three. Not checked, so as not to flag what is not ours: paths whose first name is not
  one of our folders (``nnunetv2/...``, ``site-packages/...``, ``$nnUNet_results/...``, a user's ``out/x.json``); a
  path written as nnU-Net's (``nnU-Net's documentation/setting_up_paths.md``); paths under the outputs that
  ``make clean`` removes (``nndiff_demo/``, ``bench_table/``); a token followed by a placeholder (``tests/test_<head>.py``);
  extensionless tokens such as ``tests/demo`` (prose for "tests or demo"); made-up names in tests, which contain
  ``no_such``; and this file, whose made-up pages and examples name missing paths on purpose;
- a bare document name in capitals (``DESIGN.md``, ``RESULTS.md``, ``NOTES.txt``) that is no file's name in the
  repository, and in .md/.toml files and the Makefile a bare lower-case ``.md``/``.toml`` name that is neither a
  file of the repository nor a known output (OUTPUT_FILES).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTENSIONS = (".py", ".toml", ".md", ".json", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".sh")
PLACEHOLDER_CHARS = set("<>$*{}[]…~=|,()'\"")
# files nnU-Net or our commands write into datasets, result and output folders
OUTPUT_FILES = {"dataset.json", "dataset_fingerprint.json", "plans.json", "nnUNetPlans.json", "splits_final.json",
                "summary.json", "table.md", "conversion_report.json", "inference_instructions.txt",
                "debug.json", "progress.png", "README_PHANTOMS.txt"}


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


def _inside(path: Path) -> bool:
    """Whether ``path`` (not resolved: no symlinks followed) lies in the repository."""
    norm = os.path.normpath(path)
    return norm == str(ROOT) or norm.startswith(str(ROOT) + os.sep)


OUTSIDE = "outside the repository, which a clone does not have (cite a paper by authors, title, venue, arXiv id or DOI)"


def path_problem(token: str, page: Path, generated: frozenset[str], repo_names: frozenset[str]) -> str | None:
    """Why ``token`` (a path written in ``page``) does not resolve, or None when it does or is allowed."""
    rel = re.sub(r"(::.*|#.*|:\d+(-\d+)?)$", "", token).rstrip("/")
    if not rel:
        return None
    candidates = [base / rel for base in (page.parent, ROOT)]
    if any(_inside(c) and c.exists() for c in candidates):
        return None
    if not all(_inside(c) for c in candidates):
        return f"{token}: {OUTSIDE}"
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
    if not _inside(dest):
        return f"link {target}: {OUTSIDE}"
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
            "Outside: [the paper](../../shared/papers/NNDM.md).\n"
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
    assert "../shared/papers/NO_SUCH_PAPER.md: outside the repository" in problems
    assert "link ../../shared/papers/NNDM.md: outside the repository" in problems
    for fine in ("README.md)", "#title", "nnunet_diffusion/cli.py", "dataset.json", "<output>", "nndiff_demo",
                 "residuals/", "in_a_code_block", "`python -m benchmarks`"):
        assert fine not in problems, fine
    assert len(problems.splitlines()) == 9, problems


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


# ------------------------------------------------------------------ pointers in code, configs and pages (all files)
PAPERS_FOLDER = "shared" + "/papers"      # in two parts, so that this file does not name it
SCANNED_SUFFIXES = (".py", ".md", ".toml")
_EXT = "|".join(e.lstrip(".") for e in EXTENSIONS)
# ``/``-separated names, optionally after ``./`` or ``../``; not when glued to a word, a URL, a placeholder or a path
_PATH_TOKEN = re.compile(r"(?<![\w.~$<>{}/@:\\-])((?:\.{1,2}/)*(?:[A-Za-z_][\w.-]*/)+(?:[\w][\w.-]*)?)")
_CAPS_NAME = re.compile(r"(?<![\w.~$<>{}/@:\\-])([A-Z][A-Z0-9_]*\.(?:md|txt|toml|cfg|rst))(?![\w/])")
_LOWER_NAME = re.compile(r"(?<![\w.~$<>{}/@:\\-])([a-z_][\w-]*\.(?:md|toml))(?![\w/])")
_NNUNET_OWNED = re.compile(r"(nnU-Net's|nnunetv2's|nnunetv2)\s*$")


def scanned_files() -> list[Path]:
    """The .py/.md/.toml files and the Makefile that git tracks or would track (not ignored); without git, those
    of a walk of the repository outside hidden folders, caches and the outputs ``make clean`` removes."""
    this = Path(__file__).resolve()
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = [ROOT / r for r in out.split("\0") if r]
    except (OSError, subprocess.CalledProcessError):
        skip, files = _generated_roots(), []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__" and not d.endswith(".egg-info")
                       and not (Path(folder) == ROOT and d in skip)]
            files += [Path(folder) / n for n in names]
    return sorted(f for f in files if (f.suffix in SCANNED_SUFFIXES or f.name == "Makefile") and f.is_file()
                  and f.resolve() != this)


def _owned_by_nnunet(before: str) -> bool:
    """Whether the text just before a path introduces it as nnU-Net's (``nnU-Net's documentation/x.md``), also
    across a string split over two lines (``"... (nnU-Net's "`` / ``f"documentation/x.md"``)."""
    before = re.sub(r"[\"']\s*\n\s*[rbfuRBFU]*[\"']", "", before[-80:])
    return bool(_NNUNET_OWNED.search(before.rstrip().rstrip("`(")))


def pointer_problems(rel: str, text: str) -> list[str]:
    """The problems of the file ``rel`` (relative to the repository root) whose content is ``text``: a mention of
    the papers' folder beside the repository, a missing repository path or document name (module docstring)."""
    where = ROOT / rel
    bases = (ROOT, ROOT / "nnunet_diffusion", where.parent)
    generated, names = _generated_roots(), _repo_file_names() | {f.name for f in scanned_files()}
    prose = where.suffix in (".md", ".toml") or where.name == "Makefile"
    out = []

    def report(pos: int, what: str):
        out.append(f"{rel}:{text.count(chr(10), 0, pos) + 1}: {what}")

    for m in re.finditer(re.escape(PAPERS_FOLDER), text):
        report(m.start(), f"names {PAPERS_FOLDER}, a folder beside the repository that a clone does not have: cite "
                          "the paper (authors, title, venue, arXiv id or DOI) or link its explanation page")
    for m in _PATH_TOKEN.finditer(text):
        token = m.group(1).rstrip(".-")
        folder = token.endswith("/")
        if not (folder or re.search(rf"\.({_EXT})$", token)) or "no_such" in token.lower():
            continue
        if text[m.end():m.end() + 1] in set("<{*$[") or _owned_by_nnunet(text[:m.start()]):
            continue
        parts = [p for p in token.rstrip("/").split("/") if p not in (".", "..")]
        if not parts or parts[0] in generated or not any((b / parts[0]).is_dir() for b in bases):
            continue
        if any(_inside(b / token) and (b / token).exists() for b in bases):
            continue
        report(m.start(), f"{token}: no such {'folder' if folder else 'file'} in the repository "
                          f"(relative to the root, to nnunet_diffusion/ or to {where.parent.relative_to(ROOT)}/)")
    for regex, applies in ((_CAPS_NAME, True), (_LOWER_NAME, prose)):
        if not applies:
            continue
        for m in regex.finditer(text):
            name = m.group(1)
            if name not in names and name not in OUTPUT_FILES and "no_such" not in name.lower():
                report(m.start(), f"{name}: no file of that name in the repository")
    return out


def test_no_pointer_to_a_missing_file():
    problems = [p for f in scanned_files()
                for p in pointer_problems(str(f.relative_to(ROOT)), f.read_text(encoding="utf-8"))]
    assert not problems, "pointers to files that do not exist:\n" + "\n".join(problems)


def test_the_pointer_check_can_fail():
    """A made-up module, as if it were nnunet_diffusion/heads/_made_up.py (nothing is written): its pointers to
    missing files are reported, the good ones and those that are not ours are not."""
    text = ('"""A head (Doe 2030; ../' + PAPERS_FOLDER + '/DOE.md); variants are generated (see\n'
            '``trainers/registry.py``) as in DESIGN.md and in README.md. The loss: heads/nndm.py, ../nets/ddmd.py,\n'
            'trainer_configs/nndm.toml, documentation/explanation/; missing: documentation/nowhere/ and\n'
            'nnunet_diffusion/heads/gone.py. Not ours: nnunetv2/training/foo.py, nnU-Net\'s documentation/\n'
            'setting_up_paths.md, site-packages/x/y.py, tests/test_<head>.py, tests/demo, nndiff_demo/compare/x.json,\n'
            'https://example.org/trainers/z.py, $nnUNet_results/trainers/x.json, summary.json, a.md.\n"""\n'
            'msg = ("nnU-Net\'s "\n       f"documentation/how_to_use_nnunet.md")\n')
    problems = "\n".join(pointer_problems("nnunet_diffusion/heads/_made_up.py", text))
    for bad in (f"names {PAPERS_FOLDER}", "trainers/registry.py: no such file", "DESIGN.md: no file",
                "documentation/nowhere/: no such folder", "nnunet_diffusion/heads/gone.py: no such file"):
        assert bad in problems, (bad, problems)
    assert len(problems.splitlines()) == 5, problems
    assert problems.startswith("nnunet_diffusion/heads/_made_up.py:1: names"), problems
    # in a page or a config, a bare lower-case page or config name is checked too
    page = "\n".join(pointer_problems("documentation/_made_up.md", "See nndm.toml, table.md and gone.md.\n"))
    assert "gone.md: no file" in page and "nndm.toml" not in page and "table.md" not in page, page
