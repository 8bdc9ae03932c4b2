"""StudentAdapter: the one interface objectives, the ranking core and the loop use for any student.

Every computation over a prompt's K candidates runs the prompt prefix (image features merged in)
once, then the K continuations as one batch on top of the shared prefix key/value cache. The image
goes through the vision tower once per prompt (`image_features`), and the result is reused by every
prefix built from that image (the policy prompt, the scoring prompt, the policy and reference passes).
Prompts built together (`prefixes`, e.g. an evaluation batch) share one processor call and one vision pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from transformers import DynamicCache

from vlrlcd.adapters.cache import cache_kwargs, expand_cache, output_cache
from vlrlcd.adapters.families import Family, counted_positions, image_row
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


def _repeat_cache(cache: DynamicCache, k: int | torch.Tensor) -> DynamicCache:
    """A cache whose batch is every row of `cache` repeated in place: `k` times each (row i -> rows i·k ..
    i·k+k-1), or k[i] times row i when `k` is a tensor of per-row counts."""
    return DynamicCache(ddp_cache_data=[(layer.keys.repeat_interleave(k, dim=0),
                                         layer.values.repeat_interleave(k, dim=0)) for layer in cache.layers])


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
        imgs = [self.load_image(im) for im in images]
        has = [imgs[i] is not None and features[i] is not None for i in range(n)]
        given = [i for i in range(n) if has[i]]
        encode = [i for i in range(n) if not has[i]]  # text only, or an image to encode
        out: list[Prefix | None] = [None] * n
        for group, feats in ((encode, None), (given, [features[i] for i in given])):
            if group:
                for i, prefix in zip(group, self._build([prompts[i] for i in group], [imgs[i] for i in group], feats)):
                    out[i] = prefix
        return out  # type: ignore[return-value]

    def _build(self, prompts: list[str], imgs: list, features: list | None) -> list[Prefix]:
        """Prefixes of prompts built in one processor call; their images' features are `features` or, when None,
        one vision pass over all their images."""
        rows, pixels = self.family.build_prompts(self, prompts, imgs)
        device = self.device
        pixels = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pixels.items()}
        if features is None and pixels:
            batch = self.image_features(pixels, sum(im is not None for im in imgs))
            features = [None] * len(imgs)
            for j, i in enumerate(i for i, im in enumerate(imgs) if im is not None):
                features[i] = type(batch)(pooler_output=[batch.pooler_output[j]])
        out, j = [], 0
        for i, (input_ids, model_kwargs) in enumerate(rows):
            input_ids = input_ids.to(device)
            model_kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_kwargs.items()}
            feats = None
            if imgs[i] is not None:
                feats = features[i]
                model_kwargs.update(self.family.feature_kwargs(feats, image_row(pixels, j)))
                j += 1
            next_position = None
            if self.family.positions is not None:
                pos, nxt = self.family.positions(self.model, input_ids, torch.ones_like(input_ids), model_kwargs)
                model_kwargs["position_ids"], next_position = pos, int(nxt[0])
            out.append(Prefix(input_ids, model_kwargs, feats, next_position))
        return out

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
    def _prefix_forward(self, prefix: Prefix):
        out = self.model(input_ids=prefix.input_ids, use_cache=True, logits_to_keep=1, **prefix.model_kwargs)
        return output_cache(out), out.logits[:, -1, :]

    def _positions(self, prefix: Prefix, k: int, start: int, length: int) -> dict:
        """`position_ids` for `length` continuation tokens from offset `start` after the prefix, for
        families with explicit (3-D mrope) positions; {} for the rest."""
        if prefix.next_position is None:
            return {}
        pos = torch.arange(length, device=prefix.input_ids.device) + (prefix.next_position + start)
        return {"position_ids": pos.view(1, 1, length).expand(3, k, length)}

    def _pad(self, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not responses or any(len(r) == 0 for r in responses):
            raise ValueError("every response needs at least one token")
        T = max(len(r) for r in responses)
        ids = torch.full((len(responses), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(responses), T)
        for i, r in enumerate(responses):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1.0
        return ids.to(self.device), mask.to(self.device)

    def token_logprobs(self, prefix: Prefix, responses: list[list[int]]) -> TokenLogprobs:
        """log π(y_t | x, y_<t) for K responses, sharing one prefix pass (grad if grad is enabled).

        The prefix runs once (batch 1); y_1 is scored from its last logits, y_2..y_T from one batch-K pass of
        y_1..y_{T-1} on the K-fold expanded prefix cache (the last response token is never fed)."""
        if self.checkpointing:  # no KV cache inside checkpointed layers: K full sequences in one batch
            return self.batch_token_logprobs([prefix] * len(responses), responses)
        ids, mask = self._pad(responses)
        cache, last = self._prefix_forward(prefix)
        return self._rows_logprobs(last.expand(ids.shape[0], -1), ids, mask,
                                   lambda fed: self._continue(prefix, cache, fed).logits)

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

    def _continue(self, prefix: Prefix, cache, ids: torch.Tensor):
        """Feed `ids` [K, L] right after the prefix, as one batch on its K-fold expanded cache."""
        K, L = ids.shape
        return self.model(input_ids=ids, **cache_kwargs(expand_cache(cache, K)), **self._positions(prefix, K, 0, L))

    def continuation_logits(self, prefix: Prefix, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits after each response token on the shared prefix: ([K, T, V], row t is the distribution after
        y_1..y_t), and the [K, T] mask of real tokens. The prefix runs once; positions are right for every
        family (use this rather than running a continuation by hand)."""
        ids, mask = self._pad(responses)
        cache, _ = self._prefix_forward(prefix)
        return self._continue(prefix, cache, ids).logits, mask

    def batch_token_logprobs(self, prefixes: list[Prefix], responses: list[list[int]]) -> TokenLogprobs:
        """log π(y_t | x_i, y_<t) for (prefix_i, response_i) pairs of different prompts in one right-padded
        forward (the SFT path; also the naive reference the shared-prefix path is tested against)."""
        if len(prefixes) != len(responses):
            raise ValueError("one response per prefix")
        seqs = [torch.cat([p.input_ids[0].cpu(), torch.tensor(r, dtype=torch.long)]) for p, r in zip(prefixes, responses)]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            attn[i, : len(s)] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        kwargs = self.family.merge_kwargs([p.model_kwargs for p in prefixes], L)
        if self.family.positions is not None:  # the responses' tokens are text: they continue each prompt's positions
            kwargs["position_ids"], _ = self.family.positions(self.model, ids, attn, kwargs)
        resp_ids, mask = self._pad(responses)
        T = resp_ids.shape[1]
        starts = torch.tensor([p.input_ids.shape[1] - 1 for p in prefixes], device=ids.device)
        pos = (starts[:, None] + torch.arange(T, device=ids.device)[None, :]).clamp(max=L - 1)
        # logits only where a response token is predicted ([B, T] positions), never over the prompt
        logits = self.model(input_ids=ids, attention_mask=attn, logits_to_keep=pos, **kwargs).logits
        if logits.shape[:2] != pos.shape:  # a model without per-row logits_to_keep (rare): keep all, then gather
            logits = self.model(input_ids=ids, attention_mask=attn, **kwargs).logits
            logits = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
        return TokenLogprobs(_logprobs_of(logits, resp_ids) * mask, mask, resp_ids)

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

    @torch.no_grad()
    def sample(self, prefix: Prefix, k: int, max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """K continuations of one prefix (greedy when temperature == 0), each ending at EOS or the limit."""
        cache, logits = self._prefix_forward(prefix)
        cache = expand_cache(cache, k)
        logits = logits.expand(k, -1)
        eos = torch.tensor(self.eos_ids, device=logits.device)
        done = torch.zeros(k, dtype=torch.bool, device=logits.device)
        steps: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
            nxt, done, stop = self._record_step(nxt, done, eos, steps, t == max_new_tokens - 1)
            if stop:
                break
            out = self.model(input_ids=nxt.unsqueeze(1), **cache_kwargs(cache), **self._positions(prefix, k, t, 1))
            cache, logits = output_cache(out), out.logits[:, -1, :]
        return self._until_eos(torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(k)])

    @torch.no_grad()
    def sample_batch(self, prefixes: list[Prefix], k: int, max_new_tokens: int, temperature: float = 1.0,
                     generators: list[torch.Generator | None] | None = None) -> list[list[list[int]]]:
        """K continuations of EACH prefix in one batched decode: `[sample(prefixes[i], k, ..., generators[i])]`.

        The prompts are left-padded into one [N, L] prefix pass (attention mask, positions counted over real
        tokens), the cache is repeated K-fold per row, and the N·K rows decode together: one forward per new
        token for the whole batch instead of one per token per prompt. Prompt i's K tokens are drawn with its
        own generator from its own [K, V] probabilities, exactly as `sample` draws them, so its candidates
        depend on (prefix i, generator i) only — not on the other prompts (up to the ~1e-6 change left padding
        makes to the logits). Qwen2(.5)-VL too: its 3-D positions come from its rope index given the mask."""
        n = len(prefixes)
        gens = list(generators) if generators is not None else [None] * n
        if len(gens) != n:
            raise ValueError(f"one generator per prefix: {len(gens)} for {n} prefixes")
        if n == 0 or k == 0:
            return [[] for _ in prefixes]
        if n == 1:
            return [self.sample(prefixes[0], k, max_new_tokens, temperature, gens[0])]
        device = self.device
        cache, logits, attn, next_pos = self._left_padded_prefix(prefixes, [k] * n)  # rows i·K .. i·K+K-1
        eos = torch.tensor(self.eos_ids, device=device)
        done = torch.zeros(n * k, dtype=torch.bool, device=device)
        steps: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
                open_ = (~done).view(n, k).any(1).tolist()
                nxt = torch.full((n * k,), self.pad_id, dtype=torch.long)
                for i in range(n):  # a finished prompt draws nothing (its rows feed pad either way)
                    if open_[i]:
                        nxt[i * k:(i + 1) * k] = torch.multinomial(probs[i * k:(i + 1) * k], 1,
                                                                   generator=gens[i]).squeeze(1)
                nxt = nxt.to(device)
            nxt, done, stop = self._record_step(nxt, done, eos, steps, t == max_new_tokens - 1)
            if stop:
                break
            attn = torch.cat([attn, attn.new_ones(n * k, 1)], dim=1)
            out = self.model(input_ids=nxt.unsqueeze(1), attention_mask=attn, position_ids=(next_pos + t)[:, None],
                             **cache_kwargs(cache))
            cache, logits = output_cache(out), out.logits[:, -1, :]
        rows = self._until_eos(torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n * k)])
        return [rows[i * k:(i + 1) * k] for i in range(n)]

    def _left_padded_prefix(self, prefixes: list[Prefix], repeats: list[int]):
        """One left-padded [N, L] pass over the prefixes (attention mask; positions counted over real tokens, or
        Qwen2(.5)-VL's 3-D ones from its rope index given the mask, so every prompt's last token sits at column
        L - 1 with its own position). Returns the cache, the last logits [R, V] and the attention mask [R, L] with
        row i repeated repeats[i] times (R = Σ repeats), and each row's position of the first continuation token
        [R]. Gradient flows when grad is enabled."""
        device = self.device
        lens = [p.input_ids.shape[1] for p in prefixes]
        n, L = len(prefixes), max(lens)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros(n, L, dtype=torch.long, device=device)
        for i, p in enumerate(prefixes):
            ids[i, L - lens[i]:] = p.input_ids[0]
            attn[i, L - lens[i]:] = 1
        kwargs = self.family.merge_kwargs([p.model_kwargs for p in prefixes], L, left=True)
        if self.family.positions is None:
            pos, next_pos = counted_positions(attn)
        else:  # Qwen2(.5)-VL: 3-D positions from the model's own rope index over the real tokens
            pos, next_pos = self.family.positions(self.model, ids, attn, kwargs)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **kwargs)
        cache, last = output_cache(out), out.logits[:, -1, :]
        if all(r == 1 for r in repeats):  # one row per prompt (greedy evaluation): nothing to repeat
            return cache, last, attn, next_pos
        reps = torch.tensor(repeats, device=device)
        return (_repeat_cache(cache, reps), last.repeat_interleave(reps, dim=0), attn.repeat_interleave(reps, dim=0),
                next_pos.repeat_interleave(reps))

    def token_logprobs_batch(self, prefixes: list[Prefix], responses: list[list[list[int]]]) -> list[TokenLogprobs]:
        """`[token_logprobs(prefixes[i], responses[i])]` in two forwards for all of them (grad if grad is enabled).

        One left-padded prefix pass over the N prompts (`_left_padded_prefix`), each row's cache repeated for its
        K_i responses; y_1 is scored from the prefix's last logits, y_2..y_T from one pass of the ΣK_i right-padded
        rows (continuation positions counted on from each prompt's real length). Each prompt gets its own [K_i,
        T_i] slice, equal to its `token_logprobs` up to the ~1e-6 left padding makes. Under `lockstep` the
        continuation pass always runs (as in token_logprobs); with checkpointing one full-sequence
        `batch_token_logprobs`. A prompt with no response gets empty [0, 0] tensors and adds no row."""
        if len(prefixes) != len(responses):
            raise ValueError(f"one list of responses per prefix: {len(responses)} for {len(prefixes)} prefixes")
        used = [i for i, rs in enumerate(responses) if rs]
        out = [self._empty_logprobs() for _ in prefixes]
        if len(used) <= 1:
            for i in used:
                out[i] = self.token_logprobs(prefixes[i], responses[i])
            return out
        counts = [len(responses[i]) for i in used]
        rows = [r for i in used for r in responses[i]]
        if self.checkpointing:  # no KV cache inside checkpointed layers: every row as a full sequence
            tl = self.batch_token_logprobs([prefixes[i] for i, c in zip(used, counts) for _ in range(c)], rows)
        else:
            ids, mask = self._pad(rows)
            cache, last, attn, next_pos = self._left_padded_prefix([prefixes[i] for i in used], counts)

            def continuation(fed: torch.Tensor) -> torch.Tensor:
                R, C = fed.shape  # right padding: a real token never sees a pad
                pos = next_pos[:, None] + torch.arange(C, device=fed.device)[None, :]
                return self.model(input_ids=fed, attention_mask=torch.cat([attn, attn.new_ones(R, C)], dim=1),
                                  position_ids=pos, **cache_kwargs(cache)).logits

            tl = self._rows_logprobs(last, ids, mask, continuation)
        start = 0
        for i, c in zip(used, counts):  # each prompt's rows, cut to its own longest response
            t = max(len(r) for r in responses[i])
            out[i] = TokenLogprobs(tl.logp[start:start + c, :t], tl.mask[start:start + c, :t], tl.ids[start:start + c, :t])
            start += c
        return out

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
