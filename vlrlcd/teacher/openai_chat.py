"""The `openai` backend: any OpenAI-compatible chat-completions endpoint through the `openai` SDK.

One request per call, no SDK retries (max_retries=0): the runner owns backoff and Retry-After (an empty
answer is retried too, within teacher.max_retries). Images go as PNG re-encoded from the decoded pixels.
Every failure becomes a TeacherCallError whose message never contains the API key.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import os
import time

from vlrlcd.datasets.records import Record
from vlrlcd.teacher.base import (
    TeacherAnswer,
    TeacherCallError,
    judge_messages_text,
    parse_grade,
    user_text,
)
from vlrlcd.teacher.config import TeacherConfig

log = logging.getLogger(__name__)

def image_data_url(path: str) -> str:
    """`data:image/png;base64,...` of the decoded pixels (EXIF-oriented RGB, as the student sees them).

    The image is always re-encoded: the file's own bytes never leave the machine, so nothing stored
    after the image data (or in its metadata) reaches the teacher."""
    from vlrlcd.datasets.images import load_image
    from vlrlcd.errors import VlrlcdError

    try:
        im = load_image(path)
    except VlrlcdError as e:
        raise TeacherCallError("bad_image", str(e)) from None
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def user_content(text: str, image: str | None) -> str | list[dict]:
    """Message content: plain text, or [image as a data URL, text] for a record with an image."""
    if image is None:
        return text
    return [{"type": "image_url", "image_url": {"url": image_data_url(image)}}, {"type": "text", "text": text}]


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAITeacher:
    """Chat completions against `cfg.base_url` with the key from `os.environ[cfg.api_key_env]`."""

    def __init__(self, cfg: TeacherConfig) -> None:
        import openai

        self.cfg = cfg
        self._secret = os.environ.get(cfg.api_key_env) or None
        if self._secret is None:
            log.warning("environment variable %s is not set: calling the teacher without an API key", cfg.api_key_env)
        self._client = openai.OpenAI(
            api_key=self._secret or "not-set",
            base_url=cfg.base_url,
            timeout=cfg.timeout_s,
            max_retries=0,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _error(self, e: Exception) -> TeacherCallError:
        """Map an SDK exception to a TeacherCallError (kind, retryable, Retry-After, fatal)."""
        import openai

        msg = self._redact(f"{type(e).__name__}: {e}")
        if isinstance(e, openai.APITimeoutError):
            return TeacherCallError("timeout", f"no answer within teacher.timeout_s={self.cfg.timeout_s}", retryable=True)
        if isinstance(e, openai.APIConnectionError):
            return TeacherCallError("connection", f"{msg} (teacher.base_url={self.cfg.base_url})", retryable=True)
        if isinstance(e, openai.APIStatusError):
            code = e.status_code
            if code == 429:
                return TeacherCallError("rate_limit", msg, retryable=True, retry_after=parse_retry_after(e.response.headers))
            if code >= 500 or code in (408, 409):
                return TeacherCallError("server_error", msg, retryable=True, retry_after=parse_retry_after(e.response.headers))
            if code in (401, 403):
                return TeacherCallError(
                    "auth", f"the endpoint refused the API key (HTTP {code}); set environment variable "
                    f"{self.cfg.api_key_env} to a valid key", fatal=True)
            if code == 404:
                return TeacherCallError(
                    "not_found", f"HTTP 404 from the endpoint: check teacher.base_url={self.cfg.base_url} and "
                    f"teacher.model={self.cfg.model} ({msg})", fatal=True)
            return TeacherCallError("client_error", msg)
        if isinstance(e, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError)):
            return TeacherCallError("malformed", f"unreadable response: {msg}", retryable=True)
        return TeacherCallError("other", msg)

    def _complete(self, messages: list[dict]) -> TeacherAnswer:
        import openai

        try:
            resp = self._client.chat.completions.create(
                model=self.cfg.model,
                messages=messages,
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
            )
        except (openai.OpenAIError, ValueError) as e:
            raise self._error(e) from None
        try:
            content = resp.choices[0].message.content
            usage = getattr(resp, "usage", None)
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise TeacherCallError("malformed", "response is not a chat completion", retryable=True) from None
        if not isinstance(content, str) or not content.strip():
            raise TeacherCallError("empty", "the teacher returned empty content", retryable=True)
        return TeacherAnswer(content.strip(), prompt_tokens, completion_tokens)

    def _messages(self, system: str, text: str, image: str | None) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user_content(text, image)})
        return messages

    def answer(self, record: Record) -> TeacherAnswer:
        return self._complete(self._messages(self.cfg.system_prompt, user_text(record), record.image))

    def judge(self, record: Record, candidate: str, reference: str | None = None) -> float:
        """The teacher's 0-10 grade of `candidate` (against the reference when there is one) / 10."""
        ref = reference if reference is not None else record.reference
        system, text = judge_messages_text(record, candidate, ref)
        return parse_grade(self._complete(self._messages(system, text, record.image)).text)
