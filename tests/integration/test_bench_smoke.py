"""A short run of every benchmark (`bench/`, smoke scale: seconds each) on the session's broker.

The full benchmarks are not part of the test command (`python -m bench.run`, see BENCHMARKS.md);
this proves each one still runs against the current services and that what the benchmarks check
besides speed holds: every webhook accepted, every batch answered once and in order without a
`conversation_locked`, every message reaching a ResponderRequest, the recovered table complete,
and the old-design model's arithmetic equal to the stand-in's own usage figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench_run
from bench import tenants as bench_tenants
from bench.common import SCALES, BenchEnv, percentile, spread, summarise_collapsed
from bench.cost import Burst, Day, old_design
from bench.loadgen import wa_id_of, webhook_body
from bench.stack import Seen, burst_schedule
from services.common.config import Settings
from services.common.tenants import load_tenants

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def bench_env(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchEnv]:
    yield BenchEnv(kafka, tmp_path_factory.mktemp("bench"), SCALES["smoke"])


async def _one(bench: BenchEnv, name: str) -> dict[str, Any]:
    [result] = await bench_run.run_all(bench, [name], echo=lambda _: None)
    assert "error" not in result, result.get("traceback")
    assert result["figures"], result
    assert result["figures"][0]["value"] is not None, result["figures"][0]
    return result


async def test_ingest_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "ingest")
    details = result["details"]
    assert details["non_2xx_or_errors"] == {"ingest": 0, "baseline": 0}
    assert all(
        run["statuses"].get("200", 0) > 0 for runs in details["throughput_runs"].values() for run in runs
    )
    for latency in details["latency_runs"].values():
        assert latency["errors"] == {} and set(latency["statuses"]) == {"200"}, latency


async def test_pipeline_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "pipeline")
    context = result["details"]["context"]
    for step in [context["first_contact"], *context["steps"]]:
        assert step["accepted"] > 0 and step["not_accepted"] == 0
        assert step["missing_messages"] == 0 and step["drained"], step
        assert step["overhead_ms"]["p50"] is not None and step["overhead_ms"]["p50"] >= -50, step
    relay = result["details"]["baseline_relay"]["steps"][0]
    assert relay["missing_messages"] == 0
    gap_mode = result["details"]["gap_mode"]["steps"][0]  # MISSED_HISTORY=gap, the rule before
    assert gap_mode["missing_messages"] == 0 and gap_mode["drained"], gap_mode


async def test_responder_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "responder")
    for kind in ("responder", "baseline"):
        run = result["details"][kind]
        assert run["answered"] == run["batches"] == run["replies"], run
        assert run["duplicates"] == 0 and run["order_violations"] == 0
        assert run["conversation_locked"] == 0
    assert result["details"]["responder"]["openai_reply_calls"] == result["details"]["responder"]["batches"]


async def test_cost_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "cost")
    details = result["details"]
    assert details["unanswered_bursts"] == 0
    assert details["openai_reply_calls"] == details["bursts"]  # one answer per burst
    assert details["modelled_new_input_tokens"] == details["input_tokens"]
    assert details["old_design"]["calls"] == details["messages"]


async def test_state_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "state")
    details = result["details"]
    assert details["indexed"] == details["customers"] == SCALES["smoke"].state_customers
    assert details["view_ok"]


# -- the pure parts ---------------------------------------------------------------------------------


def test_old_design_model_counts_calls_fetches_and_growing_tokens() -> None:
    at = datetime(2025, 10, 4, 12, 0, tzinfo=UTC)
    day = Day(
        [
            Burst(0, 0, ["Hola", "Quiero reservar"], at, at, None),
            Burst(
                0,
                1,
                ["¿Cuánto cuesta?", "para dos", "gracias"],
                at + timedelta(minutes=10),
                at + timedelta(minutes=10),
                600.0,
            ),
            Burst(0, 2, ["Ok"], at + timedelta(minutes=11), at + timedelta(minutes=11), 30.0),
        ]
    )
    block = "MENSAJES ENTRE EL CLIENTE Y AGENTES HUMANOS\n[2025-10-04 12:05] Agente (Ana): Hola"
    old = old_design(day, {(0, 1): block}, "Be brief.", "es", gap_seconds=300.0)
    assert old["calls"] == 6  # one per message
    assert old["fetches"] == 3  # one per message of the burst after the gap; none on first contact
    without_block = old_design(day, {}, "Be brief.", "es", gap_seconds=300.0)
    assert old["input_tokens"] > without_block["input_tokens"]  # the block is paid on 3 calls


def test_burst_schedule_keeps_the_rate_and_the_burst_shape() -> None:
    schedule = burst_schedule(
        customers=100, rate=200, seconds=10, burst=3, spacing=0.2, tag="s0", seed=1, wa_id=wa_id_of
    )
    assert 1700 <= len(schedule) <= 2100
    assert [e[0] for e in schedule] == sorted(e[0] for e in schedule)
    per_customer: dict[str, list[float]] = {}
    for t, wa_id, text in schedule:
        assert text.startswith("s0 ")
        per_customer.setdefault(wa_id, []).append(t)
    assert len(per_customer) == 100
    times = per_customer[wa_id_of(0)]
    assert abs(times[1] - times[0] - 0.2) < 1e-9  # messages of a burst 0.2 s apart


def test_helpers() -> None:
    body = webhook_body(wa_id_of(7), "hola")
    assert b'"waId": "50370000007"' in body and b'"text": "hola"' in body
    assert webhook_body(wa_id_of(7), "x") != webhook_body(wa_id_of(7), "x")  # unique ids
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.5) is None
    assert spread([10.0, 12.0, 11.0]) == {
        "min": 10.0,
        "median": 11.0,
        "max": 12.0,
        "n": 3,
        "range_pct": pytest.approx(18.18, rel=1e-3),
    }
    lines = summarise_collapsed(
        "main (services/x/main.py:1);f (lib/a.py:2) 3\nmain (services/x/main.py:1) 1\n"
    )
    assert lines[0].startswith(" 75.0%  self  f")
    assert any("under main (x/main.py)" in line for line in lines)


def test_results_render(tmp_path: Path) -> None:
    doc = {
        "scale": "smoke",
        "finished_at": "now",
        "seconds": 1.0,
        "machine": {
            "cores": 2,
            "memory_gib": 1.0,
            "cpu_model": "cpu",
            "load_average_at_start": [0.1],
            "python": "3.11",
            "java": "java",
        },
        "results": [
            {
                "name": "x",
                "title": "X",
                "figures": [
                    {
                        "metric": "m",
                        "value": 2.0,
                        "unit": "ms",
                        "baseline": 1.0,
                        "ratio": 2.0,
                        "target": "<= 1 ms",
                        "met": False,
                        "note": "n",
                    }
                ],
            },
            {"name": "y", "error": "RuntimeError: boom", "figures": []},
        ],
    }
    markdown = bench_run.render_markdown(doc)
    assert "| x | m | 2.0 ms | 1.0 ms | 2.00x | <= 1 ms | NO |" in markdown
    assert "FAILED: RuntimeError: boom" in markdown


async def test_idle_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "idle")
    details = result["details"]
    assert details["worker_percent"] >= 0 and details["baseline_percent"] >= 0


async def test_history_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "history")
    gap_mode, every_batch = result["details"]["gap_mode"], result["details"]["every_batch"]
    for run in (gap_mode, every_batch):
        assert run["answered"] == run["bursts"] > 0, run
    assert every_batch["getmessages"] == every_batch["bursts"]  # one history read per batch
    assert gap_mode["getmessages"] <= every_batch["getmessages"]


async def test_tenants_benchmark_runs(bench_env: BenchEnv) -> None:
    result = await _one(bench_env, "tenants")
    size = bench_tenants.SIZES["smoke"]
    for kind, tenants in (("tenants", size.tenants), ("single", 1)):
        run = result["details"][kind]
        assert run["not_accepted"] == 0 and run["missing"] == 0 and run["drained"], run
        assert run["dead_letters"] == 0, run
        assert run["samples"] == size.customers  # one message per customer, one request each
        per_tenant = run["by_tenant"]["per_group"]
        assert len(per_tenant) == tenants
        assert all(s["n"] == size.customers / tenants for s in per_tenant.values()), per_tenant
        assert len(run["plays"]) == size.rounds == len(run["part_p99_ms"])
        # the warm-up part ran, drained, and none of its customers is among the samples
        assert run["warmup"]["accepted"] == bench_tenants.warmup_count(size) and run["warmup"]["drained"]
        reads = run["history_reads_by_tenant"]
        assert len(reads) == tenants and all(n > 0 for n in reads.values()), reads  # each its own account
        # each part's results by seconds of arrival, and what the machine and the services used then
        assert all(sum(b["n"] for b in p["timeline"]) == p["results"] for p in run["plays"]), run["plays"]
        parts_cpu = result["details"]["stalls"]["cpu_by_part"][kind]
        assert len(parts_cpu) == size.rounds and all(p["machine"]["busy"] > 0 for p in parts_cpu), parts_cpu
        assert all(f"{kind}-context" in p["processes"] for p in parts_cpu), parts_cpu
    assert result["details"]["commit"] != "unknown"
    assert "error" not in result["details"]["stalls"], result["details"]["stalls"]


# -- the tenants benchmark's pure parts ------------------------------------------------------------


def test_tenants_file_of_the_benchmark_loads_and_its_secrets_resolve(tmp_path: Path) -> None:
    ids = bench_tenants.tenant_ids(50)
    assert ids[0] == "t00" and ids[-1] == "t49" and len(set(ids)) == 50
    files = bench_tenants.write_tenants_file(ids, tmp_path, "http://127.0.0.1:9", "s3cr3t-wati")
    settings = Settings(tenants_file=str(files.path))
    tenants = load_tenants(settings)
    assert sorted(tenants.by_id) == ids
    assert tenants.secret_problems(files.environ) == []  # env: webhook secrets, file: WATI tokens
    assert len(set(files.webhook_secrets.values())) == 50  # each tenant its own
    text = files.path.read_text()
    assert "s3cr3t-wati" not in text and not any(v in text for v in files.webhook_secrets.values())
    assert tenants.secret_problems({}) != []  # the references are real: without the variables, problems


def test_tenants_schedule_is_the_same_in_both_configurations_and_routes_by_tenant() -> None:
    size = bench_tenants.Size(tenants=5, customers_per_tenant=10, rate=25.0, rounds=2)
    many = bench_tenants.schedule(size, "a1", [n // 10 for n in range(50)])
    single = bench_tenants.schedule(size, "b1", [0] * 50)
    assert [e[:2] for e in many] == [e[:2] for e in single]  # same customers at the same moments
    assert [e[0] for e in many] == [slot / 25.0 for slot in range(50)]
    assert sorted(e[1] for e in many) == sorted(wa_id_of(n) for n in range(50))
    for _, wa_id, text, route in many:
        customer = bench_tenants.customer_of(text)
        assert customer is not None and wa_id == wa_id_of(customer) and route == customer // 10
    assert bench_tenants.customer_of("other text") is None
    warmup = bench_tenants.warmup_schedule(size, "a1", [i % 5 for i in range(12)])
    warm_customers = {bench_tenants.customer_of(text) for _, _, text, _ in warmup}
    assert warm_customers == set(range(50, 62))  # other customers than the measured schedule's
    assert [e[3] for e in warmup] == [i % 5 for i in range(12)]  # every tenant warmed, round robin
    assert [e[0] for e in warmup] == [i / 25.0 for i in range(12)]  # at the run's rate
    assert bench_tenants.round_order(3) == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]


def test_tenants_tally_attributes_requests_to_the_key_tenant_and_counts_missing_as_late() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def request(key: str, text: str, received: datetime, produced_ms: float) -> Seen:
        message = {"text": text, "received_at": received}
        return Seen("r", 0, 0, key, "ResponderRequest", {"batch_id": key + ":1", "messages": [message]},
                    int(produced_ms), produced_ms)

    base_ms = at.timestamp() * 1000.0
    records = [
        request("t00/default/wati:1", "x1 c0", at, base_ms + 1000 + 40),
        request("t01/default/wati:2", "x1 c3", at, base_ms + 1000 + 90),
        request("t01/default/wati:3", "warm-up", at, base_ms + 5000),  # not the bench's tag
    ]
    tally = bench_tenants.Tally("x1", slice_size=2)
    tally.update_requests(records, measure=True)
    assert records == []  # consumed records are dropped
    assert tally.messages == 2
    assert tally.by_tenant == {"t00": [40.0], "t01": [90.0]}
    assert tally.by_slice == {0: [40.0], 1: [90.0]}
    groups = bench_tenants.group_stats(tally.by_tenant, expected=2)  # one sample missing in each
    assert groups["worst_p99"] == math.inf
    assert bench_tenants.group_stats(tally.by_tenant, expected=1)["worst"] == "t01"
