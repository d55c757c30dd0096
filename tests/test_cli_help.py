"""Every command line answers --help (exit 0, its keys or options listed) without a GPU: each trainer module with a
`__main__` block (trainer.train, trainer.eval_passkey, and any added later), each scripts/*.py tool and each
scripts/*.sh, found by glob. The Python commands run in parallel, one subprocess each."""

import os
import subprocess
import sys

import pytest

from helpers import ROOT

MAIN_GUARD = 'if __name__ == "__main__":'


def cli_modules() -> list[str]:
    files = sorted(ROOT.glob("trainer/**/*.py")) + sorted(ROOT.glob("scripts/*.py"))
    return [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files if MAIN_GUARD in f.read_text()]


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU needed to print help
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in cli_modules()}
    done = {}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[module] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_the_clis_are_found():
    found = cli_modules()
    assert {"trainer.train", "trainer.eval_passkey", "scripts.bench_attention"} <= set(found), found


@pytest.mark.parametrize("module", cli_modules())
def test_help_exits_0_and_lists_the_keys(helps, module):
    proc = helps[module]
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "Traceback" not in proc.stderr
    assert "usage" in text.lower() or "keys" in text.lower(), text[:500]
    if module == "trainer.train":  # Hydra's help with the config groups and every key with its meaning
        assert "== Config groups" in text and "experiment: cpu_default" in text
        assert "data.seq_len: 256" in text and "# tokens per packed sequence" in text
        assert "run_name: cpu_default" in text
    if module == "trainer.eval_passkey":
        assert "checkpoint: ???" in text and "# prompts per (length, depth)" in text


@pytest.mark.parametrize("script", sorted(p.name for p in ROOT.glob("scripts/*.sh")))
def test_shell_scripts_print_their_header_on_help_and_run_nothing(script, tmp_path):
    path = ROOT / "scripts" / script
    header = [line[2:] for line in path.read_text().splitlines()[1:4] if line.startswith("# ")]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "R": str(tmp_path / "r")}
    proc = subprocess.run(["bash", str(path), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert header and header[0] in proc.stdout and "#" not in proc.stdout.splitlines()[0]
    assert not any(tmp_path.iterdir())  # no output directory: nothing ran
