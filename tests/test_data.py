"""fvgpt_cache.data: split files and dataset names."""
import json
import re

import pytest

from fvgpt_cache.data import default_dataset_name, read_split_json


@pytest.mark.parametrize("root, name", [("pets/images", "pets"), ("my flowers/jpg", "my_flowers"),
                                        ("shapes", "shapes"), ("birds/data/imgs", "birds")])
def test_default_dataset_name_comes_from_the_image_folder(tmp_path, root, name):
    assert default_dataset_name(tmp_path / root) == name


@pytest.mark.parametrize("content, message", [
    ({"train": [["a.jpg", 0, "a"]], "val": []}, "has no 'test' split"),
    ({"train": [], "val": [], "test": [["a.jpg", 0, "a"]]}, "the 'train' split is empty"),
])
def test_split_file_with_a_missing_or_empty_split_names_file_and_split(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{message}|{message}"):
        read_split_json(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_split_json(path)
