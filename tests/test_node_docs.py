"""The node help pages (web/docs/<node id>.md, what the front end opens from a node's help) match the nodes' schemas."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import make_node_docs  # noqa: E402

pytestmark = pytest.mark.comfy


def test_every_node_has_a_current_help_page(pack):
    want = make_node_docs.pages(pack)
    n = pack.nodes
    assert set(want) == {f"{cls.GET_SCHEMA().node_id}.md" for cls in n.knowledge_base.NODES + n.redi_chain.NODES
                         + n.redi_sampler.NODES + n.custom_sampling.NODES + n.learning.NODES + n.tstitch.NODES
                         + n.calibrated.NODES}
    have = {p.name: p.read_text(encoding="utf-8") for p in make_node_docs.DOCS.glob("*.md")}
    stale = sorted(name for name in want if have.get(name) != want[name])
    assert not stale and set(have) == set(want), f"stale or missing help pages {stale}: run python scripts/make_node_docs.py"


def test_help_pages_link_only_to_files_that_exist():
    for page in make_node_docs.DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text(encoding="utf-8")):
            assert (make_node_docs.DOCS / target).is_file(), f"{page.name} links to {target}, which web/docs does not have"
