"""Incremental detokenization with stop strings."""

from __future__ import annotations

from expertray.serving.text import TextStream


class Chars:
    """A tokenizer whose token i is the character chr(i)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _feed(stop: list[str], text: str) -> tuple[list[str], str, bool]:
    stream = TextStream(Chars(), stop)
    pieces = [stream.push([ord(c)]) for c in text]
    return pieces, "".join(pieces) + stream.flush(), stream.stopped


def test_text_is_sent_as_it_comes_without_stops() -> None:
    pieces, whole, stopped = _feed([], "hello")
    assert pieces == list("hello") and whole == "hello" and not stopped


def test_a_stop_string_ends_the_text_before_it_and_is_never_sent() -> None:
    pieces, whole, stopped = _feed(["END"], "abcENDxyz")
    assert whole == "abc" and stopped and "E" not in "".join(pieces)


def test_a_possible_stop_prefix_is_held_back_then_released() -> None:
    pieces, whole, stopped = _feed(["ENDS"], "abENDxy")
    assert pieces[2:5] == ["", "", ""] and pieces[5] == "ENDx" and whole == "abENDxy" and not stopped


def test_the_earliest_of_several_stops_wins_even_across_pieces() -> None:
    stream = TextStream(Chars(), ["zz", "b c"])
    out = stream.push([ord("a"), ord("b")]) + stream.push([ord(" "), ord("c"), ord("z"), ord("z")])
    assert out == "a" and stream.stopped and stream.push([ord("q")]) == ""


def test_an_unfinished_character_is_held() -> None:
    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes(), [])
    euro = "€".encode()
    assert stream.push([euro[0]]) == "" and stream.push([euro[1]]) == "" and stream.push([euro[2]]) == "€"
