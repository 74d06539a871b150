"""Write the two local multiple-choice tasks the eval measurements use (docs/eval.md), as lm-eval task YAMLs
with their data, into one folder for `kititans eval --include-path`.

    python benchmarks/eval_tasks.py --out /tmp/eval-tasks [--shared ../shared/data]

kt_tinystories_cloze (English, 4 choices, chance 25%): LAMBADA-style cloze on the TinyStories validation
  head (not in the built-in corpus the tiny runs train on). Stories are split at "Once upon a time"; in each,
  the last sentence whose final word also appears earlier in the same story gives one item: the context is
  the story up to that word (at most the last 1,200 characters, cut at a sentence start), the answer is the
  word. The three distractors are sentence-final words of other stories, lower case like the answer, within
  a factor 2 of its corpus frequency, and absent from the whole story, so word frequency alone does not
  pick the answer and the story's own words do. The answer's position is drawn with a fixed seed.
kt_jcommonsenseqa: lm-eval's own ja_leaderboard_jcommonsenseqa (its prompt, choices and 3-shot sampler)
  over JGLUE's JCommonsenseQA train file (the validation set is not in ../shared/data): the last 1,000
  questions are the test split, the others the few-shot pool. 5 choices, chance 20%.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

WORD = re.compile(r"[A-Za-z]+")
END = re.compile(r"([A-Za-z]+)([.!?])")
MAX_CONTEXT = 1200


def stories(text: str) -> list[str]:
    """Stories of the TinyStories head: paragraphs joined, split where a paragraph starts a new story."""
    out: list[list[str]] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if para.startswith("Once upon a time") or not out:
            out.append([para])
        else:
            out[-1].append(para)
    return ["\n\n".join(s) for s in out]


def cloze_items(text: str, seed: int = 0, limit: int = 1000) -> list[dict]:
    rng = random.Random(seed)
    docs = stories(text)
    freq = Counter(w.lower() for w in WORD.findall(text))
    candidates = []  # (story index, answer, context)
    for i, story in enumerate(docs):
        best = None
        for m in END.finditer(story):
            word = m.group(1)
            before = story[: m.start(1)]
            if word.islower() and len(word) >= 3 and re.search(rf"\b{word}\b", before):
                best = (word, before.rstrip())
        if best and len(best[1]) > 80:
            candidates.append((i, *best))
    pool = sorted({w for _, w, _ in candidates})
    items = []
    for i, answer, context in candidates:
        in_story = {w.lower() for w in WORD.findall(docs[i])}
        f = freq[answer]
        near = [w for w in pool if w not in in_story and f / 2 <= freq[w] <= 2 * f]
        if len(near) < 3:
            continue
        choices = rng.sample(near, 3)
        label = rng.randrange(4)
        choices.insert(label, answer)
        if len(context) > MAX_CONTEXT:
            cut = context[-MAX_CONTEXT:]
            starts = [m.end() for m in re.finditer(r"[.!?]\s+", cut)]
            context = cut[starts[0] :] if starts else cut
        items.append({"context": context, "choices": choices, "label": label})
        if len(items) >= limit:
            break
    return items


CLOZE_YAML = """# built by benchmarks/eval_tasks.py (see its docstring): TinyStories cloze, 4 choices, chance 25%
task: kt_tinystories_cloze
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

JCQA_YAML = """# built by benchmarks/eval_tasks.py: lm-eval's ja_leaderboard_jcommonsenseqa on local JGLUE data
group: kt_jcommonsenseqa
task:
  - task: ja_leaderboard_jcommonsenseqa
    dataset_path: json
    dataset_name: null
    dataset_kwargs:
      data_files:
        train: {train}
        validation: {valid}
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the YAMLs and their data")
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/data"), help="the shared data folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    text = (args.shared / "tinystories" / "tinystories_valid_head.txt").read_text(encoding="utf-8")
    items = cloze_items(text, args.seed)
    write_jsonl(out / "tinystories_cloze.jsonl", items)
    (out / "kt_tinystories_cloze.yaml").write_text(CLOZE_YAML.format(data=out / "tinystories_cloze.jsonl"))
    rows = [json.loads(line) for line in (args.shared / "japanese" / "jcommonsenseqa_train.json").open()]
    write_jsonl(out / "jcqa_fewshot.jsonl", rows[:-1000])
    write_jsonl(out / "jcqa_test.jsonl", rows[-1000:])
    (out / "kt_jcommonsenseqa.yaml").write_text(
        JCQA_YAML.format(train=out / "jcqa_fewshot.jsonl", valid=out / "jcqa_test.jsonl")
    )
    labels = Counter(i["label"] for i in items)
    print(f"{len(items)} cloze items (answer positions {dict(sorted(labels.items()))}), 1000 JCommonsenseQA")
    print(f"kititans eval RUN --include-path {out} --tasks kt_tinystories_cloze,kt_jcommonsenseqa")


if __name__ == "__main__":
    main()
