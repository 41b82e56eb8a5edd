"""The README's commands are the ones CI and users run."""

import re

from conftest import REPO


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_readme_opens_with_the_two_set_up_commands():
    readme = (REPO / "README.md").read_text()
    main_command, test_command = _bash_blocks()[:2]
    assert readme.index(main_command) < readme.index("---")
    assert "pytest" in test_command
    # the main job draws with the bundled model: no model to name, nothing to download
    assert "harmon generate" in main_command and "--model" not in main_command


def test_ci_runs_the_readme_test_command():
    test_command = _bash_blocks()[1].strip()
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
