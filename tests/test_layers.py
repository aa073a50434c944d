"""The project's layout (docs/architecture.md, "Layers"): the top level holds the design card's files and what a user
runs; every other module sits in a folder named for its job; imports go downwards only, and none goes round in a circle."""

import ast
import subprocess

from scripts import REPO

LAYERS = {  # lowest first: a module may import modules of its own layer or of a lower one
    "plumbing": ["plumbing.files", "plumbing.bank", "plumbing.image_io", "plumbing.system", "plumbing.cli"],
    "method's parts": ["method.presets", "method.backbone", "method.config_rules", "method.coreset", "method.audit", "method.search",
                       "method.maps", "method.official", "method.tiles", "method.thresholds"],
    "model": ["dataset", "synthetic", "patchcore", "ensemble"],
    "reporting": ["reporting.published", "reporting.pixel_curves", "reporting.metrics", "reporting.report", "reporting.report_page"],
    "deploy": ["deploy.onnx_model", "deploy.onnx_search", "deploy.onnx_export"],
    "drivers": ["train", "evaluate", "export", "predict_onnx"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
FOLDERS = ("plumbing", "method", "reporting", "deploy")
TOP_LEVEL = {"patchcore.py", "dataset.py", "ensemble.py", "train.py", "evaluate.py", "export.py", "predict_onnx.py", "synthetic.py",
             "visualization.ipynb", "docs", "tests", "benchmarks", "README.md", "Makefile", "pyproject.toml", "requirements.txt",
             "requirements-test.txt", "requirements-deploy.txt", "constraints.txt", *FOLDERS}  # fmt: skip


def source(module: str) -> str:
    return (REPO / f"{module.replace('.', '/')}.py").read_text()


def project_imports() -> dict[str, set[str]]:
    """Each module's imports of other project modules, those inside functions included (`from method import search`
    counts as method.search)."""
    graph = {}
    for module in RANK:
        names = set()
        for node in ast.walk(ast.parse(source(module))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = names & set(RANK)
    return graph


def test_the_top_level_holds_the_card_and_what_a_user_runs():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert {name.split("/")[0] for name in files if not name.startswith(".")} == TOP_LEVEL


def test_every_module_has_a_layer_and_sits_in_its_folder():
    in_folders = {f"{folder}.{p.stem}" for folder in FOLDERS for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
    modules = {p.stem for p in REPO.glob("*.py")} | in_folders
    assert modules == set(RANK)
    for layer, members in LAYERS.items():
        folders = {m.split(".")[0] if "." in m else "top level" for m in members}
        assert len(folders) == 1, (layer, folders)


def test_readme_is_for_a_newcomer():
    """Issue 27, item 4: at most 200 lines, the two commands first; the long tables and the contract live in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.split("```")[1].split()[:2] == ["make", "demo"] and "make test" in readme.split("```")[1]
    for page in ("docs/architecture.md", "docs/deploy.md", "docs/benchmarks.md"):
        assert page in readme and (REPO / page).is_file(), page


def test_patchcore_py_is_the_method_a_reader_can_hold():
    """Issue 27, item 3: at most 500 lines, no class over 300, the paper's equations findable by their numbers."""
    text = source("patchcore")
    assert len(text.splitlines()) <= 500
    classes = [node for node in ast.parse(text).body if isinstance(node, ast.ClassDef)]
    assert {node.name for node in classes} >= {"PatchCoreConfig", "PatchFeatures", "AnomalyScorer", "PatchCore"}
    assert max(node.end_lineno - node.lineno + 1 for node in classes) <= 300
    for reference in ("Eq. 1-2", "Eq. 6", "Eq. 7", "Alg. 1", "Sec. 3.1", "Sec. 3.2", "Sec. 3.3"):
        assert reference in text, reference


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
        for node in ast.parse(source(module)).body:
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(module)
    for name in ("heatmap_panel", "heatmap_names", "jet", "thumbnail_name"):
        assert len(defined.get(name, [])) == 1, (name, defined.get(name))
    assert "colour_bar" not in defined, defined.get("colour_bar")
    assert defined["heatmap_panel"] == defined["heatmap_names"] == ["plumbing.image_io"]  # torch-free: the runner imports it
    sources = {module: source(module) for module in RANK}
    assert [m for m, text in sources.items() if "colormaps[" in text] == []  # one jet: image_io's
    assert [m for m, text in sources.items() if "no memory bank for" in text] == ["plumbing.bank"]
    assert ".jpg" not in (REPO / "reporting" / "assets" / "report_page.js").read_text()
