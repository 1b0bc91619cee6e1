"""The import graph of the installed package ``nnunet_diffusion``, read from its source with ``ast``: no import circle,
nothing imported from above it, and no upward import between its layers (issue 35, part 3).

The graph holds every module setup.py installs (its ``PACKAGES`` with ``package_dir``, so the top-level
``dataset_conversion/`` is ``nnunet_diffusion.dataset_conversion``, plus the ``.py`` files of ``package_data``: the
``nnunet_ext`` folder nnU-Net's trainer lookup imports) and every import in them, wherever it stands (module level,
inside a function, a method, a ``try`` or an ``if TYPE_CHECKING``): ``import a.b``, ``from a import b`` (an edge to
the submodule ``a.b`` when it is one, else to ``a``), relative imports of any level, and
``importlib.import_module("literal")`` / ``__import__("literal")`` / ``runpy.run_module("literal")``. A dynamic
import whose name is not a literal cannot be read, so the package may not have one.

Nothing above the package: the installed package never imports ``benchmarks``, ``devtools`` or ``tests`` (which
are not installed), nor the checkout's folders by their bare names (``dataset_conversion``, ``trainer_configs``:
installed under ``nnunet_diffusion.``), neither by an import nor through ``sys.path`` (no ``sys.path`` change, no
``site.addsitedir``, no string naming one of those packages). Above it, ``devtools`` may import ``benchmarks`` and
the package, ``benchmarks`` the package only: one way, and no circle among the modules of the three together.

The layers, bottom first (:data:`LAYERS`; a module belongs to the layer with the longest matching prefix). A module
may import its own layer and any layer of a lower tier; layers of the same tier are independent of each other. A
module that is in no layer fails the test: place it.

====  ====================  ============================================================================================
tier  layer                 modules (what they are; what they import)
====  ====================  ============================================================================================
0     foundation            ``errors``, ``atomic``, the package's ``__init__``, ``trainer_configs`` (data): nothing
1     diffusion             ``diffusion/``: noise schedules, loss, the sampling loop (pure torch)
1     nets                  ``nets/``: denoisers and the papers' network modules
1     evaluation            ``evaluation/``: metrics, tables, pictures (numpy, SimpleITK)
1     dataset_conversion    ``dataset_conversion/``: BraTS layout, phantoms, synthetic data
1     nnunet_compat         ``nnunet_compat``: the one adapter to nnU-Net's private internals
2     spec                  ``spec``: the typed-spec machinery (keys, ranges, parsing); uses diffusion's names
3     heads                 ``heads/``: each paper's method as plain torch, and its spec class
4     configuration         ``registry`` (the one list of heads and their specs), ``config`` (the TOMLs' front)
5     inference             ``inference/``: the networks nnU-Net's predictor calls, predict-time options and the
                            second passes over whole cases (maps, samples); built by the trainers, never importing them
6     variables             ``variables``: the catalogue of environment variables (it lists inference's ENV_VARS)
7     trainers              ``trainers/``: the nnUNetTrainer subclasses, which build the inference networks
8     orchestration         ``budget`` (optimiser budgets of trainers), ``environment`` (nnU-Net's console scripts)
9     commands              ``cli``, ``demo``, ``grid`` and the ``nnunet_ext`` module nnU-Net imports
====  ====================  ============================================================================================

The self-tests (``test_the_reader_*``, ``test_*_is_caught``) feed the reader small made-up sources, so this file
cannot pass by reading nothing.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "nnunet_diffusion"

LAYERS: tuple[dict[str, tuple[str, ...]], ...] = (
    # tiers, bottom first: {layer: module prefixes, relative to the package ("" is the package's own __init__)}
    {"foundation": ("", "errors", "atomic", "trainer_configs")},
    {"diffusion": ("diffusion",), "nets": ("nets",), "evaluation": ("evaluation",),
     "dataset_conversion": ("dataset_conversion",), "nnunet_compat": ("nnunet_compat",)},
    {"spec": ("spec",)},
    {"heads": ("heads",)},
    {"configuration": ("registry", "config")},
    {"inference": ("inference",)},
    {"variables": ("variables",)},
    {"trainers": ("trainers",)},
    {"orchestration": ("budget", "environment")},
    {"commands": ("cli", "demo", "grid", "nnunet_ext")},
)

# Import circles tolerated for now, each the exact set of modules of one circle (relative names, e.g.
# frozenset({"inference.recoseg_network", "inference.recoseg_residuals"})). Every other circle fails, and an entry
# that is no longer a circle fails too (test_known_circles_still_exist), so this set only ever shrinks: keep it empty.
KNOWN: set[frozenset[str]] = set()

ABOVE = ("benchmarks", "devtools", "tests")
"""Top-level packages of the checkout that are not installed and stand above the package."""
CHECKOUT_ONLY = ("dataset_conversion", "trainer_configs")
"""Folders of the checkout installed under ``nnunet_diffusion.``: their bare names do not exist once installed."""
TOP_LEVEL_ALLOWED = {"devtools": {"benchmarks", PACKAGE}, "benchmarks": {PACKAGE}, PACKAGE: set()}
"""Of the package and the top-level packages above it, which each may import (``tests`` none of them may)."""

DYNAMIC_IMPORTS = ("import_module", "__import__", "run_module")
_ABOVE_NAME = re.compile(r"^(%s)(\.\w+)*$" % "|".join(ABOVE))


# ================================================================================================ the reader
@dataclass(frozen=True)
class Import:
    """One import in a module: the absolute dotted name it imports (``from a import b``: ``a.b``), its line, and
    how (``import``, ``from``, ``import_module``, ``__import__``, ``run_module``)."""
    target: str
    line: int
    how: str


@dataclass(frozen=True)
class Finding:
    """Something in a module that reaches outside the graph: a ``sys.path`` change, a string naming a package
    above, a dynamic import the reader cannot resolve."""
    line: int
    what: str


def resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in ``module`` (a package's ``__init__`` when
    ``is_package``)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(base):
        raise ValueError(f"{module}: relative import of level {level} goes above the top-level package")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dynamic_target(call: ast.Call, module: str, is_package: bool) -> str | None:
    """What ``import_module(name, package)`` (or ``__import__``, ``run_module``) imports: ``name`` when it is a
    literal; ``<package>.*`` (every module of that package) for an f-string whose literal start names the package,
    e.g. ``import_module(f".{name}", __name__)`` in a package's ``__init__``; None when it cannot be read."""
    arg = call.args[0]
    if _literal(arg) is not None:
        name, pattern = _literal(arg), False
    elif isinstance(arg, ast.JoinedStr):
        start = ""
        for part in arg.values:
            if _literal(part) is None:
                break
            start += part.value
        dots = len(start) - len(start.lstrip("."))
        package_named = start[dots:].rpartition(".")[0]   # f"a.b.{x}" -> a.b; f".{x}" -> "" (the dots name it)
        if not dots and not package_named:
            return None
        name, pattern = "." * dots + package_named, True
    else:
        return None
    if name.startswith("."):
        package = next((k.value for k in call.keywords if k.arg == "package"), None)
        if package is None and len(call.args) > 1:
            package = call.args[1]
        if _literal(package) is not None:
            base, base_is_package = package.value, True
        elif isinstance(package, ast.Name) and package.id == "__name__":
            base, base_is_package = module, True     # importlib resolves relative to the name given
        elif package is None or (isinstance(package, ast.Name) and package.id == "__package__"):
            base, base_is_package = module, is_package
        else:
            return None
        level = len(name) - len(name.lstrip("."))
        name = resolve_relative(base, base_is_package, level, name.lstrip(".") or None)
    return name + ".*" if pattern else name


