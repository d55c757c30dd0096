"""The README as a newcomer meets it: its snippets run on CPU as written, its links resolve, it stays short.

    pytest -q tests/test_readme.py

- ```python blocks run, each in a fresh interpreter at the repository root. A block that merges attention outputs
  (`merge_attn_outputs`) prints the max difference to direct attention last on its last line: it must be < 1e-4.
- ```bash blocks run line by line, in document order, at the repository root, as after `make train`:
  `.venv/bin/python` and `.venv/bin/torchrun` become this interpreter. A block whose first line is `# GPU` runs only
  on CUDA with enough GPUs (training commands stopped after 2 steps); one whose first line is `# setup`
  (make train / make test) runs the suite itself and never runs from it, nor does any other command that runs
  pytest, directly or through a script. Run directories that the commands create under outputs/ are removed
  afterwards; the ones that were there before are left alone.
- A command that does not run here (a GPU block, an unlabelled block with placeholders such as DIR) still names an
  existing module or script, and a trainer.train command composes to a valid config.
- README.md has at most 200 lines; every relative link in README.md and docs/*.md names a file of the repository,
  and an anchor into a Markdown file names one of its headings (GitHub's slugs).
"""

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import ROOT

README = ROOT / "README.md"
MAX_LINES = 200
TIMEOUT_S = 240          # one README command
GPU_TRAIN_STEPS = 2      # a GPU block's training commands show that they start and step, not the whole run
MAX_MERGE_DIFF = 1e-4
TAIL_LINES = 30
VENV_TOOLS = {".venv/bin/python": shlex.quote(sys.executable),
              ".venv/bin/torchrun": f"{shlex.quote(sys.executable)} -m torch.distributed.run"}
VENV_TOOL = re.compile(r"(?<![\w./-])(\.venv/bin/(?:python|torchrun))(?![\w.-])")
COMMAND_LINE = re.compile(r"(?:[A-Za-z_]\w*=\S*\s+)*(?:\.venv/bin/|python|torchrun|scripts/)")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
COMMENT = re.compile(r"\s+#.*$")
FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    lang: str        # the fence's info string, lower case; "" for a bare fence
    line: int        # README line of the opening fence
    lines: list

    @property
    def label(self) -> str:
        """'gpu' or 'setup' from a first line `# GPU` / `# setup` (a comment may follow: `# setup (GPU machine)`),
        else ''."""
        first = self.lines[0].strip().lower() if self.lines else ""
        word = first[1:].split("(")[0].strip() if first.startswith("#") else ""
        return word if word in ("gpu", "setup") else ""

    @property
    def source(self) -> str:
        return "\n".join(self.lines) + "\n"


def fenced_blocks(text: str) -> list:
    blocks, current, fence = [], None, ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, current = m.group(1), Block(m.group(2).lower(), n, [])
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            blocks.append(current)
            current = None
        else:
            current.lines.append(line)
    return blocks


def commands(block: Block) -> list:
    """The block's command lines: continuations joined, blank and comment-only lines dropped."""
    out, pending = [], ""
    for line in block.lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def invocation(command: str):
    """(module, script, args) that a python / torchrun / script command line runs; None for any other command."""
    words = shlex.split(command, comments=True)
    while words and ASSIGNMENT.fullmatch(words[0]):
        words.pop(0)
    if not words:
        return None
    prog = Path(words[0]).name
    if prog.startswith("python") or prog == "torchrun":
        rest = words[1:]
        i = 0
        while i < len(rest) and rest[i].startswith("-") and rest[i] != "-m":   # -u, --nproc_per_node=8 ...
            i += 1
        if i + 1 < len(rest) and rest[i] == "-m":
            return rest[i + 1], None, rest[i + 2:]
        return (None, rest[i], rest[i + 1:]) if i < len(rest) else None
    if words[0].endswith((".sh", ".py")):
        return None, words[0], words[1:]
    return None


def runs_tests(command: str) -> bool:
    """Whether the command runs pytest, itself or through a script of the repository."""
    if "pytest" in shlex.split(command, comments=True):
        return True
    inv = invocation(command)
    script = ROOT / inv[1] if inv and inv[1] else None
    return bool(script and script.is_file() and "pytest" in script.read_text(errors="replace"))


def for_this_interpreter(command: str) -> str:
    return VENV_TOOL.sub(lambda m: VENV_TOOLS[m.group(1)], command)


BLOCKS = fenced_blocks(README.read_text())
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang in ("python", "py")]
BASH_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console")]
# Blocks that are not run here, but whose commands must name what exists: GPU blocks and bare (placeholder) fences.
# In a bare fence, only lines that read as commands: it may as well hold a diagram or a file tree.
STATIC_COMMANDS = [(b.line, c) for b in BLOCKS for c in commands(b)
                   if b.label == "gpu" or (b.lang == "" and COMMAND_LINE.match(c))]


def _tail(text: str) -> str:
    return "\n".join((text or "").splitlines()[-TAIL_LINES:])


