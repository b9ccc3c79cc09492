"""The reward service's request reading and validation: every refusal names the field and the fix."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.requests import Request

from rlkit.reward.verifiers import Score

if TYPE_CHECKING:
    from rlkit.reward.service import RewardService

_TOP_FIELDS = ("items", "verifier", "options")
_ITEM_FIELDS = ("response", "reference", "verifier", "options")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class Refusal(Exception):
    """A request the service answers with ``status`` and ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def _json_type(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` bytes without reading further."""
    too_big = Refusal(413, f"request body exceeds {limit} bytes (--max-request-bytes); send fewer or shorter items "
                           f"per request (the client's batch_size)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> object:
    """Decoded JSON, or a 400 naming what is wrong with the bytes."""
    if not body.strip():
        raise Refusal(400, 'empty request body; send JSON {"verifier": ..., "items": [...]}')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Refusal(400, f"request body is not valid UTF-8 (bad byte at offset {err.start}); "
                           f"encode the JSON as UTF-8")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise Refusal(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}")
    except ValueError as err:
        raise Refusal(400, f"malformed JSON: {err}")
    except RecursionError:
        raise Refusal(400, "malformed JSON: nested too deeply")


def parse_items(payload: object, service: RewardService) -> tuple[list[tuple[str, str, str, dict, str]], tuple | None]:
    """Validate a /score payload into ``(response, reference, verifier, options, options_key)`` items,
    and the top-level ``(verifier, options, options_key)`` default (None if the request names none).

    Refuses with 422 (wrong shape or types, unknown verifier, bad options) or 413 (limits).
    """
    settings = service.settings
    if not isinstance(payload, dict):
        raise Refusal(422, f'request body must be a JSON object {{"items": [...]}}, got {_json_type(payload)}')
    _check_fields(payload, _TOP_FIELDS, "request")
    if "items" not in payload:
        raise Refusal(422, 'request has no "items"; send '
                           '{"verifier": "math", "items": [{"response": ..., "reference": ...}]}')
    items = payload["items"]
    if not isinstance(items, list):
        raise Refusal(422, f'"items" must be an array, got {_json_type(items)}')
    if len(items) > settings.max_items:
        raise Refusal(413, f"{len(items)} items in one request; the limit is {settings.max_items} (--max-items); "
                           f"split the batch (the client's batch_size)")
    default_verifier = payload.get("verifier")
    default_options = payload.get("options", {})
    if default_verifier is not None and not isinstance(default_verifier, str):
        raise Refusal(422, f'"verifier" must be a string, got {_json_type(default_verifier)}')
    if not isinstance(default_options, dict):
        raise Refusal(422, f'"options" must be an object, got {_json_type(default_options)}')
    default_key = json.dumps(default_options, sort_keys=True)
    checked: set[tuple[str, str]] = set()
    default = None
    if default_verifier is not None:
        service.check_verifier(default_verifier, default_options, "request")
        checked.add((default_verifier, default_key))
        default = (default_verifier, default_options, default_key)

    parsed = []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise Refusal(422, f"{where} must be an object with response and reference, got {_json_type(item)}")
        _check_fields(item, _ITEM_FIELDS, where)
        texts = []
        for name in ("response", "reference"):
            if name not in item:
                raise Refusal(422, f'{where} has no "{name}"')
            text = item[name]
            if not isinstance(text, str):
                raise Refusal(422, f'{where}.{name} must be a string, got {_json_type(text)}')
            if len(text) > settings.max_chars:
                raise Refusal(413, f"{where}.{name} has {len(text)} characters; the limit is {settings.max_chars} "
                                   f"(--max-chars); truncate it or raise the service's limit")
            texts.append(text)
        verifier = item.get("verifier", default_verifier)
        if verifier is None:
            raise Refusal(422, f'{where} names no verifier; give "verifier" in the item or at the top level')
        if not isinstance(verifier, str):
            raise Refusal(422, f'{where}.verifier must be a string, got {_json_type(verifier)}')
        if "options" in item:
            options = item["options"]
            if not isinstance(options, dict):
                raise Refusal(422, f"{where}.options must be an object, got {_json_type(options)}")
            key = json.dumps(options, sort_keys=True)
        else:
            options, key = default_options, default_key
        if (verifier, key) not in checked:
            service.check_verifier(verifier, options, where)
            checked.add((verifier, key))
            if len(checked) > settings.max_pools:
                raise Refusal(422, f"{where}: the request names more than {settings.max_pools} (verifier, options) "
                                   f"configurations (--max-pools); split it by configuration")
        parsed.append((texts[0], texts[1], verifier, options, key))
    return parsed, default


def _check_fields(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise Refusal(422, f"{where} has unknown field(s) {unknown}; allowed: {', '.join(allowed)}")


def render_results(scores: list[Score]) -> bytes:
    results = [dict(reward=s.reward, correct=s.correct, extracted=s.extracted, error=s.error) for s in scores]
    # ASCII-only output: an extracted answer may hold a lone surrogate from a JSON "\ud800" escape.
    return json.dumps({"results": results}, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
