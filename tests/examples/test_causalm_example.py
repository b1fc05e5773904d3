"""The CausaLM example runs end to end at a small size, and its estimates behave as the pipeline promises."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("concept_erasure")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import causalm  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_causalm_pipeline_small_run():
    results = causalm.main(
        [
            "--size",
            "800",
            "--mlm-epochs",
            "4",
            "--cf-epochs",
            "20",
            "--cf-batch-size",
            "800",
            "--task-epochs",
            "15",
            "--bias",
            "0.0",
            "0.4",
        ]
    )
    small, large = results["bias"][0.0], results["bias"][0.4]
    for values in (small, large):
        assert all(math.isfinite(v) for v in values.values())
    # the label bias makes gender matter more to the original classifier, and TReATE sees it grow
    assert large["ate_gt"] > small["ate_gt"] and large["treate"] > small["treate"]
    # the flip-contrast TReATE is closer to the ground truth than the confounded CONEXP (measured at this
    # size: 0.026 against 0.29 at bias 0, 0.032 against 0.14 at bias 0.4)
    for values in (small, large):
        assert abs(values["treate"] - values["ate_gt"]) < abs(values["conexp"] - values["ate_gt"]) - 0.05
        assert values["treate_removal"] < values["treate"]  # removal reaches only part of the way to the twin
    # BERT-CF keeps the control concept and loses gender compared with BERT-O
    assert results["is_name_probe_CF"] > 0.9
    assert results["probe_CF"] < results["probe_O"]
    # LEACE erases gender linearly from BERT-O in closed form: a fresh probe finds the majority rate
    assert results["probe_LEACE"] < results["probe_majority"] + 0.03


@pytest.mark.filterwarnings("ignore")
def test_causalm_pipeline_loads_a_local_pretrained_encoder_and_its_tokenizer(tmp_path):
    import torch
    import transformers

    from lightning_xai.datasets import EmotionTemplates
    from lightning_xai.datasets.emotion_templates import SPECIAL_TOKENS

    # a "pretrained" checkpoint in save_pretrained layout, with a WordPiece tokenizer of its own vocabulary
    words = [w for w in EmotionTemplates.vocabulary if w not in SPECIAL_TOKENS]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", *words]
    tokenizer = transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model_dir = tmp_path / "tiny-bert"
    transformers.BertForMaskedLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    data = EmotionTemplates(4, seed=0, tokenizer=tokenizer)
    first = data[0]
    # the tokenizer frames each sentence with [CLS] ... [SEP] and keeps the corpus's words
    assert first["input"][0] == tokenizer.cls_token_id and tokenizer.sep_token_id in first["input"].tolist()
    assert first["attention_mask"].sum() == (first["input"] != tokenizer.pad_token_id).sum()
    words_back = [t for t in tokenizer.convert_ids_to_tokens(first["input"]) if t not in tokenizer.all_special_tokens]
    assert words_back == data.sentences[0].text.split()
    twin = tokenizer.convert_ids_to_tokens(first["counterfactual_input"])
    assert [t for t in twin if t not in tokenizer.all_special_tokens] == data.sentences[0].counterfactual.split()

    args = ["--size", "400", "--mlm-epochs", "1", "--cf-epochs", "5", "--cf-batch-size", "400", "--bias", "0.4"]
    results = causalm.main(["--model-path", str(model_dir), "--lr", "1e-3", *args])
    values = results["bias"][0.4]
    assert all(math.isfinite(v) for v in values.values())
    assert 0.0 <= values["treate_removal"] <= values["treate"] and values["ate_gt"] > 0.0
    # even five adversarial steps on the loaded encoder take gender towards the mood floor (measured 0.76 ->
    # 0.58), while the control concept stays about as decodable (0.89 -> 0.87)
    assert results["probe_CF"] < results["probe_O"] - 0.1
    assert results["is_name_probe_CF"] > results["is_name_probe_O"] - 0.05
