"""CHAIR / Cover / length and POPE metrics on hand-countable cases."""

from __future__ import annotations

import pytest

from layerwise.decoding import SynonymTable, chair, extract_objects, parse_yes_no, pope_metrics

SYN = {
    "dog": ["dogs", "puppy", "puppies"],
    "hot dog": ["hot dogs"],
    "cup": ["cups", "mug"],
    "person": ["man", "woman", "people"],
    "dining table": ["table", "tables"],
}


def test_extract_objects_synonyms_longest_phrase_and_word_boundaries():
    assert extract_objects("A puppy next to a Mug.", SYN) == {"dog", "cup"}
    assert extract_objects("Two hot dogs on a table", SYN) == {"hot dog", "dining table"}  # not "dog"
    assert extract_objects("A hot dog and a dog", SYN) == {"hot dog", "dog"}
    assert extract_objects("The dogma of cupcakes", SYN) == set()  # whole words only
    assert extract_objects("", SYN) == set()


def test_chair_hand_counted():
    captions = [
        "A man and a dog sit at a table.",  # person, dog, dining table; truth person, dog: 1 halluc.
        "A puppy with a mug and another dog.",  # dog (once), cup; truth dog, cup -> 0 halluc.
        "A cup.",  # cup; truth person -> 1 halluc., 0 correct
        "Nothing to see here",  # nothing mentioned; truth dog
    ]
    truth = [{"person", "dog"}, {"dog", "cup"}, {"person"}, {"dog"}]
    m = chair(captions, truth, SYN)
    # mentioned 3 + 2 + 1 + 0 = 6; hallucinated 1 + 0 + 1 + 0 = 2; annotated 2 + 2 + 1 + 1 = 6;
    # correct 2 + 2 + 0 + 0 = 4; captions with a hallucination: 2 of 4; words 9 + 8 + 2 + 4 = 23
    assert m["n_mentioned"] == 6 and m["n_hallucinated"] == 2 and m["n_annotated"] == 6
    assert m["chair_i"] == pytest.approx(2 / 6)
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["cover"] == pytest.approx(4 / 6)
    assert m["length"] == pytest.approx(23 / 4)


def test_chair_edge_cases_and_errors():
    m = chair(["nothing"], [set()], SYN)
    assert m["chair_i"] == 0.0 and m["cover"] == 0.0 and m["chair_s"] == 0.0
    with pytest.raises(ValueError, match="annotations"):
        chair(["a dog"], [], SYN)
    with pytest.raises(ValueError, match="not in the synonym table"):
        chair(["a dog"], [{"zebra"}], SYN)
    with pytest.raises(TypeError, match="captions"):
        chair("a dog", [{"dog"}], SYN)
    with pytest.raises(ValueError, match="maps to both"):
        SynonymTable({"dog": ["pet"], "cat": ["pet"]})
    with pytest.raises(TypeError, match="list of phrases"):
        SynonymTable({"dog": "dogs"})


def test_parse_yes_no():
    assert parse_yes_no("Yes, there is.") is True
    assert parse_yes_no("  no .") is False
    assert parse_yes_no("maybe yes") is None
    assert parse_yes_no("") is None


def test_pope_hand_counted():
    answers = ["yes", "Yes.", "no", "no", "yes", "blah", "no", "yes"]
    labels = [True, True, True, False, False, True, False, False]
    # pred:   Y     Y     N     N      Y      N(unparsed) N  Y
    # tp = 2, fp = 2, fn = 2, tn = 2
    m = pope_metrics(answers, labels)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    assert m["n_unparsed"] == 1


def test_pope_degenerate_and_booleans():
    m = pope_metrics([False, False], [True, False])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    m = pope_metrics([True, True, True], [True, True, False])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="labels"):
        pope_metrics(["yes"], [True, False])
