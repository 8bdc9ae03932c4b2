"""Can the student tell a wrong anchor from its own samples? `python -m bench.anchor_trust --task T --seed S RUN`.

Samples K answers per training prompt from RUN's SFT adapter (temperature 1, seeded) and prints, for groups
split by what the samples say (no sample agrees with the anchor; the samples' majority disagrees with it), how
often the anchor is wrong there and how often the majority is right. A diagnostic against the training
references, never a training signal. Agreement is the `anchor_match` scorer's (with `ranking.anchor_suffix`):
a score of 1 against the anchor, for a sample and for the record's reference alike.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a demo run directory with a finished sft stage")
    ap.add_argument("--task", default="vqa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.demo import demo_config
    from vlrlcd.evaluation.metrics import normalize_answer, score_record
    from vlrlcd.pipeline import prepare
    from vlrlcd.ranking.config import RankingConfig
    from vlrlcd.ranking.scorers import anchor_match
    from vlrlcd.student_base import built_student_config

    cfg = demo_config(args.run, args.seed, False, [], task=args.task)
    prep = prepare(cfg, progress=False)
    student = load_student(built_student_config(cfg), adapter=Path(args.run) / "sft" / "adapter")
    student.model.eval()
    rcfg = RankingConfig(scorer="anchor_match", anchor_suffix=True)
    rows = []
    for i in range(0, len(prep.train), 32):
        chunk = [r for r in prep.train[i:i + 32] if r.id in prep.anchors and r.reference]
        seqs = student.sample_batch([student.prefix(r.prompt, r.image) for r in chunk], args.k,
                                    cfg.student.max_new_tokens, 1.0)
        for r, s in zip(chunk, seqs):
            # the K samples and, last, the reference, each scored against the anchor as stage II scores them
            agrees = (anchor_match(student, r.prompt, r.image, prep.anchors[r.id],
                                   s + [student.encode_response(r.reference)], cfg=rcfg).candidates == 1.0).tolist()
            texts = [normalize_answer(student.decode(x)) for x in s]
            majority, count = Counter(texts).most_common(1)[0]
            at = texts.index(majority)
            rows.append({"anchor_right": agrees[-1], "agree": sum(agrees[:-1]), "share": count / args.k,
                         "majority_agrees": agrees[at],
                         "majority_right": score_record(r, majority) == 1.0})

    def line(name: str, keep) -> None:
        sel = [x for x in rows if keep(x)]
        if not sel:
            print(f"{name:44s} n=   0")
            return
        wrong = 1 - sum(x["anchor_right"] for x in sel) / len(sel)
        right = sum(x["majority_right"] for x in sel) / len(sel)
        print(f"{name:44s} n={len(sel):4d}  anchor wrong {wrong:.3f}  majority right {right:.3f}")

    line("all prompts", lambda x: True)
    line("no sample agrees with the anchor", lambda x: x["agree"] == 0)
    for m in (0.5, 0.75):
        line(f"majority (share >= {m}) disagrees", lambda x, m=m: x["share"] >= m and not x["majority_agrees"])
    line("anchor wrong", lambda x: not x["anchor_right"])
    wrong = [x for x in rows if not x["anchor_right"]]
    if wrong:
        print(f"on wrong anchors: {sum(x['agree'] for x in wrong) / len(wrong):.1f} of {args.k} samples agree "
              f"with the anchor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
