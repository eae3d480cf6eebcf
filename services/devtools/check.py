"""`watistream check`: the configuration, and every dependency the enabled channels need, reached.

A wrong token must show up here, before the first customer writes, not as dead letters afterwards.
Every service runs the checks of what it uses before it starts (`--skip-checks` bypasses them);
`watistream check` runs all of them. One line per check: `ok` or `FAIL`, what was found, and for
a failure what to change.

Layout: `Check` results and their formatting, and the judgements of what a dependency answered
(`judge_*`, `topic_checks`, `settings_checks`), are pure functions over plain data, unit-tested;
the `*_checks` coroutines only do the I/O (Kafka admin, one HTTP call per provider) and hand the
answers to those judgements. A check never raises: an unexpected failure is a `FAIL` line.

What is reached, and why that call:
- Kafka: the bootstrap servers (reachable, and accepting the configured security), the cluster's
  brokers, then every topic: present with TOPIC_PARTITIONS partitions (the topics are
  co-partitioned by customer key, so a different count breaks the per-customer order), or created
  when KAFKA_CREATE_TOPICS allows it; the compacted ones (state, replay records) compacted.
- Each enabled provider: its `Provider.check`, one harmless authenticated call of its API (WATI:
  getContacts with one contact; ManyChat: the page's info), judged in the provider's module. A
  service checks the providers whose API it uses (`Provider.checked_for`: send, history, media).
- Each tenant's accounts (TENANTS_FILE): the same call with each account's URL and token, one line
  per account (`wati t03 wati[default]`), and `GET /models/{model}` for each tenant with an OpenAI
  key, project or model of its own (`openai t03`). Run by `watistream check` and `watistream dev`, not at a
  service's start: one tenant's wrong token must not stop the service for every other tenant.
- OpenAI: `GET /models/{OPENAI_MODEL}` (and VISION_MODEL) proves the key and the model; a
  conversation is created and deleted again to prove the Conversations API answers (a base URL of
  a provider without it fails here rather than on every customer).
- SYSTEM_PROMPT_FILE: readable and not empty (unset = the built-in instructions, a note).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from services import providers
from services.common.checks import (
    Check,
    body_text,
    failed,
    get_json,
    json_of,
    passed,
    unexpected,
    unreachable,
)
from services.common.config import ConfigError, Settings
from services.common.kafka import COMPACTED, Topics, check_kafka_auth, ensure_topics, make_admin

if TYPE_CHECKING:
    from services.common.tenants import Tenants

# the built-in providers' judgements, re-exported where callers found them (each lives in its
# provider's module; `run_checks` reaches every registered provider through `Provider.check`)

#: a need of every provider whose API a service uses for `purpose` (`Provider.checked_for`); a
#: provider's own name needs just that provider's check
SENDS, HISTORY, MEDIA = "providers:send", "providers:history", "providers:media"
#: each tenant's accounts (a tenants file): checked by `watistream check` and `watistream dev`, not
#: when a service starts — one tenant's wrong token must not keep the others' customers waiting
TENANT_ACCOUNTS = "tenant-accounts"
#: at most this many tenant accounts are asked at once
TENANT_ACCOUNT_CONCURRENCY = 8
#: what each service reaches at start (its checks); `watistream check` runs every one of them.
SERVICE_NEEDS: dict[str, tuple[str, ...]] = {
    "ingest": ("tenants", "kafka"),
    "context": ("tenants", "kafka", HISTORY),
    "responder": ("kafka", "openai", SENDS, "prompt"),
    "vision": ("kafka", "openai", MEDIA),
}
ALL_NEEDS = ("settings", "tenants", TENANT_ACCOUNTS, "kafka", SENDS, HISTORY, MEDIA, "openai", "prompt")
DEFAULT_TIMEOUT_SECONDS = 10.0


# ------------------------------------------------------------------ formatting (pure)


def format_check(check: Check) -> str:
    """`ok   kafka          ...` / `FAIL wati           ... -> what to change`."""
    line = f"{'ok  ' if check.ok else 'FAIL'} {check.name:<14} {check.detail}"
    if not check.ok and check.fix:
        line += f" -> {check.fix}"
    return line


def format_report(checks: Sequence[Check]) -> str:
    """Every check's line, then a summary line."""
    failures = sum(1 for c in checks if not c.ok)
    summary = (f"all {len(checks)} checks passed" if not failures
               else f"{failures} of {len(checks)} checks FAILED")
    return "\n".join([*map(format_check, checks), summary])


