"""The model of one RL step (training/rl.py), phase by phase: sampling on a K-fold repeated prefix cache,
scoring, the policy pass with gradient (the prompt prefix run once per prompt, the K continuations on its
cache), the reference pass under the SFT adapter, backward, AdamW.

What each pass keeps, per token and decoder layer, is what autograd saves there (the fp32 input of each
RMSNorm, LoRA's fp32 input of each adapted linear, q / k / v / the attention output, the MLP's gate, up and
SiLU outputs), counted by storage as `bench.memory.LiveTensorPeak` measures it; the log-prob passes add the
fp32 full-vocabulary logits of every fed token. Under QLoRA everything but the 4-bit linears is upcast to
fp32 by peft's `prepare_model_for_kbit_training`, and bitsandbytes returns each 4-bit matmul in its input's
dtype, so a 4-bit student's activations and KV cache are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlrlcd.planning.arch import Arch
from vlrlcd.planning.methods import method_passes, scores_plain
from vlrlcd.planning.model import Item, Plan, Settings, Shapes

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BATCHABLE = ("text", "llava", "llava_next")  # families whose prompts batch (Qwen2-VL's mrope: prompt by prompt)


@dataclass(frozen=True)
class _Dt:
    act: int      # activations, KV cache, linear outputs
    weight: int   # the full-precision weights (embeddings, lm_head, norms, vision, projector)
    logits: int   # lm_head output


def _dtypes(s: Settings) -> _Dt:
    c = _BYTES[s.compute_dtype]
    if s.quantization != "none":  # prepare_model_for_kbit_training upcasts all but the 4/8-bit linears to fp32;
        return _Dt(4, 4, 4)       # bitsandbytes casts each matmul's output back to its (fp32) input dtype
    if s.mixed_precision != "no":  # autocast: matmul outputs in half precision (approximate)
        return _Dt(2, c, 2)
    return _Dt(c, c, c)


def _lora_inputs(a: int, width: int, count: int, dropout: bool, device: str) -> int:
    """Bytes per token LoRA's A matrices save of one input shared by `count` adapted linears: peft casts the
    input to the adapter's fp32 (a copy each unless it is fp32 already); with dropout each keeps its own
    dropped copy and its mask (CUDA's fused dropout: a bool mask; the CPU one: an fp32 noise tensor)."""
    if count == 0:
        return 0
    if dropout:
        return count * (4 + (1 if device == "cuda" else 4)) * width
    return 4 * width if a == 4 else count * 4 * width


def _layer_saved(arch: Arch, s: Settings, dt: _Dt) -> int:
    """Bytes per token one decoder layer saves for backward (k / v excluded: see `_kv_width`)."""
    h, m, hq = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    lora = arch.params.lora_layer
    n = lambda *names: sum(1 for x in names if lora.get(x))  # noqa: E731
    d, dev = s.lora_dropout > 0, s.device
    a = dt.act
    out = 2 * (4 * h + 4)                                        # two RMSNorms: fp32 input, rsqrt
    out += _lora_inputs(a, h, n("q_proj", "k_proj", "v_proj"), d, dev)
    out += _lora_inputs(a, hq, n("o_proj"), d, dev)
    out += _lora_inputs(a, h, n("gate_proj", "up_proj"), d, dev)
    out += _lora_inputs(a, m, n("down_proj"), d, dev)
    out += 4 * 8 * len(lora)                                     # LoRA A outputs [tokens, r] (r <= 64 typical)
    out += a * hq * 2 + 4 * arch.heads                           # q after rope, attention output; log-sum-exp
    out += a * m * 3                                             # gate, up, SiLU(gate)
    return out


def _layer_forward(arch: Arch, dt: _Dt) -> int:
    """Bytes per token a decoder layer holds at once in a pass without gradient (inputs, q/k/v, MLP)."""
    h, m, hq, hkv = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return dt.act * (2 * h + 2 * hq + 2 * hkv + 3 * m) + (4 * m if dt.act != 4 else 0)


def _kv_width(arch: Arch, batched_mask: bool) -> int:
    """Key + value elements per token attention keeps: both at full head count where transformers repeats
    grouped-query heads (any attention mask, i.e. every batched or cached pass), else the KV heads."""
    kv = arch.kv_heads if not batched_mask else arch.heads
    return 2 * kv * arch.head_dim


def _cache(arch: Arch, rows: int, length: int, dt: _Dt) -> int:
    """A KV cache of `rows` sequences of `length` over all layers."""
    return rows * length * 2 * arch.kv_heads * arch.head_dim * dt.act * arch.layers



def _nograd_pass(arch: Arch, dt: _Dt, rows: int, prefix_rows: int, prefix_len: int, fed: int) -> int:
    """A log-prob pass without gradient: the repeated prefix cache, its growth, the logits."""
    cache = _cache(arch, rows, prefix_len + fed, dt)
    kv_rep = rows * (prefix_len + fed) * _kv_width(arch, True) * dt.act if arch.kv_heads < arch.heads else 0
    logits = rows * (fed + 1) * arch.vocab * (dt.logits + (4 if dt.logits != 4 else 0))
    first = _cache(arch, prefix_rows, prefix_len, dt) + _cache(arch, rows, prefix_len, dt)
    act = rows * fed * _layer_forward(arch, dt)
    return max(first, cache + max(kv_rep + act, logits))


def nograd_full(arch: Arch, dt: _Dt, rows: int, length: int, logit_tokens: int) -> int:
    """A pass without gradient over full sequences (no shared prefix): one layer's working set, the logits."""
    act = rows * length * (_layer_forward(arch, dt) + _kv_width(arch, True) * dt.act)
    logits = rows * logit_tokens * arch.vocab * (dt.logits + (4 if dt.logits != 4 else 0))
    return max(act, logits)


# ------------------------------------------------------------------ the phases of a step
@dataclass
class _Step:
    """One step's sizes (N prompts, K candidates of T tokens, G groups per pass, prefix L, scoring prompt Ls,
    C continuation tokens fed) and the line items collected so far."""

    arch: Arch
    s: Settings
    dt: _Dt
    N: int
    K: int
    T: int
    G: int
    img: int
    L: int
    Ls: int
    C: int
    batchable: bool
    peers: bool
    items: list[Item] = field(default_factory=list)

    @classmethod
    def of(cls, arch: Arch, s: Settings, shapes: Shapes) -> "_Step":
        N, T = s.batch, max(shapes.response_tokens, 1)
        img = arch.image_tokens if (arch.vision and shapes.images) else 0
        L = shapes.prompt_tokens + img                 # prefix length
        A = shapes.anchor_tokens or T
        return cls(arch, s, _dtypes(s), N, s.k, T, G=min(s.group_chunk or N, N), img=img, L=L,
                   Ls=L + A + shapes.scoring_extra,    # the scoring prompt (anchor in context)
                   C=max(T - 1, 1), batchable=arch.family in BATCHABLE, peers=s.layout == "peers")

    @property
    def checkpointed(self) -> bool:
        """The policy pass runs over full sequences (gradient checkpointing, or the peers' layout)."""
        return self.s.gradient_checkpointing or self.peers

    def add(self, name: str, b: float, phase: str, note: str = "") -> int:
        self.items.append(Item(name, int(b), phase, note))
        return int(b)


def _resident(st: _Step) -> int:
    """Weights, the LoRA policy with its gradients and AdamW state, the reference adapter."""
    p, s, dt, add = st.arch.params, st.s, st.dt, st.add
    if s.quantization == "4bit":
        qw = p.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256))  # nf4 + double-quantised absmax
        wname = "weights: LM linears 4-bit nf4"
    elif s.quantization == "8bit":
        qw, wname = p.quantizable + 4 * p.quantizable_rows, "weights: LM linears 8-bit"
    else:
        qw, wname = p.quantizable * dt.weight, f"weights: LM linears {s.compute_dtype}"
    resident = add(wname, qw, "resident", f"{p.quantizable / 1e9:.2f}B params")
    resident += add("weights: embeddings, lm_head, norms" + (" (fp32: kbit prep)" if s.quantization != "none" else ""),
                    p.lm_other * dt.weight, "resident", f"{p.lm_other / 1e6:.0f}M params")
    if p.vision:
        resident += add("weights: vision tower + projector" + (" (fp32)" if s.quantization != "none" else ""),
                        p.vision * dt.weight, "resident", f"{p.vision / 1e6:.0f}M params")
    resident += add("LoRA policy: weights, grads, AdamW m and v (fp32)", 16 * p.lora, "resident",
                    f"{p.lora / 1e6:.1f}M params on {p.lora_modules} linears")
    if s.reference_adapter:
        resident += add("LoRA reference (the SFT adapter, fp32)", 4 * p.lora, "resident")
    if p.modules_to_save:
        resident += add("modules_to_save: weights, grads, AdamW (+ reference copy)",
                        p.modules_to_save * dt.weight * (4 + int(s.reference_adapter)), "resident")
    return resident


