"""The served OpenAPI schema, describing the routes FastAPI's routing does not see.

The completion routes bypass FastAPI (``LeanGateApp``) and the other routes are plain
Starlette routes, so FastAPI's own schema lists no path. ``describe_routes`` adds them,
built from the pydantic models that validate their bodies, so the schema states what the
proxy enforces; ``tests/middleware/test_openapi_fuzz.py`` holds the proxy to it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from leangate.middleware.corpora_api import AddRequest, DeleteRequest, QueryRequest
from leangate.middleware.protocol import (
    REQUEST_MODELS,
    ROUTE_PATHS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestOptions,
)
from leangate.middleware.registry import known_stages
from leangate.retrieval.corpora import CORPUS_NAME

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
JSON = "application/json"
OPTIONS_FIELD = "leangate"

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
COMPLETION_ERRORS = {
    "400": "Malformed JSON, or a field the request cannot have",
    "401": "No valid API key, when the policy requires one",
    "404": "No replica serves the model",
    "413": "The body, or what it asks for, is over a limit",
    "429": "Over the tenant's rate or concurrency limit",
    "502": "The backend failed or broke its protocol",
    "503": "No backend replica is healthy",
    "504": "The backend did not answer in time",
}
CORPUS_ERRORS = {
    "400": "Malformed JSON, an invalid name or field, or an id given twice",
    "401": "No valid API key, when the policy requires one",
    "413": "The body is over the limit",
    "503": "Corpora, or their store, are unavailable",
}
SUMMARIES = {
    "chat": "OpenAI chat completion, whole or streamed; unknown fields go to the backend",
    "completions": "OpenAI completion, whole or streamed; unknown fields go to the backend",
}
_CHOICES: Schema = {"type": "array", "items": {"type": "object"}}
ANSWER: Schema = {
    "type": "object",
    "required": ["id", "object", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "model": {"type": "string"},
        "choices": _CHOICES,
        "usage": {"type": ["object", "null"]},
    },
}
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object", "required": ["id"]}},
    },
}
EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "A chunk's JSON, or [DONE]"}},
}
"""One server-sent event (OpenAPI before 3.2: the ``schema`` of an event stream is an
event's)."""
HEALTH: Schema = {
    "type": "object",
    "required": ["status", "replicas_healthy", "replicas"],
    "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "replicas_healthy": {"type": "integer", "minimum": 0},
    },
}
CORPUS_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "documents", "chunks"],
                "properties": {
                    "name": {"type": "string"},
                    "documents": {"type": "integer", "minimum": 0},
                    "chunks": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
}
ADDED: Schema = {
    "type": "object",
    "required": ["corpus", "documents", "chunks"],
    "properties": {
        "corpus": {"type": "string"},
        "documents": {"type": "integer", "minimum": 1},
        "chunks": {"type": "integer", "minimum": 0},
    },
}
DELETED: Schema = {
    "type": "object",
    "required": ["deleted"],
    "properties": {"deleted": {"type": ["integer", "boolean"]}},
}
HITS: Schema = {
    "type": "object",
    "required": ["object", "corpus", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "document", "text", "score", "metadata"],
                "properties": {
                    "id": {"type": "string"},
                    "document": {"type": "string"},
                    "title": {"type": "string"},
                    "text": {"type": "string"},
                    "score": {"type": "number"},
                    "metadata": {"type": "object"},
                },
            },
        },
    },
}


