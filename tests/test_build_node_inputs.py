"""BuildKnowledgeBase refuses, at validation, a prompts_file outside ComfyUI's input folder and a bad kb_name
(the real node class, with ComfyUI's own folder_paths)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy


@pytest.fixture
def node(pack, tmp_path, monkeypatch):
    import folder_paths

    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "prompts.txt").write_text("a cat\n")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    return pack.nodes.knowledge_base.BuildKnowledgeBase


def test_prompts_file_is_validated_against_the_input_folder(node):
    assert node.validate_inputs(prompts_file="prompts.txt", kb_name="my-kb") is True
    assert node.validate_inputs(prompts_file="", kb_name="my-kb") is True
    assert node.validate_inputs() is True  # linked inputs are not known at validation
    for name, words in [("/etc/passwd", "is an absolute path"), ("../../etc/passwd", "contains '..'"),
                        ("nope.txt", "is not a file in ComfyUI's input folder")]:
        message = node.validate_inputs(prompts_file=name, kb_name="my-kb")
        assert isinstance(message, str) and words in message and "relative to that folder" in message


def test_kb_name_is_validated(node):
    for name in ("x" * 300, "a/b", "kb\0"):
        message = node.validate_inputs(prompts_file="", kb_name=name)
        assert isinstance(message, str) and "plain folder name" in message


def test_index_type_defaults_to_auto(node):
    schema = node.define_schema()
    index_type = next(i for i in schema.inputs if i.id == "index_type")
    assert index_type.options == ["auto", "flat", "ivf", "hnsw"] and index_type.default == "auto"
