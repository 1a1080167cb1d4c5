"""Choose the shipped retained-knowledge facts (run once; its output is committed).

    .venv/bin/python bench/select_retained.py /work/shared/data/counterfact-edit.json \
        --out kedit/data/retained/counterfact-known-smollm2-135m.jsonl

Reads CounterFact's "edit" split in EasyEdit's flat layout (10,000 cases, not shipped by
kedit and used by no shipped benchmark), drops every case whose subject occurs in a
shipped cases or benchmark file (so no benchmark edit targets a retained fact by name),
and keeps, in file order, the true facts (``prompt`` -> ``ground_truth``) that the
unedited embedded model ranks first -- teacher forced on prompt + " " + answer, the
argmax at every answer position is the answer's token -- at most ``--per-answer`` facts
with the same answer (so 200 facts are not 200 times "French"), until ``-n`` facts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kedit.data.cases import load_cases  # noqa: E402
from kedit.evaluation.scoring import score_targets  # noqa: E402
from kedit.models.load import load_model  # noqa: E402
from kedit.util.paths import package_data  # noqa: E402

SHIPPED = [
    *sorted((ROOT / "cases").glob("*.jsonl")),
    package_data() / "benchmarks/counterfact-val.json",
    package_data() / "benchmarks/counterfact-orig-500.json",
    package_data() / "benchmarks/portability/counterfact-one-hop.json",
    package_data() / "benchmarks/portability/counterfact-subject-replace.json",
    package_data() / "benchmarks/knowedit/wiki-counterfact-train.json",
]


def shipped_subjects() -> set[str]:
    out: set[str] = set()
    for f in SHIPPED:
        out |= {c.subject.strip().lower() for c in load_cases(f, skip_invalid=True)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="CounterFact in EasyEdit's flat layout (counterfact-edit.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--per-answer", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chunk", type=int, default=256, help="candidates scored per call")
    args = ap.parse_args()

    loaded = load_model(args.model, device="cpu", dtype="float32")
    skip = shipped_subjects()
    records = json.loads(Path(args.source).read_text())
    candidates = [r for r in records if r["subject"].strip().lower() not in skip]
    print(f"{len(records)} cases, {len(candidates)} with a subject no shipped file names", file=sys.stderr)
    kept: list[dict] = []
    per_answer: dict[str, int] = {}
    checked = 0
    for lo in range(0, len(candidates), args.chunk):
        chunk = candidates[lo: lo + args.chunk]
        scores = score_targets(loaded.model, loaded.tokenizer, [(r["prompt"], r["ground_truth"]) for r in chunk])
        checked += len(chunk)
        for r, s in zip(chunk, scores):
            if not bool((s.argmax_ids == s.target_ids).all()):
                continue
            a = r["ground_truth"].strip()
            if per_answer.get(a, 0) >= args.per_answer:
                continue
            per_answer[a] = per_answer.get(a, 0) + 1
            kept.append({"prompt": r["prompt"], "answer": r["ground_truth"], "subject": r["subject"],
                         "counterfact_case_id": r["case_id"]})
            if len(kept) == args.n:
                break
        print(f"checked {checked}, kept {len(kept)}", file=sys.stderr)
        if len(kept) == args.n:
            break
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
    print(f"{len(kept)} facts ({len(per_answer)} distinct answers) from the first {checked} candidates -> {args.out}")


if __name__ == "__main__":
    main()
