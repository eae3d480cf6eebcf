"""The tenant model: the zero-change default, the file's format, every rejection naming tenant and
field, secrets only by reference and resolved at start."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.config import ConfigError, Settings
from services.common.keys import SLUG_PATTERN, wati_key
from services.common.tenants import (
    SecretRef,
    Tenants,
    default_tenant,
    load_tenants,
    parse_tenants,
    parse_tenants_json,
    settings_environ,
    tenant_problems,
)

SETTINGS = Settings(
    wati_api_url="https://live.wati.example/123", wati_api_token="tok", manychat_api_token="mc",
    webhook_token="hook", system_prompt_file="/etc/prompt.txt", openai_model="gpt-4.1-mini",
    quiet_window_seconds=30.0, max_batch_wait_seconds=120.0, missed_gap_seconds=300.0,
    human_hold_seconds=900.0, missed_lookback_seconds=86400.0,
)

HOTEL_A: dict[str, Any] = {
    "id": "hotel-a",
    "wati": [
        {"id": "centro", "api_url": "https://live.wati.example/1001", "token": "env:HOTEL_A_CENTRO"},
        {"id": "playa", "api_url": "https://live.wati.example/1002", "token": "file:/run/secrets/a_playa"},
    ],
    "manychat": {"token": "env:HOTEL_A_MANYCHAT"},
    "system_prompt_file": "/etc/watistream/hotel-a.txt",
    "webhook_secret": "env:HOTEL_A_WEBHOOK",
    "openai": {"model": "gpt-4.1", "api_key": "env:HOTEL_A_OPENAI", "project": "proj_a"},
    "thresholds": {"quiet_window_seconds": 10, "missed_gap_seconds": 60, "human_hold_seconds": 0},
    "customer_overrides": {
        "groups": {"vip": {"human_hold_seconds": 300}},
        "customers": {"hotel-a/centro/wati:50370000000": "vip"},
    },
}
SHOP_B: dict[str, Any] = {
    "id": "shop-b",
    "wati": {"api_url": "https://live.wati.example/2001", "token": "env:SHOP_B_WATI"},
    "webhook_secret": "env:SHOP_B_WEBHOOK",
}
ENVIRON = {
    "HOTEL_A_CENTRO": "t1", "HOTEL_A_MANYCHAT": "t2", "HOTEL_A_WEBHOOK": "s-a", "HOTEL_A_OPENAI": "k",
    "SHOP_B_WATI": "t3", "SHOP_B_WEBHOOK": "s-b",
}
FILES = {"/run/secrets/a_playa": "t4\n"}


def read_fake(path: str) -> str:
    if path not in FILES:
        raise FileNotFoundError(2, "No such file or directory")
    return FILES[path]


def parse(*tenants: dict[str, Any]) -> Tenants:
    return parse_tenants({"tenants": list(tenants)}, SETTINGS, "tenants.json")


def problems_of(*tenants: Any, doc: Any = None) -> str:
    with pytest.raises(ConfigError) as err:
        parse_tenants(doc if doc is not None else {"tenants": list(tenants)}, SETTINGS, "tenants.json")
    return str(err.value)


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    tenant = copy.deepcopy(base)
    for name, value in changes.items():
        if value is None:
            tenant.pop(name, None)
        else:
            tenant[name] = value
    return tenant


# --- the zero-change default ---


def test_without_a_tenants_file_one_default_tenant_is_built_from_the_environment() -> None:
    tenants = load_tenants(SETTINGS)
    assert list(tenants.by_id) == ["default"]
    tenant = tenants.default
    assert tenant is not None and tenant.id == "default"
    (wati,) = tenant.accounts("wati")
    assert (wati.id, wati.api_url, str(wati.token)) == (
        "default", SETTINGS.wati_api_url, "env:WATI_API_TOKEN")
    (page,) = tenant.accounts("manychat")
    assert (page.id, page.api_url, str(page.token)) == ("default", SETTINGS.manychat_api_url,
                                                        "env:MANYCHAT_API_TOKEN")
    assert str(tenant.webhook_secret) == "env:WEBHOOK_TOKEN"
    assert tenant.system_prompt_file == "/etc/prompt.txt"
    assert tenant.openai.model == "gpt-4.1-mini" and tenant.openai.api_key is None
    assert tenant.thresholds.policy == SETTINGS.gap_policy
    assert (tenant.thresholds.quiet_window_seconds, tenant.thresholds.max_batch_wait_seconds,
            tenant.thresholds.missed_lookback_seconds, tenant.thresholds.missed_gap_seconds,
            tenant.thresholds.human_hold_seconds) == (30.0, 120.0, 86400.0, 300.0, 900.0)


def test_the_default_tenant_keeps_todays_customer_overrides() -> None:
    overrides = json.dumps({"groups": {"vip": {"missed_gap_seconds": 60}},
                            "customers": {"wati:50370000000": "vip"}})
    tenant = default_tenant(Settings(customer_overrides=overrides, missed_gap_seconds=300.0))
    assert tenant.thresholds.policy.gap_seconds("wati:50370000000") == 60.0
    assert tenant.thresholds.policy.gap_seconds("wati:50371111111") == 300.0


def test_the_default_tenant_has_only_the_channels_configured() -> None:
    tenant = default_tenant(Settings(manychat_api_token="mc"))  # a ManyChat-only business
    assert tenant.accounts("wati") == () and [a.id for a in tenant.accounts("manychat")] == ["default"]
    tenant = default_tenant(Settings(wati_api_url="https://live.wati.example/1"))
    assert [a.id for a in tenant.accounts("wati")] == ["default"] and tenant.accounts("manychat") == ()


def test_the_default_tenants_references_resolve_to_what_settings_read() -> None:
    """`env:WATI_API_TOKEN` means the value Settings read (a `.env` file included), not only os.environ."""
    tenants = load_tenants(SETTINGS)
    env = settings_environ(SETTINGS, environ={})
    assert tenants.secret_problems(env) == []
    tenant = tenants.default
    assert tenant is not None
    assert tenant.accounts("wati")[0].token.resolve(env) == "tok"
    assert tenant.webhook_secret.resolve(env) == "hook"


def test_an_unset_default_secret_is_reported_at_start() -> None:
    settings = Settings(wati_api_url="https://live.wati.example/1")
    problems = load_tenants(settings).secret_problems(settings_environ(settings, environ={}))
    assert problems == [
        "environment: tenant 'default': webhook_secret: env:WEBHOOK_TOKEN is not set or empty",
        "environment: tenant 'default': wati[default].token: env:WATI_API_TOKEN is not set or empty",
    ]


# --- the file ---


def test_a_full_file_parses_into_tenants() -> None:
    tenants = parse(HOTEL_A, SHOP_B)
    assert list(tenants.by_id) == ["hotel-a", "shop-b"] and tenants.default is None
    a = tenants.get("hotel-a")
    assert a is not None
    assert [(x.id, x.api_url, str(x.token)) for x in a.accounts("wati")] == [
        ("centro", "https://live.wati.example/1001", "env:HOTEL_A_CENTRO"),
        ("playa", "https://live.wati.example/1002", "file:/run/secrets/a_playa"),
    ]
    assert [(x.id, x.api_url) for x in a.accounts("manychat")] == [("default", SETTINGS.manychat_api_url)]
    assert a.system_prompt_file == "/etc/watistream/hotel-a.txt"
    assert (a.openai.model, str(a.openai.api_key), a.openai.project) == ("gpt-4.1", "env:HOTEL_A_OPENAI",
                                                                          "proj_a")
    t = a.thresholds
    assert (t.quiet_window_seconds, t.max_batch_wait_seconds) == (10.0, 120.0)
    assert t.missed_lookback_seconds == 86400.0
    assert (t.missed_gap_seconds, t.human_hold_seconds) == (60.0, 0.0)
    vip = "hotel-a/centro/wati:50370000000"
    assert t.policy.hold_seconds(vip) == 300.0 and t.policy.gap_seconds(vip) == 60.0
    assert t.policy.hold_seconds("hotel-a/centro/wati:50371111111") == 0.0


def test_omitted_fields_take_the_deployments_settings() -> None:
    b = parse(SHOP_B).get("shop-b")
    assert b is not None
    assert [a.id for a in b.accounts("wati")] == ["default"] and b.accounts("manychat") == ()
    assert b.system_prompt_file == "" and b.openai.model == SETTINGS.openai_model
    assert b.openai.api_key is None and b.openai.project is None
    assert b.thresholds.quiet_window_seconds == SETTINGS.quiet_window_seconds
    assert b.thresholds.human_hold_seconds == SETTINGS.human_hold_seconds


def test_account_lookup_by_id_or_the_only_or_default_one() -> None:
    tenants = parse(HOTEL_A, SHOP_B)
    a, b = tenants.get("hotel-a"), tenants.get("shop-b")
    assert a is not None and b is not None
    account = a.account("wati", "playa")
    assert account is not None and account.id == "playa"
    assert a.account("wati", "nope") is None
    assert a.account("wati") is None  # two accounts, none named default: the caller must name one
    only = b.account("wati")
    assert only is not None and only.id == "default"
    assert b.account("manychat") is None and a.account("telegram") is None


def test_for_key_finds_the_customers_tenant() -> None:
    tenants = parse(HOTEL_A, SHOP_B)
    found = tenants.for_key(wati_key("50370000000", tenant="shop-b"))
    assert found is not None and found.id == "shop-b"
    assert tenants.for_key("wati:50370000000") is None  # no default tenant in this file


def test_a_file_is_read_from_tenants_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [SHOP_B]}), encoding="utf-8")
    tenants = load_tenants(Settings(tenants_file=str(path)))
    assert list(tenants.by_id) == ["shop-b"] and tenants.source == f"TENANTS_FILE {path}"


def test_an_unreadable_tenants_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"TENANTS_FILE .*nope\.json: cannot be read"):
        load_tenants(Settings(tenants_file=str(missing)))


@pytest.mark.parametrize(("text", "reason"), [
    ("{", "not valid JSON"),
    ('{"tenants": [], "tenants": []}', "duplicate field 'tenants'"),
    ("[]", "must be a JSON object with a 'tenants' list"),
])
def test_a_malformed_file_is_rejected(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_tenants_json(text, SETTINGS)


def test_the_file_needs_tenants() -> None:
    assert "tenants.json: tenants: must be a non-empty list" in problems_of(doc={"tenants": []})
    assert "unknown field 'tenant'" in problems_of(doc={"tenant": [SHOP_B], "tenants": [SHOP_B]})


@pytest.mark.parametrize(("tenant", "expected"), [
    (with_(SHOP_B, id="Shop B"), "tenants[0].id: must be a slug"),
    (with_(SHOP_B, id=None), "tenants[0].id: must be a slug"),
    (with_(SHOP_B, id="-b"), "tenants[0].id: must be a slug"),
    (with_(SHOP_B, id="other"), "tenants[0].id: 'other' is reserved"),
    ("shop-b", "tenants[0]: must be an object"),
    (with_(SHOP_B, colour="red"), "tenant 'shop-b': unknown field 'colour'"),
    (with_(SHOP_B, wati=None), "tenant 'shop-b': needs at least one channel account"),
    (with_(SHOP_B, wati=[]), "tenant 'shop-b': needs at least one channel account"),
    (with_(SHOP_B, wati="https://x"), "tenant 'shop-b': wati: must be an account object or a list"),
    (with_(SHOP_B, wati=["x"]), "tenant 'shop-b': wati[0]: must be an object"),
    (with_(SHOP_B, wati={"api_url": "ftp://x", "token": "env:X"}),
     "tenant 'shop-b': wati[default].api_url: must be an http(s) URL"),
    (with_(SHOP_B, wati={"token": "env:X"}),
     "tenant 'shop-b': wati[default].api_url: must be an http(s) URL"),
    (with_(SHOP_B, wati={"api_url": "https://x", "token": "env:X", "tok": 1}),
     "tenant 'shop-b': wati[0]: unknown field 'tok'"),
    (with_(SHOP_B, wati=[{"api_url": "https://x/1", "token": "env:X"},
                         {"api_url": "https://x/2", "token": "env:Y"}]),
     "tenant 'shop-b': wati[0].id: must be a slug matching"),
    (with_(SHOP_B, wati=[{"id": "a", "api_url": "https://x/1", "token": "env:X"},
                         {"id": "a", "api_url": "https://x/2", "token": "env:Y"}]),
     "tenant 'shop-b': wati[a].id: used by another account of this tenant"),
    (with_(SHOP_B, wati={"api_url": "https://x", "token": None}),
     "tenant 'shop-b': wati[default].token: missing; must be a reference"),
    (with_(SHOP_B, webhook_secret=None), "tenant 'shop-b': webhook_secret: missing; must be a reference"),
    (with_(SHOP_B, system_prompt_file=3), "tenant 'shop-b': system_prompt_file: must be a path"),
    (with_(SHOP_B, openai="gpt-4.1"), "tenant 'shop-b': openai: must be an object"),
    (with_(SHOP_B, openai={"model": ""}), "tenant 'shop-b': openai.model: must be a model name"),
    (with_(SHOP_B, openai={"modle": "x"}), "tenant 'shop-b': openai: unknown field 'modle'"),
    (with_(SHOP_B, openai={"project": 7}), "tenant 'shop-b': openai.project: must be a project id"),
    (with_(SHOP_B, thresholds=[]), "tenant 'shop-b': thresholds: must be an object"),
    (with_(SHOP_B, thresholds={"quiet_window": 5}),
     "tenant 'shop-b': thresholds: unknown field 'quiet_window'"),
    (with_(SHOP_B, thresholds={"quiet_window_seconds": 0}),
     "tenant 'shop-b': thresholds.quiet_window_seconds: must be a number > 0"),
    (with_(SHOP_B, thresholds={"max_batch_wait_seconds": "120"}),
     "tenant 'shop-b': thresholds.max_batch_wait_seconds: must be a number > 0"),
    (with_(SHOP_B, thresholds={"missed_lookback_seconds": True}),
     "tenant 'shop-b': thresholds.missed_lookback_seconds: must be a number > 0"),
    (with_(SHOP_B, thresholds={"human_hold_seconds": -1}),
     "tenant 'shop-b': thresholds.human_hold_seconds: must be a number >= 0"),
    (with_(SHOP_B, customer_overrides=[]), "tenant 'shop-b': customer_overrides: must be an object"),
    (with_(SHOP_B, customer_overrides={"customers": {"shop-b/default/wati:1": "gold"}}),
     "tenant 'shop-b': customer_overrides: shop-b/default/wati:1 names unknown group 'gold'"),
    (with_(SHOP_B, customer_overrides={"customers": {"wati:50370000000": {"missed_gap_seconds": 1}}}),
     "tenant 'shop-b': customer_overrides.customers: wati:… belongs to tenant 'default', not this one"),
    (with_(SHOP_B, customer_overrides={"customers": {"503700": {"missed_gap_seconds": 1}}}),
     "tenant 'shop-b': customer_overrides.customers: not a customer key"),
    (with_(SHOP_B, customer_overrides={"groups": {"vip": {"human_hold_seconds": "5"}}}),
     "tenant 'shop-b': customer_overrides.groups: vip: human_hold_seconds must be a number >= 0"),
    (with_(SHOP_B, customer_overrides={"groups": {"vip": {"hold": 5}}}),
     "tenant 'shop-b': customer_overrides.groups: unknown field 'hold'"),
    (with_(SHOP_B, customer_overrides={"customers": {"shop-b/default/wati:50370000000": {
        "missed_gap_seconds": -1}}}),
     "tenant 'shop-b': customer_overrides.customers: shop-b/default/wati:…: missed_gap_seconds must be"),
])
def test_every_problem_names_the_tenant_and_field(tenant: Any, expected: str) -> None:
    message = problems_of(tenant)
    assert f"tenants.json: {expected}" in message


@pytest.mark.parametrize("inline", ["sk-live-abc123", "Bearer eyJhbGciOi", "env:", "env:1BAD",
                                    "file:relative/path", "vault:x", "", 42])
def test_an_inline_or_malformed_secret_is_rejected_without_echoing_it(inline: object) -> None:
    message = problems_of(with_(SHOP_B, webhook_secret=inline))
    assert "tenant 'shop-b': webhook_secret:" in message and "env:NAME or file:/absolute/path" in message
    if isinstance(inline, str) and len(inline) > 6:
        assert inline not in message  # a pasted secret never reaches a log
    if inline == "sk-live-abc123":
        assert "inline secrets are not allowed" in message


def test_every_problem_of_the_file_is_reported_at_once() -> None:
    message = problems_of(with_(SHOP_B, webhook_secret="plain"), with_(HOTEL_A, openai={"model": ""}))
    assert "tenant 'shop-b': webhook_secret: inline secrets are not allowed" in message
    assert "tenant 'hotel-a': openai.model" in message


def test_two_tenants_cannot_share_an_id_or_a_wati_account() -> None:
    assert "tenant 'shop-b': id used by another tenant" in problems_of(SHOP_B, SHOP_B)
    twin = with_(SHOP_B, id="shop-c", webhook_secret="env:C")
    assert ("tenant 'shop-c': wati[default].api_url: same WATI account as shop-b/default"
            in problems_of(SHOP_B, twin))


def test_a_tenant_named_default_can_keep_the_environments_keys() -> None:
    legacy = with_(SHOP_B, id="default", customer_overrides={"customers": {"wati:50370000000": {
        "missed_gap_seconds": 5}}})
    tenants = parse(legacy)
    assert tenants.default is not None
    assert tenants.default.thresholds.policy.gap_seconds("wati:50370000000") == 5.0


# --- secrets resolved at start ---


def test_secret_references_resolve_from_env_and_file() -> None:
    assert SecretRef.parse("env:HOTEL_A_CENTRO").resolve(ENVIRON) == "t1"
    assert SecretRef.parse(" file:/run/secrets/a_playa ").resolve({}, read_fake) == "t4"  # newline removed
    assert parse(HOTEL_A, SHOP_B).secret_problems(ENVIRON, read_fake) == []


def test_a_real_secret_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n", encoding="utf-8")
    assert SecretRef.parse(f"file:{secret}").resolve({}) == "s3cret"


def test_unresolvable_references_are_reported_per_tenant_and_field() -> None:
    env = {k: v for k, v in ENVIRON.items() if k != "HOTEL_A_OPENAI"} | {"SHOP_B_WATI": ""}
    problems = parse(HOTEL_A, SHOP_B).secret_problems(env, lambda path: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    assert problems == [
        "tenants.json: tenant 'hotel-a': wati[playa].token: file:/run/secrets/a_playa cannot be read: "
        "Permission denied",
        "tenants.json: tenant 'hotel-a': openai.api_key: env:HOTEL_A_OPENAI is not set or empty",
        "tenants.json: tenant 'shop-b': wati[default].token: env:SHOP_B_WATI is not set or empty",
    ]


def test_an_empty_secret_file_is_a_problem() -> None:
    with pytest.raises(ValueError, match=r"file:/s is empty"):
        SecretRef("file", "/s").resolve({}, lambda _path: "\n")


def test_two_tenants_with_one_webhook_secret_are_reported() -> None:
    env = ENVIRON | {"SHOP_B_WEBHOOK": ENVIRON["HOTEL_A_WEBHOOK"]}
    assert parse(HOTEL_A, SHOP_B).secret_problems(env, read_fake) == [
        "tenants.json: tenant 'shop-b': webhook_secret: same secret as tenant 'hotel-a'; each tenant needs "
        "its own",
    ]


def test_a_reference_prints_as_itself_never_as_its_value() -> None:
    ref = SecretRef.parse("env:HOTEL_A_WEBHOOK")
    assert str(ref) == "env:HOTEL_A_WEBHOOK" and "s-a" not in repr(ref)


# --- the check: one line per problem ---


def test_tenant_problems_is_empty_for_a_good_deployment(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You answer for Hotel A.", encoding="utf-8")
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [with_(HOTEL_A, system_prompt_file=str(prompt)), SHOP_B]}),
                    encoding="utf-8")
    assert tenant_problems(Settings(tenants_file=str(path)), ENVIRON, read_fake_or_disk) == []


def read_fake_or_disk(path: str) -> str:
    return FILES[path] if path in FILES else Path(path).read_text(encoding="utf-8")


def test_tenant_problems_lists_the_file_the_secrets_and_the_prompts(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": [
        with_(HOTEL_A, system_prompt_file=str(tmp_path / "missing.txt")),
        with_(SHOP_B, system_prompt_file=str(empty)),
    ]}), encoding="utf-8")
    env = {k: v for k, v in ENVIRON.items() if k != "SHOP_B_WATI"}
    source = f"TENANTS_FILE {path}"
    assert tenant_problems(Settings(tenants_file=str(path)), env, read_fake_or_disk) == [
        f"{source}: tenant 'shop-b': wati[default].token: env:SHOP_B_WATI is not set or empty",
        f"{source}: tenant 'hotel-a': system_prompt_file: {tmp_path / 'missing.txt'} cannot be read: "
        "No such file or directory",
        f"{source}: tenant 'shop-b': system_prompt_file: {empty} is empty",
    ]
    path.write_text(json.dumps({"tenants": [with_(SHOP_B, webhook_secret="inline"),
                                            with_(HOTEL_A, id="Bad")]}), encoding="utf-8")
    assert tenant_problems(Settings(tenants_file=str(path)), env) == [
        f"{source}: tenant 'shop-b': webhook_secret: inline secrets are not allowed: write a reference: "
        "env:NAME or file:/absolute/path",
        f"{source}: tenants[1].id: must be a slug matching {SLUG_PATTERN} (got 'Bad')",
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["tenants", "id", "wati", "manychat", "token", "api_url", "webhook_secret",
                         "openai", "model", "thresholds", "customer_overrides", "groups", "customers",
                         "quiet_window_seconds", "x"]), inner, max_size=5),
    max_leaves=20,
)


@given(doc=json_values)
def test_any_json_document_is_either_tenants_or_a_config_error(doc: object) -> None:
    """Whatever an operator writes, the start fails with a ConfigError (never a traceback)."""
    with contextlib.suppress(ConfigError):
        parse_tenants(doc, SETTINGS)


FIELD_PATHS = [
    ("wati",), ("manychat",), ("openai",), ("thresholds",), ("customer_overrides",), ("webhook_secret",),
    ("system_prompt_file",), ("wati", 0), ("wati", 0, "id"), ("wati", 0, "api_url"), ("wati", 0, "token"),
    ("openai", "model"), ("openai", "api_key"), ("openai", "project"),
    ("thresholds", "quiet_window_seconds"), ("customer_overrides", "groups"),
    ("customer_overrides", "customers"), ("customer_overrides", "groups", "vip"),
    ("customer_overrides", "groups", "vip", "human_hold_seconds"),
]


@given(path=st.sampled_from(FIELD_PATHS), value=json_values)
def test_any_value_in_any_field_of_a_valid_tenant_is_accepted_or_a_config_error(
    path: tuple[Any, ...], value: object
) -> None:
    tenant = copy.deepcopy(HOTEL_A)
    target: Any = tenant
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    try:
        tenants = parse_tenants({"tenants": [tenant]}, SETTINGS)
    except ConfigError as exc:
        assert "tenant 'hotel-a'" in str(exc)  # the problem names the tenant
        return
    # what was accepted works when the context service asks it, for every customer it names
    policy = tenants.by_id["hotel-a"].thresholds.policy
    for key in [*policy.customers, "hotel-a/centro/wati:1"]:
        assert policy.gap_seconds(key) >= 0 and policy.hold_seconds(key) >= 0
