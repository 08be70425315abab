"""docs/failures.md names a test for every failure it lists: each named test exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_test_the_failure_table_names_exists():
    text = (ROOT / "docs" / "failures.md").read_text()
    named = re.findall(r"`(tests/\w+\.py)?::(\w+)", text)  # "`::name`": in the file named before it
    assert len(named) >= 20
    last_file = None
    for file, name in named:
        file = file or last_file
        last_file = file
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), f"{file}::{name} is not a test"