def _env() -> dict:
    # A user's shell does not interpret Triton kernels: the README runs without the suite's TRITON_INTERPRET.
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_checked(what: str, args, shell: bool = False, timeout: int = TIMEOUT_S) -> str:
    """Run at the repository root in its own process group; its output (stdout then stderr), or a test failure
    that names the command and shows the last lines of its output."""
    proc = subprocess.Popen(args, shell=shell, executable="/bin/bash" if shell else None, cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun's workers too
        out, err = proc.communicate()
        timed_out = True
    if timed_out:
        pytest.fail(f"{what} did not finish within {timeout} s; last lines:\n{_tail(out + err)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}; last lines:\n{_tail(out + err)}")
    return out


@pytest.fixture(scope="module")
def outputs_before():
    """The entries of outputs/ before the README's commands ran; the ones they add are removed afterwards."""
    outputs = ROOT / "outputs"
    existed = outputs.is_dir()
    before = set(outputs.iterdir()) if existed else set()
    yield {p.name for p in before}
    if outputs.is_dir():
        for path in set(outputs.iterdir()) - before:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if not existed and not any(outputs.iterdir()):
            outputs.rmdir()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines, more than {MAX_LINES}: move detail into docs/"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"README.md:{b.line}")
def test_python_block_runs(block):
    out = run_checked(f"the python block at README.md:{block.line}", [sys.executable, "-c", block.source])
    if "merge_attn_outputs" in block.source:
        lines = out.strip().splitlines()
        numbers = FLOAT.findall(lines[-1]) if lines else []
        assert numbers, f"README.md:{block.line} should print the max difference last; it printed {out!r}"
        diff = float(numbers[-1])
        assert 0 <= diff < MAX_MERGE_DIFF, (f"README.md:{block.line}: merged and direct attention differ by {diff} "
                                            f"(max {MAX_MERGE_DIFF})")


def _gpus_needed(block: Block) -> int:
    found = [int(n) for c in commands(block) for n in re.findall(r"--nproc[_-]per[_-]node[= ](\d+)", c)]
    return max(found, default=1)


def _as_run(block: Block, command: str) -> str:
    if block.label == "gpu" and invocation(command) and invocation(command)[0] == "trainer.train":
        command = f"{COMMENT.sub('', command)} train.steps={GPU_TRAIN_STEPS}"   # a later override wins
    return for_this_interpreter(command)


BASH_PARAMS = [pytest.param(b, id=f"README.md:{b.line}",
                            marks=pytest.mark.gpu if b.label == "gpu" else pytest.mark.slow) for b in BASH_BLOCKS]


@pytest.mark.parametrize("block", BASH_PARAMS)
def test_bash_block_runs(block, outputs_before):
    if block.label == "setup":
        pytest.skip("a `# setup` block (make train / make test) is what runs this suite")
    if block.label == "gpu":
        # GPU blocks name the user's own model and data directories: their commands are checked statically
        # (test_command_names_what_exists), and run for real only where such paths exist
        needed = _gpus_needed(block)
        if not torch.cuda.is_available() or torch.cuda.device_count() < needed:
            pytest.skip(f"a `# GPU` block: needs {needed} CUDA device(s)")
        missing = [p for c in commands(block) for p in re.findall(r"(?<![\w.])/(?:models|data)/\S+", c)
                   if not Path(p).exists()]
        if missing:
            pytest.skip(f"a `# GPU` block with placeholder paths ({missing[0]})")
    lines = [c for c in commands(block) if not runs_tests(c)]
    taken = [name for c in lines for name in re.findall(r"\brun_name=(\S+)", c) if name in outputs_before]
    if taken:
        pytest.skip(f"outputs/{taken[0]} is there from an earlier run; remove it to run README.md:{block.line}")
    for command in lines:
        run_checked(f"`{command}` (README.md:{block.line})", _as_run(block, command), shell=True)


@pytest.mark.parametrize("line,command", STATIC_COMMANDS, ids=[f"README.md:{n}" for n, _ in STATIC_COMMANDS])
def test_command_names_what_exists(line, command):
    where = f"README.md:{line}: `{command}`"
    try:
        inv = invocation(command)
    except ValueError as e:
        pytest.fail(f"{where}: does not parse as a shell command: {e}")
    if inv is None:
        return
    module, script, args = inv
    if module:
        parts = module.split(".")
        if (ROOT / parts[0]).is_dir():
            base = ROOT.joinpath(*parts)
            assert base.with_suffix(".py").is_file() or (base / "__main__.py").is_file(), \
                f"{where}: no module {module}"
        else:
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    if script:
        assert (ROOT / script).is_file(), f"{where}: no file {script}"
    for arg in args:
        if re.fullmatch(r"[\w./-]+\.py", arg) and "/" in arg:
            assert (ROOT / arg).is_file(), f"{where}: no file {arg}"
    if module == "trainer.train" or (script and Path(script).name == "launch.sh"):
        from trainer_utils import compose_cfg
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        try:
            compose_cfg(overrides)
        except Exception as e:   # Hydra's and check_config's errors both name the key
            pytest.fail(f"{where}: the overrides do not compose: {type(e).__name__}: {e}")


# ---- links ----------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(text: str, blank_code: bool = True):
    """(line number, line) outside fenced blocks, with inline code spans blanked unless blank_code is False."""
    fence = ""
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if fence:
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence = ""
            continue
        if m:
            fence = m.group(1)
            continue
        yield n, re.sub(r"(`+).*?\1", "", line) if blank_code else line


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text stays
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    text = path.read_text()
    seen, found = Counter(), set(HTML_ANCHOR.findall(text))
    for _, line in prose_lines(text, blank_code=False):   # inline code is part of a heading's text
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return found


def broken_links(path: Path) -> list:
    bad = []
    for n, line in prose_lines(path.read_text()):
        targets = LINK.findall(line) + REFERENCE.findall(line)
        for target in targets:
            if re.match(r"[a-zA-Z][\w+.-]*:|//", target):   # http:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{n}: {target}"
            if not dest.is_relative_to(ROOT):
                bad.append(f"{where}: points outside the repository")
            elif not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return bad


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_github_slug():
    assert github_slug("Training on one H100 vs Hugging Face + Liger") == "training-on-one-h100-vs-hugging-face--liger"
    assert github_slug("Runs, resume and the run directory") == "runs-resume-and-the-run-directory"
    assert github_slug("`attn_forward` / [API](x.md)") == "attn_forward--api"
