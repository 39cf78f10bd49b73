"""Build a small offline instruction-tuning set ("define the word X") from WordNet 3.0.

The recipes must run without network access, so their text data comes from Debian's
``wordnet-base`` package (``apt-get install -y wordnet-base``), which ships the WordNet 3.0
database files under ``/usr/share/wordnet``. Each synset becomes one example::

    {"instruction": "Define the word \\"cat\\".", "input": "",
     "output": "feline mammal usually having thick soft fur ...", "category": "noun.animal"}

``category`` is the synset's lexicographer file name (``noun.animal``, ``verb.motion``, ...).
It gives the federated recipes a natural non-IID partition key: one client per topic.

The output is deterministic: synsets are read in sorted order and sampled with
``random.Random(seed)``, at most ``--per_category`` per category and one synset per lemma (so a
word never gets two competing definitions, and the train and eval splits share no instruction).
Every 10th sampled example goes to the eval file.

Usage::

    python recipes/data/build_wordnet_instructions.py            # writes the two JSONL files
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

# WordNet 3.0 lexicographer file names, indexed by the two-digit ``lex_filenum`` field of the
# data files. Debian's wordnet-base ships no ``lexnames`` file; this is the table from lexnames(5WN).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)

DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

# Adjectives in data.adj may carry a syntactic marker glued to the word: "galore(ip)".
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")

MIN_GLOSS_CHARS = 10
MAX_GLOSS_CHARS = 200


def parse_data_line(line: str) -> tuple[int, str, str, str] | None:
    """Parse one WordNet data-file line into ``(offset, category, first_lemma, definition)``.

    Returns ``None`` for licence header lines (they start with two spaces) and for synsets whose
    definition is missing or still holds a quote (a few glosses glue their example sentence on
    with ':' or ',' instead of '; "', and would teach the model to emit stray quotes).
    """
    if line.startswith("  "):
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    offset, lex_filenum = int(parts[0]), int(parts[1])
    word_count = int(parts[3], 16)
    if word_count < 1:
        return None
    lemma = _ADJ_MARKER.sub("", parts[4]).replace("_", " ")
    # The definition is the gloss up to the first example sentence ('; "...').
    definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
    if not definition or '"' in definition:
        return None
    return offset, LEXNAMES[lex_filenum], lemma, definition


def read_synsets(wordnet_dir: Path) -> list[tuple[str, int, str, str]]:
    """All usable synsets as ``(category, offset, lemma, definition)``, sorted for determinism."""
    synsets = []
    for name in DATA_FILES:
        with open(wordnet_dir / name, encoding="utf-8") as fh:
            for line in fh:
                parsed = parse_data_line(line.rstrip("\n"))
                if parsed is None:
                    continue
                offset, category, lemma, definition = parsed
                if not MIN_GLOSS_CHARS <= len(definition) <= MAX_GLOSS_CHARS:
                    continue
                if any(ch.isdigit() for ch in lemma):
                    continue
                synsets.append((category, offset, lemma, definition))
    synsets.sort()
    return synsets


def sample_examples(synsets: list[tuple[str, int, str, str]], per_category: int, rng: random.Random) -> list[dict]:
    """Draw up to ``per_category`` examples per category, at most one synset per lemma.

    Synsets are visited in one global seeded order, so which sense of a polysemous word is kept
    does not depend on the order of the data files.
    """
    order = list(synsets)
    rng.shuffle(order)
    taken: Counter[str] = Counter()
    seen_lemmas: set[str] = set()
    examples = []
    for category, _offset, lemma, definition in order:
        key = lemma.lower()
        if taken[category] >= per_category or key in seen_lemmas:
            continue
        taken[category] += 1
        seen_lemmas.add(key)
        examples.append(
            {
                "instruction": f'Define the word "{lemma}".',
                "input": "",
                "output": definition,
                "category": category,
            }
        )
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet_dir", type=Path, default=Path("/usr/share/wordnet"),
                        help="directory holding data.noun, data.verb, data.adj, data.adv")
    parser.add_argument("--output", type=Path, default=HERE / "wordnet_definitions.jsonl")
    parser.add_argument("--eval_output", type=Path, default=HERE / "wordnet_definitions_eval.jsonl")
    parser.add_argument("--per_category", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    examples = sample_examples(read_synsets(args.wordnet_dir), args.per_category, rng)
    rng.shuffle(examples)
    eval_rows = examples[9::10]
    train_rows = [ex for i, ex in enumerate(examples) if i % 10 != 9]
    write_jsonl(args.output, train_rows)
    write_jsonl(args.eval_output, eval_rows)

    train_counts = Counter(ex["category"] for ex in train_rows)
    eval_counts = Counter(ex["category"] for ex in eval_rows)
    print(f"{'category':<22}{'train':>7}{'eval':>6}")
    for category in sorted(train_counts | eval_counts):
        print(f"{category:<22}{train_counts[category]:>7}{eval_counts[category]:>6}")
    print(f"{'total':<22}{len(train_rows):>7}{len(eval_rows):>6}  ({len(train_counts | eval_counts)} categories)")
    print(f"wrote {args.output} and {args.eval_output}")


if __name__ == "__main__":
    main()
