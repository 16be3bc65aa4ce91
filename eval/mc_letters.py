"""
Which option letter a multiple-choice answer picks, read as each benchmark's official scorer reads it, plus our
looser reading as a named option (`--letter-rule loose`). Every rule returns a letter or None (no letter: the
official scorers count such an answer wrong); MMBench's rule can also return "Z", the official "none of the
options", which is wrong too.

- ScienceQA: LLaVA's llava/eval/eval_science_qa.py.
- MMBench (and generic files): VLMEvalKit's can_infer (vlmeval/utils/matching_util.py, the version of commit
  18fc37a5), which MMBench names as its evaluation code; answers it cannot read go to a ChatGPT matcher there,
  or count wrong under its exact-matching mode (our default; eval/mc_matcher.py is the optional matcher).
- SEED-Bench: LLaVA's scripts/convert_seed_for_submission.py.
Where a score can still differ from the official one is written in eval/README.md.
"""
import re

from eval.mc_files import LETTERS

SCIENCEQA_LETTERS = list("ABCDE")  # eval_science_qa.py's --options default: a list, so `in` means equality


def scienceqa_letter(text, options):
    """LLaVA's eval_science_qa.py. The answer, as written (no strip, newlines kept), is a letter A-E; or it starts
    with a letter A-E, '.' and a space; or the pattern `The answer is ([A-Z]).` (any one character after the
    letter, a newline excepted) occurs in it exactly once. Anything else is FAILED. The letter must name one of
    the problem's choices (get_pred_idx), else the answer is wrong."""
    if text in SCIENCEQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SCIENCEQA_LETTERS[:len(options)] else None


def option_letter(text, letters):
    """VLMEvalKit's can_infer_option: the answer with . ( ) [ ] , : ; ! * # { } turned into spaces, split at
    whitespace; if exactly one of the options' letters is among the words, that letter (so 'A cat' is A); if
    none is but 'Z' is, 'Z'; else None."""
    words = text
    for char in ".()[],:;!*#{}":
        words = words.replace(char, " ")
    words = words.split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1:
        return named[0]
    return "Z" if not named and "Z" in words else None


def text_letter(text, options, letters):
    """VLMEvalKit's can_infer_text: the letter of the one option whose text (lower-cased) is inside the answer
    (lower-cased); None when no option's or several options' texts are."""
    lowered = text.lower()
    inside = [letter for letter, option in zip(letters, options) if str(option).lower() in lowered]
    return inside[0] if len(inside) == 1 else None


def mmbench_letter(text, options):
    """VLMEvalKit's can_infer: the option rule, then the text rule (capitals only: 'b' and '(b)' name no letter)."""
    letters = LETTERS[:len(options)]
    return option_letter(str(text), letters) or text_letter(str(text), options, letters)


def seed_letter(text, options):
    """LLaVA's convert_seed_for_submission.py: right only if the answer is exactly the letter."""
    return text if text in tuple(LETTERS[:len(options)]) else None


def loose_letter(text, options):
    """Our looser reading (--letter-rule loose; no official scorer reads so). In order: the answer is a letter
    ('B', '(b)'); it starts with one ('B. cat', '(B) cat', 'B: cat'); 'the answer is B' / 'Answer: B'; exactly
    one valid capital letter stands alone in it (a leading article 'A cat' does not count); exactly one
    option's text is in it."""
    letters = LETTERS[:len(options)]
    text = text.strip()
    match = (re.fullmatch(r"\(?([A-Za-z])\)?\.?", text) or re.match(r"\(?([A-Z])(?:[.):]|\)\s)", text)
             or re.search(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-Z])\b", text))
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    words = re.sub(r"[.()\[\],:;!*#{}\"']", " ", text).split()
    found = [letter for letter in letters if letter in words]
    lowered = text.lower()
    by_text = [letter for letter, option in zip(letters, options)
               if option.strip() and option.strip().lower() in lowered]
    article = words[:1] == ["A"] and len(words) > 1 and words[1][:1].islower() and words.count("A") == 1
    if len(found) == 1 and not (article and found == ["A"] and len(by_text) == 1):  # "A cat": the article
        return found[0]
    return by_text[0] if len(by_text) == 1 else None


OFFICIAL = {"scienceqa": scienceqa_letter, "seed": seed_letter, "mmbench": mmbench_letter,
            "generic": mmbench_letter}
OFFICIAL_NAME = {"scienceqa": "official: LLaVA eval_science_qa.py",
                 "seed": "official: LLaVA convert_seed_for_submission.py (the exact letter)",
                 "mmbench": "official: VLMEvalKit can_infer", "generic": "official: VLMEvalKit can_infer"}
RULES = ("official", "loose")


def rule_name(benchmark, letter_rule):
    """Which rule reads a benchmark's letters (recorded in the results)."""
    return OFFICIAL_NAME.get(benchmark, OFFICIAL_NAME["generic"]) if letter_rule == "official" else \
        "loose: mc_letters.loose_letter (not an official rule)"


def answer_letter(text, options, benchmark, letter_rule="official"):
    """The letter an answer picks under the rule: a letter of `options`, 'Z' (MMBench: none of them), or None."""
    if letter_rule == "loose":
        return loose_letter(text, options)
    return OFFICIAL.get(benchmark, mmbench_letter)(text, options)