def _vision(st: _Step) -> tuple[int, int]:
    """(vision features kept for the step, the tower's transient activations): once per prompt (peers: once per
    completion, in every pass)."""
    if not st.img:
        return 0, 0
    arch, dt, N, K, peers = st.arch, st.dt, st.N, st.K, st.peers
    copies = K if peers else 1
    feats = st.add("vision features kept for the step" + (" (K copies)" if peers else " (once per prompt)"),
                   N * copies * st.img * arch.hidden * dt.weight, "step")
    V, Lv = arch.vision_tokens, arch.vision_layers
    tower = V * (4 * arch.vision_hidden + 2 * arch.vision_intermediate) * dt.weight
    if arch.vision_keeps_hidden:
        tower += (Lv + 1) * V * arch.vision_hidden * dt.weight
    tower_imgs = N * K if peers else 1             # peers batch every completion's image
    return feats, st.add("vision tower activations (transient, no grad)", tower * tower_imgs, "vision")


def _sampling(st: _Step) -> int:
    """Sampling: the prefix pass, the K-fold repeated cache, decoding."""
    arch, dt, L, T, peers = st.arch, st.dt, st.L, st.T, st.peers
    rows_s = st.N * st.K
    pre_rows = st.N if st.batchable and not peers else (st.N * st.K if peers else 1)
    rows = rows_s if st.batchable or peers else st.K
    cache_pre = _cache(arch, pre_rows, L, dt) if not peers else 0
    cache_final = _cache(arch, rows, L + T, dt)
    layer_dup = cache_final // arch.layers
    dec_logits = rows * arch.vocab * (dt.logits + 4)
    sampling = max(cache_pre + cache_final * L // (L + T), cache_final + layer_dup + dec_logits)
    sampling = max(sampling, _cache(arch, pre_rows, L, dt) + pre_rows * L * _layer_forward(arch, dt))
    by_prompt = "" if st.batchable or peers else " (prompt by prompt)"
    st.add(f"sampling: KV cache {rows} rows x {L + T} tokens{by_prompt}", cache_final, "sampling")
    return sampling


def _scoring(st: _Step) -> int:
    """The scoring pass (no grad): the anchor-in-context prompt, K candidates + the anchor (a method that scores
    without the anchor: the prompt, K candidates)."""
    arch, dt, N, K = st.arch, st.dt, st.N, st.K
    plain = scores_plain(st.s.objective)
    rows, prompt = (K, st.L) if plain else (K + 1, st.Ls)
    if st.peers:
        score = nograd_full(arch, dt, N * rows, prompt + st.T, st.T)
    elif st.batchable:
        score = _nograd_pass(arch, dt, N * rows, N, prompt, st.C)
    else:
        score = _nograd_pass(arch, dt, rows, 1, prompt, st.C)
    return st.add("scoring pass (no grad): cache + logits" + (" (no anchor)" if plain else ""), score, "scoring")


def _policy_activations(st: _Step) -> tuple[int, int, int]:
    """(what the policy pass saves for backward before its logits, a recomputed layer's bytes, logit rows)."""
    arch, dt, L, T, C, G = st.arch, st.dt, st.L, st.T, st.C, st.G
    R = G * st.K
    saved_layer = _layer_saved(arch, st.s, dt)
    if st.checkpointed:
        seq = L + T
        if st.s.gradient_checkpointing:   # full sequences; each layer keeps only its input
            graph = R * seq * arch.layers * 4 * arch.hidden if dt.act == 4 else R * seq * arch.layers * dt.act * arch.hidden
            recompute = R * seq * (saved_layer + _kv_width(arch, True) * dt.act)
            note = f"{R} full sequences x {seq} tokens, layer inputs only"
        else:
            graph = R * seq * arch.layers * (saved_layer + _kv_width(arch, True) * dt.act)
            recompute = 0
            note = f"{R} full sequences x {seq} tokens (the prompt K times)"
        graph += R * seq * (4 * arch.hidden + 4)
        st.add("policy pass activations (saved for backward)", graph, "policy", note)
        return graph, recompute, R * T
    pre_tok = G * L
    graph = pre_tok * arch.layers * (saved_layer + _kv_width(arch, st.batchable) * dt.act)
    st.add("policy pass: prompt prefix activations (once per prompt)", graph, "policy", f"{G} x {L} tokens")
    cont = R * C * arch.layers * saved_layer + R * (L + C) * arch.layers * _kv_width(arch, True) * dt.act
    graph += st.add("policy pass: K continuations on the shared prefix cache", cont, "policy",
                    f"{R} rows x {C} tokens over {L + C} keys")
    graph += (pre_tok + R * C) * (4 * arch.hidden + 4)
    return graph, 0, R * (C + 1)


def _passes(st: _Step, feats: int) -> dict[str, int]:
    """The policy pass with gradient, the reference (and privileged) pass on top of its graph, then backward:
    pass -> bytes on top of the resident ones and the vision features."""
    arch, dt, L, T, C, G, K = st.arch, st.dt, st.L, st.T, st.C, st.G, st.K
    R, full = G * K, st.checkpointed
    graph, recompute, logit_rows = _policy_activations(st)
    logits = st.add(f"log-prob logits, fp32 ({logit_rows} tokens x {arch.vocab} vocab)",
                    4 * logit_rows * arch.vocab, "policy")
    graph += logits
    lm_out = logit_rows * arch.vocab * dt.logits if dt.logits != 4 else 0
    passes = {"policy": graph + max(lm_out, recompute) + (feats if st.peers else 0)}
    if st.s.beta != 0:
        ref = (nograd_full(arch, dt, R, L + T, T) if full
               else _nograd_pass(arch, dt, R, G, L, C) if st.batchable else _nograd_pass(arch, dt, K, 1, L, C))
        passes["reference"] = graph + st.add("reference pass (no grad) on top of the policy graph", ref, "reference")
    if "privileged" in method_passes(st.s.objective, st.s.beta):
        priv = _nograd_pass(arch, dt, R, G, st.Ls, C) if st.batchable else _nograd_pass(arch, dt, K, 1, st.Ls, C)
        passes["privileged"] = graph + st.add("privileged pass (no grad) on top of the policy graph", priv, "reference")
    # backward starts at the logits (their fp32 gradient and the gather's), freed before the layers run (and,
    # with checkpointing, recompute one at a time); the groups of a prompt-by-prompt pass go one by one
    grad_rows = logit_rows if st.batchable or full else logit_rows // max(G, 1)
    hidden_grads = 2 * 4 * arch.hidden * (R * (L + T) if full else G * L + R * C)
    back = max(2 * 4 * grad_rows * arch.vocab, recompute - logits) + hidden_grads
    st.add("backward: logits gradients (fp32), or a recomputed layer, + hidden-state gradients", back, "backward")
    passes["backward"] = graph + back
    return passes


def _notes(s: Settings) -> list[str]:
    notes = []
    if method_passes(s.objective, s.beta) == ():
        notes.append(f"{s.objective} runs its passes group by group over the pairs' responses: the policy lines "
                     "are an upper bound")
    if s.mixed_precision != "no":
        notes.append("train.mixed_precision: activations modelled at 2 bytes (approximate)")
    if s.quantization == "8bit":
        notes.append("8-bit: activations modelled as under 4-bit (fp32; not measured)")
    return notes


def plan_step(arch: Arch, s: Settings, shapes: Shapes) -> Plan:
    """Peak tensor bytes of one RL step, phase by phase, with the line items that make them up."""
    st = _Step.of(arch, s, shapes)
    resident = _resident(st)
    feats, tower = _vision(st)
    base = resident + feats
    phases = {"vision": base + tower, "sampling": base + _sampling(st)}
    if s.score:
        phases["scoring"] = base + _scoring(st)
    for name, b in _passes(st, feats).items():
        phases[name] = base + b
    return Plan(arch, s, shapes, st.items, phases, max(phases, key=phases.get), _notes(s))
