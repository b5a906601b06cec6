import pytest
import torch

from cdm.world import ATTRIBUTES, Attributes, all_prompts, parse_prompt, prompt_of
from cdm.world.render import random_batch, render
from cdm.world.text import WordTokenizer


def test_world_has_enough_distinct_prompts():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) >= 100
    assert len(ATTRIBUTES) >= 3


def test_prompt_attribute_round_trip():
    for index, prompt in enumerate(all_prompts()):
        attrs = parse_prompt(prompt)
        assert attrs.index == index
        assert Attributes.from_index(index) == attrs
        assert prompt_of(attrs) == prompt


def test_prompt_reads_like_english():
    assert (
        prompt_of(Attributes(shape=2, colour=0, position=0, background=1))
        == "a red bar on the left on a light background"
    )
    assert (
        prompt_of(Attributes(shape=1, colour=2, position=1, background=0))
        == "a blue ring in the center on a dark background"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red blob on the left on a dark background",
        "a red square on the left on a dark background",
        "a red ring on the center on a dark background",
        "a red ring on the left on a grey background",
        "hello",
    ],
)
def test_parse_rejects_non_world_text(bad):
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        parse_prompt(bad)


def test_render_is_deterministic_per_seed():
    attrs = [Attributes(0, 1, 2, 0), Attributes(3, 4, 1, 1)]
    a = render(attrs, [5, 6])
    b = render(attrs, [5, 6])
    assert torch.equal(a, b)
    # An image depends on its own pair only, not on its batch neighbours.
    assert torch.equal(render(attrs[1:], [6])[0], a[1])
    # Another seed gives another image of the same prompt (nuisance variation).
    assert not torch.allclose(render(attrs[:1], [7])[0], a[0])


def test_render_range_and_shape():
    images, index = random_batch(64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert index.min() >= 0 and index.max() < len(all_prompts())


def test_colour_position_and_background_show_in_pixels():
    # A red object on the left: the left third is redder than the right third.
    image = render([Attributes(shape=0, colour=0, position=0, background=0)], [0])[0]
    red_minus_green = image[0] - image[1]
    assert red_minus_green[:, :11].mean() > red_minus_green[:, 21:].mean() + 0.3
    light = render([Attributes(shape=0, colour=0, position=0, background=1)], [0])[0]
    assert light[:, :, 28:].mean() > image[:, :, 28:].mean() + 0.8  # the right edge is background


def test_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.for_world()
    ids = tok(["a red ring on the left on a dark background", ""])
    assert ids.shape == (2, tok.max_length)
    assert (ids[0] == tok.vocab["<unk>"]).sum() == 0
    assert ids[1, 1] == tok.eos_id  # null prompt: BOS EOS PAD...
    tok.save_pretrained(tmp_path)
    again = WordTokenizer.from_pretrained(tmp_path)
    prompt = ["a cyan pillar in the center on a light background"]
    assert torch.equal(again(prompt), tok(prompt))


def test_noisy_captions_name_exactly_one_attribute_wrongly():
    from cdm.world.train import captions

    prompts = all_prompts()
    gen = torch.Generator().manual_seed(0)
    index = torch.randint(len(prompts), (4000,), generator=gen)
    text = captions(index, prompts, p_uncond=0.1, noise=0.3, gen=gen)
    kept = [(t, prompts[i]) for t, i in zip(text, index.tolist(), strict=True) if t]
    assert abs(1 - len(kept) / 4000 - 0.1) < 0.02
    wrong = [(t, p) for t, p in kept if t != p]
    assert abs(len(wrong) / len(kept) - 0.3) < 0.03
    for t, p in wrong:
        a, b = parse_prompt(t).as_tuple(), parse_prompt(p).as_tuple()
        assert sum(x != y for x, y in zip(a, b, strict=True)) == 1
    assert captions(index[:5], prompts, 0.0, 0.0, gen) == [prompts[i] for i in index[:5].tolist()]
