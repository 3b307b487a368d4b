"""Validation of the rendered Kubernetes manifests (``training/k8s.py`` builds them).

``validate_manifest`` checks a rendered object twice: against the ``kubernetes`` client's model classes (a
deserialise + serialise round trip that reports unknown fields and coerced types, which the model classes
otherwise drop or fix silently) and against the Kubernetes OpenAPI JSON schema shipped by
``kubernetes-validate`` (strict: no additional properties).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

# Kubernetes version the manifests are validated against by default. Features used: Indexed Jobs (GA 1.24),
# ttlSecondsAfterFinished (GA 1.23), emptyDir sizeLimit, publishNotReadyAddresses.
DEFAULT_K8S_VERSION = "1.31"


class ManifestError(ValueError):
    """A rendered manifest failed validation; ``problems`` lists every finding, one line each."""

    def __init__(self, kind: str, name: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{kind} {name!r} is not a valid Kubernetes manifest ({len(self.problems)} problem(s)):\n{lines}")


def _model_class_name(obj: Mapping[str, Any]) -> str:
    # "batch/v1" + "Job" -> "V1Job"; "v1" + "Service" -> "V1Service"; "apps/v1beta1" -> "V1beta1..."
    version = str(obj.get("apiVersion", "")).rsplit("/", 1)[-1]
    return f"{version[:1].upper()}{version[1:]}{obj.get('kind', '')}"


def _diff(original: Any, roundtrip: Any, path: str) -> Iterator[str]:
    """What the model round trip changed: fields it dropped (unknown to the model) and values it coerced."""
    if isinstance(original, Mapping):
        if not isinstance(roundtrip, Mapping):
            yield f"{path or '<root>'}: expected an object, got {type(original).__name__}"
            return
        for key, value in original.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in roundtrip:
                if value is not None:
                    yield f"{sub}: unknown field (dropped by the client model)"
            else:
                yield from _diff(value, roundtrip[key], sub)
    elif isinstance(original, (list, tuple)):
        if not isinstance(roundtrip, (list, tuple)) or len(roundtrip) != len(original):
            yield f"{path}: expected a list"
            return
        for i, (a, b) in enumerate(zip(original, roundtrip)):
            yield from _diff(a, b, f"{path}[{i}]")
    elif type(original) is not type(roundtrip) or original != roundtrip:
        yield (f"{path}: {original!r} ({type(original).__name__}) does not have the model's type "
               f"(it became {roundtrip!r}, {type(roundtrip).__name__})")


def model_problems(obj: Mapping[str, Any]) -> list[str]:
    """Check ``obj`` against the ``kubernetes`` client's model classes.

    ``ApiClient.deserialize`` is the client's own path from API JSON to models; it only needs an object with a
    ``.data`` attribute. Required fields and enum values fail at construction (client-side validation); unknown
    fields and wrongly typed scalars are dropped or coerced silently, which the round trip back through
    ``sanitize_for_serialization`` exposes.
    """
    from kubernetes import client

    klass = _model_class_name(obj)
    if not hasattr(client, klass):
        return [f"no kubernetes client model {klass} for apiVersion={obj.get('apiVersion')!r} kind={obj.get('kind')!r}"]
    configuration = client.Configuration()
    configuration.client_side_validation = True
    with client.ApiClient(configuration) as api:
        try:
            model = api.deserialize(SimpleNamespace(data=json.dumps(obj)), klass)
        except (ValueError, TypeError, AttributeError) as err:
            return [f"{klass}: {err}"]
        roundtrip = api.sanitize_for_serialization(model)
    return list(_diff(obj, roundtrip, ""))


def schema_problems(obj: Mapping[str, Any], k8s_version: str = DEFAULT_K8S_VERSION) -> list[str]:
    """Check ``obj`` against the strict Kubernetes OpenAPI schema of ``k8s_version`` (kubernetes-validate).

    kubernetes-validate stops at the first error (jsonschema's best match); that one is reported.
    """
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "<root>"
        return [f"{where}: {err.message} (OpenAPI schema, Kubernetes {err.version})"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [err.message]
    return []


def validate_manifest(obj: Mapping[str, Any], k8s_version: str = DEFAULT_K8S_VERSION) -> None:
    """Raise ``ManifestError`` listing every problem the client models and the OpenAPI schema find in ``obj``."""
    problems = model_problems(obj) + schema_problems(obj, k8s_version)
    if problems:
        name = obj.get("metadata", {}).get("name", "?") if isinstance(obj.get("metadata"), Mapping) else "?"
        raise ManifestError(str(obj.get("kind", "object")), str(name), problems)
