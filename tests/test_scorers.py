"""Scorers on hand-made cases: after the tiny student is briefly trained to copy the reference, the
candidate equal to the anchor scores highest with margin 0; self_judge's g is exactly
log P(yes) − log P(no); clip follows its formula on an untrained open_clip; composite is the weighted sum."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_steps_common import MAX_NEW, build
from vlrlcd.adapters.config import LoraConfig, StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.scorers import (
    composite,
    get_scorer,
    judge_prompt,
    judge_response,
    load_clip,
    scoring_prompt,
    self_judge,
    self_likelihood,
)
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import rollout, sample_generator

PROMPTS = {"What is 3 + 4?": "7", "Name a colour.": "red", "What color is the shape?": "blue"}
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _train(student, prefixes, targets, steps: int, lr: float = 5e-3) -> float:
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    student.model.train()
    for _ in range(steps):
        tl = student.batch_token_logprobs(prefixes, targets)
        loss = -(tl.logp.sum() / tl.mask.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    student.model.eval()
    return float(loss.detach())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny text student briefly trained to copy the reference from the scoring prompt."""
    root = tmp_path_factory.mktemp("scorers")
    # lm_head trained too: with a frozen random head a 1-layer LoRA cannot make any token likely
    s = load_student(StudentConfig(name_or_path=str(build("text", root / "student", seed=0)),
                                   lora=LoraConfig(modules_to_save=["lm_head"])))
    s.model.eval()
    before = {p: _scores(s, p) for p in PROMPTS}
    prefixes = [s.prefix(scoring_prompt(p, a)) for p, a in PROMPTS.items()]
    final = _train(s, prefixes, [s.encode_response(a) for a in PROMPTS.values()], steps=40, lr=1e-2)
    assert final < 0.3, f"the tiny student did not learn to copy the references (loss {final:.3f})"
    return {"student": s, "before": before, "root": root}


def _candidates(s):
    return [s.encode_response(a) for a in PROMPTS.values()]


def _scores(s, prompt):
    return self_likelihood(s, prompt, None, PROMPTS[prompt], _candidates(s))


def test_self_likelihood_ranks_the_anchor_copy_first(trained):
    s = trained["student"]
    for k, (prompt, anchor) in enumerate(PROMPTS.items()):
        sc = _scores(s, prompt)
        margins = sc.candidates - sc.anchor
        assert int(margins.argmax()) == k
        assert abs(float(margins[k])) < 1e-5          # y = a: r = g(x,a,a) − g(x,a,a) = 0
        assert (margins[torch.arange(3) != k] < -0.25).all()   # -0.40 the closest with the pinned versions
    # the ordering is learnt, not an artefact: the untrained student did not put every anchor first
    assert not all(int((b.candidates - b.anchor).argmax()) == k for k, b in enumerate(trained["before"].values()))


def test_self_likelihood_without_anchor_is_the_plain_prompt_likelihood(trained):
    s = trained["student"]
    prompt = "Name a colour."
    sc = self_likelihood(s, prompt, None, None, _candidates(s))
    with torch.no_grad():
        want = s.token_logprobs(s.prefix(prompt), _candidates(s)).sequence(True)
    assert torch.allclose(sc.candidates, want, atol=1e-6) and float(sc.anchor) == 0.0


def test_self_judge_is_log_p_yes_minus_log_p_no(trained):
    """g = Σ log p(verdict word tokens) for " yes" minus the same for " no" (several tokens each in this
    tiny vocabulary), each reply scored alone here rather than in the shared-prefix batch."""
    s = trained["student"]
    width = {"yes": len(s.encode_response(" yes", add_eos=False)), "no": len(s.encode_response(" no", add_eos=False))}
    assert width["no"] > 1   # the multi-token path is exercised
    prompt, anchor = "What is 3 + 4?", "7"
    cands = _candidates(s)
    sc = self_judge(s, prompt, None, anchor, cands)
    prefix = s.prefix(judge_prompt(prompt, anchor))
    with torch.no_grad():
        for k, c in enumerate(cands + [s.encode_response(anchor)]):
            lp = {}
            for verdict in ("yes", "no"):
                row = judge_response(s, c, verdict)   # answer, "\nVerdict:", word tokens, EOS
                logp = s.token_logprobs(prefix, [row]).logp[0]
                lp[verdict] = float(logp[len(row) - 1 - width[verdict]: len(row) - 1].sum())
            g = float(sc.candidates[k]) if k < len(cands) else float(sc.anchor)
            assert g == pytest.approx(lp["yes"] - lp["no"], abs=1e-4)


