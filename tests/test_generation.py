import io
import json
import os

import pytest
import torch
from rich.console import Console

from kedit.data.cases import EditCase, PromptSet
from kedit.evaluation.generation import (
    common_prefix,
    default_prompts,
    generate,
    render_markdown,
    render_table,
    write_generations,
)
from tiny import tiny_model

PROMPTS = [
    "The",
    "The history of the city of London",
    "In 1990 , the band released their second album",
    "A",
    "It was",
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ----------------------------------------------------------------------------- generate


# gpt2 has absolute position embeddings: wrong position ids under left padding change
# its text (rotary models are invariant to a uniform shift, so they check the mask).
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_padded_batch_matches_one_at_a_time(family):
    lm = tiny_model(family)
    assert lm.model.dtype == torch.float32
    batched = generate(lm, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS))
    single = [generate(lm, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1  # the tiny model does not just repeat one thing
    # batch size does not matter either
    assert generate(lm, PROMPTS, max_new_tokens=10, batch_size=2) == single


def test_returns_only_the_continuation(llama):
    tok = llama.tokenizer
    [cont] = generate(llama, ["The history of"], max_new_tokens=5)
    ids = tok("The history of")["input_ids"]
    out = llama.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert cont == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert not cont.startswith("The history of")


def test_tokenizer_and_model_state_untouched(llama):
    tok = llama.tokenizer
    side, pad = tok.padding_side, tok.pad_token
    llama.model.train()
    try:
        generate(llama, PROMPTS[:2], max_new_tokens=3)
        assert llama.model.training  # mode restored
    finally:
        llama.model.eval()
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_empty_prompt_list_and_bad_arguments(llama):
    assert generate(llama, [], max_new_tokens=3) == []
    with pytest.raises(ValueError):
        generate(llama, ["a"], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate(llama, ["a"], batch_size=0)


def test_sampling_is_seeded_and_leaves_global_rng_alone(llama):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = generate(llama, PROMPTS, max_new_tokens=8, sample=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(llama, PROMPTS, max_new_tokens=8, sample=True, seed=7)
    c = generate(llama, PROMPTS, max_new_tokens=8, sample=True, seed=8)
    assert a == b
    assert a != c  # a random tiny model is near-uniform over 512 tokens
    greedy = generate(llama, PROMPTS, max_new_tokens=8)
    assert a != greedy
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_one_sampling_is_greedy(llama):
    greedy = generate(llama, PROMPTS, max_new_tokens=6)
    assert generate(llama, PROMPTS, max_new_tokens=6, sample=True, top_k=1, seed=3) == greedy


# ----------------------------------------------------------------------------- prompts


def test_default_prompts_content_order_and_dedup():
    c1 = EditCase(
        case_id="c1",
        template="{} is in",
        subject="The Eiffel Tower",
        target_new="Rome",
        rephrase_prompts=("Where is the Eiffel Tower?", "The Eiffel Tower is in"),  # 2nd == prompt
        locality=(PromptSet("nb", ("The Louvre is in", "Where is the Eiffel Tower?"), ("Paris",)),),
        generation_prompts=("The Eiffel Tower is a", "The Eiffel Tower is"),  # 2nd == subject prompt
    )
    c2 = EditCase(case_id="c2", template="{} plays", subject="Michael Jordan", target_new="soccer",
                  locality=(PromptSet("nb", "The Louvre is in", "Paris"),))
    rows = default_prompts([c1, c2])
    assert all(set(r) == {"case_id", "kind", "prompt"} for r in rows)
    got = [(r["case_id"], r["kind"], r["prompt"]) for r in rows]
    assert got == [
        ("c1", "prompt", "The Eiffel Tower is in"),
        ("c1", "rephrase", "Where is the Eiffel Tower?"),
        ("c1", "locality", "The Louvre is in"),
        ("c1", "generation", "The Eiffel Tower is a"),
        ("c1", "generation", "The Eiffel Tower is"),
        ("c1", "subject", "The Eiffel Tower, the"),
        ("c2", "prompt", "Michael Jordan plays"),
        ("c2", "locality", "The Louvre is in"),  # same prompt, other case: kept
        ("c2", "subject", "Michael Jordan, the"),
        ("c2", "subject", "Michael Jordan is"),
    ]


# ----------------------------------------------------------------------------- common_prefix


@pytest.mark.parametrize(
    "a,b,k",
    [
        ("the city of Paris", "the city of Parma", 12),  # back to the word start
        ("the city of Paris", "the city of Rome", 12),
        ("Paris", "Parisian", 0),
        ("Paris", "Paris is", 5),  # one is a prefix of the other, at a boundary
        ("Paris.", "Paris!", 5),
        ("same", "same", 4),
        ("", "", 0),
        ("", "abc", 0),
        ("abc", "xyz", 0),
        (" Paris is", " Rome is", 1),
    ],
)
def test_common_prefix(a, b, k):
    assert common_prefix(a, b) == k
    assert common_prefix(b, a) == k
    assert a[:k] == b[:k]


def test_common_prefix_raw():
    assert common_prefix("the city of Paris", "the city of Parma", word_boundary=False) == 15


# ----------------------------------------------------------------------------- rendering

ROWS = [
    {"case_id": "c1", "kind": "prompt", "prompt": "The Eiffel Tower is in",
     "before": " the city of Paris.", "after": " the city of Rome."},
    {"case_id": "c1", "kind": "locality", "prompt": "The Louvre is in",
     "before": " Paris, France", "after": " Paris, France"},
    {"case_id": "c2", "kind": "subject", "prompt": "Michael Jordan is",
     "before": " a *star* | [b]x[/b]\nnext", "after": ""},
]


def test_render_markdown():
    md = render_markdown(ROWS)
    assert "## Case c1" in md and "## Case c2" in md
    assert md.index("## Case c1") < md.index("## Case c2")
    for r in ROWS:
        assert r["prompt"] in md
    assert "| before |  the city of **Paris.** |" in md
    assert "| after |  the city of **Rome.** |" in md
    # the unchanged row shows its text once and "(unchanged)"
    assert "| before |  Paris, France |" in md
    assert "| after | *(unchanged)* |" in md
    assert md.count("(unchanged)") == 1
    assert "1 of 2 changed" in md
    # markdown-special characters cannot break the table; empty text is visible
    assert "\\*star\\*" in md and "\\|" in md and "<br>" in md and "*(empty)*" in md
    for line in md.splitlines():
        if line.startswith("| before") or line.startswith("| after"):
            assert line.replace("\\|", "").count("|") == 3


def test_render_table():
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False, color_system=None)
    table = render_table(ROWS, console)
    text = buf.getvalue()
    assert "(unchanged)" in text and "Eiffel Tower" in text
    assert "[b]x[/b]" in text  # never parsed as markup
    assert table.row_count == 3
    # styles: shared prefix dim, divergent parts highlighted
    before = table.columns[3]._cells[0]
    after = table.columns[4]._cells[0]
    assert before.plain == " the city of Paris." and after.plain == " the city of Rome."
    styles = {str(s.style) for s in before.spans} | {str(s.style) for s in after.spans}
    assert "dim" in styles and "bold red" in styles and "bold green" in styles


def test_write_generations(tmp_path):
    jsonl, md = write_generations(ROWS, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["generations.jsonl", "generations.md"]
    back = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert back == ROWS
    assert md.read_text(encoding="utf-8") == render_markdown(ROWS)
    write_generations(ROWS[:1], tmp_path / "run", stem="g2")  # other stem, overwrite-safe
    write_generations(ROWS[:1], tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["g2.jsonl", "g2.md", "generations.jsonl", "generations.md"]
    assert len(jsonl.read_text().splitlines()) == 1


def test_write_generations_failure_leaves_no_temp(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_generations(ROWS, tmp_path)
    assert os.listdir(tmp_path) == []
