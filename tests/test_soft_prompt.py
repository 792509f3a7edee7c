import pytest
import torch

from spt_embed.model.soft_prompt import (
    pack_texts,
    unpack_states,
    init_soft_prompt,
    last_token_pool,
    left_pad_position_ids,
    splice,
    suffix_position_ids,
)

EMBED = torch.arange(40, dtype=torch.float32).reshape(10, 4)  # (V=10, H=4), row i = [4i .. 4i+3]


@pytest.mark.parametrize("init", ["random", "vocab", "text"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_init_shapes_and_determinism(init, k):
    kwargs = {"text_ids": [5, 6]} if init == "text" else {}
    first = init_soft_prompt(EMBED, k, init, seed=1, **kwargs)
    again = init_soft_prompt(EMBED, k, init, seed=1, **kwargs)
    assert first.shape == (k, 4)
    assert torch.equal(first, again)


def test_vocab_init_uses_real_rows():
    vectors = init_soft_prompt(EMBED, 5, "vocab", seed=3)
    for row in vectors:
        assert any(torch.equal(row, e) for e in EMBED)


@pytest.mark.parametrize(
    "k, ids, expected",
    [
        (5, [1, 2, 3], [2, 3, 1, 2, 3]),  # tiled, and the last soft token is the text's last token
        (2, [1, 2, 3], [2, 3]),  # trimmed from the front
        (3, [7, 8, 9], [7, 8, 9]),
    ],
)
def test_text_init_tiles_and_ends_with_last_token(k, ids, expected):
    assert torch.equal(init_soft_prompt(EMBED, k, "text", text_ids=ids), EMBED[expected])


def test_text_init_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="at least one token"):
        init_soft_prompt(EMBED, 4, "text", text_ids=[])


def test_random_init_has_vocab_scale():
    vectors = init_soft_prompt(EMBED, 500, "random", seed=0)
    assert abs(vectors.std().item() - EMBED.std().item()) / EMBED.std().item() < 0.15


def test_left_pad_positions_match_unpadded():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pos = left_pad_position_ids(mask)
    assert pos[0, 2:].tolist() == [0, 1, 2]
    assert pos[1].tolist() == [0, 1, 2, 3, 4]
    assert pos[2].tolist() == [0, 0, 0, 0, 0]


def test_suffix_positions_continue_each_text():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert suffix_position_ids(mask, 2).tolist() == [[2, 3], [3, 4], [0, 1]]
    # and agree with the positions of the full spliced sequence
    full = torch.cat([mask, torch.ones(3, 2, dtype=mask.dtype)], 1)
    assert torch.equal(left_pad_position_ids(full)[:, -2:], suffix_position_ids(mask, 2))


@pytest.mark.parametrize("placement", ["suffix", "prefix"])
def test_splice_layout(placement):
    text = torch.randn(2, 3, 4)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    soft = torch.randn(2, 4)
    embeds, full_mask = splice(text, mask, soft, placement)
    assert embeds.shape == (2, 5, 4)
    if placement == "suffix":
        assert torch.equal(embeds[:, 3:], soft.expand(2, -1, -1))
        assert full_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    else:
        assert torch.equal(embeds[:, :2], soft.expand(2, -1, -1))
        assert full_mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]


def test_splice_keeps_gradient_to_soft_prompt():
    soft = torch.zeros(2, 4, requires_grad=True)
    embeds, _ = splice(torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.long), soft, "suffix")
    embeds.sum().backward()
    assert torch.equal(soft.grad, torch.ones(2, 4))


def test_last_token_pool():
    hidden = torch.randn(2, 5, 3)
    assert torch.equal(last_token_pool(hidden), hidden[:, -1])


def test_pack_texts_layout_and_unpack_roundtrip():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11], [0, 0, 0, 0]])  # left padded; pad id 0
    mask = (ids != 0).long()
    packed, positions, index = pack_texts(ids, mask, row_tokens=6, pad_id=0)
    # longest first, first fit: row 0 = [7 8 9 10 | 5 6], row 1 = [11 | pad tail]
    assert packed.tolist() == [[7, 8, 9, 10, 5, 6], [11, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    # per-token states that remember their token id come back in the left-padded layout
    states = packed.float()[:, None, :, None].expand(-1, 2, -1, 3)  # (R, h, C, d)
    back = unpack_states(states, index)  # (B, h, L, d)
    assert back.shape == (4, 2, 4, 3)
    assert torch.equal(back[:, 0, :, 0] * mask, ids.float() * mask)


def test_pack_texts_gives_a_long_text_its_own_row():
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 6, 7]])
    packed, _, _ = pack_texts(ids, (ids != 0).long(), row_tokens=2, pad_id=0)
    assert packed.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
