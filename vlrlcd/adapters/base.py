"""StudentAdapter: the one interface objectives, the ranking core and the loop use for any student.

Every computation over a prompt's K candidates runs the prompt prefix (image features merged in)
once, then the K continuations as one batch on top of the shared prefix key/value cache. The image
goes through the vision tower once per prompt (`image_features`), and the result is reused by every
prefix built from that image (the policy prompt, the scoring prompt, the policy and reference passes).
Prompts built together (`prefixes`, e.g. an evaluation batch) share one processor call and one vision pass.
A single prompt is a batch of one everywhere: one decode loop (`sample_batch`), one log-prob path
(`token_logprobs_batch`), one prefix pass (`_shared_prefix`); `sample`, `token_logprobs`, `prefix` and
`continuation_logits` call them with one prompt. `batch_token_logprobs` is the one path without a shared cache:
each (prompt, response) pair as its own full sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from transformers import DynamicCache

from vlrlcd.adapters.cache import cache_kwargs, output_cache, repeat_cache
from vlrlcd.adapters.families import VISION_MODULES, Family, counted_positions, image_row
from vlrlcd.adapters.inputs_cache import InputsCache, inputs_key
from vlrlcd.adapters.padding import pad_rows
from vlrlcd.errors import VlrlcdError

REFERENCE_ADAPTER = "sft"
POLICY_ADAPTER = "default"


@dataclass
class Prefix:
    """One prompt, tokenized with the checkpoint's chat template, ready to be run once."""

    input_ids: torch.Tensor                     # [1, P]
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # image features, grids, token types, positions
    image_features: Any = None                  # reusable by another prefix over the same image
    next_position: int | None = None            # explicit (mrope) position of the first continuation token;
                                                # None: the model counts on from the cache length


@dataclass
class TokenLogprobs:
    """Per-token log-probs of K responses given one prefix; `mask` is 1 on real tokens."""

    logp: torch.Tensor   # [K, T]
    mask: torch.Tensor   # [K, T] float
    ids: torch.Tensor    # [K, T]

    def sequence(self, length_normalize: bool = True) -> torch.Tensor:
        """s(y) = Σ_t logp_t (or its mean over real tokens when `length_normalize`)."""
        total = (self.logp * self.mask).sum(-1)
        return total / self.mask.sum(-1).clamp(min=1) if length_normalize else total


@dataclass
class _Shared:
    """Prompts' prefix pass with each row repeated for its candidates, ready to be continued (`_feed`)."""

    cache: DynamicCache
    last: torch.Tensor                 # [R, V] logits after each row's prompt
    attn: torch.Tensor | None          # [R, L + fed] left-padded attention mask; None for one prompt (no padding)
    next_pos: torch.Tensor | None      # [R] position of each row's first continuation token (several prompts)
    position: int | None               # one prompt's explicit (mrope) next position; None: counted from the cache
    fed: int = 0                       # continuation tokens fed so far


def _logprobs_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax (fp32)."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


