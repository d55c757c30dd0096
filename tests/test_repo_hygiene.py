"""Static checks over the tracked files: the repository speaks of the project, and its layers stay apart.

    pytest -q tests/test_repo_hygiene.py

- Text files (code, configs, scripts, tests, docs) carry no working history: no numbered work sessions and no
  first-person diary. What a file states is the project's fact; how it was reached belongs in git log.
- scripts/ (user tools) use the public API: no private (`_name`) symbol of attention/, parallel/ or trainer/.
- Tests import scripts as a package (`from scripts import bench_x`), never through sys.path. tools/ holds
  developer probes and is exempt from both layout rules, not from the first.
"""

import ast
import re
import subprocess

import pytest

from helpers import ROOT

TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".toml")
TEXT_NAMES = ("Makefile",)
KERNEL_PACKAGES = ("attention", "parallel", "trainer")

# Each pattern names what it catches; "I" must be followed by a verb, so code such as `I = ...` and words such
# as "Intel" never match.
HISTORY_PATTERNS = {
    "a numbered work session": re.compile(r"\bsession\s+[0-9]", re.IGNORECASE),
    "first person": re.compile(
        r"\bI (have|had|did|do|am|was|think|thought|tried|measured|ran|reran|could|would|will|saw|found|used|"
        r"chose|wrote|expect|expected|suspect|suspected|believe|checked|timed|tested|verified|traced|added|"
        r"removed|changed|fixed|moved|kept|left|got|predicted|guess|assume|assumed|hope|hoped|want|wanted|need|"
        r"needed|know|knew|noticed|note|noted|doubt|wonder|can|cannot|can't|don't|didn't|haven't|wasn't)\b"),
    "first person (contraction)": re.compile(r"\bI'(ve|m|d|ll)\b"),
    "a reference to the work item": re.compile(r"\bthe issue\b", re.IGNORECASE),
    "first person (possessive)": re.compile(r"\bmy own\b", re.IGNORECASE),
}


def _tracked(*patterns: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the hygiene checks read the tracked files")
    return [p for p in out.decode().split("\0") if p]


def _text_files() -> list[str]:
    return [p for p in _tracked() if p.endswith(TEXT_SUFFIXES) or p.rsplit("/", 1)[-1] in TEXT_NAMES]


def history_lines(path: str, text: str) -> list[str]:
    """'path:line: what (text)' for every line of `text` that reads as working history."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in HISTORY_PATTERNS.items():
            if pattern.search(line):
                found.append(f"{path}:{n}: {what}: {line.strip()[:120]}")
    return found


def private_kernel_uses(path: str, source: str) -> list[str]:
    """'path:line: ...' for each private symbol of attention/, parallel/ or trainer/ that `source` reaches:
    `from attention.x import _y`, `module._y` on an imported kernel module (or package), getattr(module, "_y")."""
    tree = ast.parse(source, filename=path)
    found, kernel_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in KERNEL_PACKAGES:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
                kernel_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in KERNEL_PACKAGES:
                    kernel_names.add(alias.asname or alias.name.split(".")[0])

    def private(name) -> bool:
        return isinstance(name, str) and name.startswith("_") and not name.startswith("__")

    def root(node):
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and root(node.value) in kernel_names:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and root(node.args[0]) in kernel_names \
                and isinstance(node.args[1], ast.Constant) and private(node.args[1].value):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def sys_path_edits(path: str, source: str) -> list[str]:
    """'path:line: ...' for each change of sys.path in `source` (insert / append / extend / assignment)."""
    def is_sys_path(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
            and node.value.id == "sys"

    found = []
    for node in ast.walk(ast.parse(source, filename=path)):
        edit = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value)
                and node.func.attr in ("insert", "append", "extend")) or \
            (isinstance(node, (ast.Assign, ast.AugAssign)) and any(
                is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])))
        if edit:
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_working_history_in_tracked_text():
    found = []
    for path in _text_files():
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the working tree
        found += history_lines(path, text)
    assert not found, "state the project's facts, not how they were reached:\n" + "\n".join(found)


def test_scripts_use_no_private_kernel_symbol():
    found = []
    for path in _tracked("scripts/*.py"):
        found += private_kernel_uses(path, (ROOT / path).read_text(encoding="utf-8"))
    assert not found, "scripts use the public API of attention/, parallel/, trainer/:\n" + "\n".join(found)


def test_tests_do_not_edit_sys_path():
    found = []
    for path in _tracked("tests/*.py", "tests/**/*.py"):
        found += sys_path_edits(path, (ROOT / path).read_text(encoding="utf-8"))
    assert not found, "tests import scripts as a package (from scripts import x):\n" + "\n".join(found)


# -- the checkers themselves, on known text ------------------------------------------------------------------


def test_history_patterns_flag_diary_lines_and_pass_code():
    diary = ["# tuned in Sess" + "ion 4 on an H100", "I " + "measured 1.2x here", "I'" + "ve not traced it",
             "as the " + "issue asks", "with my " + "own eyes"]
    for line in diary:
        assert history_lines("f", line), line
    clean = ["I = torch.eye(4)  # identity", "Intel and AMD CPUs", "a wandb session object", "If I_max > 3:",
             "the issued commands", "session_id = 3", "Phase II was faster"]
    for line in clean:
        assert not history_lines("f", line), line


def test_private_use_checker():
    src = ("import attention.triton.fwd as fwd\nfrom attention import _hidden, flash_attn_func\n"
           "from parallel import ring\nimport torch\nfwd._launch(1)\nring._flat(x)\ntorch._C\n"
           "getattr(ring, '_flat')\nflash_attn_func.__doc__\nimport trainer\ntrainer.__file__\n")
    got = [line.split(": ", 1)[1] for line in private_kernel_uses("s.py", src)]
    assert sorted(got) == sorted(["from attention import _hidden", "fwd._launch", "ring._flat",
                                  "getattr(ring, '_flat')"])


def test_sys_path_checker():
    src = "import sys\nsys.path.insert(0, 'scripts')\nsys.path += ['x']\nsys.path[0:0] = ['y']\nprint(sys.path)\n"
    assert sorted(line.split(":")[1] for line in sys_path_edits("t.py", src)) == ["2", "3", "4"]
