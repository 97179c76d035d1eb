"""The package's import graph follows its layers (docs/DESIGN.md §3), read from the AST.

From the top: `main`; `tools/`; `training/`; `data/` and `models/`; `config_lib`;
`clustering`. A module imports only from its own layer or below, lazy imports inside
functions included. One stated exception: `config_lib` looks up the names a field may take
(backbones, cluster points, samplings, plans) in `models/` lazily, where they are defined.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fva_jax"
LAYERS = {"main": 5, "tools": 4, "training": 3, "data": 2, "models": 2, "config_lib": 1}
LAYERS["clustering"] = 0
LAYERS["__init__"] = 0  # the package's own __init__ imports nothing of fva_jax
ALLOWED_UPWARD = {("config_lib", "models")}  # lazy name look-ups, see the docstring


def _part(module: str) -> str:
    """'fva_jax.training.train' -> 'training'; 'fva_jax.clustering' -> 'clustering'."""
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: pathlib.Path) -> set[str]:
    """Every fva_jax module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fva_jax.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fva_jax"):
            if node.module == "fva_jax":
                found |= {f"fva_jax.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(path)
    return graph


def test_every_module_belongs_to_a_layer():
    assert {_part(m) for m in _graph()} <= set(LAYERS), sorted({_part(m) for m in _graph()})


def test_imports_go_down_the_layers():
    wrong = []
    for module, imported in sorted(_graph().items()):
        for target in sorted(imported):
            src, dst = _part(module), _part(target)
            if LAYERS[dst] > LAYERS[src] and (src, dst) not in ALLOWED_UPWARD:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    known = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in known:  # `from fva_jax.data.frames import x`
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {resolve(t) for t in ts} - {None, m} for m, ts in graph.items()}
    # A package's __init__ importing its own submodules is not a cycle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_layer_check_sees_lazy_imports(tmp_path):
    source = "def f():\n    from fva_jax.training import train\n"
    (tmp_path / "m.py").write_text(source)
    assert _imports(tmp_path / "m.py") == {"fva_jax.training"}
