"""The README's commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    main, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
    assert "pytest" in tests and "torch==2.13.0" in tests


def test_main_command_installs_and_runs_record_then_fit():
    main, _ = readme_commands()
    assert main.startswith("python3 -m venv .venv") and "torch==2.13.0" in main
    assert main.endswith("python -m calibrate.record && python -m calibrate.fit closed_loop=15 search=8")


def test_readme_names_only_shipped_coefficients():
    from runtime import available_names

    text = (ROOT / "README.md").read_text()
    listed = re.search(r"ships the published polynomials of\n(.+?) untouched", text, flags=re.S).group(1)
    names = set(re.findall(r"`(\w+)`", listed))
    assert names and names <= set(available_names())


def test_readme_runtime_example_runs_as_written_on_the_bundled_model(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the runtime", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```python\n(.+?)\n```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    computed, skipped = map(int, capsys.readouterr().out.split())
    assert computed + skipped == 25 and skipped > 0
    assert namespace["image"].size == (32, 32)
    assert not any(type(m).__dict__.get("_intercepted_from") for m in namespace["pipe"].transformer.modules())


def test_readme_speaks_only_of_what_users_have():
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text and "brief" not in text.lower()