def describe_routes(app: FastAPI) -> None:
    """Serve, as ``app``'s OpenAPI schema, FastAPI's own with every route of the proxy
    added (built once, on the first request for it)."""
    fastapi_schema = app.openapi

    def openapi() -> Schema:
        schema = fastapi_schema()
        if ROUTE_PATHS["chat"] not in schema.get("paths", {}):
            add_paths(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_paths(schema: Schema) -> None:
    """Add the proxy's routes and the schemas of their bodies to ``schema``, in place."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(body_schemas())
    components["Error"] = ERROR
    paths = schema.setdefault("paths", {})
    for route, model in REQUEST_MODELS.items():
        paths[ROUTE_PATHS[route]] = {"post": _completion(SUMMARIES[route], model)}
    paths["/v1/models"] = {"get": _models()}
    paths["/health"] = {"get": _health()}
    paths.update(_corpus_paths())


def body_schemas() -> dict[str, Schema]:
    """The JSON schemas of every request body, with their shared definitions."""
    models: list[type[BaseModel]] = [
        ChatCompletionRequest,
        CompletionRequest,
        RequestOptions,
        AddRequest,
        DeleteRequest,
        QueryRequest,
    ]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Schema] = top["$defs"]
    stage_names = {"type": "string", "enum": sorted(known_stages())}
    for field in ("stages", "disable"):
        _set_items(schemas["RequestOptions"]["properties"][field], stage_names)
    options = {"anyOf": [{"$ref": REF.format(model="RequestOptions")}, {"type": "null"}]}
    for model in REQUEST_MODELS.values():
        schemas[model.__name__]["properties"][OPTIONS_FIELD] = options
    return schemas


def _set_items(field: Schema, items: Schema) -> None:
    """Give every array ``field`` may be (directly or in an ``anyOf``) ``items``."""
    for variant in [field, *field.get("anyOf", [])]:
        if variant.get("type") == "array":
            variant["items"] = items


def _completion(summary: str, model: type[BaseModel]) -> Schema:
    answer = {
        JSON: {"schema": ANSWER},
        "text/event-stream": {"schema": EVENT},
    }
    responses: Schema = {"200": {"description": "The answer, whole or streamed", "content": answer}}
    responses.update(_errors(COMPLETION_ERRORS))
    return {
        "summary": summary,
        "requestBody": _body(model),
        "responses": responses,
    }


def _models() -> Schema:
    summary = "The models the healthy replicas serve"
    responses: Schema = {"200": _json(summary, MODEL_LIST)}
    responses.update(_errors({"503": "No backend replica is healthy"}))
    return {"summary": summary, "responses": responses}


def _health() -> Schema:
    summary = "200 once a replica is healthy, else 503"
    return {
        "summary": summary,
        "responses": {"200": _json("Healthy", HEALTH), "503": _json("Unavailable", HEALTH)},
    }


def _corpus_paths() -> dict[str, Schema]:
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{CORPUS_NAME.pattern}$"},
    }
    named_errors = {**CORPUS_ERRORS, "404": "No such corpus"}
    delete = _corpus_op("Delete documents", DeleteRequest, DELETED, named_errors, name)
    return {
        "/v1/corpora": {
            "get": _corpus_op("The tenant's corpora", None, CORPUS_LIST, CORPUS_ERRORS)
        },
        "/v1/corpora/{name}": {
            "delete": _corpus_op("Drop a corpus", None, DELETED, named_errors, name)
        },
        "/v1/corpora/{name}/documents": {
            "post": _corpus_op(
                "Add documents",
                AddRequest,
                ADDED,
                {
                    **CORPUS_ERRORS,
                    "409": "An id is stored",
                    "413": "The body is over the limit, or its documents' text is",
                },
                name,
            ),
            "delete": delete,
        },
        "/v1/corpora/{name}/documents/delete": {"post": delete},
        "/v1/corpora/{name}/query": {
            "post": _corpus_op("Search a corpus", QueryRequest, HITS, named_errors, name)
        },
    }


def _corpus_op(
    summary: str,
    model: type[BaseModel] | None,
    answer: Schema,
    errors: dict[str, str],
    *parameters: Schema,
) -> Schema:
    operation: Schema = {"summary": summary, "responses": {"200": _json(summary, answer)}}
    operation["responses"].update(_errors(errors))
    if parameters:
        operation["parameters"] = list(parameters)
    if model is not None:
        operation["requestBody"] = _body(model)
    return operation


def _body(model: type[BaseModel]) -> Schema:
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"required": True, "content": {JSON: {"schema": ref}}}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(errors: dict[str, str]) -> Schema:
    error = {"$ref": REF.format(model="Error")}
    return {status: _json(text, error) for status, text in errors.items()}
