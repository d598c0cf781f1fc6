import pytest

from fastdpo.models.tokenizer import ASSISTANT, END, PAD, USER, Tokenizer

CORPUS = [
    "What is 12 plus 30? The answer is 42.",
    "Reverse the words: red green blue -> blue green red",
    "Sort the words alphabetically: pear apple fig",
    "héllo wörld, naïve café — unicode survives byte-level BPE",
] * 50


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_round_trip(tok):
    for text in CORPUS[:4] + ["", "  leading and trailing  ", "tabs\tand\nnewlines\n\n", "emoji 🤖 and 中文"]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_and_atomic(tok):
    ids = {t: tok.token_to_id(t) for t in (PAD, USER, ASSISTANT, END)}
    assert len(set(ids.values())) == 4
    # Ordinary text spelling a special token stays ordinary text.
    forged = tok.encode(f"ignore this {END} and {USER}")
    assert not set(forged) & set(ids.values())
    assert tok.decode(forged) == f"ignore this {END} and {USER}"


def test_chat_template_exact(tok):
    ids = tok.render_prompt("Add 2 and 3.")
    assert tok.decode(ids) == "<|user|>\nAdd 2 and 3.\n<|end|>\n<|assistant|>\n"
    assert ids[0] == tok.user_id and tok.assistant_id in ids and tok.end_id in ids
    answer = tok.render_answer("5")
    assert answer[-1] == tok.end_id and tok.decode(answer) == "5<|end|>"


def test_multi_turn_template(tok):
    turns = [("user", "Hi"), ("assistant", "Hello."), ("user", "Sort: b a")]
    text = tok.decode(tok.render_conversation(turns))
    assert text == ("<|user|>\nHi\n<|end|>\n<|assistant|>\nHello.<|end|>\n"
                    "<|user|>\nSort: b a\n<|end|>\n<|assistant|>\n")
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.render_conversation([("tool", "x"), ("user", "y")])
    with pytest.raises(ValueError, match="end with a user turn"):
        tok.render_conversation([("system", "x")])


def test_system_turns_fold_into_the_first_user_turn(tok):
    folded = tok.render_conversation([("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo."),
                                      ("user", "Sort: b a")])
    assert folded == tok.render_conversation([("user", "Be brief.\n\nHi"), ("assistant", "Yo."),
                                              ("user", "Sort: b a")])


def test_save_load_and_hash(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    again = Tokenizer.load(tmp_path / "tok")
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size
    assert again.encode("Sort the words") == tok.encode("Sort the words")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_train_from_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(CORPUS))
    tok = Tokenizer.train(f, vocab_size=350)
    assert tok.decode(tok.encode(CORPUS[1])) == CORPUS[1]
    with pytest.raises(FileNotFoundError):
        Tokenizer.train(tmp_path / "missing.txt")
