"""Part-of-speech tagsets: Brown's original tags and UD tags mapped to the 12-tag universal set.

The universal tagset is that of Petrov, Das & McDonald (2012), "A Universal Part-of-Speech
Tagset", LREC (arXiv:1104.2086): NOUN VERB ADJ ADV PRON DET ADP NUM CONJ PRT . X.

`to_universal` reproduces NLTK's Brown mapping, the file `en-brown.map` of the nltk_data
package `taggers/universal_tagset` that `nltk.corpus.brown.tagged_words(tagset="universal")`
reads. That file lists every one of the corpus's 472 tags; it is written down here as the
table of base tags it implies plus the two regularities it follows throughout:

* a `-TL` (title), `-HL` (headline) or `-NC` (cited word) suffix never changes the class
  (`NN-TL`, `NN-TL-HL` and `NN` are all NOUN; `---HL` is the dash `--` in a headline);
* a foreign word, `FW-` before its own tag (`FW-NN`, `FW-IN+AT-TL`), is X.

Choices of that file worth knowing: contractions of a noun, pronoun or adverb with a verb
(`PPS+BEZ` "it's", `PPSS+MD` "I'd", `EX+BEZ` "there's") are PRT; existential `EX` and
interjections `UH` are PRT; possessive determiners `PP$` ("his") and `WP$` ("whose") are DET
while `PP$$` ("mine") is PRON; subordinating conjunctions `CS` are ADP; ordinals `OD` and
post-determiners `AP` ("many", "next") are ADJ; the negator `*` ("not", "n't") is ADV;
indefinite pronouns `PN` ("nothing") are NOUN; `NIL` (untaggable) is X. Counted over the
whole corpus the mapping gives NLTK's figures token for token (tests/unit/test_tagging_data.py).

`ud_to_universal` maps Universal Dependencies tags (what spaCy's `token.pos_` holds) to the
same 12 tags, refined by a Penn Treebank tag where the two tagsets draw a line differently
from the Brown mapping, so that a UD tagger can be scored against Brown's gold tags.
"""

from __future__ import annotations

import re

from dapeng.errors import DataError

UNIVERSAL_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "NUM", "CONJ", "PRT", ".", "X")

_BROWN_BY_CLASS: dict[str, tuple[str, ...]] = {
    ".": ("'", "''", "(", ")", ",", "--", ".", ":", "``"),
    "ADV": ("*", "QL", "QLP", "RB", "RBR", "RBT", "RN", "WQL", "WRB", "RB+CS", "RBR+CS"),
    "PRT": (
        "ABL", "ABN", "AP$", "EX", "JJ$", "RB$", "RP", "RP+IN", "TO", "TO+VB", "UH",
        # a noun, pronoun or adverb fused with a verb
        "DT+BEZ", "DT+MD", "DTS+BEZ", "EX+BEZ", "EX+HVD", "EX+HVZ", "EX+MD",
        "NN+BEZ", "NN+HVD", "NN+HVZ", "NN+MD", "NNS+MD", "NP+BEZ", "NP+HVZ", "NP+MD", "NR+MD",
        "PN+BEZ", "PN+HVD", "PN+HVZ", "PN+MD", "PPS+BEZ", "PPS+HVD", "PPS+HVZ", "PPS+MD",
        "PPSS+BEM", "PPSS+BER", "PPSS+BEZ", "PPSS+BEZ*", "PPSS+HV", "PPSS+HVD", "PPSS+MD", "PPSS+VB",
        "RB+BEZ", "WDT+BER", "WDT+BEZ", "WDT+DOD", "WDT+HVZ", "WPS+BEZ", "WPS+HVD", "WPS+HVZ", "WPS+MD",
        "WRB+BER", "WRB+BEZ", "WRB+DO", "WRB+DOD", "WRB+DOD*", "WRB+DOZ", "WRB+IN", "WRB+MD",
    ),
    "DET": ("ABX", "AT", "DT", "DT$", "DTI", "DTS", "DTX", "PP$", "WDT", "WP$"),
    "ADJ": ("AP", "AP+AP", "JJ", "JJ+JJ", "JJR", "JJR+CS", "JJS", "JJT", "OD"),
    "NOUN": (
        "CD$", "NN", "NN$", "NN+IN", "NN+NN", "NNS", "NNS$", "NP", "NP$", "NPS", "NPS$",
        "NR", "NR$", "NRS", "PN", "PN$",
    ),
    "PRON": ("PP$$", "PPL", "PPLS", "PPO", "PPS", "PPSS", "WPO", "WPS"),
    "NUM": ("CD",),
    "ADP": ("CS", "IN", "IN+IN", "IN+PPO"),
    "CONJ": ("CC",),
    "VERB": (
        "BE", "BED", "BED*", "BEDZ", "BEDZ*", "BEG", "BEM", "BEM*", "BEN", "BER", "BER*", "BEZ", "BEZ*",
        "DO", "DO*", "DOD", "DOD*", "DOZ", "DOZ*", "HV", "HV*", "HVD", "HVD*", "HVG", "HVN", "HVZ", "HVZ*",
        "MD", "MD*", "VB", "VBD", "VBG", "VBN", "VBZ",
        "HV+TO", "MD+HV", "MD+PPSS", "MD+TO", "VB+AT", "VB+IN", "VB+JJ", "VB+PPO", "VB+RP", "VB+TO",
        "VB+VB", "VBG+TO", "VBN+TO",
    ),
    "X": ("NIL", "DO+PPSS", "WDT+BER+PP", "WDT+DO+PPS"),
}

