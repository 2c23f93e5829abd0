"""Prompt files: where a node may read them from (ComfyUI's input folder only) and how they are parsed."""

from __future__ import annotations

import json
import os

import pytest

from kb_tools.core.errors import KBError
from kb_tools.build.prompts import input_file, read_prompts


@pytest.fixture
def input_dir(tmp_path):
    d = tmp_path / "ComfyUI" / "input"
    (d / "lists").mkdir(parents=True)
    (d / "prompts.txt").write_text("a cat\na dog\n")
    (d / "lists" / "more.jsonl").write_text('{"prompt": "a fox"}\n')
    (tmp_path / "secret.txt").write_text("not for nodes")
    return d


@pytest.mark.parametrize("name", ["prompts.txt", " prompts.txt ", "lists/more.jsonl", "./lists/more.jsonl", "lists\\more.jsonl"])
def test_relative_names_inside_the_input_folder_are_read(input_dir, name):
    path = input_file(name, input_dir)
    assert path.is_file() and str(path).startswith(os.path.realpath(input_dir))


@pytest.mark.parametrize("name, words", [
    ("/etc/passwd", r"is an absolute path"),
    ("C:\\Windows\\win.ini", r"is an absolute path"),
    ("C:relative.txt", r"is an absolute path"),
    ("\\\\server\\share\\p.txt", r"is an absolute path"),
    ("~/prompts.txt", r"is an absolute path"),
    ("../secret.txt", r"contains '\.\.'"),
    ("lists/../../secret.txt", r"contains '\.\.'"),
    ("lists\\..\\..\\secret.txt", r"contains '\.\.'"),
    ("escape/secret.txt", r"leads outside ComfyUI's input folder"),
    ("escape.txt", r"leads outside ComfyUI's input folder"),
    ("missing.txt", r"is not a file in ComfyUI's input folder"),
    ("lists", r"is not a file in ComfyUI's input folder"),
    ("a\0b.txt", r"contains a NUL byte"),
    ("   ", r"is empty"),
])
def test_names_leading_anywhere_else_are_refused_with_the_fix(input_dir, name, words):
    (input_dir / "escape").symlink_to(input_dir.parent.parent, target_is_directory=True)
    (input_dir / "escape.txt").symlink_to(input_dir.parent.parent / "secret.txt")
    with pytest.raises(KBError, match=words + r".*ComfyUI's input folder.*python -m kb_tools build --prompts"):
        input_file(name, input_dir)


def test_read_prompts_formats_and_bad_files(tmp_path):
    (tmp_path / "p.txt").write_text("  a cat \n\na dog\na cat\n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x"}\n"y"\n\n{"text": "z"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y", "z"]
    coco = {"annotations": [{"image_id": 2, "id": 5, "caption": "b1"}, {"image_id": 1, "id": 9, "caption": "a2"},
                            {"image_id": 1, "id": 3, "caption": "a1"}, {"image_id": "odd", "caption": 7}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "c.json") == ["a1", "b1"]
    assert read_prompts(tmp_path / "c.json", first_caption_only=False) == ["a1", "a2", "b1"]
    for name, content, words in [
        ("latin.txt", "café".encode("latin-1"), r"is not UTF-8 text.*save it as UTF-8"),
        ("bad.jsonl", b'{"prompt": 1}\n', r"has no 'prompt', 'caption' or 'text' string field"),
        ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000, r"holds JSON this reader cannot take"),
        ("bad.json", b"{", r"is not valid JSON"),
        ("notcoco.json", b'{"annotations": [1, 2]}', r"is not a COCO captions file"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(KBError, match=words):
            read_prompts(tmp_path / name)
