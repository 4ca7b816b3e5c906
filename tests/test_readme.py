"""README's two set-up commands stay true: CI runs the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m pip install -e . && deft-cli ")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_main_command_example_exists():
    example = readme_commands()[0].split()[-1]
    assert (ROOT / example).is_file()
