"""Incremental detokenisation and stop strings: the pieces join to the whole decode, a multi-byte
character is never shown half-made, and text is cut before a stop string (held back while it might
become one)."""
import pytest

from moerun.serve.text_stream import TextStream

TEXT = "日本語 héllo wörld, the end."


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE tokenizer (as GPT-2 and Qwen use) trained here on a few lines: characters
    outside ASCII span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    backend.train_from_iterator(["héllo wörld the end", "stop here"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _pieces(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.add(t) for t in ids] + [stream.finish()]


def test_pieces_join_to_the_whole_decode_and_never_split_a_character(byte_level):
    ids = byte_level(TEXT).input_ids
    assert len(ids) > len(TEXT.split())  # characters span tokens
    pieces = _pieces(TextStream(byte_level), ids)
    assert "".join(pieces) == byte_level.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_word_level_pieces_keep_their_spaces(tokenizer_of):
    tokenizer = tokenizer_of()
    ids = tokenizer("w1 w2 w3").input_ids
    assert _pieces(TextStream(tokenizer), ids) == ["w1", " w2", " w3", ""]


@pytest.mark.parametrize("stop, shown", [
    (["wörld"], "日本語 héllo "),
    ([", the", "héllo"], "日本語 "),  # the earliest of several
    (["end!"], TEXT),  # "end" looked like its start, then the text went on: all of it is shown
    (["日本"], ""),
])
def test_text_is_cut_before_a_stop_string(byte_level, stop, shown):
    stream = TextStream(byte_level, stop)
    pieces = _pieces(stream, byte_level(TEXT).input_ids)
    assert "".join(pieces) == shown
    assert stream.stopped == (shown != TEXT)


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer_of):
    tokenizer = tokenizer_of()
    stream = TextStream(tokenizer, [" w2 w9"])
    ids = tokenizer("w1 w2 w3").input_ids
    assert stream.add(ids[0]) == "w1"
    assert stream.add(ids[1]) == ""  # " w2" may be the start of " w2 w9"
    assert stream.add(ids[2]) == " w2 w3"  # it was not
    assert not stream.stopped


def test_empty_stop_strings_are_refused(tokenizer_of):
    with pytest.raises(ValueError, match="must not be empty"):
        TextStream(tokenizer_of(), ["x", ""])
