"""Functions the kit task YAMLs call (``!function diep_lightning.evaluation.task_utils.<name>``).

They map the local files' field names onto lm-eval's own prompts. The WikiText and HellaSwag helpers
are copied from lm-eval 0.4 (``lm_eval/tasks/wikitext/preprocess_wikitext.py``,
``lm_eval/tasks/hellaswag/utils.py``; MIT licence, EleutherAI) so the prompts and metrics match.
"""

from __future__ import annotations

import re

import datasets

# --------------------------------------------------------------------------------------------------
# WikiText-2
# --------------------------------------------------------------------------------------------------
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def split_wikitext_articles(text: str) -> list[str]:
    """Split a tokenized WikiText file into articles at its top-level ``" = Title = "`` lines.

    Each article keeps its heading and original lines (joined with ``"\\n"``), like
    ``EleutherAI/wikitext_document_level``'s ``page`` field.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if _ARTICLE_HEADING.match(line)]
    if not starts:
        return [text] if text.strip() else []
    pages = []
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        # the blank line before a heading belongs to the previous article
        page = "\n".join(lines[a:b]).rstrip(" \n")
        pages.append(page + "\n")
    return pages


def wikitext_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per article (field ``page``) from the ``text`` loader's whole-file rows."""
    pages: list[str] = []
    for row in dataset:
        pages.extend(split_wikitext_articles(row["text"]))
    return datasets.Dataset.from_dict({"page": pages})


def wikitext_detokenizer(doc: dict) -> str:
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def wikitext_process_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    # word count of the original (tokenized) document, as lm-eval does
    _words = len(re.split(r"\s+", doc["page"]))
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }


# --------------------------------------------------------------------------------------------------
# HellaSwag
# --------------------------------------------------------------------------------------------------
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# --------------------------------------------------------------------------------------------------
# multiple-choice prompts over llm-foundry style files ({"query", "choices", "gold"})
# --------------------------------------------------------------------------------------------------
def piqa_doc_to_text(doc: dict) -> str:
    """``"Question: {goal}\\nAnswer:"`` (the file's query is ``"Question: {goal}\\n"``)."""
    query = doc["query"].rstrip("\n")
    if not query.startswith("Question: "):
        query = "Question: " + query
    return query + "\nAnswer:"


def boolq_doc_to_text(doc: dict) -> str:
    """``"{passage}\\nQuestion: {question}?\\nAnswer:"`` (the file's query has a ``"Passage: "`` prefix)."""
    query = doc["query"]
    if query.startswith("Passage: "):
        query = query[len("Passage: ") :]
    return query + "\nAnswer:"


def copa_doc_to_text(doc: dict) -> str:
    """``"{premise without its period} because|therefore"`` (the file has ``", because|therefore"``)."""
    query = doc["query"].strip()
    for connector in ("because", "therefore"):
        if query.endswith(", " + connector):
            return query[: -len(connector) - 2] + " " + connector
    return query


def copa_doc_to_choice(doc: dict) -> list[str]:
    """The two alternatives with a lower-case first letter (lm-eval's ``convert_choice``)."""
    return [c[:1].lower() + c[1:] for c in doc["choices"]]
