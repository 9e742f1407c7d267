"""The code's shape, checked: a network file in model/ imports nothing outside model/ (it stands alone), and no
module imports the two command lines (train.py, sample.py): scripts, tests and mini/ call the library."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {path.stem for path in ROOT.glob("*.py")}


def imported(path: Path) -> set[str]:
    """The top-level names of every module `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_files_import_nothing_of_the_project_outside_model():
    files = sorted((ROOT / "model").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        assert not imported(path) & TOP_LEVEL, f"{path.name} imports {imported(path) & TOP_LEVEL}"


def test_nothing_imports_the_command_lines():
    files = [p for p in ROOT.rglob("*.py") if not {"venv", ".venv", "runs"} & set(p.relative_to(ROOT).parts)]
    assert len(files) > 30
    importers = {str(p.relative_to(ROOT)) for p in files if imported(p) & {"train", "sample"}}
    # the command lines' own tests, whose subject is the command line itself
    assert importers <= {"tests/test_train.py", "tests/test_sample.py", "tests/test_edges.py"}, importers
