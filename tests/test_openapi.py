"""The OpenAPI document is a contract tools accept: valid for openapi-spec-validator and
Redocly's linter (its recommended rules, no warning), every operation named, summarized,
described and secured, every error it can answer documented as problem+json, every example
valid against its schema."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from app.auth import ApiKey
from app.main import create_app
from app.settings import Settings

REDOCLY = "@redocly/cli@2.77.0"  # pinned: the linter's rules change between releases


KEY = ApiKey(name="admin", sha256="0" * 64, scopes=frozenset({"admin"}))


@pytest.fixture(scope="module", params=[True, False], ids=["with-keys", "open"])
def document(request: pytest.FixtureRequest) -> dict[str, Any]:
    # The document /openapi.json serves (built without Redis: nothing of it depends on one).
    keys = (KEY,) if request.param else ()
    settings = Settings(redis_url="redis://127.0.0.1:1/0", api_keys=keys)
    schema: dict[str, Any] = create_app(settings).openapi()
    return schema


def keyed(document: dict[str, Any]) -> bool:
    return {} not in document["paths"]["/v1/streams/{name}"]["get"]["security"]


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed")
def test_redocly_lints_the_document_clean(document: dict[str, Any], tmp_path: Path) -> None:
    # npx keeps the package in npm's cache (~/.npm): a few seconds once it is there.
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(document))
    result = subprocess.run(
        ["npx", "--yes", REDOCLY, "lint", str(path), "--format=json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    assert report["problems"] == [], report["problems"]
    assert report["totals"] == {"errors": 0, "warnings": 0, "ignored": 0}
    assert result.returncode == 0


def test_operations_have_readable_ids_a_summary_and_a_description(
    document: dict[str, Any],
) -> None:
    ids = {
        (method, path): operation["operationId"] for method, path, operation in operations(document)
    }
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch("[a-z]+(?:[A-Z][a-z]+)*", name) for name in ids.values()), ids
    assert ids[("put", "/v1/streams/{name}")] == "putStream"
    assert ids[("post", "/v1/streams/{name}/values")] == "pushValues"
    assert ids[("post", "/v1/values")] == "pushBulk"
    assert ids[("get", "/v1/streams")] == "listStreams"
    for _, _, operation in operations(document):
        assert operation["summary"], operation["operationId"]
        assert operation["description"], operation["operationId"]


def test_keys_are_a_documented_security_scheme(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["bearerKey"].items()
    assert {"type": "apiKey", "in": "query", "name": "api_key"}.items() <= schemes[
        "queryKey"
    ].items()
    for method, path, operation in operations(document):
        responses = operation["responses"]
        if path in ("/healthz", "/readyz"):
            assert operation["security"] == []
            assert "401" not in responses
            continue
        assert {"bearerKey": []} in operation["security"], path
        assert ({"queryKey": []} in operation["security"]) == (method == "get"), path
        # With keys configured one is required, and missing or refused it is a 401 or a 403;
        # an open service takes requests without one (the empty requirement) and answers
        # neither.
        assert ({} not in operation["security"]) == keyed(document)
        assert ({"401", "403"} <= set(responses)) == keyed(document), path
        assert ("401" in responses) == keyed(document), path


def test_every_error_is_problem_json(document: dict[str, Any]) -> None:
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for _, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status[0] in "45":
                assert response["content"] == {"application/problem+json": problem}, (path, status)
                assert response["description"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_each_route_documents_what_it_can_answer(document: dict[str, Any]) -> None:
    def errors(method: str, path: str) -> set[str]:
        return {s for s in document["paths"][path][method]["responses"] if s[0] in "45"}

    everywhere = {"408", "431"}
    common = everywhere | ({"401", "403"} if keyed(document) else set())
    push = common | {"404", "409", "413", "422", "503"}
    assert errors("post", "/v1/streams/{name}/values") == push
    assert errors("put", "/v1/streams/{name}") == common | {"413", "422", "503"}
    assert errors("get", "/v1/streams/{name}") == common | {"404", "422", "503"}
    assert errors("get", "/metrics") == common  # no 422: it takes no parameter
    assert errors("get", "/healthz") == everywhere


def test_every_example_matches_its_schema(document: dict[str, Any]) -> None:
    components = document["components"]
    checked = 0
    for name, schema in components["schemas"].items():
        for example in schema.get("examples", []):
            check(example, {"$ref": f"#/components/schemas/{name}"}, components)
            checked += 1
        for field, spec in schema.get("properties", {}).items():
            for example in spec.get("examples", []):
                check(example, spec, components, f"{name}.{field}")
                checked += 1
    assert checked > 50


def check(
    example: Any, schema: dict[str, Any], components: dict[str, Any], where: str = ""
) -> None:
    # The components ride along in the root, so that "#/components/schemas/..." resolves.
    validator = jsonschema.Draft202012Validator({**schema, "components": components})
    problems = [error.message for error in validator.iter_errors(example)]
    assert not problems, (where, example, problems)