def exit_code(checks: Sequence[Check]) -> int:
    return 0 if all(c.ok for c in checks) else 1


# ------------------------------------------------------------------ judgements (pure)


def settings_checks(settings: Settings, needs: Collection[str] = ALL_NEEDS) -> list[Check]:
    """What the settings alone can tell (types and ranges were checked when they were read)."""
    checks: list[Check] = []
    if settings.tenants_file.strip():  # each tenant's channels are its entry's: the "tenants" check says
        checks.append(tenant_channels_check(settings))  # what is wrong with them
    else:
        try:
            settings.require_channels()
            checks.append(passed("channels", ", ".join(settings.enabled_channels)))
        except ConfigError as exc:
            checks.append(failed("channels", str(exc),
                                 "set the enabled channels' settings (CHANNELS to choose)"))
    required = {"KAFKA_BOOTSTRAP_SERVERS": "the cluster's bootstrap servers (host:port, comma-separated)",
                "WEBHOOK_TOKEN": "a long random secret the webhooks must present",
                "WEB_TOKEN": "a long random secret for the context web views",
                "OPENAI_API_KEY": "your OpenAI API key"}
    missing = [name for name in required if not _value_of(settings, name)]
    if missing:
        checks.append(failed("required", "empty: " + ", ".join(missing),
                             "; ".join(f"{name}: {required[name]}" for name in missing)))
    else:
        checks.append(passed("required", ", ".join(required) + " set"))
    problems: list[str] = []
    for validate in (_check_overrides, _check_locale, _check_categories):
        try:
            validate(settings)
        except (ConfigError, ValueError) as exc:
            problems.append(str(exc))
    checks.append(failed("settings", "; ".join(problems), "correct the named settings") if problems
                  else passed("settings", "CUSTOMER_OVERRIDES, PROMPT_LOCALE, IMAGE_CATEGORIES valid"))
    return checks


def tenant_checks(settings: Settings) -> list[Check]:
    """TENANTS_FILE (shape, values, every secret reference, prompts), when one is configured."""
    if not settings.tenants_file:
        return []
    from services.common.tenants import tenant_problems

    wrong = tenant_problems(settings)
    return [failed("tenants", "; ".join(wrong), "correct TENANTS_FILE as named (docs/tenants.md)") if wrong
            else passed("tenants", f"TENANTS_FILE={settings.tenants_file} valid")]


def tenant_channels_check(settings: Settings) -> Check:
    """The channels a tenants file serves (those its tenants list accounts of)."""
    from services.common.tenants import load_tenants, require_served_channels

    try:
        served = require_served_channels(settings, load_tenants(settings))
    except ConfigError:  # named by the "tenants" check (`tenant_problems`), not twice
        return failed("channels", "TENANTS_FILE: the tenants' channels cannot be served as configured",
                      "see the 'tenants' check")
    return passed("channels", f"{', '.join(served)} (from TENANTS_FILE)")


def _value_of(settings: Settings, env_name: str) -> str:
    return settings.value_of(env_name)


def _check_overrides(settings: Settings) -> None:
    settings.gap_policy  # noqa: B018 - parsing is the check


def _check_locale(settings: Settings) -> None:
    from services.responder.prompt import UnknownLocale, labels_for

    try:
        labels_for(settings.prompt_locale)
    except UnknownLocale as exc:
        raise ConfigError(f"PROMPT_LOCALE: {exc}") from exc


def _check_categories(settings: Settings) -> None:
    from services.vision.classify import parse_categories

    parse_categories(settings.image_categories)  # ConfigError names IMAGE_CATEGORIES


def topic_checks(
    wanted: Sequence[str], partitions: int, existing: Mapping[str, int], created: Collection[str],
    create_allowed: bool,
) -> list[Check]:
    """One line when every topic is right, else one line per topic that is not."""
    checks: list[Check] = []
    for topic in wanted:
        have = existing.get(topic)
        if have is None:
            fix = (f"create it with {partitions} partitions, or set KAFKA_CREATE_TOPICS=true"
                   if not create_allowed else "check the Kafka user may create topics (ACLs)")
            checks.append(failed("topic", f"{topic} is missing", fix))
        elif have != partitions:
            checks.append(failed(
                "topic", f"{topic} has {have} partitions, TOPIC_PARTITIONS={partitions} "
                "(the topics are co-partitioned by customer: every one needs the same count)",
                f"set TOPIC_PARTITIONS={have} if every topic has {have}, or recreate the topic "
                f"with {partitions} partitions",
            ))
    if not checks:
        note = f" ({len(created)} created now)" if created else ""
        checks.append(passed("topics", f"{len(wanted)} topics with {partitions} partitions{note}"))
    return checks


