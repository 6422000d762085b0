"""Property-based fuzzing of the API from its own OpenAPI schema (schemathesis strategies, Hypothesis).

Every operation in the schema gets valid requests (positive: within the schema) and invalid ones
(negative: each breaks the schema somewhere), sent to the real server over loopback with the API
key on. Whatever comes in: no 5xx, every 4xx is OpenAI's error shape, replies conform to the schema
where it declares them, invalid input is refused and the API key is never ignored.
FUZZ_EXAMPLES=1000 (environment) explores further than the default.
"""

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.server import RunningServer

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

API_KEY = "fuzz-key"
AUTHORIZATION = {"Authorization": f"Bearer {API_KEY}"}
# Operations with a JSON body, so that they have invalid forms too (GET /tokenizer_info's one parameter, a
# model name, is any string; unknown parameters are ignored, as unknown body fields are).
BODY_OPERATIONS = ["POST /tokenize", "POST /detokenize", "POST /v1/completions", "POST /v1/chat/completions"]
OPERATIONS = ["GET /health", "GET /v1/models", "GET /tokenizer_info", *BODY_OPERATIONS]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 100))  # per operation and mode
# (operation, mode, status) -> requests sent: the coverage check below reads it, and it is the fuzz report.
SENT = Counter()


@pytest.fixture(scope="module")
def api_schema(tiny_exports):
    # The time limit keeps the largest valid requests (16 prompts, n = 8, whole context) quick.
    with RunningServer(tiny_exports(), api_key=API_KEY, max_generation_seconds=0.5) as server:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTHORIZATION)  # behind the key too


def test_the_fuzzed_operations_are_all_the_schema_has(api_schema):
    assert sorted(result.ok().label for result in api_schema.get_all_operations()) == sorted(OPERATIONS)


def check_reply(case):
    response = case.call(headers=AUTHORIZATION, timeout=30)
    SENT[(case.operation.label, case.meta.generation.mode.value, response.status_code)] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
    # A schema-valid request may still be refused for what a schema cannot say (prompt + max_tokens over the
    # context, min_tokens over max_tokens): "valid data is accepted" is the one check left out.
    case.validate_response(response, headers=AUTHORIZATION, excluded_checks=[positive_data_acceptance])


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_any_request_gets_a_well_formed_reply(api_schema, label, mode):
    if mode == "negative" and label not in BODY_OPERATIONS:
        pytest.skip("a GET has no invalid form here")
    operation = api_schema.find_operation_by_label(label)

    # No shrinking: a failure is reported as found, with a curl line to replay it; shrinking would send
    # hundreds more requests, for minutes.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def fuzz(case):
        check_reply(case)

    fuzz()


def test_valid_requests_reached_generation():
    if not SENT:
        pytest.skip("counts what the fuzz tests above sent in the same session")
    for label in BODY_OPERATIONS:
        statuses = Counter(
            {status: n for (operation, mode, status), n in SENT.items() if operation == label and mode == "positive"}
        )
        assert statuses[200] >= 5, (label, statuses)  # not only refusals: valid input got through
    lines = [f"| {operation} | {mode} | {status} | {n} |" for (operation, mode, status), n in sorted(SENT.items())]
    print(
        f"\nfuzzed requests: {sum(SENT.values())}",
        "| operation | mode | status | requests |",
        "|---|---|---:|---:|",
        *lines,
        sep="\n",
    )
