"""Text encoders: UMT5 from a local directory (a tiny random config saved to tmp_path, no
downloads), padding zeroed, batch independence, and the per-prompt cache.

Tolerance: fp32, a prompt encoded alone vs inside a batch: max abs difference <= 1e-5.
"""

import pytest
import torch

from spiral_rt.models.text import CachedTextEncoder, TextEmbeddings, TextEncoder, UMT5TextEncoder

WORDS = "a cat dog runs on the beach at sunset red car drives through city rain slowly".split()


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("umt5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path / "tokenizer")
    cfg = transformers.UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=4, num_layers=2, d_ff=24,
                                  relative_attention_num_buckets=8, dropout_rate=0.0)
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(cfg).save_pretrained(path / "text_encoder")
    return path


def test_umt5_encode_pads_and_zeroes(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir, max_length=24)
    assert isinstance(enc, TextEncoder) and enc.dim == 16
    prompts = ["a red car drives through the city at sunset slowly", "a cat"]
    out = enc.encode(prompts)
    assert out.embeddings.shape == (2, 24, 16) and out.mask.shape == (2, 24)
    assert out.lengths.tolist() == [10, 2]
    assert torch.all(out.embeddings[1, 2:] == 0) and torch.all(out.embeddings[0, 10:] == 0)
    assert out.embeddings[1, :2].abs().min() > 0
    alone = enc.encode(["a cat"])
    assert (alone.embeddings[0] - out.embeddings[1]).abs().max() <= 1e-5


def test_umt5_default_length_and_errors(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir)
    assert enc.encode(["dog"]).embeddings.shape == (1, 512, 16)
    with pytest.raises(ValueError, match="'prompts'"):
        enc.encode("dog")
    with pytest.raises(ValueError, match="'path'"):
        UMT5TextEncoder(umt5_dir / "missing")


class _CountingEncoder:
    dim, max_length = 8, 5

    def __init__(self):
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        emb = torch.stack([torch.full((self.max_length, self.dim), float(len(p))) + torch.randn(self.max_length, self.dim)
                           for p in prompts])
        return TextEmbeddings(emb, torch.ones(len(prompts), self.max_length, dtype=torch.bool))


def test_cache_encodes_each_prompt_once():
    inner = _CountingEncoder()
    enc = CachedTextEncoder(inner, max_entries=2)
    a = enc.encode(["walk left", "jump"])
    b = enc.encode(["jump", "walk left", "jump"])
    assert inner.calls == [["walk left", "jump"]]
    assert torch.equal(b.embeddings[0], a.embeddings[1]) and torch.equal(b.embeddings[1], a.embeddings[0])
    enc.encode(["run", "jump"])                 # evicts "walk left" (least recently used)
    assert inner.calls[-1] == ["run"] and len(enc) == 2
    enc.encode(["walk left"])
    assert inner.calls[-1] == ["walk left"]
    assert enc.hits == 4 and enc.misses == 4