def compaction_checks(compacted: Sequence[str], policies: Mapping[str, str]) -> list[Check]:
    """The topics that must be compacted (a state store's, the replay records) and are not."""
    return [
        failed("topic", f"{topic} has cleanup.policy={policies[topic]}, not compact (its records are "
                        "the latest state per key: retention would delete state that is still needed)",
               f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
               "--add-config cleanup.policy=compact")
        for topic in compacted if topic in policies and "compact" not in policies[topic]
    ]


def judge_openai_model(status: int, body: Any, model: str, setting: str, *, name: str | None = None,
                       key_setting: str = "OPENAI_API_KEY") -> Check:
    """models/{model}'s answer: 200 proves the key and the model; 401 the key; 404 the model.
    `name` and `key_setting` name a tenant's line and where its key is configured."""
    name = name or ("openai" if setting == "OPENAI_MODEL" else "openai vision")
    if status == 200:
        return passed(name, f"{key_setting} accepted; {setting}={model} available")
    if status == 401:
        return failed(name, f"OpenAI refused {key_setting} (HTTP 401): {body_text(body)}",
                      f"create a key at OpenAI (API keys page) and put it in {key_setting}")
    if status == 404:
        return failed(name, f"model {model!r} does not exist or this key has no access to it",
                      f"set {setting} to a model your OpenAI project can use, e.g. gpt-4.1-mini")
    if status == 429:
        return failed(name, f"OpenAI answered 429: {body_text(body)}",
                      "check the project's billing and rate limits at OpenAI")
    return unexpected(name, status, body, "OPENAI_BASE_URL")


def judge_conversations(status: int, body: Any) -> Check:
    """The answer to creating a conversation: the Conversations API is what the responder needs."""
    if status == 200 and isinstance(body, dict) and str(body.get("id", "")).startswith("conv_"):
        return passed("conversations", "the Conversations API answers (a test conversation made and deleted)")
    if status == 404:
        return failed("conversations", "OPENAI_BASE_URL has no Conversations API (HTTP 404)",
                      "use https://api.openai.com/v1 or a gateway that supports /v1/conversations")
    return unexpected("conversations", status, body, "OPENAI_BASE_URL and the key's permissions")


