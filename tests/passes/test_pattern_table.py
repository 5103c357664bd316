"""The README's table of recognised patterns is the one tests/pattern_table.py generates from the
forms the tests run (regenerate with `python tests/pattern_table.py --write`)."""

from pattern_table import readme_section, table


def test_readme_pattern_table_is_current():
    assert readme_section() == table().strip(), "README.md's pattern table is stale: python tests/pattern_table.py --write"
