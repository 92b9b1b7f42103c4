"""Token checks with the real CLIP vocabulary of a tiny model."""

import pytest
import torch

from lib_ti.tokens import TokenError, check_token_string, init_vectors


def test_known_word_is_refused_with_a_suggestion(tiny_sd1):
    with pytest.raises(TokenError, match="already the known word 'cat</w>'") as e:
        check_token_string(tiny_sd1, "cat")
    suggestion = str(e.value).rsplit("'", 2)[-2]
    assert len(check_token_string(tiny_sd1, suggestion)) > 1  # the suggested fix works


@pytest.mark.parametrize("bad", ["", "my token", "a/b", "x:y"])
def test_unsafe_names(tiny_sd1, bad):
    with pytest.raises(TokenError):
        check_token_string(tiny_sd1, bad)


def test_unique_name_tokenizes_to_several_pieces(tiny_sd1):
    assert len(check_token_string(tiny_sd1, "mytok123")) >= 2


def test_init_word_one_token_fills_every_vector(tiny_sd1):
    vecs = init_vectors(tiny_sd1, "dog", 3)["emb"]
    row = tiny_sd1.token_embeddings("dog")["emb"][0]
    assert vecs.shape == (3, row.shape[0]) and all(torch.equal(v, row) for v in vecs)


def test_multi_token_init_needs_spread_and_spreads_like_a1111(tiny_sdxl):
    with pytest.raises(TokenError, match=r"2 tokens \['teddy</w>', 'bear</w>'\]"):
        init_vectors(tiny_sdxl, "teddy bear", 4)
    vecs = init_vectors(tiny_sdxl, "teddy bear", 4, spread=True)
    for slot, rows in tiny_sdxl.token_embeddings("teddy bear").items():
        # A1111 create_embedding: vec[i] = emb[i * k // n] -> rows 0, 0, 1, 1
        assert torch.equal(vecs[slot], rows[[0, 0, 1, 1]])


def test_empty_init_word_gives_zeros(tiny_sd2v):
    vecs = init_vectors(tiny_sd2v, "", 2)
    assert set(vecs) == set(tiny_sd2v.slots()) and all(v.abs().sum() == 0 for v in vecs.values())
