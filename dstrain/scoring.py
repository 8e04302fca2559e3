"""Scores of generated answers against their references, on a 0-1 scale: what an evaluation by generation
reports (dstrain.evaluation.Generation) and `dstrain eval` prints.

    bleu         corpus BLEU (sacrebleu) over all pairs, divided by 100
    rouge1/2/L   the mean F-measure over pairs (rouge-score), with a tokenizer that keeps CJK text
    exact_match  the share of pairs equal after whitespace normalisation

rouge-score's own tokenizer keeps only [a-z0-9], so Chinese would score 0 whatever the answer. Here every CJK
character (Han, kana, Hangul) is a token of its own, and other text splits into lower-cased words. BLEU uses
sacrebleu's `zh` tokenizer (CJK characters split, the rest as 13a) when any reference holds CJK text, else
`13a`; the choice depends on the references alone, so it stays the same at every evaluation. BLEU uses the
effective n-gram order, so that short answers ("Positive.") can score: a corpus of answers shorter than four
tokens would otherwise always score 0.
"""

import re
from typing import Dict, List, Sequence

SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "exact_match")

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHARACTER = re.compile(f"[{_CJK}]")
# One CJK character, or a run of other letters and digits.
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def rouge_tokens(text: str) -> List[str]:
    """Lower-cased words, and each CJK character as a token of its own."""
    return _TOKEN.findall(text.lower())


class _CjkTokenizer:
    """rouge-score's tokenizer interface."""

    def tokenize(self, text: str) -> List[str]:
        return rouge_tokens(text)


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sacrebleu.metrics import BLEU

    tokenize = "zh" if any(_CJK_CHARACTER.search(reference) for reference in references) else "13a"
    scorer = BLEU(tokenize=tokenize, effective_order=True)
    return scorer.corpus_score(list(predictions), [list(references)]).score / 100


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean F-measures of rouge1, rouge2 and rougeL."""
    from rouge_score.rouge_scorer import RougeScorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(kinds), tokenizer=_CjkTokenizer())
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        for kind, score in scorer.score(reference, prediction).items():
            totals[kind] += score.fmeasure
    return {kind: total / len(predictions) for kind, total in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    same = sum(normalize_whitespace(p) == normalize_whitespace(r) for p, r in zip(predictions, references))
    return same / len(predictions)


def score(predictions: Sequence[str], references: Sequence[str], names: Sequence[str] = SCORES) -> Dict[str, float]:
    """The named scores (a subset of SCORES) of predictions against references, pair by pair."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"scoring needs pairs: {len(predictions)} predictions for {len(references)} references")
    results: Dict[str, float] = {}
    if "bleu" in names:
        results["bleu"] = bleu(predictions, references)
    if any(name.startswith("rouge") for name in names):
        results.update({kind: value for kind, value in rouge(predictions, references).items() if kind in names})
    if "exact_match" in names:
        results["exact_match"] = exact_match(predictions, references)
    return results
