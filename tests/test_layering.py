"""The package's layering: no import cycle between modules (module- and function-level imports), the
pipeline without torch, the old pre-layout paths gone (normal import errors, no forwarding)."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module under src/moeclip (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((SRC / "moeclip").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _reexports_only(tree: ast.Module) -> bool:
    """A package ``__init__`` that only imports from its own sub-modules to re-export names (set aside)."""
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return all(isinstance(n, ast.ImportFrom) and n.level == 1 for n in body)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the moeclip modules its ``import``/``from`` statements name, at any depth of the file."""
    modules = _modules()

    def owner(name: Optional[str]) -> Optional[str]:
        while name and name not in modules:  # ``moeclip.x.Name`` -> ``moeclip.x``
            name = name.rpartition(".")[0]
        return name or None

    graph: Dict[str, Set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_pkg = path.name == "__init__.py"
        if is_pkg and _reexports_only(tree):
            continue
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):  # module level and inside functions alike
            if isinstance(node, ast.Import):
                edges.update(owner(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    full = ".".join(base + ([node.module] if node.module else []))
                else:
                    full = node.module
                for a in node.names:  # ``from pkg import submodule`` names the sub-module
                    target = owner(f"{full}.{a.name}")
                    edges.add(target if target not in (None, mod) else owner(full))
        graph[mod] = {e for e in edges if e is not None and e != mod}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    """The checker itself: it must report a cycle that is there, and only then."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    # module level, relative: the exported runtimes sit on the pipeline
    assert "moeclip.inference.pipeline" in graph["moeclip.inference.exported"]
    # function level (lazy, for torch): the runtime builder reaches the Detector
    assert "moeclip.inference.detector" in graph["moeclip.inference.build"]


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_inference_layers_point_one_way():
    """The pipeline imports no runtime; runtimes import no Detector and no builder; the deployment file
    format imports neither the Detector nor a runtime."""
    graph = import_graph()
    inference = {m for m in graph if m.startswith("moeclip.inference.")}
    above_pipeline = {"moeclip.inference." + m for m in (
        "torch_runtime", "references", "exported", "onnx", "openvino", "detector", "build")}
    assert not graph["moeclip.inference.pipeline"] & above_pipeline
    for runtime in ("torch_runtime", "references", "exported", "onnx", "openvino"):
        deps = graph["moeclip.inference." + runtime]
        assert "moeclip.inference.pipeline" in deps or runtime in ("onnx", "openvino")  # via exported
        assert not deps & {"moeclip.inference.detector", "moeclip.inference.build"}, runtime
    assert not graph["moeclip.inference.deploy"] & (above_pipeline | {"moeclip.inference.pipeline"})
    assert not {m for m in inference if "moeclip.inference.build" in graph[m]}  # nothing sits above the builder
    assert not {d for d in graph["moeclip.engine.demo"] if d.startswith(("moeclip.analysis", "moeclip.inference"))}


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def test_pipeline_builder_and_exported_runtimes_import_no_torch(tmp_path):
    """``predict --onnx/--openvino`` run without PyTorch: these modules must not pull it in."""
    code = """
import sys
import moeclip.inference.pipeline, moeclip.inference.deploy, moeclip.inference.build  # noqa: E401
import moeclip.inference.onnx, moeclip.inference.openvino  # noqa: E401
heavy = [m for m in ("torch", "torchvision", "open_clip", "onnxruntime", "openvino") if m in sys.modules]
assert not heavy, heavy
"""
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("old", ["moeclip.detector", "moeclip.deploy", "moeclip.export_onnx", "moeclip.serve",
                                 "moeclip.overlay", "moeclip.demo", "moeclip.data.io", "moeclip.metrics.evaluate"])
def test_old_module_paths_are_gone(old):
    sys.modules.pop(old, None)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_old_attribute_paths_are_gone():
    import moeclip.inference.deploy as deploy
    import moeclip.model.scoring as scoring

    for module, name in ((deploy, "load_detector"), (deploy, "fpr_threshold"), (deploy, "overlay"),
                         (deploy, "load_deployment_detector"), (scoring, "final_image_score")):
        with pytest.raises(AttributeError):
            getattr(module, name)
    assert not hasattr(deploy.Deployment, "detector")  # built by Detector.from_deployment, above the file
