"""The modules' layers (docs/architecture.md, "Layers"): imports go downwards only, and none goes round in a circle."""

import ast

from scripts import REPO

LAYERS = {  # lowest first: a module may import modules of its own layer or of a lower one
    "data and files": ["dataset", "synthetic", "bank", "files", "published", "image_io", "onnx_model"],
    "machine": ["system"],
    "helpers": ["backbone", "coreset", "search", "maps", "official", "thresholds"],
    "method": ["patchcore", "ensemble"],
    "export": ["onnx_search", "onnx_export"],
    "plumbing": ["cli", "report", "metrics", "report_page"],
    "drivers": ["train", "evaluate", "export", "predict_onnx"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def project_imports() -> dict[str, set[str]]:
    """Each top-level module's imports of other top-level modules, those inside functions included."""
    graph = {}
    for module in RANK:
        tree = ast.parse((REPO / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[module] = names & set(RANK)
    return graph


def test_every_top_level_module_has_a_layer():
    assert {p.stem for p in REPO.glob("*.py")} == set(RANK)


def test_imports_go_downwards_only():
    upwards = [(m, n) for m, imported in project_imports().items() for n in imported if RANK[n] > RANK[m]]
    assert upwards == []
    assert "evaluate" not in project_imports()["train"] and "train" not in project_imports()["evaluate"]


def test_no_import_cycles():
    graph = project_imports()
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_each_shared_rule_is_written_once():
    """Issue 28, item 18: the heatmap drawing, its colour map and the heatmap names live in one torch-free module that
    evaluate.py and the runner both import; the missing-bank message in one function; the page's JS takes the
    thumbnail names from Python instead of deriving them again."""
    defined = {}
    for module in RANK:
        tree = ast.parse((REPO / f"{module}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(module)
    for name in ("heatmap_panel", "heatmap_names", "jet", "thumbnail_name"):
        assert len(defined.get(name, [])) == 1, (name, defined.get(name))
    assert "colour_bar" not in defined, defined.get("colour_bar")
    assert defined["heatmap_panel"] == defined["heatmap_names"] == ["image_io"]  # torch-free: the runner imports it
    sources = {module: (REPO / f"{module}.py").read_text() for module in RANK}
    assert [m for m, text in sources.items() if "colormaps[" in text] == []  # one jet: image_io's
    assert [m for m, text in sources.items() if "no memory bank for" in text] == ["bank"]
    assert ".jpg" not in (REPO / "assets" / "report_page.js").read_text()
