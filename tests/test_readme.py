"""README's two set-up commands stay true: CI runs the test command verbatim."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TORCH_INSTALL = "python3 -m pip install torch==2.13.0"
"""The torch install README's first command opens with: the pin CI installs."""


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith(
        f"{TORCH_INSTALL} && python3 -m pip install -e . && deft-cli ")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_readme_installs_the_torch_ci_pins():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TORCH_INSTALL.replace("pip install", "pip install -q") in ci


def test_main_command_example_exists():
    example = readme_commands()[0].split()[-1]
    assert (ROOT / example).is_file()


def test_cpu_snippet_runs_without_a_gpu():
    """README's CPU example, run as pasted: it sets TRITON_INTERPRET=1 itself."""
    text = (ROOT / "README.md").read_text()
    snippets = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    cpu = [code for code in snippets if 'os.environ["TRITON_INTERPRET"] = "1"' in code]
    assert len(cpu) == 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    check = "\nassert out.shape == q.shape and out.device.type == 'cpu' and out.isfinite().all()"
    result = subprocess.run([sys.executable, "-c", cpu[0] + check], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_transformers_snippet_runs_on_the_cpu(tmp_path):
    """README's transformers example, run as pasted under the interpreter (it writes tree.json
    into its working directory: a temporary one here)."""
    pytest.importorskip("transformers")
    text = (ROOT / "README.md").read_text()
    snippets = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    hf = [code for code in snippets if "sample_tree" in code]
    assert len(hf) == 1
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", hf[0]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert deft_tree_is_readable(tmp_path / "tree.json")


def deft_tree_is_readable(path) -> bool:
    import deft

    return deft.load_tree(path).num_queries == 4
