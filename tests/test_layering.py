"""The layers' imports (issue #13): the engine and the runner meet only in plain data (hark.step),
and transcription and the server go through the engine, never to the runner or the models.

Parses every hark module's imports (top level, in functions, under TYPE_CHECKING alike)."""
import ast
import pathlib

import hark

ROOT = pathlib.Path(hark.__file__).parent

# package -> what it must not import
FORBIDDEN = {
    "hark.engine": ("hark.runner", "hark.models", "hark.executor"),
    "hark.runner": ("hark.engine", "hark.executor"),
    "hark.transcribe": ("hark.runner", "hark.models", "hark.executor"),
    "hark.server": ("hark.runner", "hark.models", "hark.executor"),
    "hark.step": ("hark.engine", "hark.runner", "hark.models", "hark.executor"),
}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in source (of `module`), relative ones resolved; `from a import b`
    gives both a and a.b (b may be a module)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    found = []
    for layer, banned in FORBIDDEN.items():
        if within(module, layer):
            found += [f"{module}:{line} imports {target} ({layer} must not)"
                      for line, target in imported(source, module, is_package) if any(within(target, b) for b in banned)]
    return found


def hark_modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_package else parts), path.read_text(), is_package


def test_layers_import_only_downward():
    modules = list(hark_modules())
    assert len(modules) > 100 and any(m == "hark.engine.engine" for m, _, _ in modules)
    assert [v for m in modules for v in violations(*m)] == []


def test_the_rule_catches_upward_imports():
    """Each kind of import the rule must see: plain, from, relative, inside a function."""
    assert violations("hark.engine.x", "import hark.models.loader")
    assert violations("hark.engine.x", "def f():\n    from hark.runner import sampler")
    assert violations("hark.engine.x", "from hark import executor")
    assert violations("hark.engine.x", "from ..runner.model_runner import ModelRunner")
    assert violations("hark.runner.x", "from hark.engine.request import Sequence")
    assert violations("hark.transcribe.x", "from hark.models.whisper import WhisperForConditionalGeneration")
    assert violations("hark.server", "from .. import models", is_package=True)
    assert not violations("hark.engine.x", "from hark.step import SchedulerOutput\nfrom . import scheduler")
    assert not violations("hark.executor", "from hark.runner.model_runner import ModelRunner")


def reach_throughs(source: str) -> list[tuple[int, str]]:
    """(line, chain) of every `X.engine.engine...` and `X.loaded` attribute read: the engine's own engine and
    its loaded checkpoint are its internals; callers use its properties (tokenizer, hf_config, ...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "loaded":
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Attribute) and node.attr == "engine" and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "engine":
            found.append((node.lineno, ast.unparse(node)))
    return found


# The one left: a TranscriptionRun drives the engine itself inside run_job, so it is built on the engine.
ALLOWED_REACH_THROUGHS = {("hark.server.audio", "served.engine.engine")}


def test_server_and_transcription_use_the_engines_public_surface():
    found = [(m, chain, line) for m, source, _ in hark_modules() if within(m, "hark.server") or within(m, "hark.transcribe")
             for line, chain in reach_throughs(source) if (m, chain) not in ALLOWED_REACH_THROUGHS]
    assert found == []
    assert reach_throughs("served.engine.engine.tokenizer") and reach_throughs("engine.loaded.hf_config")
    assert not reach_throughs("served.engine.tokenizer\nengine.hf_config")