def _is_sys_path(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
        and node.value.id == "sys"


def read_module(source: str, module: str, is_package: bool = False) -> tuple[list[Import], list[Finding]]:
    """Every import of ``source`` (the module ``module``) wherever it stands, and the findings (see
    :class:`Finding`). Docstrings are not findings."""
    tree = ast.parse(source)
    imports, findings = [], []
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and _literal(n.body[0].value) is not None}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [Import(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            imports += [Import(base if a.name == "*" else f"{base}.{a.name}", node.lineno, "from")
                        for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in DYNAMIC_IMPORTS and node.args:
                target = _dynamic_target(node, module, is_package)
                if target is None:
                    findings.append(Finding(node.lineno, f"{name}() of a name that is neither a literal string nor "
                                                         f"an f-string starting with its package"))
                else:
                    imports.append(Import(target, node.lineno, name))
            elif isinstance(f, ast.Attribute) and _is_sys_path(f.value):
                findings.append(Finding(node.lineno, f"sys.path.{f.attr}()"))
            elif isinstance(f, ast.Attribute) and f.attr == "addsitedir":
                findings.append(Finding(node.lineno, "site.addsitedir()"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                    findings.append(Finding(node.lineno, "an assignment to sys.path"))
        elif isinstance(node, ast.Constant) and id(node) not in docstrings and isinstance(node.value, str) \
                and _ABOVE_NAME.match(node.value):
            findings.append(Finding(node.lineno, f"the string {node.value!r} (a path or module name above the "
                                                 f"package)"))
    return sorted(imports, key=lambda i: i.line), sorted(findings, key=lambda f: f.line)


# ================================================================================================ the graph
def _setup_layout(repo: Path) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """``PACKAGES``, ``package_dir`` and ``package_data`` of setup.py, read with ast (literals only)."""
    tree = ast.parse((repo / "setup.py").read_text(encoding="utf-8"))
    packages, package_dir, package_data = None, {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PACKAGES" for t in node.targets):
            packages = ast.literal_eval(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "package_dir":
            package_dir = ast.literal_eval(node.value)
        elif isinstance(node, ast.keyword) and node.arg == "package_data":
            package_data = ast.literal_eval(node.value)
    assert packages, "setup.py: no PACKAGES = [...] list found (tests/test_architecture.py reads the packages there)"
    return packages, package_dir, package_data


def installed_modules(repo: Path = REPO) -> dict[str, Path]:
    """Every module setup.py installs: its dotted name -> its source file."""
    packages, package_dir, package_data = _setup_layout(repo)
    folders = {pkg: repo / package_dir.get(pkg, pkg.replace(".", "/")) for pkg in packages}
    out = {}
    for pkg, folder in folders.items():
        for py in sorted(folder.glob("*.py")):
            out[pkg if py.name == "__init__.py" else f"{pkg}.{py.stem}"] = py
    for pkg, patterns in package_data.items():
        for pattern in patterns:
            for py in sorted(folders[pkg].glob(pattern)):
                if py.suffix == ".py":
                    rel = py.relative_to(folders[pkg]).with_suffix("")
                    out[".".join([pkg, *rel.parts])] = py
    return out


def checkout_modules(repo: Path = REPO, tops=("benchmarks", "devtools")) -> dict[str, Path]:
    """The modules of the checkout's top-level packages ``tops`` (not installed)."""
    out = {}
    for top in tops:
        for py in sorted((repo / top).rglob("*.py")):
            rel = py.relative_to(repo).with_suffix("").parts
            out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = py
    return out


def _owner(name: str, modules) -> str | None:
    """The module of ``modules`` that importing ``name`` reaches: ``name`` itself, or the nearest enclosing one
    (``pkg.mod.attr`` -> ``pkg.mod``); None outside ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def build_graph(sources: dict[str, tuple[str, bool]]) -> tuple[dict, dict]:
    """``sources``: module -> (source text, is a package's __init__). Returns (edges: module -> {imported module
    -> the first Import of it}, everything read: module -> (imports, findings))."""
    read = {m: read_module(text, m, is_pkg) for m, (text, is_pkg) in sources.items()}
    edges = {}
    for m, (imports, _) in read.items():
        edges[m] = {}
        for imp in imports:
            if imp.target.endswith(".*"):   # a dynamic import of any module of a package: every one of them
                base = imp.target[:-2]
                targets = [t for t in sources if t == base or t.startswith(base + ".")]
            else:
                targets = [_owner(imp.target, sources)]
            for target in targets:
                if target is not None and target != m:
                    edges[m].setdefault(target, imp)
    return edges, read


def _sources(modules: dict[str, Path]) -> dict[str, tuple[str, bool]]:
    return {m: (p.read_text(encoding="utf-8"), p.name == "__init__.py") for m, p in modules.items()}


def circles(edges: dict) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected component of more than
    one module (Tarjan), found by a breadth-first search back to the component's first module."""
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):  # iterative Tarjan
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == node:
                            break
                    comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    out = []
    for comp in comps:
        if len(comp) < 2:
            continue
        start = min(comp)
        paths, seen = {start: [start]}, set()
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    out.append(paths[v] + [start])
                    queue = []
                    break
                if w in comp and w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return out


def describe_circle(circle: list[str], edges: dict, files: dict[str, Path]) -> str:
    steps = []
    for a, b in zip(circle, circle[1:]):
        where = files.get(a)
        where = where.relative_to(REPO).as_posix() if isinstance(where, Path) and where.is_relative_to(REPO) \
            else a
        steps.append(f"{a} ({where}:{edges[a][b].line})")
    return " -> ".join(steps + [circle[-1]])


def layer_of(module: str) -> tuple[int, str] | None:
    """(tier, layer) of a package module (absolute name) by the longest matching prefix of :data:`LAYERS`."""
    rel = "" if module == PACKAGE else module.removeprefix(PACKAGE + ".")
    best = None
    for tier, layers in enumerate(LAYERS):
        for layer, prefixes in layers.items():
            for p in prefixes:
                if (rel == p if p == "" else rel == p or rel.startswith(p + ".")) and \
                        (best is None or len(p) > best[0]):
                    best = (len(p), tier, layer)
    return None if best is None else best[1:]


def upward_imports(edges: dict, files: dict) -> list[str]:
    """Every import of a module by one of a layer it may not import: a higher tier, or another layer of its tier."""
    problems = []
    for a, targets in sorted(edges.items()):
        la = layer_of(a)
        for b, imp in sorted(targets.items()):
            lb = layer_of(b)
            if la is None or lb is None or la[1] == lb[1] or lb[0] < la[0]:
                continue
            kind = "a higher layer" if lb[0] > la[0] else "a layer of the same tier"
            problems.append(f"{_where(a, files, imp.line)}: {a} (layer {la[1]}, tier {la[0]}) imports {b} (layer "
                            f"{lb[1]}, tier {lb[0]}): {kind}")
    return problems


def _where(module: str, files: dict, line: int) -> str:
    path = files.get(module)
    return f"{path.relative_to(REPO).as_posix() if isinstance(path, Path) else module}:{line}"


def _rel(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


@pytest.fixture(scope="module")
def package():
    files = installed_modules()
    edges, read = build_graph(_sources(files))
    return files, edges, read


# ================================================================================================ self-tests
def test_the_reader_sees_every_import_form():
    source = '''
import os, alpha.beta
import gamma.delta as gd
from epsilon import zeta, eta as e
from . import sibling
from .. import uncle
from ..cousin.deep import thing
from ... import top_level_thing
from .pkg import *
import importlib
from importlib import import_module

def function():
    import in_function
    class Inner:
        def method(self):
            from in_method import x
    return importlib.import_module("literal.name")

try:
    import in_try
except ImportError:
    from in_except import y
if TYPE_CHECKING:
    from type_only import Z
lambda: import_module(".relative", package="pkg.sub")
il = importlib
il.import_module("through.an.alias")
__import__("dunder")
runpy.run_module("run.me")
import_module("..up", "a.b.c")
import_module(f".{name}", __name__)
import_module(f"every.module.of.{name}")
import_module(f"..sub.{name}", package=__package__)
'''
    imports, findings = read_module(source, "a.b.c.mod")
    got = {(i.target, i.how) for i in imports}
    expected = {("os", "import"), ("alpha.beta", "import"), ("gamma.delta", "import"), ("epsilon.zeta", "from"),
                ("epsilon.eta", "from"), ("a.b.c.sibling", "from"), ("a.b.uncle", "from"),
                ("a.b.cousin.deep.thing", "from"), ("a.top_level_thing", "from"), ("a.b.c.pkg", "from"),
                ("importlib", "import"), ("importlib.import_module", "from"), ("in_function", "import"),
                ("in_method.x", "from"), ("literal.name", "import_module"), ("in_try", "import"),
                ("in_except.y", "from"), ("type_only.Z", "from"), ("pkg.sub.relative", "import_module"),
                ("through.an.alias", "import_module"), ("dunder", "__import__"), ("run.me", "run_module"),
                ("a.b.up", "import_module"), ("a.b.c.mod.*", "import_module"),
                ("every.module.of.*", "import_module"), ("a.b.sub.*", "import_module")}
    assert got == expected, (sorted(got - expected), sorted(expected - got))
    assert findings == []
    # in a package's __init__, "." is the package itself
    init, _ = read_module("from . import child\nfrom .. import parent\n", "a.b", is_package=True)
    assert [i.target for i in init] == ["a.b.child", "a.parent"]
    with pytest.raises(ValueError, match="above the top-level package"):
        read_module("from ... import x\n", "a.b")


def test_the_reader_sees_sys_path_changes_strings_above_and_unreadable_imports():
    source = '''"""A docstring may say benchmarks."""
import sys, site, importlib
ROOT = "somewhere"
sys.path.insert(0, str(ROOT))
sys.path.append(ROOT)
sys.path[:0] = [ROOT]
sys.path += [ROOT]
sys.path = [ROOT]
site.addsitedir(ROOT)
folder = ROOT / "benchmarks"
name = "devtools.docs"
importlib.import_module(name)
__import__(f"{name}")
import_module(f"prefix{name}")
text = "tests: not a module name"
'''
    _, findings = read_module(source, "pkg.mod")
    assert [(f.line, f.what.split(" (")[0]) for f in findings] == [
        (4, "sys.path.insert()"), (5, "sys.path.append()"), (6, "an assignment to sys.path"),
        (7, "an assignment to sys.path"), (8, "an assignment to sys.path"), (9, "site.addsitedir()"),
        (10, "the string 'benchmarks'"), (11, "the string 'devtools.docs'"),
        (12, "import_module() of a name that is neither a literal string nor an f-string starting with its package"),
        (13, "__import__() of a name that is neither a literal string nor an f-string starting with its package"),
        (14, "import_module() of a name that is neither a literal string nor an f-string starting with its package")]


def test_the_graph_resolves_submodules_attributes_and_leaves_out_the_outside():
    sources = {"p": ("from . import a\nfrom .a import helper\n", True), "q": ("", True), "q.x": ("", False),
               "q.y": ("", False), "r": ("import importlib\nimportlib.import_module(f'.{n}', __name__)\n", True),
               "r.one": ("", False), "r.two": ("", False),
               "p.a": ("import p.b.c\nfrom p.b import c, CONSTANT\nimport numpy\nfrom . import b\n", False),
               "p.b": ("", True), "p.b.c": ("from ..a import x\n", False)}
    edges, _ = build_graph(sources)
    assert {m: sorted(t) for m, t in edges.items() if m[0] == "p"} == {
        "p": ["p.a"], "p.a": ["p.b", "p.b.c"], "p.b": [], "p.b.c": ["p.a"]}
    assert sorted(edges["r"]) == ["r.one", "r.two"]   # a dynamic import of its own modules: all of them
    assert circles(edges) == [["p.a", "p.b.c", "p.a"]]
    assert circles({"x": {"y": None}, "y": {}}) == []


def test_a_circle_and_an_upward_import_added_to_the_package_are_caught(package):
    """The checks on the real graph with one made-up module added: ``inference/`` importing ``trainers/`` (upward)
    and ``errors`` importing it back (a circle through the package)."""
    files, _, _ = package
    sources = _sources(files)
    sources[f"{PACKAGE}.inference.made_up"] = ("def f():\n    from ..trainers import TRAINERS\n", False)
    sources[f"{PACKAGE}.errors"] = (sources[f"{PACKAGE}.errors"][0] +
                                    "\ndef g():\n    from .inference import made_up\n", False)
    edges, _ = build_graph(sources)
    upward = upward_imports(edges, files)
    (ti, _), (tt, _) = layer_of(f"{PACKAGE}.inference"), layer_of(f"{PACKAGE}.trainers")
    assert any(f"{PACKAGE}.inference.made_up (layer inference, tier {ti}) imports {PACKAGE}.trainers (layer "
               f"trainers, tier {tt}): a higher layer" in p for p in upward), upward
    assert any(f"{PACKAGE}.errors (layer foundation" in p for p in upward), upward
    found = [set(c) for c in circles(edges)]
    assert any({f"{PACKAGE}.errors", f"{PACKAGE}.inference.made_up"} <= c for c in found), found


# ================================================================================================ the package
def test_the_graph_holds_the_whole_package(package):
    """Every .py file of the package's folders is a module of the graph, and the graph has the edges it must have:
    the reader did not read nothing."""
    files, edges, _ = package
    on_disk = {p.resolve() for folder in ("nnunet_diffusion", "dataset_conversion")
               for p in (REPO / folder).rglob("*.py")}
    missing = sorted(p.relative_to(REPO).as_posix() for p in on_disk - {p.resolve() for p in files.values()})
    assert not missing, f"files setup.py does not install (or this test does not read): {missing}"
    assert len(files) >= 60 and sum(map(len, edges.values())) >= 150, (len(files), sum(map(len, edges.values())))
    for a, b in (("cli", "trainers"), ("trainers.nndm", "heads.nndm"), ("trainers", "trainers.nndm"),
                 ("nnunet_ext.nnunet_diffusion_trainers", "trainers"),
                 ("dataset_conversion.phantoms", "dataset_conversion.brats"), ("inference.nndm_network", "diffusion")):
        assert f"{PACKAGE}.{b}" in edges[f"{PACKAGE}.{a}"], f"the reader lost the import {a} -> {b}"


def test_no_import_circle_in_the_package(package):
    files, edges, _ = package
    found = [c for c in circles(edges) if frozenset(map(_rel, c[:-1])) not in KNOWN]
    assert not found, "import circles in nnunet_diffusion (break each: move the shared piece down a layer, or " \
                      "pass it in):\n" + "\n".join(describe_circle(c, edges, files) for c in found)


def test_known_circles_still_exist(package):
    """The allow-list :data:`KNOWN` holds only circles that are still there: remove an entry once it is broken."""
    _, edges, _ = package
    present = {frozenset(map(_rel, c[:-1])) for c in circles(edges)}
    stale = [sorted(k) for k in KNOWN if k not in present]
    assert not stale, f"no longer a circle, remove it from KNOWN in tests/test_architecture.py: {stale}"


def test_the_package_imports_nothing_above_it(package):
    files, _, read = package
    problems = []
    for m, (imports, findings) in sorted(read.items()):
        problems += [f"{_where(m, files, i.line)}: imports {i.target} ({i.how})" for i in imports
                     if i.target.split(".")[0] in ABOVE + CHECKOUT_ONLY]
        problems += [f"{_where(m, files, f.line)}: {f.what}" for f in findings]
    assert not problems, "the installed package reaches above itself (benchmarks, devtools and tests are not " \
                         "installed; dataset_conversion and trainer_configs are nnunet_diffusion.<name>):\n" + \
                         "\n".join(problems)


def test_every_module_has_a_layer(package):
    files, _, _ = package
    unplaced = sorted(m for m in files if layer_of(m) is None)
    assert not unplaced, f"modules in no layer: {unplaced}; add each to LAYERS in tests/test_architecture.py " \
                         f"(and its docstring's table), in the lowest tier whose modules it needs"


def test_no_upward_import_between_layers(package):
    files, edges, _ = package
    problems = upward_imports(edges, files)
    assert not problems, "upward imports (see the layers in tests/test_architecture.py's docstring; move the " \
                         "needed piece down, or let the caller pass it in):\n" + "\n".join(problems)


# ================================================================================================ above the package
def test_devtools_and_benchmarks_stand_above_the_package_one_way():
    """devtools -> benchmarks -> nnunet_diffusion, never back; and no circle among their modules together."""
    files = {**installed_modules(), **checkout_modules()}
    assert any(m.startswith("devtools.") for m in files) and any(m.startswith("benchmarks.") for m in files)
    sources = _sources(files)
    edges, read = build_graph(sources)
    problems = []
    for m, (imports, _) in sorted(read.items()):
        top = m.split(".")[0]
        for i in imports:
            target = i.target.split(".")[0]
            if target in {PACKAGE, *ABOVE} and target != top and target not in TOP_LEVEL_ALLOWED[top]:
                problems.append(f"{_where(m, files, i.line)}: {top} imports {i.target}")
    assert not problems, "devtools may import benchmarks and nnunet_diffusion, benchmarks only nnunet_diffusion:\n" \
                         + "\n".join(problems)
    found = [c for c in circles(edges) if frozenset(map(_rel, c[:-1])) not in KNOWN]
    assert not found, "import circles:\n" + "\n".join(describe_circle(c, edges, files) for c in found)
    assert f"{PACKAGE}.cli" in edges["devtools.docs"] and "benchmarks.table" in edges["devtools.docs"]
