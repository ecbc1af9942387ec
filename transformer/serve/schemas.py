"""The API's shapes (pydantic models, which the OpenAPI page shows) and the sentence
that says what is wrong with a request that does not fit them.

Requests forbid unknown fields and take JSON's types as they are (strict: ``"5"`` is
not a beam size).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _text_or_texts(value: Any) -> Any:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise PydanticCustomError("text_type", "must be a string or a list of strings")


Texts = Annotated[str | list[str], BeforeValidator(_text_or_texts)]


class TranslateRequest(BaseModel):
    """LibreTranslate's request, with beam search's options."""

    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"examples": [{"q": "Ein Mann fährt Fahrrad.", "source": "de", "target": "en"},
                                        {"q": ["Zwei Hunde spielen.", "Eine Frau liest."], "alternatives": 2}]},
    )
    q: Texts = Field(description="the text to translate: one sentence, or a list of sentences")
    source: str | None = Field(None, description="source language code (default, or 'auto': the model's)")
    target: str | None = Field(None, description="target language code (default: the model's)")
    format: Literal["text"] = Field("text", description="plain text only (LibreTranslate's 'html' is not offered)")
    beam_size: int | None = Field(None, ge=1, description="beams per sentence, 1 = greedy (default: the server's)")
    alternatives: int = Field(0, ge=0, description="alternative translations to return besides the best "
                              "(beam search's n-best; widens the default beam when needed)")


class TranslateResponse(BaseModel):
    translatedText: str | list[str] = Field(description="the best translation (a list when q was a list)")
    alternatives: list[str] | list[list[str]] | None = Field(
        None, description="with 'alternatives': the next best translations, best first (per sentence for a list)")
    scores: list[float] | list[list[float]] | None = Field(
        None, description="with 'alternatives': the score of translatedText and of each alternative "
        "(log-probability / length penalty; higher is better)")


class AttentionRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"q": "Zwei Männer stehen am Strand."}]},
    )
    q: str = Field(description="one sentence")
    source: str | None = Field(None, description="source language code (default, or 'auto': the model's)")
    target: str | None = Field(None, description="target language code (default: the model's)")
    beam_size: int | None = Field(None, ge=1, description="how the translation is found (default: the server's)")


class AttentionResponse(BaseModel):
    translatedText: str
    source_tokens: list[str] = Field(description="the source's tokens, </s> included (S of them)")
    target_tokens: list[str] = Field(description="what the decoder read: <s> and the translation's tokens (T)")
    layers: int
    heads: int
    encoder: list[list[list[list[float]]]] = Field(description="encoder self-attention (layers, heads, S, S)")
    decoder_self: list[list[list[list[float]]]] = Field(description="decoder self-attention (layers, heads, T, T)")
    encoder_decoder: list[list[list[list[float]]]] = Field(
        description="encoder-decoder attention (layers, heads, T, S): row t is where target token t looked")


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong with the request")


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    uptime_s: float
    batching: dict[str, int] = Field(description="jobs and sentences decoded, batches, stream steps, errors, "
                                     "jobs queued, threads busy with a batch, sentences streaming")


# The statuses of refusals, documented with the body they come with (not FastAPI's default 422).
ERRORS = {status: {"model": ErrorBody} for status in (400, 413, 415, 422, 503)}
BODIES = {"/translate": TranslateRequest, "/attention": AttentionRequest}  # for naming the known fields


def _field_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def describe_validation(errors: list[dict], path: str) -> tuple[int, str]:
    """A status and one sentence per problem from pydantic's errors."""
    status, messages = 422, []
    for e in errors:
        loc = tuple(p for p in e["loc"][1:] if p not in ("str", "list[str]"))  # [0] is "body"
        kind, field = e["type"], _field_name(loc)
        if kind == "json_invalid":
            reason = e.get("ctx", {}).get("error", "decode error")
            return 400, f"the body is not valid JSON: {reason} (at character {e['loc'][-1]})"
        if not loc and isinstance(e.get("input"), (bytes, str)):
            return 415, "send the body as JSON, with the header Content-Type: application/json"
        if not loc and kind == "missing":
            return 400, "the request needs a JSON body"
        if not loc:
            messages.append("the body must be a JSON object")
        elif kind == "extra_forbidden":
            known = ", ".join(BODIES[path].model_fields) if path in BODIES else ""
            messages.append(f"unknown field '{field}'" + (f" (the fields are: {known})" if known else ""))
        elif kind == "missing":
            messages.append(f"'{field}' is required")
        else:
            messages.append(f"'{field}' {e['msg'][0].lower()}{e['msg'][1:]}" if kind == "text_type"
                            else f"'{field}': {e['msg']}")
    return status, "; ".join(dict.fromkeys(messages))
