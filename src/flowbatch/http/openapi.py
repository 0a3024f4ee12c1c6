"""The OpenAPI 3.1 description of the service (``GET /openapi.json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowbatch import __version__

if TYPE_CHECKING:
    from .service import Service

__all__ = ["openapi_schema"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "type", "message"],
            "properties": {
                "status": {"type": "integer"},
                "type": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": "string",
                               "description": "A server fault's id in the server log"},
            },
        }
    },
}
_OIP_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_TIMEOUT_HEADER = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "description": "Seconds each item may take; past it the answer is 504.",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}


def _errors(schema: dict[str, Any], *codes: int) -> dict[str, Any]:
    body = {"content": {"application/json": {"schema": schema}}}
    texts = {
        400: "The request is malformed; the message says what is wrong.",
        401: "Missing or wrong API key.",
        404: "No such pipeline, model or job.",
        405: "Method not allowed.",
        413: "The body or the number of inputs is over the limit.",
        415: "Unsupported Content-Type.",
        422: "The pipeline rejected the input.",
        500: "The pipeline failed (never the client's mistake); the request id in the "
             "answer and in X-Request-Id names the details in the server log.",
        503: "No room now (see Retry-After), or not ready, or shutting down.",
        504: "The deadline passed.",
    }
    return {str(c): {"description": texts[c], **body} for c in codes}


def openapi_schema(service: Service, root_path: str = "") -> dict[str, Any]:
    """The document for this service's pipelines."""
    names = sorted(service.endpoints)
    name_param = {
        "name": "name", "in": "path", "required": True,
        "schema": {"type": "string", "enum": names},
    }
    job_param = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    request_body = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/msgpack": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
        },
    }
    common = (400, 401, 404, 413, 415, 422, 500, 503, 504)
    json_any: dict[str, Any] = {"application/json": {"schema": {}}, "application/msgpack": {"schema": {}}}
    job_doc = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}}
    ok_json = {"content": {"application/json": {"schema": {"type": "object"}}}}
    paths: dict[str, Any] = {
        "/v1/pipelines/{name}": {
            "post": {
                "summary": "Run one input or many through a pipeline",
                "parameters": [name_param, _TIMEOUT_HEADER],
                "requestBody": request_body,
                "responses": {
                    "200": {"description": "The output(s); failed inputs in errors",
                            "content": json_any},
                    **_errors(_ERROR, *common),
                },
            }
        },
        "/v1/pipelines/{name}/jobs": {
            "post": {
                "summary": "Start an async job",
                "parameters": [name_param, _TIMEOUT_HEADER],
                "requestBody": request_body,
                "responses": {
                    "202": {"description": "Accepted; poll status_url",
                            "content": {"application/json": {"schema": {"type": "object"}},
                                        "application/msgpack": {"schema": {}}}},
                    **_errors(_ERROR, 400, 401, 404, 413, 415, 503),
                },
            }
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job's status, and its result or error when done",
                "parameters": [job_param],
                "responses": {"200": {"description": "The job", **job_doc},
                              **_errors(_ERROR, 401, 404)},
            },
            "delete": {
                "summary": "Cancel a job (or delete a finished one)",
                "parameters": [job_param],
                "responses": {"200": {"description": "The job", **job_doc},
                              **_errors(_ERROR, 401, 404)},
            },
        },
        "/v1/pipelines/{name}/stream": {
            "post": {
                "summary": "NDJSON in, NDJSON out, as results complete",
                "parameters": [name_param, _TIMEOUT_HEADER],
                # Any text is a stream: a line that is not JSON gets an error line.
                "requestBody": {"required": True, "content": {"application/x-ndjson": {
                    "schema": {"description": "one JSON value a line"}}}},
                "responses": {
                    "200": {"description": "One line per input line",
                            "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                    **_errors(_ERROR, 400, 401, 404, 415, 503),
                },
            }
        },
        "/v1/embeddings": {
            "post": {
                "summary": "OpenAI-compatible embeddings",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}},
                "responses": {
                    "200": {"description": "Embeddings", **ok_json},
                    **_errors(_OPENAI_ERROR, 400, 401, 404, 413, 422, 500, 503, 504),
                },
            }
        },
        "/v2/models/{name}/infer": {
            "post": {
                "summary": "Open Inference Protocol v2 inference",
                "parameters": [name_param],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/OipRequest"}}}},
                "responses": {"200": {"description": "Output tensors", **ok_json},
                              **_errors(_OIP_ERROR, *common)},
            }
        },
        "/v2/models/{name}": {"get": {
            "summary": "Model metadata", "parameters": [name_param],
            "responses": {"200": {"description": "Metadata", **ok_json},
                          **_errors(_OIP_ERROR, 401, 404)}}},
        "/v2/models/{name}/ready": {"get": {
            "summary": "Model readiness", "parameters": [name_param],
            "responses": {"200": {"description": "Ready", **ok_json},
                          **_errors(_OIP_ERROR, 401, 404, 503)}}},
        "/v2": {"get": {"summary": "Server metadata",
                        "responses": {"200": {"description": "Metadata", **ok_json},
                                      **_errors(_OIP_ERROR, 401)}}},
        "/v2/health/live": {"get": {"summary": "Liveness", "security": [],
                                    "responses": {"200": {"description": "Live", **ok_json}}}},
        "/v2/health/ready": {"get": {"summary": "Readiness", "security": [],
                                     "responses": {"200": {"description": "Ready", **ok_json},
                                                   "503": {"description": "Not ready", **ok_json}}}},
        "/healthz": {"get": {"summary": "Liveness", "security": [],
                             "responses": {"200": {"description": "Alive", **ok_json}}}},
        "/readyz": {"get": {"summary": "Readiness: every stage's setup done, not draining",
                            "security": [],
                            "responses": {"200": {"description": "Ready", **ok_json},
                                          "503": {"description": "Starting, or shutting "
                                                  "down (stopping, draining)",
                                                  **ok_json}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Text format", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}},
                                 **_errors(_ERROR, 401)}}},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "flowbatch", "version": __version__,
                 "description": f"Pipelines served: {', '.join(names)}"},
        "servers": [{"url": root_path or "/"}],
        "paths": paths,
        "components": {
            "schemas": {
                "InferRequest": {
                    "oneOf": [
                        {"type": "object", "required": ["input"], "additionalProperties": False,
                         "properties": {"input": {}}},
                        {"type": "object", "required": ["inputs"], "additionalProperties": False,
                         "properties": {"inputs": {"type": "array"}}},
                    ]
                },
                "Job": {
                    "type": "object",
                    "required": ["id", "status", "status_url"],
                    "properties": {
                        "id": {"type": "string"},
                        "pipeline": {"type": "string"},
                        "status": {"enum": ["queued", "running", "succeeded", "failed",
                                            "cancelled"]},
                        "status_url": {"type": "string"},
                        "result": {},
                        "error": {},
                    },
                },
                "EmbeddingRequest": {
                    "type": "object",
                    "required": ["model", "input"],
                    "additionalProperties": False,
                    "properties": {
                        "model": {"type": "string", "enum": names},
                        "input": {"oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1,
                             "items": {"type": "string", "minLength": 1}},
                        ]},
                        "encoding_format": {"enum": ["float", "base64"]},
                        "dimensions": {"type": "integer", "minimum": 1},
                        "user": {"type": "string"},
                    },
                },
                "OipRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["name", "shape", "datatype"],
                            "properties": {
                                "name": {"type": "string"},
                                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                "datatype": {"type": "string"},
                                "data": {},
                                "parameters": {"type": "object"},
                            },
                        }},
                        "outputs": {"type": "array"},
                    },
                },
            },
        },
    }
    embedders = sorted(
        service.endpoints if service.embedding_models is None else service.embedding_models
    )
    if embedders:
        doc["components"]["schemas"]["EmbeddingRequest"]["properties"]["model"]["enum"] = embedders
    else:
        del paths["/v1/embeddings"]
    if service.config.api_key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
