"""Imports inside pikv/ point one way (docs/architecture.md, "Layers") and form no circle.

Every import statement of every module is read with ast, those inside functions included (a lazy
import is still a dependency), relative imports resolved. An import from part A to part B (the
parts are pikv/<name>/ and pikv/<name>.py) must go strictly down LAYERS: parts on one layer do
not import each other either.
"""

from __future__ import annotations

import ast
from pathlib import Path

PIKV = Path(__file__).resolve().parents[2] / "pikv"

# Top to bottom; a part may import only parts on layers below its own.
LAYERS: list[tuple[str, ...]] = [
    ("pikv.export", "pikv.benchmark"),  # checkpoints -> Hugging Face; the bench/ harness and shared bench code
    ("pikv.inference",),  # generation from a checkpoint across processes (train/generate.py)
    ("pikv.training",),  # the trainer loop, engines, checkpoints, distillation
    ("pikv.tasks",),  # what the trainer trains (lm | flex | time): model, loader, loss, evaluation
    ("pikv.eval",),  # held-out perplexity, KV decoding evaluation, retrieval probe
    ("pikv.models",),
    ("pikv.moe", "pikv.kv"),
    ("pikv.distributed", "pikv.data", "pikv.logging", "pikv.testing"),
    ("pikv.wandb_offline",),
    ("pikv.config",),  # imports nothing from pikv
]
# (importing module, imported module) pairs that break the rule for now, each with its way out.
ALLOWED: dict[tuple[str, str], str] = {}
LEVEL = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def module_files() -> dict[str, Path]:
    out = {}
    for path in PIKV.rglob("*.py"):
        parts = list(path.relative_to(PIKV.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, files: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, pikv module) for every import in the file, at any depth; `from pkg import sub`
    counts as importing pkg.sub when that is a module, else pkg."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
                      for a in node.names]
    out = []
    for line, target in found:
        while target and target not in files:
            target = target.rpartition(".")[0]
        if target.startswith("pikv.") and target != name:
            out.append((line, target))
    return out


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """The module graph and the rule breakers, as 'file:line: a imports b (why)'."""
    files = module_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    bad = []
    for name, path in sorted(files.items()):
        for line, target in imports_of(name, path, files):
            graph[name].add(target)
            src, dst = part(name), part(target)
            if src == dst or (name, target) in ALLOWED:
                continue
            if src not in LEVEL or dst not in LEVEL:
                bad.append(f"{path.relative_to(PIKV.parent)}:{line}: {name} imports {target}: "
                           f"{src if src not in LEVEL else dst} is in no layer of LAYERS")
            elif LEVEL[dst] <= LEVEL[src]:
                how = "sideways (same layer)" if LEVEL[dst] == LEVEL[src] else "upward"
                bad.append(f"{path.relative_to(PIKV.parent)}:{line}: {name} imports {target}: {how}")
    return graph, bad


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_imports_point_down_the_layers():
    _, bad = import_graph()
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(bad)


def test_no_import_circles_between_modules_or_parts():
    graph, _ = import_graph()
    graph = {m: {t for t in ts if (m, t) not in ALLOWED} for m, ts in graph.items()}
    parts: dict[str, set[str]] = {}
    for m, ts in graph.items():
        parts.setdefault(part(m), set()).update(part(t) for t in ts if part(t) != part(m))
    found = [" <-> ".join(c) for c in circles(graph) + circles(parts)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_checker_sees_what_it_must():
    """The walker must find imports inside functions, resolve relative ones and catch a circle;
    otherwise the two tests above pass vacuously."""
    files = module_files()
    found = dict((t, line) for line, t in imports_of("pikv.training.engines", files["pikv.training.engines"], files))
    assert "pikv.training.engines.torch_engine" in found  # imported inside build_engine
    graph, _ = import_graph()
    assert "pikv.models.generation" in graph["pikv.models.transformer"]  # a lazy import in a method
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert set(LEVEL) >= {part(m) for m in files if m != "pikv"}  # every part has a layer
