"""A causal text tower (CLIP's) pools at its end-of-text token: its first token sees only itself, so
first-token pooling gives every caption the same vector."""
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models.encoders import HFTextEncoder


@pytest.fixture(scope="module")
def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0)).eval()


def _captions():
    """Two different captions of different lengths, right-padded, beginning with the same start token."""
    ids = torch.tensor([[1, 7, 9, 12, 2, 0, 0], [1, 30, 4, 22, 41, 17, 2]])
    return {"input_ids": ids, "attention_mask": (torch.arange(7) < torch.tensor([[5], [7]])).long()}


def test_causal_text_tower_pools_at_the_end_of_text(clip_text):
    encoder = HFTextEncoder(clip_text)  # pooling: auto
    assert encoder.pooling == "eot"
    with torch.no_grad():
        out = encoder(**_captions())
    assert torch.allclose(out.tokens[0, 0], out.tokens[1, 0], atol=1e-6)  # the first token: the same for both
    assert not torch.allclose(out.vector[0], out.vector[1], atol=1e-3)
    assert torch.equal(out.vector[0], out.tokens[0, 4]) and torch.equal(out.vector[1], out.tokens[1, 6])


def test_first_token_pooling_on_a_causal_tower_is_refused(clip_text):
    with pytest.raises(ConfigError, match="causal"):
        HFTextEncoder(clip_text, pooling="cls")


def test_bert_keeps_its_cls_token():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False).eval()
    encoder = HFTextEncoder(bert)
    assert encoder.pooling == "cls"
    with torch.no_grad():
        out = encoder(**_captions())
    assert torch.equal(out.vector, out.tokens[:, 0])
