"""The installed layout: one top-level package, `jetscribe`; services/ and shared/ are imported through it."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _python_files():
    for folder in ("services", "shared", "jetscribe", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if "jetscribe/services" in path.as_posix() or "jetscribe/shared" in path.as_posix():
                continue  # the namespace links: the same files as services/ and shared/
            yield path


def test_nothing_imports_services_or_shared_as_top_level_packages():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {name}" for name in names if name.split(".")[0] in ("services", "shared")
            ]
    assert not offenders, "import these as jetscribe.services / jetscribe.shared:\n" + "\n".join(offenders)


def test_the_namespace_links_point_at_the_design_folders():
    assert (ROOT / "jetscribe" / "services").resolve() == ROOT / "services"
    assert (ROOT / "jetscribe" / "shared").resolve() == ROOT / "shared"
