"""The module map in docs/ARCHITECTURE.md is checked against the real imports: every module
has a row, each row's "depends on" cell names exactly the moecore modules it imports, the
import graph has no cycle, and imports sit at the top of their module.

When the table's dependencies are stale the test rewrites that column (the "owns" text is
left alone) and fails, so the regenerated file can be reviewed and committed."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "moecore"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
ROW = re.compile(r"^\| `moecore/(?P<path>[^`]+)` \|(?P<owns>.*)\|(?P<deps>[^|]*)\|\s*$")
EXTERNAL_ORDER = ("torch", "transformers", "accelerate", "safetensors", "hqq", "tqdm", "rich", "yaml", "numpy")


def modules() -> dict[str, Path]:
    """Dotted name below ``moecore`` (``"maths.fit"``, ``"cli"`` for ``cli/__init__.py``) -> file."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts) or "__init__"] = f
    return out


def doc_path(name: str, files: dict[str, Path]) -> str:
    return str(files[name].relative_to(PKG))


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, names: set[str]) -> set[str]:
    """moecore modules an import statement in module ``mod`` refers to."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.startswith("moecore."):
                found.add(a.name[len("moecore."):])
        return {n for n in found if n in names}
    is_pkg = modules_files[mod].name == "__init__.py"
    if node.level:
        base = mod.split(".") if (is_pkg and mod != "__init__") else mod.split(".")[:-1]
        if mod == "__init__":
            base = []
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    elif node.module and (node.module == "moecore" or node.module.startswith("moecore.")):
        base = []
        node = ast.ImportFrom(module=node.module[len("moecore"):].lstrip(".") or None, names=node.names, level=1)
    else:
        return set()
    target = ".".join(base + (node.module.split(".") if node.module else []))
    for a in node.names:
        sub = f"{target}.{a.name}" if target else a.name
        if sub in names:
            found.add(sub)
        elif target in names:
            found.add(target)
        elif target == "":
            pass  # ``from moecore import __version__``: the package itself
    return found


modules_files = modules()


def imports() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(all moecore deps per module, module-level deps per module, function-level import sites)."""
    names = set(modules_files)
    deps: dict[str, set[str]] = {}
    top: dict[str, set[str]] = {}
    nested: list[str] = []
    for mod, f in modules_files.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        deps[mod], top[mod] = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = _resolve(mod, node, names) - {mod}
                deps[mod] |= found
        for node in tree.body:
            stmts = [node]
            if isinstance(node, (ast.If, ast.Try)):
                stmts = list(ast.walk(node))
            for s in stmts:
                if isinstance(s, (ast.Import, ast.ImportFrom)):
                    top[mod] |= _resolve(mod, s, names) - {mod}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in ast.walk(fn):
                    if isinstance(s, (ast.Import, ast.ImportFrom)):
                        nested.append(f"{f.relative_to(ROOT)}:{s.lineno}")
    return deps, top, nested


def _cell(mod: str, deps: set[str], old: str) -> str:
    """The regenerated "depends on" cell: moecore modules (sorted), then the external libraries
    the old cell named (kept: the AST check covers moecore modules only)."""
    ext = [w for w in re.findall(r"[A-Za-z_][\w.]*", old) if w in EXTERNAL_ORDER]
    parts = sorted(deps) + [e for e in EXTERNAL_ORDER if e in ext]
    return " " + (", ".join(parts) if parts else "–") + " "


def test_architecture_doc_lists_every_module_with_its_real_dependencies():
    deps, _, _ = imports()
    by_path = {doc_path(m, modules_files): m for m in modules_files}
    lines = DOC.read_text(encoding="utf-8").splitlines()
    seen, new_lines, stale = set(), [], []
    for line in lines:
        m = ROW.match(line)
        if m and m["path"] in by_path:
            mod = by_path[m["path"]]
            seen.add(mod)
            cell = _cell(mod, deps[mod], m["deps"])
            listed = {w for w in re.findall(r"[A-Za-z_][\w.]*", m["deps"]) if w in modules_files}
            if listed != deps[mod]:
                stale.append(f"{m['path']}: doc {sorted(listed)} != imports {sorted(deps[mod])}")
                line = f"| `moecore/{m['path']}` |{m['owns']}|{cell}|"
        new_lines.append(line)
    missing = sorted(doc_path(m, modules_files) for m in set(modules_files) - seen)
    if stale:
        DOC.write_text("\n".join(new_lines) + "\n", encoding="utf-8")
    assert not missing, f"docs/ARCHITECTURE.md has no row for: {missing}"
    assert not stale, "docs/ARCHITECTURE.md dependencies were stale (column regenerated, review and commit):\n" + "\n".join(stale)


def test_no_import_cycles():
    _, top, _ = imports()
    # the package __init__ re-exports the public API; a module importing the package itself
    # (``from moecore import __version__``) is not an edge into the API modules
    graph = {m: {d for d in ds if d != "__init__"} for m, ds in top.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_sit_at_the_top_of_their_module():
    _, _, nested = imports()
    assert nested == [], ("imports inside functions (put them at the top; optional dependencies go "
                          "through moecore.optional.require):\n" + "\n".join(nested))


#: the most lines a source file of the package may have (issue 19: "a few hundred lines at most")
MAX_LINES = 400


def test_no_source_file_is_over_the_line_limit():
    src = ROOT / "src" / "moecore"
    long = {str(p.relative_to(src)): n for p in sorted(src.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them by job): {long}"
