"""docs/CONFIG.md is the rendered config reference; it must not drift from the code."""

from pathlib import Path

from rlx.config import help_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"
HEADER = "# Config reference\n\nGenerated from the config classes (`rlx config --help-config`; refresh with `make docs`).\n\n"


def render() -> str:
    return HEADER + "```text\n" + help_config().rstrip() + "\n```\n"


def test_config_reference_is_up_to_date():
    assert DOC.read_text() == render(), "docs/CONFIG.md is stale: run `make docs`"


if __name__ == "__main__":
    DOC.write_text(render())
