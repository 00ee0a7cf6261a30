"""The README stays a front door that tells the truth: short, its config table equal to `configs/`, its links alive,
its install and test commands the ones CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_BYTES = 15 * 1024
# Config folders a user does not pick from a fixed list: `hydra` is Hydra's own namespace (run and sweep folders,
# `hydra/launcher=slurm`, documented in docs/scaling.md), and `local` holds this machine's own overrides, whose files
# differ from machine to machine.
INTERNAL_GROUPS = {"hydra", "local"}
OPTION = re.compile(r"`([a-z0-9_]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def section(markdown: str, heading: str) -> str:
    """The text under `## heading` up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def config_table() -> dict[str, set[str]]:
    """{group: options} from the README's config-groups table: the group is the first cell's backticked name, the
    options every backticked plain name in the second cell (keys such as `paths.output_dir=DIR` are not options)."""
    table = {}
    for line in section(README.read_text(), "Config groups").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        table[OPTION.match(cells[0]).group(1)] = set(OPTION.findall(cells[1]))
    return table


def options_on_disk(group: str) -> set[str]:
    return {path.stem for path in (ROOT / "configs" / group).glob("*.yaml")}


def test_readme_is_at_most_15_kb():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move reference material to docs/"


def test_config_table_lists_every_group_of_configs():
    groups = {path.name for path in (ROOT / "configs").iterdir() if path.is_dir()} - INTERNAL_GROUPS
    assert set(config_table()) == groups


@pytest.mark.parametrize("group", sorted(config_table()))
def test_config_table_row_lists_exactly_the_option_files(group):
    listed = config_table()[group]
    if group == "experiment":  # its row points at the presets list, which must name every preset
        listed = set(OPTION.findall(section(README.read_text(), "Presets (`experiment=`)")))
    assert listed == options_on_disk(group), (
        f"README's `{group}` row: missing {sorted(options_on_disk(group) - listed)}, "
        f"not in configs/{group}/ {sorted(listed - options_on_disk(group))}"
    )


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda path: path.name)
def test_relative_links_point_at_existing_files(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL, not a file of the repository
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.M)
            assert anchor in {github_anchor(heading) for heading in headings}, f"{page.name}: no heading #{anchor} in {path}"


def test_install_and_test_commands_are_the_ones_ci_runs():
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    block = re.search(r"```bash\n(.*?)```", section(README.read_text(), "Install and test"), flags=re.S)
    assert block, "README's 'Install and test' has no bash block"
    assert block.group(1).strip().splitlines() == ci_commands == ['pip install -e ".[dev]"', 'python -m pytest -q -m "not slow"']