def test_self_judge_anchor_copy_has_margin_zero_and_plain_mode(trained):
    """y = a gives the very reply the anchor gets, so r = 0 exactly; without an anchor the anchor score is 0.
    (A learnt ordering is not tested here: in a test-sized budget the 1-layer tiny student does not learn
    verdicts that depend on the answer; the formula test above pins what g computes.)"""
    s = trained["student"]
    for k, (prompt, anchor) in enumerate(PROMPTS.items()):
        sc = self_judge(s, prompt, None, anchor, _candidates(s))
        assert float(sc.candidates[k] - sc.anchor) == pytest.approx(0.0, abs=1e-5)
    plain = self_judge(s, "Name a colour.", None, None, _candidates(s))
    assert plain.candidates.shape == (3,) and float(plain.anchor) == 0.0
    with_ref = self_judge(s, "Name a colour.", None, "red", _candidates(s))
    assert not torch.allclose(plain.candidates, with_ref.candidates)   # the reference is in the prompt


def test_composite_is_the_weighted_sum(trained):
    s = trained["student"]
    cfg = RankingConfig(scorer="composite", composite={"self_likelihood": 2.0, "self_judge": -0.5})
    prompt, anchor = "Name a colour.", "red"
    got = get_scorer("composite", cfg)(s, prompt, None, anchor, _candidates(s))
    sl, sj = self_likelihood(s, prompt, None, anchor, _candidates(s)), self_judge(s, prompt, None, anchor, _candidates(s))
    assert torch.allclose(got.candidates, 2.0 * sl.candidates - 0.5 * sj.candidates, atol=1e-5)
    assert float(got.anchor) == pytest.approx(2.0 * float(sl.anchor) - 0.5 * float(sj.anchor), abs=1e-5)
    with pytest.raises(VlrlcdError, match="composite"):
        composite(s, prompt, None, anchor, _candidates(s), cfg=RankingConfig())


@pytest.fixture(scope="module")
def clip_cfg(trained):
    path = trained["root"] / "vlrlcd-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return RankingConfig(scorer="clip", clip_model=str(path), clip_pretrained="random", clip_text_weight=1.0,
                         clip_image_weight=0.5)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_scores_follow_the_formula(trained, clip_cfg, tmp_path):
    s = trained["student"]
    texts = ["red", "blue", "a red circle"]
    cands = [s.encode_response(t) for t in texts]
    scorer = get_scorer("clip", clip_cfg)
    # text only: r_k = cos(T(y_k), T(a)) − 1 ≤ 0, exactly 0 for the copy of the anchor
    sc = scorer(s, "Name a colour.", None, "red", cands)
    model, preprocess, tok = load_clip(clip_cfg.clip_model, "random")
    with torch.no_grad():
        t = _unit(model.encode_text(tok(texts + ["red"])).float())
    assert torch.allclose(sc.candidates, t[:3] @ t[3], atol=1e-5) and float(sc.anchor) == pytest.approx(1.0, abs=1e-5)
    r = sc.candidates - sc.anchor
    assert float(r[0]) == pytest.approx(0.0, abs=1e-5) and (r[1:] < 0).all()
    # with an image: + w_i·[cos(I, T(y)) − cos(I, T(a))]
    img = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(img)
    sc = scorer(s, "What color is the shape?", str(img), "red", cands)
    with torch.no_grad():
        v = _unit(model.encode_image(preprocess(Image.open(img).convert("RGB")).unsqueeze(0)).float())[0]
    want = t[:3] @ t[3] + 0.5 * (t[:3] @ v - t[3] @ v)
    assert torch.allclose(sc.candidates, want, atol=1e-5)
    assert float(sc.candidates[0] - sc.anchor) == pytest.approx(0.0, abs=1e-5)


def test_clip_weights_must_be_local(trained, tmp_path):
    s = trained["student"]
    args = (s, "Name a colour.", None, "red", [s.encode_response("red")])
    with pytest.raises(VlrlcdError, match="clip_pretrained"):
        get_scorer("clip", RankingConfig(clip_pretrained=""))(*args)
    with pytest.raises(VlrlcdError, match="not found"):
        get_scorer("clip", RankingConfig(clip_pretrained=str(tmp_path / "missing.bin")))(*args)
    with pytest.raises(VlrlcdError, match="architecture"):
        get_scorer("clip", RankingConfig(clip_model="no-such-arch", clip_pretrained="random"))(*args)
    with pytest.raises(VlrlcdError, match="not available"):
        get_scorer("bleu")


def test_rollout_ranks_with_the_configured_scorer(trained, clip_cfg):
    s = trained["student"]
    from vlrlcd.datasets.records import Record

    rec = Record(id="c", prompt="Name a colour.")
    g = rollout(s, rec, "red", TrainConfig(objective="ldl_grpo", k=3), clip_cfg, MAX_NEW, sample_generator(0, 0, 0))
    direct = get_scorer("clip", clip_cfg)(s, rec.prompt, None, "red", g.candidates)
    assert torch.allclose(g.margins, direct.candidates - direct.anchor, atol=1e-6)
    assert float(g.target.sum()) == pytest.approx(1.0, abs=1e-6) and (g.margins <= 1e-5).all()
