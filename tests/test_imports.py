"""docs/architecture.md's "Direction of imports", checked: every `import` in rlkit/ (those inside functions too),
read with `ast`, goes from a layer (`rlkit.<first name>`) to one that its row of the table allows."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "rlkit"

# layer -> the layers it may import; docs/architecture.md shows the same table (test_the_doc_shows_this_table).
ALLOWED = {
    "rlkit": set(),
    "rlkit.registry": set(),
    "rlkit.errors": set(),
    "rlkit.option_types": set(),
    "rlkit.batch": set(),
    "rlkit.logs": set(),
    "rlkit.models": set(),
    "rlkit.plot": set(),
    "rlkit.ranges": {"rlkit.errors"},
    "rlkit.preflight": {"rlkit.errors"},
    "rlkit.algorithms": {"rlkit.registry"},
    "rlkit.reward": {"rlkit.registry", "rlkit.errors", "rlkit.option_types"},
    "rlkit.rollout": {"rlkit.registry", "rlkit.ranks"},
    "rlkit.data": {"rlkit.reward"},
    "rlkit.launch": set(),
    "rlkit.ranks": {"rlkit.batch"},
    "rlkit.sampling": {"rlkit.algorithms", "rlkit.rollout", "rlkit.batch", "rlkit.ranks", "rlkit.registry",
                       "rlkit.data"},
    "rlkit.config": {"rlkit.registry", "rlkit.errors", "rlkit.algorithms", "rlkit.sampling"},
    "rlkit.validation": {"rlkit.config", "rlkit.registry", "rlkit.errors", "rlkit.launch", "rlkit.option_types",
                         "rlkit.ranges", "rlkit.preflight", "rlkit.algorithms", "rlkit.rollout", "rlkit.reward",
                         "rlkit.models"},
    "rlkit.choices": {"rlkit.config"},
    "rlkit.cli": {"rlkit.config", "rlkit.errors"},
    "rlkit.eval": {"rlkit.config", "rlkit.errors", "rlkit.data", "rlkit.rollout", "rlkit.reward", "rlkit.registry",
                   "rlkit.logs", "rlkit.cli"},
    "rlkit.trainer": {"rlkit.algorithms", "rlkit.batch", "rlkit.config", "rlkit.data", "rlkit.errors", "rlkit.eval",
                      "rlkit.launch", "rlkit.logs", "rlkit.models", "rlkit.ranks", "rlkit.registry", "rlkit.reward",
                      "rlkit.rollout", "rlkit.sampling"},
    "rlkit.train": {"rlkit.choices", "rlkit.cli", "rlkit.config", "rlkit.validation", "rlkit.data", "rlkit.errors",
                    "rlkit.eval", "rlkit.reward", "rlkit.trainer"},
}


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> set[str]:
    """The rlkit modules `path` imports, relative imports resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path)[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            # `from rlkit import x`: x is a layer of its own
            found.update([f"rlkit.{alias.name}" for alias in node.names] if name == "rlkit" else [name])
    return {name for name in found if name == "rlkit" or name.startswith("rlkit.")}


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _edges() -> dict[tuple[str, str], list[str]]:
    """{(importing layer, imported layer): [importing modules]} between different layers."""
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = ".".join(_module(path))
        for target in _imports(path):
            if _layer(source) != _layer(target):
                edges.setdefault((_layer(source), _layer(target)), []).append(source)
    return edges


def test_every_import_follows_the_table():
    edges = _edges()
    unknown = sorted({a for a, _ in edges} - set(ALLOWED))
    assert not unknown, f"new layers: give them a row in ALLOWED and in docs/architecture.md: {unknown}"
    wrong = {edge: modules for edge, modules in edges.items()
             if edge[1] not in ALLOWED[edge[0]]}
    assert not wrong, f"imports against docs/architecture.md's 'Direction of imports': {wrong}"


def test_nothing_imports_the_trainer_but_train_and_nothing_imports_train():
    importers = {target: sorted(a for a, b in _edges() if b == target) for target in ("rlkit.trainer", "rlkit.train")}
    assert importers == {"rlkit.trainer": ["rlkit.train"], "rlkit.train": []}


def test_the_table_has_no_cycles():
    done, active = set(), set()

    def visit(layer):
        assert layer not in active, f"import cycle through {layer}"
        if layer not in done:
            active.add(layer)
            for target in ALLOWED[layer]:
                visit(target)
            active.discard(layer)
            done.add(layer)

    for layer in ALLOWED:
        visit(layer)


def test_the_scan_sees_imports_inside_functions():
    assert ("rlkit.train", "rlkit.trainer") in _edges()  # train.py imports the Trainer inside run()


def test_the_doc_shows_this_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Direction of imports"):]
    section = section[: section.index("\n## ", 1)]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `rlkit")]
    documented = {re.findall(r"`([\w.]+)`", layer)[0]: set(re.findall(r"`([\w.]+)`", imports))
                  for layer, imports in rows}
    assert documented == ALLOWED
