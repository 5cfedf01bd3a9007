"""The README's test command is the one CI runs, and on a fresh machine it installs what the tests need first
(the browser test's Chromium included) and then runs the whole suite."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_the_readme_gives_one_test_command_the_ci_script():
    section = read("README.md").split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    assert blocks == ["bash .ci/run\n"]


def test_the_ci_script_installs_what_the_tests_need_then_runs_them_all():
    script = read(".ci", "run")
    subprocess.run(["bash", "-n", os.path.join(ROOT, ".ci", "run")], check=True)  # it parses
    assert '"$VENV/bin/pip" install -q -r requirements-test.txt' in script
    browser = re.search(r'executable_path="([^"]+)"', read("tests", "test_sampling.py")).group(1)
    assert f"CHROMIUM={browser}\n" in script and "apt-get install -y -qq chromium" in script
    commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == 'python -m pytest -q "$@"'  # the whole suite (pytest.ini: testpaths = tests)
