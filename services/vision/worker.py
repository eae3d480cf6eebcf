"""The vision worker: VisionRequest in, ImageClassified events and one ResponderRequest out.

For each image of a batch (see `images.images_of`):
1. download it through the channel's provider (`Provider.fetch_media`) — WATI: `getMedia` with
   the Bearer token (through `WatiClient`, which only ever talks to our configured WATI URL);
   ManyChat: the attachment URL, plain GET, size- and time-bounded, private addresses refused
   (`images.check_attachment_url`; allowed only when MANYCHAT_API_URL is itself
   local, i.e. stand-ins in tests/dev/demo);
2. validate the bytes (`images.validate_image`: magic bytes, ≤ IMAGE_MAX_BYTES, no animated GIF);
3. upload them to the OpenAI Files API (purpose "vision"). DECISION: images reach OpenAI as a
   Files API `file_id`. No image bytes ever travel through Kafka, the responder does not download
   again (WATI media URLs need our token and expire), and the file id stays valid for the
   customer's conversation, which keeps referring to it. Files are not given an expiry for that
   reason; deleting old ones is an operational clean-up, not this worker's job;
4. classify it with ONE structured-output call made OUTSIDE any conversation (`classify.py`).

A model answer that is not valid `image_class` JSON (refusal, truncation, schema ignored) makes the
image `other` with confidence 0, the image still attached; the reason is logged.

Then it publishes one `ImageClassified` per image (also for unusable ones; `model` is "" when no
model was asked) and forwards ONE `ResponderRequest` — the
original request with `images` filled in — to the responder, keyed by customer: the responder, the
only owner of conversations, answers in the customer's conversation.

Batches without images are forwarded unchanged: the context service routes a customer's later
batches here while an earlier one is still in vision, so that one customer's answers keep their
order (the keyed consumer handles one customer's records strictly in order).

Failures never leave the customer unanswered and never put an error text in front of them: an
image that cannot be downloaded, is no image, is too large, or that OpenAI could not take gets the
category `unreadable` (or `unclassified` when it was uploaded but not classified) with a safe
description, a DeadLetter records the reason (`image_download_failed`, `not_an_image`,
`unsupported_image`, `image_too_large`, `image_upload_failed`, `classification_failed`; and, for
bugs, `image_failed` / `vision_failed`), and the batch is still forwarded.

Tenants (docs/tenants.md): every call for a customer goes through ITS tenant's accounts — the media
download through the tenant's channel account (`AccountClients`, one client per account), the upload
and the classification through the tenant's OpenAI account (own key and project, else the
deployment's), so the file id lives in the project the responder answers that customer in. The
model is VISION_MODEL_NAME for every tenant. A key of a tenant or account that is not configured is
forwarded untouched (no client of any tenant is used for it); the responder refuses it (`no_account`).

Idempotency: a redelivered VisionRequest (same batch id) may be downloaded and classified again
(one more file upload and ImageClassified event), but the forwarded ResponderRequest carries the
same batch id, and the responder answers a batch id once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httpx
import openai
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from services import providers
from services.common import codec, metrics, openai_errors
from services.common.config import Settings
from services.common.kafka import Topics, dead_letter
from services.common.keys import record_key_problem
from services.common.logs import event
from services.common.records import (
    Channel,
    ImageClassified,
    ImageContext,
    ResponderRequest,
)
from services.common.tenants import Tenants, load_tenants
from services.common.timeparse import utcnow
from services.providers.accounts import AccountClients, NoAccount, request_account_problem
from services.providers.base import Client, MediaPolicy, ProviderFailure

from . import classify, images
from .images import ImageRef, ImageRejected

log = logging.getLogger(__name__)

SERVICE = "vision"
MEDIA_TIMEOUT_SECONDS = 20.0
MEDIA_ATTEMPTS = 3
MEDIA_RETRY_CAP_SECONDS = 5.0
#: images handled at once by one process, across all customers: a burst of photos does not take N
#: sequential round trips, and memory stays bounded (each image is held in memory, ≤ IMAGE_MAX_BYTES).
IMAGES_IN_PARALLEL = 16


@dataclass(frozen=True)
class Failure:
    """Why an image could not be classified: a dead-letter reason code and a safe detail."""

    reason: str
    detail: str


@dataclass(frozen=True)
class ImageResult:
    context: ImageContext
    failure: Failure | None
    model_called: bool


def openai_outcome(exc: BaseException) -> str:
    """A bounded metric label for an OpenAI failure (the responder's reasons, same classification)."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return openai_errors.classify(exc.status_code, openai_errors.ErrorBody.of(exc.body)).reason
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error"
    return "error"


async def refuse_retry_of_billing_errors(response: Any) -> None:
    """httpx response hook of the vision client: a billing 429 (`type: insufficient_quota`, any
    code) gets `x-should-retry: false`, so the SDK — which retries every 429 — does not ask again
    for what waiting cannot heal. Other answers are left as they are (and their bodies unread)."""
    if response.status_code != 429:
        return
    await response.aread()
    try:
        body = json.loads(response.content)
    except ValueError:
        return
    if openai_errors.is_billing(429, openai_errors.ErrorBody.of(body)):
        response.headers["x-should-retry"] = "false"


async def count_sdk_retry(request: Any) -> None:
    """httpx request hook of the vision client: counts each attempt the OpenAI SDK makes again.

    The SDK retries (408/409/429/5xx, timeouts) inside one call, and `openai_requests_total`
    counts the call's final outcome; without this, a 429 or 500 that a retry absorbed would be
    counted nowhere. The SDK marks every attempt with `x-stainless-retry-count` (0 = first).
    """
    retry = str(request.headers.get("x-stainless-retry-count", "0"))
    if retry.isdigit() and int(retry) > 0:
        path = str(request.url.path)
        purpose = "vision_upload" if path.endswith("/files") else "vision"
        metrics.openai_retries_total.labels(purpose).inc()


def openai_detail(exc: BaseException) -> str:
    """A short description of an OpenAI failure without the request's content."""
    if isinstance(exc, openai.APIStatusError):
        code = getattr(exc, "code", None)
        return f"{type(exc).__name__} (HTTP {exc.status_code}{f', {code}' if code else ''})"
    return type(exc).__name__


class MediaFetcher:
    """Downloads a customer's media through the provider of the channel it came from, with that
    provider's client (`Provider.open_client(settings, "media")`) — with `accounts`, the client of
    the customer's own tenant account; attachment URLs go through `_from_url`'s checks (private
    hosts, size, retries)."""

    def __init__(
        self,
        settings: Settings,
        *,
        clients: Iterable[Client | None] = (),
        accounts: AccountClients | None = None,
        http: httpx.AsyncClient,
        allow_private_urls: bool,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.max_bytes = settings.image_max_bytes
        self.clients: dict[str, Client] = {}
        for client in clients:
            if client is not None:
                self.clients[providers.for_client(client).name] = client
        self.accounts = accounts
        self.http = http
        self.allow_private_urls = allow_private_urls
        self._sleep = sleep

    async def fetch(self, channel: Channel, media_ref: str, customer_key: str | None = None) -> bytes:
        """The media's bytes; raises ImageRejected (image_download_failed / image_too_large)."""
        if not media_ref:
            raise ImageRejected("image_download_failed", "the message has no media reference")
        try:
            provider = providers.for_channel(channel)
        except providers.UnknownProvider as exc:
            raise ImageRejected("image_download_failed", str(exc)) from None
        policy = MediaPolicy(max_bytes=self.max_bytes, attempts=MEDIA_ATTEMPTS,
                             retry_cap_seconds=MEDIA_RETRY_CAP_SECONDS, sleep=self._sleep)
        client: Client | None = self.clients.get(provider.name)
        if self.accounts is not None and customer_key is not None:
            try:
                client = self.accounts.client(provider, customer_key)
            except NoAccount as exc:
                raise ImageRejected("image_download_failed", exc.reason) from None
        try:
            return await provider.fetch_media(client, channel, media_ref,
                                              policy=policy, download_url=self._from_url)
        except ProviderFailure as exc:
            if exc.reason == "too_large":
                raise ImageRejected("image_too_large", f"more than {self.max_bytes} bytes") from None
            raise ImageRejected("image_download_failed", str(exc)) from None

    async def _from_url(self, media_ref: str) -> bytes:
        url = images.check_attachment_url(media_ref, allow_private=self.allow_private_urls)
        for attempt in range(MEDIA_ATTEMPTS):
            try:
                return await self._get(url)
            except _Retryable as exc:
                if attempt == MEDIA_ATTEMPTS - 1:
                    raise ImageRejected("image_download_failed", exc.detail) from None
                await self._sleep(min(0.25 * 2 ** attempt, MEDIA_RETRY_CAP_SECONDS))
        raise AssertionError("unreachable")

    async def _get(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(MEDIA_TIMEOUT_SECONDS), self.http.stream("GET", url) as response:
                status = response.status_code
                if status == 429 or status >= 500:
                    raise _Retryable(f"attachment URL answered HTTP {status}")
                if status != 200:
                    raise ImageRejected("image_download_failed", f"attachment URL answered HTTP {status}")
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageRejected("image_too_large", f"{declared} bytes, limit {self.max_bytes}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ImageRejected("image_too_large", f"more than {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError:
            raise _Retryable("attachment download timed out") from None
        except httpx.TooManyRedirects:
            raise ImageRejected("image_download_failed", "too many redirects") from None
        except httpx.TimeoutException:
            raise _Retryable("attachment download timed out") from None
        except httpx.HTTPError as exc:
            raise _Retryable(f"attachment download failed ({type(exc).__name__})") from None


class _Retryable(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def attachment_http_client(*, allow_private_urls: bool) -> httpx.AsyncClient:
    """The client for ManyChat attachment URLs: bounded, and every redirect target re-checked."""

    async def check_target(request: httpx.Request) -> None:
        images.check_attachment_url(str(request.url), allow_private=allow_private_urls)

    return httpx.AsyncClient(
        timeout=httpx.Timeout(MEDIA_TIMEOUT_SECONDS, connect=5.0),
        follow_redirects=True, max_redirects=3,
        headers={"Accept": "image/*"},
        event_hooks={"request": [check_target]},
    )


class VisionWorker:
    """Handles VisionRequests (the KeyedConsumer handler is `handle`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        producer: AIOKafkaProducer,
        client: openai.AsyncOpenAI,
        fetcher: MediaFetcher,
        clients_for: Callable[[str], openai.AsyncOpenAI] | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.producer = producer
        self.client = client
        #: the OpenAI client of a customer's tenant (default: `client` for every customer)
        self.clients_for = clients_for or (lambda _key: self.client)
        self.tenants = load_tenants(settings) if tenants is None else tenants
        self.fetcher = fetcher
        self.model = settings.vision_model_name
        self.categories = classify.parse_categories(settings.image_categories)
        self._image_slots = asyncio.Semaphore(IMAGES_IN_PARALLEL)

    # ------------------------------------------------------------------ entry point
    async def handle(self, record_name: str, value: dict[str, Any], record: ConsumerRecord) -> None:
        """One consumed record: a VisionRequest is processed; anything else is dead-lettered."""
        if record_name != "VisionRequest":
            await dead_letter(
                self.producer, self.topics, service=SERVICE, reason="unexpected_record",
                error=f"expected VisionRequest, got {record_name}", source_topic=record.topic,
                partition=record.partition, offset=record.offset, key=record.key, payload=record.value,
                customer_key=_str_or_none(value.get("customer_key")),
                batch_id=_str_or_none(value.get("batch_id")),
            )
            return
        request = cast(ResponderRequest, value["request"])
        key_problem = record_key_problem(record.key, request["customer_key"])
        if key_problem is not None:  # not from the context service: never forwarded
            await dead_letter(
                self.producer, self.topics, service=SERVICE, reason=key_problem[0], error=key_problem[1],
                source_topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                payload=record.value, customer_key=request["customer_key"], batch_id=request["batch_id"],
            )
            return
        no_account = request_account_problem(self.tenants, request["customer_key"])
        if no_account is not None:  # no client of any tenant is used: the responder refuses it
            event(log, "no_account", logging.WARNING, customer=request["customer_key"],
                  batch_id=request["batch_id"], reason=no_account)
            await self._send(self.topics.responder_requests, request["customer_key"], "ResponderRequest",
                             dict(request))
            return
        try:
            await self.process(request, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Last resort: a bug or a broker refusal must not leave the customer unanswered.
            event(log, "vision_failed", logging.ERROR, customer=request["customer_key"],
                  batch_id=request["batch_id"], error=type(exc).__name__, exc_info=True)
            await self._dead_letter(request, Failure("vision_failed", type(exc).__name__), record)
            refs = images.images_of(request["messages"])
            fallback = [classify.failed_context(r.media_ref, "vision_failed") for r in refs]
            await self._send(self.topics.responder_requests, request["customer_key"], "ResponderRequest",
                             {**request, "images": fallback})

    async def process(
        self, request: ResponderRequest, record: ConsumerRecord | None = None
    ) -> ResponderRequest:
        """Classifies the batch's images, publishes the results, forwards the batch; returns it."""
        refs = images.images_of(request["messages"])
        if not refs:
            await self._send(self.topics.responder_requests, request["customer_key"], "ResponderRequest",
                             dict(request))
            event(log, "batch_forwarded", customer=request["customer_key"], batch_id=request["batch_id"],
                  images=0)
            return request
        results = await asyncio.gather(*(self._image(request, ref) for ref in refs))
        for result in results:
            await self._publish_classified(request, result)
        for result in results:
            if result.failure is not None:
                await self._dead_letter(request, result.failure, record)
        ours = [r.context for r in results]
        handled = {c["media_ref"] for c in ours}
        kept = [c for c in request["images"] if c["media_ref"] not in handled]
        forwarded = cast(ResponderRequest, {**request, "images": kept + ours})
        await self._send(self.topics.responder_requests, request["customer_key"], "ResponderRequest",
                         dict(forwarded))
        event(log, "batch_forwarded", customer=request["customer_key"], batch_id=request["batch_id"],
              images=len(ours), categories=",".join(c["category"] for c in ours))
        return forwarded

    # ------------------------------------------------------------------ one image
    async def _image(self, request: ResponderRequest, ref: ImageRef) -> ImageResult:
        """Never raises (but for cancellation): an unexpected error makes the image unreadable."""
        try:
            async with self._image_slots:
                return await self._image_steps(request, ref)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            event(log, "image_failed", logging.ERROR, customer=request["customer_key"],
                  batch_id=request["batch_id"], error=type(exc).__name__, exc_info=True)
            return ImageResult(classify.failed_context(ref.media_ref, "image_failed"),
                               Failure("image_failed", f"unexpected {type(exc).__name__}"), False)

    async def _image_steps(self, request: ResponderRequest, ref: ImageRef) -> ImageResult:
        try:
            data = await self.fetcher.fetch(request["channel"], ref.media_ref, request["customer_key"])
            mime = images.validate_image(data, self.settings.image_max_bytes)
        except ImageRejected as exc:
            return ImageResult(classify.failed_context(ref.media_ref, exc.reason),
                               Failure(exc.reason, exc.detail), False)
        try:
            client = self.clients_for(request["customer_key"])
            tenant = metrics.key_tenant(request["customer_key"])
            file_id = await self._upload(data, mime, client, tenant=tenant)
        except openai.OpenAIError as exc:
            return ImageResult(classify.failed_context(ref.media_ref, "image_upload_failed", mime=mime),
                               Failure("image_upload_failed", openai_detail(exc)), False)
        try:
            result = await self._classify(file_id, ref.message.get("caption"), client, tenant=tenant)
        except openai.OpenAIError as exc:
            return ImageResult(
                classify.failed_context(ref.media_ref, "classification_failed", file_id=file_id, mime=mime),
                Failure("classification_failed", openai_detail(exc)), True)
        except classify.InvalidClassification as exc:
            event(log, "classification_invalid", logging.WARNING, customer=request["customer_key"],
                  batch_id=request["batch_id"], reason=str(exc))
            return ImageResult(classify.invalid_output_context(ref.media_ref, file_id, mime), None, True)
        return ImageResult(classify.classified_context(ref.media_ref, file_id, mime, result), None, True)

    async def _upload(
        self, data: bytes, mime: str, client: openai.AsyncOpenAI | None = None, *, tenant: str,
    ) -> str:
        started = time.monotonic()
        outcome = "ok"
        try:
            uploaded = await (client or self.client).files.create(
                file=(images.upload_file_name(data, mime), data, mime), purpose="vision")
            return uploaded.id
        except openai.OpenAIError as exc:
            outcome = openai_outcome(exc)
            raise
        finally:
            metrics.openai_requests_total.labels("vision_upload", outcome, tenant).inc()
            metrics.openai_latency_seconds.labels("vision_upload").observe(time.monotonic() - started)

    async def _classify(
        self, file_id: str, caption: str | None, client: openai.AsyncOpenAI | None = None,
        *, tenant: str,
    ) -> classify.Classification:
        """The validated classification; raises OpenAIError or InvalidClassification. `tenant`: the
        customer's tenant label of the call's metrics."""
        started = time.monotonic()
        outcome = "ok"
        try:
            kwargs = classify.classification_request(self.model, file_id, self.categories, caption)
            response = await (client or self.client).responses.create(**kwargs)
            if response.status not in (None, "completed"):
                details = response.incomplete_details
                why = details.reason if details is not None else None
                raise classify.InvalidClassification(f"response {response.status} ({why or 'no reason'})")
            return classify.parse_classification(response.output_text, self.categories)
        except openai.OpenAIError as exc:
            outcome = openai_outcome(exc)
            raise
        except classify.InvalidClassification:
            outcome = "invalid_output"
            raise
        finally:
            metrics.openai_requests_total.labels("vision", outcome, tenant).inc()
            metrics.openai_latency_seconds.labels("vision").observe(time.monotonic() - started)

    # ------------------------------------------------------------------ outputs
    async def _publish_classified(self, request: ResponderRequest, result: ImageResult) -> None:
        context = result.context
        value: ImageClassified = {
            "batch_id": request["batch_id"], "customer_key": request["customer_key"],
            "media_ref": context["media_ref"], "category": context["category"],
            "confidence": context["confidence"], "model": self.model if result.model_called else "",
            "file_id": context["file_id"], "classified_at": utcnow(),
        }
        await self._send(self.topics.image_classified, request["customer_key"], "ImageClassified",
                         dict(value))
        metrics.images_classified_total.labels(context["category"],
                                               metrics.key_tenant(request["customer_key"])).inc()
        event(log, "image_classified", customer=request["customer_key"], batch_id=request["batch_id"],
              category=context["category"], confidence=round(context["confidence"], 3),
              mime=context["mime"], failure=result.failure.reason if result.failure else None)

    async def _dead_letter(
        self, request: ResponderRequest, failure: Failure, record: ConsumerRecord | None
    ) -> None:
        await self._retrying(lambda: dead_letter(
            self.producer, self.topics, service=SERVICE, reason=failure.reason, error=failure.detail,
            source_topic=record.topic if record is not None else self.topics.vision_requests,
            partition=record.partition if record is not None else -1,
            offset=record.offset if record is not None else -1,
            key=request["customer_key"].encode(), customer_key=request["customer_key"],
            batch_id=request["batch_id"],
        ), self.topics.dead_letter)

    async def _send(self, topic: str, key: str, schema: str, value: dict[str, Any]) -> None:
        """Produces one value and waits for the broker's ack (retrying, see `_retrying`)."""
        payload = codec.encode(schema, value)

        async def produce() -> None:
            started = time.monotonic()
            await self.producer.send_and_wait(topic, payload, key=key.encode())
            metrics.produce_latency_seconds.labels(topic).observe(time.monotonic() - started)

        await self._retrying(produce, topic)

    @staticmethod
    async def _retrying(produce: Callable[[], Awaitable[None]], topic: str) -> None:
        """Retries retriable broker errors until it succeeds or the task is cancelled.

        A batch must reach the responder: giving up would leave the customer unanswered. Shutdown
        cancels this wait; the record is then not committed and is redelivered.
        """
        delay = 0.2
        while True:
            try:
                await produce()
                return
            except KafkaError as exc:
                if not getattr(exc, "retriable", False):
                    raise
                event(log, "produce_retry", logging.WARNING, topic=topic, error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
