"""Any Hugging Face causal LM sharing the target's tokenizer works as the target; a drafter with another
vocabulary is refused, naming both."""

from __future__ import annotations

import shutil

import pytest

from cosine.engine.models import load_model
from cosine.engine.speculative import SpeculativeEngine
from cosine.errors import InvalidParameterError, ModelLoadError
from cosine.zoo import paths

from .helpers import tiny_llama


def _save_with_zoo_tokenizer(model, folder, zoo_root):
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(paths.target_dir(zoo_root) / name, folder / name)


def test_drafter_with_other_vocabulary_is_refused(tmp_path, zoo_root):
    other = tmp_path / "other-drafter"
    tiny_llama(vocab=1000).save_pretrained(str(other))
    with pytest.raises(ModelLoadError) as err:
        SpeculativeEngine.from_paths(paths.target_dir(zoo_root), {"odd": other})
    msg = str(err.value)
    assert "1000 ids" in msg and "4096 ids" in msg and str(other) in msg


def test_unknown_model_path_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "nothing-here")
    with pytest.raises(InvalidParameterError) as err:
        load_model(tmp_path, dtype="float8")
    assert err.value.field == "dtype"
