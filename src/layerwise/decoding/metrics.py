"""Offline hallucination metrics: CHAIR (Rohrbach et al., EMNLP 2018) for captions and POPE (Li et al.,
EMNLP 2023) for yes/no object questions.

CHAIR: each caption is scanned for object mentions through a synonym table (phrase -> canonical object;
multi-word phrases win over their single words, so "hot dog" is not a "dog"); each caption's mentions form a
set of canonical objects ``M`` (an object mentioned twice counts once), compared with the annotated set ``A``:

* ``chair_i = sum |M - A| / sum |M|``: hallucinated objects over mentioned objects (0 if nothing mentioned);
* ``chair_s = mean 1[|M - A| > 0]``: fraction of captions with at least one hallucinated object;
* ``cover = sum |M & A| / sum |A|``: fraction of annotated objects that are mentioned;
* ``length = mean number of words``. CHAIR falls with shorter captions: always read it with Cover and length.

POPE: answers are parsed as yes/no from their first word; "yes" is the positive class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..errors import ParameterError, ParameterTypeError

__all__ = ["SynonymTable", "extract_objects", "chair", "parse_yes_no", "pope_metrics"]

_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


class SynonymTable:
    """Phrase -> canonical object lookup.

    Parameters
    ----------
    synonyms : mapping canonical object -> phrases that name it (the canonical name is always included);
        phrases are lower-cased and matched on whole words.

    Example
    -------
    >>> table = SynonymTable({"dog": ["dogs", "puppy"], "hot dog": ["hot dogs"]})
    >>> sorted(extract_objects("A puppy eats two hot dogs.", table))
    ['dog', 'hot dog']
    """

    def __init__(self, synonyms: Mapping[str, Iterable[str]]) -> None:
        if not isinstance(synonyms, Mapping):
            raise ParameterTypeError(
                f"synonyms must be a mapping canonical -> phrases, got {type(synonyms).__name__}"
            )
        self.lookup: dict[tuple[str, ...], str] = {}
        for canonical, phrases in synonyms.items():
            if isinstance(phrases, str):
                raise ParameterTypeError(
                    f"synonyms[{canonical!r}] must be a list of phrases, got the string {phrases!r}"
                )
            for phrase in [canonical, *phrases]:
                key = tuple(_WORD.findall(phrase.lower()))
                if not key:
                    raise ParameterError(f"synonym phrase {phrase!r} of {canonical!r} has no words")
                if key in self.lookup and self.lookup[key] != canonical:
                    raise ParameterError(
                        f"phrase {phrase!r} maps to both {self.lookup[key]!r} and {canonical!r}"
                    )
                self.lookup[key] = canonical
        self.max_words = max((len(k) for k in self.lookup), default=1)

    @property
    def objects(self) -> set[str]:
        """The canonical object names (the values of the synonym lookup)."""
        return set(self.lookup.values())


def _table(synonyms: SynonymTable | Mapping[str, Iterable[str]]) -> SynonymTable:
    return synonyms if isinstance(synonyms, SynonymTable) else SynonymTable(synonyms)


def extract_objects(text: str, synonyms: SynonymTable | Mapping[str, Iterable[str]]) -> set[str]:
    """Canonical objects mentioned in ``text``: greedy longest-phrase matching over whole words."""
    table = _table(synonyms)
    words = _WORD.findall(text.lower())
    found: set[str] = set()
    i = 0
    while i < len(words):
        for n in range(min(table.max_words, len(words) - i), 0, -1):  # longest phrase first
            hit = table.lookup.get(tuple(words[i : i + n]))
            if hit is not None:
                found.add(hit)
                i += n
                break
        else:
            i += 1
    return found


def chair(
    captions: Sequence[str],
    annotations: Sequence[Iterable[str]],
    synonyms: SynonymTable | Mapping[str, Iterable[str]],
) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, Cover and mean caption length (words) over a set of captions.

    Parameters
    ----------
    captions : generated captions.
    annotations : for each caption, the canonical objects truly in the image.
    synonyms : a :class:`SynonymTable` or the mapping that builds one.

    Returns
    -------
    dict with ``chair_i``, ``chair_s``, ``cover``, ``length``, and the counts ``n_mentioned``,
    ``n_hallucinated``, ``n_annotated``, ``n_captions``.
    """
    if isinstance(captions, str):
        raise ParameterTypeError("captions must be a sequence of strings, got a single string")
    if len(captions) != len(annotations):
        raise ParameterError(
            f"annotations must have one entry per caption ({len(captions)}), got {len(annotations)}"
        )
    if not captions:
        raise ParameterError("captions must not be empty")
    table = _table(synonyms)
    mentioned = hallucinated = annotated = correct = bad_captions = words = 0
    for text, truth in zip(captions, annotations, strict=True):
        truth = set(truth)
        unknown = truth - table.objects
        if unknown:
            raise ParameterError(f"annotated objects {sorted(unknown)} are not in the synonym table")
        found = extract_objects(text, table)
        mentioned += len(found)
        hallucinated += len(found - truth)
        correct += len(found & truth)
        annotated += len(truth)
        bad_captions += bool(found - truth)
        words += len(_WORD.findall(text.lower()))
    n = len(captions)
    return {
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "chair_s": bad_captions / n,
        "cover": correct / annotated if annotated else 0.0,
        "length": words / n,
        "n_mentioned": mentioned,
        "n_hallucinated": hallucinated,
        "n_annotated": annotated,
        "n_captions": n,
    }


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer whose first word is "yes", False for "no", None otherwise."""
    words = _WORD.findall(answer.lower())
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])


def pope_metrics(answers: Sequence[str | bool | None], labels: Sequence[bool]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio ("yes" = positive class).

    Parameters
    ----------
    answers : generated answers (strings parsed by :func:`parse_yes_no`) or booleans; an answer that is
        neither yes nor no counts as "no" (it does not claim the object) and is reported in ``n_unparsed``.
    labels : True when the object is in the image.

    Returns
    -------
    dict with ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``, ``n``, ``n_unparsed``.
    Precision is 0 when nothing is answered "yes"; F1 is 0 when precision + recall is 0.
    """
    if len(answers) != len(labels):
        raise ParameterError(f"labels must have one entry per answer ({len(answers)}), got {len(labels)}")
    if not answers:
        raise ParameterError("answers must not be empty")
    parsed = [
        a if isinstance(a, bool) else (parse_yes_no(a) if isinstance(a, str) else None) for a in answers
    ]
    unparsed = sum(p is None for p in parsed)
    pred = [bool(p) for p in parsed]
    gold = [bool(x) for x in labels]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum((not p) and g for p, g in zip(pred, gold, strict=True))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / len(pred),
        "n": len(pred),
        "n_unparsed": unparsed,
    }
