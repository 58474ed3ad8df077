"""Offline checks of the Kubernetes objects ats-deploy writes, against the schemas their API servers use.

No cluster is needed, so a field name, type or enum value the API would refuse fails here, before
anything is written. KServe's objects are checked against KServe's own CustomResourceDefinition
schemas (``spec.versions[].schema.openAPIV3Schema``), vendored in ``kserve_schemas/`` with their
provenance; Kubernetes' built-in objects (the HorizontalPodAutoscaler) against Kubernetes' schemas as
the ``kubernetes-validate`` package ships them.

Both checks are strict: a field the schema does not declare is an error. The API server would prune
it silently from a custom resource (or refuse it, with ``kubectl --validate=strict``); either way a
misspelt ``minReplica`` would be lost, so it is refused here. What a schema cannot say is not checked:
CEL rules, admission webhooks (KServe's name and autoscaler checks) and whether referenced objects
exist need a cluster.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from typing import Any

import jsonschema
import kubernetes_validate

from ..errors import UserError

SCHEMA_FOLDER = "kserve_schemas"
# The CRD schema of each KServe kind ats-deploy writes, by (apiVersion, kind).
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservices.v1beta1.json.gz",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntimes.v1alpha1.json.gz",
}
_PRESERVE = "x-kubernetes-preserve-unknown-fields"


class InvalidObject(UserError):
    """A generated object fails its schema: a bug in ats-deploy, reported before anything is written."""


def trim_crd(crd: dict, version: str) -> dict:
    """``version``'s openAPIV3Schema from a CustomResourceDefinition, without descriptions (what is vendored).

    Descriptions are documentation only; dropping them keeps every constraint and a tenth of the size.
    """
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return _without_descriptions(entry["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [_without_descriptions(value) for value in node]
    return node


def vendored_schema(api_version: str, kind: str) -> dict:
    """The vendored openAPIV3Schema of a KServe kind, as :func:`trim_crd` wrote it."""
    data = resources.files(__package__).joinpath(SCHEMA_FOLDER, KSERVE_SCHEMAS[api_version, kind]).read_bytes()
    return json.loads(gzip.decompress(data))


def _strict(node: Any) -> Any:
    """``node`` with undeclared fields refused wherever the schema lists the fields and keeps no unknown ones."""
    if isinstance(node, list):
        return [_strict(value) for value in node]
    if not isinstance(node, dict):
        return node
    strict = {key: _strict(value) for key, value in node.items()}
    if "properties" in strict and "additionalProperties" not in strict and not strict.get(_PRESERVE):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _kserve_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI 3.0 schemas are JSON Schema draft 4 with extensions (x-kubernetes-*), which draft 4 ignores.
    return jsonschema.Draft4Validator(_strict(vendored_schema(api_version, kind)))


def kubernetes_version() -> str:
    """The newest Kubernetes release whose schemas the installed ``kubernetes-validate`` ships (e.g. ``1.37``)."""
    return kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())


def check(obj: dict) -> str:
    """Check ``obj`` against its kind's schema; return what it was checked against, or raise :class:`InvalidObject`."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in KSERVE_SCHEMAS:
        error = jsonschema.exceptions.best_match(_kserve_validator(*key).iter_errors(obj))
        against = "KServe's CRD schema"
    else:
        version = kubernetes_version()
        against = f"the Kubernetes {version} schema"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            error = None
        except kubernetes_validate.ValidationError as exc:
            error = exc
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise InvalidObject(f"no Kubernetes schema for {key[1]} {key[0]}: {exc.message}") from None
    if error is not None:
        where = _path(error.absolute_path) or "the top level"
        raise InvalidObject(
            f"the generated {key[1]} fails {against} at {where}: {error.message}; nothing was written.",
            hint="This is a bug in ats-deploy: please report it with the command you ran.",
        )
    return against


def _path(parts) -> str:
    """``spec.predictor.model.resources`` / ``spec.metrics[0].pods``: where in the object an error is."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text
