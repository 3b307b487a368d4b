"""Choices in run config and resources are typed: a misspelt backend or scheduler is refused when the config is
read, before any asset starts work, with the valid choices named."""

import pytest
from pydantic import ValidationError


@pytest.mark.parametrize("field, value, choices", [("ocr_backend", "tesseract", "rapidocr"), ("flow_backend", "raft", "farneback")])
def test_model_store_refuses_an_unknown_backend(field, value, choices):
    from resources.model_store import ModelStore

    with pytest.raises(ValidationError, match=choices):
        ModelStore(**{field: value})


def test_evaluation_config_refuses_an_unknown_scheduler():
    from assets.evaluation import EvaluationConfig

    with pytest.raises(ValidationError, match="dpm-solver"):
        EvaluationConfig(scheduler="ddim")
    assert EvaluationConfig(scheduler="rflow").scheduler == "rflow" and EvaluationConfig().scheduler is None
