"""Every Python file of the repository stays Python 3.10 code (robots run Humble on Ubuntu 22.04).

CI runs 3.11, where `except*` parses and `tomllib` imports, so two checks here: the 3.10 grammar
(`ast.parse(feature_version=(3, 10))`) and a table of the standard-library names 3.10 lacks."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("diffsql_model", "diffsql_ros", "launch", "bench", "test")
TARGET = (3, 10)

# Standard-library modules and names newer than 3.10 -> the version that added them.
NEW_MODULES = {"tomllib": (3, 11), "wsgiref.types": (3, 11)}
NEW_NAMES = {
    "typing": {n: (3, 11) for n in ("Self", "LiteralString", "Never", "TypeVarTuple", "Unpack",
                                     "Required", "NotRequired", "assert_never", "assert_type",
                                     "reveal_type", "dataclass_transform", "get_overloads",
                                     "clear_overloads")}
    | {"override": (3, 12), "TypeAliasType": (3, 12), "ReadOnly": (3, 13), "TypeIs": (3, 13)},
    "datetime": {"UTC": (3, 11)},
    "enum": {n: (3, 11) for n in ("StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify",
                                   "member", "nonmember", "global_enum")},
    "asyncio": {"TaskGroup": (3, 11), "timeout": (3, 11), "timeout_at": (3, 11), "Runner": (3, 11)},
    "contextlib": {"chdir": (3, 11)},
    "itertools": {"batched": (3, 12)},
    "hashlib": {"file_digest": (3, 11)},
    "operator": {"call": (3, 11)},
    "math": {"cbrt": (3, 11), "exp2": (3, 11), "sumprod": (3, 12), "fma": (3, 13)},
    "logging": {"getLevelNamesMapping": (3, 11), "getHandlerByName": (3, 12)},
    "sys": {"exception": (3, 11)},
    "os": {"process_cpu_count": (3, 13)},
}
NEW_BUILTINS = {"ExceptionGroup": (3, 11), "BaseExceptionGroup": (3, 11)}
NEW_METHODS = {"add_note": (3, 11)}  # BaseException.add_note: any `x.add_note(...)`
NEW_KEYWORDS = {"onexc": (3, 12), "delete_on_close": (3, 12)}  # shutil.rmtree, NamedTemporaryFile


def python_files() -> List[pathlib.Path]:
    files = [ROOT / "setup.py"]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def too_new(tree: ast.AST, target: Tuple[int, int] = TARGET) -> Iterator[str]:
    """`line: what` for each standard-library use newer than `target` in a parsed module."""
    aliases: Dict[str, str] = {}  # local name -> module, from `import x [as y]`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.Import):
            found = [(a.name, NEW_MODULES.get(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [(node.module, NEW_MODULES.get(node.module))]
            names = NEW_NAMES.get(node.module, {})
            found += [(f"{node.module}.{a.name}", names.get(a.name)) for a in node.names]
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in aliases:
                module = aliases[node.value.id]
                found = [(f"{module}.{node.attr}", NEW_NAMES.get(module, {}).get(node.attr))]
            if node.attr in NEW_METHODS:
                found.append((f".{node.attr}()", NEW_METHODS[node.attr]))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found = [(node.id, NEW_BUILTINS.get(node.id))]
        elif isinstance(node, ast.keyword) and node.arg in NEW_KEYWORDS:
            found = [(f"{node.arg}=", NEW_KEYWORDS[node.arg])]
        for what, since in found:
            if since is not None and since > target:
                yield f"{getattr(node, 'lineno', '?')}: {what} (Python {since[0]}.{since[1]})"


def test_every_file_is_listed():
    files = python_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"setup.py", "launch/depth.launch.py", "diffsql_ros/depth_node.py",
            "diffsql_model/inference.py", "test/test_python_compat.py"} <= names
    assert len(files) > 100


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_310(path):
    src = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(src, filename=str(path), feature_version=TARGET)
    except SyntaxError as e:
        pytest.fail(f"{path.relative_to(ROOT)}:{e.lineno}: not Python 3.10 syntax: {e.msg}")
    problems = list(too_new(tree))
    assert not problems, f"{path.relative_to(ROOT)} uses what Python 3.10 lacks: {problems}"


@pytest.mark.parametrize("snippet", [
    "try:\n    pass\nexcept* ValueError:\n    pass\n",
    "def f[T](x: T) -> T:\n    return x\n",
    "type Alias = int\n",
])
def test_grammar_check_rejects_newer_syntax(snippet):
    with pytest.raises(SyntaxError):
        ast.parse(snippet, feature_version=TARGET)
    ast.parse("match x:\n    case 1:\n        pass\n", feature_version=TARGET)  # 3.10 grammar passes


@pytest.mark.parametrize("snippet, expected", [
    ("import tomllib", "tomllib"),
    ("from typing import Self", "typing.Self"),
    ("import datetime as dt\nnow = dt.datetime.now(dt.UTC)", "datetime.UTC"),
    ("import datetime\nx = datetime.UTC", "datetime.UTC"),
    ("from enum import StrEnum", "enum.StrEnum"),
    ("import itertools\nitertools.batched([], 2)", "itertools.batched"),
    ("raise ExceptionGroup('x', [])", "ExceptionGroup"),
    ("e = ValueError()\ne.add_note('why')", ".add_note()"),
    ("import shutil\nshutil.rmtree('d', onexc=None)", "onexc="),
])
def test_stdlib_check_finds_newer_names(snippet, expected):
    problems = list(too_new(ast.parse(snippet)))
    assert len(problems) == 1 and expected in problems[0], problems


def test_stdlib_check_passes_310_names():
    src = ("import datetime\nfrom typing import Optional, TypeVar\nimport enum\n"
           "t = datetime.timezone.utc\nclass E(str, enum.Enum):\n    A = 'a'\n"
           "import os\nos.walk('.')\n")
    assert list(too_new(ast.parse(src))) == []