def prompt_check(settings: Settings) -> Check:
    """SYSTEM_PROMPT_FILE readable and not empty (reads the file)."""
    if not settings.system_prompt_file:
        return passed("system prompt", "SYSTEM_PROMPT_FILE not set: the built-in instructions are used")
    path = Path(settings.system_prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        return failed("system prompt", f"SYSTEM_PROMPT_FILE={path} cannot be read: {reason}",
                      "point SYSTEM_PROMPT_FILE at a readable UTF-8 file (in compose: mounted into the "
                      "container)")
    if not text.strip():
        return failed("system prompt", f"SYSTEM_PROMPT_FILE={path} is empty", "write the instructions in it")
    return passed("system prompt", f"SYSTEM_PROMPT_FILE={path} ({len(text.strip())} characters)")


# ------------------------------------------------------------------ I/O


def _admin(settings: Settings, timeout: float) -> Any:
    """The admin client (with the cluster's security settings, when they exist)."""
    return make_admin(settings, request_timeout_ms=int(timeout * 1000))


async def _describe(admin: Any, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each of `topics` that exists (never asks for a missing one: a metadata
    request for it could auto-create it on a broker that allows that)."""
    names = set(await admin.list_topics())
    present = [t for t in topics if t in names]
    if not present:
        return {}
    described = await admin.describe_topics(present)
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}


async def _cleanup_policies(admin: Any, topics: Sequence[str]) -> dict[str, str]:
    """`cleanup.policy` of each topic."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    if not topics:
        return {}
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    policies: dict[str, str] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == "cleanup.policy":
                    policies[str(resource["resource_name"])] = str(entry["config_value"])
    return policies


async def kafka_checks(settings: Settings, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> list[Check]:
    """The cluster reachable, then every topic present with the configured partitions."""
    bootstrap = settings.kafka_bootstrap_servers
    if not bootstrap:
        return [failed("kafka", "KAFKA_BOOTSTRAP_SERVERS is empty",
                       "set it to your cluster's bootstrap servers (the embedded broker of "
                       "`watistream dev` is not for production)")]
    try:
        refused = await check_kafka_auth(settings, timeout)  # a clear reason, where aiokafka says
    except ConfigError as exc:                               # only "Unable to bootstrap"
        refused = str(exc)
    if refused is not None:
        return [failed("kafka", refused, "check KAFKA_BOOTSTRAP_SERVERS and the KAFKA_SECURITY_PROTOCOL, "
                       "KAFKA_SASL_* and KAFKA_SSL_* settings against your cluster's")]
    topics = Topics.from_settings(settings)
    wanted = topics.all()
    compacted = [getattr(topics, name) for name in sorted(COMPACTED)]
    admin = _admin(settings, timeout)
    created: list[str] = []
    policies: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            existing = await _describe(admin, wanted)
            missing = [t for t in wanted if t not in existing]
            if missing and settings.kafka_create_topics:
                await ensure_topics(settings, attempts=1)
                created = missing
                # the brokers' metadata learns of new topics a moment after the creation is acked
                # (bounded by the timeout around all of this)
                for _ in range(int(timeout * 10) + 1):
                    existing = await _describe(admin, wanted)
                    if len(existing) == len(wanted):
                        break
                    await asyncio.sleep(0.1)
            policies = await _cleanup_policies(admin, [t for t in compacted if t in existing])
    except Exception as exc:  # every failure becomes a line, with its type
        if created and isinstance(exc, TimeoutError):
            return [failed("topics", f"created {len(created)} topics, but the cluster did not list them "
                           f"within {timeout:g} s", "run the check again; if it persists, check the brokers")]
        reason = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        return [failed("kafka", f"cannot reach {bootstrap}: {reason}",
                       "check KAFKA_BOOTSTRAP_SERVERS, that the brokers run and this host can reach "
                       "them, and (secured clusters) the security settings")]
    finally:
        await _close(admin)
    checks = topic_checks(wanted, settings.topic_partitions, existing, created, settings.kafka_create_topics)
    return [passed("kafka", f"{bootstrap} reachable"), *checks, *compaction_checks(compacted, policies)]


async def _close(admin: Any) -> None:
    with contextlib.suppress(Exception):  # closing a client that never connected may fail
        await admin.close()


def provider_checked(provider: Any, settings: Settings, needs: Collection[str]) -> bool:
    """Whether `needs` call for the provider's check and the settings enable and configure it."""
    wanted = provider.name in needs or any(f"providers:{p}" in needs for p in provider.checked_for)
    # a provider without settings of its own is enabled by its registration (config.channel_names)
    enabled = settings.channel_enabled(provider.name) if provider.token_setting else True
    configured = all(settings.value_of(name) for name in provider.required_settings)
    return wanted and enabled and configured


def _file_tenants(settings: Settings) -> Tenants | None:
    """TENANTS_FILE's tenants, or None without a file or with an invalid one (the "tenants" check
    names what is wrong with it, not every check that reads it)."""
    if not settings.tenants_file.strip():
        return None
    from services.common.tenants import load_tenants

    try:
        return load_tenants(settings)
    except ConfigError:
        return None


async def tenant_account_checks(settings: Settings, http: httpx.AsyncClient,
                                environ: Mapping[str, str] | None = None) -> list[Check]:
    """Each account of each tenant of TENANTS_FILE, on each provider that lists tenants' accounts:
    the provider's own check with that account, its line named as the file names it
    (`wati t03 wati[default]`), so a tenant's wrong token fails here rather than on its first
    customer. An invalid file, or an account whose token reference cannot be resolved, is left to
    the "tenants" check (named there, not twice)."""
    from services.common.tenants import account_providers
    from services.providers.base import AccountAccess

    tenants = _file_tenants(settings)
    if tenants is None:
        return []
    env = os.environ if environ is None else environ
    slots = asyncio.Semaphore(TENANT_ACCOUNT_CONCURRENCY)

    async def one(provider: Any, access: AccountAccess, where: str) -> Check:
        async with slots:
            result: Check = await provider.check(settings, http, access, where)
            return result

    calls = []
    for tenant in tenants:
        for provider in account_providers():
            for account in tenant.accounts(provider.name):
                try:
                    token = account.token.resolve(env)
                except ValueError:
                    continue
                where = f"{tenant.id} {provider.name}[{account.id}]"
                calls.append(one(provider, AccountAccess(account.api_url, token), where))
    return list(await asyncio.gather(*calls))


async def tenant_openai_checks(settings: Settings, http: httpx.AsyncClient,
                               environ: Mapping[str, str] | None = None) -> list[Check]:
    """Each tenant of TENANTS_FILE with an OpenAI key, project or model of its own: `GET
    /models/{its model}` with its key in its project (`openai <tenant>` lines). Tenants on the
    deployment's key and model are the "openai" line's; an unresolvable key is the "tenants" check's."""
    from services.common.openai_accounts import openai_account

    tenants = _file_tenants(settings)
    if tenants is None:
        return []
    env = os.environ if environ is None else environ
    base = settings.openai_base_url.rstrip("/")
    checks: list[Check] = []
    for tenant in tenants:
        own = tenant.openai
        if own.api_key is None and own.project is None and own.model == settings.openai_model:
            continue
        try:
            account = openai_account(tenant, settings, env)
        except ValueError:
            continue
        if not account.api_key:
            continue
        name = f"openai {tenant.id}"
        key_setting = f"TENANTS_FILE {tenant.id} openai.api_key" if own.api_key is not None \
            else "OPENAI_API_KEY"
        headers = {"Authorization": f"Bearer {account.api_key}", "Accept": "application/json"}
        if account.project:
            headers["OpenAI-Project"] = account.project
        try:
            response = await http.get(f"{base}/models/{own.model}", headers=headers)
        except httpx.HTTPError as exc:
            checks.append(unreachable(name, "OPENAI_BASE_URL", base, exc))
            continue
        checks.append(judge_openai_model(response.status_code, json_of(response), own.model,
                                         f"TENANTS_FILE {tenant.id} openai.model", name=name,
                                         key_setting=key_setting))
    return checks


async def openai_checks(settings: Settings, http: httpx.AsyncClient) -> list[Check]:
    """The key and the model(s) (VISION_MODEL too when it differs), then the Conversations API."""
    base = settings.openai_base_url.rstrip("/")
    key = settings.openai_api_key
    models = [("OPENAI_MODEL", settings.openai_model)]
    if settings.vision_model_name != settings.openai_model:
        models.append(("VISION_MODEL", settings.vision_model_name))
    checks: list[Check] = []
    try:
        for setting, model in models:
            answer = await get_json(http, f"{base}/models/{model}", key)
            checks.append(judge_openai_model(*answer, model, setting))
        if not all(c.ok for c in checks):
            return checks
        headers = {"Authorization": f"Bearer {key}"}
        response = await http.post(f"{base}/conversations", headers=headers,
                                   json={"metadata": {"purpose": "watistream check"}})
        verdict = judge_conversations(response.status_code, json_of(response))
        if verdict.ok:
            await http.delete(f"{base}/conversations/{response.json()['id']}", headers=headers)
        checks.append(verdict)
    except httpx.HTTPError as exc:
        checks.append(unreachable("openai", "OPENAI_BASE_URL", base, exc))
    return checks


async def run_checks(
    settings: Settings, needs: Collection[str] = ALL_NEEDS, *, timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> list[Check]:
    """The checks named by `needs` (see SERVICE_NEEDS), provider checks only for enabled channels."""
    checks: list[Check] = settings_checks(settings) if "settings" in needs else []
    if "tenants" in needs:
        checks += tenant_checks(settings)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http:
        calls: list[Any] = []
        if "kafka" in needs:
            calls.append(kafka_checks(settings, timeout))
        calls += [p.check(settings, http) for p in providers.providers()
                  if provider_checked(p, settings, needs)]
        if TENANT_ACCOUNTS in needs:
            calls.append(tenant_account_checks(settings, http))
            calls.append(tenant_openai_checks(settings, http))
        if "openai" in needs and settings.openai_api_key:
            calls.append(openai_checks(settings, http))
        for result in await asyncio.gather(*calls):
            checks.extend(result if isinstance(result, list) else [result])
    if "prompt" in needs:
        checks.append(prompt_check(settings))
    return checks


def main(args: Any, settings: Settings) -> int:
    """`watistream check`: every check, printed; exit 1 when any failed."""
    timeout = float(getattr(args, "timeout", DEFAULT_TIMEOUT_SECONDS))
    checks = asyncio.run(run_checks(settings, timeout=timeout))
    print(format_report(checks), flush=True)
    return exit_code(checks)