BROWN_BASE_TAGS: dict[str, str] = {tag: cls for cls, tags in _BROWN_BY_CLASS.items() for tag in tags}
"""Brown base tag (no -TL/-HL/-NC suffix, no FW- prefix) -> universal tag."""

# The corpus cuts one suffix short ("PPSS+BER-N" in cj31); en-brown.map lists it as it stands.
_BROWN_IRREGULAR = {"PPSS+BER-N": "PRT"}
_BROWN_SUFFIXES = re.compile(r"(?:-(?:TL|HL|NC))+$")


def brown_base(tag: str) -> str:
    """A Brown tag without its -TL/-HL/-NC suffixes, upper-cased (`np-tl-hl` -> `NP`)."""
    tag = tag.upper()
    return _BROWN_SUFFIXES.sub("", tag) or tag


def to_universal(tag: str) -> str:
    """The universal tag of a Brown tag (either case), as NLTK's `en-brown.map` gives it.

    Raises:
        DataError: `tag` is not a Brown tag.
    """
    upper = tag.upper()
    if upper.startswith("FW-"):
        return "X"
    if upper in _BROWN_IRREGULAR:
        return _BROWN_IRREGULAR[upper]
    try:
        return BROWN_BASE_TAGS[brown_base(upper)]
    except KeyError:
        raise DataError(
            f"{tag!r} is not a Brown corpus tag",
            "map only Brown-tagged data to the universal tagset (e.g. NN, VBD, NP$-TL, FW-NN)",
        ) from None


_UD = {
    "ADJ": "ADJ", "ADP": "ADP", "ADV": "ADV", "AUX": "VERB", "CCONJ": "CONJ", "DET": "DET",
    "INTJ": "PRT", "NOUN": "NOUN", "NUM": "NUM", "PART": "PRT", "PRON": "PRON", "PROPN": "NOUN",
    "PUNCT": ".", "SCONJ": "ADP", "SYM": ".", "VERB": "VERB", "X": "X", "SPACE": "X",
}
# Where a Penn Treebank tag settles a word that UD classes otherwise than Brown's map does.
_PTB_OVERRIDES = {
    "PRP$": "DET",  # "his", "my": UD PRON, Brown PP$ -> DET
    "WP$": "DET",  # "whose"
    "WDT": "DET",  # relative "which", "that": UD PRON, Brown WDT -> DET
    "DT": "DET",  # "this", "that" standing alone: UD PRON, Brown DT/DTS -> DET
    "PDT": "PRT",  # "all", "half" before a determiner: Brown ABN -> PRT
    "EX": "PRT",  # existential "there": UD PRON, Brown EX -> PRT
    "RP": "PRT",  # verb particle "up": UD ADP, Brown RP -> PRT
    "WRB": "ADV",  # "when", "how" heading a clause: UD SCONJ, Brown WRB -> ADV
    "LS": "NUM",  # list-item numbers "1", "2": UD X, Brown CD -> NUM
    "NN": "NOUN",  # "nothing", "anyone": UD PRON, Brown PN -> NOUN
    "NNS": "NOUN",
    "NNP": "NOUN",
    "NNPS": "NOUN",
    "CD": "NUM",
}


def ud_to_universal(upos: str, ptb: str | None = None) -> str:
    """The universal tag of a UD tag, refined by the word's Penn Treebank tag when there is one.

    UD's 17 tags fold onto the 12 (PROPN -> NOUN, AUX -> VERB, CCONJ -> CONJ, PART -> PRT,
    PUNCT/SYM -> ., X/SPACE -> X), with the choices of the Brown mapping above: SCONJ -> ADP
    (Brown CS), INTJ -> PRT (Brown UH). A PTB tag moves the words where UD and Brown disagree:
    possessive and relative determiners, standalone demonstratives, existential "there", verb
    particles, wh-adverbs, list-item numbers, indefinite pronouns tagged NN, and "not" (PART in
    UD, RB in PTB, Brown `*`: ADV). Brown's word-level choices ("what" is DET, "all" PRT, "yes"
    ADV) are left alone: no tag settles them.

    Raises:
        DataError: `upos` is not a UD tag.
    """
    if ptb is not None:
        if ptb in _PTB_OVERRIDES:
            return _PTB_OVERRIDES[ptb]
        if upos == "PART" and ptb == "RB":
            return "ADV"
    try:
        return _UD[upos]
    except KeyError:
        raise DataError(f"{upos!r} is not a UD part-of-speech tag", f"use one of: {', '.join(_UD)}") from None


__all__ = ["BROWN_BASE_TAGS", "UNIVERSAL_TAGS", "brown_base", "to_universal", "ud_to_universal"]