class StudentAdapter:
    """A (peft-wrapped) student, its processor / tokenizer and the family-specific input building."""

    def __init__(self, model, processor, tokenizer, family: Family, name_or_path: str):
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer
        self.family = family
        self.name_or_path = name_or_path
        self.vision_calls = 0
        self.inputs_cache = InputsCache()   # the processor's output for prompts built before (inputs_cache.py)
        self._frozen_features: bool | None = None
        # set under FSDP (training/sharding.py): lockstep(local_done) -> whether every process is done.
        # Decoding then runs until all processes finish, and every pass has the same shape of calls.
        self.lockstep: Callable[[bool], bool] | None = None
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    # ---------------------------------------------------------------- inputs
    @property
    def is_vision(self) -> bool:
        return self.family.vision

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_image(self, image: str | Path | Image.Image | None) -> Image.Image | None:
        if image is None or isinstance(image, Image.Image):
            return image
        from vlrlcd.datasets.images import load_image

        return load_image(image)

    def prefix(self, prompt: str, image: str | Path | Image.Image | None = None,
               features: Any = None) -> Prefix:
        """Tokenize `prompt` (with its image) through the chat template; the vision tower runs only
        when `features` from an earlier prefix over the same image are not given."""
        return self.prefixes([prompt], [image], [features])[0]

    def prefixes(self, prompts: list[str], images: list | None = None, features: list | None = None) -> list[Prefix]:
        """`[prefix(prompts[i], images[i], features[i])]` built together: one processor call and one vision-tower
        pass over the images whose `features` are not given (instead of one of each per prompt)."""
        n = len(prompts)
        images = list(images) if images is not None else [None] * n
        features = list(features) if features is not None else [None] * n
        if len(images) != n or len(features) != n:
            raise ValueError(f"one image and one features entry per prompt: {len(images)}, {len(features)} for {n}")
        for prompt, image in zip(prompts, images):
            if image is not None and not self.is_vision:
                raise VlrlcdError(
                    f"student {self.name_or_path} is a text-only model ({self.family.name}) but the record has an "
                    "image; use a vision-language checkpoint or a text-only dataset"
                )
            if not prompt or not prompt.strip():
                raise VlrlcdError("empty prompt: every record needs a non-empty prompt")
        has = [images[i] is not None and features[i] is not None for i in range(n)]
        given = [i for i in range(n) if has[i]]
        encode = [i for i in range(n) if not has[i]]  # text only, or an image to encode
        out: list[Prefix | None] = [None] * n
        for group, feats in ((encode, None), (given, [features[i] for i in given])):
            if group:
                for i, prefix in zip(group, self._build([prompts[i] for i in group], [images[i] for i in group],
                                                        feats)):
                    out[i] = prefix
        return out  # type: ignore[return-value]

    def _build(self, prompts: list[str], images: list, features: list | None) -> list[Prefix]:
        """Prefixes of prompts built in one processor call (or taken from `inputs_cache` when these prompts and
        image files were built before); their images' features are `features` or, when None, one vision pass
        over all their images."""
        key = inputs_key(prompts, images)
        built = self.inputs_cache.get(key)
        if built is None:
            built = self.family.build_prompts(self, prompts, [self.load_image(im) for im in images])
            self.inputs_cache.put(key, built)
        rows, pixels = built
        device = self.device
        pixels = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pixels.items()}
        if features is None and pixels:
            feature_key = ("features", key) if key is not None and self.features_frozen() else None
            batch = self.inputs_cache.get(feature_key)
            if batch is None:
                batch = self.image_features(pixels, sum(im is not None for im in images))
                self.inputs_cache.put(feature_key, batch)
            features = [None] * len(images)
            for j, i in enumerate(i for i, im in enumerate(images) if im is not None):
                features[i] = type(batch)(pooler_output=[batch.pooler_output[j]])
        out, j = [], 0
        for i, (input_ids, model_kwargs) in enumerate(rows):
            input_ids = input_ids.to(device)
            model_kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_kwargs.items()}
            feats = None
            if images[i] is not None:
                feats = features[i]
                model_kwargs.update(self.family.feature_kwargs(feats, image_row(pixels, j)))
                j += 1
            next_position = None
            if self.family.positions is not None:
                pos, nxt = self.family.positions(self.model, input_ids, torch.ones_like(input_ids), model_kwargs)
                model_kwargs["position_ids"], next_position = pos, int(nxt[0])
            out.append(Prefix(input_ids, model_kwargs, feats, next_position))
        return out

    def features_frozen(self) -> bool:
        """Whether image features depend on nothing that trains: no parameter of the vision tower, the projector
        (or LLaVA-NeXT's image_newline) requires grad or belongs to an adapter. A build's features are then kept
        with its processor output in `inputs_cache`: the numbers of a new vision pass over the same pixels."""
        if self._frozen_features is None:
            parts = [x for x in (*VISION_MODULES, self.family.projector, "image_newline") if x]
            adapter_marks = ("lora_", "modules_to_save", "trainable_tokens")
            self._frozen_features = not any(
                p.requires_grad or any(m in n for m in adapter_marks)
                for n, p in self.model.named_parameters() if any(x in n for x in parts))
        return self._frozen_features

    def image_features(self, pixel_inputs: dict[str, torch.Tensor], images: int = 1) -> Any:
        """The one vision-tower pass over `images` images (gradient only if the projector is trained); only the
        projected features are kept (not the tower's hidden states), one pooler_output entry per image.
        `vision_calls` counts the images encoded."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        self.vision_calls += images
        out = self.family.image_features(self.model, pixel_inputs)
        return BaseModelOutputWithPooling(pooler_output=out.pooler_output)

    def encode_response(self, text: str, add_eos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + [self.eos_ids[0]] if add_eos else ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.eos_ids and i != self.pad_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ---------------------------------------------------------------- compute
    # One path for every computation over prompts and their candidates: `_shared_prefix` runs the prompts' prefix
    # pass once (a batch of one as it is; several left-padded into one), each row's cache repeated for its
    # candidates; `_feed` continues all rows on it. A single prompt is a batch of one everywhere
    # (`token_logprobs`, `sample`, `continuation_logits` are the batched forms called with one prefix).
    def _shared_prefix(self, prefixes: list[Prefix], repeats: list[int]) -> _Shared:
        """The prefix pass over `prefixes`, row i repeated repeats[i] times (R = Σ repeats rows). One prompt runs
        as it is (the model counts positions on from the cache, or its explicit mrope ones). Several run as one
        left-padded [N, L] pass (attention mask; positions counted over real tokens, or Qwen2(.5)-VL's 3-D ones from
        its rope index given the mask), so every prompt's last token sits at column L - 1 with its own position.
        Gradient flows when grad is enabled."""
        if len(prefixes) == 1:
            p, k = prefixes[0], repeats[0]
            out = self.model(input_ids=p.input_ids, use_cache=True, logits_to_keep=1, **p.model_kwargs)
            return _Shared(repeat_cache(output_cache(out), k), out.logits[:, -1, :].expand(k, -1), None, None,
                           p.next_position)
        device = self.device
        ids, attn = pad_rows([p.input_ids[0] for p in prefixes], self.pad_id, left=True, device=device)
        kwargs = self.family.merge_kwargs([p.model_kwargs for p in prefixes], ids.shape[1], left=True)
        if self.family.positions is None:
            pos, next_pos = counted_positions(attn)
        else:  # Qwen2(.5)-VL: 3-D positions from the model's own rope index over the real tokens
            pos, next_pos = self.family.positions(self.model, ids, attn, kwargs)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **kwargs)
        cache, last = output_cache(out), out.logits[:, -1, :]
        if all(r == 1 for r in repeats):  # one row per prompt (greedy evaluation): nothing to repeat
            return _Shared(cache, last, attn, next_pos, None)
        reps = torch.tensor(repeats, device=device)
        return _Shared(repeat_cache(cache, reps), last.repeat_interleave(reps, dim=0),
                       attn.repeat_interleave(reps, dim=0), next_pos.repeat_interleave(reps), None)

    def _feed(self, shared: _Shared, ids: torch.Tensor):
        """Feed `ids` [R, C] to every row right after what it holds (the prefix, then what was fed before); the
        shared state moves on by C tokens. Right of the prompt nothing is padded, so a real token never sees a pad."""
        R, C = ids.shape
        kwargs = cache_kwargs(shared.cache)
        steps = torch.arange(C, device=ids.device)
        if shared.attn is not None:  # several prompts: positions counted on from each one's real length
            shared.attn = torch.cat([shared.attn, shared.attn.new_ones(R, C)], dim=1)
            kwargs.update(attention_mask=shared.attn,
                          position_ids=shared.next_pos[:, None] + shared.fed + steps[None, :])
        elif shared.position is not None:  # one prompt with explicit (3-D mrope) positions
            kwargs["position_ids"] = (steps + (shared.position + shared.fed)).view(1, 1, C).expand(3, R, C)
        out = self.model(input_ids=ids, **kwargs)
        shared.cache, shared.fed = output_cache(out), shared.fed + C
        return out

    def _pad(self, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses right-padded: ids [K, T] and the float mask of real tokens, on the model's device."""
        if not responses or any(len(r) == 0 for r in responses):
            raise ValueError("every response needs at least one token")
        ids, mask = pad_rows(responses, self.pad_id)
        return ids.to(self.device), mask.float().to(self.device)

    def token_logprobs(self, prefix: Prefix, responses: list[list[int]]) -> TokenLogprobs:
        """log π(y_t | x, y_<t) for K responses of one prefix: `token_logprobs_batch` with one prefix."""
        if not responses:  # a batch entry may have no response (it gets empty tensors); a call for one prompt may not
            raise ValueError("every response needs at least one token")
        return self.token_logprobs_batch([prefix], [responses])[0]

    def token_logprobs_batch(self, prefixes: list[Prefix], responses: list[list[list[int]]]) -> list[TokenLogprobs]:
        """log π(y_t | x_i, y_<t) for each prefix's K_i responses, in two forwards for all (grad if grad is enabled).

        One prefix pass (`_shared_prefix`: a single prompt as it is, several left-padded), each row's cache repeated
        for its K_i responses; y_1 is scored from the prefix's last logits, y_2..y_T from one pass of the ΣK_i
        right-padded rows (the last response token is never fed). Each prompt gets its own [K_i, T_i] slice, equal
        to its own call with one prefix up to the ~1e-6 left padding makes. Under `lockstep` the continuation pass
        always runs; with checkpointing one full-sequence `batch_token_logprobs`. A prompt with no response gets
        empty [0, 0] tensors and adds no row."""
        if len(prefixes) != len(responses):
            raise ValueError(f"one list of responses per prefix: {len(responses)} for {len(prefixes)} prefixes")
        used = [i for i, rs in enumerate(responses) if rs]
        out = [self._empty_logprobs() for _ in prefixes]
        if not used:
            return out
        counts = [len(responses[i]) for i in used]
        rows = [r for i in used for r in responses[i]]
        if self.checkpointing:  # no KV cache inside checkpointed layers: every row as a full sequence
            tl = self.batch_token_logprobs([prefixes[i] for i, c in zip(used, counts) for _ in range(c)], rows)
        else:
            ids, mask = self._pad(rows)
            shared = self._shared_prefix([prefixes[i] for i in used], counts)
            tl = self._rows_logprobs(shared.last, ids, mask, lambda fed: self._feed(shared, fed).logits)
        start = 0
        for i, c in zip(used, counts):  # each prompt's rows, cut to its own longest response
            t = max(len(r) for r in responses[i])
            out[i] = TokenLogprobs(tl.logp[start:start + c, :t], tl.mask[start:start + c, :t], tl.ids[start:start + c, :t])
            start += c
        return out

    def _rows_logprobs(self, last: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       continuation: Callable[[torch.Tensor], torch.Tensor]) -> TokenLogprobs:
        """y_1 of each row from the prefix's last logits [R, V]; y_2..y_T from `continuation(y_1..y_{T-1})`, one
        pass returning logits [R, C, V] (the last response token is never fed). In lockstep the pass always
        runs (one token, unused, when T == 1), so every process makes the same calls."""
        T = ids.shape[1]
        first = _logprobs_of(last, ids[:, 0])[:, None]
        if T == 1 and self.lockstep is None:
            logp = first
        else:
            logits = continuation(ids[:, : max(T - 1, 1)])[:, : T - 1]
            logp = torch.cat([first, _logprobs_of(logits, ids[:, 1:])], dim=1)
        return TokenLogprobs(logp * mask, mask, ids)

    @property
    def checkpointing(self) -> bool:
        """Whether activation checkpointing is on and active (train mode): transformers then drops the KV
        cache inside the layers, so log-probs take the full-sequence path."""
        if not self.model.training:
            return False
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        on = getattr(base, "is_activation_checkpointing", None)  # transformers 5; 4.x: is_gradient_checkpointing
        return bool(on if on is not None else getattr(base, "is_gradient_checkpointing", False))

    def continuation_logits(self, prefix: Prefix, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits after each response token on the shared prefix: ([K, T, V], row t is the distribution after
        y_1..y_t), and the [K, T] mask of real tokens. The prefix runs once; positions are right for every
        family (use this rather than running a continuation by hand)."""
        ids, mask = self._pad(responses)
        return self._feed(self._shared_prefix([prefix], [ids.shape[0]]), ids).logits, mask

    def batch_token_logprobs(self, prefixes: list[Prefix], responses: list[list[int]]) -> TokenLogprobs:
        """log π(y_t | x_i, y_<t) for (prefix_i, response_i) pairs, each its own full sequence, in one right-padded
        forward (no shared cache: the SFT and checkpointed path; also the naive reference the shared-prefix path
        is tested against)."""
        if len(prefixes) != len(responses):
            raise ValueError("one response per prefix")
        resp_ids, mask = self._pad(responses)
        ids, attn = pad_rows([torch.cat([p.input_ids[0].cpu(), torch.tensor(r, dtype=torch.long)])
                              for p, r in zip(prefixes, responses)], self.pad_id)
        ids, attn, L = ids.to(self.device), attn.to(self.device), ids.shape[1]
        kwargs = self.family.merge_kwargs([p.model_kwargs for p in prefixes], L)
        if self.family.positions is not None:  # the responses' tokens are text: they continue each prompt's positions
            kwargs["position_ids"], _ = self.family.positions(self.model, ids, attn, kwargs)
        T = resp_ids.shape[1]
        starts = torch.tensor([p.input_ids.shape[1] - 1 for p in prefixes], device=ids.device)
        pos = (starts[:, None] + torch.arange(T, device=ids.device)[None, :]).clamp(max=L - 1)
        # logits only where a response token is predicted ([B, T] positions), never over the prompt
        logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=pos, **kwargs).logits
        if logits.shape[:2] != pos.shape:  # a model without per-row logits_to_keep (rare): keep all, then gather
            logits = self.model(input_ids=ids, attention_mask=attn, **kwargs).logits
            logits = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
        return TokenLogprobs(_logprobs_of(logits, resp_ids) * mask, mask, resp_ids)

    @torch.no_grad()
    def sample(self, prefix: Prefix, k: int, max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """K continuations of one prefix (greedy when temperature == 0): `sample_batch` with one prefix."""
        return self.sample_batch([prefix], k, max_new_tokens, temperature, [generator])[0]

    @torch.no_grad()
    def sample_batch(self, prefixes: list[Prefix], k: int, max_new_tokens: int, temperature: float = 1.0,
                     generators: list[torch.Generator | None] | None = None) -> list[list[list[int]]]:
        """K continuations of EACH prefix (greedy when temperature == 0), each ending at EOS or the limit, in one
        decode: one prefix pass (`_shared_prefix`), each row's cache repeated K-fold, and the N·K rows decode
        together, one forward per new token for the whole batch. Prompt i's K tokens are drawn with its own
        generator from its own [K, V] probabilities, so its candidates depend on (prefix i, generator i) only —
        not on the other prompts (up to the ~1e-6 change left padding makes to the logits)."""
        n = len(prefixes)
        gens = list(generators) if generators is not None else [None] * n
        if len(gens) != n:
            raise ValueError(f"one generator per prefix: {len(gens)} for {n} prefixes")
        if n == 0 or k == 0:
            return [[] for _ in prefixes]
        shared = self._shared_prefix(prefixes, [k] * n)  # rows i·K .. i·K+K-1
        logits = shared.last
        eos = torch.tensor(self.eos_ids, device=logits.device)
        done = torch.zeros(n * k, dtype=torch.bool, device=logits.device)
        steps: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            nxt = self._draw(logits, done, k, temperature, gens)
            nxt, done, stop = self._record_step(nxt, done, eos, steps, t == max_new_tokens - 1)
            if stop:
                break
            logits = self._feed(shared, nxt.unsqueeze(1)).logits[:, -1, :]
        rows = self._until_eos(torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n * k)])
        return [rows[i * k:(i + 1) * k] for i in range(n)]

    def _draw(self, logits: torch.Tensor, done: torch.Tensor, k: int, temperature: float,
              gens: list[torch.Generator | None]) -> torch.Tensor:
        """The next token of each of the N·K rows: the argmax (temperature 0), or drawn with prompt i's generator
        from its K rows' probabilities; a finished prompt draws nothing (its rows feed pad either way)."""
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        open_ = (~done).view(len(gens), k).any(1).tolist()
        nxt = torch.full((len(gens) * k,), self.pad_id, dtype=torch.long)
        for i in range(len(gens)):
            if open_[i]:
                nxt[i * k:(i + 1) * k] = torch.multinomial(probs[i * k:(i + 1) * k], 1, generator=gens[i]).squeeze(1)
        return nxt.to(logits.device)

    def _record_step(self, nxt: torch.Tensor, done: torch.Tensor, eos: torch.Tensor, steps: list[torch.Tensor],
                     last: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Pad the finished rows of a decoding step, keep it, mark EOS; and whether decoding stops: at the
        limit, or when every row is done (on every process, in lockstep)."""
        nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
        steps.append(nxt)
        done = done | torch.isin(nxt, eos)
        if last:
            return nxt, done, True
        finished = bool(done.all())
        return nxt, done, (finished if self.lockstep is None else self.lockstep(finished))

    def _empty_logprobs(self) -> TokenLogprobs:
        device = self.device
        return TokenLogprobs(torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device),
                             torch.zeros(0, 0, dtype=torch.long, device=device))

    def _until_eos(self, seqs: list[list[int]]) -> list[list[int]]:
        """Each row up to and including its first EOS (the pad fed after it dropped)."""
        result = []
        for row in seqs:
            out_row = []
            for tok in row:
                out_row.append(tok)
                if tok in self.eos_ids:
                    break
            result.append(out_row)
        return result

    @torch.no_grad()
    def generate(self, records: list, max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy answers for records (anything with `.prompt` and `.image`), `batch_size` prompts per batch: their
        prefixes built together (`prefixes`: one processor call, one vision pass), then one batched decode
        (`sample_batch`)."""
        if batch_size < 1:
            raise VlrlcdError(f"batch_size must be >= 1 (eval.batch_size), got {batch_size}")
        answers: list[str] = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prefixes = self.prefixes([r.prompt for r in chunk], [r.image for r in chunk])
            rows = self.sample_batch(prefixes, 1, max_new_tokens, temperature=0.0)
            answers += [self.decode(k_rows[0]) for k_rows in rows]
        return answers

    # ---------------------------------------------------------------- adapters
    @property
    def has_reference_adapter(self) -> bool:
        return REFERENCE_ADAPTER in getattr(self.model, "peft_config", {})

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Run as the reference policy: the frozen SFT adapter on the same base weights (or the bare
        base when there was no SFT stage). Never a second copy of the model."""
        if self.has_reference_adapter:
            # peft's set_adapter flips requires_grad (active adapter on, others off): switch in inference
            # mode and put every flag back as it was, so the SFT weights never require grad.
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                self.model.set_adapter(POLICY_ADAPTER, inference_mode=True)
                for p in trainable:
                    p.requires_grad_(True)
        else:
            with self.model.disable_adapter():
                yield

    def _freeze_reference(self) -> None:
        for name, p in self.model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                p.requires_grad_(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, out_dir: str | Path) -> Path:
        """Save the policy adapter as a plain peft adapter directory (loadable with PeftModel.from_pretrained)."""
        out = Path(out_dir)
        self.model.save_pretrained(out, selected_adapters=[POLICY_ADAPTER])
        return out
