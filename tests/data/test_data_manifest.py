"""read_manifest's errors: one line naming the file, and what to do about it."""

import pytest

from pipeline.data import ManifestError, read_manifest


@pytest.mark.parametrize("make_dir", [False, True], ids=["no-directory", "no-index"])
def test_shards_that_are_not_there_say_how_to_build_them(tmp_path, make_dir):
    # Training with data.train_shards pointing at nothing ended in a 22-line traceback whose
    # last line did not say that the shards are built by build_shards.py.
    root = tmp_path / "shards" / "train"
    if make_dir:
        root.mkdir(parents=True)
    with pytest.raises(ManifestError) as error:
        read_manifest(root)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'index.json'}: no such file (no shards in {root}); ")
    assert message.endswith(
        f"build them with: python launch/build_shards.py --annotations FILE --images DIR "
        f"--out {root}"
    )


def test_a_malformed_index_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"index\.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "index.json").write_text('{"shards": []}')
    with pytest.raises(ManifestError, match=r"index\.json: malformed manifest: KeyError"):
        read_manifest(tmp_path)
